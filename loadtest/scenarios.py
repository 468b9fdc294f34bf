"""The scenario matrix (MLPerf-style), run against one served model, and the deployment gate.

- single-stream: one user back to back (p50/p90/p99 latency);
- server: a concurrency sweep, plus constant-rate: a fixed arrival rate shared by several users;
- offline: images/s through ``/classify_batch``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest import LoadTestError
from loadtest.locust_runner import GpuSampler, metrics_delta, run_locust, scrape

SCENARIOS = ("single", "server", "rate", "offline")
GATED = ("single-stream", "constant-rate")  # the scenarios whose p95 must meet the SLO


@dataclass(frozen=True)
class Step:
    scenario: str  # the row's label: single-stream, server, constant-rate or offline
    users: int
    seconds: float
    endpoint: str = "classify"
    batch_images: int = 32
    rate: float = 0.0  # requests/s per user; 0: back to back


def plan(scenarios: list[str], users: list[int], single_seconds: float, step_seconds: float, rate: float,
         rate_users: int, offline_users: int, offline_batch: int) -> list[Step]:
    """The Locust steps for the chosen ``scenarios`` (constant-rate only when ``rate`` > 0)."""
    steps = []
    if "single" in scenarios:
        steps.append(Step("single-stream", 1, single_seconds))
    if "server" in scenarios:
        steps += [Step("server", u, step_seconds) for u in users]
    if "rate" in scenarios and rate > 0:
        steps.append(Step("constant-rate", rate_users, step_seconds, rate=rate / rate_users))
    if "offline" in scenarios:
        steps.append(Step("offline", offline_users, step_seconds, "classify_batch", offline_batch))
    return steps


def run_model(url: str, name: str | None, steps: list[Step], outdir: Path, payload: str, warmup_seconds: float,
              processes: int = 0) -> list[dict]:
    """Warm ``name`` (None: the service's default) up, then run ``steps``: one result row per step."""
    try:
        info = httpx.get(f"{url}/models", timeout=30).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as e:
        raise LoadTestError(f"cannot list the models of {url}: {e}") from e
    served = {m["name"]: m for m in info["models"]}
    name = name or info["default"]
    if name not in served:
        raise LoadTestError(f"{url} does not serve {name!r} (it serves {sorted(served)})")
    m = served[name]
    base = {"model": name, "backend": m["backend"], "provider": m["provider"], "precision": m["precision"],
            "input_size": m["input_size"], "accuracy": m.get("accuracy")}
    print(f"== {name} [{m['backend']} {m['precision']} on {m['provider']}] {url}", flush=True)
    run_locust(url, name, 1, warmup_seconds, outdir / f"{name}-warmup", payload)
    rows = []
    for i, step in enumerate(steps):
        before = scrape(url)
        with GpuSampler() as gpu:
            prefix = outdir / f"{name}-{m['backend']}-{i:02d}-{step.scenario}"
            s = run_locust(url, name, step.users, step.seconds, prefix, payload, endpoint=step.endpoint,
                           batch_images=step.batch_images, rate=step.rate, processes=processes)
        row = {**base, "scenario": step.scenario, "users": step.users, **s,
               **metrics_delta(before, scrape(url), name), "device": m.get("device", "unknown"), **gpu.info()}
        if row["loadgen_cpu_max"] > 90:
            print(f"WARNING: the load generator used {row['loadgen_cpu_max']:.0f}% CPU: it may be the bottleneck; "
                  "use --processes N (or Locust's distributed mode) to drive more load", file=sys.stderr)
        rows.append(row)
        print(f"   {step.scenario:13} users={step.users:<3} {row['images_per_s']:8.1f} img/s  p50 {row['p50_ms']} "
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
        if slo_ms and r["scenario"] in GATED and (r["p95_ms"] or 0) > slo_ms:
            problems.append(f"{r['model']} {r['scenario']}: p95 {r['p95_ms']} ms > SLO {slo_ms} ms")
    return problems


def best_within_slo(rows: list[dict], slo_ms: float, by_request_kind: bool = False) -> list[dict]:
    """Per model/backend/precision (and, with ``by_request_kind``, single images apart from batches): the
    highest image rate whose p95 is within the SLO and failures ≤ 1%, best first."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["scenario"] not in ("server", "single-stream", "offline") or not r["requests"] \
                or r["failures"] > 0.01 * r["requests"]:
            continue
        if r["p95_ms"] is None or r["p95_ms"] > slo_ms:
            continue
        k = (r["model"], r["backend"], r["precision"]) + ((r["scenario"] == "offline",) if by_request_kind else ())
        if k not in best or r["images_per_s"] > best[k]["images_per_s"]:
            best[k] = r
    return sorted(best.values(), key=lambda r: -r["images_per_s"])
