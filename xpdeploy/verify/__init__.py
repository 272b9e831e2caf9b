"""Candidates, gates, latency and the accelerator candidates of the verify stage.

Torch-free on purpose: this package runs on device machines that have only numpy, onnxruntime and
TensorRT (docs/architecture.md section 1). Import the submodules; the package imports nothing.
"""
