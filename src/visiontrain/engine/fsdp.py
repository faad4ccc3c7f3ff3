"""``train.strategy=fsdp``: FSDP2 ``fully_shard`` on each block of the model, then the root.

Under torchrun with N processes, every parameter, its gradient and its optimizer state is
split in N shards, one per process (a ``DTensor`` sharded on dim 0). A block's forward
all-gathers its parameters and frees them again after (``reshard_after_forward``), its
backward reduce-scatters the gradients, so a process holds one block's full weights at a
time plus its shards of the rest. Which modules are the blocks is decided per model family
by :func:`shard_units` (the rule registry below); what no block holds (a stem, a head) goes
with the root, which is sharded last.

The wrapping is applied in place: parameter names do not change (no prefix), so
``model.state_dict()`` keys and the checkpoints of N processes load in M.

In one process there is nothing to shard: the model trains unwrapped, and the checkpoints
are still written in the sharded format (engine/sharded.py) so a run moves freely between
one and N processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from visiontrain.config import Config
from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError

Unit = nn.Module | list[nn.Module]
Rule = Callable[[nn.Module], list[Unit] | None]

# The rule registry: (what it recognises, rule). The first rule that answers decides; a
# rule answers None when the model is not of its family. Composite models (a detector,
# smp) call back into :func:`_blocks_of` for their parts, so a backbone is split by the
# rule of its own family.
_RULES: list[tuple[str, Rule]] = []

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _rule(what: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        _RULES.append((what, fn))
        return fn

    return register


def _has_params(unit: Unit) -> bool:
    modules = unit if isinstance(unit, list) else [unit]
    return any(True for m in modules for _ in m.parameters())


def _children_or_self(stage: nn.Module) -> list[Unit]:
    """A stage's blocks (its children, or a timm stage's ``blocks``), then the stage."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, nn.Sequential | nn.ModuleList):
        return [*inner, stage]
    if isinstance(stage, nn.Sequential | nn.ModuleList) and any(
        _has_params(c) and any(True for _ in c.children()) for c in stage
    ):
        return list(stage)
    return [stage]


@_rule("detector: backbone blocks, backbone, then each head")
def _detector(model: nn.Module) -> list[Unit] | None:
    backbone = getattr(model, "backbone", None)
    heads = [getattr(model, n, None) for n in ("rpn", "roi_heads", "head", "classifier")]
    heads = [h for h in heads if isinstance(h, nn.Module)]
    if not isinstance(backbone, nn.Module) or not heads:
        return None
    body = getattr(backbone, "body", backbone)  # torchvision's BackboneWithFPN
    return [*_blocks_of(body), backbone, *heads, *_aux(model)]


def _aux(model: nn.Module) -> list[Unit]:
    aux = getattr(model, "aux_classifier", None)
    return [aux] if isinstance(aux, nn.Module) else []


@_rule("segmentation-models-pytorch: encoder blocks, encoder, decoder, heads")
def _encoder_decoder(model: nn.Module) -> list[Unit] | None:
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        return None
    heads = [getattr(model, n, None) for n in ("segmentation_head", "classification_head")]
    return [*_blocks_of(encoder), encoder, decoder, *[h for h in heads if h is not None]]


@_rule("wrapper: the wrapped model's own rule")
def _wrapper(model: nn.Module) -> list[Unit] | None:
    # models/dense.py's _OutOnly around a torchvision segmenter (one child, `model`).
    children = list(model.named_children())
    if len(children) == 1 and children[0][0] == "model":
        return _blocks_of(children[0][1]) or None
    return None


@_rule("ResNet family: the blocks of layer1-layer4")
def _resnet(model: nn.Module) -> list[Unit] | None:
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if not all(isinstance(layer, nn.Sequential) for layer in layers):
        return None
    return [block for layer in layers for block in layer]  # type: ignore[union-attr]


@_rule("timm/torchvision: blocks, stages or layers (ViT, ConvNeXt, Swin, RegNet ...)")
def _stages(model: nn.Module) -> list[Unit] | None:
    for name in ("blocks", "stages", "layers"):
        container = getattr(model, name, None)
        if isinstance(container, nn.Sequential | nn.ModuleList) and len(container):
            return [u for stage in container for u in _children_or_self(stage)]
    encoder = getattr(model, "encoder", None)  # torchvision's VisionTransformer
    layers = getattr(encoder, "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers):
        return list(layers)
    return None


@_rule("tinynet and the tiny detectors' backbone: stem, c3, c4, c5")
def _tiny(model: nn.Module) -> list[Unit] | None:
    parts = [getattr(model, n, None) for n in ("stem", "c3", "c4", "c5")]
    if not all(isinstance(p, nn.Module) for p in parts):
        return None
    extra = getattr(model, "fpn", None)
    return [*parts, *([extra] if isinstance(extra, nn.Module) else [])]  # type: ignore[list-item]


@_rule("features: its blocks, or runs of layers that end at a pooling layer (simple_cnn)")
def _features(model: nn.Module) -> list[Unit] | None:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not len(features):
        return None
    if any(any(True for _ in c.children()) and _has_params(c) for c in features):
        # torchvision's EfficientNet/MobileNet/DenseNet: each child is a stage or a block.
        return [u for child in features for u in _children_or_self(child)]
    # Plain layers (conv, norm, activation ... pool): one unit per run up to a pooling
    # layer, so a unit is one stage's worth of weights and all-gathers once.
    units: list[Unit] = []
    run: list[nn.Module] = []
    for layer in features:
        run.append(layer)
        if isinstance(layer, _POOLS):
            units.append(run)
            run = []
    if run:
        units.append(run)
    return units


@_rule("a sequence of blocks (torchvision's IntermediateLayerGetter, nn.Sequential)")
def _sequence(model: nn.Module) -> list[Unit] | None:
    if not isinstance(model, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return None
    children = list(model.children())
    blocks = [c for c in children if _has_params(c) and any(True for _ in c.children())]
    return blocks or None


def _blocks_of(module: nn.Module) -> list[Unit]:
    for _what, rule in _RULES:
        units = rule(module)
        if units is not None:
            return units
    return []


def shard_units(model: nn.Module) -> tuple[list[Unit], str]:
    """The modules to ``fully_shard`` before the root, inner ones first; and which rule.

    A unit is a module or a list of sibling modules sharded as one group. Units without
    parameters are dropped, and a module is never listed twice. An empty list means the
    root alone is sharded (one all-gather of the whole model per forward).
    """
    found = next(((w, u) for w, rule in _RULES if (u := rule(model)) is not None), None)
    if found is None:
        return [], "no rule knows this model: the root alone is sharded"
    what, units = found
    seen: set[int] = set()
    out: list[Unit] = []
    for unit in units:
        modules = unit if isinstance(unit, list) else [unit]
        if unit is model or not _has_params(unit) or any(id(m) in seen for m in modules):
            continue
        seen.update(id(m) for m in modules)
        out.append(unit)
    return out, what


def mixed_precision(precision: str) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``train.precision``.

    bf16/fp16: parameters all-gathered in the low precision for forward and backward,
    gradients reduced (and the sharded weights kept) in fp32. 32: no policy.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if low is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def check_fsdp(cfg: Config) -> None:
    """Refuse what ``train.strategy=fsdp`` does not compose with, whatever the process count.

    Raises:
        ConfigError: naming the key and what to do instead.
    """
    if cfg.train.strategy != "fsdp":
        return
    refusals = {
        "train.sync_bn": (
            cfg.train.sync_bn,
            "SyncBatchNorm is not combined with sharded parameters here. Remove "
            "train.sync_bn, or use train.strategy=ddp",
        ),
        "train.freeze_epochs": (
            bool(cfg.train.freeze_epochs),
            "unfreezing parameters after they were sharded is not supported by FSDP2 (the "
            "gathered copies keep the frozen flag). Use model.freeze for layers that never "
            "train, or train.strategy=ddp",
        ),
    }
    for key, (on, why) in refusals.items():
        if on:
            raise ConfigError(f"{key} with train.strategy=fsdp: {why}.")


def apply_fsdp(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_module: nn.Module | None,
    precision: str,
    dist: Dist,
    device: torch.device,
) -> str:
    """Shard ``model`` (and the EMA's copy) across the job; returns a note for the user.

    ``fully_shard`` replaces every parameter by a new sharded one, so the optimizer (built
    on the plain parameters, with no state yet) is pointed at the new ones by name.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if optimizer.state:
        raise ConfigError("train.strategy=fsdp: the optimizer already holds state; build it anew.")
    mesh = init_device_mesh(device.type, (dist.world_size,))
    policy = mixed_precision(precision)
    names = {id(p): n for n, p in model.named_parameters()}
    units, what = shard_units(model)
    for module in (model, ema_module):
        if module is None:
            continue
        # The EMA's copy has the same structure: the same units, the same shards, so its
        # update is a local lerp of shard by shard.
        module_units = shard_units(module)[0]
        if policy.param_dtype is not None:
            module_units = _norms_apart(module, module_units, mesh)
        for unit in module_units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    low = (
        ""
        if precision == "32"
        else f", parameters gathered in {precision}, gradients reduced in fp32"
    )
    return (
        f"FSDP sharding: parameters, gradients and optimizer state split over "
        f"{dist.world_size} processes; fully_shard on {len(units)} blocks ({what}), then "
        f"the root{low}"
    )


def _norms_apart(module: nn.Module, units: list[Unit], mesh: Any) -> list[Unit]:
    """Shard BatchNorm layers on their own in fp32; ``units`` without them.

    Their running statistics are fp32 buffers, which the low-precision policy does not
    cast, and PyTorch's batch norm refuses bf16 weights with fp32 statistics. In fp32 they
    take the low-precision input as under autocast without FSDP.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _has_params(m)
    ]
    for norm in norms:
        fully_shard(norm, mesh=mesh, mp_policy=MixedPrecisionPolicy(), reshard_after_forward=True)
    apart = {id(m) for m in norms}
    out: list[Unit] = []
    for unit in units:
        if isinstance(unit, list):
            rest = [m for m in unit if id(m) not in apart]
            if _has_params(rest):
                out.append(rest)
        elif id(unit) not in apart:
            out.append(unit)
    return out


def fsdp_modules(module: nn.Module) -> list[Any]:
    """The ``FSDPModule`` parts of ``module`` (empty when it was not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Hold ``module``'s full parameters on every rank for an evaluation, then reshard.

    Evaluation shards the data without padding, so ranks may run different numbers of
    batches; a sharded forward is a collective and would wait forever for the missing
    ones. All-gathered once (every rank calls this), the forwards need no collective. The
    memory is that of a DDP replica, for the evaluation only.
    """
    parts = fsdp_modules(module)
    if not parts:
        yield
        return
    for part in parts:
        part.unshard()
    module.set_reshard_after_forward(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_reshard_after_forward(True)  # type: ignore[operator]
        module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
        for part in parts:
            part.reshard()
