"""fp32 vs bf16 autocast for one SDNS training step, side by side in one run.

The training config's `precision: auto` (recipes, `TrainConfig.precision`) uses bf16 on GPUs
only; this measures whether that holds on the CPU at
hand (the prototype in METHOD.md saw bf16 3-5x faster on other CPUs).

    python benchmarks/precision.py [--recipe quick] [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sdns_monitor.networks import BackboneConfig
from trainer.config import make_config
from trainer.loop import Trainer


def time_steps(precision: str, channels_last: bool, recipe: str, steps: int) -> float:
    cfg = make_config(
        recipe, precision=precision, channels_last=channels_last, aux=[], neg_source="id"
    )
    cfg = cfg.with_sizes(28)
    images = torch.randint(0, 256, (cfg.batch_size * (steps + 1), 28, 28, 1), dtype=torch.uint8)
    backbone = BackboneConfig(name=cfg.backbone, width=cfg.width, in_channels=1, image_size=28)
    tr = Trainer(cfg, backbone, images, None, [0.5], [0.25], torch.device("cpu"))
    batches = tr._batches(0)
    x, a, g = next(batches)
    tr.train_step(0, x, a, g)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        x, a, g = next(batches)
        tr.train_step(i + 1, x, a, g)
    return cfg.batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="quick")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print("| precision | channels-last | images/s |\n|---|---|---|")
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            ips = time_steps(precision, cl, args.recipe, args.steps)
            print(f"| {precision} | {cl} | {ips:.0f} |", flush=True)


if __name__ == "__main__":
    main()
