"""``grid.json``: what ``latency_blocks`` exported and ``latency_table`` times (torch-free).

Per distinct block shape (blocks that compute the same thing on the same token tensor share one),
the ONNX file of the block at every grid point (heads kept from 1 to all, MLP widths every
``mlp_step`` neurons and the full width); the whole original model; and a few whole pruned models
of different shapes (``validation``) whose measured latency checks the table's prediction; and the
model without its blocks (``stem``, the part pruning does not touch) and the model with every block
at its smallest grid point (``smallest``), which calibrate the table. Paths
are relative to the folder that holds ``grid.json``, so a bundle can carry the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xpdeploy.latency.table import LatencyTableError

GRID_FORMAT = 1
GRID_JSON = "grid.json"
#: Input name of every block ONNX file (a token tensor, not pixels).
TOKENS = "tokens"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridFile(_Frozen):
    heads: int
    mlp: int
    file: str


class GridShape(_Frozen):
    """One block shape: its blocks, its unpruned size, one sample's token shape, its files."""

    blocks: list[int]
    heads: int
    mlp: int
    input_shape: list[int] = Field(description="one sample's input of the block (no batch)")
    points: list[GridFile]

    def reference(self) -> GridFile:
        """The full block: what every point is timed against."""
        return next(p for p in self.points if (p.heads, p.mlp) == (self.heads, self.mlp))


class GridModel(_Frozen):
    """A whole model (the original, or a pruned one to validate the table with)."""

    name: str
    heads: list[int]
    mlp: list[int]
    file: str


class BlockGrid(_Frozen):
    """The content of ``grid.json`` (module doc)."""

    format: int = GRID_FORMAT
    arch_name: str
    arch_digest: str
    input_size: list[int] = Field(description="one image: channels, height, width")
    mlp_step: int
    shapes: list[GridShape]
    original: GridModel
    stem: GridModel = Field(description="the model without its blocks: what pruning leaves")
    smallest: GridModel = Field(description="every block at its smallest grid point")
    validation: list[GridModel] = Field(default_factory=list)

    def files(self) -> list[str]:
        """Every ONNX file, relative to the grid's folder."""
        return [*(p.file for s in self.shapes for p in s.points), self.original.file,
                self.stem.file, self.smallest.file, *(m.file for m in self.validation)]

    def write(self, folder: Path) -> Path:
        from xpdeploy.fileio import write_json_atomic

        path = folder / GRID_JSON
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, path: Path) -> BlockGrid:
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise LatencyTableError(f"{path} does not exist; run the latency_blocks stage") \
                from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
            raise LatencyTableError(f"{path} is not a grid.json of the latency_blocks stage "
                                    f"({type(e).__name__}); rerun latency_blocks") from None
