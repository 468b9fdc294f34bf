"""One epoch of training, evaluation and prediction: free functions over a model and a loader.

The loader yields ``(x, y)`` batches: images for a whole classifier, or cached backbone features for
its head (``training.features``); the functions do not tell them apart.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    if device.type == "cuda" and x.dim() == 4:  # image batches are channels-last on CUDA, like the model
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device, *,
                    label_smoothing: float = 0.0, amp: bool = False, desc: str | None = None) -> tuple[float, float]:
    """One pass over ``loader`` (``train_mode``: frozen BatchNorm keeps its statistics); returns the mean
    training loss and accuracy."""
    train_mode(model)
    total, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(loader, total=len(loader), desc=desc, leave=False, disable=None)
    for x, y in bar:
        x, y = _to(x, device), y.to(device)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
    return loss_sum / max(total, 1), correct / max(total, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, loader, device: torch.device, amp: bool = False, desc: str | None = None,
                   features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (float32, on the CPU) and labels of every batch of ``loader``, in eval mode: the logits,
    or with ``features`` the backbone features of a :class:`~training.models.Classifier`."""
    model.eval()
    outs, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=True if desc is None else None):
        with autocast(device, amp):
            out = model.features(_to(x, device)) if features else model(_to(x, device))
        outs.append(out.float().cpu())
        labels.append(y)
    if not outs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False,
             desc: str | None = None) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and predicted classes over ``loader`` (NaN loss and accuracy when it is empty)."""
    logits, y = predict_logits(model, loader, device, amp, desc)
    if len(y) == 0:
        return float("nan"), float("nan"), np.zeros(0, dtype=np.int64)
    pred = logits.argmax(1)
    return F.cross_entropy(logits, y).item(), (pred == y).float().mean().item(), pred.numpy()
