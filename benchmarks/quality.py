"""Detection quality side by side: SDNS, its ablations and the label-free baselines.

Rows are methods, columns tasks; cells are AUROC mean +- std over seeds with FPR95 beside.

Tasks (reference = the training split of the fit data for the seed, as `fit` splits it):
  fmnist-mnist     fit fashion-mnist:train        ID fashion-mnist:test       OOD mnist:test
  fmnist-animals   fit fashion-mnist:train        ID fashion-mnist:test       OOD animals
  mnist-fmnist     fit mnist:train                ID mnist:test               OOD fashion-mnist:test
  mnist-animals    fit mnist:train                ID mnist:test               OOD animals
  fmnist-04-59     fit fashion-mnist:train@0-4    ID fashion-mnist:test@0-4   OOD ...test@5-9
  fmnist-oneclass  for each class c: fit fashion-mnist:train@c, ID test@c, OOD test@others;
                   the mean over the classes

Methods:
  pixel-knn         kernel score (k = 200, T = 0.04) on L2-normalised raw pixels
  random-encoder    the same score on a randomly initialised cnn-small (the recipe's width)
  isolation-forest  scikit-learn IsolationForest (200 trees) on raw pixels
  no-negatives      plain self-distillation (the recipe with --negatives off)
  sdns-<t>          SDNS with negatives by transformation t, from ID and auxiliary images
  sdns-rot-id / sdns-rot-aux   rotation negatives from ID images only / auxiliary images only
  sdns-rot+pixel    the combined score of the sdns-rot bundles (sdns_monitor.lowlevel)
Auxiliary images for negatives: crops of the photos and textures that ship with scikit-image and
scikit-learn (the recipes' default); none of them is in any test set.

Sensitivity score (METHOD.md; a reconstruction, the paper's definition is not available):
S = mean_j AUROC(a(x), a(T_j(x))) over held-out ID validation images x of each fit and the
shifts T_j in rot, perm4, perm16, pixperm, blur, noise; also S without the model's own
negative transformation. Reported per method next to its mean OOD AUROC, with Spearman's
rank correlation over the transformations.

    python benchmarks/quality.py              # full mode (about 1.5 hours on 2 cores)
    python benchmarks/quality.py --fast       # a quick look (under 25 minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest

from sdns_monitor.bundle import InputSpec
from sdns_monitor.data import load_dataset
from sdns_monitor.detector import Detector
from sdns_monitor.evaluation import ood_metrics
from sdns_monitor.features import extract_features
from sdns_monitor.index import ReferenceIndex
from sdns_monitor.networks import BackboneConfig, create_backbone
from trainer.config import TrainConfig, make_config
from trainer.fit import fit, load_reference, split_reference
from trainer.negatives import shift

TASKS = (
    "fmnist-mnist",
    "fmnist-animals",
    "mnist-fmnist",
    "mnist-animals",
    "fmnist-04-59",
    "fmnist-oneclass",
)
# fit data -> [(task, ID test spec, OOD spec)]
BASE_FITS: dict[str, list[tuple[str, str, str]]] = {
    "fashion-mnist:train": [
        ("fmnist-mnist", "fashion-mnist:test", "mnist:test"),
        ("fmnist-animals", "fashion-mnist:test", "animals"),
    ],
    "mnist:train": [
        ("mnist-fmnist", "mnist:test", "fashion-mnist:test"),
        ("mnist-animals", "mnist:test", "animals"),
    ],
    "fashion-mnist:train@0-4": [
        ("fmnist-04-59", "fashion-mnist:test@0-4", "fashion-mnist:test@5-9"),
    ],
}
# Trained methods: overrides of the recipe.
TRAINED = {
    "no-negatives": dict(negatives="off"),
    "sdns-rot": dict(negatives="rot"),
    "sdns-rot360": dict(negatives="rot360"),
    "sdns-perm4": dict(negatives="perm4"),
    "sdns-perm16": dict(negatives="perm16"),
    "sdns-pixperm": dict(negatives="pixperm"),
    "sdns-rot-id": dict(negatives="rot", neg_source="id"),
    "sdns-rot-aux": dict(negatives="rot", neg_source="aux"),
}
BASELINES = ("pixel-knn", "random-encoder", "isolation-forest")
COMBINED = "sdns-rot+pixel"
SENSITIVITY_SHIFTS = ("rot", "perm4", "perm16", "pixperm", "blur", "noise")
K, T = 200, 0.04


@dataclass(frozen=True)
class Plan:
    mode: str
    recipe: str
    seeds: dict[str, int]  # method -> number of seeds
    classes: dict[str, list[int]]  # method -> one-class classes


def plan(fast: bool, recipe: str) -> Plan:
    if fast:
        methods = {
            "pixel-knn": 1,
            "random-encoder": 1,
            "isolation-forest": 1,
            "no-negatives": 1,
            "sdns-rot": 1,
        }
        classes = {m: [0, 2, 6] for m in methods}
        return Plan("fast", recipe, methods, classes)
    methods = dict.fromkeys([*BASELINES, *TRAINED], 1)
    methods.update({"pixel-knn": 3, "no-negatives": 3, "sdns-rot": 3})
    classes = {m: list(range(10)) for m in methods}
    return Plan("full", recipe, methods, classes)


def fits_of(classes: list[int]) -> dict[str, list[tuple[str, str, str]]]:
    out = dict(BASE_FITS)
    for c in classes:
        others = ",".join(str(o) for o in range(10) if o != c)
        out[f"fashion-mnist:train@{c}"] = [
            ("fmnist-oneclass", f"fashion-mnist:test@{c}", f"fashion-mnist:test@{others}")
        ]
    return out


# ---------------------------------------------------------------------------------- scoring
def _images(spec: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    if spec not in cache:
        cache[spec] = load_dataset(spec, size=28, channels=1).images
    return cache[spec]


def pixel_scorer(
    train: np.ndarray, _seed: int, _cfg: TrainConfig
) -> Callable[[np.ndarray], np.ndarray]:
    def feats(x: np.ndarray) -> torch.Tensor:
        return F.normalize(torch.from_numpy(x.reshape(len(x), -1).astype(np.float32)), dim=1)

    index = ReferenceIndex(feats(train).numpy())
    return lambda x: index.kernel_scores(feats(x), K, T)


def random_encoder_scorer(
    train: np.ndarray, seed: int, cfg: TrainConfig
) -> Callable[[np.ndarray], np.ndarray]:
    torch.manual_seed(seed)
    backbone = {"name": cfg.backbone, "in_channels": 1, "image_size": 28, "width": cfg.width}
    encoder = create_backbone(BackboneConfig.model_validate(backbone)).eval()
    mean, std = float(train.mean() / 255), float(train.std() / 255)
    spec = InputSpec(size=28, model_size=28, channels=1, mean=[mean], std=[std])
    cpu = torch.device("cpu")
    index = ReferenceIndex(extract_features(encoder, train, spec, cpu).numpy())
    return lambda x: index.kernel_scores(extract_features(encoder, x, spec, cpu), K, T)


def isolation_forest_scorer(
    train: np.ndarray, seed: int, _cfg: TrainConfig
) -> Callable[[np.ndarray], np.ndarray]:
    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1)
    forest.fit(train.reshape(len(train), -1) / 255.0)
    return lambda x: -forest.score_samples(x.reshape(len(x), -1) / 255.0)


def _scorer(det: Detector) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: det.anomaly_scores(det.prepare(x))


BASELINE_SCORERS = {
    "pixel-knn": pixel_scorer,
    "random-encoder": random_encoder_scorer,
    "isolation-forest": isolation_forest_scorer,
}


def sensitivity(
    score: Callable[[np.ndarray], np.ndarray], val: np.ndarray, seed: int
) -> dict[str, float]:
    """AUROC of validation images against each shift of them (METHOD.md, reconstructed)."""
    x = torch.from_numpy(val).permute(0, 3, 1, 2).float()
    gen = torch.Generator().manual_seed(seed)
    base = score(val)
    out = {}
    for kind in SENSITIVITY_SHIFTS:
        if kind == "blur":
            k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
            y = F.conv2d(
                F.pad(x, (2, 2, 2, 2), mode="replicate"), (k[:, None] * k[None, :])[None, None]
            )
        elif kind == "noise":
            y = x + 25.0 * torch.randn(x.shape, generator=gen)
        else:
            y = shift(x, kind, gen)
        shifted = y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        out[kind] = ood_metrics(base, score(shifted)).auroc
    return out


# ---------------------------------------------------------------------------------- runs
def run_unit(
    method: str,
    seed: int,
    cfg: TrainConfig,
    fit_spec: str,
    tasks: list[tuple[str, str, str]],
    workdir: Path,
    cache: dict[str, np.ndarray],
) -> dict[str, Any]:
    """One method, seed and fit: its AUROC and FPR95 on the fit's tasks (and sensitivity)."""
    started = time.perf_counter()
    unit: dict[str, Any] = {"results": [], "sensitivity": None, "fit_seconds": None}
    if method in BASELINE_SCORERS:
        train = split_reference(load_reference(fit_spec, 28), cfg).train.images
        scorers = {method: BASELINE_SCORERS[method](train, seed, cfg)}
    else:
        out = workdir / f"{method}-{seed}-{fit_spec.replace(':', '_')}.sdns"
        fit(fit_spec, out, cfg, device="cpu", log=lambda _m: None)
        unit["fit_seconds"] = time.perf_counter() - started
        scorers = {method: _scorer(Detector.load(out, device="cpu", score="sdns"))}
        if method == "sdns-rot":
            scorers[COMBINED] = _scorer(Detector.load(out, device="cpu", score="combined"))
        val = split_reference(load_reference(fit_spec, 28), cfg).validation.images
        unit["sensitivity"] = sensitivity(scorers[method], val, seed)
        shutil.rmtree(out, ignore_errors=True)
    for name, score in scorers.items():
        for task, id_spec, ood_spec in tasks:
            m = ood_metrics(score(_images(id_spec, cache)), score(_images(ood_spec, cache)))
            unit["results"].append(
                {"scorer": name, "task": task, "auroc": m.auroc, "fpr95": m.fpr95}
            )
    unit["seconds"] = time.perf_counter() - started
    return unit


def run(p: Plan, workdir: Path, journal: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every unit of the plan, each taken from the journal when it is there (same method,
    seed, fit data and training configuration), else run and appended to it: an interrupted
    run continues where it stopped. Delete the journal after changing the training code."""
    done: dict[str, dict[str, Any]] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry
    cache: dict[str, np.ndarray] = {}
    units = []
    for method, n_seeds in p.seeds.items():
        for seed in range(n_seeds):
            cfg = make_config(p.recipe, seed=seed, **TRAINED.get(method, {}))
            config = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
            for fit_spec, tasks in fits_of(p.classes[method]).items():
                key = f"{method}|{seed}|{fit_spec}|{config}"
                if key not in done:
                    unit = run_unit(method, seed, cfg, fit_spec, tasks, workdir, cache)
                    done[key] = {
                        "key": key,
                        "method": method,
                        "seed": seed,
                        "fit": fit_spec,
                        **unit,
                    }
                    with journal.open("a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                    for r in unit["results"]:
                        log(
                            f"{r['scorer']:<18} seed {seed} {r['task']:<16} {fit_spec:<26} "
                            f"AUROC {r['auroc']:.4f} FPR95 {r['fpr95']:.4f}"
                        )
                    log(f"  ({unit['seconds']:.0f} s)")
                units.append(done[key])

    cells: dict[str, dict[str, list[tuple[float, float]]]] = {}  # method -> task -> values
    oneclass: dict[tuple[str, int], list[tuple[float, float]]] = {}  # (method, seed) -> classes
    sens: dict[str, list[dict[str, float]]] = {}
    for unit in units:
        for r in unit["results"]:
            value = (r["auroc"], r["fpr95"])
            if r["task"] == "fmnist-oneclass":
                oneclass.setdefault((r["scorer"], unit["seed"]), []).append(value)
            else:
                cells.setdefault(r["scorer"], {}).setdefault(r["task"], []).append(value)
        if unit["sensitivity"] is not None:
            sens.setdefault(unit["method"], []).append(unit["sensitivity"])
    for (method, _seed), pairs in oneclass.items():  # one value per seed: the class mean
        cells.setdefault(method, {}).setdefault("fmnist-oneclass", []).append(
            (float(np.mean([a for a, _ in pairs])), float(np.mean([f for _, f in pairs])))
        )
    fit_seconds = [u["fit_seconds"] for u in units if u["fit_seconds"] is not None]
    methods: dict[str, dict[str, dict[str, float | int]]] = {}
    for method, by_task in cells.items():
        methods[method] = {}
        for task, values in by_task.items():
            aurocs = [a for a, _ in values]
            methods[method][task] = {
                "auroc": float(np.mean(aurocs)),
                "auroc_std": float(statistics.stdev(aurocs)) if len(aurocs) > 1 else 0.0,
                "fpr95": float(np.mean([f for _, f in values])),
                "seeds": len(values),
            }
    return {
        "methods": methods,
        "sensitivity": summarise_sensitivity(sens, methods),
        "fit_seconds_mean": float(np.mean(fit_seconds)) if fit_seconds else None,
        "oneclass_classes": p.classes,
    }


def summarise_sensitivity(
    sens: dict[str, list[dict[str, float]]], methods: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    rows = {}
    for method, per_fit in sens.items():
        own = TRAINED[method].get("negatives")
        s_all = float(np.mean([np.mean(list(d.values())) for d in per_fit]))
        s_excl = float(np.mean([np.mean([v for k, v in d.items() if k != own]) for d in per_fit]))
        mean_auroc = float(np.mean([c["auroc"] for c in methods[method].values()]))
        rows[method] = {
            "S": s_all,
            "S_without_own": s_excl,
            "mean_ood_auroc": mean_auroc,
            "fits": len(per_fit),
        }
    out: dict[str, Any] = {
        "label": "reconstructed (METHOD.md); not the paper's definition",
        "shifts": list(SENSITIVITY_SHIFTS),
        "methods": rows,
    }
    ranked = [m for m in rows if m != "sdns-rot-id" and m != "sdns-rot-aux"]
    if len(ranked) >= 3:
        for key in ("S", "S_without_own"):
            rho = spearmanr(
                [rows[m][key] for m in ranked], [rows[m]["mean_ood_auroc"] for m in ranked]
            )
            out[f"spearman_{key}"] = float(rho.statistic)
    return out


def table(results: dict[str, Any]) -> str:
    methods = results["methods"]
    head = "| method | " + " | ".join(TASKS) + " | mean |"
    lines = [head, "|" + "---|" * (len(TASKS) + 2)]
    for method, cells in methods.items():
        row = []
        for task in TASKS:
            c = cells.get(task)
            if c is None:
                row.append("")
                continue
            std = f" ± {c['auroc_std']:.3f}" if c["seeds"] > 1 else ""
            row.append(f"{c['auroc']:.3f}{std} ({c['fpr95']:.2f})")
        mean = np.mean([c["auroc"] for c in cells.values()])
        seeds = max(c["seeds"] for c in cells.values())
        lines.append(
            f"| {method} ({seeds} seed{'s' if seeds > 1 else ''}) | "
            + " | ".join(row)
            + f" | {mean:.3f} |"
        )
    sens = results["sensitivity"]["methods"]
    if sens:
        lines += [
            "",
            "| method | S (reconstructed) | S without own shift | mean OOD AUROC |",
            "|---|---|---|---|",
        ]
        for m, r in sens.items():
            lines.append(
                f"| {m} | {r['S']:.3f} | {r['S_without_own']:.3f} | {r['mean_ood_auroc']:.3f} |"
            )
        for key in ("spearman_S", "spearman_S_without_own"):
            if key in results["sensitivity"]:
                lines.append(f"\n{key}: {results['sensitivity'][key]:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fast", action="store_true", help="the quick look (under 25 minutes)")
    ap.add_argument("--recipe", default="quick")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    ap.add_argument(
        "--journal",
        type=Path,
        default=None,
        help="finished units, one JSON line each (default: OUT with .jsonl); reused on a rerun",
    )
    args = ap.parse_args()
    p = plan(args.fast, args.recipe)
    workdir = Path(tempfile.mkdtemp(prefix="sdns-quality-"))
    started = time.perf_counter()
    try:
        journal = args.journal or args.out.with_name(f"{args.out.stem}-{p.mode}.jsonl")
        journal.parent.mkdir(parents=True, exist_ok=True)
        body = run(p, workdir, journal, lambda m: print(m, flush=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "tasks": list(TASKS),
        "recipe": p.recipe,
        "mode": p.mode,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "auxiliary_data": "photos and textures of scikit-image and scikit-learn (crops)",
        **body,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(
        f"\nAUROC mean ± std over seeds (FPR95); {p.mode} mode, recipe {p.recipe}, "
        f"{results['wall_seconds'] / 60:.0f} min; written to {args.out}"
    )


if __name__ == "__main__":
    main()
