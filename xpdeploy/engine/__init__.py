"""The ``build_engine`` stage's building blocks: ONNX -> TensorRT plan (issue 5, item 1).

Modules, from pure to TensorRT-facing:

(Which TensorRT is installed and its build path, weak or strong:
:mod:`xpdeploy.backends.trt_versions`; the CUDA memory layer the builder and the runner share:
:mod:`xpdeploy.backends.cuda_memory`.)

* :mod:`.settings` - what one engine build asks TensorRT for, derived from the pipeline config.
* :mod:`.cache` - engines stored under the full key they were built for, never reused across it.
* :mod:`.calibrator` - int8 calibration batches and the implicit-quantisation calibrator.
* :mod:`.builder` - the calls into TensorRT's builder.

Nothing here imports ``tensorrt`` at module level, so the package imports on machines without it.
"""
