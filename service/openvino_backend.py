"""OpenVINO on CPU: the exported ONNX files (``model.onnx`` FP32, ``model.int8.onnx`` Q/DQ) compiled by
OpenVINO's CPU plugin; used by the service (backend ``openvino``) and the export benchmark.

Precision: on CPUs with AMX or AVX-512 BF16, OpenVINO runs float layers in bfloat16 unless told
otherwise. ``f32`` (the default here) keeps them in float32, so FP32 matches ONNX Runtime and INT8 keeps
its float layers (kept-float nodes, the head) in float32; ``bf16`` is faster and differs more (the
export benchmark measures both against ONNX Runtime). Streams: one compiled model runs ``streams``
inferences at once, each on ``threads`` cores, like as many single-model ONNX Runtime sessions.
Threads are not pinned to cores: where other work shares the cores (HTTP, decoding, other processes),
pinning cost Lite0 INT8 15-24% of its throughput at batch 32 on 2 cores (like ONNX Runtime's spinning).
``openvino`` is an optional extra (``pip install -e '.[openvino]'``): :func:`unavailable_reason` says
when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime import ArtifactError

PRECISIONS = ("f32", "bf16")
PROVIDER = "OpenVINO CPU"


def unavailable_reason() -> str | None:
    """None when OpenVINO can be imported here, else one line saying how to install it."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"openvino is not installed (pip install -e '.[openvino]'): {e}"
    return None


def bf16_capable() -> bool:
    """Whether this CPU runs bfloat16 natively (OpenVINO's ``BF16`` capability: AMX or AVX-512 BF16)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoModel:
    """One ONNX file compiled for the CPU. ``request()`` gives a callable over one infer request: one per
    stream runs calls from as many threads at once (OpenVINO releases the GIL while it infers)."""

    def __init__(self, path: str | Path, threads: int = 0, streams: int = 1, precision: str = "f32",
                 pinning: bool = False):
        reason = unavailable_reason()
        if reason:
            raise ArtifactError(f"{path}: backend openvino unavailable: {reason}")
        if precision not in PRECISIONS:
            raise ArtifactError(f"{path}: OpenVINO precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if streams < 1 or threads < 0:
            raise ArtifactError(f"{path}: need streams >= 1 and threads >= 0, got {streams} and {threads}")
        import openvino as ov

        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"artifact not found: {self.path}")
        config: dict = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": streams, "ENABLE_CPU_PINNING": pinning,
                        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        if threads:  # OpenVINO's thread count is the total over its streams
            config["INFERENCE_NUM_THREADS"] = threads * streams
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except RuntimeError as e:
            raise ArtifactError(f"cannot compile {self.path} with OpenVINO: {str(e).strip()[-500:]}") from e
        self.version = ov.get_version().split("-")[0]
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # what it really uses
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()

    def request(self):
        """A new infer request as a function float32 NCHW → logits (one thread at a time each)."""
        req = self.compiled.create_infer_request()

        def predict(x: np.ndarray) -> np.ndarray:
            return req.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)[0]  # a copy

        return predict

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """One call at a time (the benchmark's and the tests' use); the service uses :meth:`request`."""
        return self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)}, share_inputs=True)[0]

    def describe(self) -> dict:
        """What runs it: OpenVINO's version, streams, threads per stream and the float precision in use."""
        return {"openvino": self.version, "streams": self.streams, "threads_per_stream": self.threads // self.streams,
                "inference_precision": self.precision}


def served_precision(artifact_precision: str, inference_precision: str) -> str:
    """The precision a client sees: the artifact's, with ``bf16`` where OpenVINO runs its float parts so."""
    if inference_precision != "bf16":
        return artifact_precision
    return "bf16" if artifact_precision == "fp32" else f"{artifact_precision}+bf16"
