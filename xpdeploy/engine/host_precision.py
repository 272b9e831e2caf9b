"""Host-side precision for the strongly typed build path (TensorRT >= 10.12, the only mode in 11.x).

A strongly typed network takes every tensor's type from the ONNX graph; builder flags no longer
choose fp16 or int8 (see :mod:`xpdeploy.engine.settings`). So the precision is put into the graph
here, on the host, before ``build_engine``:

* **fp16** (:func:`cast_fp16`): weights and activations cast to float16 by onnxruntime's bundled
  converter (``onnxruntime.transformers.float16``: no extra package, and it already handles
  shape-inferred value infos, subgraphs and boundary casts). Graph inputs and outputs stay float32
  (a Cast at each boundary), so callers, runners and the TensorRT I/O bindings do not change. Norm
  and softmax ops stay float32: on ViTs the LayerNorm variance and the softmax exponent sums
  overflow fp16's 65504 range or lose its 11-bit mantissa, which is also why the weak path pins
  LayerNorm to fp32.
* **int8** (:func:`quantize_qdq`): symmetric int8 QuantizeLinear/DequantizeLinear pairs inserted
  by onnxruntime's static quantizer (``quantize_static``, ``QuantFormat.QDQ``) from the same
  calibration set the weak path's implicit calibrator uses.

Why onnxruntime's quantizer rather than NVIDIA's Model Optimizer (ModelOpt): ModelOpt's ONNX PTQ
needs torch, CUDA and (for its default calibration) a GPU, none of which the host stage may assume
(this module must run on a CPU-only build box and stay torch-free). What TensorRT's explicit
quantization consumes is plain ONNX: int8 Q/DQ with zero point 0 (symmetric), per-channel weight
scales on the output-channel axis, per-tensor activation scales, Q/DQ on the *inputs* of
MatMul/Gemm/Conv and float biases. onnxruntime's QDQ output, configured as below, is exactly that;
the choice of calibrator (minmax, entropy, percentile) is the same family ModelOpt offers.

Everything is torch-free (onnx, onnxruntime, numpy). Each function checks its output with
``onnx.checker`` and, given a batch, measures parity against the fp32 model in onnxruntime CPU
with graph fusion off, so Q/DQ run as exact fake quantization (what TensorRT's int8 kernels
compute) rather than through onnxruntime's own int8 CPU kernels, whose extra error is theirs.
Errors are one-line :class:`~xpdeploy.errors.ExportError` messages.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from xpdeploy.errors import ExportError, MissingDependencyError
from xpdeploy.fileio import write_with

if TYPE_CHECKING:
    import onnx

    from xpdeploy.engine.settings import GraphPrecision

CalibMethod = Literal["minmax", "entropy", "percentile"]

#: Ops kept in float32 by :func:`cast_fp16`. LayerNormalization and Softmax are the ViT overflow
#: risks; ReduceMean/Pow/Sqrt cover a LayerNorm decomposed by an exporter below opset 17. Div is
#: deliberately not here: in our exports it is GELU's ``x / sqrt(2)``, harmless in fp16, and
#: blocking it would add two Casts per MLP.
DEFAULT_KEEP_FP32: tuple[str, ...] = (
    "LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
)
#: Ops whose inputs get Q/DQ in :func:`quantize_qdq`: the GEMM-like ops TensorRT runs in int8.
DEFAULT_QUANT_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
#: Ops never quantized; reported as kept in float (TensorRT keeps them in fp32/fp16).
UNQUANTIZED_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
#: Below this many calibration images the int8 ranges of a ViT are unreliable (activation outliers
#: in the MLP and attention are rare; TensorRT and ModelOpt guides use 500-1000 images).
MIN_VIT_CALIBRATION = 500
#: Images per calibration forward pass when the model's batch axis is dynamic.
CALIB_BATCH = 32

_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
_INT8_TYPES = (3,)  # onnx.TensorProto.INT8


@dataclass(frozen=True)
class Parity:
    """The converted model vs the fp32 model in onnxruntime CPU on one batch of images."""

    samples: int
    max_abs_diff: float  # largest |logit difference| over the batch (logit units)
    min_cosine: float  # lowest per-image cosine similarity of the two logit vectors
    top1_agreement: float  # fraction of images with the same arg-max class (0..1)


@dataclass(frozen=True)
class CastReport:
    """What :func:`cast_fp16` did; ``as_dict`` is what the build stage logs and records."""

    src: str
    dst: str
    converter: str
    nodes_before: int
    nodes_after: int
    casts_added: int
    kept_fp32: dict[str, int]  # op type -> nodes of that type that still compute in float32
    bytes_before: int
    bytes_after: int
    parity: Parity | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QdqReport:
    """What :func:`quantize_qdq` did; ``as_dict`` is what the build stage logs and records."""

    src: str
    dst: str
    method: str
    per_channel: bool
    calibration_images: int  # images actually run through the calibrator
    nodes_before: int  # in ``src``
    nodes_after: int  # after quant_pre_process folding and Q/DQ insertion
    quantized_nodes: dict[str, int]  # op type -> nodes with a DequantizeLinear input
    qdq_pairs: int  # QuantizeLinear nodes whose output feeds a DequantizeLinear (activations)
    weight_dq: int  # DequantizeLinear nodes on int8 initializers (weights)
    kept_float: dict[str, int]  # op type -> nodes left unquantized on purpose
    parity: Parity | None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# fp16


def cast_fp16(
    src: Path,
    dst: Path,
    *,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32,
    parity_pixels: np.ndarray | None = None,
) -> CastReport:
    """Write an fp16 copy of ``src`` to ``dst`` (atomically) with float32 graph I/O.

    ``keep_fp32_ops`` stay float32, with Casts around them. Given ``parity_pixels`` (float32
    NCHW, the model's input size), both models run in onnxruntime CPU and the report holds the
    difference. The caller decides what difference is acceptable.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime (with its transformers tools) is needed for the fp16 cast; "
            "pip install onnxruntime"
        ) from None
    model = _load(src)
    # The default block list holds ops without an fp16 kernel in onnxruntime (where parity runs);
    # none of them occurs in a ViT, but replacing it would make the parity run fail on models
    # that have them.
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
        # The converter appends the graph-input Casts after their consumers (onnxruntime's own
        # OnnxModel wrapper re-sorts afterwards); ONNX requires topological order.
        _topological_sort(converted.graph)
        onnx.checker.check_model(converted)
    except Exception as e:  # the converter raises bare ValueError/AssertionError
        raise ExportError(f"fp16 cast of {src.name} failed: {_first_line(e)}") from None
    types = _elem_types(converted)
    kept = {op: 0 for op in keep_fp32_ops}
    for node in converted.graph.node:
        if node.op_type in kept:
            if types.get(node.input[0]) != _FLOAT:
                raise ExportError(
                    f"fp16 cast of {src.name} left {node.op_type} node {node.name!r} in "
                    f"{_type_name(types.get(node.input[0]))}, expected float32; this is a "
                    "converter bug, report it with the ONNX file"
                )
            kept[node.op_type] += 1
    _check_io_float32(converted, src)
    write_with(dst, lambda tmp: onnx.save(converted, str(tmp)))
    parity = measure_parity(src, dst, parity_pixels) if parity_pixels is not None else None
    casts = sum(n.op_type == "Cast" for n in converted.graph.node)
    return CastReport(
        src=str(src), dst=str(dst), converter="onnxruntime.transformers.float16",
        nodes_before=len(model.graph.node), nodes_after=len(converted.graph.node),
        casts_added=casts - sum(n.op_type == "Cast" for n in model.graph.node),
        kept_fp32={op: n for op, n in kept.items() if n},
        bytes_before=src.stat().st_size, bytes_after=dst.stat().st_size, parity=parity,
    )


# --------------------------------------------------------------------------------------------------
# int8 Q/DQ


class _ArrayReader:
    """onnxruntime ``CalibrationDataReader`` over an in-memory (N, 3, H, W) float32 array.

    Duck-typed (``get_next`` / ``rewind``) so the module imports without onnxruntime.quantization;
    the quantizer only calls these two methods.
    """

    def __init__(self, input_name: str, pixels: np.ndarray, batch: int, *, static: bool) -> None:
        self._name = input_name
        # A static-batch model cannot take a ragged tail, and padding would add zeros to the
        # ranges: drop it. A dynamic-batch model gets it as a smaller last batch.
        stop = len(pixels) - batch + 1 if static else len(pixels)
        self._chunks = [pixels[i:i + batch] for i in range(0, max(stop, 0), batch)]
        self.images = sum(len(c) for c in self._chunks)
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._chunks):
            return None
        self._i += 1
        return {self._name: np.ascontiguousarray(self._chunks[self._i - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self._i = 0


def quantize_qdq(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    *,
    method: CalibMethod = "minmax",
    per_channel: bool = True,
    op_types: Sequence[str] = DEFAULT_QUANT_OPS,
    quantize_attention: bool = False,
    parity_pixels: np.ndarray | None = None,
) -> QdqReport:
    """Write ``src`` with symmetric int8 Q/DQ nodes to ``dst`` (atomically).

    ``calibration`` is the float32 (N, 3, H, W) calibration set (``load_array`` / ``load_npz``),
    preprocessed as for inference. Settings, and why (TensorRT's explicit quantization):

    * activations and weights QInt8, symmetric (zero point 0: TensorRT rejects other zero points);
      full 8-bit range (no ``reduce_range``, which only helps old x86 CPUs);
    * weights per output channel when ``per_channel`` (axis 1 of a MatMul's (K, N) weight), per
      tensor otherwise; activations always per tensor;
    * Q/DQ only on op *inputs* (no output Q/DQ) and biases left in float, the placement TensorRT
      fuses into int8 GEMMs with float bias/epilogue;
    * LayerNormalization and Softmax never quantized;
    * the two attention MatMuls (Q·K^T and attn·V, activation x activation) are left in float
      unless ``quantize_attention``: the softmax output lies in [0, 1], so symmetric int8 wastes
      half its range, and at ViT sizes these products are a small share of the FLOPs.

    onnxruntime's ``quant_pre_process`` (symbolic shape inference and basic, standard-op graph
    optimisation) runs first, as onnxruntime recommends for static quantization.
    """
    import onnx

    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise MissingDependencyError(
            "onnxruntime's quantization tools are needed for int8 Q/DQ; pip install onnxruntime"
        ) from None
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ExportError(
            f"calibration method {method!r} is not supported; use one of {', '.join(methods)}"
        )
    model = _load(src)
    input_name, static_batch, chw = _input_info(model, src)
    calibration = np.asarray(calibration)
    if calibration.ndim != 4 or calibration.shape[1:] != chw or len(calibration) == 0:
        raise ExportError(
            f"calibration pixels are {calibration.dtype} {calibration.shape}, but {src.name} "
            f"takes (N, {', '.join(map(str, chw))}) with N >= 1; rebuild the calibration set at "
            "the model's input size"
        )
    reader = _ArrayReader(input_name, calibration, static_batch or CALIB_BATCH,
                          static=static_batch is not None)
    if reader.images == 0:
        raise ExportError(
            f"{len(calibration)} calibration images are fewer than {src.name}'s static batch "
            f"{static_batch}; use at least {static_batch} images or export with a dynamic batch"
        )
    warns: list[str] = []
    if reader.images < MIN_VIT_CALIBRATION:
        warns.append(
            f"int8 calibration used {reader.images} images (< {MIN_VIT_CALIBRATION}); ViT "
            "activation ranges from so few images are unreliable, use 500-1000"
        )
    if reader.images < len(calibration):
        warns.append(
            f"{len(calibration) - reader.images} calibration images were left out (not a "
            f"multiple of the static batch {static_batch})"
        )
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "OpTypesToExcludeOutputQuantization": list(op_types),
        "CalibTensorRangeSymmetric": True,
    }
    with tempfile.TemporaryDirectory(prefix="xpdeploy-qdq-") as tmp_dir:
        pre = Path(tmp_dir) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as e:
            raise ExportError(
                f"onnxruntime quant_pre_process failed on {src.name}: {_first_line(e)}"
            ) from None
        pre_model = onnx.load(str(pre))
        _name_nodes(pre_model)
        onnx.save(pre_model, str(pre))
        exclude = [] if quantize_attention else _activation_matmuls(pre_model)

        cache: dict[str, Any] = {}
        if method == "entropy":
            with contextlib.redirect_stdout(io.StringIO()):
                cache["calibration_cache_path"] = _entropy_ranges(
                    pre, reader, op_types, Path(tmp_dir), methods[method]
                )

        def write(tmp: Path) -> None:
            quantize_static(
                str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(op_types), per_channel=per_channel,
                reduce_range=False, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                calibrate_method=methods[method], extra_options=extra, **cache,
            )
            onnx.checker.check_model(str(tmp))

        try:
            # The histogram calibrators print progress to stdout; the build stage logs the report.
            with contextlib.redirect_stdout(io.StringIO()):
                write_with(dst, write)
        except Exception as e:
            raise ExportError(
                f"int8 Q/DQ quantization of {src.name} failed: {_first_line(e)}"
            ) from None
    out = onnx.load(str(dst))
    zp_bad = _nonzero_zero_points(out)
    if zp_bad:
        dst.unlink(missing_ok=True)
        raise ExportError(
            f"int8 Q/DQ of {src.name} has non-zero zero points ({', '.join(zp_bad[:3])}); "
            "TensorRT needs symmetric quantization"
        )
    pairs, weight_dq, quantized = _qdq_counts(out)
    parity = measure_parity(src, dst, parity_pixels) if parity_pixels is not None else None
    kept = {op: sum(n.op_type == op for n in out.graph.node) for op in UNQUANTIZED_OPS}
    return QdqReport(
        src=str(src), dst=str(dst), method=method, per_channel=per_channel,
        calibration_images=reader.images, nodes_before=len(model.graph.node),
        nodes_after=len(out.graph.node), quantized_nodes=quantized, qdq_pairs=pairs,
        weight_dq=weight_dq, kept_float={op: n for op, n in kept.items() if n},
        parity=parity, warnings=warns,
    )


#: Entropy calibration histogram: TensorRT's own entropy calibrator uses 2048 bins searched for
#: the best 128-level threshold. quantize_static would use 128 and 128, which leaves nothing to
#: search (the threshold is always the full range, i.e. min-max).
ENTROPY_BINS, ENTROPY_QUANT_BINS = 2048, 128


def _entropy_ranges(
    model: Path, reader: _ArrayReader, op_types: Sequence[str], tmp_dir: Path, method: Any
) -> Path:
    """Entropy ranges with TensorRT's histogram settings, written as a quantize_static cache."""
    import inspect

    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise MissingDependencyError(
            "entropy calibration needs an onnxruntime whose quantize_static takes "
            "calibration_cache_path; upgrade onnxruntime, or use method minmax or percentile"
        )
    calibrator = create_calibrator(
        model, list(op_types), augmented_model_path=str(tmp_dir / "augmented.onnx"),
        calibrate_method=method,
        extra_options={"symmetric": True, "num_bins": ENTROPY_BINS,
                       "num_quantized_bins": ENTROPY_QUANT_BINS},
    )
    calibrator.collect_data(reader)
    reader.rewind()
    path = tmp_dir / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), path)
    return path


# --------------------------------------------------------------------------------------------------
# inspection and parity


def graph_precision(path: Path) -> GraphPrecision:
    """The precision an ONNX file carries, as :func:`~xpdeploy.engine.settings.plan` expects.

    "int8" when it has int8 Q/DQ nodes, "fp16" when any float initializer is float16, else
    "fp32".
    """
    model = _load(path)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == _FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def measure_parity(reference: Path, candidate: Path, pixels: np.ndarray) -> Parity:
    """Run both ONNX files in onnxruntime CPU on ``pixels`` and compare their outputs."""
    ref = _run(reference, pixels)
    out = _run(candidate, pixels)
    ref64 = ref.astype(np.float64).reshape(len(ref), -1)
    out64 = out.astype(np.float64).reshape(len(out), -1)
    norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(out64, axis=1)
    cosine = (ref64 * out64).sum(axis=1) / np.maximum(norms, 1e-30)
    return Parity(
        samples=len(ref),
        max_abs_diff=float(np.abs(ref64 - out64).max()),
        min_cosine=float(cosine.min()),
        top1_agreement=float((ref64.argmax(axis=1) == out64.argmax(axis=1)).mean()),
    )


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Outputs of ``path`` for ``pixels``; a static-batch model runs in padded chunks."""
    import onnxruntime as ort

    model = _load(path)
    input_name, static_batch, _ = _input_info(model, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No graph fusion: Q/DQ then run as exact fake quantization (int8 rounding, float math), which
    # is the arithmetic TensorRT's int8 GEMMs reproduce (int32 accumulation is exact). Fused
    # onnxruntime CPU int8 kernels add their own error (u8s8 int16 saturation on CPUs without
    # VNNI), which says nothing about the engine.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path.name}: {_first_line(e)}") from None
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    step = static_batch or len(pixels)
    outs = []
    for i in range(0, len(pixels), step):
        chunk = pixels[i:i + step]
        real = len(chunk)
        if real < step:
            chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), chunk.dtype)])
        outs.append(session.run(None, {input_name: chunk})[0][:real])
    return np.concatenate(outs)


def _load(path: Path) -> onnx.ModelProto:
    """Load an ONNX file; anything unreadable is a one-line :class:`ExportError`."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # FileNotFoundError, protobuf DecodeError, ...
        raise ExportError(
            f"cannot read ONNX file {path}: {_first_line(e)}; re-run export_onnx"
        ) from None


def _input_info(model: onnx.ModelProto, path: Path) -> tuple[str, int | None, tuple[int, ...]]:
    """(input name, static batch or None, (C, H, W)) of the model's single image input."""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    if len(inputs) != 1 or len(dims) != 4 or not all(d.dim_value > 0 for d in dims[1:]):
        raise ExportError(
            f"{path.name} must have one (N, C, H, W) input with fixed C, H, W, has "
            f"{[i.name for i in inputs]}; re-run export_onnx"
        )
    batch = dims[0].dim_value or None
    return inputs[0].name, batch, tuple(d.dim_value for d in dims[1:])


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name that shape inference can type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _check_io_float32(model: onnx.ModelProto, src: Path) -> None:
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.type.tensor_type.elem_type != _FLOAT:
            raise ExportError(
                f"fp16 cast of {src.name} changed {vi.name} to "
                f"{_type_name(vi.type.tensor_type.elem_type)}; graph I/O must stay float32"
            )


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows its producers (stable otherwise).

    Names not produced by a node (graph inputs, initializers, outer scope) count as available.
    Our ViT graphs have no subgraphs, so implicit subgraph inputs are not tracked.
    """
    nodes = list(graph.node)
    produced = {o for n in nodes for o in n.output if o}
    ready = {i for n in nodes for i in n.input if i and i not in produced}
    done: list[int] = []
    placed = [False] * len(nodes)
    progress = True
    while progress and len(done) < len(nodes):
        progress = False
        for k, node in enumerate(nodes):
            if not placed[k] and all(not i or i in ready for i in node.input):
                placed[k] = True
                done.append(k)
                ready.update(node.output)
                progress = True
    if len(done) < len(nodes):
        raise ExportError("the fp16 graph has a cycle or a dangling input; report it with the file")
    ordered = [nodes[k] for k in done]
    del graph.node[:]
    graph.node.extend(ordered)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name: the quantizer's node exclusion works by name."""
    used = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_xp{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMuls with no constant input (attention's Q·K^T and attn·V)."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def _initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def _nonzero_zero_points(model: onnx.ModelProto) -> list[str]:
    """Names of Q/DQ nodes whose zero point is not all zeros (or not int8)."""
    arrays = _initializer_arrays(model)
    bad = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = arrays.get(node.input[2])
            if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
                bad.append(node.name or node.output[0])
    return bad


def _qdq_counts(model: onnx.ModelProto) -> tuple[int, int, dict[str, int]]:
    """(activation Q->DQ pairs, weight DQs on int8 initializers, op type -> quantized nodes)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    pairs = sum(
        1 for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and producers.get(n.input[0]) is not None
        and producers[n.input[0]].op_type == "QuantizeLinear"
    )
    weight_dq = sum(
        1 for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) in _INT8_TYPES
    )
    quantized: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(p is not None and p.op_type == "DequantizeLinear"
               for p in (producers.get(i) for i in n.input)):
            quantized[n.op_type] = quantized.get(n.op_type, 0) + 1
    return pairs, weight_dq, quantized


def _type_name(elem_type: int | None) -> str:
    import onnx

    if not elem_type:
        return "an unknown type"
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)

