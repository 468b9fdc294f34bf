"""TensorRT engines from the FP16 and INT8 (Q/DQ) ONNX files (built by export), and the runner (used by
the service, the benchmark and ``make gpu-check``).

Networks are strongly typed (TensorRT 11 knows no other kind; the flag is explicit for 10.x): precision
comes from the graph (FP16 casts, INT8 Q/DQ with zero points 0), not from builder flags or calibrators.
GPU memory and streams come from cuda-python's runtime bindings (``cuda-bindings``), so the runner needs
neither torch nor ONNX Runtime. An engine only runs with the TensorRT version and on the GPU
architecture it was built for: both are recorded at export and checked before an engine is loaded.
This module is deliberately thin; where ``tensorrt`` or a CUDA GPU is missing, :func:`unavailable_reason`
says why and callers skip. No GPU has run it in this project yet (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.runtime import ArtifactError
from utils import atomic_write


@dataclass(frozen=True)
class Profile:
    """Batch range of the engine's optimization profile."""

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/"
                             f"{self.max_batch}")

    def shapes(self, chw: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``set_shape``."""
        return ((self.min_batch, *chw), (self.opt_batch, *chw), (self.max_batch, *chw))


def _cudart():
    """cuda-python's CUDA runtime bindings (the CUDA runtime is linked in; only the driver must exist)."""
    from cuda.bindings import runtime

    return runtime


def _cuda(result: tuple):
    """The value of a runtime call's ``(error, *values)`` result; a CUDA error raises."""
    err, *values = result
    if int(err) != 0:
        _, text = _cudart().cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {text.decode() if isinstance(text, bytes) else text}")
    return values[0] if values else None


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install -e '.[gpu]')"
    except Exception as e:  # a broken install raises at import
        return f"tensorrt does not import ({type(e).__name__}: {e})"
    try:
        rt = _cudart()
    except ImportError:
        return "cuda-python's runtime bindings are not installed (pip install -e '.[gpu]')"
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return "no CUDA GPU is visible" + (f" ({rt.cudaGetErrorString(err)[1].decode()})" if int(err) else "")
    return None


def host_target(device: int = 0) -> dict[str, str]:
    """What an engine is tied to: this TensorRT's version and the GPU's name and compute capability."""
    import tensorrt as trt

    props = _cuda(_cudart().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt_version": trt.__version__, "gpu": name.rstrip("\x00").strip(),
            "compute_capability": f"{props.major}.{props.minor}"}


def check_compatible(built: Mapping, what: str) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU architecture (``built``: its
    manifest entry or BentoML metadata, with ``tensorrt_version`` and ``compute_capability``)."""
    here = host_target()
    diff = [f"{k} {built.get(k)} (here {here[k]})" for k in ("tensorrt_version", "compute_capability")
            if str(built.get(k)) != here[k]]
    if diff:
        raise ArtifactError(f"{what} was built for {', '.join(diff)}: rebuild it on this host with "
                            "python -m export RUN --formats fp16 int8_trt trt_fp16 trt_int8")


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile = Profile(), workspace_mb: int = 1024,
                 timing_cache: Path | None = None) -> None:
    """Parse ``onnx_path`` into a strongly typed network and write a serialized engine atomically; the
    timing cache (reused across builds on this GPU) is updated."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    if network.num_inputs != 1:
        raise RuntimeError(f"{onnx_path.name} has {network.num_inputs} inputs; the runner feeds one")
    inp = network.get_input(0)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(inp.name, *profile.shapes(tuple(inp.shape)[1:]))
    config.add_optimization_profile(opt_profile)
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False):
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)  # another GPU's cache
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    atomic_write(plan_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))


class TrtRunner:
    """Runs a serialized engine on NCHW batches: one input and one output, whose names, dtypes and batch
    range are read from the engine; buffers for the largest batch are allocated once, and the copies and
    the execution run in order on the runner's CUDA stream."""

    def __init__(self, plan_path: Path, built: Mapping):
        import tensorrt as trt

        check_compatible(built, Path(plan_path).name)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {Path(plan_path).name}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{Path(plan_path).name}: expected one input and one output, got {names}")
        self.input, self.output = inputs[0], outputs[0]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        self.min_batch, self.max_batch = low[0], high[0]
        self.context = self.engine.create_execution_context()
        self._set_shape(high)
        rt = _cudart()
        self.buffers: dict[str, int] = {}
        self.stream = _cuda(rt.cudaStreamCreate())
        for name, shape, dtype in ((self.input, high, self.input_dtype),
                                   (self.output, self.context.get_tensor_shape(self.output), self.output_dtype)):
            self.buffers[name] = int(_cuda(rt.cudaMalloc(int(np.prod(tuple(shape))) * dtype.itemsize)))
            if not self.context.set_tensor_address(name, self.buffers[name]):
                raise RuntimeError(f"TensorRT refused the buffer of {name!r}")

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.input, shape):
            raise ValueError(f"TensorRT refused input shape {shape} for {self.input!r}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not self.min_batch <= len(x) <= self.max_batch:
            raise ValueError(f"a batch of {len(x)} is outside this engine's optimization profile "
                             f"[{self.min_batch}, {self.max_batch}]: split it, or export with --max-batch")
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        self._set_shape(x.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), self.output_dtype)
        rt = _cudart()
        kind = rt.cudaMemcpyKind
        _cuda(rt.cudaMemcpyAsync(self.buffers[self.input], x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice,
                                 self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed (see its log above)")
        _cuda(rt.cudaMemcpyAsync(out.ctypes.data, self.buffers[self.output], out.nbytes,
                                 kind.cudaMemcpyDeviceToHost, self.stream))
        _cuda(rt.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        """Free the GPU buffers and the stream (the runner is unusable afterwards)."""
        rt = _cudart()
        for ptr in self.buffers.values():
            _cuda(rt.cudaFree(ptr))
        self.buffers = {}
        if self.stream is not None:
            _cuda(rt.cudaStreamDestroy(self.stream))
            self.stream = None
