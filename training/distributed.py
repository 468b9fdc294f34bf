"""Data-parallel training under ``torchrun``: the process group, each rank's device, the few collectives
training needs, and a launcher for callers that hold a config object.

Without torchrun (``WORLD_SIZE`` unset or 1) every function is the single-process identity, so one
code path trains both ways.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from utils import UserError

if TYPE_CHECKING:
    from training.train import TrainConfig


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[torch.device]:
    """Yield this rank's device. Under torchrun (``WORLD_SIZE`` > 1) join the job's process group first:
    nccl with GPU ``LOCAL_RANK`` on CUDA, gloo on the CPU. A collective that waits more than ``timeout_s``
    for another rank fails the rank, and torchrun then stops the job. Ranks other than 0 print nothing on
    stdout: rank 0 reports for the job."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local} on a node with {torch.cuda.device_count()} "
                            "GPUs; use --nproc-per-node at most the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    with contextlib.ExitStack() as stack:
        if rank() > 0:
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
        yield device
    dist.barrier()  # no rank tears down while another still has a collective in flight
    dist.destroy_process_group()  # (after an error the process exits instead: nothing to wait for)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel when there is a process group (each step then averages the ranks'
    gradients), else ``net``. Wrap again after changing which parameters train."""
    if world_size() == 1:
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def shard(dataset: Dataset) -> Dataset:
    """This rank's contiguous part of ``dataset``, in rank order (the whole of it in a single process)."""
    n, w, r = len(dataset), world_size(), rank()
    if w == 1:
        return dataset
    per = -(-n // w)
    return Subset(dataset, range(min(n, r * per), min(n, (r + 1) * per)))


def gather(t: torch.Tensor) -> torch.Tensor:
    """The ranks' ``t`` (CPU tensors, e.g. outputs of their :func:`shard`) concatenated in rank order, on
    every rank; ``t`` itself in a single process."""
    if world_size() == 1:
        return t
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, t)
    return torch.cat([p for p in parts if len(p)] or [t])


def all_sum(*values: float) -> list[float]:
    """The sums over ranks of ``values`` (the values themselves in a single process)."""
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` called on rank 0 only, its result sent to every rank (called in place in a
    single process). Reading or writing the run folder goes through it: other nodes may not share the disk."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Local rank 0 of each node runs the block before the node's other ranks (downloads into one folder)."""
    if world_size() == 1:
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()


def launch(cfg: TrainConfig, nproc_per_node: int) -> None:
    """Train ``cfg`` in a child job, ``torchrun --standalone --nproc-per-node N -m training.train``, for callers
    that hold a config object (the study, the benchmark). A failed job raises :class:`UserError`."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "train.yaml"
        config.write_text(yaml.safe_dump({"train": asdict(cfg)}))
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc_per_node}", "-m", "training.train", "--config", str(config)],
                            check=False).returncode
    if rc:
        raise UserError(f"training {cfg.run_name} with {nproc_per_node} processes failed (exit {rc}); "
                        "torchrun's report above names the rank")
