"""Each loss against a reference: torch / torchvision, or numbers worked out by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops

from visiontrain.config import LossConfig, build_config
from visiontrain.errors import ConfigError
from visiontrain.losses import (
    Loss,
    LossContext,
    box_loss,
    build_loss,
    class_weights,
    list_losses,
    msle_loss,
    register_loss,
    sigmoid_focal_loss,
    smooth_labels,
    soft_dice_loss,
    soft_jaccard_loss,
    soft_target_cross_entropy,
    softmax_focal_loss,
)

COUNTS = torch.tensor([90, 10])
CLS2 = LossContext("classification", 2, COUNTS)
CLS3 = LossContext("classification", 3, torch.tensor([50, 30, 20]))
REG = LossContext("regression", 2)
SEG3 = LossContext("segmentation", 3, torch.tensor([500, 300, 200]))
SEG1 = LossContext("segmentation", 1)


def loss_cfg(*overrides: str, task: str = "classification") -> LossConfig:
    return build_config({}, [f"task={task}", *overrides]).loss


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def randint(high: int, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(high, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ focal


def test_softmax_focal_gamma0_is_cross_entropy() -> None:
    logits, target = randn(16, 5), randint(5, 16)
    got = softmax_focal_loss(logits, target, gamma=0.0, alpha=None)
    torch.testing.assert_close(got, F.cross_entropy(logits, target))


def test_softmax_focal_by_hand() -> None:
    # Sample 0: logits (ln 3, 0), class 0 -> p_t = 3/4. Sample 1: (0, 0), class 1 -> p_t = 1/2.
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    a = (1 / 4) ** 2 * -math.log(3 / 4)  # 0.017980
    b = (1 / 2) ** 2 * -math.log(1 / 2)  # 0.173287
    got = softmax_focal_loss(logits, target, gamma=2.0)
    assert got.item() == pytest.approx((a + b) / 2, rel=1e-6)
    # Scalar alpha: class 0 (background) weighs 1 - alpha, every other class alpha.
    got = softmax_focal_loss(logits, target, gamma=2.0, alpha=0.25)
    assert got.item() == pytest.approx((0.75 * a + 0.25 * b) / 2, rel=1e-6)
    got = softmax_focal_loss(logits, target, gamma=2.0, alpha=torch.tensor([2.0, 3.0]))
    assert got.item() == pytest.approx((2 * a + 3 * b) / 2, rel=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_sigmoid_focal_matches_torchvision(alpha: float | None, gamma: float) -> None:
    logits = randn(8, 4) * 3
    target = (randn(8, 4, seed=2) > 0).float()
    want = torchvision.ops.sigmoid_focal_loss(
        logits, target, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean"
    )
    torch.testing.assert_close(sigmoid_focal_loss(logits, target, gamma, alpha), want)


def test_sigmoid_focal_per_class_alpha_weighs_columns() -> None:
    logits, target = randn(8, 3), (randn(8, 3, seed=2) > 0).float()
    alpha = torch.tensor([0.5, 1.0, 2.0])
    per_elem = torchvision.ops.sigmoid_focal_loss(logits, target, alpha=-1, reduction="none")
    want = (per_elem * alpha).mean()
    torch.testing.assert_close(sigmoid_focal_loss(logits, target, 2.0, alpha), want)


def test_registered_focal() -> None:
    logits, target = randn(16, 3), randint(3, 16)
    loss = build_loss(loss_cfg("loss.name=focal", "loss.focal_gamma=0"), CLS3)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))
    assert loss.activation == "softmax"

    loss = build_loss(loss_cfg("loss.name=focal", "loss.focal_alpha=[1.0, 2.0, 0.5]"), CLS3)
    want = softmax_focal_loss(logits, target, 2.0, torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(loss(logits, target), want)
    assert loss.info["focal_alpha"] == [1.0, 2.0, 0.5]
    assert loss.info["focal_gamma"] == 2.0

    # Class weights act as the per-class alpha.
    loss = build_loss(loss_cfg("loss.name=focal", "loss.class_weights=balanced"), CLS3)
    w = class_weights("balanced", CLS3.class_counts)
    torch.testing.assert_close(loss(logits, target), softmax_focal_loss(logits, target, 2.0, w))

    # A float target (a MixUp/CutMix blend) is a distribution over the classes: the soft
    # softmax form, which equals the hard one on one-hot rows.
    loss = build_loss(loss_cfg("loss.name=focal", "loss.focal_alpha=[1.0, 2.0, 0.5]"), CLS3)
    one_hot = F.one_hot(target, 3).float()
    want = softmax_focal_loss(logits, target, 2.0, torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(loss(logits, one_hot), want)


def test_segmentation_focal_ignores_255() -> None:
    logits, target = randn(2, 3, 4, 4), randint(3, 2, 4, 4)
    target[0, 0] = 255
    loss = build_loss(loss_cfg("loss.name=focal", "loss.focal_gamma=0", task="segmentation"), SEG3)
    torch.testing.assert_close(
        loss(logits, target), F.cross_entropy(logits, target, ignore_index=255)
    )


# ------------------------------------------------------------- cross entropy, BCE


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3])
def test_soft_target_cross_entropy_smoothing_matches_torch(eps: float) -> None:
    logits, target = randn(12, 5), randint(5, 12)
    got = soft_target_cross_entropy(logits, smooth_labels(target, 5, eps))
    want = torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_smooth_labels_rows() -> None:
    q = smooth_labels(torch.tensor([0, 2]), 4, 0.2)
    torch.testing.assert_close(q[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def test_soft_target_cross_entropy_weights_match_torch_probability_targets() -> None:
    logits = randn(6, 3)
    q = randn(6, 3, seed=4).softmax(1)
    w = torch.tensor([0.5, 1.0, 3.0])
    want = F.cross_entropy(logits, q, weight=w)  # torch: -sum_c w_c q_c log p_c, mean over N
    torch.testing.assert_close(soft_target_cross_entropy(logits, q, w), want)


def test_cross_entropy_weights_and_smoothing_match_torch() -> None:
    logits, target = randn(16, 3), randint(3, 16)
    cfg = loss_cfg("loss.label_smoothing=0.1", "loss.class_weights=[1.0, 2.0, 3.0]")
    loss = build_loss(cfg, CLS3)
    w = torch.tensor([1.0, 2.0, 3.0])
    want = F.cross_entropy(logits, target, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, target), want)
    assert loss.info == {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 3.0]}
    # Soft labels take the same smoothing and weights.
    q = randn(16, 3, seed=5).softmax(1)
    want = F.cross_entropy(logits, q, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, q), want)


def test_cross_entropy_ignores_255_only_for_segmentation() -> None:
    logits = randn(4, 256)
    target = torch.tensor([255, 3, 255, 7])
    loss = build_loss(LossConfig(name="cross_entropy"), LossContext("classification", 256))
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits, target))

    seg_logits, seg_target = randn(2, 3, 4, 4), randint(3, 2, 4, 4)
    seg_target[1] = 255
    loss = build_loss(LossConfig(name="cross_entropy"), SEG3)
    want = F.cross_entropy(seg_logits[:1], seg_target[:1])
    torch.testing.assert_close(loss(seg_logits, seg_target), want)


def test_bce_pos_weight_balanced_from_counts() -> None:
    loss = build_loss(loss_cfg("loss.name=bce_with_logits", "loss.pos_weight=balanced"), CLS2)
    # (N - n_c) / n_c with N = 100: 10 / 90 and 90 / 10.
    assert loss.info["pos_weight"] == pytest.approx([10 / 90, 9.0])
    assert loss.activation == "sigmoid"
    logits, target = randn(8, 2), randint(2, 8)
    want = F.binary_cross_entropy_with_logits(
        logits, F.one_hot(target, 2).float(), pos_weight=torch.tensor([10 / 90, 9.0])
    )
    torch.testing.assert_close(loss(logits, target), want)


def test_bce_smoothing_weights_and_scalar_pos_weight() -> None:
    cfg = loss_cfg(
        "loss.name=bce_with_logits",
        "loss.label_smoothing=0.2",
        "loss.class_weights=[1.0, 4.0]",
        "loss.pos_weight=2.0",
    )
    loss = build_loss(cfg, CLS2)
    logits, target = randn(8, 2), randint(2, 8)
    soft = F.one_hot(target, 2).float() * 0.8 + 0.1
    want = F.binary_cross_entropy_with_logits(
        logits, soft, weight=torch.tensor([1.0, 4.0]), pos_weight=torch.tensor([2.0, 2.0])
    )
    torch.testing.assert_close(loss(logits, target), want)


# -------------------------------------------------------------------- class weights


def test_class_weights_balanced_and_effective() -> None:
    assert class_weights("none", COUNTS) is None
    # Inverse frequency 100/(2*90), 100/(2*10) = 0.556, 5.0; normalised to mean 1.
    torch.testing.assert_close(class_weights("balanced", COUNTS), torch.tensor([0.2, 1.8]))
    # (1 - 0.999) / (1 - 0.999**n): 0.0116131, 0.1004508; normalised to sum 2.
    torch.testing.assert_close(
        class_weights("effective", COUNTS), torch.tensor([0.2072578, 1.7927422])
    )
    # beta 0.9: 0.1 / (1 - 0.9**90) = 0.1000076, 0.1 / (1 - 0.9**10) = 0.1535340.
    torch.testing.assert_close(
        class_weights("effective", COUNTS, beta=0.9), torch.tensor([0.7888852, 1.2111148])
    )
    torch.testing.assert_close(class_weights([1.0, 3.0], COUNTS), torch.tensor([1.0, 3.0]))


def test_class_weights_empty_class_is_finite() -> None:
    for spec in ("balanced", "effective"):
        w = class_weights(spec, torch.tensor([100, 0, 5]))
        assert torch.isfinite(w).all()
        assert w.mean().item() == pytest.approx(1.0)


def test_effective_beta_reaches_the_loss() -> None:
    cfg = loss_cfg("loss.class_weights=effective", "loss.effective_beta=0.9")
    loss = build_loss(cfg, CLS2)
    assert loss.info["class_weights"] == pytest.approx([0.7888852, 1.2111148], abs=1e-6)


# ---------------------------------------------------------------------- regression


@pytest.mark.parametrize(
    ("overrides", "reference"),
    [
        ([], F.mse_loss),
        (["loss.name=mae"], F.l1_loss),
        (["loss.name=smooth_l1", "loss.beta=0.5"], lambda a, b: F.smooth_l1_loss(a, b, beta=0.5)),
        (["loss.name=huber", "loss.delta=2.0"], lambda a, b: F.huber_loss(a, b, delta=2.0)),
    ],
)
def test_regression_losses_match_torch(
    overrides: list[str], reference: Callable[..., torch.Tensor]
) -> None:
    loss = build_loss(loss_cfg(*overrides, task="regression"), REG)
    pred, target = randn(8, 2) * 3, randn(8, 2, seed=6)
    torch.testing.assert_close(loss(pred, target), reference(pred, target))
    assert loss.activation == "identity"
    assert not loss.raw_targets


def test_msle_by_hand() -> None:
    loss = build_loss(LossConfig(name="msle"), REG)
    assert loss.raw_targets
    # log1p(max(-1, 0)) - log1p(0) = 0;  log1p(e - 1) - log1p(0) = 1;  mean of squares 1/2.
    pred = torch.tensor([[-1.0, math.e - 1]])
    target = torch.tensor([[0.0, 0.0]])
    assert loss(pred, target).item() == pytest.approx(0.5, rel=1e-6)
    assert msle_loss(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(
        (math.log(4) - math.log(2)) ** 2, rel=1e-6
    )


# --------------------------------------------------------------------- segmentation

L3 = math.log(3.0)


def _tiny_seg() -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 image, 2 classes; probabilities 3/4 : 1/4 by construction, one pixel ignored."""
    logits = torch.tensor(
        [[[[L3, 0.0], [L3, 5.0]], [[0.0, L3], [0.0, -5.0]]]]
    )  # (1, 2, 2, 2): pixels (0,0) p=(.75,.25), (0,1) (.25,.75), (1,0) (.75,.25), (1,1) ignored
    target = torch.tensor([[[0, 1], [1, 255]]])
    return logits, target


def test_dice_and_jaccard_by_hand() -> None:
    logits, target = _tiny_seg()
    # Class 0: I = .75, P = .75+.25+.75 = 1.75, T = 1.  Class 1: I = .75+.25 = 1, P = 1.25, T = 2.
    dice = 1 - ((2 * 0.75 + 1) / (1.75 + 1 + 1) + (2 * 1 + 1) / (1.25 + 2 + 1)) / 2
    jac = 1 - ((0.75 + 1) / (1.75 + 1 - 0.75 + 1) + (1 + 1) / (1.25 + 2 - 1 + 1)) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(dice, rel=1e-6)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(jac, rel=1e-6)
    # smooth=0: class 0 dice 1.5/2.75, class 1 dice 2/3.25.
    want = 1 - (1.5 / 2.75 + 2 / 3.25) / 2
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(want, rel=1e-6)


def test_dice_ignored_pixels_have_no_effect() -> None:
    logits, target = _tiny_seg()
    changed = logits.clone()
    changed[0, :, 1, 1] = torch.tensor([-40.0, 40.0])
    for fn in (soft_dice_loss, soft_jaccard_loss):
        assert fn(changed, target).item() == fn(logits, target).item()


def test_dice_perfect_prediction_is_zero() -> None:
    target = randint(3, 2, 4, 4)
    target[0, 0, 0] = 255
    logits = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_dice_by_hand() -> None:
    # One channel, all logits 0 -> p = 1/2; target 1, 0, 1, ignored: I = 1, P = 1.5, T = 2.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1, 0], [1, 255]]])
    want = 1 - (2 * 1 + 1) / (1.5 + 2 + 1)
    assert soft_dice_loss(logits, target).item() == pytest.approx(want, rel=1e-6)


def test_dice_ce_is_weighted_sum() -> None:
    logits, target = randn(2, 3, 5, 5), randint(3, 2, 5, 5)
    target[0, :2] = 255
    cfg = loss_cfg("loss.dice_weight=0.3", "loss.ce_weight=2.0", task="segmentation")
    assert cfg.name == "dice_ce"
    loss = build_loss(cfg, SEG3)
    want = 0.3 * soft_dice_loss(logits, target) + 2.0 * F.cross_entropy(
        logits, target, ignore_index=255
    )
    torch.testing.assert_close(loss(logits, target), want)
    assert loss.info["dice_weight"] == 0.3


def test_dice_bce() -> None:
    logits = randn(2, 1, 4, 4)
    target = randint(2, 2, 4, 4)
    target[1, 0] = 255
    cfg = loss_cfg("loss.name=dice_bce", "loss.pos_weight=3.0", task="segmentation")
    loss = build_loss(cfg, SEG1)
    assert loss.activation == "sigmoid"
    valid = target != 255
    bce = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], target[valid].float(), pos_weight=torch.tensor([3.0])
    )
    torch.testing.assert_close(loss(logits, target), soft_dice_loss(logits, target) + bce)


def test_list_losses() -> None:
    assert list_losses("classification") == ["bce_with_logits", "cross_entropy", "focal"]
    assert list_losses("regression") == ["huber", "mae", "mse", "msle", "smooth_l1"]
    assert list_losses("segmentation") == [
        "cross_entropy",
        "dice",
        "dice_bce",
        "dice_ce",
        "focal",
        "jaccard",
    ]


# ------------------------------------------------------------------------ box losses


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("giou", torchvision.ops.generalized_box_iou_loss),
        ("diou", torchvision.ops.distance_box_iou_loss),
        ("ciou", torchvision.ops.complete_box_iou_loss),
    ],
)
def test_box_loss(name: str, fn: object) -> None:
    assert box_loss(name) is fn
    boxes = torch.tensor([[0.0, 0.0, 4.0, 3.0], [1.0, 2.0, 5.0, 9.0]])
    assert box_loss(name)(boxes, boxes, reduction="mean").item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_box_loss() -> None:
    with pytest.raises(ConfigError, match="did you mean `giou`"):
        box_loss("gio")


# ---------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    ("overrides", "ctx", "match"),
    [
        (["loss.name=focal", "loss.focal_alpha=[0.2, 0.3, 0.5]"], CLS2, "focal_alpha.*3 .*2 cl"),
        (["loss.class_weights=[1.0, 2.0, 3.0]"], CLS2, "class_weights.*3 .*2 cl"),
        (["loss.name=bce_with_logits", "loss.pos_weight=[1.0]"], CLS2, "pos_weight.*1 .*2 cl"),
        (["loss.name=mse", "loss.class_weights=balanced"], REG, "task regression has none"),
        (["loss.name=mse", "loss.label_smoothing=0.1"], REG, "task regression has none"),
        (["loss.name=focla"], CLS2, "did you mean `focal`"),
        (["loss.name=mse"], CLS2, "does not apply to task classification"),
        (["loss.class_weights=balanced", "loss.effective_beta=0.9"], CLS2, "effective_beta"),
        (["loss.focal_gamma=1.0"], CLS2, "`loss.focal_gamma` set"),
        (
            ["loss.name=focal", "loss.label_smoothing=0.1"],
            CLS2,
            "one that uses it: bce_with_logits, cross_entropy",
        ),
        (["loss.name=dice", "loss.class_weights=balanced"], SEG3, "dice does not use"),
        (
            ["loss.name=focal", "loss.focal_alpha=0.25", "loss.class_weights=balanced"],
            CLS2,
            "set only one",
        ),
        (["loss.name=dice_bce", "loss.pos_weight=balanced"], SEG1, "one number"),
        (["loss.name=dice_ce", "loss.dice_weight=0", "loss.ce_weight=0"], SEG3, "both 0"),
    ],
)
def test_bad_config(overrides: list[str], ctx: LossContext, match: str) -> None:
    cfg = build_config({}, [f"task={ctx.task}", *overrides]).loss
    with pytest.raises(ConfigError, match=match):
        build_loss(cfg, ctx)


def test_unknown_name_lists_the_task_losses() -> None:
    with pytest.raises(ConfigError) as err:
        build_loss(LossConfig(name="dise"), SEG3)
    assert "did you mean `dice`" in str(err.value)
    assert "For task segmentation: cross_entropy, dice," in str(err.value)


def test_balanced_weights_need_counts() -> None:
    with pytest.raises(ConfigError, match="class counts"):
        build_loss(LossConfig(class_weights="balanced"), LossContext("classification", 2))


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_loss("focal", ("classification",))(
            lambda cfg, ctx: Loss("x", "softmax", F.l1_loss)
        )


# -------------------------------------------------------------- gradients, dtypes, info

CASES = [
    (LossConfig(name="cross_entropy", label_smoothing=0.1), CLS3, (6, 3), 3),
    (LossConfig(name="bce_with_logits", pos_weight="balanced"), CLS3, (6, 3), 3),
    (LossConfig(name="focal", focal_gamma=0.5), CLS3, (6, 3), 3),
    (LossConfig(name="focal", class_weights="effective"), SEG3, (2, 3, 4, 4), 3),
    (LossConfig(name="mse"), REG, (6, 2), None),
    (LossConfig(name="huber"), REG, (6, 2), None),
    (LossConfig(name="msle"), REG, (6, 2), None),
    (LossConfig(name="dice_ce", class_weights="balanced"), SEG3, (2, 3, 4, 4), 3),
    (LossConfig(name="jaccard"), SEG3, (2, 3, 4, 4), 3),
    (LossConfig(name="dice_bce"), SEG1, (2, 1, 4, 4), 2),
]


def _target(shape: tuple[int, ...], classes: int | None) -> torch.Tensor:
    if classes is None:
        return randn(*shape, seed=7).abs()
    spatial = shape[:1] + shape[2:]
    target = randint(classes, *spatial, seed=8)
    if len(shape) == 4:
        target[0, 0] = 255
    return target


@pytest.mark.parametrize(("cfg", "ctx", "shape", "classes"), CASES)
def test_gradients_flow_and_bf16_gives_float32(
    cfg: LossConfig, ctx: LossContext, shape: tuple[int, ...], classes: int | None
) -> None:
    loss = build_loss(cfg, ctx)
    json.dumps(loss.info)
    target = _target(shape, classes)
    output = randn(*shape, seed=9).requires_grad_()
    value = loss(output, target)
    value.backward()
    assert value.dtype == torch.float32 and value.ndim == 0
    assert output.grad is not None and torch.isfinite(output.grad).all()
    assert output.grad.abs().sum() > 0

    half = randn(*shape, seed=9).to(torch.bfloat16).requires_grad_()
    value = loss(half, target)
    assert value.dtype == torch.float32
    value.backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16


def test_focal_gradient_finite_when_saturated() -> None:
    logits = torch.tensor([[200.0, -200.0]], requires_grad=True)
    for gamma in (0.5, 2.0):
        softmax_focal_loss(logits, torch.tensor([0]), gamma=gamma).backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None
