"""Load-test a (model × backend) matrix: ``python -m loadtest.run --models lite0=TAG@onnxruntime …``.

For each entry the service is started on loopback (``bentoml serve`` in a subprocess; or ``--url``
targets a running one), waited for on ``/readyz``, warmed up, then driven by Locust (headless) in
MLPerf-style scenarios:
- single-stream: one user back to back (p50/p90/p99 latency);
- server: a concurrency sweep, plus a constant-arrival-rate run at ``--rate`` requests/s;
- offline: images/s through ``/classify_batch``.
The server's ``/metrics`` (batch sizes, inference time: Locust rounds response times) is scraped
around every step. Writes ``reports/<timestamp>/`` (report.md, results.json, plots) and a
``reports/latest`` link. Exits 1 when the failure ratio exceeds ``--max-failure-ratio`` or, in the
single-stream and constant-rate runs, p95 exceeds ``--slo-ms``: it can gate a deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
BIN = Path(sys.executable).parent


class LoadTestError(RuntimeError):
    """The service or Locust could not be run; the message says what happened."""


@dataclass(frozen=True)
class Target:
    name: str
    tag: str  # "" when --url targets a running service
    backend: str = "onnxruntime"


def parse_targets(items: list[str]) -> list[Target]:
    out = []
    for item in items:
        name, _, rest = item.partition("=")
        tag, _, backend = rest.partition("@")
        if not name or not tag:
            raise LoadTestError(f"--models entries look like name=tag[@backend], got {item!r}")
        out.append(Target(name, tag, backend or "onnxruntime"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise LoadTestError(f"the service exited with code {proc.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LoadTestError(f"{url} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def serve(targets: list[Target], workdir: Path, service_options: dict, timeout: float = 180,
          bento: str = "service.service:CifarClassifier"):
    """Start the service (source, or a built bento tag) for these models on a loopback port; yield its
    URL; stop it afterwards."""
    cfg = {"models": [{"name": t.name, "tag": t.tag, "backend": t.backend} for t in targets], **service_options}
    stem = f"service-{targets[0].name}-{targets[0].backend}"
    cfg_path = workdir / f"{stem}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = workdir / f"{stem}.log"
    env = {**os.environ, "CIFAR_DEPLOY_CONFIG": str(cfg_path), "BENTOML_DO_NOT_TRACK": "true"}
    with open(log, "w") as logf:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", bento, "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout, proc, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------- server metrics

_SAMPLE = re.compile(r'^(\w+)\{(.*?)\} (\S+)$', re.M)


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """``{(metric, model, le-or-''), value}`` for the service's cifar_* histograms."""
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
    def d(name: str) -> float:
        return after.get((name, model, ""), 0.0) - before.get((name, model, ""), 0.0)

    calls = d("cifar_batch_size_count")
    return {"server_calls": int(calls),
            "server_mean_batch": round(d("cifar_batch_size_sum") / calls, 2) if calls else None,
            "server_infer_ms_mean": round(1e3 * d("cifar_inference_seconds_sum") / calls, 2) if calls else None}


# --------------------------------------------------------------------------- devices

class GpuSampler:
    """GPU name, memory and mean utilisation through nvidia-ml-py, when a GPU is present."""

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
        if self.handle is None:
            return {}
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        name = self.nvml.nvmlDeviceGetName(self.handle)
        return {"gpu": name.decode() if isinstance(name, bytes) else name, "gpu_memory_gb": round(mem.total / 2**30, 1),
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


# --------------------------------------------------------------------------- locust

def run_locust(url: str, model: str, users: int, seconds: float, prefix: Path, payload: str,
               endpoint: str = "classify", batch_images: int = 32, rate: float = 0.0, processes: int = 0,
               top_k: int = 0) -> dict:
    """One headless Locust run; returns the aggregated stats of the classify requests."""
    cmd = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", url, "-u", str(users),
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


# --------------------------------------------------------------------------- the matrix

def run_target(target: Target, url: str, args, outdir: Path) -> list[dict]:
    info = httpx.get(f"{url}/models", timeout=30).json()
    served = {m["name"]: m for m in info["models"]}
    if target.name not in served:
        raise LoadTestError(f"{url} does not serve {target.name!r} (it serves {sorted(served)})")
    m = served[target.name]
    base = {"model": target.name, "backend": m["backend"], "provider": m["provider"], "precision": m["precision"],
            "input_size": m["input_size"], "accuracy": m.get("accuracy")}
    steps: list[tuple[str, dict]] = []
    if "single" in args.scenarios:
        steps.append(("single-stream", {"users": 1, "seconds": args.single_seconds}))
    if "server" in args.scenarios:
        steps += [("server", {"users": u, "seconds": args.step_seconds}) for u in args.users]
    if "rate" in args.scenarios and args.rate > 0:
        steps.append(("constant-rate", {"users": args.rate_users, "seconds": args.step_seconds,
                                        "rate": args.rate / args.rate_users}))
    if "offline" in args.scenarios:
        steps.append(("offline", {"users": args.offline_users, "seconds": args.step_seconds,
                                  "endpoint": "classify_batch", "batch_images": args.offline_batch}))
    print(f"== {target.name} [{m['backend']} {m['precision']} on {m['provider']}] {url}", flush=True)
    run_locust(url, target.name, 1, args.warmup_seconds, outdir / f"{target.name}-warmup", args.payload_source)
    rows = []
    for i, (scenario, kw) in enumerate(steps):
        before = scrape(url)
        with GpuSampler() as gpu:
            s = run_locust(url, target.name, kw["users"], kw["seconds"],
                           outdir / f"{target.name}-{m['backend']}-{i:02d}-{scenario}", args.payload_source,
                           endpoint=kw.get("endpoint", "classify"), batch_images=kw.get("batch_images", 32),
                           rate=kw.get("rate", 0.0), processes=args.processes)
        row = {**base, "scenario": scenario, "users": kw["users"], **s, **metrics_delta(before, scrape(url),
                                                                                         target.name),
               "device": m.get("device", "unknown"), **gpu.info()}
        if row["loadgen_cpu_max"] > 90:
            print(f"WARNING: the load generator used {row['loadgen_cpu_max']:.0f}% CPU: it may be the bottleneck; "
                  "use --processes N (or Locust's distributed mode) to drive more load", file=sys.stderr)
        rows.append(row)
        print(f"   {scenario:13} users={kw['users']:<3} {row['images_per_s']:8.1f} img/s  p50 {row['p50_ms']} "
              f"p95 {row['p95_ms']} p99 {row['p99_ms']} ms  failures {row['failures']}/{row['requests']}  "
              f"batch≈{row['server_mean_batch']}", flush=True)
    return rows


def gate(rows: list[dict], slo_ms: float | None, max_failure_ratio: float) -> list[str]:
    """Why this run must fail a deployment gate (empty when it passes)."""
    problems = []
    for r in rows:
        if r["failure_ratio"] > max_failure_ratio:
            problems.append(f"{r['model']} {r['scenario']} users={r['users']}: failure ratio "
                            f"{r['failure_ratio']:.2%} > {max_failure_ratio:.2%}")
        if slo_ms and r["scenario"] in ("single-stream", "constant-rate") and (r["p95_ms"] or 0) > slo_ms:
            problems.append(f"{r['model']} {r['scenario']}: p95 {r['p95_ms']} ms > SLO {slo_ms} ms")
    return problems


def best_within_slo(rows: list[dict], slo_ms: float) -> list[dict]:
    """Per model/backend: the highest image rate whose p95 is within the SLO and failures ≤ 1%."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["scenario"] not in ("server", "single-stream", "offline") or r["failure_ratio"] > 0.01:
            continue
        if r["p95_ms"] is None or r["p95_ms"] > slo_ms:
            continue
        k = (r["model"], r["backend"], r["precision"])
        if k not in best or r["images_per_s"] > best[k]["images_per_s"]:
            best[k] = r
    return sorted(best.values(), key=lambda r: -r["images_per_s"])


def write_report(rows: list[dict], outdir: Path, args, problems: list[str]) -> None:
    from loadtest.report import plots, to_markdown

    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "slo_ms": args.slo_ms,
            "max_failure_ratio": args.max_failure_ratio, "payload_source": args.payload_source,
            "device": rows[0]["device"] if rows else "unknown", "versions": versions(), "gate_problems": problems}
    (outdir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plots(rows, outdir)
    (outdir / "report.md").write_text(to_markdown(rows, meta, best_within_slo(rows, args.slo_ms or 100.0)))
    latest = outdir.parent / "latest"
    tmp = outdir.parent / ".latest.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(outdir.name)
    os.replace(tmp, latest)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("locust", "bentoml", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=[], help="name=bentoml_tag[@backend] entries to serve and test")
    p.add_argument("--config", help="YAML with any of these options (models: list of name=tag@backend)")
    p.add_argument("--url", help="test a running service instead (loopback or your own host)")
    p.add_argument("--bento", default="service.service:CifarClassifier",
                   help="what `bentoml serve` starts: the source service (default) or a built bento tag")
    p.add_argument("--model", action="append", default=[], help="with --url: model name(s) to test")
    p.add_argument("--payload-source", default="synthetic", help="cifar:PATH, dir:PATH or synthetic[:SIZE]")
    p.add_argument("--scenarios", nargs="+", default=["single", "server", "rate", "offline"],
                   choices=["single", "server", "rate", "offline"])
    p.add_argument("--users", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32], help="server-scenario sweep")
    p.add_argument("--step-seconds", type=float, default=10)
    p.add_argument("--single-seconds", type=float, default=10)
    p.add_argument("--warmup-seconds", type=float, default=3)
    p.add_argument("--rate", type=float, default=0.0, help="constant-arrival target in requests/s (0: skip)")
    p.add_argument("--rate-users", type=int, default=8)
    p.add_argument("--offline-batch", type=int, default=32)
    p.add_argument("--offline-users", type=int, default=2)
    p.add_argument("--processes", type=int, default=0, help="Locust --processes (fork N load generators)")
    p.add_argument("--slo-ms", type=float, default=None, help="p95 limit for single-stream and constant-rate")
    p.add_argument("--max-failure-ratio", type=float, default=0.01)
    p.add_argument("--service-option", nargs="*", default=[], metavar="KEY=VALUE",
                   help="service config overrides, e.g. max_latency_ms=20 intra_op_threads=1")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--bench-out", default=None, help="also write <path>.json/.md rows for benchmarks/")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        args = parser.parse_args(argv)
    try:
        targets = parse_targets(args.models)
        if args.url:
            targets += [Target(name, "") for name in args.model] or [Target("", "")]
        if not targets:
            raise LoadTestError("nothing to test: give --models name=tag[@backend] … or --url URL --model NAME")
        options = {}
        for kv in args.service_option:
            k, _, v = kv.partition("=")
            options[k] = yaml.safe_load(v)
        outdir = Path(args.reports_dir) / time.strftime("%Y%m%d-%H%M%S")
        outdir.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        for t in targets:
            if t.tag:
                with tempfile.TemporaryDirectory() as work, serve([t], Path(work), options, bento=args.bento) as url:
                    rows += run_target(t, url, args, outdir)
            else:
                url = args.url.rstrip("/")
                wait_ready(url, 60)
                name = t.name or httpx.get(f"{url}/models", timeout=30).json()["default"]
                rows += run_target(Target(name, ""), url, args, outdir)
    except LoadTestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = gate(rows, args.slo_ms, args.max_failure_ratio)
    write_report(rows, outdir, args, problems)
    if args.bench_out:
        from loadtest.report import write_bench

        write_bench(rows, Path(args.bench_out), args.slo_ms or 100.0)
    print(f"report: {outdir / 'report.md'}")
    for p in problems:
        print(f"GATE FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
