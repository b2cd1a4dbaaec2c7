"""``python -m bench <benchmark> [options]`` (also ``maskconnect bench ...``)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from . import BENCHMARKS
from .common import RESULTS_DIR

MODULES = {"throughput": "throughput", "naive": "naive", "mixing": "mixing", "torchvision": "tv_compare", "inference": "inference",
           "datapath": "datapath", "projection": "projection", "cuda-check": "cuda_check",
           "memory": "memory", "demo-width": "demo_width"}

HELP = {
    "throughput": "training-step images/s and peak memory: CIFAR configs x {full, random K=4, learned K=4}, "
                  "ImageNet {50,4,32} full vs learned K=16",
    "naive": "vectorised masked model vs a naive per-branch Python loop (forward + backward)",
    "mixing": "one module's tail (shared BN, identity share, mask mixing, ReLU): matmul vs bmm vs compiled "
              "bmm vs compiled fused, against ResNeXt's BN + add + ReLU",
    "torchvision": "our Fixed-Full ResNeXt-50 vs torchvision resnext50_32x4d (training step)",
    "inference": "pruned learned K=1 vs unpruned vs Fixed-Full (eval forward)",
    "datapath": "CIFAR epoch with the device-resident loader vs the training steps alone",
    "projection": "GPU-hours per grid at the paper recipe, achieved fraction of peak FLOP/s",
    "memory": "bytes kept for the backward pass per training image (exact: autograd's saved tensors), the "
              "memory-saving and plain masked paths, CIFAR configs and ImageNet {50,4,32} x {full, random K, learned K}; "
              "peak allocated memory of a training step on CUDA",
    "cuda-check": "bf16 autocast + channels_last (+ compile) vs fp32 reference outputs and gradients (CUDA)",
    "demo-width": "the demo network's training step at stage width 64 (the paper's {20,4,8}) and 32 (the demo "
                  "grid's): digits, batch 64, Fixed-Full and Learned K=1, 2, 4 (not part of 'all')",
    "all": "every benchmark above (and cuda-check on CUDA), one tag",
    "summary": "Markdown tables (goals, headline numbers) of the newest records in --out, for the README",
}


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N; default auto")
    common.add_argument("--quick", action="store_true",
                        help="CPU smoke run: small configs, tiny batches, few steps (all of them in about a minute)")
    common.add_argument("--steps", type=_positive, default=None, help="timed repeats per workload (default: per benchmark)")
    common.add_argument("--warmup", type=_nonneg, default=None, help="warm-up calls per workload (at least 1 is always run)")
    common.add_argument("--batch", type=_positive, default=None, help="CIFAR batch (default 128; 8 with --quick)")
    common.add_argument("--imagenet-batch", type=_positive, default=None, dest="imagenet_batch",
                        help="ImageNet batch (default: the largest that fits on CUDA; 2 with --quick)")
    common.add_argument("--epoch-images", type=_positive, default=None, dest="epoch_images",
                        help="datapath: images per timed epoch (default 50000, the CIFAR training set; "
                             "8 batches with --quick); a shorter epoch keeps the loader/step ratio")
    common.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"folder for the JSON records (default {RESULTS_DIR})")
    common.add_argument("--tag", default="", help="file-name tag of the records (default: UTC timestamp)")
    common.add_argument("--compile", action="store_true", help="torch.compile the models being timed")
    common.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--data-dir", default=None, dest="data_dir",
                        help="folder with CIFAR-10 for datapath (default: random images of CIFAR's shape)")
    common.add_argument("--peak-tflops", type=float, default=None, dest="peak_tflops",
                        help="the device's peak TFLOP/s, if the built-in table does not know it")
    common.add_argument("--allow-cpu", action="store_true", dest="allow_cpu",
                        help="cuda-check: run on the CPU with bf16 autocast (tests the check itself)")
    parser = argparse.ArgumentParser(prog=prog, description="maskconnect benchmarks: speed, memory and cost of the models. Each "
                                     "writes a JSON record under --out and prints a table.")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    sub.required = True
    for name in (*BENCHMARKS, "cuda-check", "demo-width", "all", "summary"):
        sub.add_parser(name, parents=[common], help=HELP[name], description=HELP[name])
    # its own options (bench/masks.py); main() hands its arguments over before parsing
    sub.add_parser("costparts", add_help=False, help="where a learned model's extra cost goes: kernel launches of a "
                   "training step on CUDA's path, and FLOPs by part (device-independent); 'costparts --help'")
    sub.add_parser("resnet", add_help=False, help="the masked ResNet: step time and saved memory against the standard "
                   "ResNet (--part cost), mean or sum of the selected outputs on digits (--part combine); 'resnet --help'")
    sub.add_parser("masks", add_help=False, help="the mask update rules (docs/mask_rules.md): planted connectivity and the long "
                   "schedule, CPU, not part of 'all' (about an hour on 2 cores); 'masks --help' for its options")
    return parser


def _context(args):
    import torch

    from maskconnect.training.device import resolve_device

    from .common import make_context

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":
        from maskconnect.training.device import tune_cpu_allocator

        tune_cpu_allocator()  # as training does (maskconnect/engine.py)
    return make_context(device, quick=args.quick, steps=args.steps, warmup=args.warmup, batch=args.batch,
                        out=args.out, compile=args.compile, tag=args.tag, data_dir=args.data_dir,
                        peak_tflops=args.peak_tflops, imagenet_batch=args.imagenet_batch,
                        epoch_images=args.epoch_images)


def _run_one(name: str, ctx, args):
    mod = importlib.import_module(f"bench.{MODULES[name]}")
    t0 = time.perf_counter()
    path = mod.run(ctx, allow_cpu=args.allow_cpu) if name == "cuda-check" else mod.run(ctx)
    print(f"[{name}: {time.perf_counter() - t0:.1f}s]")
    return path


def _summary(paths: list[Path]) -> None:
    import json

    print("\n== goals (all benchmarks)")
    for p in paths:
        rec = json.loads(Path(p).read_text())
        for g in rec.get("goals", []):
            status = {True: "met", False: "NOT met", None: "not decided"}[g["met"]]
            if g["met"] is not None and g.get("caveat"):
                status += f" (on {g['decided_on'].upper()} only)"
            value = "-" if g["value"] is None else f"{g['value']:.3g}"
            print(f"  {g['id']:<36} {g['target']:<7} measured {value:<8} {status}")


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    from maskconnect.errors import MaskConnectError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["masks"]:
        from .masks import main as masks_main

        return masks_main(argv[1:])
    if argv[:1] == ["costparts"]:
        from .costparts import main as costparts_main

        return costparts_main(argv[1:])
    if argv[:1] == ["resnet"]:
        from .resnet import main as resnet_main

        return resnet_main(argv[1:])
    args = build_parser(prog).parse_args(argv)
    if args.benchmark == "summary":  # reads records only: no torch device needed
        from .summary import run

        run(args.out)
        return 0
    try:
        ctx = _context(args)
        print(f"device: {ctx.env['device_name']} ({ctx.env['device_kind']}), torch {ctx.env['torch_version']}, "
              f"{ctx.dtype_name()}{', channels_last' if ctx.precision.channels_last else ''}"
              f"{', quick' if ctx.quick else ''}, tag {ctx.tag}")
        if args.benchmark != "all":
            _run_one(args.benchmark, ctx, args)
            return 0
        paths = [_run_one(name, ctx, args) for name in BENCHMARKS]
        if ctx.cuda:
            paths.append(_run_one("cuda-check", ctx, args))
        _summary([p for p in paths if p is not None])
        return 0
    except MaskConnectError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
