"""MixUp/CutMix: soft targets conserve mass, the pixels follow the targets, runs repeat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from test_resume import EXACT, assert_same_weights
from visiontrain.config import build_config
from visiontrain.data.mix import BatchMixer, build_mixer
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.errors import ConfigError
from visiontrain.losses import soft_softmax_focal_loss, softmax_focal_loss


def _batch(n=7, classes=4):
    torch.manual_seed(0)
    return torch.randn(n, 3, 12, 10), torch.randint(0, classes, (n,))


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
@pytest.mark.parametrize("n", [1, 7, 16])  # odd and one-image batches mix too
def test_target_mass_is_conserved_and_pixels_follow_the_blend(mixup, cutmix, n):
    mixer = BatchMixer(mixup, cutmix, 1.0, 0.5, num_classes=4, seed=3)
    x, y = _batch(n)
    for batch in range(6):
        mixed, soft = mixer(x, y, epoch=1, batch=batch)
        assert soft.shape == (n, 4) and torch.allclose(soft.sum(1), torch.ones(n))
        params, perm = mixer.draw(n, 12, 10, 1, batch)
        want = F.one_hot(y, 4).float() * params.lam + F.one_hot(y[perm], 4).float() * (
            1 - params.lam
        )
        assert torch.allclose(soft, want)
        if params.method == "cutmix":
            # lam is the share of each image's own pixels that survived.
            own = (mixed == x).all(dim=1).float().mean(dim=(1, 2))
            changed = torch.from_numpy(perm) != torch.arange(n)
            assert torch.allclose(own[changed], torch.full_like(own[changed], params.lam))
        else:
            assert torch.allclose(mixed, x * params.lam + x[perm] * (1 - params.lam))


def test_mix_prob_zero_and_tiny_alpha_leave_image_label_pairs_intact():
    x, y = _batch()
    off = BatchMixer(0.4, 1.0, 0.0, 0.5, num_classes=4, seed=0)
    mixed, soft = off(x, y, 0, 0)
    assert torch.equal(mixed, x) and torch.equal(soft, F.one_hot(y, 4).float())
    # alpha -> 0: lam is 0 or 1, so every image is some image of the batch, with its label.
    tiny = BatchMixer(1e-4, 0.0, 1.0, 0.5, num_classes=4, seed=0)
    for batch in range(5):
        mixed, soft = tiny(x, y, 0, batch)
        for i in range(len(x)):
            j = int(((x - mixed[i]).abs().amax(dim=(1, 2, 3))).argmin())
            assert torch.allclose(mixed[i], x[j], atol=1e-3)
            assert torch.allclose(soft[i], F.one_hot(y[j], 4).float(), atol=1e-3)


def test_draws_repeat_per_seed_epoch_batch_and_rank():
    a = BatchMixer(0.4, 1.0, 1.0, 0.5, 4, seed=1)
    b = BatchMixer(0.4, 1.0, 1.0, 0.5, 4, seed=1)
    assert a.draw(9, 8, 8, 2, 5)[0] == b.draw(9, 8, 8, 2, 5)[0]
    draws = {a.draw(9, 8, 8, 2, i)[0].lam for i in range(8)}
    assert len(draws) > 4
    other_rank = BatchMixer(0.4, 1.0, 1.0, 0.5, 4, seed=1, rank=1)
    assert other_rank.draw(9, 8, 8, 2, 5)[0] != a.draw(9, 8, 8, 2, 5)[0]


def test_soft_focal_equals_hard_focal_on_one_hot_and_is_linear():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    one_hot = F.one_hot(y, 4).float()
    torch.testing.assert_close(
        soft_softmax_focal_loss(logits, one_hot, 2.0), softmax_focal_loss(logits, y, 2.0)
    )
    other = F.one_hot(y.roll(1), 4).float()
    blend = soft_softmax_focal_loss(logits, 0.3 * one_hot + 0.7 * other, 2.0)
    torch.testing.assert_close(
        blend,
        0.3 * soft_softmax_focal_loss(logits, one_hot, 2.0)
        + 0.7 * soft_softmax_focal_loss(logits, other, 2.0),
    )


@pytest.mark.parametrize("task", ["regression", "segmentation", "detection"])
def test_mixing_is_refused_where_labels_do_not_blend(task):
    cfg = build_config(overrides=[f"task={task}", "data.cutmix=1.0"])
    with pytest.raises(ConfigError, match="blend class labels"):
        build_mixer(cfg.data, task, 3, 0, 0)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "focal"])
def test_training_with_mixing_runs_for_each_soft_loss(cli, tmp_path, loss):
    res = cli(
        "train", *TINY, "data.mixup=0.4", "data.cutmix=1.0", f"loss.name={loss}",
        "data.batch_size=15", f"run.dir={tmp_path}",
    )  # fmt: skip
    assert res.code == 0, res.err


def test_resume_with_mixing_is_bit_exact(cli, tmp_path):
    mix = [*EXACT, "data.mixup=0.4", "data.cutmix=1.0", "loss.label_smoothing=0.1"]
    assert cli("train", *mix, "train.epochs=3", f"run.dir={tmp_path}", "run.name=full").code == 0
    assert cli("train", *mix, "train.epochs=1", f"run.dir={tmp_path}", "run.name=half").code == 0
    res = cli(
        "train", *mix, "train.epochs=3", f"run.dir={tmp_path}", "run.name=half", "run.resume=auto"
    )
    assert res.code == 0, res.err
    assert_same_weights(
        load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"],
        load_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")["model"],
    )
