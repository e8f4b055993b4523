"""`python -m sdns_monitor.cli` and `torchrun -m sdns_monitor.cli`: the console script."""

from sdns_monitor.cli.app import main

main()
