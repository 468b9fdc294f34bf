"""TensorRT 11 engines from the FP16 and INT8 (Q/DQ) ONNX files (built by export), and the runner
(used by the service and the benchmark).

TensorRT 11 networks are always strongly typed: precision comes from the graph (FP16 casts, INT8
Q/DQ with zero points 0), not from builder flags or calibrators. This module is deliberately thin;
where ``tensorrt`` or a CUDA GPU is missing, :func:`unavailable_reason` says why and callers skip.
Nothing here runs in CI (no GPU there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

    def shapes(self, chw: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``set_shape``."""
        return ((self.min_batch, *chw), (self.opt_batch, *chw), (self.max_batch, *chw))


def unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying what is missing."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return "TensorRT engines skipped: the tensorrt Python package is not installed (pip install '.[gpu]')"
    except Exception as e:  # the PyPI stub raises at import when the real wheel is missing
        return f"TensorRT engines skipped: tensorrt does not import ({type(e).__name__}: {e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "TensorRT engines skipped: no CUDA GPU is visible"
    except ImportError:
        return "TensorRT engines skipped: torch (used for GPU buffers) is not installed"
    return None


def build_engine(onnx_path: Path, plan_path: Path, chw: tuple[int, int, int], profile: Profile = Profile(),
                 workspace_mb: int = 1024, timing_cache: Path | None = None, input_name: str = "input") -> None:
    """Parse ``onnx_path`` into a strongly typed network and write a serialized engine atomically."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # always on in TensorRT 11; explicit for 10.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile.shapes(chw))
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    atomic_write(plan_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))


class TrtRunner:
    """Runs a serialized engine on float32 NCHW batches (torch CUDA tensors as buffers)."""

    def __init__(self, plan_path: Path, input_name: str = "input", output_name: str = "logits"):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path} is not an engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name
        self.stream = torch.cuda.Stream()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(inp.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input_name, inp.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()
