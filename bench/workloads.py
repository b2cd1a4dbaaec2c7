"""Building what the benchmarks time: models from {D,w,C} + connectivity, the training step of
``maskconnect.training.step`` on a fixed random batch, FLOP counts, and the largest batch that fits."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from maskconnect.connectivity import param_groups
from maskconnect.models.counting import count_flops
from maskconnect.training.step import train_step
from maskconnect.models import build_model
from maskconnect.specs import MASKED, ModelSpec, arch_label, make_spec

from .common import Context, Workload, free_memory, tensor_bytes

# Weight decay of the two recipes (docs/design.md section 6); the optimiser is otherwise the same.
WEIGHT_DECAY = {"cifar": 5e-4, "imagenet": 1e-4}


@dataclass(frozen=True)
class Config:
    """One model of the paper: {D,w,C}, connectivity kind and fan-in K, on a dataset layout."""

    arch: str
    connectivity: str = "full"
    fan_in: int | None = None
    dataset: str = "cifar100"
    image_size: int | None = None   # None: the dataset's (32 / 224); --quick shrinks ImageNet inputs

    @property
    def label(self) -> str:
        kind = {"full": "full", "prev": "prev", "random": f"random K={self.fan_in}",
                "learned": f"learned K={self.fan_in}"}[self.connectivity]
        size = f" @{self.image_size}px" if self.image_size else ""
        return f"{arch_label(self.arch)} {kind}{size}"

    def spec(self, seed: int = 0) -> ModelSpec:
        return make_spec(self.arch, connectivity=self.connectivity,
                         fan_in=self.fan_in if self.connectivity in MASKED else None,
                         dataset=self.dataset, image_size=self.image_size, seed=seed)

    def as_dict(self) -> dict:
        spec = self.spec()
        return {"arch": self.arch, "connectivity": self.connectivity, "fan_in": spec.fan_in,
                "dataset": self.dataset, "image_size": spec.image_size, "layout": spec.layout}


@lru_cache(maxsize=None)
def flops_per_image(cfg: Config) -> int:
    """Forward FLOPs (2 x MACs) of one image, counted on the meta device (nothing is computed).
    The masked models count every branch, as training computes them all."""
    spec = cfg.spec()
    with torch.device("meta"):
        model = build_model(spec)
    return count_flops(model, (spec.in_channels, spec.image_size, spec.image_size))


def random_batch(spec: ModelSpec, batch: int, ctx: Context, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return ctx.precision.prepare_input(x), y.to(ctx.device)


def sgd(model: nn.Module, layout: str) -> torch.optim.Optimizer:
    """The suite's optimiser: SGD, momentum 0.9, LR 0.1, masks in their own group."""
    wd = WEIGHT_DECAY[layout]
    return torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=wd), lr=0.1, momentum=0.9)


def train_workload_for_model(name: str, model: nn.Module, spec: ModelSpec, batch: int, ctx: Context,
                             info: dict | None = None, seed: int = 0) -> Workload:
    """The training step of ``maskconnect.training.step`` (forward, backward, SGD step, mask clip) on one
    fixed random batch. ``model`` is moved to the device in the context's layout."""
    model = ctx.precision.prepare_model(model).train()
    opt = sgd(model, spec.layout)
    x, y = random_batch(spec, batch, ctx, seed)
    step_model = ctx.maybe_compile(model)
    return Workload(name, lambda: train_step(step_model, opt, x, y, ctx.precision), items=batch,
                    resident=tensor_bytes(model, x, y), info=dict(info or {}))


def train_workload(cfg: Config, batch: int, ctx: Context, seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    spec = cfg.spec(seed)
    return train_workload_for_model(cfg.label, build_model(spec), spec, batch, ctx,
                                    info={"config": cfg.as_dict()}, seed=seed)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def fits(cfg: Config, batch: int, ctx: Context) -> bool:
    """Whether two training steps of ``cfg`` at ``batch`` run on the device (CUDA) without OOM."""
    w = None
    try:
        w = train_workload(cfg, batch, ctx)
        w.fn()
        w.fn()
        ctx.sync()
        return True
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        return False
    finally:
        del w
        free_memory(ctx.device)


def largest_batch(cfg: Config, ctx: Context, *, start: int = 8, cap: int = 1024) -> int | None:
    """The largest batch (doubling from ``start``, at most ``cap``) that trains without OOM on the
    GPU; None if even ``start`` does not fit. Between the last fit and the first failure the midpoint
    is tried once, so the answer is within 25% of the true limit."""
    best, b = None, start
    while b <= cap:
        if not fits(cfg, b, ctx):
            break
        best, b = b, b * 2
    if best is not None and best < cap:
        mid = (best + min(2 * best, cap)) // 2 // 8 * 8
        if mid > best and fits(cfg, mid, ctx):
            best = mid
    return best


def achieved_tflops(cfg: Config, images_per_s: float) -> float:
    """Training FLOP/s actually achieved: forward FLOPs x 3 (forward + backward) x images/s."""
    return flops_per_image(cfg) * 3 * images_per_s / 1e12
