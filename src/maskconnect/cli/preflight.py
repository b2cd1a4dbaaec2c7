"""``maskconnect preflight``: the command line of :mod:`maskconnect.preflight`."""

from __future__ import annotations

import argparse


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "preflight", help="prove the device path on this machine before a grid trains (checks, memory, cost)",
        description="Run, for the grid's models, what its training jobs will run on this device, against "
                    "references that do not share the code under test: the training step on the device's "
                    "default path against plain autograd (outputs, every gradient, BN statistics; fp32 and bf16 + "
                    "channels_last), both 1x1 backward kernels, compiled against eager (if the grid compiles), the "
                    "data path against torchvision's transforms, DDP over every visible GPU, the memory of a training "
                    "step at the grid's batch, and the measured step times with the projected hours of every run. "
                    "On a CPU it also runs what CUDA runs. Writes <out>/preflight.json and preflight.md; exits 0 if "
                    "every check passed, 1 if any failed (each named, with what to do), 2 for bad arguments.")
    p.add_argument("--grid", default="demo", help="a packaged grid (demo, smoke, cifar100, cifar10, imagenet, paper) or a "
                                                 "grid file; default demo")
    p.add_argument("--device", default="grid", help="grid (default: the device the grid's runs ask for), auto, cpu, "
                                                   "cuda or cuda:N")
    p.add_argument("--out", default=None, help="folder for preflight.json and preflight.md (default results/preflight/<grid>)")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="check torch.compile against eager (default: when the grid compiles)")
    p.add_argument("--ddp", default=True, action=argparse.BooleanOptionalAction,
                   help="with more than one GPU visible, check DDP over them (default on)")
    p.add_argument("--time-steps", type=_positive, default=20, dest="time_steps",
                   help="timed training steps per model and phase for the cost projection (default 20, after 2 warm-up "
                        "steps; fewer make a quicker, less certain projection)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from ..preflight.runner import run_preflight

    _, code = run_preflight(args.grid, args.device, args.out, compile=args.compile, ddp=args.ddp,
                            time_steps=args.time_steps)
    return code
