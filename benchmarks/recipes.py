"""Fit the named recipes and evaluate them beside the pixel-space kernel score.

Tasks (Fashion-MNIST is the reference data):
  fmnist-mnist    fit fashion-mnist:train,      ID fashion-mnist:test       vs mnist:test
  fmnist-animals  fit fashion-mnist:train,      ID fashion-mnist:test       vs animals
  fmnist-04-59    fit fashion-mnist:train@0-4,  ID fashion-mnist:test@0-4   vs fashion-mnist:test@5-9

With --split validation, nothing from a test set is used (for choosing hyperparameters): the
last 5,000 Fashion-MNIST training images are held out as ID validation data, MNIST's
validation split is the OOD set, and animals are left out.

    python benchmarks/recipes.py --recipes quick default --out benchmarks/results/recipes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.index import ReferenceIndex

HOLDOUT = 5000


def pixel_features(images: np.ndarray) -> torch.Tensor:
    """Raw pixels, flattened and L2-normalised: the pixel-space kernel baseline."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    return torch.nn.functional.normalize(x, dim=1)


def pixel_auroc(
    train: np.ndarray, id_test: np.ndarray, ood: np.ndarray, k: int | None = 200
) -> float:
    index = ReferenceIndex(pixel_features(train).numpy())
    a = index.kernel_scores(pixel_features(id_test), k, 0.04)
    b = index.kernel_scores(pixel_features(ood), k, 0.04)
    return ood_metrics(a, b).auroc


def tasks(split: str, workdir: Path) -> list[dict[str, str]]:
    if split == "test":
        return [
            dict(
                name="fmnist-mnist",
                fit="fashion-mnist:train",
                id="fashion-mnist:test",
                ood="mnist:test",
            ),
            dict(
                name="fmnist-animals",
                fit="fashion-mnist:train",
                id="fashion-mnist:test",
                ood="animals",
            ),
            dict(
                name="fmnist-04-59",
                fit="fashion-mnist:train@0-4",
                id="fashion-mnist:test@0-4",
                ood="fashion-mnist:test@5-9",
            ),
        ]
    full = load_dataset("fashion-mnist:train")
    assert full.labels is not None
    order = np.random.default_rng(1234).permutation(len(full))
    fit_idx, val_idx = np.sort(order[:-HOLDOUT]), np.sort(order[-HOLDOUT:])
    specs = {}
    for name, idx in (("fit", fit_idx), ("val", val_idx)):
        path = workdir / f"fmnist-{name}.npz"
        np.savez(path, images=full.images[idx], labels=full.labels[idx])
        specs[name] = f"npz:{path}"
    return [
        dict(name="fmnist-mnist", fit=specs["fit"], id=specs["val"], ood="mnist:val"),
        dict(
            name="fmnist-04-59",
            fit=specs["fit"] + "@0-4",
            id=specs["val"] + "@0-4",
            ood=specs["val"] + "@5-9",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", nargs="+", default=["quick", "default"])
    ap.add_argument("--split", choices=["test", "validation"], default="test")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--extra", default="", help='extra `fit` flags in one string, e.g. --extra="--epochs 2"'
    )
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sdns-bench-"))
    results: dict = {
        "split": args.split,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "recipes": {},
        "pixel": {},
    }
    task_list = tasks(args.split, workdir)
    fits: dict[tuple[str, str], dict] = {}
    for recipe in args.recipes:
        rows = {}
        for task in task_list:
            key = (recipe, task["fit"])
            if key not in fits:
                out = workdir / f"{recipe}-{len(fits)}.sdns"
                cmd = [
                    sys.executable,
                    "-m",
                    "sdns_monitor.cli",
                    "fit",
                    "--data",
                    task["fit"],
                    "--out",
                    str(out),
                    "--recipe",
                    recipe,
                    "--quiet",
                    *args.extra.split(),
                ]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                fits[key] = {"bundle": out, "seconds": time.perf_counter() - t0}
            det = Detector.load(fits[key]["bundle"])
            a = det.anomaly_scores(det.prepare(load_dataset(task["id"]).images))
            b = det.anomaly_scores(det.prepare(load_dataset(task["ood"]).images))
            m = ood_metrics(a, b)
            rows[task["name"]] = {
                "auroc": m.auroc,
                "fpr95": m.fpr95,
                "aupr": m.aupr,
                "fit_seconds": fits[key]["seconds"],
                "k": det.k,
            }
            print(
                f"{recipe:>8} {task['name']:<16} AUROC {m.auroc:.4f}  FPR95 {m.fpr95:.4f}  fit {fits[key]['seconds']:.0f} s  k={det.k}",
                flush=True,
            )
        results["recipes"][recipe] = rows
    for task in task_list:
        fit_images = load_dataset(task["fit"]).images
        auroc = pixel_auroc(
            fit_images, load_dataset(task["id"]).images, load_dataset(task["ood"]).images
        )
        results["pixel"][task["name"]] = {"auroc": auroc}
        print(f"{'pixel':>8} {task['name']:<16} AUROC {auroc:.4f}", flush=True)

    names = [t["name"] for t in task_list]
    print("\n| method | " + " | ".join(names) + " | fit time |")
    print("|---" * (len(names) + 2) + "|")
    for recipe, rows in results["recipes"].items():
        secs = max(r["fit_seconds"] for r in rows.values())
        print(
            f"| SDNS {recipe} | "
            + " | ".join(f"{rows[n]['auroc']:.3f}" for n in names)
            + f" | {secs:.0f} s |"
        )
    print(
        "| pixel kernel (k=200) | "
        + " | ".join(f"{results['pixel'][n]['auroc']:.3f}" for n in names)
        + " | - |"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
