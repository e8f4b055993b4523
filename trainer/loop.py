"""The SDNS training loop, top to bottom: multi-crop views and negatives, student and EMA
teacher, the loss, AdamW with per-step schedules, per-parameter clipping, a checkpoint per epoch.

Runs in one process or under `torchrun` (DistributedDataParallel: gloo on CPU, NCCL on GPU);
each process takes its share of every global batch. Randomness is reseeded from (seed, epoch,
rank) at every epoch, so a resumed run repeats the loss curve of an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sdns_monitor.errors import ConfigError, DataError, TrainingError
from sdns_monitor.networks import Backbone, BackboneConfig
from trainer import schedules
from trainer.augment import CropConfig, MultiCrop
from trainer.config import TrainConfig
from trainer.head import Encoder, build_pair, ema_update
from trainer.losses import SdnsLoss
from trainer.precision import autocast, choose_precision

CHECKPOINT = "checkpoint.pt"


@dataclass
class History:
    """Training curves: one value per epoch, and the loss per step (for the report)."""

    epoch_loss: list[float] = field(default_factory=list)
    epoch_positive: list[float] = field(default_factory=list)
    epoch_negative: list[float] = field(default_factory=list)
    epoch_lr: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.__dict__.items()}


@dataclass
class TrainResult:
    teacher: Backbone
    student: Backbone
    history: History
    images_per_second: float
    precision: dict[str, Any] = field(default_factory=dict)  # what `auto` chose, and why


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (single process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for one process)."""
    info = dist_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights only, not on biases and 1-D (norm) parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_per_parameter(module: nn.Module, max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm on its own (DINO's clipping)."""
    for p in module.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def cancel_last_layer_grads(encoder: nn.Module) -> None:
    """Freeze the prototypes while the first epoch(s) settle the rest of the network."""
    for name, p in encoder.named_parameters():
        if "last_layer" in name:
            p.grad = None


class Schedules:
    """Per-step values of every schedule of the run."""

    def __init__(self, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> None:
        warmup = round(cfg.warmup_fraction * total_steps)
        base_lr = cfg.lr * cfg.batch_size / 256.0
        self.lr = schedules.cosine(base_lr, cfg.min_lr, total_steps, warmup)
        self.wd = schedules.cosine(cfg.weight_decay, cfg.weight_decay_end, total_steps)
        self.momentum = schedules.cosine(cfg.momentum_teacher, 1.0, total_steps)
        self.teacher_temp = schedules.linear(cfg.teacher_temp, cfg.teacher_temp_end, total_steps)
        self.freeze_steps = cfg.freeze_last_layer * steps_per_epoch


# `augmentations="geometric"`: every photometric op of the multi-crop off.
GEOMETRIC_ONLY: dict[str, Any] = dict(
    jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0
)


def _to_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 N x H x W x C -> float N x C x H x W in [0, 1] on `device`."""
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


class Trainer:
    """Holds the networks, optimiser and schedules of one run; `fit()` trains to the end."""

    def __init__(
        self,
        cfg: TrainConfig,
        backbone_config: BackboneConfig,
        images: Tensor,
        aux_images: Tensor | None,
        mean: list[float],
        std: list[float],
        device: torch.device,
        checkpoint_dir: Path | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.info = init_distributed(device)
        self.images = images  # uint8 N x H x W x C, on the CPU (or pinned)
        self.aux = aux_images
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        if cfg.batch_size % self.info.world_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                f"({self.info.world_size})"
            )
        n = images.shape[0]
        full = n // cfg.batch_size
        if full == 0:
            raise DataError(
                f"{n} training images are fewer than one batch of {cfg.batch_size}; "
                "give more images or a smaller --batch-size"
            )
        self.steps_per_epoch = cfg.epoch_steps(n)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.sched = Schedules(cfg, self.total_steps, self.steps_per_epoch)

        torch.manual_seed(cfg.seed)
        student, teacher = build_pair(
            backbone_config, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck
        )
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        student = student.to(device).to(memory_format=memory_format)
        self.teacher = teacher.to(device).to(memory_format=memory_format)
        self.teacher.train()  # BN of the teacher normalises with batch statistics, as in DINO
        self.student_module: Encoder = student
        self.student: nn.Module = student
        if self.info.world_size > 1:
            if device.type == "cuda":
                # DINO syncs BN statistics across processes; PyTorch's SyncBatchNorm needs a GPU,
                # so on CPUs each process normalises with its own share of the batch.
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                self.student_module = student
            ids = [device.index] if device.type == "cuda" else None
            self.student = DistributedDataParallel(student, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(student))
        self.loss = SdnsLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, cfg.neg_weight).to(
            device
        )
        _, gsize, lsize = cfg.sizes
        self.crops = MultiCrop(
            CropConfig(
                global_size=gsize,
                local_size=lsize,
                n_local=cfg.n_local,
                global_scale=cfg.global_scale,
                local_scale=cfg.local_scale,
                blur_sigma=cfg.blur_sigma,
                **(GEOMETRIC_ONLY if cfg.augmentations == "geometric" else {}),
            ),
            mean,
            std,
        )
        self.history = History()
        self.start_epoch = 0
        self.bf16, self.precision = choose_precision(self)

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT if self.checkpoint_dir else None

    def save_checkpoint(self, epoch: int) -> None:
        path = self._checkpoint_path()
        if path is None or not self.info.is_main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "config": self.cfg.model_dump_json(),
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss.center,
            "history": self.history.as_dict(),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def resume(self) -> bool:
        """Load the last checkpoint if there is one for this same configuration."""
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # truncated file, foreign format, refused pickle, ...
            raise ConfigError(
                f"cannot resume from {path} ({type(exc).__name__}); delete it or drop --resume"
            ) from None
        if state["config"] != self.cfg.model_dump_json():
            raise ConfigError(
                f"checkpoint {path} was written with other options; "
                "rerun with the same options or without --resume"
            )
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.center.copy_(state["center"])
        self.history = History(**state["history"])
        self.start_epoch = int(state["epoch"]) + 1
        return True

    # ----------------------------------------------------------------- training
    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor | None, torch.Generator]]:
        # Independent streams from (seed, epoch[, rank]): the shared batch order, then per rank
        # the crops, the auxiliary picks and the global stream (drop-path).
        order_seed = np.random.SeedSequence([self.cfg.seed, epoch]).generate_state(1)[0]
        order = torch.randperm(
            self.images.shape[0], generator=torch.Generator().manual_seed(int(order_seed))
        )
        crop_seed, aux_seed, global_seed = (
            int(s)
            for s in np.random.SeedSequence([self.cfg.seed, epoch, self.info.rank]).generate_state(
                3
            )
        )
        gen = torch.Generator(self.device).manual_seed(crop_seed)
        cpu_gen = torch.Generator().manual_seed(aux_seed)
        torch.manual_seed(global_seed)
        size = self.cfg.batch_size
        passes = -(-self.steps_per_epoch // (self.images.shape[0] // size))
        for extra in range(1, passes):  # an epoch longer than one pass: more permutations
            seed = np.random.SeedSequence([self.cfg.seed, epoch, extra]).generate_state(1)[0]
            more = torch.randperm(
                self.images.shape[0], generator=torch.Generator().manual_seed(int(seed))
            )
            order = torch.cat([order[: len(order) // size * size], more])
        for step in range(self.steps_per_epoch):
            batch = order[step * size : (step + 1) * size]
            mine = batch[self.info.rank :: self.info.world_size]
            x = _to_float(self.images[mine], self.device)
            a = None
            if self.aux is not None:
                pick = torch.randint(self.aux.shape[0], (mine.shape[0],), generator=cpu_gen)
                a = _to_float(self.aux[pick], self.device)
            yield x, a, gen

    def _views(
        self, x: Tensor, a: Tensor | None, gen: torch.Generator
    ) -> tuple[list[Tensor], int, int]:
        """All student crops, globals first then locals, and the positive/negative counts."""
        cfg = self.cfg
        pos = self.crops.views(x, gen)
        negs: list[list[Tensor]] = []
        if cfg.negatives != "off":
            if cfg.neg_source in ("both", "id"):
                negs.append(self.crops.views(x, gen, shift_kind=cfg.negatives, n_global=1))
            if cfg.neg_source in ("both", "aux"):
                assert a is not None
                negs.append(self.crops.views(a, gen, shift_kind=cfg.negatives, n_global=1))
        # Order: positive globals, positive locals, then per source its global and locals.
        # Equal sizes stay adjacent so the encoder runs one backbone call per size.
        crops = pos[:2] + [n[0] for n in negs] + pos[2:] + [c for n in negs for c in n[1:]]
        if self.cfg.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        return crops, len(pos), sum(len(n) for n in negs)

    def _split(
        self, logits: list[Tensor], n_pos: int, n_neg_sources: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Undo `_views`' ordering: (positive logits in view order, negative logits)."""
        n_glob_neg = n_neg_sources
        g_pos = logits[:2]
        g_neg = logits[2 : 2 + n_glob_neg]
        rest = logits[2 + n_glob_neg :]
        l_pos = rest[: n_pos - 2]
        l_neg = rest[n_pos - 2 :]
        return g_pos + l_pos, g_neg + l_neg

    def train_step(
        self, step: int, x: Tensor, a: Tensor | None, gen: torch.Generator
    ) -> tuple[float, float, float]:
        sched = self.sched
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(sched.lr[step])
            if i == 0:
                group["weight_decay"] = float(sched.wd[step])
        crops, n_pos, n_neg = self._views(x, a, gen)
        n_sources = 0 if n_neg == 0 else n_neg // (1 + self.cfg.n_local)
        with autocast(self.device, self.bf16):
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.student(crops)
            pos, neg = self._split(student_out, n_pos, n_sources)
            parts = self.loss(pos, teacher_out, neg, float(sched.teacher_temp[step]))
        if not math.isfinite(parts.total.item()):
            raise TrainingError(
                f"the loss became {parts.total.item()} at step {step}; lower --lr and rerun"
            )
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if self.cfg.clip_grad > 0:
            clip_per_parameter(self.student_module, self.cfg.clip_grad)
        if step < sched.freeze_steps:
            cancel_last_layer_grads(self.student_module)
        self.optimizer.step()
        ema_update(self.teacher, self.student_module, float(sched.momentum[step]))
        return parts.total.item(), parts.positive.item(), parts.negative.item()

    def fit(self) -> TrainResult:
        self.student.train()
        seen, started = 0, time.perf_counter()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            sums = np.zeros(3)
            for i, (x, a, gen) in enumerate(self._batches(epoch)):
                step = epoch * self.steps_per_epoch + i
                loss, pos, neg = self.train_step(step, x, a, gen)
                sums += (loss, pos, neg)
                self.history.step_loss.append(loss)
                seen += self.cfg.batch_size
                if self.progress is not None and self.info.is_main:
                    self.progress(
                        dict(
                            epoch=epoch + 1,
                            epochs=self.cfg.epochs,
                            step=i + 1,
                            steps=self.steps_per_epoch,
                            loss=loss,
                            pos=pos,
                            neg=neg,
                            lr=float(self.sched.lr[step]),
                            img_s=seen / (time.perf_counter() - started),
                        )
                    )
            mean = sums / self.steps_per_epoch
            self.history.epoch_loss.append(float(mean[0]))
            self.history.epoch_positive.append(float(mean[1]))
            self.history.epoch_negative.append(float(mean[2]))
            self.history.epoch_lr.append(
                float(self.sched.lr[(epoch + 1) * self.steps_per_epoch - 1])
            )
            self.history.epoch_seconds.append(time.perf_counter() - t0)
            self.save_checkpoint(epoch)
        elapsed = max(time.perf_counter() - started, 1e-9)
        return TrainResult(
            teacher=self.teacher.backbone,
            student=self.student_module.backbone,
            history=self.history,
            images_per_second=seen / elapsed,
            precision=self.precision,
        )
