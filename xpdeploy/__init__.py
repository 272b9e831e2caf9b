"""xpdeploy: explainable pruning (X-Pruner) and edge deployment for vision transformers.

Importing the package is cheap on purpose: the heavy libraries (torch, timm, onnx, onnxruntime,
onnxsim, tensorrt) are imported by the modules that need them, so ``xpdeploy --help`` works on a
machine that has none of them.
"""

__version__ = "0.1.0"
