"""`fit` and `calibrate`: make a model bundle, or recalibrate one on new reference data.

`fit` imports `trainer` inside the command: a scoring deployment needs no training code.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from sdns_monitor.cli.options import DeviceOpt
from sdns_monitor.errors import ConfigError


class NegativesOpt(StrEnum):
    rot = "rot"
    rot360 = "rot360"
    perm4 = "perm4"
    perm16 = "perm16"
    pixperm = "pixperm"
    none = "none"
    off = "off"


class SourceOpt(StrEnum):
    both = "both"
    id = "id"
    aux = "aux"


class AugmentationsOpt(StrEnum):
    dino = "dino"
    geometric = "geometric"


def _progress_printer(quiet: bool):  # type: ignore[no-untyped-def]
    """A rich progress bar fed by the trainer's per-step callback."""
    if quiet:
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn(
            "loss {task.fields[loss]:.3f} (pos {task.fields[pos]:.3f} neg {task.fields[neg]:.3f})"
        ),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[img_s]:.0f} img/s"),
        TimeRemainingColumn(),
        transient=False,
    )
    task: dict[str, Any] = {}

    def update(d: dict[str, Any]) -> None:
        total = d["steps"] * d["epochs"]
        done = (d["epoch"] - 1) * d["steps"] + d["step"]
        fields = {k: d[k] for k in ("loss", "pos", "neg", "lr", "img_s")}
        fields["epoch"] = f"{d['epoch']}/{d['epochs']}"
        if "id" not in task:
            task["id"] = bar.add_task("fit", total=total, **fields)
        bar.update(task["id"], completed=done, **fields)

    return bar, update


def _parse_k(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--k must be a positive number or 'all', got {value!r}") from None


def fit(
    data: Annotated[
        str, typer.Option(help="Reference data spec, e.g. folder:/data/ref or fashion-mnist:train")
    ],
    out: Annotated[
        Path, typer.Option(help="Bundle to write (a new directory, e.g. models/cam1.sdns)")
    ],
    aux: Annotated[
        list[str] | None,
        typer.Option(
            help="Auxiliary data for negatives (repeatable); default: the recipe's (photos, textures)"
        ),
    ] = None,
    recipe: Annotated[str, typer.Option(help="quick | default | paper-cifar10")] = "default",
    backbone: Annotated[
        str | None, typer.Option(help="cnn-small | resnet18-cifar | vit-tiny | vit-small")
    ] = None,
    negatives: Annotated[
        NegativesOpt | None,
        typer.Option(help="Shifting transformation for negatives; off = plain self-distillation"),
    ] = None,
    neg_source: Annotated[
        SourceOpt | None,
        typer.Option(help="Negatives from in-distribution (id), auxiliary (aux) images or both"),
    ] = None,
    augmentations: Annotated[
        AugmentationsOpt | None,
        typer.Option(
            help="Photometric augmentations of the views: dino, or geometric (crops and flips "
            "only: blur, exposure and colour stay visible to the encoder)"
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(min=1, help="Optimiser steps per epoch; more than one pass takes several"),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=2)] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate per 256 images")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Size images are stored and scored at")
    ] = None,
    patch_size: Annotated[int | None, typer.Option(help="ViT patch size")] = None,
    k: Annotated[
        str | None,
        typer.Option(
            help="Top-k neighbours of the score, or 'all' (default: chosen on validation data)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    index_factory: Annotated[
        str | None,
        typer.Option(help="FAISS index of the reference bank: Flat (exact), IVF1024,Flat, HNSW32"),
    ] = None,
    alarm_rate: Annotated[
        float | None, typer.Option(help="Default alarm rate stored in the bundle")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    resume: Annotated[
        bool, typer.Option(help="Continue from the last epoch checkpoint (OUT.ckpt/)")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
) -> None:
    """Train the SDNS encoder on reference data and write a model bundle."""
    from trainer.config import make_config  # lazy: scoring deployments need no training code
    from trainer.fit import fit as run_fit

    cfg = make_config(
        recipe,
        backbone=backbone,
        negatives=negatives.value if negatives else None,
        neg_source=neg_source.value if neg_source else None,
        augmentations=augmentations.value if augmentations else None,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        lr=lr,
        data_size=image_size,
        patch_size=patch_size,
        score_k=_parse_k(k),
        seed=seed,
        index_factory=index_factory,
        alarm_rate=alarm_rate,
        aux=aux,
    )
    if index_factory is not None:
        from sdns_monitor.index import check_factory

        check_factory(index_factory)  # before training, not after
    bar, update = _progress_printer(quiet)
    log = (lambda _m: None) if quiet else (lambda m: typer.echo(m, err=True))
    if bar is not None:
        with bar:
            report = run_fit(data, out, cfg, device=device, resume=resume, progress=update, log=log)
    else:
        report = run_fit(data, out, cfg, device=device, resume=resume, progress=None, log=log)
    if report is not None:
        val = "n/a" if report.validation_auroc is None else f"{report.validation_auroc:.3f}"
        typer.echo(
            f"wrote {report.bundle} in {report.wall_seconds:.0f} s "
            f"(training {report.train_seconds:.0f} s, {report.images_per_second:.0f} img/s; "
            f"k = {report.k or 'all'}; validation AUROC vs shifted images {val}; "
            f"default score {report.score_default})"
        )


def calibrate(
    model: Annotated[Path, typer.Option(help="Existing model bundle")],
    data: Annotated[str, typer.Option(help="New in-distribution data, not used in training")],
    out: Annotated[Path, typer.Option(help="New bundle to write")],
    alarm_rate: Annotated[float | None, typer.Option(help="New default alarm rate")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Recalibrate the p-values on new reference data, without retraining; writes a new bundle."""
    from sdns_monitor.calibrate import recalibrate

    path = recalibrate(model, data, out, alarm_rate=alarm_rate, device=device)
    typer.echo(f"wrote {path}")
