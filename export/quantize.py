"""INT8 in Q/DQ form with ONNX Runtime's static quantizer, in two flavours.

- ``cpu`` (``model.int8.onnx``): unsigned 8-bit activations with zero points, signed per-channel
  symmetric weights: the layout ONNX Runtime's CPU kernels are fast with.
- ``trt`` (``model.int8.trt.onnx``): the layout of TensorRT's explicit-quantization guide. Signed
  symmetric INT8 activations (per tensor) and weights (per output channel), every zero point 0, biases
  left in float (TensorRT dequantizes only INT8/FP8/INT4 data, never ONNX Runtime's INT32 biases);
  Q/DQ only on the inputs of Conv/Gemm/MatMul and of residual Adds, none on their outputs, so that
  TensorRT fuses each layer with its activation, its output quantization and a following residual add.
  :mod:`export.trt_check` verifies the result at export.

Both come from ONNX Runtime's quantizer, which calibrates on the CPU. NVIDIA's ModelOpt ONNX PTQ was the
alternative for ``trt``: its ``onnx`` extra pins onnx 1.21 and onnxruntime-gpu 1.24 on Linux, which would
put a second ONNX Runtime into every environment that exports (docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from export.onnx_export import set_metadata
from utils import UserError, atomic_path

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FLAVOURS = ("cpu", "trt")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# The TensorRT recipe (part of the export's up-to-date key: a change re-quantizes).
TRT_OPTIONS = {"op_types": [*WEIGHTED_OPS, "Add"], "QuantizeBias": False, "residual_add_inputs": "skip-only"}

# Nodes known to lose accuracy in INT8, matched against a node's name or one of its torch module
# scopes (full match): the fallback where the search (export/int8_search.py) does not run, e.g. for
# random-init speed runs. EfficientNet: the stem, squeeze-excitation (fc1/fc2) and the classifier. Lite0
# (no SE), fine-tuned on the CIFAR-10 subset at 128 px, INT8 vs FP32 at batch 32 on a 2-core CPU:
#   all INT8 -1.76 pts 2.46x | stem+head -1.57 pts 2.21x | stem+block0+head -0.59 pts 2.11x |
#   stem+blocks0-1+head +0.00 pts 1.63x   → the preset keeps stem, block 0 and the classifier.
KEEP_FLOAT_PRESETS: dict[str, list[str]] = {
    "efficientnet_lite0": [r"backbone\.net\._bn0", r"backbone\.net\._blocks\.0(\..*)?", r"head(\..*)?"],
    "efficientnet_b0": [r"backbone\.features\.0(\..*)?", r".*\.fc[12]", r"head(\..*)?"],
}


def select_calibration_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices spread evenly over the classes (round robin over shuffled per-class lists).
    Warns, and returns all there are, when fewer than ``n`` images exist."""
    labels = np.asarray(labels)
    if n <= 0:
        raise UserError(f"--calib-images must be positive, got {n}")
    if n > len(labels):
        print(f"WARNING: asked for {n} calibration images but only {len(labels)} are available; "
              f"calibrating on {len(labels)}", file=sys.stderr)
        n = len(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == k)).tolist() for k in np.unique(labels)]
    out: list[int] = []
    while len(out) < n:
        for idx in per_class:
            if idx and len(out) < n:
                out.append(idx.pop())
    return np.sort(np.array(out, dtype=np.int64))


def _scopes(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return [s.strip().strip("'\"") for s in p.value.strip("[]").split(",")]
    return []


def resolve_keep_float(model_path: Path, patterns: list[str]) -> list[str]:
    """Names of the nodes whose name or torch module scope matches any pattern."""
    if not patterns:
        return []
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise UserError(f"bad --keep-float pattern: {e}") from e
    model = onnx.load(str(model_path), load_external_data=False)
    names = []
    for node in model.graph.node:
        scopes = _scopes(node)
        if any(c.fullmatch(node.name) or any(c.fullmatch(s) for s in scopes) for c in compiled):
            names.append(node.name)
    return names


class _Reader:
    """A CalibrationDataReader over a float32 NCHW array, in batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 32):
        self.x, self.name, self.batch, self.i = x, input_name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = self.x[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: b}

    def rewind(self):
        self.i = 0


@contextlib.contextmanager
def _quiet_in(work: str):
    """ORT's calibrator writes an augmented model into the working directory, nags about optional
    pre-processing on the root logger and prints progress: run it in ``work``, quietly."""
    cwd, root = os.getcwd(), logging.getLogger()
    level = root.level
    os.chdir(work)
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            yield
    finally:
        os.chdir(cwd)
        root.setLevel(level)


def calibrate(fp32_path: Path, calib_x: np.ndarray, method: str, counts: list[int], folder: Path,
              input_name: str = "input", batch: int = 32) -> dict[int, Path]:
    """Tensor ranges of ``fp32_path`` with ONNX Runtime's calibrator, in ONE pass over ``calib_x``: the
    ranges after the first ``n`` images, for each ``n`` in ``counts``, are saved as calibration caches
    (``folder/<method>-<n>.json``) that :func:`quantize_int8` reuses without calibrating again."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method_enum = _method(method)
    counts = sorted({min(int(n), len(calib_x)) for n in counts})
    fp32_path, folder = Path(fp32_path).resolve(), Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    bounds = sorted({*range(0, counts[-1], batch), *counts})  # every count ends a chunk
    out: dict[int, Path] = {}
    with tempfile.TemporaryDirectory() as work, _quiet_in(work):
        cal = create_calibrator(fp32_path, [], augmented_model_path=str(Path(work) / "augmented.onnx"),
                                calibrate_method=method_enum)
        for start, stop in zip(bounds, bounds[1:], strict=False):
            cal.collect_data(_Reader(calib_x[start:stop], input_name, batch))  # ranges merge chunk by chunk
            if stop in counts:
                out[stop] = folder / f"{method}-{stop}.json"
                save_tensors_data(cal.compute_data(), out[stop])
    return out


def _method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown calibration method {method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def quantize_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray | None, flavour: str = "cpu",
                  method: str = "minmax", keep_float: list[str] | None = None, input_name: str = "input",
                  calibration: Path | None = None, per_channel: bool = True) -> None:
    """Static Q/DQ quantization of ``fp32_path`` into ``out_path`` (atomic), metadata preserved. With
    ``calibration`` (a cache from :func:`calibrate`), its ranges are used and ``calib_x`` is not needed."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if flavour not in FLAVOURS:
        raise UserError(f"unknown INT8 flavour {flavour!r}; valid: {', '.join(FLAVOURS)}")
    calib = _method(method)
    trt = flavour == "trt"
    # Not CalibMaxIntermediateOutputs: onnxruntime 1.31 discards what it collected when that limit is
    # reached, so calibration would silently use only the last chunk of images.
    extra = {"ActivationSymmetric": trt, "WeightSymmetric": True}
    if trt:  # Q/DQ on layer inputs only; biases stay float
        extra.update(QuantizeBias=False, OpTypesToExcludeOutputQuantization=TRT_OPTIONS["op_types"])
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()  # before the chdir below
    cache = str(Path(calibration).resolve()) if calibration is not None else None
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory() as work:
        with _quiet_in(work):
            quantize_static(str(fp32_path), str(tmp), None if cache else _Reader(calib_x, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=keep_float or [],
                            op_types_to_quantize=TRT_OPTIONS["op_types"] if trt else None,
                            calibrate_method=calib, extra_options=extra, calibration_cache_path=cache)
        src = onnx.load(str(fp32_path), load_external_data=False)
        q = onnx.load(str(tmp))
        if trt:
            float_residual_branches(q)
        meta = {p.key: p.value for p in src.metadata_props}
        meta["cifar_deploy.precision"] = "int8" if flavour == "cpu" else "int8-trt"
        set_metadata(q, meta)
        onnx.save(q, str(tmp))


def float_residual_branches(model: onnx.ModelProto) -> int:
    """TensorRT's residual pattern: an Add reads the output of a Conv/Gemm/MatMul in float (TensorRT fuses
    the add into that layer) and only its other, skip input through Q/DQ. ONNX Runtime quantizes every
    input of an Add, so the Q/DQ pair on one layer-fed input of each Add is bypassed here, and dropped
    when nothing else reads it. Returns the number of Adds changed."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for add in (n for n in graph.node if n.op_type == "Add"):
        for i, name in enumerate(add.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            layer = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if layer is not None and layer.op_type in WEIGHTED_OPS:
                add.input[i] = q.input[0]
                changed += 1
                break
    while True:  # drop Q/DQ nodes nobody reads any more (a DQ first, then its Q)
        read = Counter(i for n in graph.node for i in n.input) + Counter(o.name for o in graph.output)
        unused = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  and not read[n.output[0]]]
        if not unused:
            for init in [i for i in graph.initializer if not read[i.name]]:  # their scales and zero points
                graph.initializer.remove(init)
            return changed
        for n in unused:
            graph.node.remove(n)


def qdq_summary(path: Path) -> dict:
    """Counts of Q/DQ nodes and the zero points of every QuantizeLinear/DequantizeLinear."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zps: list[np.ndarray] = []
    n_q = n_dq = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n_q += node.op_type == "QuantizeLinear"
            n_dq += node.op_type == "DequantizeLinear"
            if len(node.input) > 2 and node.input[2] in inits:
                zps.append(np.ravel(inits[node.input[2]]))
    all_zp = np.concatenate(zps) if zps else np.zeros(0)
    return {"quantize_nodes": n_q, "dequantize_nodes": n_dq,
            "zero_points_all_zero": bool(all_zp.size) and bool(np.all(all_zp == 0)),
            "zero_point_dtypes": sorted({str(z.dtype) for z in zps})}
