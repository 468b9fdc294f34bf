"""``make gpu-check`` (``python -m benchmarks.gpu_check [EXPORT_DIR …]``): the GPU path, checked on this
host's GPU in one command.

1. the GPU, its driver and the library versions;
2. one bf16 training step of every registered backbone on CUDA;
3. ONNX Runtime's CUDA provider against its CPU provider on the exported FP32, FP16 and INT8 models;
4. the TensorRT FP16 and INT8 engines, built and checked by the export, where ``tensorrt`` imports;
5. the GPU bento (``bentofile.gpu.yaml``) built, served and load-tested;
6. ``benchmarks/gpu-<gpu>.json`` and ``.md``: one row per model × format × GPU (img/s, p50/p99, accuracy Δ).

Without a CUDA GPU it says so in one line and exits 0. A failed check exits 1, after the report is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import ModelRef, UserError, atomic_write, atomic_write_json, cli, versions

ROOT = Path(__file__).resolve().parent.parent
MIN_AGREEMENT = 0.98  # top-1 agreement of ONNX Runtime CUDA with CPU on the same images
TIMED_FORMATS = ["fp32", "fp16", "int8", "int8_trt", "trt_fp16", "trt_int8"]


@dataclass
class GpuCheckConfig:
    """Options of ``python -m benchmarks.gpu_check`` (the CLI is generated from these fields)."""

    artifacts: list[str] = field(default_factory=list, metadata={
        "help": "export folders (with manifest.json) to check (default: every artifacts/*/)"})
    batch: int = field(default=32, metadata={"help": "batch of the throughput rows"})
    seconds: float = field(default=3.0, metadata={"help": "timed seconds per throughput row"})
    parity_images: int = field(default=256, metadata={"help": "images compared between CUDA and CPU"})
    loadtest_users: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "load-test concurrency"})
    loadtest_seconds: float = field(default=10.0, metadata={"help": "seconds per load-test step"})
    out_dir: str = field(default="benchmarks", metadata={"help": "where gpu-<gpu>.json/.md go"})


def no_gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU" + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
                                          if "CUDA_VISIBLE_DEVICES" in os.environ else "")
    return None


def environment() -> dict:
    import onnxruntime as ort
    import pynvml
    import torch

    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": pynvml.nvmlSystemGetDriverVersion(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "onnxruntime_providers": ort.get_available_providers(),
            **versions("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-bindings", "bentoml")}


def training_steps(batch: int = 16) -> list[dict]:
    """One bf16 autocast training step (forward, backward, SGD) of every registered backbone on CUDA."""
    import torch
    import torch.nn.functional as F

    from training.engine import autocast
    from training.models import get_model, list_models

    rows = []
    for name in list_models():
        try:
            model, _ = get_model(name, 10, weights="none")
            model = model.cuda().train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            x = torch.randn(batch, 3, 32, 32, device="cuda")
            y = torch.randint(0, 10, (batch,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with autocast(torch.device("cuda"), True):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.cuda.synchronize()
            rows.append({"model": name, "ok": bool(torch.isfinite(loss)), "loss": float(loss),
                         "seconds": round(time.perf_counter() - t0, 3),
                         "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)})
        except Exception as e:  # reported, not hidden: the row says what failed
            rows.append({"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"})
        status = "ok" if rows[-1]["ok"] else "FAILED " + rows[-1].get("error", "loss not finite")
        print(f"train step {name:20} {status}")
    return rows


def ort_parity(folder: Path, manifest: dict, x: np.ndarray) -> list[dict]:
    """ONNX Runtime CUDA vs CPU on every exported ONNX format: max |Δlogit| and top-1 agreement."""
    from service.runtime import open_artifact

    rows = []
    for fmt in ("fp32", "fp16", "int8", "int8_trt"):
        if "sha256" not in manifest["artifacts"].get(fmt, {}):
            continue
        row = {"model": manifest["backbone"], "run": manifest["run"], "format": fmt}
        try:
            cpu, _ = open_artifact(folder, fmt, ["cpu"])
            cuda, _ = open_artifact(folder, fmt, ["cuda"], require=True)
            a, b = cpu(x), cuda(x)
            agreement = float((a.argmax(1) == b.argmax(1)).mean())
            row.update(max_abs_logit_diff=float(np.abs(a - b).max()), top1_agreement=agreement,
                       ok=agreement >= MIN_AGREEMENT)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        print(f"ORT CUDA vs CPU {manifest['run']} {fmt:9} " + (f"agreement {row['top1_agreement']:.4f}, max |Δlogit| "
              f"{row['max_abs_logit_diff']:.2e}" if "error" not in row else f"FAILED {row['error']}"))
    return rows


def build_engines(folder: Path, manifest: dict) -> dict:
    """Re-run the export of ``folder`` with the TensorRT formats (everything else is up to date and skipped:
    its calibration settings are those recorded). Returns the new manifest."""
    from export.exporter import ExportConfig, run_export

    calib = manifest["artifacts"].get("int8", manifest["artifacts"].get("int8_trt", {})).get("calibration", {})
    have = [f for f, e in manifest["artifacts"].items() if "sha256" in e and not f.startswith("trt_")]
    cfg = ExportConfig(run_dir=manifest["source_run"], out=str(folder),
                       formats=list(dict.fromkeys([*have, "fp16", "int8_trt", "trt_fp16", "trt_int8"])),
                       opset=manifest["artifacts"]["fp32"].get("opset", 18),
                       calib_images=calib.get("images", 512), calib_method=calib.get("method", "minmax"),
                       keep_float=calib.get("keep_float_patterns") or ["none"])
    return run_export(cfg)


def load_test(manifests: list[dict], cfg: GpuCheckConfig) -> tuple[list[dict], list[str]]:
    """Build the GPU bento with each run's FP16 ONNX (ONNX Runtime CUDA) and TensorRT engines, serve it and
    load-test every model."""
    from loadtest import LoadTestError
    from loadtest.run import LoadTestConfig, run_loadtest

    models = []
    for m in manifests:
        for fmt, backend in (("fp16", "onnxruntime-cuda"), ("trt_fp16", "tensorrt"), ("trt_int8", "tensorrt")):
            tag = m["artifacts"].get(fmt, {}).get("bentoml_tag")
            if tag:
                models.append(ModelRef(f"{m['run']}-{fmt}", tag, backend))
    if not models:
        return [], ["no FP16 or TensorRT model in the BentoML store to load-test (export with --bentoml)"]
    env = {**os.environ, "CIFAR_DEPLOY_MODELS": ",".join(f"{r.name}={r.tag}@{r.backend}" for r in models),
           "BENTOML_DO_NOT_TRACK": "true"}
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentofile.gpu.yaml", "--output", "tag"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return [], [f"bentoml build -f bentofile.gpu.yaml failed: {(r.stdout + r.stderr)[-1000:]}"]
    bento = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    print(f"built the GPU bento {bento}; load-testing {', '.join(m.name for m in models)}")
    try:
        rows, problems, _ = run_loadtest(LoadTestConfig(
            models=models, bento=bento, scenarios=["single", "server", "offline"], users=cfg.loadtest_users,
            single_seconds=cfg.loadtest_seconds, step_seconds=cfg.loadtest_seconds, reports_dir="reports/gpu-check"))
    except LoadTestError as e:
        return [], [f"load test of the GPU bento: {e}"]
    return rows, problems


def to_markdown(report: dict) -> str:
    env = report["environment"]
    out = [f"# GPU check: {env['gpu']}", "", "Produced by `make gpu-check` (`benchmarks/gpu_check.py`) on "
           f"{report['created']}.", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in env.items()]
    out += ["", "## Throughput (one row per model × format on this GPU)", "",
            f"Batch {report['batch']}. Accuracy Δ is against PyTorch FP32 on the run's test images, measured at "
            "export: ONNX formats through ONNX Runtime's CPU provider (their CUDA parity is below), TensorRT "
            "engines through the engine on this GPU.", "",
            "| model | format | provider | img/s | p50 ms | p99 ms | accuracy Δ |", "|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        delta = "–" if r["accuracy_delta"] is None else f"{100 * r['accuracy_delta']:+.2f} pts"
        out.append(f"| {r['model']} | {r['format_label']} | {r['provider']} | {r['throughput_ips']:.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {delta} |")
    out += ["", "## ONNX Runtime CUDA vs CPU", "", "| run | format | top-1 agreement | max abs Δlogit |",
            "|---|---|---:|---:|"]
    out += [f"| {r['run']} | {r['format']} | " + (f"failed | {r['error']} |" if "error" in r else
                                                  f"{r['top1_agreement']:.4f} | {r['max_abs_logit_diff']:.2e} |")
            for r in report["parity"]]
    out += ["", "## TensorRT engines", ""]
    out += [f"- {run} {fmt}: " + (e["skipped"] if "skipped" in e else f"built (TensorRT {e['tensorrt_version']})")
            for run, engines in report["engines"].items() for fmt, e in engines.items()]
    out += ["", "## bf16 training step per backbone", "", "| backbone | ok | s | peak MiB |", "|---|---|---:|---:|"]
    out += [f"| {r['model']} | {'yes' if r['ok'] else 'NO: ' + r.get('error', 'loss not finite')} | "
            f"{r.get('seconds', '–')} | {r.get('peak_mib', '–')} |" for r in report["training"]]
    out += ["", "## GPU bento under load", "",
            "| model | backend | scenario | users | img/s | p50 ms | p99 ms | failures |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    out += [f"| {r['model']} | {r['backend']} | {r['scenario']} | {r['users']} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['failures']}/{r['requests']} |" for r in report["loadtest"]]
    out += ["", "## Problems", ""] + ([f"- {p}" for p in report["problems"]] or ["none"])
    return "\n".join(out) + "\n"


def run_gpu_check(cfg: GpuCheckConfig) -> int:
    reason = no_gpu_reason()
    if reason:
        print(f"gpu-check: no GPU here ({reason}); nothing was checked")
        return 0
    from export.benchmark import benchmark_model, sample_inputs
    from service import tensorrt_engine as trt_engine
    from service.runtime import read_manifest

    folders = [Path(a) for a in cfg.artifacts] or sorted(p.parent for p in Path("artifacts").glob("*/manifest.json"))
    if not folders:
        raise UserError("no export folders (artifacts/*/manifest.json): run `make demo` first, or pass them")
    env = environment()
    print(json.dumps(env, indent=2))
    problems = []
    if {"onnxruntime", "onnxruntime-gpu"} <= set(env):
        problems.append("onnxruntime and onnxruntime-gpu are both installed: the `onnxruntime` module is whichever "
                        "came last (use an environment with the gpu extra only)")
    report = {"environment": env, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "batch": cfg.batch, "training": training_steps(), "parity": [], "engines": {}, "rows": []}
    manifests = []
    for folder in folders:
        manifest = read_manifest(folder / "manifest.json")
        report["parity"] += ort_parity(folder, manifest, sample_inputs(manifest, cfg.parity_images))
        try:
            manifest = build_engines(folder, manifest)
        except Exception as e:  # reported with everything else
            problems.append(f"{folder}: the export with the TensorRT formats failed: {type(e).__name__}: {e}")
        report["engines"][manifest["run"]] = {f: manifest["artifacts"].get(f, {"skipped": "not built"})
                                              for f in ("trt_fp16", "trt_int8")}
        report["rows"] += benchmark_model(folder, [cfg.batch], 5, 20, cfg.seconds, os.cpu_count() or 1,
                                          TIMED_FORMATS, ["cuda"])
        manifests.append(manifest)
    report["loadtest"], load_problems = load_test(manifests, cfg)
    problems += load_problems
    problems += [f"train step {r['model']}: {r.get('error', 'loss not finite')}" for r in report["training"]
                 if not r["ok"]]
    problems += [f"ORT CUDA vs CPU {r['run']} {r['format']}: " + r.get("error", f"top-1 agreement "
                 f"{r.get('top1_agreement')} < {MIN_AGREEMENT}") for r in report["parity"] if not r["ok"]]
    if trt_engine.unavailable_reason() is None:  # where TensorRT works, every engine must build
        problems += [f"{run} {fmt}: {e['skipped']}" for run, engines in report["engines"].items()
                     for fmt, e in engines.items() if "skipped" in e]
    report["problems"] = problems
    stem = Path(cfg.out_dir) / ("gpu-" + re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-"))
    atomic_write_json(report, stem.with_suffix(".json"))
    atomic_write(stem.with_suffix(".md"), to_markdown(report))
    print(f"wrote {stem}.json and {stem}.md" + "".join(f"\nPROBLEM: {p}" for p in problems))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return cli(GpuCheckConfig, run_gpu_check, argv, "python -m benchmarks.gpu_check", __doc__,
               positional=("artifacts",), section="gpu_check")


if __name__ == "__main__":
    sys.exit(main())
