"""Load an exported artifact from the BentoML model store onto a backend, verified and warmed up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.config import ModelSpec
from service.preprocessing import Preprocessing
from service.runtime import ArtifactError, cpu_name, gpu_name, load_ort_model, verify_sha256


@dataclass
class LoadedModel:
    spec: ModelSpec
    preprocessing: Preprocessing
    predict: Callable[[np.ndarray], np.ndarray]  # float32 NCHW → logits
    provider: str
    precision: str
    info: dict  # manifest entry of the artifact (accuracy, sha256, size …)

    def describe(self) -> dict:
        p = self.preprocessing
        return {"name": self.spec.name, "tag": self.spec.tag, "backend": self.spec.backend, "provider": self.provider,
                "precision": self.precision, "image_size": p.image_size, "input_size": p.input_size,
                "classes": list(p.classes), "accuracy": self.info.get("accuracy"),
                "sha256": self.info.get("sha256"), "size_bytes": self.info.get("size_bytes"),
                "device": cpu_name() if self.provider == "CPUExecutionProvider" else (gpu_name() or "GPU")}


def model_info(stored) -> tuple[dict, Preprocessing, Path]:
    """(manifest entry, preprocessing, artifact path) of a stored BentoML model written by export."""
    meta = dict(stored.info.metadata)
    if "file" not in meta or "sha256" not in meta or "preprocessing" not in meta:
        raise ArtifactError(f"BentoML model {stored.tag} was not saved by `python -m export` (metadata lacks "
                            "file/sha256/preprocessing)")
    pre = Preprocessing.from_json(meta["preprocessing"])
    return meta, pre, Path(stored.path_of(meta["file"]))


def load_model(spec: ModelSpec, stored, intra_op_threads: int = 0, warmup_batch: int = 8,
               ort_spinning: bool = True) -> LoadedModel:
    meta, pre, path = model_info(stored)
    if spec.backend.startswith("onnxruntime"):
        cuda = spec.backend == "onnxruntime-cuda"
        m = load_ort_model(path, ["cuda"] if cuda else ["cpu"], threads=intra_op_threads or None,
                           expected_sha256=meta["sha256"], require=cuda,
                           spinning=ort_spinning)
        predict, provider = m, m.provider
    elif spec.backend == "tensorrt":
        from service.tensorrt_engine import TrtRunner, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ArtifactError(f"model {spec.name}: backend tensorrt unavailable: {reason}")
        verify_sha256(path, meta["sha256"])
        predict, provider = TrtRunner(path), "TensorRT"
    else:
        raise ArtifactError(f"model {spec.name}: unknown backend {spec.backend}")
    loaded = LoadedModel(spec, pre, predict, provider, str(meta.get("precision", "?")), meta)
    for n in (1, warmup_batch):  # warm-up: first calls allocate and pick kernels
        predict(np.zeros((n, *pre.input_shape), dtype=np.float32))
    return loaded

