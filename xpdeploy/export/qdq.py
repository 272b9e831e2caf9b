"""Insert symmetric int8 Q/DQ nodes into an fp32 ONNX model, for TensorRT's strongly typed path.

A strongly typed network (TensorRT >= 10.12, the only mode in 11.x) takes int8 from Q/DQ nodes in
the graph, not from builder flags and an implicit calibrator. The pairs are inserted by
onnxruntime's static quantizer (``quantize_static``, ``QuantFormat.QDQ``) from the same
calibration set the weak path's implicit calibrator uses.

Why onnxruntime's quantizer rather than NVIDIA's Model Optimizer (ModelOpt): ModelOpt's ONNX PTQ
needs torch, CUDA and (for its default calibration) a GPU, none of which the host stage may assume
(this module must run on a CPU-only build box and stay torch-free). What TensorRT's explicit
quantization consumes is plain ONNX: int8 Q/DQ with zero point 0 (symmetric), per-channel weight
scales on the output-channel axis, per-tensor activation scales, Q/DQ on the *inputs* of
MatMul/Gemm/Conv and float biases. onnxruntime's QDQ output, configured as below, is exactly that;
the choice of calibrator (minmax, entropy, percentile) is the same family ModelOpt offers.
Output checks as in :mod:`xpdeploy.export.fp16`; parity runs Q/DQ unfused (exact fake quantization).
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
from xpdeploy.export.graph import first_line, graph_input, load_onnx
from xpdeploy.export.parity import Parity, measure_parity
from xpdeploy.fileio import write_with

if TYPE_CHECKING:
    import onnx

CalibMethod = Literal["minmax", "entropy", "percentile"]

#: Ops whose inputs get Q/DQ in :func:`quantize_qdq`: the GEMM-like ops TensorRT runs in int8.
DEFAULT_QUANT_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
#: Ops never quantized; reported as kept in float (TensorRT keeps them in fp32/fp16).
UNQUANTIZED_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
#: Below this many calibration images the int8 ranges of a ViT are unreliable (activation outliers
#: in the MLP and attention are rare; TensorRT and ModelOpt guides use 500-1000 images).
MIN_VIT_CALIBRATION = 500
#: Images per calibration forward pass when the model's batch axis is dynamic.
CALIB_BATCH = 32

_INT8_TYPES = (3,)  # onnx.TensorProto.INT8


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
    model = load_onnx(src)
    input_name, static_batch, chw = graph_input(model, src)
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
                f"onnxruntime quant_pre_process failed on {src.name}: {first_line(e)}"
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
                f"int8 Q/DQ quantization of {src.name} failed: {first_line(e)}"
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

