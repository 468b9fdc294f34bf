"""One epoch of training, evaluation and prediction: free functions over a model and its data.

The data are ``(x, y)`` pairs: images for a whole classifier, or cached backbone features for its head
(``training.features``); the functions do not tell them apart. Under torchrun, training averages its
figures over the ranks, and evaluation splits the dataset between them and gathers the outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from training import distributed
from training.data import eval_loader
from training.strategies import train_mode
from utils import UserError


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available")
    return device


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA or the CPU when ``amp``; a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type in ("cuda", "cpu"))


class EMA:
    """An exponential moving average of a module's weights: ``module`` is the averaged copy. Floating-point
    tensors (BatchNorm statistics included) are averaged, others copied. The decay warms up as
    min(decay, (1 + n) / (10 + n)) over the first updates, so the starting weights soon stop counting."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, now in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.dtype.is_floating_point:
                avg.lerp_(now.detach(), 1.0 - d)
            else:
                avg.copy_(now)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    if device.type == "cuda" and x.dim() == 4:  # image batches are channels-last on CUDA, like the model
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _progress(iterable, desc: str | None):
    """A progress bar on rank 0 when there is a ``desc``."""
    return tqdm(iterable, desc=desc, leave=False, disable=True if desc is None or distributed.rank() else None)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) on the temperature-softened distributions, scaled by T² (Hinton et al., 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device, *,
                    label_smoothing: float = 0.0, amp: bool = False, ema: EMA | None = None,
                    teacher: nn.Module | None = None, distill_weight: float = 0.5, distill_temperature: float = 2.0,
                    desc: str | None = None) -> tuple[float, float]:
    """One pass over ``loader`` (``train_mode``: frozen BatchNorm keeps its statistics), updating ``ema``
    after each step; returns the mean training loss and accuracy, over every rank's images.

    With a ``teacher`` the loader's images are (student's, teacher's) pairs and the loss is
    (1 − ``distill_weight``) × cross-entropy + ``distill_weight`` × :func:`distill_loss`."""
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    train_mode(plain)
    if teacher is not None:
        teacher.eval()
    total, correct, loss_sum = 0, 0, 0.0
    bar = _progress(loader, desc)
    for x, y in bar:
        if teacher is not None:
            x, x_teacher = x
        x, y = _to(x, device), y.to(device)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(_to(x_teacher, device)).float()
                loss = (1 - distill_weight) * loss + distill_weight * distill_loss(
                    logits.float(), target, distill_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(plain)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
    loss_sum, correct, total = distributed.all_sum(loss_sum, correct, total)
    return loss_sum / max(total, 1), correct / max(total, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device, amp: bool = False,
                   desc: str | None = None, features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (float32, on the CPU) and labels of ``dataset``, in order and in eval mode: the logits, or
    with ``features`` the backbone features of a :class:`~training.models.Classifier`. Under torchrun each
    rank computes its shard and every rank gets the whole."""
    model.eval()
    outs, labels = [], []
    for x, y in _progress(eval_loader(distributed.shard(dataset)), desc):
        with autocast(device, amp):
            out = model.features(_to(x, device)) if features else model(_to(x, device))
        outs.append(out.float().cpu())
        labels.append(y)
    out = torch.cat(outs) if outs else torch.zeros(0)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    return distributed.gather(out), distributed.gather(y)


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, amp: bool = False,
             desc: str | None = None) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and predicted classes over ``dataset`` (NaN loss and accuracy when it is empty)."""
    logits, y = predict_logits(model, dataset, device, amp, desc)
    if len(y) == 0:
        return float("nan"), float("nan"), np.zeros(0, dtype=np.int64)
    pred = logits.argmax(1)
    return F.cross_entropy(logits, y).item(), (pred == y).float().mean().item(), pred.numpy()
