"""Data-parallel speed-up on the CPU: ``python benchmarks/distributed_bench.py --data-dir ../shared/data``.

Trains each workload below on the real CIFAR-10 subset as 1 process and as ``torchrun --nproc-per-node N``
(gloo) with the same global batch, so the same optimisation, and writes ``benchmarks/distributed.json`` and
``.md``. One process uses torch's default threads (one per core); torchrun gives each process one thread.
The machine may be shared, so each configuration runs ``--repeats`` times, interleaved, from scratch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.distributed import launch
from training.record import load_metrics
from training.train import TrainConfig
from utils import UserError, atomic_write, atomic_write_json, cli

HERE = Path(__file__).resolve().parent

WORKLOADS = {  # name: TrainConfig fields, batch_size being the global batch
    "scratch_cnn-full": dict(model="scratch_cnn", weights="none", strategy="full", epochs=3, batch_size=64,
                             lr=2e-3, scheduler="cosine", augment="crop,flip"),
    "lite0-frozen-96": dict(model="efficientnet_lite0", weights="imagenet", strategy="frozen", input_size=96,
                            epochs=5, batch_size=64, scheduler="cosine"),
    "lite0-full-64": dict(model="efficientnet_lite0", weights="imagenet", strategy="full", input_size=64,
                          epochs=1, batch_size=64, lr=5e-4, augment="crop,flip"),
}


@dataclass
class DistributedBenchConfig:
    data_dir: str = field(default=str(HERE.parent.parent / "shared" / "data"),
                          metadata={"help": "folder holding cifar-10-batches-py/"})
    runs_dir: str = field(default="runs/bench-distributed", metadata={"help": "scratch folder of the runs"})
    processes: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "process counts to compare"})
    repeats: int = field(default=3, metadata={"help": "runs of each configuration (the table shows the fastest "
                                                      "and the median)"})
    only: list[str] = field(default_factory=list, metadata={"help": "workloads to run (default: all)"})


def measure(cfg: DistributedBenchConfig, workload: str, nproc: int) -> dict:
    """One fresh run of ``workload`` on ``nproc`` processes: its metrics and the wall time of the job."""
    kw = dict(WORKLOADS[workload])
    name = f"{workload}-{nproc}p"
    shutil.rmtree(Path(cfg.runs_dir) / name, ignore_errors=True)
    train_cfg = TrainConfig(dataset="cifar10", data_dir=cfg.data_dir, download=False, runs_dir=cfg.runs_dir,
                            name=name, **{**kw, "batch_size": kw["batch_size"] // nproc})
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    launch(train_cfg, nproc)
    wall = time.perf_counter() - t0
    m = load_metrics(Path(cfg.runs_dir) / name)
    if m is None:
        raise UserError(f"{Path(cfg.runs_dir) / name}: the run finished without a metrics.json")
    return {"metrics": m, "wall_seconds": wall, "load_1min_before": load}


def summarise(workload: str, nproc: int, runs: list[dict]) -> dict:
    m = runs[0]["metrics"]
    train_s = [r["metrics"]["train_seconds"] for r in runs]
    return {
        "workload": workload, "model": m["model"], "strategy": m["strategy"], "input_size": m["input_size"],
        "feature_cache": m["feature_cache"], "epochs": m["epochs_run"], "processes": m["world_size"],
        "threads_per_process": torch.get_num_threads() if nproc == 1 else 1,
        "batch_per_process": m["batch_size_per_process"], "global_batch": m["global_batch_size"],
        "train_seconds": [round(t, 1) for t in train_s], "train_seconds_best": round(min(train_s), 1),
        "train_seconds_median": round(statistics.median(train_s), 1),
        "wall_seconds_best": round(min(r["wall_seconds"] for r in runs), 1),
        "test_accuracy": [round(r["metrics"]["test_accuracy"], 4) for r in runs],
        "load_1min_before": [round(r["load_1min_before"], 2) for r in runs],
        "device": m["device"], "num_train": m["num_train"],
    }


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each row with its speed-up over the 1-process row of its workload (fastest and median train time)."""
    base = {r["workload"]: r for r in rows if r["processes"] == 1}
    for r in rows:
        one = base.get(r["workload"])
        for k in ("best", "median"):
            r[f"speedup_{k}"] = round(one[f"train_seconds_{k}"] / r[f"train_seconds_{k}"], 2) if one else None
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["# Data-parallel training on the CPU (torchrun, gloo)", "",
             f"Real CIFAR-10 subset ({rows[0]['num_train']} training images), {rows[0]['device']}. Each workload "
             "runs as 1 process and as N torchrun processes with the same global batch (so the same optimisation): "
             "1 process with torch's default threads, N processes with one thread each. *train s* is the run's "
             "own clock (data loading excluded, feature extraction included), fastest and median of "
             f"{len(rows[0]['train_seconds'])} fresh runs, interleaved; *wall s* adds starting the processes. "
             "The machine is shared: *load* is the 1-minute load average before each run (the previous run's "
             "own processes included). Produced by `python benchmarks/distributed_bench.py`.", "",
             "| workload | processes × threads | batch each / global | epochs | train s (best) | train s (median) | "
             "speed-up (best) | speed-up (median) | wall s (best) | test acc | load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        acc = " ".join(dict.fromkeys(f"{a:.4f}" for a in r["test_accuracy"]))
        load = "–".join(f"{x:.1f}" for x in (min(r["load_1min_before"]), max(r["load_1min_before"])))
        lines.append(f"| {r['workload']} | {r['processes']} × {r['threads_per_process']} | "
                     f"{r['batch_per_process']} / {r['global_batch']} | {r['epochs']} | "
                     f"{r['train_seconds_best']:.1f} | {r['train_seconds_median']:.1f} | {r['speedup_best']:.2f}× | "
                     f"{r['speedup_median']:.2f}× | {r['wall_seconds_best']:.1f} | {acc} | {load} |")
    ups = [r["speedup_best"] for r in rows if r["processes"] > 1]
    lines += ["", f"N processes ran {min(ups):.2f}–{max(ups):.2f}× as fast as one (fastest runs). On a CPU, data "
              "parallelism adds no cores: it replaces the threads that share each operation with single-threaded "
              "processes that average their gradients, so it gains only where threading scales worse than "
              "processes do, and loses the all-reduce and the process start. Each process of a multi-GPU or "
              "multi-host job brings its own device; this machine cannot measure that. With BatchNorm layers "
              "that train (the full workloads), each process normalises its own batch and augments with its own "
              "seed, so the accuracy differs from the 1-process run; the frozen workload trains the same model."]
    return "\n".join(lines) + "\n"


def run(cfg: DistributedBenchConfig) -> None:
    rows = []
    for w in WORKLOADS:
        if cfg.only and w not in cfg.only:
            continue
        runs = {n: [] for n in cfg.processes}
        for _ in range(cfg.repeats):
            for n in cfg.processes:
                runs[n].append(measure(cfg, w, n))
        rows += [summarise(w, n, runs[n]) for n in cfg.processes]
    rows = with_speedups(rows)
    atomic_write_json(rows, HERE / "distributed.json")
    atomic_write(HERE / "distributed.md", to_markdown(rows))
    print(to_markdown(rows))


def main(argv: list[str] | None = None) -> int:
    return cli(DistributedBenchConfig, run, argv, "benchmarks/distributed_bench.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
