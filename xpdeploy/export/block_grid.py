"""ONNX files of every transformer block at every (heads kept, MLP width), for a latency table.

Each grid point is the real block with the surgery the planner's plans get
(:func:`~xpdeploy.prune.surgery.prune_block`, first units kept: which units does not change the
cost), exported by the same exporter as the deployed model, with a dynamic batch axis so one file
serves every batch size, then simplified as the deployed file is. Blocks that compute the same
thing on the same token shape (a ViT: all of them; a Swin: those of one stage with the same shift)
share one set of files. The whole original model and ``validation`` whole pruned models of
seeded, different shapes are exported too: measured, they say how well the table predicts; and
the model without its blocks, whose latency is the part no plan changes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xpdeploy.export.onnx_export import export_onnx
from xpdeploy.export.simplify import simplify_onnx
from xpdeploy.latency.grid import TOKENS, BlockGrid, GridFile, GridModel, GridShape
from xpdeploy.models.block_io import block_inputs, without_blocks
from xpdeploy.models.unit_sites import UnitSite, unit_sites
from xpdeploy.progress import progress
from xpdeploy.prune.allocation import kept_counts
from xpdeploy.prune.surgery import prune_block, prune_model
from xpdeploy.prune.unit_scores import KeepSets

if TYPE_CHECKING:
    from torch import nn

#: Batch the files are traced at (>1 so the batch axis stays dynamic).
TRACE_BATCH = 2


def shape_key(site: UnitSite, tokens: tuple[int, ...]) -> tuple[object, ...]:
    """What makes two blocks cost the same: class, token shape, heads, head width, MLP width,
    and a Swin block's window and shift."""
    block = site.block
    return (type(block).__name__, tokens, site.heads, site.head_dim, site.mlp_hidden,
            str(getattr(block, "window_size", None)), str(getattr(block, "shift_size", None)))


def validation_plans(heads: list[int], mlp: list[int], count: int, step: int, seed: int
                     ) -> list[tuple[list[int], list[int]]]:
    """``count`` (heads, widths) plans of different shapes: uniform cuts to 3/4, 1/2 and 1/4,
    then seeded random per-block cuts (uneven, as the allocator's plans are)."""
    rng = np.random.default_rng(seed)
    plans: list[tuple[list[int], list[int]]] = []

    def width(m: int, frac: float) -> int:
        return min(m, max(step, round(m * frac / step) * step))

    for frac in (0.75, 0.5, 0.25):
        plans.append(([max(1, round(h * frac)) for h in heads],
                      [width(m, frac) for m in mlp]))
    while len(plans) < count:
        plans.append(([int(rng.integers(1, h + 1)) for h in heads],
                      [int(rng.choice(kept_counts(m, step, step))) for m in mlp]))
    return plans[:count]


def export_block_grid(model: nn.Module, input_size: tuple[int, int, int], folder: Path, *,
                      arch_name: str, arch_digest: str, mlp_step: int, validation_models: int,
                      seed: int, opset: int) -> BlockGrid:
    """Export the grid of ``model`` into ``folder`` and write ``grid.json`` there (module doc)."""
    import torch

    model = model.eval()
    sites = unit_sites(model)
    with torch.inference_mode():
        _, inputs = block_inputs(model, torch.zeros(1, *input_size))
    groups: dict[tuple[object, ...], list[int]] = {}
    for site in sites:
        groups.setdefault(shape_key(site, tuple(inputs[site.index].shape[1:])), []).append(
            site.index)
    points = [(s, h, m) for s, blocks in enumerate(groups.values())
              for h in range(1, sites[blocks[0]].heads + 1)
              for m in kept_counts(sites[blocks[0]].mlp_hidden, mlp_step, mlp_step)]
    heads = [s.heads for s in sites]
    mlp = [s.mlp_hidden for s in sites]
    plans = validation_plans(heads, mlp, validation_models, mlp_step, seed)
    files: dict[int, list[GridFile]] = {s: [] for s in range(len(groups))}
    (folder / "blocks").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    smallest = ([1] * len(heads), [min(m, mlp_step) for m in mlp])
    with progress(len(points) + 3 + len(plans), "latency grid export") as advance:
        for s, h, m in points:
            site = sites[list(groups.values())[s][0]]
            block = copy.deepcopy(site.block)
            prune_block(dataclasses.replace(site, block=block, attn=block.attn, mlp=block.mlp),
                        np.arange(h), np.arange(m))
            rel = f"blocks/s{s}_h{h}_m{m}.onnx"
            _export(block, folder / rel, tuple(inputs[site.index].shape[1:]), opset, TOKENS)
            files[s].append(GridFile(heads=h, mlp=m, file=rel))
            advance(1)
        _export(model, folder / "models/original.onnx", input_size, opset, "pixels")
        _export(without_blocks(model), folder / "models/stem.onnx", input_size, opset, "pixels")
        advance(2)
        models = []
        for i, (ph, pm) in enumerate([smallest, *plans]):
            name = f"validation_{i - 1}" if i else "smallest"
            pruned = prune_model(copy.deepcopy(model), KeepSets(
                heads=[np.arange(k) for k in ph], neurons=[np.arange(k) for k in pm]))
            rel = f"models/{name}.onnx"
            _export(pruned, folder / rel, input_size, opset, "pixels")
            models.append(GridModel(name=name, heads=ph, mlp=pm, file=rel))
            advance(1)
    shapes = [GridShape(blocks=blocks, heads=sites[blocks[0]].heads,
                        mlp=sites[blocks[0]].mlp_hidden,
                        input_shape=[int(d) for d in inputs[blocks[0]].shape[1:]],
                        points=files[s])
              for s, blocks in enumerate(groups.values())]
    grid = BlockGrid(arch_name=arch_name, arch_digest=arch_digest, input_size=list(input_size),
                     mlp_step=mlp_step, shapes=shapes,
                     original=GridModel(name="original", heads=heads, mlp=mlp,
                                        file="models/original.onnx"),
                     stem=GridModel(name="stem", heads=[], mlp=[], file="models/stem.onnx"),
                     smallest=models[0], validation=models[1:])
    grid.write(folder)
    return grid


def _export(module: nn.Module, path: Path, input_size: tuple[int, ...], opset: int,
            input_name: str) -> None:
    """Export then simplify in place: the table times what a deployment runs (simplified)."""
    raw = path.with_suffix(".raw.onnx")
    export_onnx(module, raw, input_size=input_size, opset=opset, trace_batch=TRACE_BATCH,
                dynamic_batch=True, input_name=input_name,
                output_name="logits" if input_name == "pixels" else "tokens_out")
    simplify_onnx(raw, path)
    raw.unlink()
