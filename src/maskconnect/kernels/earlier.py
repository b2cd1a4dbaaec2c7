"""The masked ResNet's connections, vectorised: each block reads the mean of K earlier blocks' outputs,
with one batched matmul per source stage and no copy of an earlier output per reader (docs/design.md
sections 10 and 12).

What it computes is ``models.resnet.MaskedResNet``'s plain form, block j's input

    x_j = (1 / K_j) sum_{k < j} m_jk A(y_k)          A: option-A shortcut to x_j's shape

written there as a loop over candidates. Written that way, autograd keeps, for every reader, a
subsampled and zero-padded copy of every earlier output of another stage (O(L^2) tensors), and runs
O(L^2) small kernels forward and backward. Here instead:

* :meth:`EarlierOutputs.put` writes each block's output y_k = ReLU(z_k) once into its stage's buffer (one
  (N, blocks, C, H, W) tensor per stage, in the block's memory format): the only copy of y_k, which the
  ReLU's backward reads too;
* :meth:`EarlierOutputs.mix` computes x_j with one bmm per source stage over that stage's buffer (the
  0/1 row times the stage's outputs; an earlier stage's are subsampled first, and their sum goes into
  x_j's first channels: A is linear), then scales by 1/K_j;
* the backward pass computes the whole row's mask gradient (straight-through: every candidate gets
  <dL/dx_j, A(y_k)>, selected or not) with one bmm per source stage, and adds m_jk A^T(dL/dx_j) into a
  gradient buffer per stage (one baddbmm within the stage); each block's ReLU backward reads its slice.

Autograd sees each write as a node (:class:`_Put`) returning an empty *token*, and each reader as a node
(:class:`_Mix`) taking its row and the tokens of its candidates: a block's ReLU backward therefore runs
only after every reader of its output has added its share. The buffers are held by reference, not through
``save_for_backward`` (each is written block by block after readers have used it); the last write of a
stage saves the completed buffer the ordinary way, so ``saved_tensors_hooks`` (``models.counting.
saved_bytes``) count it once. A forward pass builds a new :class:`EarlierOutputs`; every backward pass
through it (``retain_graph``, ``autograd.grad`` for some inputs only) starts its gradient buffers afresh
at the last reader, which every path from the output to an earlier block passes through. torch.compile
traces the model's plain form instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NCHW, _NHWC = (0, 1, 2, 3), (0, 2, 3, 1)   # physical order of a (N, C, H, W) tensor


def _order(t: Tensor) -> tuple[int, ...]:
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return _NHWC if channels_last else _NCHW


class EarlierOutputs:
    """The block outputs of one forward pass, a buffer per stage, and (in the backward pass) their gradients.

    ``blocks_per_stage``: how many outputs each stage's buffer holds (the blocks :meth:`put` writes there:
    a pruned model's kept blocks)."""

    def __init__(self, blocks_per_stage: list[int]):
        self.sizes = list(blocks_per_stage)
        self.phys: list[Tensor | None] = [None] * len(self.sizes)   # (N, n, *element in physical order)
        self.order: list[tuple[int, ...]] = [_NCHW] * len(self.sizes)
        self.grad: list[Tensor | None] = [None] * len(self.sizes)   # same layout as phys
        self.readers = 0   # _Mix nodes made so far: the last one made is the first a backward pass runs

    # -- layout -----------------------------------------------------------------------------------
    def _logical5(self, t: Tensor, s: int) -> Tensor:
        """A (N, n, *element in physical order) tensor of stage ``s`` as its logical (N, n, C, H, W) view."""
        order = self.order[s]
        return t.permute(0, 1, *[1 + order.index(d) for d in (1, 2, 3)])

    def _physical5(self, t: Tensor, s: int) -> Tensor:
        """Inverse of :meth:`_logical5`."""
        return t.permute(0, 1, *[1 + o for o in self.order[s][1:]])

    def output(self, s: int, i: int) -> Tensor:
        """Output ``i`` of stage ``s`` (logical (N, C, H, W) view of the buffer)."""
        return self._logical5(self.phys[s], s)[:, i]

    def _flat(self, t: Tensor, s: int) -> Tensor:
        """A logical (N, C, H, W) tensor as (N, 1, P) in stage ``s``'s physical order (a copy if need be)."""
        return t.permute(*self.order[s]).reshape(t.shape[0], 1, -1)

    def _unflat(self, flat: Tensor, s: int, chw: tuple[int, int, int]) -> Tensor:
        """(N, P) or (N, 1, P) in stage ``s``'s physical order -> the logical (N, C, H, W) view."""
        order = self.order[s]
        shape = (flat.shape[0], *chw)
        phys = flat.reshape([shape[o] for o in order])
        return phys.permute(*[order.index(i) for i in range(4)])

    def _source(self, s: int, n: int, r: int) -> Tensor:
        """Stage ``s``'s first ``n`` outputs, every ``r``-th pixel, as (N, n, P): a view when ``r`` is 1."""
        phys = self.phys[s][:, :n]
        if r == 1:
            return phys.reshape(phys.shape[0], n, -1)
        return self._physical5(self._logical5(phys, s)[..., ::r, ::r], s).reshape(phys.shape[0], n, -1)

    # -- the two operations ------------------------------------------------------------------------
    def put(self, z: Tensor, stage: int, index: int) -> Tensor:
        """Write ReLU(z) as output ``index`` of ``stage``; returns the token its readers take."""
        return _Put.apply(z, self, stage, index)

    def mix(self, row: Tensor, parts: tuple[tuple[int, int], ...], scale: float, shape: tuple[int, int, int],
            tokens: list[Tensor]) -> Tensor:
        """scale x (the sum of the candidates ``row`` selects, each brought to ``shape`` = (C, H, W) by
        subsampling and zero channels). ``parts``: (stage, how many of its first outputs are candidates,
        the stride from that stage to ``shape``), in the row's order; ``tokens``: the candidates' tokens (autograd's edges)."""
        return _Mix.apply(row, self, tuple(parts), float(scale), tuple(shape), *tokens)

    def _allocate(self, z: Tensor, s: int) -> None:
        self.order[s] = _order(z)
        element = [z.shape[o] for o in self.order[s][1:]]
        self.phys[s] = torch.empty((z.shape[0], self.sizes[s], *element), dtype=z.dtype, device=z.device)


class _Put(torch.autograd.Function):
    """y = ReLU(z) into the stage buffer; the output is an empty token (see the module's doc). Its backward
    reads the gradient the readers gathered for y and applies the ReLU's."""

    @staticmethod
    def forward(ctx, z: Tensor, store: EarlierOutputs, s: int, i: int):
        if store.phys[s] is None:
            store._allocate(z, s)
        torch.clamp(z, min=0, out=store.output(s, i))
        ctx.store, ctx.s, ctx.i = store, s, i
        ctx.set_materialize_grads(False)
        if i == store.sizes[s] - 1:  # the stage's buffer is complete: saved the ordinary way, once
            ctx.save_for_backward(store.phys[s])
        return z.new_empty(0)

    @staticmethod
    def backward(ctx, _token):
        ctx.saved_tensors  # noqa: B018 (unpacks the completed buffer: autograd's version check and hooks)
        store, s, i = ctx.store, ctx.s, ctx.i
        gz = None
        if store.grad[s] is not None:
            g = store._logical5(store.grad[s], s)[:, i]
            gz = torch.ops.aten.threshold_backward(g, store.output(s, i), 0)
        if s == 0 and i == 0:  # the first block's write is the last node of a full pass: free the gradients early
            store.grad = [None] * len(store.sizes)
        return gz, None, None, None


class _Mix(torch.autograd.Function):
    """A block's input from the earlier outputs: one bmm per source stage (see the module's doc)."""

    @staticmethod
    def forward(ctx, row: Tensor, store: EarlierOutputs, parts: tuple, scale: float, shape: tuple, *tokens: Tensor):
        x, start = None, 0
        for s, n, r in parts:
            if n == 0:
                continue
            src = store.phys[s]
            m = row[start:start + n].to(src.dtype)
            start += n
            flat = torch.bmm(m.view(1, 1, n).expand(src.shape[0], 1, n), store._source(s, n, r))
            c_s = _chw(store, s)[0]
            part = store._unflat(flat, s, (c_s, shape[1], shape[2]))
            if x is None and c_s == shape[0]:
                x = part
            else:
                if x is None:
                    x = part.new_zeros((part.shape[0], *shape)).contiguous(
                        memory_format=torch.channels_last if store.order[s] == _NHWC else torch.contiguous_format)
                x[:, :c_s] += part
        ctx.save_for_backward(row)
        ctx.store, ctx.parts, ctx.scale, ctx.shape = store, parts, scale, shape
        ctx.reader, store.readers = store.readers, store.readers + 1
        return x.mul_(scale)

    @staticmethod
    def backward(ctx, g: Tensor):
        (row,) = ctx.saved_tensors
        store, scale = ctx.store, ctx.scale
        if ctx.reader == store.readers - 1:  # every path from the output to an earlier block passes through the
            store.grad = [None] * len(store.sizes)   # last reader: a new backward pass starts from zero
        g_row = torch.zeros_like(row) if ctx.needs_input_grad[0] else None
        start = 0
        for s, n, r in ctx.parts:
            if n == 0:
                continue
            src = store.phys[s]
            c_s = _chw(store, s)[0]
            gs = store._flat(g[:, :c_s], s).to(src.dtype) * scale             # (N, 1, P'): A^T, then 1/K_j
            source = store._source(s, n, r)
            if g_row is not None:
                g_row[start:start + n] = torch.bmm(gs, source.transpose(1, 2)).sum(0).flatten().to(row.dtype)
            m = row[start:start + n].detach().to(src.dtype).view(1, n, 1).expand(src.shape[0], n, 1)
            if store.grad[s] is None:
                store.grad[s] = torch.zeros_like(src)
            if r == 1:
                acc = store.grad[s][:, :n].view(src.shape[0], n, -1)
                acc.baddbmm_(m, gs)
            else:  # the gradient lands on every r-th pixel of the earlier stage
                target = store._logical5(store.grad[s][:, :n], s)[..., ::r, ::r]
                contrib = torch.bmm(m, gs).reshape(store._physical5(target, s).shape)
                target += store._logical5(contrib, s)
            start += n
        return (g_row, None, None, None, None, *([None] * (len(ctx.needs_input_grad) - 5)))


def _chw(store: EarlierOutputs, s: int) -> tuple[int, int, int]:
    el = store.phys[s].shape[2:]
    order = store.order[s]
    return tuple(el[order[1:].index(d)] for d in (1, 2, 3))

