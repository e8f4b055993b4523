"""The training loop: optimiser groups, clipping, last-layer freezing, EMA teacher, seeding and
resuming from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trainer.loop as loop
import trainer.precision as precision
from sdns_monitor.errors import ConfigError, DataError, SdnsError
from sdns_monitor.networks import BackboneConfig
from trainer.config import TrainConfig, make_config
from trainer.head import build_pair
from trainer.loop import Trainer, cancel_last_layer_grads, clip_per_parameter, param_groups

BACKBONE = BackboneConfig(name="cnn-small", in_channels=1, image_size=16, width=4)


def _config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        width=4,
        out_dim=32,
        head_hidden=16,
        head_bottleneck=8,
        batch_size=8,
        steps_per_epoch=2,
        epochs=2,
        n_local=1,
        aux=[],
        neg_source="id",
    )
    values.update(overrides)
    return make_config("quick", **values).with_sizes(16)


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (64, 16, 16, 1), dtype=torch.uint8, generator=g)


def _trainer(cfg: TrainConfig, checkpoint_dir: Path | None = None) -> Trainer:
    return Trainer(
        cfg, BACKBONE, _images(), None, [0.5], [0.25], torch.device("cpu"), checkpoint_dir
    )


# --- helpers ---------------------------------------------------------------------------


def test_param_groups_exempt_biases_and_1d_params_from_weight_decay() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5), nn.LayerNorm(5))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    net.append(frozen)
    decay, no_decay = param_groups(net)
    assert "weight_decay" not in decay  # set per step by the loop
    assert no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(net[0].weight), id(net[2].weight)}
    assert ids(no_decay["params"]) == {
        id(net[0].bias),
        id(net[1].weight),
        id(net[1].bias),
        id(net[2].bias),
        id(net[3].weight),
        id(net[3].bias),
    }


def test_clip_per_parameter_clips_each_large_gradient_on_its_own() -> None:
    net = nn.Linear(3, 4)
    big = torch.full_like(net.weight, 5.0)  # norm 5 * sqrt(12) ~ 17
    small = torch.tensor([0.1, -0.2, 0.3, 0.0])
    net.weight.grad = big.clone()
    net.bias.grad = small.clone()
    clip_per_parameter(net, 3.0)
    assert net.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    # Direction kept.
    torch.testing.assert_close(net.weight.grad / net.weight.grad.norm(), big / big.norm())
    assert torch.equal(net.bias.grad, small)


def test_cancel_last_layer_grads_only_drops_the_prototypes() -> None:
    student, _ = build_pair(BACKBONE, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_grads(student)
    last = [n for n, _ in student.named_parameters() if "last_layer" in n]
    assert len(last) == 2  # weight norm g and direction v
    for name, p in student.named_parameters():
        if name in last:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name


# --- a tiny run ------------------------------------------------------------------------


def test_tiny_run_trains_with_ema_teacher_and_frozen_last_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _config(epochs=2, steps_per_epoch=2, freeze_last_layer=1)
    tr = _trainer(cfg)
    assert (tr.steps_per_epoch, tr.total_steps, tr.sched.freeze_steps) == (2, 4, 2)
    initial_student = {k: v.clone() for k, v in tr.student_module.named_parameters()}
    records: list[dict[str, Any]] = []
    real_ema = loop.ema_update

    def recording_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
        before = {k: v.clone() for k, v in teacher.named_parameters()}
        real_ema(teacher, student, momentum)
        records.append(
            dict(
                momentum=momentum,
                teacher_before=before,
                teacher_after={k: v.clone() for k, v in teacher.named_parameters()},
                student={k: v.detach().clone() for k, v in student.named_parameters()},
            )
        )

    monkeypatch.setattr(loop, "ema_update", recording_ema)
    result = tr.fit()

    h = result.history
    assert len(h.step_loss) == 4
    assert all(torch.isfinite(torch.tensor(h.step_loss)))
    assert len(h.epoch_loss) == 2
    assert h.epoch_loss[0] == pytest.approx(sum(h.step_loss[:2]) / 2)
    assert result.teacher is tr.teacher.backbone

    assert len(records) == 4
    for step, r in enumerate(records):
        m = r["momentum"]
        assert m == pytest.approx(float(tr.sched.momentum[step]))
        assert 0.9 < m < 1.0 or step == 3  # cosine 0.98 -> 1.0
        for name, after in r["teacher_after"].items():
            expected = m * r["teacher_before"][name] + (1 - m) * r["student"][name]
            torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-7)
    # The teacher moved during the run (its first steps have momentum < 1).
    first = records[0]
    assert any(
        not torch.equal(first["teacher_after"][n], first["teacher_before"][n])
        for n in first["teacher_after"]
    )

    def last_layer_changed(state: dict[str, torch.Tensor]) -> bool:
        return any(
            not torch.equal(v, initial_student[k]) for k, v in state.items() if "last_layer" in k
        )

    def body_changed(state: dict[str, torch.Tensor]) -> bool:
        return any(
            not torch.equal(v, initial_student[k])
            for k, v in state.items()
            if "last_layer" not in k
        )

    # Epoch 0 (steps 0, 1): the prototypes are frozen, the rest trains.
    assert not last_layer_changed(records[0]["student"])
    assert not last_layer_changed(records[1]["student"])
    assert body_changed(records[0]["student"])
    # Epoch 1: the prototypes train too.
    assert last_layer_changed(records[2]["student"])


def test_learning_rate_follows_warmup_schedule() -> None:
    cfg = _config(epochs=2, steps_per_epoch=2, warmup_fraction=0.5, lr=0.004)
    tr = _trainer(cfg)
    base = 0.004 * 8 / 256
    assert tr.sched.lr[0] == 0.0
    assert tr.sched.lr[2] == pytest.approx(base)
    assert tr.sched.teacher_temp[0] == pytest.approx(cfg.teacher_temp)
    assert tr.sched.teacher_temp[-1] == pytest.approx(cfg.teacher_temp_end)


def test_same_seed_gives_identical_loss_curves() -> None:
    a = _trainer(_config(seed=3)).fit().history.step_loss
    b = _trainer(_config(seed=3)).fit().history.step_loss
    c = _trainer(_config(seed=4)).fit().history.step_loss
    assert a == b
    assert a != c


class _Interrupted(Exception):
    pass


def test_checkpoint_after_training_loads_with_weights_only(tmp_path: Path) -> None:
    cfg = _config(epochs=1, steps_per_epoch=1)
    _trainer(cfg, tmp_path / "w").fit()
    resumed = _trainer(cfg, tmp_path / "w")
    assert resumed.resume()
    assert resumed.start_epoch == 1


def test_resumed_run_repeats_the_uninterrupted_one(tmp_path: Path) -> None:
    cfg = _config(epochs=2, steps_per_epoch=2)
    full = _trainer(cfg, tmp_path / "a")
    full_history = full.fit().history

    interrupted = _trainer(cfg, tmp_path / "b")
    real_save = interrupted.save_checkpoint

    def save_then_stop(epoch: int) -> None:
        real_save(epoch)
        raise _Interrupted

    interrupted.save_checkpoint = save_then_stop  # type: ignore[method-assign]
    with pytest.raises(_Interrupted):
        interrupted.fit()
    assert len(interrupted.history.step_loss) == 2

    resumed = _trainer(cfg, tmp_path / "b")
    assert resumed.resume()
    assert resumed.start_epoch == 1
    resumed_history = resumed.fit().history
    assert resumed_history.step_loss == pytest.approx(full_history.step_loss, rel=1e-6, abs=1e-6)
    assert resumed_history.epoch_loss == pytest.approx(full_history.epoch_loss, rel=1e-6)
    full_state, resumed_state = full.teacher.state_dict(), resumed.teacher.state_dict()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    tr = _trainer(_config(), tmp_path / "none")
    assert not tr.resume()
    assert tr.start_epoch == 0
    assert not _trainer(_config()).resume()  # no checkpoint dir at all


def _write_one_epoch_checkpoint(cfg: TrainConfig, ckpt: Path) -> None:
    tr = _trainer(cfg, ckpt)
    tr.save_checkpoint(0)
    assert (ckpt / loop.CHECKPOINT).is_file()


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    _write_one_epoch_checkpoint(_config(seed=0), tmp_path / "c")
    other = _trainer(_config(seed=1), tmp_path / "c")
    with pytest.raises(ConfigError, match="other options"):
        other.resume()
    assert other.start_epoch == 0


def test_checkpoint_of_another_config_is_a_project_error(tmp_path: Path) -> None:
    _write_one_epoch_checkpoint(_config(seed=0), tmp_path / "d")
    with pytest.raises(SdnsError):
        _trainer(_config(seed=1), tmp_path / "d").resume()


def test_too_few_images_for_one_batch_is_refused() -> None:
    with pytest.raises(DataError, match="fewer than one batch"):
        Trainer(
            _config(batch_size=128),
            BACKBONE,
            _images(),
            None,
            [0.5],
            [0.25],
            torch.device("cpu"),
        )


# --- steps and precision -----------------------------------------------------------------


def test_an_epoch_longer_than_one_pass_draws_a_new_permutation_per_pass() -> None:
    # 64 images in batches of 8: one pass is 8 steps; 15 steps per epoch take a second pass.
    tr = _trainer(_config(epochs=2, steps_per_epoch=15))
    assert (tr.steps_per_epoch, tr.total_steps) == (15, 30)
    seen = [x for x, _, _ in tr._batches(0)]
    assert len(seen) == 15
    rows = torch.cat(seen).flatten(1)
    first_pass, second_pass = rows[:64], rows[64:]
    # The first pass holds every image once; the second pass starts over in another order.
    assert torch.unique(first_pass, dim=0).shape[0] == 64
    assert second_pass.shape[0] == 56
    assert not torch.equal(first_pass[:56], second_pass)


def test_without_steps_per_epoch_an_epoch_is_one_pass_and_the_recorded_config_says_so() -> None:
    cfg = _config(epochs=2).model_copy(update={"steps_per_epoch": None})
    assert cfg.with_steps(64).steps_per_epoch == 8
    assert _config(steps_per_epoch=3).with_steps(64).steps_per_epoch == 3


def test_auto_precision_is_fp32_without_native_bf16_and_set_precisions_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    auto = _trainer(_config())
    assert (auto.bf16, auto.precision["chosen"]) == (False, "fp32")
    assert "no native bf16" in auto.precision["method"]
    forced = _trainer(_config(precision="bf16"))
    assert (forced.bf16, forced.precision["chosen"]) == (True, "bf16")


def test_auto_precision_times_both_on_copies_and_picks_the_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    timed: list[bool] = []

    def fake_time(trainer: Trainer, bf16: bool) -> float:
        timed.append(bf16)
        return 0.5 if bf16 else 1.0

    monkeypatch.setattr(precision, "time_step", fake_time)
    tr = _trainer(_config())
    assert timed == [False, True]
    assert tr.bf16 and tr.precision["seconds_per_step"] == {"fp32": 1.0, "bf16": 0.5}
    monkeypatch.setattr(precision, "time_step", lambda trainer, bf16: 1.0)  # no gain: fp32
    assert not _trainer(_config()).bf16


def test_the_precision_probe_leaves_the_networks_and_the_loss_centre_untouched() -> None:
    tr = _trainer(_config(precision="fp32"))
    before = {k: v.clone() for k, v in tr.student_module.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    centre = tr.loss.center.clone()
    assert precision.time_step(tr, False) > 0
    for key, value in tr.student_module.state_dict().items():
        assert torch.equal(value, before[key]), key
    for key, value in tr.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert torch.equal(tr.loss.center, centre)


def test_geometric_augmentations_switch_every_photometric_op_off() -> None:
    dino = _trainer(_config()).crops.cfg
    geometric = _trainer(_config(augmentations="geometric")).crops.cfg
    assert dino.jitter_p > 0 and dino.blur_p[0] > 0
    assert (geometric.jitter_p, geometric.gray_p, geometric.solarize_p) == (0.0, 0.0, 0.0)
    assert geometric.blur_p == (0.0, 0.0, 0.0)
    assert (geometric.global_scale, geometric.flip_p) == (dino.global_scale, dino.flip_p)


def test_steps_by_size_give_the_run_its_length_at_each_input_size() -> None:
    default = make_config("default")
    assert default.with_sizes(28).with_steps(52_000).steps_per_epoch == 800  # 1,600 in all
    assert default.with_sizes(32).with_steps(500).steps_per_epoch == 800  # whatever the data
    assert default.model_copy(update={"data_size": 64}).with_sizes(64).total_steps_at(64) == 800
    assert default.total_steps_at(128) == 200  # beyond the table: by area
    # --steps-per-epoch wins over the table.
    assert (
        make_config("default", steps_per_epoch=5).with_sizes(28).with_steps(100).steps_per_epoch
        == 5
    )
