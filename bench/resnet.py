"""The masked ResNet (docs/design.md section 12): what its connections cost, and how they combine.

Two parts:

* ``cost``: one training step of ResNet-38 (CIFAR shapes, the paper's network) as Fixed-Prev (the standard
  ResNet), Fixed-Random K and Learned K, side by side in one process: the median step time (after warm-up)
  and the bytes autograd keeps for the backward pass per image (exact: ``models.counting.saved_bytes``), on
  the vectorised path (``kernels.EarlierOutputs``, the default) and on the plain path (the model's loop
  over candidates, what autograd keeps without it). Ratios are against Fixed-Prev measured in the same
  process, so a busy machine moves numerator and denominator alike.
* ``combine``: whether a block's input is the *mean* of its K selected outputs (the default) or their
  *sum*. The paper writes a sum; with identity paths inside every output, a sum over K outputs grows the
  activations' scale with depth (each output carries its own input), so we measured both, on digits
  ResNet-38 with the demo recipe (docs/design.md section 9): Learned K=10 and K=17 (every earlier block)
  and Fixed-Random K=10, 3 seeds each, Fixed-Prev as the reference. Test top-1 after the run and the RMS of
  the last block's input at initialisation are recorded.

    PYTHONPATH=src python -m bench resnet --part cost        # a few minutes on 2 cores
    PYTHONPATH=src python -m bench resnet --part combine     # about half an hour on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _steps(model, x, y, opt, repeats: int, warmup: int) -> list[float]:
    from maskconnect.training.step import Precision, train_step

    p = Precision.for_device("cpu")
    out = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        train_step(model, opt, x, y, p)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def cost(args) -> dict:
    import torch

    from maskconnect.connectivity import param_groups
    from maskconnect.models import build_model
    from maskconnect.models.counting import saved_bytes
    from maskconnect.specs import make_spec
    from maskconnect.training.device import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    rows = []
    arch, k = args.arch, args.fan_in
    for conn, plain in (("prev", False), ("random", False), ("random", True), ("learned", False), ("learned", True)):
        spec = make_spec(arch, dataset="cifar100", connectivity=conn, fan_in=None if conn == "prev" else k)
        torch.manual_seed(0)
        model = build_model(spec).train()
        if plain:
            model.save_memory = False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 100, (args.batch,), generator=g)
        opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4), lr=0.1, momentum=0.9)
        times = _steps(model, x, y, opt, args.repeats, args.warmup)
        mem = saved_bytes(model, x[: min(8, args.batch)])
        path = "standard" if conn == "prev" else ("plain" if plain else "vectorised")
        rows.append({"connectivity": conn, "fan_in": spec.fan_in, "path": path,
                     "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
                     "repeats": len(times), "saved_bytes_per_image": mem["activations"] / min(8, args.batch)})
    base = rows[0]
    for r in rows:
        r["time_vs_prev"] = r["step_s_median"] / base["step_s_median"]
        r["memory_vs_prev"] = r["saved_bytes_per_image"] / base["saved_bytes_per_image"]
    return {"part": "cost", "arch": arch, "batch": args.batch, "threads": args.threads, "rows": rows}


@dataclass(frozen=True)
class CombineRun:
    combine: str          # mean | sum
    connectivity: str
    fan_in: int | None
    seed: int


def run_combine(r: CombineRun) -> dict:
    import torch

    from maskconnect.connectivity import freeze_masks, mask_banks
    from maskconnect.data import build_data
    from maskconnect.mask_rules import mask_rule
    from maskconnect.models import build_model
    from maskconnect.training import TrainConfig
    from maskconnect.training.schedule import build_optimizer
    from maskconnect.training.step import Precision, evaluate, train_step

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = TrainConfig(dataset="digits", arch="resnet38", connectivity=r.connectivity, fan_in=r.fan_in, seed=r.seed,
                      recipe="demo", device="cpu", track=False, out="unused").resolved()
    torch.manual_seed(cfg.seed)
    model = build_model(TrainConfig.spec(cfg, num_classes=10))
    if r.combine == "sum" and hasattr(model, "scales"):
        model.scales = [1.0] * len(model.scales)
    data = build_data("digits", batch_size=cfg.batch_size, eval_batch_size=512, device=torch.device("cpu"), seed=cfg.seed)
    # the scale of the last block's input at initialisation (one batch, eval mode: running statistics)
    captured = {}
    last = model.blocks()[-1]
    residual = last.residual

    def capture(x):
        captured.setdefault("x", x.detach())
        return residual(x)

    last.residual = capture
    model.eval()
    with torch.no_grad():
        model(next(iter(data.test_batches()))[0][:64])
    del last.residual
    rms0 = float(captured["x"].pow(2).mean().sqrt())
    opt, sched = build_optimizer(cfg, model, world=1)
    rule = mask_rule(cfg.mask_rule)
    rule.after_step(mask_banks(model))
    precision = Precision.for_device("cpu")
    for epoch in range(cfg.epochs):
        if r.connectivity == "learned" and epoch == cfg.freeze_epoch:
            freeze_masks(model, seed=cfg.seed)
        banks = [b for b in mask_banks(model) if not b.frozen]
        model.train()
        for x, y in data.train_batches(epoch):
            train_step(model, opt, x, y, precision, banks=banks, rule=rule)
        sched.step()
    ev = evaluate(model, data.test_batches(), precision, 10)
    return {**asdict(r), "top1": ev["test_top1"], "test_loss": ev["test_loss"], "input_rms_at_init": rms0,
            "epochs": cfg.epochs, "seconds": round(time.perf_counter() - t0, 1)}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def combine(args) -> dict:
    from scipy import stats

    seeds = range(args.seeds)
    jobs = [CombineRun("mean", "prev", None, s) for s in seeds]
    for mode in ("mean", "sum"):
        jobs += [CombineRun(mode, conn, k, s) for conn, k in (("learned", 10), ("learned", 17), ("random", 10))
                 for s in seeds]
    with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as ex:
        runs = list(ex.map(run_combine, jobs))
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["connectivity"], r["fan_in"], r["combine"]), []).append(r)
    summary = []
    for (conn, k, mode), rs in groups.items():
        top = [r["top1"] for r in rs]
        row = {"connectivity": conn, "fan_in": k, "combine": mode, "n": len(top), "top1_mean": statistics.mean(top),
               "top1_std": statistics.stdev(top) if len(top) > 1 else None,
               "input_rms_at_init": statistics.mean(r["input_rms_at_init"] for r in rs)}
        other = groups.get((conn, k, "sum" if mode == "mean" else "mean"))
        if mode == "mean" and other and len(top) > 1:
            t = stats.ttest_ind(top, [r["top1"] for r in other], equal_var=False)
            row["mean_minus_sum"] = statistics.mean(top) - statistics.mean(r["top1"] for r in other)
            row["welch_p"] = float(t.pvalue)
        summary.append(row)
    return {"part": "combine", "recipe": "demo", "dataset": "digits", "arch": "resnet38", "summary": summary, "runs": runs}


def markdown(rec: dict) -> str:
    lines = [f"# bench resnet --part {rec['part']}", "", f"Command: `{rec['command']}`; {rec['machine']}; torch {rec['torch']}.", ""]
    if rec["part"] == "cost":
        lines += [f"{rec['arch']}, CIFAR shapes, batch {rec['batch']}, {rec['threads']} thread(s); ratios against Fixed-Prev "
                  "in the same process.", "",
                  "| connectivity | K | path | step (ms, median [min, max]) | vs Fixed-Prev | saved bytes / image | vs Fixed-Prev |",
                  "|:---|---:|:---|---:|---:|---:|---:|"]
        for r in rec["rows"]:
            lines.append(f"| {r['connectivity']} | {r['fan_in']} | {r['path']} | {r['step_s_median'] * 1e3:.1f} "
                         f"[{r['step_s_min'] * 1e3:.1f}, {r['step_s_max'] * 1e3:.1f}] | {r['time_vs_prev']:.2f}x | "
                         f"{r['saved_bytes_per_image'] / 2**20:.2f} MiB | {r['memory_vs_prev']:.2f}x |")
    else:
        lines += ["digits ResNet-38, the demo recipe; test top-1 (%) over seeds; RMS of the last block's input at "
                  "initialisation (eval mode).", "",
                  "| connectivity | K | combine | n | top-1 mean | std | input RMS at init | mean - sum | Welch p |",
                  "|:---|---:|:---|---:|---:|---:|---:|---:|---:|"]
        for r in rec["summary"]:
            f = (lambda v, d=2: "-" if v is None else f"{v:.{d}f}")
            lines.append(f"| {r['connectivity']} | {r['fan_in'] or 1} | {r['combine']} | {r['n']} | {f(r['top1_mean'])} | "
                         f"{f(r['top1_std'])} | {f(r['input_rms_at_init'], 3)} | {f(r.get('mean_minus_sum'))} | "
                         f"{f(r.get('welch_p'), 3)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import sys

    import torch

    p = argparse.ArgumentParser(prog="python -m bench resnet", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["cost", "combine"], required=True)
    p.add_argument("--arch", default="resnet38", help="cost: the ResNet (default resnet38)")
    p.add_argument("--fan-in", type=int, default=10, dest="fan_in", help="cost: K of the masked models (default 10)")
    p.add_argument("--batch", type=int, default=64, help="cost: batch (default 64)")
    p.add_argument("--threads", type=int, default=1, help="cost: torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=10, help="cost: timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="cost: untimed steps first (default 2)")
    p.add_argument("--seeds", type=int, default=3, help="combine: seeds per configuration (default 3)")
    p.add_argument("--jobs", type=int, default=2, help="combine: runs in parallel, one thread each (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the records (default {RESULTS})")
    p.add_argument("--tag", default=time.strftime("%Y%m%d"), help="file-name tag (default: today)")
    args = p.parse_args(argv)
    rec = cost(args) if args.part == "cost" else combine(args)
    rec.update(command="PYTHONPATH=src python -m bench resnet " + " ".join(sys.argv[1:] if argv is None else argv),
               machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)",
               torch=torch.__version__)
    from maskconnect.io import atomic_write_json, atomic_write_text

    base = args.out / f"resnet-{args.part}-cpu-{args.tag}"
    atomic_write_json(base.with_suffix(".json"), rec)
    atomic_write_text(base.with_suffix(".md"), markdown(rec))
    print(markdown(rec))
    return 0
