"""The training model's wrappers: activation checkpointing, SyncBatchNorm, DDP, torch.compile.

The trainer keeps two handles on one set of weights: the plain module (evaluated,
checkpointed, exported: its ``state_dict`` has no ``module.`` or ``_orig_mod.`` prefix, so
a checkpoint from N processes loads in M) and the wrapped callable that training steps
run through.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError


def _stages(module: nn.Module) -> list[nn.Sequential]:
    """The outermost ``nn.Sequential`` blocks that hold parameters (a model's stages)."""
    found: list[nn.Sequential] = []
    for child in module.children():
        if isinstance(child, nn.Sequential) and any(True for _ in child.parameters()):
            found.append(child)
        else:
            found.extend(_stages(child))
    return found


@contextmanager
def _frozen_norm_stats(stage: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics still while a checkpointed stage is recomputed.

    The recomputation is a second training-mode forward of the same batch; without this
    every BatchNorm layer would fold that batch into its running mean and variance twice.
    """
    norms = [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
              else None) for m in norms]  # fmt: skip
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _segments(blocks: list[nn.Module]) -> list[nn.Sequential]:
    """About sqrt(len) runs of blocks; none starts with an in-place op (ReLU(inplace)).

    A segment's input is kept for the recomputation, so an op that overwrites its input
    must stay in the segment that produced it.
    """
    size = max(1, round(len(blocks) / max(1, round(math.sqrt(len(blocks))))))
    starts = [0]
    for start in range(size, len(blocks), size):
        start = max(start, starts[-1] + 1)
        while start < len(blocks) and getattr(blocks[start], "inplace", False):
            start += 1
        if start < len(blocks) and start > starts[-1]:
            starts.append(start)
    ends = [*starts[1:], len(blocks)]
    return [nn.Sequential(*blocks[a:b]) for a, b in zip(starts, ends, strict=True)]


def _checkpointed_forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    # Bound with types.MethodType so that deepcopy (the EMA copy) rebinds it to the copy.
    if not (self.training and torch.is_grad_enabled()):
        return nn.Sequential.forward(self, x)
    blocks = list(self)
    for segment in _segments(blocks):
        x = checkpoint(
            segment,
            x,
            use_reentrant=False,
            context_fn=lambda segment=segment: (nullcontext(), _frozen_norm_stats(segment)),
        )
    return x


def enable_activation_checkpointing(model: nn.Module, name: str) -> str:
    """Recompute activations in backward instead of storing them; returns what was done.

    timm models (and any model with ``set_grad_checkpointing``) use their own switch.
    Otherwise each stage (an outermost ``nn.Sequential`` with parameters: a torchvision
    ResNet's ``layer1``-``layer4``, simple_cnn's ``features``) runs through
    ``torch.utils.checkpoint`` in about sqrt(len) segments. The
    forward is replaced on the instance, so parameter names and checkpoints are unchanged.
    """
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
        return f"activation checkpointing: {name}.set_grad_checkpointing(True)"
    stages = _stages(model)
    if not stages:
        raise ConfigError(
            f"train.activation_checkpointing: model {name} has no set_grad_checkpointing and "
            "no nn.Sequential stages to checkpoint. Use a timm model or turn it off."
        )
    for stage in stages:
        stage.forward = types.MethodType(_checkpointed_forward, stage)  # type: ignore[method-assign]
    blocks = sum(len(s) for s in stages)
    return (
        f"activation checkpointing: {len(stages)} stages ({blocks} blocks) recomputed in "
        "backward with torch.utils.checkpoint"
    )


def convert_sync_bn(model: nn.Module, dist: Dist, device: torch.device) -> tuple[nn.Module, str]:
    """BatchNorm → SyncBatchNorm under DDP on CUDA; returns the model and a note."""
    if not dist.enabled:
        return model, "train.sync_bn: one process, so BatchNorm statistics are already global"
    if device.type != "cuda":
        raise ConfigError(
            "train.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs only on GPU modules "
            "(NCCL). On the CPU remove train.sync_bn, or raise data.batch_size per process."
        )
    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), f"SyncBatchNorm: {n} layers converted"


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class TrainModel:
    """What a training step calls: the model, through DDP and torch.compile when asked.

    ``torch.compile`` compiles lazily, at the first call; when that fails (an operator
    the compiler does not support, no C++ compiler for the CPU backend), the step is
    retried eagerly and the run goes on without compile, saying why.
    """

    def __init__(
        self,
        model: nn.Module,
        dist: Dist,
        device: torch.device,
        compile_model: bool,
        say: Callable[[str], None],
        sharded: bool = False,
    ) -> None:
        self.eager: Any = model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self._ids = [device.index] if device.type == "cuda" else None
        # train.strategy=fsdp: the model was sharded in place (engine/fsdp.py), so it is
        # called as it is; gradient sync is FSDP2's switch instead of DDP's no_sync.
        self.fsdp = model if sharded and dist.enabled else None
        if dist.enabled and not sharded:
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=self._ids)
            self.eager = self.ddp
        self.compiled: Any = torch.compile(self.eager) if compile_model else None
        self.compile_state = "pending" if compile_model else "off"
        self._say = say
        self._name = type(model).__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the compiled model when it works, else the eager one."""
        if self.compile_state in ("pending", "on"):
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)

    def no_sync(self, sync: bool) -> AbstractContextManager[None]:
        """DDP's ``no_sync`` (FSDP2's gradient sync off) on a micro-step that does not update.

        Under FSDP the micro-steps before the last then accumulate unsharded gradients
        locally: one reduce-scatter per update, as DDP does one all-reduce.
        """
        if sync:
            return nullcontext()
        if self.fsdp is not None:
            return _fsdp_no_sync(self.fsdp)
        if self.ddp is None:
            return nullcontext()
        return self.ddp.no_sync()

    def rewrap(self) -> None:
        """Wrap the module anew after its set of trainable parameters changed (an unfreeze).

        DDP registers gradient hooks for the parameters that require gradients when it is
        built; a compiled graph is specialised to them too. Under DDP this is a collective
        (the constructor checks and broadcasts the parameters): every rank calls it.
        """
        if self.ddp is not None:
            module = self.ddp.module
            self.ddp = None  # the old reducer goes while the process group is up
            self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=self._ids)
            self.eager = self.ddp
        if self.compiled is not None:
            self.compiled = torch.compile(self.eager)
            if self.compile_state == "on":
                self.compile_state = "pending"  # a failure of the new graph falls back too

    def close(self) -> None:
        """Drop the DDP and compile wrappers; the plain module stays usable.

        Called when training ends, while the process group is still up: DDP's reducer
        holds the group, and freed later (after ``destroy_process_group``, by the garbage
        collector, holding the GIL) its Gloo destructor can wait forever on a worker thread
        that needs the GIL to free an all-gather's tensors.
        """
        if self.ddp is not None:
            self.eager = self.ddp.module
            self.ddp = None
        self.compiled = None
        self.compile_state = "off"

    def first_step(self, step: Callable[[], None], reset: Callable[[], None]) -> None:
        """Run ``step``; if compiling it fails, ``reset`` and run it again eagerly."""
        if self.compile_state != "pending":
            step()
            return
        try:
            step()
        except Exception as exc:  # the compiler's failures have no common base class
            first = str(exc).strip().splitlines()
            reason = first[0][:300] if first else type(exc).__name__
            self.compile_state = "failed"
            self._say(
                f"train.compile: torch.compile failed on {self._name} ({type(exc).__name__}: "
                f"{reason}); training continues without compile. Set train.compile=false "
                "to skip the attempt."
            )
            reset()
            step()
        else:
            self.compile_state = "on"
