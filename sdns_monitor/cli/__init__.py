"""The `sdns-monitor` command line: the commands, in the order `--help` lists them.

app.py holds the typer app and the entry point that prints errors in one line; options.py the
model-loading options several commands share; train.py, model.py, run.py and tools.py the
commands. Each command imports what it needs inside itself, so the CLI starts without torch.
"""

from sdns_monitor.cli import model, run, tools, train
from sdns_monitor.cli.app import app, main
from sdns_monitor.cli.train import fit

app.command()(train.fit)
app.command("eval")(model.evaluate)
app.command()(model.score)
app.command()(train.calibrate)
app.command()(run.run)
app.command()(tools.broker)
app.command()(tools.demo)
app.command()(model.export)
app.command()(model.keygen)
app.command()(model.sign)
app.command()(model.info)
app.command()(model.report)

__all__ = ["app", "fit", "main"]
