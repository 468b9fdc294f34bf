"""Does TensorRT accept this Q/DQ graph? A structural check run at export on ``model.int8.trt.onnx``, so
that a graph TensorRT 10/11 would refuse never ships (no TensorRT needed to run it).

The rules are those of TensorRT's ONNX parser for explicit quantization (onnx-tensorrt's operator matrix
and its QuantizeLinear/DequantizeLinear importer), narrowed to this project's INT8:

- DequantizeLinear reads INT8 data: TensorRT refuses INT32 (ONNX Runtime's quantized biases) and UINT8;
- QuantizeLinear writes INT8: it has an int8 zero point (without one, ONNX means uint8);
- every zero point is 0 (TensorRT's quantization is symmetric), every scale a positive constant;
- activations are quantized per tensor; per-channel scales only on weights, along the output-channel
  axis of the layer that reads them (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul last),
  one scale per channel.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QDQ = ("QuantizeLinear", "DequantizeLinear")


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                out[n.output[0]] = numpy_helper.to_array(value)
    return out


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _output_channel_axis(layer: onnx.NodeProto, rank: int) -> int | None:
    """The axis of a weight read by ``layer`` that indexes its output channels (None: not a weighted op)."""
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        return 0 if _attr(layer, "transB", 0) else 1
    if layer.op_type == "MatMul":
        return rank - 1
    return None


def _quantized_type(node: onnx.NodeProto, consts: dict, producer: dict) -> int | None:
    """The element type on the quantized side of a Q or DQ node (None: cannot be told from the graph)."""
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zp is not None:
        return onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype", 0) or TensorProto.UINT8
    if node.input[0] in consts:
        return onnx.helper.np_dtype_to_tensor_dtype(consts[node.input[0]].dtype)
    source = producer.get(node.input[0])
    return _quantized_type(source, consts, producer) if source is not None and source.op_type == QDQ[0] else None


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT's parser would refuse a Q/DQ node of ``model``; empty when none."""
    graph = model.graph
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n)
    problems = []
    for node in (n for n in graph.node if n.op_type in QDQ):
        where = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: operator domain {node.domain!r} (TensorRT parses the standard ONNX one)")
        qtype = _quantized_type(node, consts, producer)
        if qtype != TensorProto.INT8:
            kind = "unknown" if qtype is None else TensorProto.DataType.Name(qtype)
            problems.append(f"{where}: {kind} quantized data (TensorRT's explicit quantization takes INT8 here)")
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and np.any(zp != 0):
            problems.append(f"{where}: non-zero zero point (TensorRT's quantization is symmetric)")
        scale = consts.get(node.input[1])
        if scale is None or not np.all(scale > 0):
            problems.append(f"{where}: the scale must be a positive constant")
            continue
        if scale.size == 1:
            continue
        weight = consts.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is None:
            problems.append(f"{where}: per-channel scales on an activation (TensorRT quantizes those per tensor)")
            continue
        axis = _attr(node, "axis", 1) % weight.ndim
        wanted = {_output_channel_axis(r, weight.ndim) for r in readers[node.output[0]]}
        if wanted != {axis} or scale.ndim != 1 or scale.size != weight.shape[axis]:
            layers = ", ".join(sorted({r.op_type for r in readers[node.output[0]]})) or "nothing"
            problems.append(f"{where}: unsupported axis {axis} for {scale.size} scales of a {list(weight.shape)} "
                            f"weight read by {layers} (TensorRT wants one scale per output channel)")
    return problems
