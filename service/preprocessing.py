"""The one preprocessing definition, read from artifact metadata (numpy and Pillow only: no torch).

Training writes it into ``model.json``; export copies it into the ONNX metadata and the manifest; the
service and export's evaluation both call :meth:`Preprocessing.to_input`, so a served prediction
equals the offline one. Images are resized to ``image_size`` (the dataset's native 32 px), scaled
to [0, 1] and normalised per channel; the model upsamples to ``input_size`` in-graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

METADATA_KEY = "cifar_deploy.preprocessing"


class PreprocessingError(ValueError):
    """Metadata that does not describe a usable preprocessing."""


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    resize: str = "bilinear"
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            p = cls(image_size=int(d["image_size"]), input_size=int(d["input_size"]),
                    mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                    classes=tuple(str(c) for c in d["classes"]), resize=str(d.get("resize", "bilinear")),
                    layout=str(d.get("layout", "NCHW")))
        except (KeyError, TypeError, ValueError) as e:
            raise PreprocessingError(f"invalid preprocessing metadata: {type(e).__name__}: {e}") from e
        if len(p.mean) != 3 or len(p.std) != 3 or min(p.std) <= 0 or not p.classes or p.image_size < 1:
            raise PreprocessingError(f"invalid preprocessing metadata: {d}")
        return p

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PreprocessingError(f"preprocessing metadata is not JSON: {e}") from e

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"], d["classes"] = list(self.mean), list(self.std), list(self.classes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one model input (C, H, W)."""
        return (3, self.image_size, self.image_size)

    def to_input(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) at ``image_size`` → float32 NCHW model input."""
        x = np.asarray(images_uint8_nhwc)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {x.shape}")
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
