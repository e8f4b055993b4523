"""`broker` and `demo`: a development Kafka-protocol broker, and the whole loop in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdns_monitor.cli.train import fit
from sdns_monitor.errors import BundleError


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
