"""fp32 vs bf16 autocast for one SDNS training step, side by side in one run.

The training config's `precision: auto` (`TrainConfig.precision`) uses bf16 on GPUs, and on
CPUs with native bf16 when a timed step says it is faster (trainer.loop); this measures both
side by side on the CPU at hand, and the seconds per step that size the recipes.

    python benchmarks/precision.py [--recipe quick] [--steps 5] [--size 64 --channels 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from sdns_monitor.networks import BackboneConfig
from trainer.config import make_config
from trainer.loop import Trainer
from trainer.precision import cpu_has_bf16


def time_steps(
    precision: str, channels_last: bool, recipe: str, steps: int, size: int = 28, channels: int = 1
) -> float:
    """Training images/s of `recipe` at `size` px, negatives from the images and from random
    auxiliary images of the same size (as the recipes' "both")."""
    cfg = make_config(recipe, precision=precision, channels_last=channels_last, data_size=size)
    cfg = cfg.with_sizes(size)
    shape = (cfg.batch_size * (steps + 1), size, size, channels)
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    aux = torch.randint(0, 256, (256, size, size, channels), dtype=torch.uint8)
    backbone = BackboneConfig(
        name=cfg.backbone, width=cfg.width, in_channels=channels, image_size=size
    )
    mean, std = [0.5] * channels, [0.25] * channels
    tr = Trainer(cfg, backbone, images, aux, mean, std, torch.device("cpu"))
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
    ap.add_argument("--size", type=int, default=28, help="frame side in px")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads; native bf16: {cpu_has_bf16()}; recipe {args.recipe}, {args.size} px"
    )
    print("| precision | channels-last | images/s | s/step |\n|---|---|---|---|")
    batch = make_config(args.recipe).batch_size
    for precision in args.precisions:
        for cl in (False, True):
            ips = time_steps(precision, cl, args.recipe, args.steps, args.size, args.channels)
            print(f"| {precision} | {cl} | {ips:.0f} | {batch / ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
