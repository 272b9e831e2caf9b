"""X-Pruner stage 1: class-wise explainability masks on heads and MLP neurons (docs/method.md).

``masks``: the mask tables (kept outside the model) and the label-gated model used to learn them;
``losses``: the sparsity and smoothness penalties; ``learn``: the mask-learning loop, its
convergence check and the masks' file format; ``plots``: the class x unit heatmaps (the
explainable view), the score distributions and the training curve.

Submodules are imported on use, so importing this package does not import torch or matplotlib.
"""
