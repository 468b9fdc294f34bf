"""Service overhead benchmark: ``python benchmarks/service_bench.py --models NAME=ARTIFACT_DIR:FORMAT …``.

For each model and each session configuration (``--configs``: model instances × ONNX Runtime
threads each), side by side in one run:
- in-process ONNX Runtime with the same artifact and sessions as the service (as many threads as
  instances, each running its own session at the service's ``max_batch_size``): images/s, and p50 of
  one image decoded, preprocessed and classified; measured before and after the served runs;
- the served model (``bentoml serve`` on loopback, models from the BentoML store, batched in-process):
  p50 of sequential single requests (httpx), and images/s with many concurrent Locust users sending
  single images (``/classify``) and with a few users sending ``max_batch_size`` images per request
  (``/classify_batch``).
Writes ``benchmarks/service.{json,md}``. The clients run on the same cores as the service.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loadtest.locust_runner import run_locust
from loadtest.payloads import load_payloads
from loadtest.server import serve
from service.preprocessing import decode_image, fit_image
from service.runtime import load_ort_model, open_artifact
from utils import ModelRef, UserError, atomic_write, atomic_write_json, cli, cpu_name

HERE = Path(__file__).resolve().parent


def inprocess(artifact: Path, fmt: str, payloads: list[bytes], batch: int, seconds: float, spinning: bool,
              instances: int = 1, threads: int = 0) -> dict:
    """Images/s of ``instances`` sessions (``threads`` each; 0: all cores) run from as many threads at
    once on one batch, and p50 of one image decoded, preprocessed and classified by one session."""
    model, entry = open_artifact(artifact, fmt, threads=threads or None, spinning=spinning)  # sha256 checked once
    sessions = [model] + [load_ort_model(model.path, threads=threads or None, spinning=spinning)
                          for _ in range(instances - 1)]
    pre = model.preprocessing
    images = np.stack([fit_image(decode_image(p), pre.image_size) for p in payloads[:batch]])
    x = pre.to_input(images)
    for m in sessions:
        for _ in range(3):
            m(x)
    counts = [0] * instances
    t0 = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - t0 < seconds:
            sessions[i](x)
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ips = sum(counts) * batch / (time.perf_counter() - t0)
    lat = []
    for p in payloads[:200]:
        t = time.perf_counter()
        model(pre.to_input(fit_image(decode_image(p), pre.image_size)[None]))
        lat.append(1e3 * (time.perf_counter() - t))
    return {"inprocess_ips": ips, "inprocess_p50_ms": statistics.median(lat), "precision": entry["precision"]}


def served(url: str, model: str, payloads: list[bytes], payload_source: str, workdir: Path,
           loads: list[tuple[int, int]], seconds: float) -> tuple[float, list[dict]]:
    """p50 of sequential single requests (httpx, exact timing), then images/s for each (clients, images
    per request) load under Locust (FastHttpUser: a far lighter client than httpx on these shared cores)."""
    lat = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for p in payloads[:100]:
            t = time.perf_counter()
            client.post("/classify", files={"image": ("x.png", p, "image/png")},
                        data={"model": model, "top_k": "1"}).raise_for_status()
            lat.append(1e3 * (time.perf_counter() - t))
    out = []
    for clients, per_request in loads:
        endpoint = "classify" if per_request == 1 else "classify_batch"
        s = run_locust(url, model, clients, seconds, workdir / f"served-{clients}x{per_request}", payload_source,
                       endpoint=endpoint, batch_images=per_request, top_k=1)
        out.append({"clients": clients, "images_per_request": per_request, "served_ips": s["images_per_s"],
                    "failures": s["failures"], "failure_reasons": s["failure_reasons"], "requests": s["requests"],
                    "served_p95_ms": s["p95_ms"]})
    return statistics.median(lat), out


@dataclass
class ServiceBenchConfig:
    """Options of ``python benchmarks/service_bench.py`` (the CLI is generated from these fields)."""

    models: list[str] = field(default_factory=list, metadata={"help": "NAME=ARTIFACT_DIR:FORMAT (format: fp32, "
                                                                      "int8 …)"})
    payload_source: str = "cifar:" + str(HERE.parent.parent / "shared" / "data")
    batch: int = field(default=32, metadata={"help": "service max_batch_size, in-process batch and images per "
                                                     "/classify_batch request"})
    configs: list[str] = field(default_factory=lambda: ["1x0", f"{os.cpu_count()}x1"], metadata={
        "help": "session configurations INSTANCESxTHREADS (model_instances × intra_op_threads; 0 threads: all "
                "cores); default: one session on all cores, and one single-threaded session per core"})
    clients: int = field(default=32, metadata={"help": "concurrent users sending single images"})
    batch_clients: int = field(default=4, metadata={"help": "concurrent users sending batches"})
    seconds: float = 20
    repeats: int = field(default=1, metadata={"help": "served runs per config, each between two in-process runs; "
                                                      "the table shows medians (this shared machine's speed drifts)"})
    ort_spinning: bool = field(default=False, metadata={"help": "ONNX Runtime busy-waiting threads (service and "
                                                                "in-process alike; off as in the service's default)"})
    out: str = str(HERE / "service")


def _sessions(configs: list[str]) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in c.lower().split("x")) for c in configs]
        if any(len(c) != 2 or c[0] < 1 or c[1] < 0 for c in out):
            raise ValueError
    except ValueError:
        raise UserError(f"--configs takes INSTANCESxTHREADS such as 1x0 or 2x1, got {configs}") from None
    return out


def run(args: ServiceBenchConfig) -> None:
    if not args.models:
        raise UserError("give --models NAME=ARTIFACT_DIR:FORMAT …")
    configs = _sessions(args.configs)
    payloads = load_payloads(args.payload_source, 256)
    loads = [(args.clients, 1), (args.batch_clients, args.batch)]
    rows = []
    for spec in args.models:
        name, _, rest = spec.partition("=")
        art, _, fmt = rest.rpartition(":")
        manifest = json.loads((Path(art) / "manifest.json").read_text())
        tag = manifest["artifacts"][fmt]["bentoml_tag"]
        for instances, threads in configs:
            local = functools.partial(inprocess, Path(art), fmt, payloads, args.batch, args.seconds,
                                      args.ort_spinning, instances, threads)
            ips = [local()]
            reps: list[dict] = []
            loaded_by_run = []
            for _ in range(args.repeats):
                options = {"max_batch_size": args.batch, "max_latency_ms": 10000, "ort_spinning": args.ort_spinning,
                           "model_instances": instances, "intra_op_threads": threads}
                with tempfile.TemporaryDirectory() as work, \
                        serve([ModelRef(name, tag)], Path(work), options) as url:
                    for _ in range(10):  # warm-up
                        httpx.post(f"{url}/classify", files={"image": ("x.png", payloads[0], "image/png")},
                                   data={"model": name}, timeout=60)
                    p50, loaded = served(url, name, payloads, args.payload_source, Path(work), loads, args.seconds)
                ips.append(local())
                # each served run against the mean of the in-process runs just before and after it
                ref = {k: (ips[-2][k] + ips[-1][k]) / 2 for k in ("inprocess_ips", "inprocess_p50_ms")}
                loaded_by_run.append([{**sv, "p50_ms": p50, **ref, "ratio": sv["served_ips"] / ref["inprocess_ips"],
                                       "overhead_p50_ms": p50 - ref["inprocess_p50_ms"]} for sv in loaded])
            for i in range(len(loads)):
                reps = [run_rows[i] for run_rows in loaded_by_run]

                def med(key: str, reps=reps) -> float:
                    return statistics.median(r[key] for r in reps)

                row = {"model": name, "backend": "onnxruntime", "precision": ips[0]["precision"],
                       "artifact": f"{art}:{fmt}", "input_size": manifest["preprocessing"]["input_size"],
                       "instances": instances, "threads": threads,
                       "batch_setting": args.batch, **reps[-1], "repeats": len(reps),
                       "failures": sum(r["failures"] for r in reps),
                       **{k: round(med(k), 3 if k == "ratio" else 1 if k.endswith("ips") else 2)
                          for k in ("served_ips", "inprocess_ips", "ratio", "p50_ms", "inprocess_p50_ms",
                                    "overhead_p50_ms")},
                       "ratios": [round(r["ratio"], 3) for r in reps],
                       "inprocess_ips_runs": [round(r["inprocess_ips"], 1) for r in ips],
                       "ort_spinning": args.ort_spinning}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows, Path(args.out), args)


def write(rows: list[dict], out: Path, args: ServiceBenchConfig) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rows, out.with_suffix(".json"))
    lines = ["# Service benchmark", "", "Produced by `python benchmarks/service_bench.py`. Served images/s under "
             "concurrent Locust users vs in-process ONNX Runtime at the same batch size "
             f"({args.batch}); single-request p50 (sequential requests) vs one in-process decode + preprocess + "
             "inference. Clients, the HTTP entry and the model share this machine's cores; the service batches "
             "in-process. Sessions: model instances × ONNX Runtime threads each (all: every core), the same "
             f"in-process and served. Medians of {args.repeats} served run(s) per row, each against the in-process "
             "runs just before and after it. `max_latency_ms` 10000: nothing is shed, so throughput counts every "
             f"image; failed requests never count. CPU: {cpu_name()}.",
             "", "| model | precision | px | sessions | batch | clients × images/request | served img/s | "
             "in-process img/s | ratio | p50 ms | in-process p50 ms | overhead ms | failures |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sessions = f"{r['instances']} × {r['threads'] or 'all'}"
        lines.append(f"| {r['model']} | {r['precision']} | {r['input_size']} | {sessions} | "
                     f"{r['batch_setting']} | {r['clients']} × {r['images_per_request']} | {r['served_ips']} | "
                     f"{r['inprocess_ips']} | {r['ratio']} | {r['p50_ms']} | {r['inprocess_p50_ms']} | "
                     f"{r['overhead_p50_ms']} | {r['failures']} |")
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    return cli(ServiceBenchConfig, run, argv, "benchmarks/service_bench.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
