"""The ``precision: best`` choice, the verdict it implies, and the batch an engine runs at."""

from __future__ import annotations

from typing import Any

from tests.report import candidate
from xpdeploy.artifacts import CandidateResult, EngineSet, TrtEngine
from xpdeploy.verify.accelerators import choose_precisions, fixed_batch, verdict


def engine(source: str, precision: str, batch: str = "b1", lo: int = 1, hi: int = 1) -> TrtEngine:
    label = f"{precision}-{batch}"
    return TrtEngine(name=f"{source}.{label}", source=source, onnx_file=f"{source}.onnx",
                     graph_file=f"{source}.onnx", precision=precision,  # type: ignore[arg-type]
                     label=label, build_path="weak", file=f"e/{source}.{label}.plan",
                     batch_min=lo, batch_opt=lo, batch_max=hi, cache_hit=False, build_s=1.0)


def result(e: TrtEngine, p50: float, *, accurate: bool = True) -> CandidateResult:
    c = candidate(f"{e.name}.plan", f"trt-{e.precision}", top1=72.4 if accurate else 60.0,
                  agreement=0.995 if accurate else 0.8, max_abs_diff=1e-4, cosine=0.9999,
                  p50={1: p50}, base_p50={1: p50 * 2}, synthetic=False)
    return c.model_copy(update={"artifact": e.file})


def engine_set(*engines: TrtEngine, precision: str = "best") -> EngineSet:
    return EngineSet(deferred=False, reason="built here", precision=precision,
                     engines=list(engines))


def test_the_faster_passing_engine_is_kept() -> None:
    fp16, int8 = engine("pruned", "fp16"), engine("pruned", "int8")
    results = [result(fp16, 2.0), result(int8, 1.5)]
    (choice,) = choose_precisions(engine_set(fp16, int8), results)
    assert choice.kept == "pruned.int8-b1.plan" and choice.dropped == ["pruned.fp16-b1.plan"]
    assert choice.p50_ms == {"pruned.fp16-b1.plan": 2.0, "pruned.int8-b1.plan": 1.5}
    assert choice.reason.startswith("kept pruned.int8-b1.plan (trt-int8, p50 1.500 ms) over")
    assert verdict(results, [choice])


def test_an_inaccurate_int8_engine_is_dropped_even_when_faster() -> None:
    fp16, int8 = engine("pruned", "fp16"), engine("pruned", "int8")
    results = [result(fp16, 2.0), result(int8, 1.0, accurate=False)]
    assert not results[1].passed
    (choice,) = choose_precisions(engine_set(fp16, int8), results)
    assert choice.kept == "pruned.fp16-b1.plan"
    assert "pruned.int8-b1.plan 1.000 ms (failed its gates)" in choice.reason
    assert verdict(results, [choice])  # the dropped engine's failure does not fail the run


def test_when_no_engine_passes_every_failure_counts() -> None:
    fp16, int8 = engine("pruned", "fp16"), engine("pruned", "int8")
    results = [result(fp16, 2.0, accurate=False), result(int8, 1.0, accurate=False)]
    (choice,) = choose_precisions(engine_set(fp16, int8), results)
    assert choice.kept is None and "no engine passed" in choice.reason
    assert not verdict(results, [choice])


def test_groups_are_per_model_and_batch_and_only_for_best() -> None:
    engines = [engine(s, p, f"b{b}", b, b) for s in ("original", "pruned") for b in (1, 8)
               for p in ("fp16", "int8")]
    results = [result(e, 1.0 + i) for i, e in enumerate(engines)]
    choices = choose_precisions(engine_set(*engines), results)
    assert [(c.source, c.batch, c.kept) for c in choices] == [
        ("original", "b1", "original.fp16-b1.plan"), ("original", "b8", "original.fp16-b8.plan"),
        ("pruned", "b1", "pruned.fp16-b1.plan"), ("pruned", "b8", "pruned.fp16-b8.plan")]
    assert choose_precisions(engine_set(*engines, precision="fp16"), results) == []


def test_fixed_batch_of_static_and_dynamic_engines() -> None:
    static = engine("pruned", "fp16", "b8", 8, 8)
    assert fixed_batch(static, [1, 4], 64) == 8
    dynamic: Any = engine("pruned", "fp16", "b1-8-64", 1, 64)
    assert fixed_batch(dynamic, [1, 4], 64) is None  # every verify batch fits the profile
    assert fixed_batch(dynamic, [1, 128], 64) == 1  # batch_opt when one does not
