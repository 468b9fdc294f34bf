"""PyTorch → ONNX: FP32 and FP16 (FP32 inputs and outputs), dynamic batch, one self-contained file,
checked with ``onnx.checker`` (full check) and carrying the preprocessing metadata."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from service.preprocessing import METADATA_KEY, Preprocessing
from training.models import Classifier
from training.record import load_trained
from utils import UserError, atomic_path

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """An export that must not ship (failed check or parity)."""


def load_run(run_dir: str | Path) -> tuple[Classifier, dict, Preprocessing, Path]:
    """Rebuild a trained model from ``run_dir`` (``model.json`` + its checkpoint), in eval mode, with its
    preprocessing."""
    model, mj, ckpt_path = load_trained(run_dir)
    try:
        pre = Preprocessing.from_dict(mj["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt {Path(run_dir) / 'model.json'}: {type(e).__name__}: {e}") from e
    return model, mj, pre, ckpt_path


class _HalfPrecision(nn.Module):
    """FP16 weights and compute behind FP32 inputs and outputs (explicit casts in the graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float16)).to(torch.float32)


def _export(module: nn.Module, path: Path, image_size: int, opset: int) -> None:
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={"x": {0: batch}}, opset_version=opset, external_data=False,
                          dynamo=True, verbose=False)


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def _check(model: onnx.ModelProto, name: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{name} fails onnx.checker: {e}") from e


def artifact_metadata(pre: Preprocessing, mj: dict, precision: str, run_dir: Path) -> dict[str, str]:
    return {
        METADATA_KEY: pre.to_json(),
        "cifar_deploy.backbone": str(mj["backbone"]),
        "cifar_deploy.head": str(mj["head"]),
        "cifar_deploy.precision": precision,
        "cifar_deploy.source_run": str(run_dir.resolve()),
        "cifar_deploy.dataset": str(mj.get("dataset", "")),
        "cifar_deploy.weights": str(mj.get("weights", "")),
    }


def export_onnx(model: Classifier, path: Path, meta: dict[str, str], fp16: bool = False,
                opset: int = DEFAULT_OPSET) -> None:
    """Export ``model`` (FP32, or FP16 inside FP32 I/O) to ``path`` atomically."""
    if opset < 17:
        raise UserError(f"--opset must be at least 17, got {opset}")
    module = _HalfPrecision(model) if fp16 else model
    with atomic_path(path) as tmp:
        _export(module, tmp, model.image_size, opset)
        proto = onnx.load(str(tmp))
        set_metadata(proto, meta)
        _check(proto, path.name)
        onnx.save(proto, str(tmp))


def opset_of(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
