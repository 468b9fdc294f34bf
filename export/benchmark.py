"""Per-model format benchmark: ``python -m export.benchmark artifacts/RUN [...] --out benchmarks/export``.

One row per (model, format, batch): file size, accuracy and its delta vs PyTorch (from the
manifest, measured on the same test images at export), latency p50/p95/p99 per batch, throughput, the
provider that really ran it and the device. Warm-up first, then timed iterations; every format of a
model is measured side by side in one process. Results merge into ``<out>.json`` by run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.runtime import ArtifactError, open_artifact, read_manifest
from service.tensorrt_engine import unavailable_reason
from utils import UserError, atomic_write, atomic_write_json, cli, cpu_name, device_name, pyplot, save_figure

FORMAT_LABELS = {"pytorch": "PyTorch eager FP32", "fp32": "ONNX Runtime FP32", "fp16": "ONNX Runtime FP16",
                 "int8": "ONNX Runtime INT8 (CPU Q/DQ)", "int8_trt": "ONNX Runtime INT8 (TensorRT Q/DQ)",
                 "trt_fp16": "TensorRT FP16", "trt_int8": "TensorRT INT8"}


@dataclass
class BenchmarkConfig:
    """Options of ``python -m export.benchmark`` (the CLI is generated from these fields)."""

    artifacts: list[str] = field(default_factory=list, metadata={"help": "export folders (with manifest.json)"})
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    warmup: int = 3
    iters: int = field(default=10, metadata={"help": "timed calls at least, per row"})
    min_seconds: float = field(default=3.0, metadata={"help": "timed seconds at least, per row"})
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    formats: list[str] = field(default_factory=lambda: list(FORMAT_LABELS),
                               metadata={"choices": list(FORMAT_LABELS)})
    providers: list[str] | None = field(default=None, metadata={
        "help": "ONNX Runtime providers to measure (default: cpu, plus cuda when available)"})
    out: str = field(default="benchmarks/export", metadata={"help": "output path without extension (.json/.md/.png)"})


def time_fn(fn: Callable[[np.ndarray], object], x: np.ndarray, warmup: int, iters: int,
            min_seconds: float) -> list[float]:
    """Latencies in ms of ``fn(x)`` after ``warmup`` calls: at least ``iters`` calls and ``min_seconds``."""
    for _ in range(warmup):
        fn(x)
    lat: list[float] = []
    start = time.perf_counter()
    while len(lat) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(x)
        lat.append((time.perf_counter() - t0) * 1e3)
        if len(lat) >= 10 * iters:
            break
    return lat


def summarize(lat: list[float], batch: int) -> dict:
    a = np.asarray(lat)
    return {**{f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 95, 99)},
            "throughput_ips": float(batch * len(a) / (a.sum() / 1e3)), "iterations": len(a)}


def _runners(artifact_dir: Path, manifest: dict, formats: list[str], threads: int, providers: list[str]):
    """Yield (format, provider, device, fn) for every measurable format."""
    import torch

    if "pytorch" in formats:
        from export.onnx_export import load_run

        try:
            model, *_ = load_run(manifest["source_run"])
        except UserError as e:
            print(f"skipping PyTorch rows: {e}", file=sys.stderr)
        else:
            torch.set_num_threads(threads)

            def eager(x, model=model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

            yield "pytorch", "torch CPU", cpu_name(), eager
            if torch.cuda.is_available():
                gpu_model = model.cuda()

                def eager_cuda(x, m=gpu_model):
                    with torch.inference_mode():
                        return m(torch.from_numpy(x).cuda()).cpu().numpy()

                yield "pytorch", "torch CUDA", device_name("cuda"), eager_cuda
    for fmt in ("fp32", "fp16", "int8", "int8_trt"):
        if fmt not in formats or "sha256" not in manifest["artifacts"].get(fmt, {}):
            continue
        for prov in providers:
            try:
                m, _ = open_artifact(artifact_dir, fmt, [prov], threads=threads, require=True)
            except ArtifactError as e:
                print(f"skipping {fmt} on {prov}: {e}", file=sys.stderr)
                continue
            device = cpu_name() if m.provider == "CPUExecutionProvider" else device_name("cuda")
            yield fmt, m.provider, device, m
    for fmt in ("trt_fp16", "trt_int8"):
        e = manifest["artifacts"].get(fmt, {})
        if fmt in formats and "sha256" in e and unavailable_reason() is None:
            from service.tensorrt_engine import TrtRunner

            try:
                runner = TrtRunner(artifact_dir / e["file"], e)
            except ArtifactError as err:  # an engine of another TensorRT version or GPU
                print(f"skipping {fmt}: {err}", file=sys.stderr)
                continue
            yield fmt, "TensorRT", e["gpu"], runner


def sample_inputs(manifest: dict, n: int) -> np.ndarray:
    """Model input of ``n`` of the run's test images (repeated where there are fewer), through the serving
    preprocessing; seeded random images where the data set is not here (timing and parity need no labels)."""
    from service.preprocessing import Preprocessing
    from training.data import load_dataset

    pre = Preprocessing.from_dict(manifest["preprocessing"])
    try:
        data_dir = json.loads((Path(manifest["source_run"]) / "metrics.json").read_text())["config"]["data_dir"]
        images = load_dataset(manifest["dataset"], data_dir, download=False).test_x
    except Exception:
        images = np.random.default_rng(0).integers(0, 256, (n, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    return pre.to_input(np.resize(images, (n, *images.shape[1:])))


def benchmark_model(artifact_dir: Path, batches: list[int], warmup: int, iters: int, min_seconds: float,
                    threads: int, formats: list[str], providers: list[str]) -> list[dict]:
    manifest = read_manifest(artifact_dir / "manifest.json")
    pretrained = not str(manifest.get("weights", "")).startswith("none")
    x_all = sample_inputs(manifest, max(batches))
    ref_acc = manifest["pytorch"]["accuracy"]
    rows = []
    for fmt, provider, device, fn in _runners(artifact_dir, manifest, formats, threads, providers):
        e = manifest["artifacts"].get(fmt, {})
        size = e.get("size_bytes") if fmt != "pytorch" else _state_dict_bytes(manifest)
        acc = ref_acc if fmt == "pytorch" else e.get("accuracy")
        for b in batches:
            s = summarize(time_fn(fn, x_all[:b], warmup, iters, min_seconds), b)
            rows.append({
                "model": manifest["backbone"], "run": manifest["run"], "format": fmt,
                "format_label": FORMAT_LABELS[fmt], "precision": "fp32" if fmt == "pytorch" else e["precision"],
                "batch": b, "size_mb": round(size / 2**20, 2) if size else None,
                "accuracy": acc, "accuracy_delta": (acc - ref_acc) if acc is not None and ref_acc is not None else None,
                "pretrained": pretrained,
                "weights": manifest.get("weights"), "dataset": manifest["dataset"],
                "input_size": manifest["preprocessing"]["input_size"],
                **{k: round(v, 3) for k, v in s.items() if k != "iterations"},
                "iterations": s["iterations"], "provider": provider, "device": device,
            })
            print(f"{manifest['backbone']:18} {FORMAT_LABELS[fmt]:34} b={b:<3} p50 {s['p50_ms']:8.2f} ms  "
                  f"{s['throughput_ips']:8.1f} img/s  [{provider}]", flush=True)
    return rows


def _state_dict_bytes(manifest: dict) -> int | None:
    p = Path(manifest["source_run"]) / "best.pt"
    return p.stat().st_size if p.exists() else None


def to_markdown(rows: list[dict]) -> str:
    out = ["# Export benchmark", "",
           "Produced by `python -m export.benchmark`. Latency is per batch; throughput in images/s. "
           "Accuracy is measured at export on the run's test images through the serving preprocessing; "
           "models exported from random init are timed only (accuracy – here; their rows in the JSON keep it).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        r0 = rs[0]
        out += [f"## {model}", "",
                f"Weights: {r0['weights']}; dataset: {r0['dataset']}; input {r0['input_size']} px "
                f"(32 px images upsampled in-graph); device: {r0['device']}.", "",
                "| format | batch | size MB | accuracy | Δ vs PyTorch | p50 ms | p95 ms | img/s | provider |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            shown = r.get("pretrained", True)
            acc = "–" if r["accuracy"] is None or not shown else f"{r['accuracy']:.4f}"
            delta = "–" if r["accuracy_delta"] is None or not shown else f"{100 * r['accuracy_delta']:+.2f} pts"
            out.append(f"| {r['format_label']} | {r['batch']} | {r['size_mb']} | {acc} | {delta} | "
                       f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['throughput_ips']:.1f} | {r['provider']} |")
        out += ["", *ratio_lines(rs), ""]
    out += ["![accuracy vs latency](export.png)", ""]
    return "\n".join(out)


def ratio_lines(rs: list[dict]) -> list[str]:
    """Throughput ratios at the largest batch, CPU rows: INT8/FP32 ORT and ORT FP32/PyTorch."""
    cpu = [r for r in rs if r["provider"] in ("CPUExecutionProvider", "torch CPU")]
    if not cpu:
        return []
    b = max(r["batch"] for r in cpu)
    tp = {r["format"]: r["throughput_ips"] for r in cpu if r["batch"] == b}
    lines = []
    if "fp32" in tp and "int8" in tp:
        lines.append(f"- INT8 (CPU Q/DQ) ÷ FP32 ONNX Runtime throughput at batch {b}: "
                     f"**{tp['int8'] / tp['fp32']:.2f}×**")
    if "fp32" in tp and "int8_trt" in tp:
        lines.append(f"- INT8 (TensorRT Q/DQ, symmetric) ÷ FP32 ONNX Runtime on CPU at batch {b}: "
                     f"{tp['int8_trt'] / tp['fp32']:.2f}×")
    if "fp32" in tp and "pytorch" in tp:
        lines.append(f"- ONNX Runtime FP32 ÷ PyTorch eager throughput at batch {b}: "
                     f"**{tp['fp32'] / tp['pytorch']:.2f}×**")
    return lines


def plot_pareto(rows: list[dict], path: Path, batch: int) -> None:
    plt = pyplot()
    pts = [r for r in rows if r["accuracy"] is not None and r.get("pretrained", True) and r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in pts:
        ax.scatter(r["p50_ms"] / batch, 100 * r["accuracy"], s=40)
        ax.annotate(f"{r['model']}\n{r['format_label']}", (r["p50_ms"] / batch, 100 * r["accuracy"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel=f"latency per image at batch {batch} (ms, log scale)", ylabel="test accuracy (%)",
           title="accuracy vs latency (up and left is better)")
    ax.grid(alpha=0.3, which="both")
    if not pts:
        ax.text(0.5, 0.5, "no pretrained rows", ha="center", transform=ax.transAxes)
    save_figure(fig, path)


def run_benchmark(cfg: BenchmarkConfig) -> list[dict]:
    """Measure every artifact folder of ``cfg``; merge the rows into ``<out>.json`` (one run's rows replace
    that run's earlier rows) and rewrite ``<out>.md`` and ``<out>.png``. Returns all rows."""
    if not cfg.artifacts:
        raise UserError("nothing to benchmark: give one or more export folders")
    import onnxruntime as ort

    providers = cfg.providers or ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers()
                                            else [])
    try:
        rows: list[dict] = []
        for a in cfg.artifacts:
            rows += benchmark_model(Path(a), cfg.batches, cfg.warmup, cfg.iters, cfg.min_seconds, cfg.threads,
                                    cfg.formats, providers)
    except ArtifactError as e:
        raise UserError(str(e)) from e
    out = Path(cfg.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    measured = {r["run"] for r in rows}
    rows = [r for r in old if r.get("run") not in measured] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rows, out.with_suffix(".json"))
    atomic_write(out.with_suffix(".md"), to_markdown(rows))
    plot_pareto(rows, out.with_suffix(".png"), batch=max(cfg.batches))
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    return cli(BenchmarkConfig, run_benchmark, argv, "python -m export.benchmark", __doc__, positional=("artifacts",),
               section="benchmark")


if __name__ == "__main__":
    sys.exit(main())
