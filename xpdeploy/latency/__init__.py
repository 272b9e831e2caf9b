"""Latency models of a target runtime: what a pruned model will cost, measured per block.

:mod:`~xpdeploy.latency.table` is the model (a table of measured block latencies, how it predicts
a whole model, how it is keyed and checked); :mod:`~xpdeploy.latency.cache` keeps tables across
runs. Torch-free: a device reads and writes tables without torch (docs/method.md, "Latency
budgets").
"""
