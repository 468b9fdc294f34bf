"""Transfer strategies: which parameters train, and which frozen layers keep their statistics.

- ``frozen``: only the head trains (the backbone is a fixed feature extractor).
- ``full``: everything trains.
- ``last-N``: the head and the last N *layers* of the backbone train. A layer is a module that owns
  parameters (convolution, linear, normalisation), counted in definition order — seed 004 unfroze
  the last 90 Keras layers of ResNet-50.
- ``two-phase``: ``frozen`` for the first phase, then ``full`` at a lower learning rate (seed 001).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from training.models import Classifier
from utils import UserError

_LAST_N = re.compile(r"^last-(\d+)$")


@dataclass(frozen=True)
class Strategy:
    name: str  # as given: frozen, full, last-20, two-phase
    kind: str  # frozen | full | last | two-phase
    n: int = 0

    def phase(self, epoch: int, phase1_epochs: int) -> str:
        """The concrete strategy (frozen | full | last) in force at a 0-based epoch."""
        if self.kind == "two-phase":
            return "frozen" if epoch < phase1_epochs else "full"
        return self.kind


def parse_strategy(name: str) -> Strategy:
    if name in ("frozen", "full", "two-phase"):
        return Strategy(name, name)
    m = _LAST_N.match(name)
    if m and int(m.group(1)) > 0:
        return Strategy(name, "last", int(m.group(1)))
    raise UserError(f"unknown strategy {name!r}; valid: frozen, full, last-N (N > 0, e.g. last-90), two-phase")


def backbone_layers(model: Classifier) -> list[nn.Module]:
    """Modules of the backbone that own parameters directly, in definition order."""
    return [m for m in model.backbone.modules() if any(True for _ in m.parameters(recurse=False))]


def apply_strategy(model: Classifier, kind: str, n: int = 0) -> None:
    """Set ``requires_grad`` for a concrete strategy (frozen | full | last)."""
    for p in model.backbone.parameters():
        p.requires_grad = kind == "full"
    for p in model.head.parameters():
        p.requires_grad = True
    if kind == "last":
        layers = backbone_layers(model)
        if n > len(layers):
            raise UserError(f"last-{n}: the backbone has only {len(layers)} layers with parameters")
        for layer in layers[len(layers) - n:]:
            for p in layer.parameters(recurse=False):
                p.requires_grad = True
    elif kind not in ("frozen", "full"):
        raise ValueError(f"not a concrete strategy: {kind}")


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but frozen parts stay in eval mode: BatchNorm layers whose parameters are frozen
    keep their ImageNet statistics, and a wholly frozen ``model.backbone`` runs as in inference (dropout
    off). A module without a backbone (a head trained on cached features) simply trains."""
    model.train()
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        frozen_norm = isinstance(m, nn.modules.batchnorm._BatchNorm) and own and not any(p.requires_grad for p in own)
        if frozen_norm:
            m.eval()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
        backbone.eval()
