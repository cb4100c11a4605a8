"""The plain-PyTorch loop (`fit`, no Ray) learns both demo tasks and resumes exactly from saved state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polytask.model.network import load_encoder
from polytask.training.data import load_task_data
from polytask.training.loop import (
    build_features,
    evaluate,
    fit,
    load_state,
    objective,
    save_state,
    setup,
    train_epoch,
)


def _trainer(cfg, tiny_encoder: Path):
    data = load_task_data(cfg)
    _, tok = load_encoder(str(tiny_encoder))
    train_f, eval_f = build_features(cfg, data, tok)
    return setup(cfg, [d.spec for d in data.values()], train_f, eval_f), tok


def test_joint_training_learns_both_tasks(experiment, tiny_encoder: Path) -> None:
    cfg = experiment(epochs=5, lr=1e-3, num_workers=1)
    tr, tok = _trainer(cfg, tiny_encoder)
    before = evaluate(tr.core, tr.eval_features, 64, tok.pad_token_id)
    history = fit(tr, evaluate_each_epoch=False)
    losses = [{t: row[f"train_loss/{t}"] for t in ("sentiment", "ner")} for row in history]
    after = evaluate(tr.core, tr.eval_features, 64, tok.pad_token_id)
    for task in ("sentiment", "ner"):
        assert losses[-1][task] < 0.8 * losses[0][task], f"{task} loss did not fall: {losses}"
    assert after["sentiment"]["accuracy"] >= 0.75  # chance is ~0.5
    assert after["ner"]["f1"] >= 0.35 and after["ner"]["f1"] > before["ner"]["f1"] + 0.2
    assert objective(after, tr.specs) > objective(before, tr.specs)


@pytest.mark.parametrize("method", ["uncertainty", "dwa"])
def test_loss_weighting_methods_train_and_move(experiment, tiny_encoder: Path, method: str) -> None:
    cfg = experiment(epochs=2, num_workers=1, loss_weighting={"method": method}, sampling={"steps_per_epoch": 12})
    tr, _ = _trainer(cfg, tiny_encoder)
    start = tr.core.weighting.weights()
    fit(tr, evaluate_each_epoch=False)
    end = tr.core.weighting.weights()
    assert end != start
    if method == "dwa":
        assert sum(end.values()) == pytest.approx(2.0)


def test_saved_state_resumes_the_same_trajectory(experiment, tiny_encoder: Path, tmp_path: Path) -> None:
    cfg = experiment(epochs=2, num_workers=1, sampling={"steps_per_epoch": 10})
    straight, _ = _trainer(cfg, tiny_encoder)
    fit(straight)
    first, _ = _trainer(cfg, tiny_encoder)
    seen = []
    fit(first, epochs=1, on_epoch=lambda state, record: seen.append(dict(record)))
    assert [r["epoch"] for r in seen] == [0] and "objective" in seen[0]
    save_state(first, tmp_path / "ckpt")
    resumed, _ = _trainer(cfg, tiny_encoder)
    load_state(resumed, tmp_path / "ckpt")
    assert resumed.epoch == 1 and resumed.sampler.state_dict() == {"epoch": 1, "step": 0}
    fit(resumed)
    assert [(r["epoch"], r["start_epoch"]) for r in resumed.history] == [(0, 0), (1, 1)]
    assert resumed.history[1]["objective"] == pytest.approx(straight.history[1]["objective"], abs=1e-4)
    for (name, a), b in zip(straight.core.state_dict().items(), resumed.core.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_strict_resume_check_accepts_only_untouched_params_without_optimizer_state(
    experiment, tiny_encoder: Path
) -> None:
    """FSDP resume (training.sharding.load_state) allows a parameter without AdamW state only
    if its saved value is still the initial one: never stepped, rather than lost."""
    from polytask.training.sharding import check_unstepped

    tr, _ = _trainer(experiment(epochs=1, num_workers=1), tiny_encoder)
    fresh = {k: v.clone() for k, v in tr.core.state_dict().items()}
    train_epoch(tr)
    saved = tr.core.state_dict()
    params = dict(tr.core.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    with_state = {n for n, p in params.items() if tr.optimizer.state.get(p)}
    untouched = trainable - with_state
    assert untouched and with_state  # e.g. the unused pooler has no state
    check_unstepped(fresh, saved, with_state, trainable)

    lost = min(with_state)
    with pytest.raises(RuntimeError, match=f"no optimizer state for trained parameters.*{lost}"):
        check_unstepped(fresh, saved, with_state - {lost}, trainable)
    with pytest.raises(RuntimeError, match="optimizer state for unknown parameters"):
        check_unstepped(fresh, saved, with_state | {"encoder.gone.weight"}, trainable)


def test_progress_lines_come_per_interval_and_at_each_epoch_end(experiment, tiny_encoder: Path) -> None:
    """StepMeter on `fit`'s step hook, with a clock that ticks one second per step: a line every
    2.5 s and at each epoch's last step, whose running losses end at the epoch's mean loss."""
    from polytask.training.progress import StepMeter, format_line

    cfg = experiment(epochs=2, num_workers=1, sampling={"steps_per_epoch": 6})
    tr, _ = _trainer(cfg, tiny_encoder)
    sent = []
    ticks = iter(range(1000))
    meter = StepMeter(sent.append, 2.5, epochs=2, samples_per_step=16, clock=lambda: next(ticks))
    history = fit(tr, evaluate_each_epoch=False, on_step=meter)
    assert [(p.epoch, p.step) for p in sent] == [(0, 4), (0, 6), (1, 4), (1, 6)]
    assert all(p.samples_per_s == pytest.approx(16.0) for p in sent)  # one step per tick
    assert [p.eta_s for p in sent] == pytest.approx([8.0, 6.0, 2.0, 0.0])
    for epoch, p in ((0, sent[1]), (1, sent[3])):
        assert p.losses == pytest.approx(
            {t: history[epoch][f"train_loss/{t}"] for t in p.losses}
        ) and p.losses
    assert format_line(sent[0]).startswith("epoch 1/2  step 4/6  loss ")
    assert format_line(sent[0]).endswith("  16.0 samples/s  ETA 0:00:08")
