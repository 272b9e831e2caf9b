"""evaluate_candidate: speedups from interleaved rounds, their spread and the unstable marking,
with fake runners whose calls cost a scheduled number of ms on a fake clock."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.verify.fake_clock import FakeClock
from xpdeploy.artifacts import TorchModel
from xpdeploy.data.verify_set import VerifyBatch
from xpdeploy.spec import GatesConfig, VerifyConfig
from xpdeploy.verify.candidates import Candidate, GpuTimedRunner, evaluate_candidate

EVAL_BATCH = 4  # infer_all's batch size: never timed, so it never takes a scheduled cost
FIX = "rerun on a quieter machine, raise verify.iters/rounds, or set verify.threads: 1"



class ScheduledRunner:
    """Logits = the first 10 pixels of each row; a call at batch b costs the next entry of
    ``costs[b]`` (ms), so every timed call (warm-up first) has a known time."""

    def __init__(self, name: str, clock: FakeClock, costs: dict[int, list[float]]) -> None:
        self.name = name
        self.clock = clock
        self.costs = {b: list(c) for b, c in costs.items()}
        self.calls: dict[int, int] = {}

    def __enter__(self) -> ScheduledRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        b = pixels.shape[0]
        self.calls[b] = self.calls.get(b, 0) + 1
        if b != EVAL_BATCH:
            self.clock.t += self.costs[b].pop(0) / 1000.0
        return pixels.reshape(b, -1)[:, :10].astype(np.float32)


class GpuRunner(ScheduledRunner):
    """Also records a 'GPU time' per call: the call's number at its batch size (1, 2, ...)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gpu: list[tuple[int, float]] = []

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        out = super().infer(pixels)
        self.gpu.append((pixels.shape[0], float(self.calls[pixels.shape[0]])))
        return out

    def gpu_times_ms(self, batch: int | None = None) -> list[float]:
        return [t for b, t in self.gpu if batch is None or b == batch]


def _verify_batch() -> VerifyBatch:
    pixels = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    labels = pixels.reshape(4, -1)[:, :10].argmax(axis=1)  # top-1 100 %
    return VerifyBatch(pixels=pixels, labels=labels, source="fake", synthetic=False,
                       class_names=[str(i) for i in range(10)])


def _evaluate(baseline: ScheduledRunner, runner: ScheduledRunner, clock: FakeClock,
              **cfg: Any) -> Any:
    batch = _verify_batch()
    logits = batch.pixels.reshape(4, -1)[:, :10]
    source = TorchModel.model_construct(label="original", gmacs=1.26, params_m=5.7)
    cand = Candidate("cand", runner, "cand.onnx", source, "original", baseline)
    config = VerifyConfig(max_export_diff=None, gates=GatesConfig(min_speedup=1.2), **cfg)
    return evaluate_candidate(cand, batch, logits, logits, 100.0, cfg=config,
                              eval_batch_size=EVAL_BATCH, threads=1, clock=clock)


def test_speedups_come_from_rounds_and_a_spread_beyond_the_tolerance_is_unstable(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Batch 1: the candidate is 2x faster in every round (spread 0). Batch 2: the baseline drifts
    to 12 ms in the middle round, so the rounds read 2x, 3x, 2x: speedup 2.0 (the median, not the
    pooled p50 ratio), spread (3 - 2) / 2 / 2 = 25 % > 10 %: unstable, and min_speedup fails."""
    clock = FakeClock()
    warm = 50.0  # one warm-up call per runner and batch size, in round 0 only
    baseline = ScheduledRunner("base", clock, {1: [warm] + [4.0] * 6,
                                               2: [warm, 8.0, 8.0, 12.0, 12.0, 8.0, 8.0]})
    cand = ScheduledRunner("ort-cpu-fp32", clock, {1: [warm] + [2.0] * 6,
                                                   2: [warm] + [4.0] * 6})
    r = _evaluate(baseline, cand, clock, batch_sizes=[1, 2], warmup=1, iters=6, rounds=3,
                  max_spread=0.10)

    assert all(not c for c in baseline.costs.values()) and all(not c for c in cand.costs.values())
    assert r.speedup == pytest.approx({1: 2.0, 2: 2.0})
    assert r.speedup_spread[1] == pytest.approx(0.0, abs=1e-9)
    assert r.speedup_spread[2] == pytest.approx(0.25)
    assert r.unstable == [2]
    assert [s.batch for s in r.latency_ms] == [1, 2] and [s.iters for s in r.latency_ms] == [6, 6]
    assert r.latency_ms[1].p50 == pytest.approx(4.0)
    assert r.baseline_latency_ms[1].p50 == pytest.approx(8.0)  # pooled: 8, 8, 8, 8, 12, 12
    gate = next(g for g in r.gates if g.name == "min_speedup")
    assert not gate.passed and gate.value == pytest.approx(2.0)
    assert gate.detail == ("speedup 2.00x at batch 2 is unstable (rounds disagree by +-25% > "
                           f"+-10%): {FIX}")
    assert not r.passed and r.top1 == 100.0 and r.agreement == 1.0
    out = capsys.readouterr().out
    assert "timing cand vs original at batch 2 (1 threads, 3 rounds)" in out
    assert "speedup b1 2.00x +-0.0%, b2 2.00x +-25% (unstable): FAILED" in out


def test_stable_rounds_pass_the_speedup_gate(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    baseline = ScheduledRunner("base", clock, {1: [9.0, 6.0, 6.2, 6.0, 6.1]})
    cand = ScheduledRunner("ort-cpu-fp32", clock, {1: [9.0, 3.0, 3.0, 3.0, 3.0]})
    r = _evaluate(baseline, cand, clock, batch_sizes=[1], warmup=1, iters=3, rounds=2)
    # ceil(3 / 2) = 2 calls per round: medians 6.1 and 6.05 over 3 ms
    assert r.speedup[1] == pytest.approx((6.1 / 3 + 6.05 / 3) / 2)
    assert r.speedup_spread[1] == pytest.approx((6.1 - 6.05) / 3 / 2 / r.speedup[1])
    assert r.unstable == [] and r.passed and r.latency_ms[0].iters == 4
    gate = next(g for g in r.gates if g.name == "min_speedup")
    assert gate.passed and gate.detail == "speedup 2.02x >= 1.20x (batch 1)"
    assert "speedup b1 2.02x +-0.4%: passed" in capsys.readouterr().out


def test_gpu_times_are_the_timed_calls_of_every_round() -> None:
    """iters 5 in 2 rounds time ceil(5 / 2) * 2 = 6 calls; GPU stats take exactly those (not the
    last 5, which the single-round code sliced), after the warm-up and the accuracy pass."""
    clock = FakeClock()
    baseline = ScheduledRunner("base", clock, {1: [1.0] * 7})
    cand = GpuRunner("trt-fp16", clock, {1: [0.5] * 7})
    assert isinstance(cand, GpuTimedRunner)
    r = _evaluate(baseline, cand, clock, batch_sizes=[1], warmup=1, iters=5, rounds=2)
    assert cand.calls == {EVAL_BATCH: 1, 1: 7}
    assert r.gpu_latency_ms is not None and len(r.gpu_latency_ms) == 1
    gpu = r.gpu_latency_ms[0]
    assert gpu.iters == 6 and gpu.batch == 1
    # calls 2..7 at batch 1 (call 1 was the warm-up): median 4.5; the last 5 would give 5.0
    assert gpu.p50 == pytest.approx(4.5) and gpu.mean == pytest.approx(4.5)
