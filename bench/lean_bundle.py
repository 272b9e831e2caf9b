"""Benchmark: the device bundle of ``pipelines/jetson_deit_tiny.yaml`` on 1,000 verification images
(issue 19), and what the device computes from it.

1. Builds an ImageNet-layout tree from the shared files: ``train/`` and ``val/`` with one folder
   per wnid of ``imagenet-classes.tsv`` (1,000), the 250 images of ``imagenet-sample-250.tar`` in
   their wnid's folder and one copy of a sample image in each otherwise empty folder. A smoke
   tree, not an accuracy figure: 750 of the 1,000 verification images are copies of one photo.
2. Runs the issue's command (a randomly initialised DeiT-Tiny, small training budgets) until the
   pipeline ends with its device bundle; ``--skip-run`` reuses a finished run folder.
3. Prints the bundle's size per part (``xpdeploy bundle --dry-run``'s report) and checks it
   against the issue's 180 MiB.
4. Runs the device side, ``xpdeploy run bundle.tar --stages verify``, in an interpreter that cannot
   import torch, torchvision or timm, and compares the device's verification with the host's:
   every simplified ONNX file's top-1, agreement and logit differences must be equal.
5. With ``--baseline OLD.tar``, a bundle of the same run made by an xpdeploy from before image sets
   (float32 ``verify.npz``): the device-side float32 tensors of both bundles are compared byte for
   byte, and both bundles' simplified ONNX files are run in onnxruntime on both tensors; the
   report gives the largest logit difference (the issue asks for 0).
6. Sizes a 500-image INT8 calibration set at 224 px drawn from the tree
   (``xpdeploy calib make``, then the bundle's own ``calibration.npz`` writer).

    python bench/lean_bundle.py --tree /tmp/imagenet-tree --run-dir /tmp/lean-run \\
        [--baseline /tmp/old/bundle.tar] [--out bench/results/lean_bundle.json]

Needs ``../shared/datasets/`` (or ``--datasets``); takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's xpdeploy and tests importable
from tests.test_torch_free import _BLOCK  # noqa: E402 (needs the path above)

#: The issue's command: jetson_deit_tiny with a random DeiT-Tiny and small training budgets.
OVERRIDES = (
    "model.pretrained=false", "data.verify_samples=1000", "data.batch_size=25", "data.workers=0",
    "learn_masks.max_images=100", "learn_masks.batch_size=25", "learn_masks.epochs=1",
    "finetune.epochs=1", "finetune.max_images=50", "finetune.batch_size=25",
    "finetune.warmup_epochs=0", "verify.iters=10", "verify.warmup=2",
)
#: The issue's bounds, MiB.
MAX_BUNDLE_MIB = 180.0
MAX_CALIBRATION_MIB = 80.0
MIB = 2**20

#: The device run's command line in an interpreter that refuses torch, torchvision and timm (the
#: test suite's blocker), as a Jetson image without them would.
NO_TORCH = _BLOCK + textwrap.dedent("""
    from xpdeploy.cli import main
    sys.argv = ["xpdeploy", *sys.argv[1:]]
    try:
        main()
    finally:
        assert "torch" not in sys.modules, "the device run imported torch"
""")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_tree(datasets: Path, tree: Path) -> Path:
    """The ImageNet-layout smoke tree of the module doc (kept when it is already complete)."""
    done = tree / ".complete"
    if done.is_file():
        log(f"tree {tree}: reused")
        return tree
    classes = datasets / "imagenet-classes.tsv"
    sample = datasets / "imagenet-sample-250.tar"
    for f in (classes, sample):
        if not f.is_file():
            sys.exit(f"error: {f} is missing; pass --datasets with the folder of the shared "
                     "datasets (imagenet-classes.tsv, imagenet-sample-250.tar)")
    wnids = [line.split("\t")[1] for line in classes.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sample) as tar:
            tar.extractall(tmp, filter="data")
        photos = sorted(Path(tmp).rglob("*.JPEG"))
        by_wnid = {p.name.split("_")[0]: p for p in photos}
        filler = photos[0]
        for split in ("train", "val"):
            for wnid in wnids:
                folder = tree / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                src = by_wnid.get(wnid, filler)
                shutil.copyfile(src, folder / src.name)
    done.write_text(f"{len(wnids)} classes, {len(photos)} photos\n")
    log(f"tree {tree}: {len(wnids)} classes, {len(photos)} real photos, the rest copies of "
        f"{filler.name}")
    return tree


def run_pipeline(tree: Path, run_dir: Path, python: str) -> float:
    """The issue's command; returns its wall time in seconds."""
    args = [python, "-m", "xpdeploy", "run", str(ROOT / "pipelines" / "jetson_deit_tiny.yaml"),
            "--run-dir", str(run_dir), "--set", f"data.root={tree}"]
    for o in OVERRIDES:
        args += ["--set", o]
    log("running: " + " ".join(args))
    t0 = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the pipeline failed (exit {done.returncode})")
    return time.monotonic() - t0


def bundle_sizes(run_dir: Path, tar: Path) -> dict[str, Any]:
    """The bundle's parts (from its bundle.json) and its size on disk."""
    from xpdeploy.bundle import bundle_header, size_report

    manifest = bundle_header(tar).model_copy(update={"tar_bytes": tar.stat().st_size})
    for line in size_report(manifest, tar):
        print(line)
    return {"tar_mib": tar.stat().st_size / MIB,
            "members": {m.path: m.size for m in manifest.members},
            "left_out": {p.path: p.size for p in manifest.left_out}}


def device_verify(tar: Path, dest: Path) -> dict[str, Any]:
    """``xpdeploy run TAR --stages verify`` without torch; the device's parity.json."""
    args = [sys.executable, "-c", NO_TORCH, "run", str(tar), "--run-dir", str(dest), "--stages",
            "verify", "--set", "verify.iters=10", "--set", "verify.warmup=2"]
    log("device side (torch blocked): xpdeploy " + " ".join(args[3:]))
    done = subprocess.run(args, cwd=ROOT, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the device run failed (exit {done.returncode})")
    return json.loads((dest / "09_verify" / "parity.json").read_text())


def quality(parity: dict[str, Any]) -> dict[str, list[Any]]:
    keys = ("top1", "agreement", "max_abs_diff", "mean_abs_diff", "cosine")
    return {c["name"]: [c[k] for k in keys] for c in parity["candidates"]
            if c["name"].endswith(".sim.onnx")}


def compare_with_baseline(new_dir: Path, baseline: Path, work: Path) -> dict[str, Any]:
    """Device-side tensors of both bundles byte for byte, and every simplified ONNX file of both
    run in onnxruntime on both tensors: the largest logit difference."""
    import numpy as np

    from xpdeploy.backends.ort_runner import OrtRunner
    from xpdeploy.backends.runner import infer_all
    from xpdeploy.bundle import open_bundle
    from xpdeploy.data.verify_set import load_verify_set

    old_dir = work / "baseline"
    old = open_bundle(baseline, old_dir)
    new_pixels = load_verify_set(new_dir / "01_load" / "verify.npz").pixels
    old_pixels = load_verify_set(old_dir / "01_load" / "verify.npz").pixels
    same_bytes = new_pixels.tobytes() == old_pixels.tobytes()
    log(f"device tensors: new {new_pixels.shape} vs baseline {old_pixels.shape}: "
        f"{'byte-identical' if same_bytes else 'DIFFERENT'}")
    worst, files = 0.0, {}
    onnx = [p for p in old.member_paths() if p.endswith(".sim.onnx")]
    for rel in onnx:
        for root in (old_dir, new_dir):
            path = root / rel
            if not path.is_file():
                continue
            with OrtRunner(path, threads=2) as runner:
                a = infer_all(runner, old_pixels, 25)
                b = infer_all(runner, new_pixels, 25)
            diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            files[f"{root.name}/{rel}"] = diff
            worst = max(worst, diff)
            log(f"  {root.name}/{rel}: max |logits(baseline tensors) - logits(new)| = {diff:g}")
    return {"tensors_byte_identical": same_bytes, "max_logit_diff": worst, "per_file": files,
            "baseline_tar_mib": baseline.stat().st_size / MIB}


def calibration_size(tree: Path, run_dir: Path, work: Path, python: str) -> dict[str, Any]:
    """500 class-balanced images of the tree, preprocessed as the run's model does, written with
    the bundle's calibration writer."""
    from xpdeploy.artifacts import TorchModel
    from xpdeploy.bundle import bundle_header
    from xpdeploy.data.calibration import load_configured, save_npz

    manifest_file = work / "calibration.txt"
    subprocess.run([python, "-m", "xpdeploy", "calib", "make", str(tree / "train"), "--count",
                    "500", "--seed", "0", "-o", str(manifest_file)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    model = bundle_header(run_dir / "bundle.tar").outputs("load")["model"]
    assert isinstance(model, TorchModel)
    images, manifest = load_configured(manifest_file, model.data_config)
    out = work / "calibration.npz"
    save_npz(out, images, manifest, model.data_config)
    size = out.stat().st_size / MIB
    log(f"calibration set: {len(images)} images {images.shape[1:]} -> {size:.1f} MiB "
        f"(float32 would be {len(images) * 3 * 224 * 224 * 4 / MIB:.1f} MiB)")
    return {"images": len(images), "mib": size, "bound_mib": MAX_CALIBRATION_MIB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "imagenet-tree")
    p.add_argument("--run-dir", type=Path, default=Path(tempfile.gettempdir()) / "lean-run")
    p.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    p.add_argument("--baseline", type=Path, help="a bundle of the same run by an older xpdeploy")
    p.add_argument("--skip-run", action="store_true", help="reuse the finished --run-dir")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    tree = build_tree(args.datasets, args.tree)
    seconds = None if args.skip_run else run_pipeline(tree, args.run_dir, sys.executable)
    tar = args.run_dir / "bundle.tar"
    result: dict[str, Any] = {"pipeline_s": seconds, "bundle": bundle_sizes(args.run_dir, tar)}
    with tempfile.TemporaryDirectory(prefix="lean-bundle-") as tmp:
        work = Path(tmp)
        device = device_verify(tar, work / "device")
        host = json.loads((args.run_dir / "09_verify" / "parity.json").read_text())
        result["device_equals_host"] = quality(device) == quality(host)
        log(f"device verification equals the host's for the simplified files: "
            f"{result['device_equals_host']} ({sorted(quality(device))})")
        if args.baseline:
            result["baseline"] = compare_with_baseline(work / "device", args.baseline, work)
        result["calibration"] = calibration_size(tree, args.run_dir, work, sys.executable)
    size = result["bundle"]["tar_mib"]
    verdict = size <= MAX_BUNDLE_MIB and result["device_equals_host"] and (
        result["calibration"]["mib"] <= MAX_CALIBRATION_MIB) and (
        not args.baseline or result["baseline"]["max_logit_diff"] == 0.0)
    log(f"bundle {size:.1f} MiB (bound {MAX_BUNDLE_MIB:.0f}): "
        f"{'PASSED' if verdict else 'FAILED'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
