"""The training step and evaluation, shared by the training loop, ``evaluate``, the preflight and the
benchmarks; :class:`Precision` is how tensors flow on the device.

Kept free of I/O, tracking and progress bars: it is the hot path. On CUDA the step runs under bf16
autocast with channels_last tensors; nothing in it synchronises with the host (mask sampling stays on
the device, the loss is returned as a tensor).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectivity import MaskBank, mask_banks
from ..mask_rules import DEFAULT_MASK_RULE, MaskRule, mask_rule


@dataclass
class Precision:
    """How tensors flow on a device: autocast dtype (None = fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: str | torch.device, *, amp: bool | None = None,
                   channels_last: bool | None = None) -> "Precision":
        """``amp`` (bf16 autocast) and ``channels_last``: None is the device's default, on for CUDA and
        off for the CPU (fp32, NCHW: bit-reproducible, resumable). Given explicitly, they take effect
        on either device: the CPU runs bf16 autocast and channels_last too, which is how the CUDA
        precision path is tested without a GPU."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        amp = cuda if amp is None else bool(amp)
        channels_last = cuda if channels_last is None else bool(channels_last)
        return cls(device, torch.bfloat16 if amp else None, channels_last)

    def describe(self) -> dict:
        """What a run records (metrics.json): the autocast dtype (None: fp32, no autocast) and the memory format."""
        return {"autocast_dtype": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                "memory_format": "channels_last" if self.channels_last else "contiguous"}

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_input(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               precision: Precision, *, label_smoothing: float = 0.0,
               banks: list[MaskBank] | None = None, rule: MaskRule | str = DEFAULT_MASK_RULE) -> tuple[Tensor, Tensor]:
    """One SGD iteration: forward (one mask draw), backward, step, with the mask ``rule`` around the
    step (mask_rules.MASK_RULES: e.g. centre the mask gradient, then clip or project the masks).

    ``banks``: the unfrozen mask banks (computed once per epoch by the caller; None looks them up).
    Returns (loss, number of correct predictions) as device tensors (no host sync).
    """
    if banks is None:
        banks = [b for b in mask_banks(model) if not b.frozen]
    if isinstance(rule, str):
        rule = mask_rule(rule)
    with precision.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    rule.before_step(banks)
    optimizer.step()
    rule.after_step(banks)
    correct = (logits.detach().argmax(1) == y).sum()
    return loss.detach(), correct


@torch.no_grad()
def evaluate(model: nn.Module, batches, precision: Precision, num_classes: int) -> dict:
    """Test loss, top-1 and (with >= 5 classes) top-5 accuracy in percent, over all batches."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=precision.device)
    c1 = torch.zeros((), dtype=torch.long, device=precision.device)
    c5 = torch.zeros((), dtype=torch.long, device=precision.device)
    n = 0
    for x, y in batches:
        x, y = precision.prepare_input(x), y.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit = top == y[:, None]
        c1 += hit[:, 0].sum()
        c5 += hit.any(1).sum()
        n += y.shape[0]
    n = max(n, 1)
    return {
        "test_loss": float(loss_sum) / n,
        "test_top1": 100.0 * int(c1) / n,
        "test_top5": 100.0 * int(c5) / n if num_classes >= 5 else None,
    }
