"""Service overhead benchmark: ``python benchmarks/service_bench.py --models NAME=ARTIFACT_DIR:FORMAT …``.

For each model, side by side in one run:
- in-process ONNX Runtime (same artifact, threads and batch size as the service): images/s at the
  service's ``max_batch_size``, and p50 of one image decoded, preprocessed and classified;
- the served model (``bentoml serve`` on loopback, models from the BentoML store): images/s with many
  concurrent Locust users, and p50 of sequential single requests (httpx).
Writes ``benchmarks/service.{json,md}``. The clients run on the same cores as the service.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.payloads import load_payloads
from loadtest.run import Target, run_locust, serve
from service.preprocessing import decode_image, fit_image
from service.runtime import open_artifact

HERE = Path(__file__).resolve().parent


def inprocess(artifact: Path, fmt: str, payloads: list[bytes], batch: int, seconds: float) -> dict:
    model, entry = open_artifact(artifact, fmt)
    pre = model.preprocessing
    images = np.stack([fit_image(decode_image(p), pre.image_size) for p in payloads[:batch]])
    x = pre.to_input(images)
    for _ in range(3):
        model(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x)
        n += 1
    ips = n * batch / (time.perf_counter() - t0)
    lat = []
    for p in payloads[:200]:
        t = time.perf_counter()
        model(pre.to_input(fit_image(decode_image(p), pre.image_size)[None]))
        lat.append(1e3 * (time.perf_counter() - t))
    return {"inprocess_ips": ips, "inprocess_p50_ms": statistics.median(lat), "precision": entry["precision"]}


def served(url: str, model: str, payloads: list[bytes], payload_source: str, clients: int, seconds: float,
           workdir: Path) -> dict:
    """p50 of sequential single requests (httpx, exact timing) and images/s under ``clients`` concurrent
    Locust users (FastHttpUser: a far lighter client than httpx on these shared cores)."""
    lat = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for p in payloads[:100]:
            t = time.perf_counter()
            client.post("/classify", content=p, params={"model": model, "top_k": 1}).raise_for_status()
            lat.append(1e3 * (time.perf_counter() - t))
    s = run_locust(url, model, clients, seconds, workdir / "served", payload_source, top_k=1)
    return {"served_ips": s["images_per_s"], "p50_ms": statistics.median(lat), "failures": s["failures"],
            "requests": s["requests"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="NAME=ARTIFACT_DIR:FORMAT (format: fp32, int8 …)")
    p.add_argument("--payload-source", default="cifar:" + str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--batch", type=int, default=32, help="service max_batch_size and in-process batch")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--out", default=str(HERE / "service"))
    args = p.parse_args(argv)
    payloads = load_payloads(args.payload_source, 256)
    rows = []
    for spec in args.models:
        name, _, rest = spec.partition("=")
        art, _, fmt = rest.rpartition(":")
        manifest = json.loads((Path(art) / "manifest.json").read_text())
        tag = manifest["artifacts"][fmt]["bentoml_tag"]
        ip = inprocess(Path(art), fmt, payloads, args.batch, args.seconds)
        options = {"max_batch_size": args.batch, "max_latency_ms": 1000, "runner_threads": 4, "api_threads": 8}
        with tempfile.TemporaryDirectory() as work, serve([Target(name, tag)], Path(work), options) as url:
            for _ in range(10):  # warm-up
                httpx.post(f"{url}/classify", content=payloads[0], params={"model": name}, timeout=60)
            sv = served(url, name, payloads, args.payload_source, args.clients, args.seconds, Path(work))
        row = {"model": name, "backend": "onnxruntime", "precision": ip["precision"], "artifact": f"{art}:{fmt}",
               "input_size": manifest["preprocessing"]["input_size"], "batch_setting": args.batch,
               "clients": args.clients, "served_ips": round(sv["served_ips"], 1),
               "inprocess_ips": round(ip["inprocess_ips"], 1),
               "ratio": round(sv["served_ips"] / ip["inprocess_ips"], 3),
               "p50_ms": round(sv["p50_ms"], 2), "inprocess_p50_ms": round(ip["inprocess_p50_ms"], 2),
               "overhead_p50_ms": round(sv["p50_ms"] - ip["inprocess_p50_ms"], 2), "failures": sv["failures"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Service benchmark", "", "Produced by `python benchmarks/service_bench.py`. Served throughput with "
             f"{args.clients} concurrent Locust users vs in-process ONNX Runtime at the same batch size "
             f"({args.batch}); single-request p50 (sequential requests) vs one in-process decode + preprocess + "
             "inference. Clients, the HTTP entry and the runner share this machine's cores.", "",
             "| model | precision | px | batch | clients | served img/s | in-process img/s | ratio | p50 ms | "
             "in-process p50 ms | overhead ms | failures |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['input_size']} | {r['batch_setting']} | {r['clients']} | "
                     f"{r['served_ips']} | {r['inprocess_ips']} | {r['ratio']} | {r['p50_ms']} | "
                     f"{r['inprocess_p50_ms']} | {r['overhead_p50_ms']} | {r['failures']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
