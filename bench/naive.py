"""The masked model written the obvious way -- a Python loop over branches -- against the vectorised
:class:`maskconnect.models.MaskedResNeXt`, forward + backward.

``naive_forward`` uses the masked model's own weights and computes the same function (docs/design.md
section 3), in training mode too: per branch k a 1x1 conv, BN and ReLU on k's rows, the 3x3 conv on
k's slice of the grouped weight, BN, ReLU, and the 1x1 conv to the module width; the last BN is shared
by the branches of a module, so (as in training) its batch statistics are taken over all branches
together; the projection shortcut likewise. Branch j of the next module reads
ReLU(sum_k m_jk * (F_k + P_k / K)) as a plain Python sum. It is differentiable, so the gradients of
weights and real-valued masks can be compared with the vectorised model's.

Goal: the vectorised model >= 3x the naive loop's forward + backward speed on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskconnect.models import MaskedResNeXt

from .common import Context, Workload, finish, fmt_num, free_memory, goal, make_record, measure, result_row, tensor_bytes
from .workloads import Config, random_batch

GOAL_SPEEDUP = 3.0
ARCHS = ("20,4,8", "29,8,8", "29,64,8")
QUICK_ARCHS = ("20,4,8",)


def _bn(h: Tensor, bn: nn.BatchNorm2d, rows: slice | None = None) -> Tensor:
    """``bn`` applied to ``h``, restricted to channels ``rows`` of its parameters and statistics.
    In training mode the running statistics of those rows are updated in place (slices are views)."""
    sl = (lambda t: t) if rows is None else (lambda t: None if t is None else t[rows])  # noqa: E731
    return F.batch_norm(h, sl(bn.running_mean), sl(bn.running_var), sl(bn.weight), sl(bn.bias),
                        bn.training, bn.momentum if bn.momentum is not None else 0.0, bn.eps)


def _shortcut(block, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    conv, bn = block.downsample[0], block.downsample[1]
    return _bn(F.conv2d(x, conv.weight, stride=conv.stride), bn)


def naive_forward(model: MaskedResNeXt, x: Tensor, masks=None) -> Tensor:
    """Logits of ``model`` for ``x``, computed branch by branch with Python loops.

    ``masks`` defaults to ``model.masks()`` (a fresh draw when a learned model trains, exactly as
    the vectorised forward does).
    """
    if masks is None:
        masks = model.masks()
    out = model.maxpool(F.relu(model.bn1(model.conv1(x))))
    blocks = model.blocks()
    inputs = [out] * blocks[0].branches
    for i, blk in enumerate(blocks):
        n, bw, oc = blk.branches, blk.branch_width, blk.out_ch
        hs = []
        for k in range(n):
            rows = slice(k * bw, (k + 1) * bw)
            h = F.relu(_bn(F.conv2d(inputs[k], blk.conv1.weight[rows]), blk.bn1, rows))
            h = F.conv2d(h, blk.conv2.weight[rows], stride=blk.conv2.stride, padding=1)
            h = F.relu(_bn(h, blk.bn2, rows))
            hs.append(F.conv2d(h, blk.conv3.weight[k * oc:(k + 1) * oc]))
        # The last BN (and the projection's BN) are shared by the module's branches: in training their
        # batch statistics cover all branches, so they see the branches stacked along the batch.
        fs = torch.cat(hs, 0)
        fs = _bn(fs, blk.bn3).chunk(n, 0)
        if blk.shared_input:
            ps = [_shortcut(blk, inputs[0])] * n  # every branch reads the same tensor: P once
        else:
            ps = _shortcut(blk, torch.cat(inputs, 0)).chunk(n, 0)
        ys = [fs[k] + ps[k] * blk.identity_scale for k in range(n)]
        if i < len(blocks) - 1:
            m = masks[i]
            inputs = [F.relu(sum(m[j, k] * ys[k] for k in range(n))) for j in range(m.shape[0])]
        else:
            out = F.relu(sum(ys))
    return model.fc(torch.flatten(model.avgpool(out), 1))


def _fwd_bwd(forward, model: nn.Module, x: Tensor, y: Tensor, ctx: Context):
    def fn():
        with ctx.precision.autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()
    return fn


@torch.no_grad()
def _check(model: MaskedResNeXt, x: Tensor) -> float:
    """Max |difference| of the logits in fp32 eval mode (top-K masks), on a few images."""
    was = model.training
    model.eval()
    a, b = model(x), naive_forward(model, x)
    model.train(was)
    return float((a - b).abs().max())


def run(ctx: Context) -> Path:
    batch = ctx.cifar_batch()
    warmup, repeats = ctx.n_warmup(5), ctx.n_steps(20)
    archs = QUICK_ARCHS if ctx.quick else ARCHS
    results, speedups = [], {}
    for arch in archs:
        cfg = Config(arch, "learned", 4)
        torch.manual_seed(0)
        spec = cfg.spec()
        model = ctx.precision.prepare_model(MaskedResNeXt(spec)).train()
        x, y = random_batch(spec, batch, ctx)
        diff = _check(model, x[: min(batch, 4)])
        vec = ctx.maybe_compile(model)
        ws = [Workload(f"{{{arch}}} vectorised", _fwd_bwd(vec, model, x, y, ctx), batch, tensor_bytes(model, x, y),
                       {"config": cfg.as_dict(), "impl": "vectorised"}),
              Workload(f"{{{arch}}} naive loop", _fwd_bwd(lambda t: naive_forward(model, t), model, x, y, ctx), batch,
                       tensor_bytes(model, x, y), {"config": cfg.as_dict(), "impl": "naive per-branch loop"})]
        ms = measure(ws, device=ctx.device, warmup=warmup, repeats=repeats)
        v, n = ms[ws[0].name], ms[ws[1].name]
        speedups[arch] = n.median / v.median
        results.append(result_row(v, speedup_vs_naive=speedups[arch], eval_max_abs_diff_fp32=diff))
        results.append(result_row(n, speedup_vs_naive=1.0, eval_max_abs_diff_fp32=diff))
        del ws, model, vec, x, y
        free_memory(ctx.device)
    worst = min(speedups, key=speedups.get)
    full_set = tuple(archs) == ARCHS
    goals = [goal("vectorised_vs_naive", "vectorised masked model forward+backward speed / naive per-branch loop, "
                  "every CIFAR config (worst case)", value=speedups[worst], threshold=GOAL_SPEEDUP, ctx=ctx,
                  measured_on=f"worst of {', '.join('{' + a + '}' for a in archs)} (worst: {{{worst}}}), learned K=4, batch {batch}",
                  valid=full_set, why_not=None if full_set else "--quick measured a subset of the configs")]
    rec = make_record(ctx, "naive", batch=batch, warmup=warmup, repeats=repeats,
                      config={"archs": list(archs), "connectivity": "learned K=4",
                              "work": "forward + cross-entropy + backward (no optimiser step), training mode, "
                                      "one mask draw per forward",
                              "naive_compiled": False},
                      results=results, goals=goals,
                      notes=["eval_max_abs_diff_fp32: logits of both implementations, fp32 eval mode, 4 images "
                             "(same maths check)", "with --compile only the vectorised model is compiled"])
    table = [{"model": r["name"], "batch": r["batch"], "ms": fmt_num(r["median"] * 1e3), "iqr": fmt_num(r["spread"]["iqr"] * 1e3, 2),
              "ips": fmt_num(r["images_per_s"]["median"]), "x": f"{r['speedup_vs_naive']:.2f}x",
              "diff": f"{r['eval_max_abs_diff_fp32']:.1e}"} for r in results]
    return finish(ctx, rec, table, [("model", "implementation"), ("batch", "batch"), ("ms", "ms fwd+bwd"),
                                    ("iqr", "IQR ms"), ("ips", "img/s"), ("x", "speed vs naive"), ("diff", "max |diff|")])
