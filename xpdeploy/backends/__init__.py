"""Runners behind one interface (docs/architecture.md section 4): TorchRunner, OrtRunner, TrtRunner.

A runner is a context manager: constructing it only stores what to run; ``__enter__`` opens the
session, ``infer`` maps float32 NCHW pixels to float32 logits, ``__exit__`` frees resources.
:mod:`.runner` holds the protocol; :mod:`.cuda_memory` and :mod:`.trt_versions` are what the
TensorRT runner (and the engine builder above it) share: device memory and the installed version.
"""
