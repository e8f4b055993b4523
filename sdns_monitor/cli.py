"""The `sdns-monitor` command line.

Every error a user can meet is printed on one line, without a traceback: exit code 2 for an
invalid option or combination, 1 for anything else (bad data, bad bundle, ...).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from sdns_monitor.errors import BundleError, ConfigError, SdnsError

app = typer.Typer(
    name="sdns-monitor",
    help="Out-of-distribution monitoring of image streams (SDNS: self-distillation with negative sampling).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


class ScoreOpt(StrEnum):
    auto = "auto"
    sdns = "sdns"
    combined = "combined"


SCORE_HELP = "sdns (the paper's), combined (with the low-level score), or auto (the bundle's)"


class BackendOpt(StrEnum):
    auto = "auto"
    eager = "eager"
    compile = "compile"
    tensorrt = "tensorrt"


BACKEND_HELP = "Encoder backend: auto (the fastest available), eager, compile or tensorrt"

PublicKeyOpt = Annotated[
    Path | None,
    typer.Option(help="Ed25519 public key: a signed bundle must verify with it (see `sign`)"),
]
RequireSignedOpt = Annotated[
    bool, typer.Option("--require-signed", help="Refuse unsigned bundles (needs --public-key)")
]


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


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


@app.command()
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
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(min=1)] = None,
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


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="Model bundle")],
    id: Annotated[str, typer.Option("--id", help="In-distribution test data spec")],
    ood: Annotated[list[str], typer.Option(help="Out-of-distribution data spec (repeatable)")],
    json_out: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object")] = False,
    report: Annotated[Path | None, typer.Option(help="Write ROC and histogram PNGs here")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score at most N images per set (seeded subset)")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    score: Annotated[ScoreOpt, typer.Option(help=SCORE_HELP)] = ScoreOpt.auto,
    backend: Annotated[BackendOpt, typer.Option(help=BACKEND_HELP)] = BackendOpt.eager,
    public_key: PublicKeyOpt = None,
    require_signed: RequireSignedOpt = False,
) -> None:
    """AUROC, FPR at 95% TPR and AUPR of the anomaly score, in-distribution vs each OOD set."""
    from sdns_monitor.detector import Detector
    from sdns_monitor.eval_bundle import evaluate_bundle

    det = Detector.load(
        model,
        device=device,
        score=score.value,
        backend=backend.value,
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


@app.command()
def score(
    spec: Annotated[str, typer.Argument(help="Data spec of the images to score")],
    model: Annotated[Path, typer.Option(help="Model bundle")],
    alarm_rate: Annotated[
        float | None, typer.Option(help="Flag when p-value < this (default: the bundle's)")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Flag when score > this (instead of --alarm-rate)")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    score: Annotated[ScoreOpt, typer.Option(help=SCORE_HELP)] = ScoreOpt.auto,
    backend: Annotated[BackendOpt, typer.Option(help=BACKEND_HELP)] = BackendOpt.eager,
    public_key: PublicKeyOpt = None,
    require_signed: RequireSignedOpt = False,
) -> None:
    """Score images; print one JSON line per image."""
    from sdns_monitor.data import load_dataset
    from sdns_monitor.detector import Detector, check_rule

    check_rule(alarm_rate, threshold)
    det = Detector.load(
        model,
        device=device,
        score=score.value,
        backend=backend.value,
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


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="Existing model bundle")],
    data: Annotated[str, typer.Option(help="New in-distribution data, not used in training")],
    out: Annotated[Path, typer.Option(help="New bundle to write")],
    alarm_rate: Annotated[float | None, typer.Option(help="New default alarm rate")] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Recalibrate the p-values on new reference data, without retraining; writes a new bundle."""
    from sdns_monitor.calibrate import recalibrate

    path = recalibrate(model, data, out, alarm_rate=alarm_rate, device=device)
    typer.echo(f"wrote {path}")


@app.command()
def run(
    topic: Annotated[list[str] | None, typer.Option(help="Topic to watch (repeatable)")] = None,
    topic_pattern: Annotated[
        str | None, typer.Option(help="Regex of topics to watch instead")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Model bundle")] = None,
    config: Annotated[
        Path | None, typer.Option(envvar="SDNS_CONFIG", help="TOML or JSON file of settings")
    ] = None,
    bootstrap_servers: Annotated[str | None, typer.Option()] = None,
    group_id: Annotated[str | None, typer.Option()] = None,
    alert_topic: Annotated[str | None, typer.Option()] = None,
    dlq_topic: Annotated[str | None, typer.Option()] = None,
    scores_topic: Annotated[
        str | None, typer.Option(help="One record per frame (optional)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_wait_ms: Annotated[
        int | None, typer.Option(help="Longest wait for a micro-batch to fill")
    ] = None,
    decode_workers: Annotated[
        int | None, typer.Option(help="Threads decoding frames (default 2)")
    ] = None,
    queue_batches: Annotated[
        int | None, typer.Option(help="Micro-batches in flight before the consumer pauses")
    ] = None,
    alarm_rate: Annotated[float | None, typer.Option(help="Flag when p-value < this")] = None,
    threshold: Annotated[float | None, typer.Option(help="Flag when score > this instead")] = None,
    from_beginning: Annotated[
        bool | None,
        typer.Option("--from-beginning", help="Start a new group at the earliest offsets"),
    ] = None,
    max_frame_bytes: Annotated[
        int | None, typer.Option(help="Larger messages go to the dead-letter topic")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    score: Annotated[ScoreOpt | None, typer.Option(help=SCORE_HELP)] = None,
    backend: Annotated[BackendOpt | None, typer.Option(help=BACKEND_HELP)] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where engine caches go")] = None,
    metrics_host: Annotated[
        str | None, typer.Option(help="Address of /metrics, /healthz, /readyz")
    ] = None,
    metrics_port: Annotated[
        str | None, typer.Option(help="Port of /metrics (default 9108; 0: any free; off)")
    ] = None,
    incident_window_s: Annotated[
        float | None, typer.Option(help="Quiet seconds that close a camera's incident")
    ] = None,
    incident_cooldown_s: Annotated[
        float | None, typer.Option(help="Seconds between alerts of one incident")
    ] = None,
    reload_check_s: Annotated[
        float | None, typer.Option(help="How often to look for a changed bundle (0: never)")
    ] = None,
    public_key: PublicKeyOpt = None,
    require_signed: Annotated[
        bool | None,
        typer.Option("--require-signed", help="Refuse unsigned bundles (needs --public-key)"),
    ] = None,
    session_timeout_ms: Annotated[int | None, typer.Option()] = None,
    heartbeat_interval_ms: Annotated[int | None, typer.Option()] = None,
    security_protocol: Annotated[str | None, typer.Option()] = None,
    sasl_mechanism: Annotated[str | None, typer.Option()] = None,
    sasl_plain_username: Annotated[str | None, typer.Option()] = None,
    ssl_cafile: Annotated[Path | None, typer.Option()] = None,
    ssl_certfile: Annotated[Path | None, typer.Option()] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Watch Kafka topics of image frames; publish an alert for every out-of-distribution frame.

    Every option can also be set as SDNS_<OPTION> (e.g. SDNS_BOOTSTRAP_SERVERS) or in --config;
    passwords only through the environment or the config file (SDNS_SASL_PLAIN_PASSWORD).
    """
    given = {k: v for k, v in locals().items() if k != "config"}  # the options, before imports
    given["score"] = score.value if score is not None else None
    given["backend"] = backend.value if backend is not None else None
    import logging
    import os
    import signal

    from sdns_monitor.settings import load_settings
    from sdns_monitor.stream import ClientLogThrottle, StreamMonitor

    settings = load_settings(given, os.environ, config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO lines are per connection
    logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loads, at INFO
    for handler in logging.getLogger().handlers:  # an outage: one line a minute per kind
        handler.addFilter(ClientLogThrottle())
    monitor = StreamMonitor(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: monitor.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: monitor.reload())
    watched = settings.topic_pattern or ", ".join(settings.topic)
    typer.echo(
        f"watching {watched} on {settings.bootstrap_servers} with model {monitor.detector.name} "
        f"({monitor.detector.hash[:12]})"
        + (f" and {len(settings.routes)} routes" if settings.routes else "")
        + "; SIGHUP reloads the models, SIGTERM stops",
        err=True,
    )
    stats = monitor.run()
    typer.echo(f"stopped: {stats.summary()}", err=True)


@app.command()
def broker(
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on")] = 9092,
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default)")
    ] = "127.0.0.1",
    storage: Annotated[
        str, typer.Option(help="Tansu storage URL: memory://tansu/ or s3://bucket/")
    ] = "memory://tansu/",
) -> None:
    """Run the development Kafka-protocol broker (Tansu) in the foreground until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from sdns_monitor.broker import BrokerError, start_broker

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running = start_broker(port, host=host, storage=storage)
    typer.echo(
        f"Kafka-protocol broker (Tansu) listening on {running.bootstrap_servers}, "
        f"storage {storage}; Ctrl-C or SIGTERM stops it",
    )
    try:
        while not stop.wait(0.5):
            if not running.alive():
                raise BrokerError(f"the broker exited with code {running.process.returncode}")
    finally:
        running.stop()
    typer.echo("broker stopped")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the model, logs and report go")] = Path(
        "runs/demo"
    ),
    model: Annotated[
        Path | None, typer.Option(help="Use this bundle instead of fitting the quick model")
    ] = None,
    refit: Annotated[bool, typer.Option(help="Fit again even if WORKDIR has a model")] = False,
    id_frames: Annotated[int, typer.Option(min=10, help="In-distribution frames to send")] = 1500,
    ood_frames: Annotated[
        int, typer.Option(min=5, help="Frames per out-of-distribution source")
    ] = 100,
    alarm_rate: Annotated[
        float | None, typer.Option(help="Flag when p-value < this (default: the bundle's)")
    ] = None,
) -> None:
    """The whole loop in minutes: fit a quick model on Fashion-MNIST (cached), start a broker,
    stream cameras with in- and out-of-distribution frames, and measure the alerts."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from sdns_monitor.bundle import load_bundle
    from sdns_monitor.demo import run_demo, summary_rows

    console = Console(stderr=True)
    if model is None:
        model = workdir / "model.sdns"
        try:
            if refit:
                raise BundleError("refit asked for")
            load_bundle(model)
            console.print(f"reusing the model in {model} (--refit fits a new one)")
        except BundleError:
            import shutil

            shutil.rmtree(model, ignore_errors=True)
            console.print("fitting the quick recipe on fashion-mnist:train (about 2 minutes)")
            fit(data="fashion-mnist:train", out=model, recipe="quick")
    bar = Progress(
        TextColumn("monitoring"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} frames"),
        TextColumn("{task.fields[rate]}"),
        console=console,
    )
    task = bar.add_task("run", total=None, rate="")
    started = [0.0]

    def progress(done: int, total: int) -> None:
        import time

        started[0] = started[0] or time.monotonic()
        rate = done / max(time.monotonic() - started[0], 1e-9)
        bar.update(task, completed=done, total=total, rate=f"{rate:.0f} frames/s")

    with bar:
        summary = run_demo(
            model,
            workdir,
            n_id=id_frames,
            n_ood=ood_frames,
            alarm_rate=alarm_rate,
            progress=progress,
            log=console.print,
        )
    table = Table(title="sdns-monitor demo", show_header=False)
    for what, value in summary_rows(summary):
        table.add_row(what, value)
    Console().print(table)
    kinds = Table(title="flag rate per source")
    for column in ("source", "distribution", "frames", "flagged", "rate"):
        kinds.add_column(column)
    for kind, counts in sorted(summary.per_kind.items()):
        frames, flagged = counts.get("frames", 0), counts.get("flagged", 0)
        kinds.add_row(
            kind,
            "in" if kind == "fashion-mnist" else "out",
            str(frames),
            str(flagged),
            f"{flagged / max(frames, 1):.3f}",
        )
    Console().print(kinds)
    typer.echo(f"report with the flagged frames: {summary.report}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model bundle")],
    backend: Annotated[BackendOpt, typer.Option(help=BACKEND_HELP)] = BackendOpt.tensorrt,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Engine cache (default ~/.cache/sdns-monitor)")
    ] = None,
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

    det = Detector.load(
        model, device=device, backend=backend.value, cache_dir=cache_dir, batch_size=batch_size
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


@app.command()
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


@app.command()
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


@app.command()
def info(
    model: Annotated[Path, typer.Option(help="Model bundle")],
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


@app.command()
def report(
    model: Annotated[Path, typer.Option(help="Model bundle")],
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
    score: Annotated[ScoreOpt, typer.Option(help=SCORE_HELP)] = ScoreOpt.auto,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Write one self-contained HTML page about a bundle: summary, training curves, calibration
    scores and threshold, an eval's ROC curves, and frames with their nearest references."""
    from sdns_monitor.report import write_model_report

    path = write_model_report(
        model,
        out,
        eval_dir=eval_dir,
        frames=frames or [],
        max_frames=max_frames,
        reference=reference,
        neighbours=neighbours,
        alarm_rate=alarm_rate,
        score=score.value,
        device=device,
        log=lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"wrote {path}")


def main() -> None:
    """Console entry point: run the app, turning project errors into one-line messages."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # a bad option value, a missing option, a bad command
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "sdns-monitor"
        message = str(exc.format_message()).replace("Value error, ", "").rstrip(".")  # type: ignore[attr-defined]
        if message:  # empty after no_args_is_help printed the help
            _err(f"{message}; see `{where} --help`")
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    except ConfigError as exc:
        _err(str(exc))
        sys.exit(2)
    except SdnsError as exc:
        _err(str(exc))
        sys.exit(1)
    except OSError as exc:  # unwritable --out or --report, full disk, ...
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"{exc.strerror or exc}{where}; check the path and its permissions")
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(n) and --help come back as a number
        sys.exit(code)


if __name__ == "__main__":
    main()
