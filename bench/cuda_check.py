"""Correctness of the fast path on a GPU: the models under bf16 autocast + channels_last (+ torch.compile
with ``--compile``) against the fp32 NCHW reference, in eval mode (logits) and in training mode
(gradients of one step with the same mask draw).

Variants and tolerances (relative L2 error of the logits; cosine similarity of the gradients):

* fp32 channels_last           -- layout only:      rel. error < 1e-4, gradient cosine > 0.9999
* bf16 autocast + channels_last -- the training path: rel. error < 5e-2, gradient cosine > 0.8

The bf16 gradient bound is loose on purpose: at initialisation, with random labels, a weight gradient
is a small average of many terms of both signs, and bf16 rounding leaves a cosine of about 0.9 even
for plain ResNeXt (Fixed-Full, checked beside the masked models). A layout or masking bug gives a
cosine near 0 and a logit error near 1.

BatchNorm statistics and affine parameters are randomised first, so eval mode is not an identity map.
It needs CUDA; ``--allow-cpu`` runs the same comparisons with CPU bf16 autocast (to test this code).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from maskconnect.connectivity import freeze_masks
from maskconnect.training.step import Precision
from maskconnect.models import build_model
from maskconnect.models.pruning import prune

from .common import Context, finish, make_record
from .workloads import Config

ARCHS = ("29,8,8", "29,64,8")
QUICK_ARCHS = ("20,4,8",)
TOL = {"fp32 channels_last": (1e-4, 0.9999), "bf16 autocast + channels_last": (5e-2, 0.8),
       "bf16 autocast + channels_last + compile": (5e-2, 0.8)}


@torch.no_grad()
def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _models(arch: str):
    out = []
    for cfg in (Config(arch), Config(arch, "random", 4), Config(arch, "learned", 4)):
        torch.manual_seed(0)
        m = build_model(cfg.spec())
        _randomize_bn(m)
        out.append((cfg.label, m))
    torch.manual_seed(0)
    k1 = build_model(Config(arch, "learned", 1).spec())
    _randomize_bn(k1)
    with torch.no_grad():
        k1.masks.real.copy_(torch.rand(k1.masks.real.shape, generator=torch.Generator().manual_seed(0)))
    freeze_masks(k1)
    out.append((f"{{{arch}}} learned K=1 pruned", prune(k1)))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm().clamp(min=1e-12))


def _grads(model, x, y, precision: Precision, seed: int) -> torch.Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same mask draw for every variant
    with precision.autocast():
        loss = F.cross_entropy(model(precision.prepare_input(x)).float(), y)
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def run(ctx: Context, allow_cpu: bool = False) -> Path | None:
    if not ctx.cuda and not allow_cpu:
        print("cuda-check needs a CUDA device (this machine has none); nothing written. "
              "--allow-cpu runs it with CPU bf16 autocast to test the code.")
        return None
    dev = ctx.device
    batch = ctx.batch or (4 if ctx.quick else 32)
    variants = {"fp32 channels_last": Precision(dev, None, True),
                "bf16 autocast + channels_last": Precision(dev, torch.bfloat16, True)}
    if ctx.compile:
        variants["bf16 autocast + channels_last + compile"] = Precision(dev, torch.bfloat16, True)
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # compiled mask draws = eager draws, so gradients compare
    results = []
    for arch in QUICK_ARCHS if ctx.quick else ARCHS:
        for label, model in _models(arch):
            spec = model.spec
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g).to(dev)
            y = torch.randint(0, spec.num_classes, (batch,), generator=g).to(dev)
            ref_model = model.to(dev).eval()
            with torch.no_grad():
                ref = ref_model(x).float()
            ref_grad = _grads(copy.deepcopy(ref_model), x, y, Precision(dev, None, False), seed=2)
            for vname, prec in variants.items():
                m = prec.prepare_model(copy.deepcopy(ref_model)).eval()
                run_m = torch.compile(m) if "compile" in vname else m
                with torch.no_grad(), prec.autocast():
                    out = run_m(prec.prepare_input(x)).float()
                grad = _grads(run_m, x, y, prec, seed=2)
                rel = _rel(ref, out)
                cos = float(F.cosine_similarity(ref_grad, grad, dim=0))
                tol_rel, tol_cos = TOL[vname]
                results.append({"name": f"{label} / {vname}", "model": label, "variant": vname, "batch": batch,
                                "logits_rel_l2": rel, "logits_max_abs_diff": float((ref - out).abs().max()),
                                "top1_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
                                "grad_cosine": cos, "tol_rel_l2": tol_rel, "tol_grad_cosine": tol_cos,
                                "passed": bool(rel < tol_rel and cos > tol_cos)})
                del m, run_m
    passed = all(r["passed"] for r in results)
    rec = make_record(ctx, "cuda-check", batch=batch, warmup=0, repeats=1,
                      config={"archs": list(QUICK_ARCHS if ctx.quick else ARCHS), "variants": list(variants),
                              "reference": "fp32, NCHW, eval mode (logits) / train mode one step (gradients)",
                              "allow_cpu": bool(allow_cpu and not ctx.cuda)},
                      results=results, goals=[],
                      extra={"passed": passed,
                             "dtype": "bfloat16 (autocast) vs float32 reference"})
    table = [{"name": r["name"], "rel": f"{r['logits_rel_l2']:.2e}", "top1": f"{r['top1_agreement']:.2f}",
              "cos": f"{r['grad_cosine']:.5f}", "ok": "ok" if r["passed"] else "FAIL"} for r in results]
    path = finish(ctx, rec, table, [("name", "model / variant"), ("rel", "logits rel. L2"), ("top1", "top-1 agree"),
                                    ("cos", "grad cosine"), ("ok", "within tol.")])
    print("cuda-check:", "all within tolerance" if passed else "SOME CHECKS FAILED")
    return path
