"""Data-parallel training under torchrun, on 2 CPU processes (gloo) and the synthetic set."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from benchmarks.study import load_study
from training.data import EpochBatches
from training.distributed import launch
from training.train import TrainConfig, train
from utils import UserError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("n,batch_size,world", [(450, 25, 2), (451, 32, 2), (100, 7, 3), (10, 4, 2)])
def test_ranks_split_the_global_batches_of_one_process(n, batch_size, world):
    ranks = [EpochBatches(n, batch_size, seed=3, rank=r, world_size=world) for r in range(world)]
    one = EpochBatches(n, batch_size * world, seed=3)
    for sampler in [*ranks, one]:
        sampler.set_epoch(2)
    steps = list(zip(*ranks, strict=True))
    assert len(steps) == len(ranks[0]) >= 1
    for step, single in zip(steps, one, strict=False):
        assert all(len(b) == len(step[0]) >= 2 for b in step)  # equal shares: averaged gradients stay exact
        merged = [i for b in step for i in b]
        assert len(set(merged)) == len(merged) and set(merged) <= set(single)
        assert len(single) - len(merged) < world  # a trailing batch loses at most world - 1 images
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != [step[0] for step in steps]  # a new order each epoch


def test_a_study_experiment_sets_its_process_count(tmp_path):
    exp = {"name": "a", "model": "scratch_cnn", "weights": "none", "strategy": "full"}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "experiments": [{**exp, "nproc_per_node": 2}, {**exp, "name": "b"}]}))
    assert [e.nproc_per_node for e in load_study(path).experiments] == [2, 1]
    path.write_text(yaml.safe_dump({"name": "t", "experiments": [{**exp, "nproc_per_node": 0}]}))
    with pytest.raises(UserError, match="nproc_per_node must be a positive integer"):
        load_study(path)


# --------------------------------------------------------------------------- torchrun jobs

def _cfg(runs_dir: Path, synthetic_dir: Path, **kw) -> TrainConfig:
    """ImageNet Lite0 at 32 px, frozen, linear head, no augmentation: nothing random after the initialisation,
    no dropout. Without the feature cache each epoch runs the backbone: time to kill a rank mid-run."""
    base = TrainConfig(model="efficientnet_lite0", input_size=32, strategy="frozen", head="linear", augment="none",
                       cache_features="off", dataset="cifar10", data_dir=str(synthetic_dir), download=False,
                       epochs=4, batch_size=25, lr=1e-2, runs_dir=str(runs_dir), name="ddp", threads=1)
    return replace(base, **kw)


def _args(cfg: TrainConfig) -> list[str]:
    """``cfg`` as ``training.train`` options."""
    out = []
    for k, v in asdict(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else flag.replace("--", "--no-"))
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        elif v is not None:
            out += [flag, str(v)]
    return out


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)


def _assert_same_training(a: Path, b: Path) -> None:
    """Runs ``a`` and ``b`` have the same history and final weights, to float rounding."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for x, y in zip(ma["history"], mb["history"], strict=True):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), key
    assert ma["test_accuracy"] == mb["test_accuracy"]
    wa, wb = _last(a)["model"], _last(b)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, synthetic_dir) -> TrainConfig:
    cfg = _cfg(tmp_path_factory.mktemp("ddp") / "runs", synthetic_dir)
    launch(cfg, 2)
    return cfg


@pytest.mark.heavy
def test_two_processes_at_batch_b_match_one_at_2b(two_process_run, tmp_path, synthetic_dir):
    runs = Path(two_process_run.runs_dir)
    assert os.listdir(runs) == ["ddp"]  # one run folder, written by rank 0 alone
    files = set(os.listdir(runs / "ddp"))
    assert {"best.pt", "last.pt", "metrics.json", "model.json", "curves.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    m = json.loads((runs / "ddp" / "metrics.json").read_text())
    assert (m["world_size"], m["batch_size_per_process"], m["global_batch_size"]) == (2, 25, 50)
    one = train(_cfg(tmp_path, synthetic_dir, batch_size=50, threads=2, name="one"))
    assert (one["world_size"], one["global_batch_size"]) == (1, 50)
    _assert_same_training(tmp_path / "one", runs / "ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """``torchrun argv`` in its own process group, its output in ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([*TORCHRUN, *argv], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(job: subprocess.Popen) -> None:
    """Kill ``job`` and its workers if it still runs (a failed assertion must not leave them behind)."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


@pytest.mark.heavy
def test_a_dead_rank_fails_the_job_and_the_run_resumes_on_two_nodes(two_process_run, tmp_path):
    cfg = replace(two_process_run, name="killed")
    run = Path(cfg.runs_dir) / "killed"
    job = _start(["--standalone", "--nproc-per-node=2", "-m", "training.train", *_args(cfg)], tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 60
        while not (run / "last.pt").exists():  # epoch 1 is saved: kill rank 1 during epoch 2
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        workers = psutil.Process(job.pid).children(recursive=True)
        next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        _stop(job)
    report = (tmp_path / "killed.log").read_text()
    assert job.returncode != 0 and "Signal 9 (SIGKILL)" in report and "rank      : 1" in report, report
    assert not (run / "metrics.json").exists()
    assert _last(run)["epoch"] < cfg.epochs

    # --resume, as two single-process nodes meeting through torchrun's c10d rendezvous
    node = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            "--rdzv-id=resume", "-m", "training.train", *_args(replace(cfg, resume=True))]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [_start(node, log) for log in logs]
    try:
        for p in nodes:
            p.wait(timeout=120)
    finally:
        for p in nodes:
            _stop(p)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert sum("resuming" in out for out in outputs) == 1  # rank 0 reports; rank 1 prints nothing on stdout
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    _assert_same_training(run, Path(cfg.runs_dir) / "ddp")
