"""Timing a latency grid (``grid.json``) on a runtime: the measured latency model (torch-free).

Every block file is timed **interleaved against the full block** of its shape, in rounds
(:func:`~xpdeploy.verify.latency.measure_rounds`): its latency is the median over rounds of the
ratio of medians, times the full block's median over the whole sweep. A ratio holds still where
absolute milliseconds drift (docs/benchmarks.md, issue 17); a point whose rounds disagree by more
than ``max_spread`` is measured again (up to ``retries`` times, the steadiest kept) and, if still
unsteady, kept but marked (``stable: false``), so the table says how much of it to trust.

The original whole model is timed alone, back to back in rounds, as it runs deployed: that is
the table's absolute anchor (timed interleaved with a small block instead, it measured 20-25%
faster than alone at batch 1 on the 2-core VM: bench/latency_table_stability.py). The model
without its blocks, the smallest model and every validation model are timed against the original.
A block's own absolute scale does not matter: the calibration absorbs it. The first three
calibrate the table (module doc of :mod:`xpdeploy.latency.table`); the validation models' errors
are differences of ratios measured side by side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from xpdeploy.artifacts import LatencySetting
from xpdeploy.backends.runner import Runner
from xpdeploy.errors import BuildError, MissingDependencyError
from xpdeploy.latency.grid import TOKENS, BlockGrid
from xpdeploy.latency.table import (
    GridPoint,
    LatencyModel,
    ShapeTable,
    TableKey,
    ValidationRow,
)
from xpdeploy.progress import log, progress
from xpdeploy.runfolder import now_iso
from xpdeploy.verify.latency import Clock, RatioEstimate, measure_rounds

#: Opens the runner of one ONNX file (absolute path, input name) on the table's runtime.
RunnerOpener = Callable[[Path, str], AbstractContextManager[Runner]]


@dataclass(frozen=True)
class TimingSettings:
    """How every figure is measured: untimed calls, timed calls over rounds, and the spread
    (half-range / median of the rounds' ratios) above which a figure is unsteady."""

    warmup: int
    iters: int
    rounds: int
    max_spread: float
    retries: int = 2


def measure_table(grid: BlockGrid, folder: Path, key: TableKey, open_runner: RunnerOpener,
                  timing: TimingSettings, *, seed: int = 0, clock: Clock | None = None
                  ) -> LatencyModel:
    """The latency model of ``grid`` (files relative to ``folder``) on ``open_runner``'s runtime.

    ``key``: where it holds (its batch is the batch timed). Inputs are seeded normal noise of each
    file's input shape: latency does not depend on the values.
    """
    rng = np.random.default_rng(seed)
    batch = key.batch
    kw: dict[str, object] = {"warmup": timing.warmup, "iters": timing.iters,
                             "rounds": timing.rounds}
    if clock is not None:
        kw["clock"] = clock

    total = grid_points(grid) + 3 + len(grid.validation)
    shapes: list[ShapeTable] = []
    with progress(total, f"latency table ({key.runtime}, batch {batch})") as advance, \
            contextlib.ExitStack() as stack:
        def runner(rel: str, input_name: str) -> Runner:
            return stack.enter_context(open_runner(folder / rel, input_name))

        for shape in grid.shapes:
            tokens = rng.standard_normal((batch, *shape.input_shape)).astype(np.float32)
            ref = runner(shape.reference().file, TOKENS)
            estimates: list[tuple[int, int, RatioEstimate]] = []
            ref_medians: list[float] = []
            for point in shape.points:
                with open_runner(folder / point.file, TOKENS) as r:
                    est, medians = _ratio(ref, r, tokens, batch, kw, timing)
                estimates.append((point.heads, point.mlp, est))
                ref_medians += medians
                advance(1)
            ref_ms = float(np.median(ref_medians))
            shapes.append(ShapeTable(
                blocks=shape.blocks, heads=shape.heads, mlp=shape.mlp, reference_ms=ref_ms,
                points=[GridPoint(heads=h, mlp=m, ms=e.value * ref_ms, spread=e.spread,
                                  stable=e.stable(timing.max_spread))
                        for h, m, e in estimates]))
        pixels = rng.standard_normal((batch, *grid.input_size)).astype(np.float32)
        original = runner(grid.original.file, "pixels")
        orig_est = _alone(original, pixels, batch, kw, timing)
        original_ms = orig_est.value
        advance(1)
        measured = {}
        for model in (grid.stem, grid.smallest):
            with open_runner(folder / model.file, "pixels") as r:
                est, _ = _ratio(original, r, pixels, batch, kw, timing)
            measured[model.name] = est.value * original_ms
            advance(1)
        draft = _calibrated(LatencyModel(
            key=key, measured_at=now_iso(), settings=_settings(timing), original_ms=original_ms,
            original_spread=orig_est.spread, smallest_ms=measured["smallest"],
            fixed_ms=measured["stem"], scale=1.0, per_block_ms=0.0, shapes=shapes), grid)
        rows = []
        for model in grid.validation:
            with open_runner(folder / model.file, "pixels") as r:
                est, _ = _ratio(original, r, pixels, batch, kw, timing)
            rows.append(ValidationRow(name=model.name, heads=model.heads, mlp=model.mlp,
                                      predicted_ms=draft.predict(model.heads, model.mlp),
                                      measured_ms=est.value * original_ms, spread=est.spread))
            advance(1)
    return draft.model_copy(update={"validation": rows})


def runtime_opener(setting: LatencySetting, workdir: Path) -> RunnerOpener:
    """How to open one grid file on ``setting``'s runtime. onnxruntime: a session per file
    (CPU with ``setting.threads`` intra-op threads, or CUDA); tensorrt: an engine built per file
    at ``setting.batch`` and ``setting.precision`` (in ``workdir``), run by the TensorRT runner.
    Raises :class:`MissingDependencyError` when the runtime is not installed here."""
    from xpdeploy.backends.ort_runner import OrtRunner

    if setting.runtime == "onnxruntime-cpu":
        return lambda path, name: OrtRunner(path, threads=setting.threads, input_name=name)
    if setting.runtime == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError(
                "onnxruntime has no CUDAExecutionProvider here; pip install onnxruntime-gpu on "
                "a machine with CUDA, or use runtime onnxruntime-cpu")
        return lambda path, name: OrtRunner(path, provider="CUDAExecutionProvider",
                                            input_name=name)
    return _tensorrt_opener(setting, workdir)


def _tensorrt_opener(setting: LatencySetting, workdir: Path) -> RunnerOpener:
    from xpdeploy.backends.trt_versions import import_tensorrt

    trt = import_tensorrt("latency_table")  # one clear line when TensorRT is not installed
    return _TensorRtGrid(trt, setting, workdir)


class _TensorRtGrid:
    """Opens grid files as TensorRT engines (a :data:`RunnerOpener`).

    Each ONNX file gets one engine, built as ``build_engine`` builds a deployed one
    (:func:`~xpdeploy.engine.engines.build_engines`: the table's precision, the strongly typed
    path's host cast, a static profile at the table's batch over the file's own sample shape),
    and is run by a :class:`~xpdeploy.backends.trt_runner.TrtRunner`. Plans are kept in
    ``workdir``'s engine cache under the file's digest and build settings, so a table measured
    again, or resumed after an interruption, rebuilds nothing. The runners open at one time share
    one CUDA backend: opened with the first, closed with the last.
    """

    def __init__(self, trt: ModuleType, setting: LatencySetting, workdir: Path) -> None:
        from xpdeploy.spec import BuildEngineConfig

        self._trt, self._workdir = trt, workdir
        self._cfg = BuildEngineConfig(precision=setting.precision, batch_sizes=[setting.batch])
        self._name = f"trt-{setting.precision}"
        self._backend: Any = None
        self._users = 0
        self._builds = 0

    def __call__(self, path: Path, input_name: str) -> AbstractContextManager[Runner]:
        return self._open(path, input_name)

    @contextlib.contextmanager
    def _open(self, path: Path, input_name: str) -> Iterator[Runner]:
        from xpdeploy.backends.trt_runner import TrtRunner

        with self._shared_backend() as backend:
            plan = self._plan(path, input_name, backend)
            with TrtRunner(plan, name=self._name, backend=backend,
                           trt_module=self._trt) as runner:
                yield runner

    @contextlib.contextmanager
    def _shared_backend(self) -> Iterator[Any]:
        if self._backend is None:
            from xpdeploy.backends.cuda_memory import load_backend

            self._backend = load_backend()
        self._users += 1
        try:
            yield self._backend
        finally:
            self._users -= 1
            if self._users == 0:
                backend, self._backend = self._backend, None
                backend.close()

    def _plan(self, path: Path, input_name: str, backend: Any) -> Path:
        """The plan of ``path`` (built, or found in the engine cache)."""
        from xpdeploy.engine.engines import EngineSource, build_engines
        from xpdeploy.export.graph import graph_input, load_onnx

        name, _, sample = graph_input(load_onnx(path), path)
        if name != input_name:
            raise BuildError(f"{path} takes input '{name}', the latency grid feeds it "
                             f"'{input_name}'; rerun latency_blocks")
        first = self._builds == 0
        self._builds += 1
        # The first build says which TensorRT, GPU and path; then only warnings (hundreds of
        # files would bury the progress line).
        def say(line: str) -> None:
            if first or line.lstrip().startswith("warning:"):
                log(line)

        source = EngineSource(f"{path.parent.name}_{path.stem}", str(path.resolve()), name,
                              sample)
        built = build_engines([source], self._cfg, self._workdir, self._workdir,
                              backend=backend, trt_module=self._trt, say=say)
        return self._workdir / built.engines[0].file


def _calibrated(table: LatencyModel, grid: BlockGrid) -> LatencyModel:
    """``table`` with ``scale`` and ``per_block_ms`` solved so that it predicts the original and
    the smallest model exactly (two equations, two unknowns; module doc of the table)."""
    n = table.blocks
    alone_full = sum(table.block_ms(b, h, m) for b, (h, m) in
                     enumerate(zip(grid.original.heads, grid.original.mlp, strict=True)))
    alone_small = sum(table.block_ms(b, h, m) for b, (h, m) in
                      enumerate(zip(grid.smallest.heads, grid.smallest.mlp, strict=True)))
    full, small = table.original_ms - table.fixed_ms, table.smallest_ms - table.fixed_ms
    if alone_full - alone_small > 0:
        scale = (full - small) / (alone_full - alone_small)
    else:  # one grid point per block: nothing to tell the two terms apart
        scale = full / alone_full
    return table.model_copy(update={"scale": scale,
                                    "per_block_ms": (full - scale * alone_full) / n})


def grid_points(grid: BlockGrid) -> int:
    return sum(len(s.points) for s in grid.shapes)


def _settings(timing: TimingSettings) -> dict[str, float]:
    return {"warmup": timing.warmup, "iters": timing.iters, "rounds": timing.rounds,
            "max_spread": timing.max_spread}


_T = TypeVar("_T")


def _steadiest(measure: Callable[[], tuple[RatioEstimate, _T]], timing: TimingSettings
               ) -> tuple[RatioEstimate, _T]:
    """``measure()`` again while its rounds disagree by more than ``max_spread``, up to
    ``retries`` times; the try with the smallest spread, and what it returned with it."""
    best: tuple[RatioEstimate, _T] | None = None
    for _ in range(1 + timing.retries):
        est, extra = measure()
        if best is None or est.spread < best[0].spread:
            best = (est, extra)
        if est.stable(timing.max_spread):
            break
    assert best is not None
    return best


def _alone(runner: Runner, x: np.ndarray, batch: int, kw: dict[str, object],
           timing: TimingSettings) -> RatioEstimate:
    """``runner``'s latency (ms per batch) timed alone in rounds: the median of the rounds'
    medians (the steadiest try)."""
    def once() -> tuple[RatioEstimate, None]:
        return measure_rounds([runner], x, batch, **kw).latency(0), None  # type: ignore[arg-type]

    return _steadiest(once, timing)[0]


def _ratio(a: Runner, b: Runner, x: np.ndarray, batch: int, kw: dict[str, object],
           timing: TimingSettings) -> tuple[RatioEstimate, list[float]]:
    """b / a on the same input, interleaved in rounds (the steadiest try); and a's round
    medians, ms per batch."""
    def once() -> tuple[RatioEstimate, list[float]]:
        times = measure_rounds([a, b], x, batch, **kw)  # type: ignore[arg-type]
        return times.ratio(1, 0), times.medians(0)

    return _steadiest(once, timing)
