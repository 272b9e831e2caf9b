"""The ``build_engine`` stage's building blocks: ONNX -> TensorRT plan (issue 5, item 1).

Modules, from pure to TensorRT-facing:

* :mod:`.versions` - which TensorRT is installed and which build path it takes (weak or strong).
* :mod:`.settings` - what one engine build asks TensorRT for, derived from the pipeline config.
* :mod:`.cache` - engines stored under the full key they were built for, never reused across it.
* :mod:`.calibrator` - int8 calibration batches and the implicit-quantisation calibrator.
* :mod:`.builder` - the calls into TensorRT's builder.

Nothing here imports ``tensorrt`` at module level, so the package imports on machines without it.
"""
