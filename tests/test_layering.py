"""Dependencies point down: no module imports a package of a higher layer (docs/architecture.md
section 3). Every import counts, also those inside functions (lazy imports are still edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import xpdeploy

#: Low to high. A unit may import its own layer's units only where listed in SAME_LAYER_ORDER.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "fileio", "distributed", "progress", "spec", "artifacts", "figures",
     "logits", "runfolder", "summary"),
    ("data", "models", "backends", "latency"),
    ("training", "prune", "xpruner", "export", "environment"),
    ("engine",),
    ("verify",),
    ("report", "bundle"),
    ("stages",),
    ("pipeline", "device_run"),
    ("cli", "__main__"),
)
#: Imports allowed within a layer: (importer, imported); anything else across units of one layer
#: is an edge to review.
SAME_LAYER = {
    ("artifacts", "fileio"), ("figures", "fileio"), ("logits", "errors"), ("spec", "errors"),
    ("distributed", "errors"), ("progress", "distributed"), ("runfolder", "__init__"),
    ("runfolder", "artifacts"), ("runfolder", "errors"), ("runfolder", "fileio"),
    ("runfolder", "spec"), ("summary", "errors"), ("summary", "runfolder"),
    ("backends", "models"), ("prune", "training"), ("export", "prune"), ("xpruner", "prune"),
    ("xpruner", "training"),
    ("pipeline", "stages"), ("device_run", "pipeline"), ("report", "verify"),
    ("cli", "__init__"), ("__main__", "cli"),
}
PACKAGE = Path(xpdeploy.__file__).parent


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__version__" else "__init__"


def import_edges() -> set[tuple[str, str, str]]:
    """(importer unit, imported unit, file) for every xpdeploy import in the package."""
    edges = set()
    for file in PACKAGE.rglob("*.py"):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        src = _unit(".".join(rel.parts).removesuffix(".__init__"))
        for node in ast.walk(ast.parse(file.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if node.module == "xpdeploy" else node.module
                         for a in node.names]
            for name in names:
                if name.split(".")[0] == "xpdeploy" and _unit(name) != src:
                    edges.add((src, _unit(name), str(file.relative_to(PACKAGE))))
    return edges


def test_every_unit_has_a_layer() -> None:
    layered = {u for layer in LAYERS for u in layer}
    units = {_unit(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                   .removesuffix(".__init__")) for p in PACKAGE.rglob("*.py")}
    assert units <= layered, f"give these a layer in LAYERS: {sorted(units - layered)}"


def upward(edges: set[tuple[str, str, str]]) -> list[str]:
    """The edges that point to a higher layer, or sideways without a SAME_LAYER entry."""
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    return sorted(f"{file}: {src} -> {dst}" for src, dst, file in edges
                  if level[dst] > level[src]
                  or (level[dst] == level[src] and (src, dst) not in SAME_LAYER))


def test_imports_point_down() -> None:
    found = upward(import_edges())
    assert not found, "imports that point up (or sideways, unlisted):\n" + "\n".join(found)
    # The check itself: the edges this issue removed would fail it.
    assert upward({("verify", "report", "verify/candidates.py"),
                   ("models", "prune", "models/arch.py"),
                   ("backends", "engine", "backends/trt_runner.py")}) == [
        "backends/trt_runner.py: backends -> engine", "models/arch.py: models -> prune",
        "verify/candidates.py: verify -> report"]
