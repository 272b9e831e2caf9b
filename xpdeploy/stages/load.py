"""``load``: build the model, resolve its preprocessing, measure it, fix the verification set."""

from __future__ import annotations

import numpy as np

from xpdeploy.artifacts import Artifact, TorchModel, VerifySet
from xpdeploy.data.sources import open_split
from xpdeploy.data.verify_set import save_verify_set, select_indices
from xpdeploy.models.arch import describe_arch, save_model
from xpdeploy.models.complexity import count_gmacs, count_params_m
from xpdeploy.models.data_config import resolve_data_config
from xpdeploy.models.factory import create_model
from xpdeploy.progress import log, progress
from xpdeploy.spec import LoadConfig, ModelConfig
from xpdeploy.stages.context import StageContext
from xpdeploy.stages.fingerprint import DataSettings
from xpdeploy.training.evaluate import evaluate_top1


class Settings(DataSettings):
    model: ModelConfig
    load: LoadConfig


def run(ctx: StageContext[Settings]) -> dict[str, Artifact]:
    import torch

    spec = ctx.settings
    torch.manual_seed(spec.seed)  # random init (models trained from scratch) is reproducible
    model = create_model(spec.model)
    data_config = resolve_data_config(model, spec.data.preprocess)
    arch = describe_arch(model, spec.model.name, spec.model.kwargs)
    val = open_split(spec.data, data_config, "val", num_classes=arch.num_classes, seed=spec.seed)

    top1 = None
    if spec.load.evaluate and not val.synthetic:
        top1 = evaluate_top1(model, val, batch_size=spec.data.batch_size,
                             workers=spec.data.workers, label="baseline")
        log(f"  baseline val top-1 {top1:.2f}% on {len(val)} images")

    idx = select_indices(val.labels, spec.data.verify_samples, spec.seed)
    # uint8 after resize and crop; normalised when read (data/image_set.py), on host and device
    _, h, w = data_config.input_size
    images = np.empty((len(idx), h, w, 3), dtype=np.uint8)
    with progress(len(idx), "verify set") as advance:
        for row, i in enumerate(idx):
            images[row] = val.eval_image(int(i))
            advance()
    verify_path = ctx.stage_dir / "verify.npz"
    save_verify_set(verify_path, images, val.labels[idx].astype(np.int64),
                    mean=data_config.mean, std=data_config.std, source=val.source,
                    synthetic=val.synthetic, class_names=list(val.class_names))
    log(f"  verify set: {len(idx)} images, {verify_path.stat().st_size / 2**20:.1f} MiB as uint8 "
        f"PNG (float32 model input: {len(idx) * h * w * 12 / 2**20:.1f} MiB)")

    arch_path, weights_path = save_model(model, arch, ctx.stage_dir)
    gmacs, params_m = count_gmacs(model, data_config.input_size), count_params_m(model)
    log(f"  {spec.model.name}: {gmacs:.4f} GMACs, {params_m:.3f} M params, "
        f"input {data_config.input_size}")
    return {
        "model": TorchModel(
            label="original",
            arch_file=ctx.rel(arch_path),
            weights_file=ctx.rel(weights_path),
            arch=arch,
            data_config=data_config,
            gmacs=gmacs,
            params_m=params_m,
            top1=top1,
            top1_samples=len(val) if top1 is not None else 0,
        ),
        "verify_set": VerifySet(
            file=ctx.rel(verify_path),
            samples=len(idx),
            num_classes=val.num_classes,
            source=val.source,
            synthetic=val.synthetic,
            class_names=list(val.class_names),
        ),
    }
