"""One headless Locust run, its statistics, the service's ``/metrics`` around it, and the GPU's load."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from loadtest import LoadTestError
from utils import gpu_name

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def run_locust(url: str, model: str, users: int, seconds: float, prefix: Path, payload: str,
               endpoint: str = "classify", batch_images: int = 32, rate: float = 0.0, processes: int = 0,
               top_k: int = 0) -> dict:
    """One headless Locust run (CSV files at ``prefix``); returns :func:`read_stats` of its requests plus
    the load generator's peak CPU (% of one core per process)."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
           "-r", str(max(users, 1)), "-t", f"{max(2, round(seconds))}s", "--csv", str(prefix), "--only-summary",
           "--model", model, "--endpoint", endpoint, "--payload-source", payload, "--batch-images",
           str(batch_images), "--rate", str(rate), "--top-k", str(top_k), "--loglevel", "WARNING",
           "--exit-code-on-error", "0", "--stop-timeout", "10"]
    if processes:
        cmd += ["--processes", str(processes)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    ps = psutil.Process(proc.pid)
    cpu_max = 0.0
    ps.cpu_percent(None)
    while proc.poll() is None:
        time.sleep(1.0)
        with contextlib.suppress(psutil.Error):
            total = ps.cpu_percent(None) + sum(c.cpu_percent(None) for c in ps.children(recursive=True))
            cpu_max = max(cpu_max, total / max(1, processes or 1))
    output = proc.stdout.read() if proc.stdout else ""
    stats = read_stats(prefix, endpoint, batch_images if endpoint == "classify_batch" else 1,
                       f"exit {proc.returncode}:\n{output[-3000:]}")
    return {**stats, "loadgen_cpu_max": round(cpu_max, 1)}


def read_stats(prefix: Path, endpoint: str, images_per_request: int, context: str = "") -> dict:
    """The ``/endpoint`` row of Locust's ``PREFIX_stats.csv`` (and the reasons in ``_failures.csv``).
    Throughput counts answered requests only: shed or failed ones (4xx/5xx) are not served images."""
    stats_file = Path(f"{prefix}_stats.csv")
    if not stats_file.exists():
        raise LoadTestError(f"Locust wrote no statistics ({context})")
    row = None
    with open(stats_file) as f:
        for r in csv.DictReader(f):
            if r["Name"] == f"/{endpoint}" or r["Name"].startswith(f"/{endpoint} "):  # "/classify [model]"
                row = r
    if row is None:
        raise LoadTestError(f"no /{endpoint} requests were made (see {stats_file}; {context})")
    n, fails = int(row["Request Count"]), int(row["Failure Count"])
    rps = float(row["Requests/s"])
    failures_file = Path(f"{prefix}_failures.csv")
    reasons = []
    if failures_file.exists():
        with open(failures_file) as f:
            reasons = [f"{r['Occurrences']}× {r['Error'][:200]}" for r in csv.DictReader(f)]
    ok_rps = rps * (n - fails) / n if n else 0.0
    return {"requests": n, "failures": fails, "failure_ratio": fails / n if n else 1.0, "rps": rps,
            "ok_rps": ok_rps, "images_per_s": ok_rps * images_per_request,
            **{f"p{p}_ms": _num(row.get(f"{p}%")) for p in (50, 90, 95, 99)},
            "mean_ms": _num(row.get("Average Response Time")), "failure_reasons": reasons}


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- server metrics

_SAMPLE = re.compile(r"^(\w+)\{(.*?)\} (\S+)$", re.M)


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """``{(metric, model, le-or-''): value}`` for the service's ``cifar_*`` histograms (empty if unreachable)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[tuple[str, str, str], float] = {}
    for name, labels, value in _SAMPLE.findall(text):
        if not name.startswith("cifar_"):
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (name, lab.get("model", ""), lab.get("le", ""))
        out[key] = out.get(key, 0.0) + float(value)
    return out


def metrics_delta(before: dict, after: dict, model: str) -> dict:
    """Inference calls, mean batch size and mean inference time of ``model`` between two scrapes."""
    def d(name: str) -> float:
        return after.get((name, model, ""), 0.0) - before.get((name, model, ""), 0.0)

    calls = d("cifar_batch_size_count")
    return {"server_calls": int(calls),
            "server_mean_batch": round(d("cifar_batch_size_sum") / calls, 2) if calls else None,
            "server_infer_ms_mean": round(1e3 * d("cifar_inference_seconds_sum") / calls, 2) if calls else None}


# --------------------------------------------------------------------------- GPU

class GpuSampler:
    """Samples GPU 0's utilisation every 0.5 s while in use (nothing where there is no GPU)."""

    def __init__(self):
        self.samples: list[int] = []
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            pass
        self._stop = threading.Event()

    def info(self) -> dict:
        """GPU name, memory and mean utilisation (empty without a GPU)."""
        if self.handle is None:
            return {}
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu": gpu_name(0), "gpu_memory_gb": round(mem.total / 2**30, 1),
                "gpu_util_mean": round(sum(self.samples) / len(self.samples), 1) if self.samples else None}

    def __enter__(self):
        if self.handle is not None:
            threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self):
        while not self._stop.wait(0.5):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()
