"""Tests of xpdeploy.data; ``CFG`` is the preprocessing most of them use."""

from xpdeploy.artifacts import DataConfig

CFG = DataConfig(
    input_size=(3, 32, 32),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    interpolation="bicubic",
    crop_pct=1.0,
)
