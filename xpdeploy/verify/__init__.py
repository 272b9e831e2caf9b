"""Compare outputs, accuracy and latency of runners; judge candidates against gates.

Torch-free on purpose: this package runs on device machines that have only numpy, onnxruntime and
TensorRT (design.md section 1).
"""

from xpdeploy.verify.compare import LogitComparison, compare_logits, top1
from xpdeploy.verify.gates import evaluate_gates
from xpdeploy.verify.latency import (
    Runner,
    latency_stats,
    make_batch,
    measure_interleaved,
    measure_latency,
)

__all__ = [
    "LogitComparison",
    "Runner",
    "compare_logits",
    "evaluate_gates",
    "latency_stats",
    "make_batch",
    "measure_interleaved",
    "measure_latency",
    "top1",
]
