"""Commands on a model bundle: eval, score, export, info, report, and signing (keygen, sign).

Those that load the model take the shared model-loading options and load it through
`load_detector` (sdns_monitor/cli/options.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sdns_monitor.cli.options import (
    BackendOpt,
    CacheDirOpt,
    DeviceOpt,
    PublicKeyOpt,
    RequireSignedOpt,
    ScoreOpt,
    load_detector,
)
from sdns_monitor.errors import SdnsError

ModelOpt = Annotated[Path, typer.Option(help="Model bundle")]


def evaluate(
    model: ModelOpt,
    id: Annotated[str, typer.Option("--id", help="In-distribution test data spec")],
    ood: Annotated[list[str], typer.Option(help="Out-of-distribution data spec (repeatable)")],
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object")] = False,
    report: Annotated[Path | None, typer.Option(help="Write ROC and histogram PNGs here")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score at most N images per set (seeded subset)")
    ] = None,
    device: DeviceOpt = "auto",
    score: ScoreOpt = "auto",
    backend: BackendOpt = "eager",
    public_key: PublicKeyOpt = None,
    require_signed: RequireSignedOpt = False,
) -> None:
    """AUROC, FPR at 95% TPR and AUPR of the anomaly score, in-distribution vs each OOD set."""
    from sdns_monitor.eval_bundle import evaluate_bundle

    det = load_detector(
        model,
        device=device,
        score=score,
        backend=backend,
        public_key=public_key,
        require_signed=require_signed,
    )
    result = evaluate_bundle(model, id, ood, report_dir=report, limit=limit, detector=det)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"model {model}   in-distribution {id}   score {result['score']}")
    typer.echo(f"{'OOD data':<32} {'AUROC':>7} {'FPR95':>7} {'AUPR':>7}")
    for row in result["results"]:
        typer.echo(f"{row['ood']:<32} {row['auroc']:7.4f} {row['fpr95']:7.4f} {row['aupr']:7.4f}")
    if report is not None:
        typer.echo(f"plots in {report}")


def score(
    spec: Annotated[str, typer.Argument(help="Data spec of the images to score")],
    model: ModelOpt,
    alarm_rate: Annotated[
        float | None, typer.Option(help="Flag when p-value < this (default: the bundle's)")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Flag when score > this (instead of --alarm-rate)")
    ] = None,
    device: DeviceOpt = "auto",
    score: ScoreOpt = "auto",
    backend: BackendOpt = "eager",
    public_key: PublicKeyOpt = None,
    require_signed: RequireSignedOpt = False,
) -> None:
    """Score images; print one JSON line per image."""
    from sdns_monitor.data import load_dataset
    from sdns_monitor.detector import check_rule

    check_rule(alarm_rate, threshold)
    det = load_detector(
        model,
        device=device,
        score=score,
        backend=backend,
        public_key=public_key,
        require_signed=require_signed,
    )
    # Loading at the model's input size resizes image folders of mixed sizes, and keeps
    # memory to what scoring needs; Detector.prepare then leaves the images as they are.
    data = load_dataset(spec, size=det.manifest.input.size)
    result = det.score(data.images, alarm_rate=alarm_rate, threshold=threshold)
    out = sys.stdout
    for i in range(len(result)):
        source = data.sources[i] if data.sources else spec
        out.write(
            json.dumps(
                {
                    "index": i,
                    "source": source,
                    "score": float(result.scores[i]),
                    "p_value": float(result.p_values[i]),
                    "flagged": bool(result.flags[i]),
                }
            )
            + "\n"
        )


def export(
    model: ModelOpt,
    backend: BackendOpt = "tensorrt",
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    batch_size: Annotated[
        int,
        typer.Option(min=1, help="Largest batch the engine takes: run uses max(--batch-size, 64)"),
    ] = 64,
) -> None:
    """Build the encoder for a backend ahead of time (a TensorRT engine in the cache directory)
    and check that it agrees with eager fp32 on random input."""
    import torch

    from sdns_monitor.backends import TOLERANCE, agreement
    from sdns_monitor.detector import Detector

    det = load_detector(
        model, device=device, backend=backend, cache_dir=cache_dir, batch_size=batch_size
    )
    eager = Detector(det.bundle, device=det.device, backend="eager")
    spec = det.manifest.input
    x = torch.rand(8, spec.channels, spec.model_size, spec.model_size, device=det.device)
    with torch.inference_mode():
        similarity = agreement(det.encoder(x), eager.encoder(x))
    if similarity < TOLERANCE[det.backend]:
        raise SdnsError(
            f"the {det.backend} encoder disagrees with eager (cosine {similarity:.5f} < "
            f"{TOLERANCE[det.backend]}); do not use it"
        )
    typer.echo(f"{det.backend} encoder ready on {det.device}; cosine vs eager {similarity:.6f}")


def keygen(
    out: Annotated[Path, typer.Option(help="Directory for sdns-signing.key and .pub")],
) -> None:
    """Make an Ed25519 key pair for signing bundles (the private key is readable by you only)."""
    from sdns_monitor.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(out)
    typer.echo(
        f"wrote {private} (keep it secret) and {public} (give it to `run --public-key`); "
        f"key id {key_id(load_public_key(public))}"
    )


def sign(
    model: Annotated[Path, typer.Option(help="Model bundle to sign")],
    key: Annotated[Path, typer.Option(help="Private key from `sdns-monitor keygen`")],
) -> None:
    """Sign a bundle's manifest (writes manifest.sig; the bundle's hash does not change)."""
    from sdns_monitor.bundle import load_bundle
    from sdns_monitor.signing import sign_bundle

    load_bundle(model)  # sign only what verifies
    typer.echo(f"signed {model} with key {sign_bundle(model, key)}")


def _signature_status(b: Any) -> str:
    from sdns_monitor.signing import SIGNATURE

    if b.signed_by:
        return f"verified: key {b.signed_by}"
    if (b.path / SIGNATURE).is_file():
        return "present, not checked (give --public-key)"
    return "unsigned"


def info(
    model: ModelOpt,
    public_key: PublicKeyOpt = None,
    require_signed: RequireSignedOpt = False,
) -> None:
    """Verify a bundle (and its signature, given --public-key); print its summary as JSON."""
    from sdns_monitor.bundle import load_bundle

    b = load_bundle(model, public_key=public_key, require_signed=require_signed)
    m = b.manifest
    summary = {
        "name": m.name,
        "hash": b.hash,
        "signature": _signature_status(b),
        "backbone": m.backbone.model_dump(),
        "input": m.input.model_dump(),
        "score": m.score.model_dump(exclude={"k_selection"}),
        "calibration": m.calibration.model_dump(),
        "training": {
            "data": m.training.data,
            "recipe": m.training.config.get("recipe"),
            "wall_seconds": m.training.wall_seconds,
            "metrics": m.training.metrics,
        },
    }
    typer.echo(json.dumps(summary, indent=2))


def report(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained: one file)")],
    eval_dir: Annotated[
        Path | None,
        typer.Option("--eval", help="Directory of `eval --report DIR`: ROC curves and metrics"),
    ] = None,
    frames: Annotated[
        list[str] | None,
        typer.Option(help="Image files, a directory or a data spec of frames to show (repeatable)"),
    ] = None,
    max_frames: Annotated[int, typer.Option(min=1, help="Show at most N frames")] = 16,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Data spec the bundle was fitted on, to show the nearest reference images "
            "(checked against the manifest's training-data fingerprint)"
        ),
    ] = None,
    neighbours: Annotated[
        int, typer.Option(min=1, max=50, help="Nearest references per frame")
    ] = 5,
    alarm_rate: Annotated[
        float | None, typer.Option(help="Flag when p-value < this (default: the bundle's)")
    ] = None,
    score: ScoreOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Write one self-contained HTML page about a bundle: summary, training curves, calibration
    scores and threshold, an eval's ROC curves, and frames with their nearest references."""
    from sdns_monitor.report import write_model_report  # it loads the model itself

    path = write_model_report(
        model,
        out,
        eval_dir=eval_dir,
        frames=frames or [],
        max_frames=max_frames,
        reference=reference,
        neighbours=neighbours,
        alarm_rate=alarm_rate,
        score=score,
        device=device,
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"wrote {path}")
