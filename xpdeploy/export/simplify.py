"""onnxsim simplification (constant folding, shape inference, redundant-op removal)."""

from __future__ import annotations

from pathlib import Path

from xpdeploy.errors import ExportError, MissingDependencyError
from xpdeploy.fileio import write_with


def simplify_onnx(src: Path, dst: Path, *, skip_fuse_bn: bool = False) -> None:
    """Simplify ``src`` into ``dst`` (atomically); onnxsim's own output check must pass."""
    import onnx

    try:
        import onnxsim
    except ImportError:
        raise MissingDependencyError(
            "onnxsim is not installed; pip install onnxsim, or remove 'simplify' from stages"
        ) from None
    model = onnx.load(str(src))
    try:
        simplified, ok = onnxsim.simplify(model, skip_fuse_bn=skip_fuse_bn)
    except Exception as e:  # onnxsim raises plain RuntimeError/ValueError from its C++ core
        raise ExportError(f"onnxsim failed on {src}: {str(e).splitlines()[0][:200]}") from None
    if not ok:
        raise ExportError(f"onnxsim's own check of the simplified {src.name} failed")
    write_with(dst, lambda tmp: onnx.save(simplified, str(tmp)))
