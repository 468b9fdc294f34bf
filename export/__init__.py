"""Export stage: ONNX (FP32, FP16, INT8 Q/DQ), TensorRT engines, manifest and benchmark."""
