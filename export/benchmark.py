"""Per-model format benchmark: ``python -m export.benchmark artifacts/RUN [...] --out benchmarks/export``.

One row per (model, format, batch): file size, accuracy and its delta vs PyTorch (from the
manifest, measured on the same test images at export), latency p50/p95/p99 per batch, throughput and
its ratio to ONNX Runtime FP32 on CPU at the same batch, the provider that really ran it and the
device. Warm-up first, then timed iterations; every format of a model is measured side by side in one
process. Results merge into ``<out>.json`` by run.

Where ``openvino`` is installed, OpenVINO runs the same ONNX files (FP32 and both INT8 Q/DQ flavours)
beside ONNX Runtime, with float layers in float32 and, on CPUs with native bfloat16, in bfloat16 too;
its accuracy and its parity with ONNX Runtime on the same file (top-1 agreement, max |Δlogit|) are
measured on the export's test images. ONNX Runtime's threads do not spin, as in the service.
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

from export import int8_search
from service import openvino_backend
from service.runtime import ArtifactError, OrtModel, open_artifact, read_manifest, verify_sha256
from service.tensorrt_engine import unavailable_reason
from utils import UserError, atomic_write, atomic_write_json, cli, cpu_name, device_name, pyplot, save_figure

FORMAT_LABELS = {"pytorch": "PyTorch eager FP32", "fp32": "ONNX Runtime FP32", "fp16": "ONNX Runtime FP16",
                 "int8": "ONNX Runtime INT8 (CPU Q/DQ)", "int8_trt": "ONNX Runtime INT8 (TensorRT Q/DQ)",
                 "trt_fp16": "TensorRT FP16", "trt_int8": "TensorRT INT8",
                 "openvino_fp32": "OpenVINO FP32", "openvino_bf16": "OpenVINO BF16 (FP32 file)",
                 "openvino_int8": "OpenVINO INT8 (CPU Q/DQ)",
                 "openvino_int8_bf16": "OpenVINO INT8 (CPU Q/DQ, BF16 float layers)",
                 "openvino_int8_trt": "OpenVINO INT8 (TensorRT Q/DQ)",
                 "openvino_int8_trt_bf16": "OpenVINO INT8 (TensorRT Q/DQ, BF16 float layers)"}
# OpenVINO's formats: (the ONNX file it runs, as a manifest format; OpenVINO's float precision). Both INT8
# files: OpenVINO runs the TensorRT flavour (Q/DQ on the inputs of weighted layers and Adds only) faster
# where the CPU flavour also quantizes ops it has no INT8 kernel for (EfficientNet-B0's Sigmoid/Mul).
OPENVINO_FORMATS = {"openvino_fp32": ("fp32", "f32"), "openvino_bf16": ("fp32", "bf16"),
                    "openvino_int8": ("int8", "f32"), "openvino_int8_bf16": ("int8", "bf16"),
                    "openvino_int8_trt": ("int8_trt", "f32"), "openvino_int8_trt_bf16": ("int8_trt", "bf16")}
CPU_PROVIDERS = ("CPUExecutionProvider", "torch CPU", openvino_backend.PROVIDER)


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
    ort_spinning: bool = field(default=False, metadata={
        "help": "ONNX Runtime's threads busy-wait between calls (off, as in the service, unless set)"})
    providers: list[str] | None = field(default=None, metadata={
        "help": "ONNX Runtime providers to measure (default: cpu, plus cuda when available)"})
    parity_images: int | None = field(default=None, metadata={
        "help": "test images for OpenVINO's accuracy and parity with ONNX Runtime (default: the export's)"})
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


def _runners(artifact_dir: Path, manifest: dict, formats: list[str], threads: int, providers: list[str],
             spinning: bool = False):
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
                m, _ = open_artifact(artifact_dir, fmt, [prov], threads=threads, require=True, spinning=spinning)
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
    yield from _openvino_runners(artifact_dir, manifest, formats, threads)


def openvino_formats() -> list[str]:
    """The OpenVINO formats this machine runs: none without openvino, no BF16 ones without native bfloat16."""
    if openvino_backend.unavailable_reason():
        return []
    bf16 = openvino_backend.bf16_capable()
    return [f for f, (_, precision) in OPENVINO_FORMATS.items() if bf16 or precision != "bf16"]


def _openvino_runners(artifact_dir: Path, manifest: dict, formats: list[str], threads: int):
    """(format, provider, device, model) of OpenVINO on the CPU for the ONNX files the manifest has."""
    wanted = [f for f in OPENVINO_FORMATS if f in formats
              and "sha256" in manifest["artifacts"].get(OPENVINO_FORMATS[f][0], {})]
    reason = openvino_backend.unavailable_reason() if wanted else None
    if reason:
        print(f"skipped: {', '.join(wanted)}: {reason}", file=sys.stderr)
        return
    runnable = openvino_formats()
    for fmt in wanted:
        if fmt not in runnable:
            print(f"skipped: {fmt}: this CPU has no native bfloat16 (AMX or AVX-512 BF16)", file=sys.stderr)
            continue
        src, precision = OPENVINO_FORMATS[fmt]
        e = manifest["artifacts"][src]
        try:
            verify_sha256(artifact_dir / e["file"], e["sha256"])
            model = openvino_backend.OpenVinoModel(artifact_dir / e["file"], threads=threads, precision=precision)
        except ArtifactError as err:
            print(f"skipped: {fmt}: {err}", file=sys.stderr)
            continue
        yield fmt, openvino_backend.PROVIDER, cpu_name(), model


def _test_set(manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's test images (uint8 NHWC) and labels, or None where the data set is not here."""
    from training.data import load_dataset
    from training.record import load_metrics

    try:
        data_dir = load_metrics(manifest["source_run"])["config"]["data_dir"]
        data = load_dataset(manifest["dataset"], data_dir, download=False)
    except Exception:
        return None
    return data.test_x, data.test_y


def sample_inputs(manifest: dict, n: int) -> np.ndarray:
    """Model input of ``n`` of the run's test images (repeated where there are fewer), through the serving
    preprocessing; seeded random images where the data set is not here (timing and parity need no labels)."""
    from service.preprocessing import Preprocessing

    pre = Preprocessing.from_dict(manifest["preprocessing"])
    test = _test_set(manifest)
    if test is None:
        images = np.random.default_rng(0).integers(0, 256, (n, pre.image_size, pre.image_size, 3), dtype=np.uint8)
    else:
        images = test[0]
    return pre.to_input(np.resize(images, (n, *images.shape[1:])))


def eval_inputs(manifest: dict, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Model input and labels of the test images export evaluated on (the first ``eval_images``, or
    ``limit``); 64 seeded random images and no labels where the data set is not here."""
    n = manifest.get("eval_images", 64) if limit is None else limit
    test = _test_set(manifest)
    if test is None:
        return sample_inputs(manifest, min(n, 64)), None
    from service.preprocessing import Preprocessing

    return Preprocessing.from_dict(manifest["preprocessing"]).to_input(test[0][:n]), test[1][:n]


def parity(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> dict:
    """Top-1 agreement and max |Δlogit| of ``logits`` against a reference's on the same inputs, and their
    accuracy where there are labels."""
    pred = logits.argmax(1)
    return {"images": int(len(logits)), "top1_agreement": float((pred == reference.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "accuracy": None if labels is None else float((pred == labels).mean())}


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _backend(fmt: str, provider: str) -> str:
    if fmt in OPENVINO_FORMATS:
        return "openvino"
    return "pytorch" if fmt == "pytorch" else "tensorrt" if provider == "TensorRT" else "onnxruntime"


def benchmark_model(artifact_dir: Path, batches: list[int], warmup: int, iters: int, min_seconds: float,
                    threads: int, formats: list[str], providers: list[str],
                    parity_images: int | None = None, ort_spinning: bool = False) -> list[dict]:
    manifest = read_manifest(artifact_dir / "manifest.json")
    pretrained = not str(manifest.get("weights", "")).startswith("none")
    x_all = sample_inputs(manifest, max(batches))
    ref_acc = manifest["pytorch"]["accuracy"]
    rows = []
    checks: dict = {}  # OpenVINO parity: inputs, labels and ONNX Runtime's logits per source file
    for fmt, provider, device, fn in _runners(artifact_dir, manifest, formats, threads, providers, ort_spinning):
        e = manifest["artifacts"].get(OPENVINO_FORMATS.get(fmt, (fmt,))[0], {})
        size = e.get("size_bytes") if fmt != "pytorch" else _state_dict_bytes(manifest)
        acc = ref_acc if fmt == "pytorch" else e.get("accuracy")
        precision = "fp32" if fmt == "pytorch" else e["precision"]
        extra: dict = {}
        if isinstance(fn, OrtModel):
            extra = {"runtime": {"onnxruntime": ort_version(), "intra_op_threads": threads, "spinning": ort_spinning}}
        if fmt in OPENVINO_FORMATS:
            src = OPENVINO_FORMATS[fmt][0]
            check = _openvino_check(artifact_dir, manifest, src, fn, threads, parity_images, checks)
            same_images = check["inputs"] == "test" and check["images"] == manifest.get("eval_images")
            acc = check["accuracy"] if same_images else None  # comparable with the other rows' accuracy only so
            precision = openvino_backend.served_precision(e["precision"], fn.precision)
            extra = {"source_format": src, "parity": check, "runtime": fn.describe()}
            print(f"{manifest['backbone']:18} {FORMAT_LABELS[fmt]:34} vs ONNX Runtime on {e['file']}, "
                  f"{check['images']} {check['inputs']} images: top-1 agreement {check['top1_agreement']:.4f}, "
                  f"max |Δlogit| {check['max_abs_logit_diff']:.2e}", flush=True)
        for b in batches:
            s = summarize(time_fn(fn, x_all[:b], warmup, iters, min_seconds), b)
            rows.append({
                "model": manifest["backbone"], "run": manifest["run"], "format": fmt,
                "format_label": FORMAT_LABELS[fmt], "precision": precision, "backend": _backend(fmt, provider),
                "batch": b, "size_mb": round(size / 2**20, 2) if size else None,
                "accuracy": acc, "accuracy_delta": (acc - ref_acc) if acc is not None and ref_acc is not None else None,
                "pretrained": pretrained,
                "weights": manifest.get("weights"), "dataset": manifest["dataset"],
                "input_size": manifest["preprocessing"]["input_size"],
                **{k: round(v, 3) for k, v in s.items() if k != "iterations"},
                "iterations": s["iterations"], "provider": provider, "device": device, **extra,
            })
            print(f"{manifest['backbone']:18} {FORMAT_LABELS[fmt]:34} b={b:<3} p50 {s['p50_ms']:8.2f} ms  "
                  f"{s['throughput_ips']:8.1f} img/s  [{provider}]", flush=True)
    base = {r["batch"]: r["throughput_ips"] for r in rows
            if r["format"] == "fp32" and r["provider"] == "CPUExecutionProvider"}
    for r in rows:
        r["vs_ort_fp32"] = round(r["throughput_ips"] / base[r["batch"]], 3) if r["batch"] in base else None
    return rows


def _openvino_check(artifact_dir: Path, manifest: dict, src: str, model, threads: int, limit: int | None,
                    cache: dict) -> dict:
    """OpenVINO's accuracy and parity with ONNX Runtime on the same ONNX file and test images."""
    from export.exporter import batched

    if "x" not in cache:
        cache["x"], cache["y"] = eval_inputs(manifest, limit)
    if src not in cache:
        ort_model, _ = open_artifact(artifact_dir, src, ["cpu"], threads=threads)
        cache[src] = batched(ort_model, cache["x"], 32)
    out = parity(batched(model, cache["x"], 32), cache[src], cache["y"])
    ref_acc = None if cache["y"] is None else float((cache[src].argmax(1) == cache["y"]).mean())
    return {**out, "reference": f"ONNX Runtime CPU, {manifest['artifacts'][src]['file']}",
            "reference_accuracy": ref_acc, "inputs": "random" if cache["y"] is None else "test"}


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
                f"(32 px images upsampled in-graph); device: {r0['device']}.{runtime_note(rs)}", "",
                "| format | batch | size MB | accuracy | Δ vs PyTorch | p50 ms | p95 ms | img/s | × ORT FP32 | "
                "provider |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            shown = r.get("pretrained", True)
            acc = "–" if r["accuracy"] is None or not shown else f"{r['accuracy']:.4f}"
            delta = "–" if r["accuracy_delta"] is None or not shown else f"{100 * r['accuracy_delta']:+.2f} pts"
            ratio = "–" if r.get("vs_ort_fp32") is None else f"{r['vs_ort_fp32']:.2f}×"
            out.append(f"| {r['format_label']} | {r['batch']} | {r['size_mb']} | {acc} | {delta} | "
                       f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['throughput_ips']:.1f} | {ratio} | "
                       f"{r['provider']} |")
        out += ["", *ratio_lines(rs), *parity_lines(rs), ""]
    out += ["![accuracy vs latency](export.png)", ""]
    return "\n".join(out)


def runtime_note(rs: list[dict]) -> str:
    """How the CPU runtimes ran, from the rows: threads, ONNX Runtime's spinning, OpenVINO's streams."""
    ort = next((r["runtime"] for r in rs if r.get("backend") == "onnxruntime" and r.get("runtime")), None)
    ov = next((r["runtime"] for r in rs if r.get("backend") == "openvino"), None)
    parts = []
    if ort:
        parts.append(f"ONNX Runtime {ort['onnxruntime']}: {ort['intra_op_threads']} intra-op threads, spinning "
                     f"{'on' if ort['spinning'] else 'off'}")
    if ov:
        parts.append(f"OpenVINO {ov['openvino']}: {ov['threads_per_stream']} threads, {ov['streams']} stream, "
                     "not pinned")
    return f" {'; '.join(parts)}." if parts else ""


def ratio_lines(rs: list[dict]) -> list[str]:
    """Throughput ratios at the largest batch, CPU rows: INT8/FP32 ORT, ORT FP32/PyTorch and the fastest
    CPU INT8 path."""
    cpu = [r for r in rs if r["provider"] in CPU_PROVIDERS]
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
    int8 = sorted((r for r in cpu if r["batch"] == b and str(r["precision"]).startswith("int8")
                   and r.get("vs_ort_fp32") is not None), key=lambda r: -r["throughput_ips"])
    if len(int8) > 1:
        others = ", ".join(f"{r['format_label']} {r['vs_ort_fp32']:.2f}×" for r in int8[1:])
        lines.append(f"- Fastest CPU INT8 path at batch {b}: **{int8[0]['format_label']}, "
                     f"{int8[0]['vs_ort_fp32']:.2f}× ONNX Runtime FP32** ({others})")
    return lines


def parity_lines(rs: list[dict]) -> list[str]:
    """OpenVINO against ONNX Runtime on the same file: one line per OpenVINO format."""
    seen = {r["format"]: r for r in rs if r.get("parity")}
    return [f"- {r['format_label']} vs {r['parity']['reference']} on {r['parity']['images']} "
            f"{r['parity']['inputs']} images: top-1 agreement {100 * r['parity']['top1_agreement']:.2f}%, "
            f"max |Δlogit| {r['parity']['max_abs_logit_diff']:.2g}" for r in seen.values()]


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
                                    cfg.formats, providers, cfg.parity_images, cfg.ort_spinning)
    except ArtifactError as e:
        raise UserError(str(e)) from e
    out = Path(cfg.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    measured = {r["run"] for r in rows}
    rows = [r for r in old if r.get("run") not in measured] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rows, out.with_suffix(".json"))
    sensitivity = write_sensitivity([read_manifest(Path(a) / "manifest.json") for a in cfg.artifacts], out)
    atomic_write(out.with_suffix(".md"), to_markdown(rows) + sensitivity)
    plot_pareto(rows, out.with_suffix(".png"), batch=max(cfg.batches))
    print(f"wrote {out}.json, {out}.md, {out}.png")
    return rows


def write_sensitivity(manifests: list[dict], out: Path) -> str:
    """The accuracy-bounded INT8 search of each measured export that ran one: its per-block table (returned
    as markdown for ``<out>.md``) and its plot, ``<out>-int8-<run>.png``."""
    md = []
    for m in manifests:
        if "blocks" not in (m.get("int8_search") or {}):
            continue
        png = out.parent / f"{out.name}-int8-{m['run']}.png"
        int8_search.plot_sensitivity(m, png)
        md += [f"## INT8 sensitivity: {m['run']}", "", int8_search.sensitivity_table(m),
               f"![per-block INT8 sensitivity]({png.name})", ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    return cli(BenchmarkConfig, run_benchmark, argv, "python -m export.benchmark", __doc__, positional=("artifacts",),
               section="benchmark")


if __name__ == "__main__":
    sys.exit(main())
