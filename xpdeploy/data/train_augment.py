"""Training augmentation for ``train`` / ``finetune``, seeded per draw.

**Why per draw.** Every sample the training loop asks for comes with its own ``draw_seed`` (the
sampler derives it from the run seed, the epoch and the position in the epoch), and every random
number used to augment that sample comes from that seed alone. The augmented pixels therefore do
not depend on which DataLoader worker, which rank or which process drew them, nor on what was drawn
before: a run is exactly reproducible with any number of workers and ranks, and a run resumed from
a mid-epoch checkpoint sees the same pixels the uninterrupted run would have seen.

The timm / torchvision transforms used here draw from the *global* generators (Python's ``random``
for RandAugment, the random resized crop and random erasing; numpy's for RandAugment's op choice
and mixup; torch's CPU generator for the flip and the erased pixels), so :func:`seeded_draw`
seeds all three for the duration of one draw and puts their previous states back afterwards.

Two levels (:func:`needs_images` tells which one a config uses):

* **pixels**: ``hflip`` and ``crop_padding`` on the cached preprocessed array
  (:func:`xpdeploy.data.augment.augment_batch` on a batch of one), then random erasing. No image
  is decoded, so digits and synthetic data stay as fast as without augmentation.
* **image** (``rand_augment`` or ``random_resized_crop`` set; the DeiT recipe): the decoded image
  goes through timm's random resized crop (or the evaluation resize + centre crop), a horizontal
  flip, RandAugment, the same normalisation as :func:`~xpdeploy.data.preprocess.preprocess_image`,
  and random erasing, in the order of timm's ``create_transform(is_training=True)``.

Mixup / cutmix act on whole batches (:class:`BatchMixer`, in the training loop) and turn the
targets into soft labels; the loop then uses a soft-target cross entropy for every batch.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torch.utils.data import Dataset
from torchvision import transforms

from xpdeploy.data.augment import augment_batch
from xpdeploy.data.preprocess import eval_geometry, normalize
from xpdeploy.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

    from xpdeploy.artifacts import DataConfig
    from xpdeploy.data.sources import SourceSplit
    from xpdeploy.spec import AugmentConfig

#: Aspect-ratio range (width / height) of the random resized crop: timm's and DeiT's default.
RRC_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
#: RandAugment's largest translation as a share of the shorter image side (timm's create_transform).
TRANSLATE_SHARE = 0.45


# --------------------------------------------------------------------------------------------------
# Seeding


def _draw_seeds(seed: int) -> list[np.random.SeedSequence]:
    """(Python, numpy global, torch, explicit Generator) seeds of one draw, in that order."""
    return np.random.SeedSequence(seed).spawn(4)


def draw_generator(seed: int) -> np.random.Generator:
    """The explicit generator :func:`seeded_draw` hands its block, without touching the global
    generators: enough for draws that use numpy only (flip and crop)."""
    return np.random.default_rng(_draw_seeds(seed)[3])


@contextmanager
def seeded_draw(seed: int) -> Iterator[np.random.Generator]:
    """Seed Python's ``random``, numpy's global RNG and torch's CPU RNG from ``seed`` for one draw.

    ``seed`` is any non-negative int (no upper bound). Each generator gets its own 64- or 128-bit
    seed derived through numpy's ``SeedSequence``, so the three streams are unrelated to each other
    and a seed above 2**32 (numpy's legacy limit) is fine. The block also receives a fresh
    ``np.random.Generator`` from the same seed, for code that takes an explicit generator.

    On exit, normally or by an exception, the three global states are restored, so a draw leaves no
    trace: the caller's own random stream (e.g. a DataLoader worker's) continues as if it had not
    happened. Only torch's *CPU* generator is touched: ``torch.manual_seed`` would also reseed every
    initialised GPU, changing the GPU stream (dropout, drop path) of the training process.

    Not thread-safe (the generators are process-wide); DataLoader workers are processes, fine.
    """
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"a draw seed must be a non-negative int, got {seed}")
    py_seq, np_seq, torch_seq, gen_seq = _draw_seeds(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    try:
        random.seed(int(py_seq.generate_state(1, dtype=np.uint64)[0]))
        np.random.seed(np_seq.generate_state(4))  # 4 x uint32: the legacy RNG's array seed
        torch.default_generator.manual_seed(int(torch_seq.generate_state(1, dtype=np.uint64)[0]))
        yield np.random.default_rng(gen_seq)  # = draw_generator(seed)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


# --------------------------------------------------------------------------------------------------
# Config queries


def needs_images(cfg: AugmentConfig) -> bool:
    """True when augmentation works on the decoded image (RandAugment or random resized crop)
    rather than on the cached preprocessed pixels; each sample is then decoded every epoch."""
    return cfg.rand_augment is not None or cfg.random_resized_crop is not None


def mixing_enabled(cfg: AugmentConfig) -> bool:
    """True when mixup or cutmix is on (then every target is a soft label)."""
    return cfg.mixup > 0 or cfg.cutmix > 0


def describe(cfg: AugmentConfig) -> dict[str, Any]:
    """The parts of ``cfg`` that are on, with their settings, JSON-ready ({} when none is).

    ``level`` says where the per-image part works: ``"image"`` (decoded image, see
    :func:`needs_images`) or ``"pixels"`` (cached preprocessed array); absent when no per-image
    part is on. ``mix_prob`` and ``mix_switch_prob`` appear only when they matter.
    """
    out: dict[str, Any] = {}
    if cfg.random_resized_crop is not None:
        out["random_resized_crop"] = list(cfg.random_resized_crop)
    if cfg.hflip:
        out["hflip"] = True
    if cfg.crop_padding:
        out["crop_padding"] = cfg.crop_padding
    if cfg.rand_augment is not None:
        out["rand_augment"] = cfg.rand_augment
    if cfg.random_erasing > 0:
        out["random_erasing"] = cfg.random_erasing
    if out:
        out["level"] = "image" if needs_images(cfg) else "pixels"
    if cfg.mixup > 0:
        out["mixup"] = cfg.mixup
    if cfg.cutmix > 0:
        out["cutmix"] = cfg.cutmix
    if mixing_enabled(cfg):
        out["mix_prob"] = cfg.mix_prob
        if cfg.mixup > 0 and cfg.cutmix > 0:
            out["mix_switch_prob"] = cfg.mix_switch_prob
    return out


# --------------------------------------------------------------------------------------------------
# Per-image augmentation


def _rand_augment(spec: str, data_config: DataConfig) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment with the hyper-parameters timm's ``create_transform`` would give it.

    ``img_mean`` (the fill of rotated / sheared / translated-in areas) is the data mean as 0..255
    RGB, the largest translation is 45 % of the shorter side in pixels, and the resampling filter
    is the config's interpolation (timm picks one at random when none is given).
    """
    _, h, w = data_config.input_size
    hparams = {
        "translate_const": int(min(h, w) * TRANSLATE_SHARE),
        "img_mean": tuple(min(255, round(255 * m)) for m in data_config.mean),
        "interpolation": str_to_pil_interp(data_config.interpolation),
    }
    try:
        return rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError) as e:  # timm checks the spec with asserts
        reason = str(e) or "it must start with 'rand'"
        raise ConfigError(
            f"train.augment.rand_augment {spec!r} is not a timm RandAugment spec ({reason}); "
            "use e.g. 'rand-m9-mstd0.5-inc1' (DeiT): 'rand' then -m<magnitude>, -n<ops>, "
            "-mstd<std>, -inc<0|1>, -p<prob>"
        ) from None


def _image_transform(cfg: AugmentConfig, data_config: DataConfig) -> transforms.Compose:
    """Decoded RGB image -> augmented H x W RGB image (not yet normalised)."""
    _, h, w = data_config.input_size
    steps: list[Callable[[Image.Image], Image.Image]] = []
    if cfg.random_resized_crop is not None:
        steps.append(
            RandomResizedCropAndInterpolation(
                (h, w),
                scale=tuple(cfg.random_resized_crop),
                ratio=RRC_RATIO,
                interpolation=data_config.interpolation,
            )
        )
    else:  # the evaluation geometry, so only the other parts differ from evaluation
        steps.append(partial(eval_geometry, cfg=data_config))
    if cfg.hflip:
        steps.append(transforms.RandomHorizontalFlip(p=0.5))
    if cfg.rand_augment is not None:
        steps.append(_rand_augment(cfg.rand_augment, data_config))
    return transforms.Compose(steps)


def _draw_key(key: Any) -> tuple[int, int]:
    try:
        index, draw_seed = key
        return operator.index(index), operator.index(draw_seed)
    except (TypeError, ValueError):
        raise TypeError(
            f"AugmentedSplit is indexed by (index, draw_seed), two ints, got {key!r}; sample it "
            "with a sampler that yields such pairs"
        ) from None


class AugmentedSplit(Dataset):
    """A :class:`~xpdeploy.data.sources.SourceSplit` with training augmentation, seeded per draw.

    ``dataset[(index, draw_seed)]`` -> ``(float32 (3, H, W), int label)``: sample ``index``
    augmented with randomness from ``draw_seed`` only (see :func:`seeded_draw`), so the same key
    gives the same bytes in any process. With every part off it is ``split[index]`` unchanged.

    ``labels``, ``num_classes``, ``class_names`` and ``len()`` are the wrapped split's. Picklable,
    for DataLoader workers started with spawn.
    """

    def __init__(self, split: SourceSplit, data_config: DataConfig, cfg: AugmentConfig) -> None:
        self.split = split
        self.data_config = data_config
        self.cfg = cfg
        self.labels = split.labels
        self.num_classes = split.num_classes
        self.class_names = split.class_names
        self._image_transform = _image_transform(cfg, data_config) if needs_images(cfg) else None
        # DeiT's setting: per-pixel normal noise on the normalised tensor, one box per image.
        self._erasing = (
            RandomErasing(probability=cfg.random_erasing, mode="pixel", device="cpu")
            if cfg.random_erasing > 0
            else None
        )

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, draw_seed = _draw_key(key)
        if self._image_transform is None and self._erasing is None:
            # Only numpy draws (or none): an explicit generator suffices, and skipping the save /
            # restore of the global generators makes this as fast as the plain split (~25x).
            if not (self.cfg.hflip or self.cfg.crop_padding):
                return self.split[index]
            pixels = self._shift(self.split[index][0], draw_generator(draw_seed),
                                 hflip=self.cfg.hflip)
            return pixels, int(self.labels[index])
        with seeded_draw(draw_seed) as rng:
            if self._image_transform is not None:
                pixels = self._from_image(index, rng)
            else:
                pixels = self._shift(self.split[index][0], rng, hflip=self.cfg.hflip)
            if self._erasing is not None:
                # In place through a shared-memory view: ``pixels`` is a fresh array (splits copy
                # their cache, the other paths build a new one).
                self._erasing(torch.from_numpy(pixels))
        return pixels, int(self.labels[index])

    def _from_image(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Image level: decode, geometry + flip + RandAugment, normalise, then ``crop_padding``."""
        assert self._image_transform is not None
        image = self._image_transform(self.split.load_image(index))
        pixels = normalize(np.asarray(image), self.data_config.mean, self.data_config.std)
        # The flip already happened on the image; a padded-crop shift still applies if asked for.
        return self._shift(pixels, rng, hflip=False)

    def _shift(self, pixels: np.ndarray, rng: np.random.Generator, *, hflip: bool) -> np.ndarray:
        """Flip and/or reflect-pad + crop one (3, H, W) sample, as augment_batch does a batch."""
        return augment_batch(pixels[None], rng, hflip=hflip, crop_padding=self.cfg.crop_padding)[0]

    def __repr__(self) -> str:
        return f"AugmentedSplit({self.split!r}, augment={describe(self.cfg)})"


# --------------------------------------------------------------------------------------------------
# Batch mixing


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """int labels (N,) -> float32 (N, num_classes): one-hot with label smoothing, rows sum to 1.

    The same values timm's Mixup gives an unmixed batch (on ``1 - smoothing + smoothing / C``, off
    ``smoothing / C``), so a loop can use one soft-target loss for mixed and unmixed batches.
    """
    return mixup_target(labels, num_classes, lam=1.0, smoothing=smoothing)


class BatchMixer:
    """Mixup / cutmix on a batch (timm's ``Mixup``, mode 'batch'), seeded per batch.

    ``mixer(pixels, labels, seed)`` -> ``(pixels, targets)``: ``pixels`` (N, C, H, W) are mixed
    **in place** (as timm does, no copy of the batch) and returned; ``targets`` are float32
    (N, num_classes) soft labels with label smoothing, rows summing to 1. All draws come from
    ``seed`` (see :func:`seeded_draw`), so a resumed run mixes the same way.

    timm pairs sample i with sample N-1-i and refuses an odd N. For an odd batch (a last batch) the
    first N-1 samples are mixed and the last keeps its own image with a smoothed one-hot target:
    one unmixed sample instead of an unmixed batch. When mixing is off (both alphas 0), pixels are
    returned untouched with smoothed one-hot targets, so callers need no special case.
    """

    def __init__(
        self, cfg: AugmentConfig, *, num_classes: int, label_smoothing: float = 0.0
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._mixup = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mix_prob,
                switch_prob=cfg.mix_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixing_enabled(cfg)
            else None
        )

    @property
    def enabled(self) -> bool:
        """False when both mixup and cutmix alphas are 0 (then nothing is ever mixed)."""
        return self._mixup is not None

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Unmixed soft targets for ``labels`` with this mixer's label smoothing."""
        return soft_targets(labels, self.num_classes, self.label_smoothing)

    def __call__(
        self, pixels: torch.Tensor, labels: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(pixels)
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        even = n - n % 2
        if self._mixup is None or even == 0:
            return pixels, self.soft_targets(labels)
        with seeded_draw(seed):
            _, targets = self._mixup(pixels[:even], labels[:even])  # mixes the view in place
        if even < n:
            targets = torch.cat([targets, self.soft_targets(labels[even:])])
        return pixels, targets

    def __repr__(self) -> str:
        return f"BatchMixer(enabled={self.enabled}, num_classes={self.num_classes})"
