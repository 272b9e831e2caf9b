"""Data: sources (image folder, digits, synthetic), the one preprocessing function, the fixed
verification set, calibration sets and augmentation.

Import the submodules; the package imports nothing, so device machines without torch can use
everything but :mod:`.sources` (torch Datasets) and :mod:`.train_augment`.
"""
