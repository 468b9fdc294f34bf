"""Load an exported artifact from the BentoML model store onto a backend, verified and warmed up."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.openvino_backend import PROVIDER as OPENVINO_PROVIDER
from service.preprocessing import Preprocessing
from service.runtime import ArtifactError, load_ort_model, verify_sha256
from utils import ModelRef, cpu_name, gpu_name

CPU_PROVIDERS = ("CPUExecutionProvider", OPENVINO_PROVIDER)


@dataclass
class LoadedModel:
    ref: ModelRef
    preprocessing: Preprocessing
    predict: Callable[[np.ndarray], np.ndarray]  # float32 NCHW → logits
    provider: str
    precision: str
    info: dict  # manifest entry of the artifact (accuracy, sha256, size …)
    instances: int = 1  # independent copies serving calls in parallel
    runtime: dict = field(default_factory=dict)  # how the backend runs it (version, threads, precision …)

    def describe(self) -> dict:
        p = self.preprocessing
        return {"name": self.ref.name, "tag": self.ref.tag, "backend": self.ref.backend, "provider": self.provider,
                "precision": self.precision, "image_size": p.image_size, "input_size": p.input_size,
                "classes": list(p.classes), "accuracy": self.info.get("accuracy"),
                "sha256": self.info.get("sha256"), "size_bytes": self.info.get("size_bytes"),
                "instances": self.instances, "runtime": self.runtime,
                "device": cpu_name() if self.provider in CPU_PROVIDERS else (gpu_name() or "GPU")}


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


def _require(ref: ModelRef, tag, meta: dict, unavailable: str | None, fmt: str, serves: str) -> None:
    """Refuse a backend that cannot run here, or an artifact of a format it does not serve."""
    if unavailable:
        raise ArtifactError(f"model {ref.name}: backend {ref.backend} unavailable: {unavailable}")
    if meta.get("format") != fmt:
        raise ArtifactError(f"model {ref.name}: {tag} is a {meta.get('format')} artifact; the {ref.backend} "
                            f"backend serves {serves}")


def load_model(ref: ModelRef, stored, intra_op_threads: int = 0, warmup_batch: int = 8,
               ort_spinning: bool = True, instances: int = 1, openvino_precision: str = "f32") -> LoadedModel:
    """``instances`` independent copies (sessions, engine contexts, OpenVINO streams) serve calls from as
    many threads at once; with ``intra_op_threads`` each, they share the cores (e.g. 2 × 1 thread on 2
    cores). ``openvino_precision``: the float precision of the openvino backend (f32 or bf16)."""
    if instances < 1:
        raise ArtifactError(f"model {ref.name}: instances must be at least 1, got {instances}")
    meta, pre, path = model_info(stored)
    verify_sha256(path, meta["sha256"])
    precision, runtime = str(meta.get("precision", "?")), {}
    if ref.backend.startswith("onnxruntime"):
        cuda = ref.backend == "onnxruntime-cuda"
        if cuda:
            _preload_cuda_libraries()

        def make() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
            m = load_ort_model(path, ["cuda"] if cuda else ["cpu"], threads=intra_op_threads or None,
                               require=cuda, spinning=ort_spinning)
            return m, m.provider

        import onnxruntime

        runtime = {"onnxruntime": onnxruntime.__version__, "intra_op_threads": intra_op_threads,  # 0: all cores
                   "spinning": ort_spinning}
    elif ref.backend == "openvino":
        from service.openvino_backend import PROVIDER, OpenVinoModel, served_precision, unavailable_reason

        _require(ref, stored.tag, meta, unavailable_reason(), "onnx", "the ONNX files (<run>-fp32, <run>-int8)")
        compiled = OpenVinoModel(path, threads=intra_op_threads, streams=instances, precision=openvino_precision)
        precision, runtime = served_precision(precision, compiled.precision), compiled.describe()

        def make() -> tuple[Callable[[np.ndarray], np.ndarray], str]:
            return compiled.request(), PROVIDER  # one infer request per instance, one stream each
    elif ref.backend == "tensorrt":
        from service.tensorrt_engine import TrtRunner, unavailable_reason

        _require(ref, stored.tag, meta, unavailable_reason(), "tensorrt",
                 "TensorRT engines (<run>-trt_fp16, <run>-trt_int8)")

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
    return LoadedModel(ref, pre, predict, provider, precision, meta, instances, runtime)

