"""Training configuration and the named recipes.

A recipe is a set of overrides on `TrainConfig`'s defaults; flags given on the command line
override the recipe. Every schedule is defined over the run's total number of steps, so scaled
recipes keep them proportional to the number of epochs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdns_monitor.errors import ConfigError, first_problem

Negatives = Literal["rot", "rot360", "perm4", "perm16", "pixperm", "none", "off"]
NegativeSource = Literal["both", "id", "aux"]
Precision = Literal["auto", "fp32", "bf16"]


class TrainConfig(BaseModel):
    """Every hyperparameter of one `fit` run. Stored in the bundle manifest."""

    model_config = ConfigDict(extra="forbid")

    recipe: str = "default"
    seed: int = 0

    # Backbone and input.
    backbone: str = "cnn-small"
    width: int = Field(16, ge=4)
    patch_size: int = Field(4, ge=1)
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)
    # Images are stored and scored at data_size, and crops are resized to global_size /
    # local_size for the encoder. None: data_size from the data (capped at 32), global_size =
    # data_size, local_size = global_size // 2. See `with_sizes`.
    data_size: int | None = Field(None, ge=8)
    global_size: int | None = Field(None, ge=8)
    local_size: int | None = Field(None, ge=4)
    n_local: int = Field(4, ge=0)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.15, 0.4)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # The photometric augmentations of the positive views (trainer.augment): "dino" (colour
    # jitter, grayscale, Gaussian blur, solarize, as DINO) teaches the encoder to ignore blur,
    # exposure and colour; "geometric" keeps crops and flips only, so those changes stay
    # visible to the learned features (a monitor must see them). Negatives use the same ones.
    # Measured on the camera benchmark's validation frames (quick, 64 px): geometric gained
    # nothing (SDNS 0.922 vs 0.921, the combined default 0.996 vs 0.998), so dino stays.
    augmentations: Literal["dino", "geometric"] = "dino"

    # Head and loss.
    out_dim: int = Field(4096, ge=2)
    head_hidden: int = Field(2048, ge=8)
    head_bottleneck: int = Field(256, ge=8)
    negatives: Negatives = "rot"
    neg_source: NegativeSource = "both"
    neg_weight: float = Field(1.0, ge=0.0)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)
    teacher_temp_end: float = Field(0.01, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)

    # Optimisation.
    epochs: int = Field(10, ge=1)
    # Optimiser steps per epoch; an epoch longer than one pass over the training images draws
    # a new permutation per pass. None: from `steps_by_size`, else one pass (the run's length
    # then grows with the data).
    steps_per_epoch: int | None = Field(None, ge=1)
    # The run's optimiser steps by model input side: (side, steps) pairs, smallest side first;
    # the first pair whose side is at least the input's applies, and past the last one the
    # steps shrink with the input's area, so that a fit's time stays about the same.
    steps_by_size: list[tuple[int, int]] | None = None
    batch_size: int = Field(128, ge=2)  # global, in-distribution images per step
    lr: float = Field(0.004, gt=0)  # per 256 images of global batch
    min_lr: float = Field(1e-6, ge=0)
    warmup_fraction: float = Field(0.06, ge=0, lt=1)  # of all steps (paper: 30 of 500 epochs)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum_teacher: float = Field(0.996, ge=0, le=1)
    clip_grad: float = Field(3.0, ge=0)  # per parameter; 0 disables
    freeze_last_layer: int = Field(1, ge=0)  # epochs
    precision: Precision = "auto"
    channels_last: bool = True

    # Data splits, reference bank and score.
    aux: list[str] = Field(default_factory=lambda: ["photos", "textures"])
    calibration_fraction: float = Field(0.1, gt=0, lt=1)
    max_calibration: int = Field(5000, ge=10)
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    bank_size: int | None = Field(None, ge=1)  # None: every training image
    score_temperature: float = Field(0.04, gt=0)
    # Top-k of the kernel score: a number, "all" (exact sum over the bank), or None to choose
    # on validation data (trainer.selection.choose_k).
    score_k: Annotated[int, Field(ge=1)] | Literal["all"] | None = None
    index_factory: str = "Flat"
    # The combined score (sdns_monitor.lowlevel): a bank of compact pixel features beside the
    # SDNS bank, at most this many images; the bundle's default score is whichever of SDNS and
    # combined has the higher validation AUROC.
    lowlevel: bool = True
    # Validation shifts or camera degradations (trainer.degradations) to leave out of the
    # set that chooses k and the score; the camera benchmark's leave-one-family-out runs.
    validation_exclude: list[str] = Field(default_factory=list)
    lowlevel_bank: int = Field(10_000, ge=100)
    alarm_rate: float = Field(0.01, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.negatives == "none" and self.neg_source != "aux":
            raise ValueError(
                "negatives 'none' (raw auxiliary images) needs neg_source 'aux'; "
                "in-distribution images are never negatives without a shift"
            )
        if self.negatives != "off" and self.neg_source != "id" and not self.aux:
            raise ValueError(
                f"neg_source {self.neg_source!r} needs auxiliary data: pass --aux SPEC "
                "or use in-distribution negatives only"
            )
        if self.data_size and self.global_size and self.global_size < self.data_size:
            raise ValueError("global_size must be at least data_size")
        return self

    def with_sizes(self, native_size: int) -> TrainConfig:
        """Fill the sizes left open from the data's native (largest) side."""
        data = self.data_size or min(native_size, 32)
        glob = self.global_size or data
        local = self.local_size or max(glob // 2, 4)
        return self.model_copy(update=dict(data_size=data, global_size=glob, local_size=local))

    def epoch_steps(self, n_train: int) -> int:
        """Optimiser steps per epoch for `n_train` training images: `steps_per_epoch`, else
        the run's steps for the input size (`steps_by_size`) spread over the epochs, else one
        pass."""
        if self.steps_per_epoch:
            return self.steps_per_epoch
        if self.steps_by_size and self.global_size:
            return -(-self.total_steps_at(self.global_size) // self.epochs)
        return max(1, n_train // self.batch_size)

    def total_steps_at(self, side: int) -> int:
        """The run's optimiser steps at a model input of `side` px (`steps_by_size`)."""
        if not self.steps_by_size:
            raise RuntimeError("the recipe sizes its run in epochs (no steps_by_size)")
        for largest, steps in self.steps_by_size:
            if side <= largest:
                return steps
        largest, steps = self.steps_by_size[-1]
        return max(1, round(steps * (largest / side) ** 2))

    def with_steps(self, n_train: int) -> TrainConfig:
        """`steps_per_epoch` resolved for `n_train` training images (the manifest records it)."""
        return self.model_copy(update=dict(steps_per_epoch=self.epoch_steps(n_train)))

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(data, global, local) sizes; only valid after `with_sizes`."""
        if not (self.data_size and self.global_size and self.local_size):
            raise RuntimeError("sizes not resolved: call with_sizes first")
        return self.data_size, self.global_size, self.local_size

    @property
    def uses_aux(self) -> bool:
        return self.negatives != "off" and self.neg_source in ("both", "aux")


RECIPES: dict[str, dict[str, Any]] = {
    # At most 3 minutes on 2 CPU cores for 60k 28 px images, end to end: demos and tests;
    # 160 optimiser steps whatever the reference size.
    "quick": dict(
        # DINO freezes the prototypes for 1 of 100+ epochs; in a one-epoch run that would
        # freeze them for the whole run, so the short recipes do not.
        freeze_last_layer=0,
        width=16,
        out_dim=1024,
        head_hidden=512,
        n_local=2,
        epochs=1,
        steps_per_epoch=160,
        batch_size=64,
        momentum_teacher=0.98,
        bank_size=20000,
        score_k=200,
    ),
    # The best quality within 30 minutes on 2 CPU cores at 28-32 px and within 60 at 64 px
    # colour, whatever the reference size: 1,600 optimiser steps up to 32 px (one camera's
    # 5,000 frames train as much as 60,000 images, which get about two passes), 800 up to
    # 64 px (a step costs about 4x as much there: 3.5 s against 0.8 s on 2 cores), and
    # fewer in proportion to the area beyond.
    "default": dict(
        freeze_last_layer=0,
        width=16,
        out_dim=2048,
        head_hidden=1024,
        n_local=4,
        epochs=2,
        steps_per_epoch=None,
        steps_by_size=[(32, 1600), (64, 800)],
        batch_size=64,
        momentum_teacher=0.99,
    ),
    # The paper's CIFAR-10 recipe (METHOD.md "Optimisation").
    "paper-cifar10": dict(
        backbone="vit-small",
        patch_size=16,
        drop_path=0.1,
        data_size=32,
        global_size=256,
        local_size=128,
        n_local=8,
        out_dim=4096,
        head_hidden=2048,
        epochs=500,
        steps_per_epoch=None,
        batch_size=128,
        lr=0.004,
        warmup_fraction=30 / 500,
        momentum_teacher=0.996,
        bank_size=None,
        score_k="all",  # the paper sums over every training feature
    ),
}


def make_config(recipe: str = "default", **overrides: Any) -> TrainConfig:
    """Recipe values, then explicit overrides (None means "not given"). Raises ConfigError."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values: dict[str, Any] = {"recipe": recipe, **RECIPES[recipe]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("negatives") == "none" and overrides.get("neg_source") is None:
        values["neg_source"] = "aux"  # raw images as negatives can only be auxiliary ones
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        where, what = first_problem(exc)
        raise ConfigError(f"invalid training option {where or 'config'}: {what}") from None
