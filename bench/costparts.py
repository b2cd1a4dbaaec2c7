"""Where a learned model's extra cost goes, device-independently: kernel launches and FLOPs.

* ``ops``: the aten ops one training step dispatches on the path CUDA runs (the memory-saving path, torch's
  own kernels, bf16 autocast + channels_last, SGD's foreach update), counted with a dispatch mode on any
  device. Views, allocations and detaches launch no kernel and are left out; every other op is at least
  one kernel launch on a GPU, where a small model's step is a few hundred microseconds of arithmetic and
  each launch costs a few microseconds. Learned K against the model's own wiring (Fixed-Full, Fixed-Prev),
  every CIFAR model of the paper at batch 8.
* ``flops``: forward FLOPs per image (``torch.utils.flop_counter``, eval mode: the frozen top-K masks) of
  every paper model, Fixed-Full (Fixed-Prev) and Learned at the paper's K, split into parts: the stem and
  classifier, the convolutions of the branches (blocks), the projection shortcuts, and the mixing (the
  masks' bmm); and how much of the learned/full ratio each part adds.

    PYTHONPATH=src python -m bench costparts          # both parts, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SKIP = {"empty", "empty_like", "empty_strided", "detach", "alias", "_unsafe_view", "lift_fresh"}

# the paper's models, each with the K of its headline Learned row
OPS_MODELS = (("20,4,8", "cifar100", 4), ("29,8,8", "cifar100", 4), ("29,64,8", "cifar100", 4),
              ("resnet38", "cifar100", 10), ("resnet110", "cifar100", 20))
FLOP_MODELS = OPS_MODELS[:3] + (("50,4,32", "imagenet", 16), ("101,4,32", "imagenet", 16),
                                ("101,4,64", "imagenet", 32), ("resnet38", "cifar100", 10),
                                ("resnet74", "cifar100", 15), ("resnet110", "cifar100", 20),
                                ("resnet50", "imagenet", 10))


def step_ops(arch: str, dataset: str, connectivity: str | None, fan_in: int | None, batch: int = 8) -> collections.Counter:
    """aten ops (by name) of one training step on CUDA's path (see the module's doc), counted on this device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from maskconnect import kernels
    from maskconnect.connectivity import param_groups
    from maskconnect.models import build_model
    from maskconnect.specs import make_spec
    from maskconnect.training.step import Precision, train_step

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not func.is_view and name not in SKIP:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    spec = make_spec(arch, dataset=dataset, connectivity=connectivity, fan_in=fan_in)
    torch.manual_seed(0)
    precision = Precision(torch.device("cpu"), torch.bfloat16, True)
    model = precision.prepare_model(build_model(spec)).train()
    if hasattr(model, "save_memory"):
        model.save_memory = True   # what CUDA runs
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4), lr=0.1, momentum=0.9, foreach=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    with kernels.cpu_fast_paths(False):
        train_step(model, opt, precision.prepare_input(x), y, precision)   # the first step makes SGD's state
        count = Count()
        with count:
            train_step(model, opt, precision.prepare_input(x), y, precision)
    return count.ops


def ops(args) -> dict:
    rows = []
    for arch, dataset, k in OPS_MODELS[: 2 if args.quick else None]:
        base = step_ops(arch, dataset, None, None)
        learned = step_ops(arch, dataset, "learned", k)
        extra = learned - base
        rows.append({"arch": arch, "dataset": dataset, "fan_in": k, "baseline_ops": sum(base.values()),
                     "learned_ops": sum(learned.values()), "ratio": sum(learned.values()) / sum(base.values()),
                     "extra_by_op": dict(extra.most_common(8))})
    return {"part": "ops", "batch": 8, "path": "CUDA's: memory-saving path, torch's kernels, bf16 autocast + "
            "channels_last, SGD foreach", "rows": rows}


def flop_parts(arch: str, dataset: str, connectivity: str | None, fan_in: int | None) -> dict:
    """Forward FLOPs per image by part (eval mode): stem+classifier, block convolutions, projection shortcuts,
    mixing."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from maskconnect.models import build_model
    from maskconnect.specs import make_spec

    spec = make_spec(arch, dataset=dataset, connectivity=connectivity, fan_in=fan_in)
    model = copy.deepcopy(build_model(spec)).to("meta").eval()
    x = torch.empty((1, spec.in_channels, spec.image_size, spec.image_size), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items() if name != "Global"}
    ops_of = counter.get_flop_counts()
    root = min(counts, key=len)
    parts = {"stem and classifier": 0, "block convolutions": 0, "projection shortcuts": 0, "mixing": 0}
    def parent(name: str) -> str | None:   # the nearest enclosing module that ran (a ModuleList does not)
        outer = [o for o in counts if name.startswith(o + ".")]
        return max(outer, key=len) if outer else None

    parents = {name: parent(name) for name in counts}
    for name, flops_ in counts.items():   # every op appears under each enclosing module: take each module's own
        own = flops_ - sum(counts[c] for c, p in parents.items() if p == name)
        if not own:
            continue
        if ".downsample" in name:
            parts["projection shortcuts"] += own
        elif name == root:
            parts["mixing"] += sum(f for op, f in ops_of[root].items() if "bmm" in str(op))
            parts["stem and classifier"] += own - parts["mixing"]
        elif name.startswith(f"{root}.layer"):
            parts["block convolutions"] += own
        else:
            parts["stem and classifier"] += own
    total = counter.get_total_flops()
    assert total == sum(parts.values()), (arch, total, parts)   # every FLOP in exactly one part
    return {"total": total, **parts}


def flops(args) -> dict:
    rows = []
    for arch, dataset, k in FLOP_MODELS:
        base = flop_parts(arch, dataset, None, None)
        learned = flop_parts(arch, dataset, "learned", k)
        adds = {p: (learned[p] - base[p]) / base["total"] for p in base if p != "total"}
        rows.append({"arch": arch, "dataset": dataset, "fan_in": k, "baseline": base, "learned": learned,
                     "ratio": learned["total"] / base["total"], "ratio_added_by": adds})
    return {"part": "flops", "rows": rows}


def markdown(rec: dict) -> str:
    lines = [f"# bench costparts: {rec['part']}", "", f"Command: `{rec['command']}`; {rec['machine']}; torch {rec['torch']}.", ""]
    if rec["part"] == "ops":
        lines += [f"One training step, batch {rec['batch']}, on {rec['path']}; non-view aten ops (each at least one "
                  "kernel launch on a GPU).", "",
                  "| model | K | own wiring | Learned | ratio | the Learned step's extra ops, most frequent |",
                  "|:---|---:|---:|---:|---:|:---|"]
        for r in rec["rows"]:
            extra = ", ".join(f"{k} {v}" for k, v in r["extra_by_op"].items())
            lines.append(f"| {r['arch']} | {r['fan_in']} | {r['baseline_ops']} | {r['learned_ops']} | {r['ratio']:.2f}x | {extra} |")
    else:
        parts = ("stem and classifier", "block convolutions", "projection shortcuts", "mixing")
        lines += ["Forward GFLOPs per image (eval mode, frozen top-K masks; torch.utils.flop_counter, 2 x MACs), the "
                  "model's own wiring against Learned at the paper's K, and what each part adds to the ratio.", "",
                  "| model | K | own wiring | Learned | ratio | " + " | ".join(f"+{p}" for p in parts) + " |",
                  "|:---|---:|---:|---:|---:|" + "---:|" * len(parts)]
        for r in rec["rows"]:
            adds = " | ".join(f"{r['ratio_added_by'][p]:+.3f}" for p in parts)
            lines.append(f"| {r['arch']} ({r['dataset']}) | {r['fan_in']} | {r['baseline']['total'] / 1e9:.3f} | "
                         f"{r['learned']['total'] / 1e9:.3f} | {r['ratio']:.2f}x | {adds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench costparts", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["ops", "flops", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="ops: the two small ResNeXts only")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the records (default {RESULTS})")
    p.add_argument("--tag", default=time.strftime("%Y%m%d"), help="file-name tag (default: today)")
    args = p.parse_args(argv)
    from maskconnect.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    for part in (("ops", "flops") if args.part == "all" else (args.part,)):
        rec = ops(args) if part == "ops" else flops(args)
        rec.update(command="PYTHONPATH=src python -m bench costparts " + " ".join(sys.argv[1:] if argv is None else argv),
                   machine=f"{platform.machine()}, device-independent counts", torch=torch.__version__)
        base = args.out / f"costparts-{part}-{args.tag}"
        atomic_write_json(base.with_suffix(".json"), rec)
        atomic_write_text(base.with_suffix(".md"), markdown(rec))
        print(markdown(rec))
    return 0
