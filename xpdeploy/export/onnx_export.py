"""Export a timm ViT to ONNX with the attention as plain MatMul/Softmax/MatMul.

Why the TorchScript exporter (``dynamo=False``): it needs no extra package (the dynamo exporter
needs onnxscript), and with timm's fused attention switched off it writes attention as plain
MatMul/Softmax/MatMul, which every TensorRT parser (JetPack 5 and 6 included) reads and fuses.
The original and every pruned model go through this same path, so latency ratios between them
measure pruning, not a difference of export paths (docs/architecture.md section 6).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from xpdeploy.errors import ExportError
from xpdeploy.fileio import write_with
from xpdeploy.models.attention import plain_attention

if TYPE_CHECKING:
    from torch import nn

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    input_size: tuple[int, ...],
    opset: int,
    trace_batch: int,
    dynamic_batch: bool,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> None:
    """Trace ``model`` at ``trace_batch`` and write a checked ONNX file to ``path`` atomically.

    ``input_size``: one sample's shape (a model: channels, height, width; one transformer block
    alone: its token tensor, named e.g. ``tokens``).
    """
    import onnx
    import torch

    example = torch.zeros(trace_batch, *input_size)
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None

    def write(tmp: Path) -> None:
        with plain_attention(model), torch.inference_mode(), warnings.catch_warnings():
            # Tracer warnings about Python scalars in timm's shape checks are expected and
            # harmless at a fixed input size; the deprecation notice of the exporter is ours.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(tmp), full_check=True)

    try:
        write_with(path, write)
    except (RuntimeError, onnx.checker.ValidationError, torch.onnx.errors.OnnxExporterError) as e:
        raise ExportError(
            f"ONNX export at opset {opset} failed: {str(e).splitlines()[0][:200]}; try another "
            "export_onnx.opset (17 is the default that JetPack's TensorRT reads)"
        ) from None


def count_nodes(path: Path) -> int:
    """Number of nodes in the main graph of an ONNX file."""
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
