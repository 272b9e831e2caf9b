"""ONNX export and simplification of timm models."""
