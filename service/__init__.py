"""Serving stage: preprocessing, ONNX Runtime/TensorRT backends and the BentoML service (no torch needed)."""
