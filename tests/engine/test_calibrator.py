"""Calibration batching and the calibrator class built on a stand-in tensorrt module."""

from __future__ import annotations

import numpy as np
import pytest

from tests.engine.fake_trt import make_fake_trt
from xpdeploy.engine.calibrator import CalibrationBatches, DeviceBuffer, make_calibrator
from xpdeploy.errors import BuildError


class HostBuffer:
    """A DeviceBuffer kept in host memory, recording what it was given."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.copies: list[np.ndarray] = []

    @property
    def ptr(self) -> int:
        return 0xD000

    def copy_from_host(self, host: np.ndarray) -> None:
        assert host.flags.c_contiguous and host.dtype == np.float32 and host.nbytes == self.nbytes
        self.copies.append(host.copy())


def samples(n: int) -> np.ndarray:
    return np.arange(n * 3 * 2 * 2, dtype=np.float64).reshape(n, 3, 2, 2)


def test_batches_drop_the_last_partial_batch() -> None:
    b = CalibrationBatches(samples(10), 4)
    assert (len(b), b.count, b.dropped) == (2, 2, 2)
    out = list(b)
    assert [x.shape for x in out] == [(4, 3, 2, 2)] * 2
    assert all(x.dtype == np.float32 and x.flags.c_contiguous for x in out)
    np.testing.assert_array_equal(out[1], samples(10)[4:8])
    assert b.batch_nbytes == 4 * 3 * 2 * 2 * 4


def test_batches_errors() -> None:
    with pytest.raises(BuildError, match="fewer than one batch"):
        CalibrationBatches(samples(3), 4)
    with pytest.raises(BuildError, match=r"\(N, C, H, W\)"):
        CalibrationBatches(np.zeros((4, 3)), 2)
    with pytest.raises(BuildError, match="positive"):
        CalibrationBatches(samples(4), 0)


@pytest.mark.parametrize(("kind", "base"), [("minmax", "IInt8MinMaxCalibrator"),
                                            ("entropy2", "IInt8EntropyCalibrator2")])
def test_calibrator_serves_batches_then_none(tmp_path, kind, base) -> None:
    trt, calls = make_fake_trt()
    buffers: list[HostBuffer] = []

    def alloc(nbytes: int) -> DeviceBuffer:
        buffers.append(HostBuffer(nbytes))
        return buffers[-1]

    batches = CalibrationBatches(samples(5), 2)
    cal = make_calibrator(kind, batches, tmp_path / "cal.cache", alloc, trt_module=trt)
    assert isinstance(cal, getattr(trt, base))
    assert (f"{base}.__init__",) in calls  # the pybind11 base was initialised
    assert cal.get_batch_size() == 2
    assert cal.get_batch(["pixels"]) == [0xD000]
    assert cal.get_batch(["pixels"]) == [0xD000]
    assert cal.get_batch(["pixels"]) is None  # 5 samples, batch 2: the fifth is dropped
    assert len(buffers) == 1 and buffers[0].nbytes == batches.batch_nbytes  # one buffer reused
    np.testing.assert_array_equal(buffers[0].copies[1], samples(5)[2:4])
    assert cal.served == 2


def test_calibrator_cache_read_and_write(tmp_path) -> None:
    trt, _ = make_fake_trt()
    path = tmp_path / "sub" / "cal.cache"
    cal = make_calibrator("minmax", CalibrationBatches(samples(2), 2), path, HostBuffer,
                          trt_module=trt)
    assert cal.read_calibration_cache() is None
    cal.write_calibration_cache(memoryview(b"TRT-8601-scales"))
    assert path.read_bytes() == b"TRT-8601-scales"
    assert cal.read_calibration_cache() == b"TRT-8601-scales"


def test_calibrator_refuses_several_inputs(tmp_path) -> None:
    trt, _ = make_fake_trt()
    cal = make_calibrator("minmax", CalibrationBatches(samples(2), 2), tmp_path / "c", HostBuffer,
                          trt_module=trt)
    with pytest.raises(BuildError, match="one input"):
        cal.get_batch(["a", "b"])
