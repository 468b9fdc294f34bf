"""Load an exported artifact from the BentoML model store onto a backend, verified and warmed up."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.preprocessing import Preprocessing
from service.runtime import ArtifactError, load_ort_model, verify_sha256
from utils import ModelRef, cpu_name, gpu_name


@dataclass
class LoadedModel:
    ref: ModelRef
    preprocessing: Preprocessing
    predict: Callable[[np.ndarray], np.ndarray]  # float32 NCHW → logits
    provider: str
    precision: str
    info: dict  # manifest entry of the artifact (accuracy, sha256, size …)
    instances: int = 1  # independent copies serving calls in parallel

    def describe(self) -> dict:
        p = self.preprocessing
        return {"name": self.ref.name, "tag": self.ref.tag, "backend": self.ref.backend, "provider": self.provider,
                "precision": self.precision, "image_size": p.image_size, "input_size": p.input_size,
                "classes": list(p.classes), "accuracy": self.info.get("accuracy"),
                "sha256": self.info.get("sha256"), "size_bytes": self.info.get("size_bytes"),
                "instances": self.instances,
                "device": cpu_name() if self.provider == "CPUExecutionProvider" else (gpu_name() or "GPU")}


class InstancePool:
    """Independent copies of one predictor (e.g. ONNX Runtime sessions); each call takes a free copy, so
    up to ``len(members)`` calls run at once from different threads."""

    def __init__(self, members: list[Callable[[np.ndarray], np.ndarray]]):
        if not members:
            raise ValueError("an instance pool needs at least one member")
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for m in members:
            self._free.put(m)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        member = self._free.get()
        try:
            return member(x)
        finally:
            self._free.put(member)


def _preload_cuda_libraries() -> None:
    """ONNX Runtime's CUDA provider finds the CUDA and cuDNN libraries of the nvidia-* wheels only once they
    are loaded: torch does it at import, and the bento has no torch (onnxruntime-gpu >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def model_info(stored) -> tuple[dict, Preprocessing, Path]:
    """(manifest entry, preprocessing, artifact path) of a stored BentoML model written by export."""
    meta = dict(stored.info.metadata)
    if "file" not in meta or "sha256" not in meta or "preprocessing" not in meta:
        raise ArtifactError(f"BentoML model {stored.tag} was not saved by `python -m export` (metadata lacks "
                            "file/sha256/preprocessing)")
    name = str(meta["file"])
    if Path(name).name != name or name.startswith("."):  # a file of the model's own folder, never a path
        raise ArtifactError(f"BentoML model {stored.tag}: metadata names the file {name[:100]!r}, not a file name")
    pre = Preprocessing.from_json(meta["preprocessing"])
    return meta, pre, Path(stored.path_of(name))


def load_model(ref: ModelRef, stored, intra_op_threads: int = 0, warmup_batch: int = 8,
               ort_spinning: bool = True, instances: int = 1) -> LoadedModel:
    """``instances`` independent copies (sessions, engine contexts) serve calls from as many threads at
    once; with ``intra_op_threads`` each, they share the cores (e.g. 2 × 1 thread on 2 cores)."""
    if instances < 1:
        raise ArtifactError(f"model {ref.name}: instances must be at least 1, got {instances}")
    meta, pre, path = model_info(stored)
    verify_sha256(path, meta["sha256"])
    if ref.backend.startswith("onnxruntime"):
        cuda = ref.backend == "onnxruntime-cuda"
        if cuda:
            _preload_cuda_libraries()

        def make() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
            m = load_ort_model(path, ["cuda"] if cuda else ["cpu"], threads=intra_op_threads or None,
                               require=cuda, spinning=ort_spinning)
            return m, m.provider
    elif ref.backend == "tensorrt":
        from service.tensorrt_engine import TrtRunner, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ArtifactError(f"model {ref.name}: backend tensorrt unavailable: {reason}")
        if meta.get("format") != "tensorrt":
            raise ArtifactError(f"model {ref.name}: {stored.tag} is a {meta.get('format')} artifact; the tensorrt "
                                "backend serves TensorRT engines (<run>-trt_fp16, <run>-trt_int8)")

        def make() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
            return TrtRunner(path, meta), "TensorRT"  # refuses an engine of another TensorRT or GPU
    else:
        raise ArtifactError(f"model {ref.name}: unknown backend {ref.backend}")
    members = []
    for _ in range(instances):
        m, provider = make()
        for n in (1, warmup_batch):  # warm-up: first calls allocate and pick kernels
            m(np.zeros((n, *pre.input_shape), dtype=np.float32))
        members.append(m)
    predict = members[0] if instances == 1 else InstancePool(members)
    return LoadedModel(ref, pre, predict, provider, str(meta.get("precision", "?")), meta, instances)

