"""ONNX operators that TensorRT's ONNX parser reads only from some release on.

Why a table of our own: the parser lives on the device, so a graph it cannot read would fail there,
late and with a parser message. Checking the op types first (on the host after ``simplify``, and on
the device against the installed TensorRT before parsing) turns that into one line with the fix.

Source: the operator tables of onnx-tensorrt's ``docs/operators.md`` for TensorRT 8.4 and 8.5
(JetPack 5.0 / 5.1). The versions below are the first release whose table we found listing the op;
nothing here has been run on a device (docs/tensorrt.md). Torch writes ``LayerNormalization`` from
opset 17 on, and the decomposed ReduceMean/Sub/Pow/Sqrt/Div form below that, so a JetPack 5 target
exports at opset 16.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

#: op type -> the first TensorRT (major, minor) whose ONNX parser reads it. LayerNormalization:
#: marked unsupported in 8.5's table, supported in the 9.x/10.x tables (8.6 added the
#: normalization layer it maps to). The others: unsupported in 8.4's table, supported in 8.5's.
FIRST_PARSED_IN: dict[str, tuple[int, int]] = {
    "LayerNormalization": (8, 6),
    "Mod": (8, 5),
    "NonZero": (8, 5),
    "OneHot": (8, 5),
    "Reciprocal": (8, 5),
    "Shrink": (8, 5),
    "RoiAlign": (8, 5),
    "MeanVarianceNormalization": (8, 5),
}

#: Marked unsupported in TensorRT 8.5's table (later tables not checked op by op): reported for
#: any version, since a graph of a vision transformer should never contain them.
NOT_PARSED: frozenset[str] = frozenset({
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger",
    "DFT", "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "IsInf",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement",
    "QLinearConv", "QLinearMatMul", "STFT", "SequenceAt", "SequenceConstruct", "SequenceEmpty",
    "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
})

#: JetPack 5.1's TensorRT, the oldest the device image supports (docker/README.md).
JETPACK5_TENSORRT = (8, 5)


def op_types(path: Path) -> Counter[str]:
    """How many nodes of each op type the main graph of ``path`` has (subgraphs included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:  # If / Loop / Scan bodies
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return counts


def parser_concerns(ops: Counter[str], tensorrt: tuple[int, ...] | None) -> list[str]:
    """One sentence per op type that TensorRT ``tensorrt`` (major, minor, ...) cannot parse.

    ``tensorrt=None``: the version is not known (the host), so every op that some supported
    release cannot parse is listed with the release it needs.
    """
    out = []
    for op in sorted(ops):
        first = FIRST_PARSED_IN.get(op)
        if first is not None and (tensorrt is None or tuple(tensorrt[:2]) < first):
            fix = (" (export with export_onnx.opset: 16 for JetPack 5)"
                   if op == "LayerNormalization" else "")
            out.append(f"{op} x{ops[op]} needs TensorRT >= {first[0]}.{first[1]}{fix}")
        elif op in NOT_PARSED:
            out.append(f"{op} x{ops[op]} is not parsed by TensorRT (8.5's operator table)")
    return out


def tensorrt_notes(path: Path, logged: list[str] | None = None) -> list[str]:
    """:func:`parser_concerns` of an ONNX file for an unknown TensorRT, each logged as a note
    unless it is in ``logged`` (the notes of the file this one was simplified from).

    A note, not an error: the host does not know the device's release (JetPack 6 parses what
    JetPack 5 cannot). The device's build_engine checks again against the installed release.
    """
    from xpdeploy.progress import log

    notes = parser_concerns(op_types(path), None)
    for note in notes:
        if note not in (logged or []):
            log(f"  note: {path.name}: {note}")
    return notes
