"""Load-test a (model × backend) matrix: ``python -m loadtest.run --models lite0=TAG@onnxruntime …``.

Each model is served on loopback (``bentoml serve`` in a subprocess; or ``--url`` targets a running
service), warmed up, then driven by headless Locust in MLPerf-style scenarios: single-stream (one user
back to back), server (a concurrency sweep, and a constant arrival rate with --rate) and offline
(images/s through /classify_batch). The service's /metrics is scraped around every step. Writes
reports/<timestamp>/ (report.md, results.json, plots) and a reports/latest link.

Exit codes: 0 passed; 1 the gate failed (failure ratio over --max-failure-ratio, or p95 over --slo-ms in
single-stream or constant-rate); 2 unusable options or the service/Locust could not run.
Service settings (max_latency_ms, intra_op_threads, …) go under `service:` in the --config YAML.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import LoadTestError
from loadtest.payloads import PayloadError, load_payloads
from loadtest.report import write_bench, write_report
from loadtest.scenarios import SCENARIOS, gate, plan, run_model
from loadtest.server import serve, wait_ready
from utils import ModelRef, config_parser, parse_config, run_cli


@dataclass
class LoadTestConfig:
    models: list[ModelRef] = field(default_factory=list, metadata={
        "help": "models to serve and test: name=bentoml_tag[@backend] (in YAML: {name, tag, backend})",
        "metavar": "NAME=TAG[@BACKEND]"})
    url: str | None = field(default=None, metadata={
        "help": "test a running service instead (any host)", "metavar": "URL"})
    model: list[str] = field(default_factory=list, metadata={
        "help": "with --url: the model names to test (default: the service's default)", "metavar": "NAME"})
    bento: str = field(default="service.service:CifarClassifier", metadata={
        "help": "what `bentoml serve` starts: the source service or a built bento tag"})
    service: dict = field(default_factory=dict, metadata={
        "help": "settings of the services started here (service/config.yaml keys but models); YAML/Python only"})
    payload_source: str = field(default="synthetic", metadata={
        "help": "request images: cifar:PATH (a CIFAR test batch), dir:PATH (photos) or synthetic[:SIZE]",
        "metavar": "SOURCE"})
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS), metadata={
        "help": f"scenarios to run: {', '.join(SCENARIOS)}", "choices": SCENARIOS, "metavar": "SCENARIO"})
    users: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32], metadata={
        "help": "concurrent users of the server sweep", "metavar": "N"})
    step_seconds: float = field(default=10, metadata={
        "help": "seconds per server, constant-rate or offline step", "metavar": "S"})
    single_seconds: float = field(default=10, metadata={
        "help": "seconds of the single-stream step", "metavar": "S"})
    warmup_seconds: float = field(default=3, metadata={
        "help": "seconds of warm-up per model (not reported)", "metavar": "S"})
    rate: float = field(default=0.0, metadata={
        "help": "constant-rate target in requests/s (0: skip that scenario)", "metavar": "RPS"})
    rate_users: int = field(default=8, metadata={
        "help": "users sharing the constant rate", "metavar": "N"})
    offline_batch: int = field(default=32, metadata={
        "help": "images per /classify_batch request (offline)", "metavar": "N"})
    offline_users: int = field(default=2, metadata={
        "help": "concurrent users of the offline step", "metavar": "N"})
    processes: int = field(default=0, metadata={
        "help": "Locust --processes: fork N load generators", "metavar": "N"})
    slo_ms: float | None = field(default=None, metadata={
        "help": "p95 limit for single-stream and constant-rate (the gate); the report ranks within it "
                "(100 ms when unset)", "metavar": "MS"})
    max_failure_ratio: float = field(default=0.01, metadata={
        "help": "most failed requests per step (the gate)", "metavar": "RATIO"})
    reports_dir: str = field(default="reports", metadata={
        "help": "where the timestamped report folders go", "metavar": "DIR"})
    bench_out: str | None = field(default=None, metadata={
        "help": "also merge the rows into PATH.json/.md/.png (benchmarks/loadtest)", "metavar": "PATH"})

    def __post_init__(self):
        self.models = [ModelRef.parse(m) for m in self.models]
        unknown = sorted(set(self.scenarios) - set(SCENARIOS))
        if unknown:
            raise LoadTestError(f"unknown scenarios {unknown}; valid: {', '.join(SCENARIOS)}")
        if not isinstance(self.service, dict) or "models" in self.service:
            raise LoadTestError("service: expected a mapping of service settings without models (the tested "
                                "models come from models)")


def run_loadtest(cfg: LoadTestConfig) -> tuple[list[dict], list[str], Path]:
    """Serve and test every model; write the report (and the bench files). Returns (rows, gate problems,
    report folder)."""
    if not cfg.models and not cfg.url:
        raise LoadTestError("nothing to test: give --models name=tag[@backend] … or --url URL [--model NAME]")
    try:
        load_payloads(cfg.payload_source, limit=1)
    except PayloadError as e:
        raise LoadTestError(str(e)) from e
    steps = plan(cfg.scenarios, cfg.users, cfg.single_seconds, cfg.step_seconds, cfg.rate, cfg.rate_users,
                 cfg.offline_users, cfg.offline_batch)
    outdir = Path(cfg.reports_dir) / time.strftime("%Y%m%d-%H%M%S")
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for ref in cfg.models:
        with tempfile.TemporaryDirectory() as work, serve([ref], Path(work), cfg.service, bento=cfg.bento) as url:
            rows += run_model(url, ref.name, steps, outdir, cfg.payload_source, cfg.warmup_seconds, cfg.processes)
    if cfg.url:
        url = cfg.url.rstrip("/")
        wait_ready(url, 60)
        for name in cfg.model or [None]:
            rows += run_model(url, name, steps, outdir, cfg.payload_source, cfg.warmup_seconds, cfg.processes)
    problems = gate(rows, cfg.slo_ms, cfg.max_failure_ratio)
    write_report(rows, outdir, problems, cfg.slo_ms, cfg.max_failure_ratio, cfg.payload_source)
    if cfg.bench_out:
        write_bench(rows, Path(cfg.bench_out), cfg.slo_ms or 100.0)
    return rows, problems, outdir


def build_parser() -> argparse.ArgumentParser:
    return config_parser(LoadTestConfig, "python -m loadtest.run", __doc__, skip=("service",))


def _main(argv: list[str] | None) -> int:
    cfg, _ = parse_config(LoadTestConfig, build_parser(), argv, section="loadtest")
    _, problems, outdir = run_loadtest(cfg)
    print(f"report: {outdir / 'report.md'}")
    for p in problems:
        print(f"GATE FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
