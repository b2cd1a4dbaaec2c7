"""Mask-rule measurements (docs/mask_rules.md; docs/design.md section 8): which update rule really learns connectivity.

Two parts, each for every rule in ``maskconnect.mask_rules.MASK_RULES``:

* ``planted``: connectivity where the right answer is known. In every module that a mask reads
  (modules 1 .. L-1), a fixed, seeded subset of the branches is made useless: its output is replaced
  by something that carries no information about the image, so reading it can only hurt. Four
  constructions, so that no rule is tuned to one of them:

  - ``shuffle``: the branch's own output, permuted across the batch (same statistics, wrong image);
  - ``noise``: Gaussian noise with the branch output's per-channel mean and std (detached);
  - ``decoy-noise`` / ``decoy-shuffle``: the same, but with the statistics (or the permuted outputs)
    of the module's *clean* branches. Under the first two the network can make a useless branch
    nearly harmless by shrinking it (measured: the useless branches' RMS falls to about 0.55 of the
    clean ones'); a decoy keeps the clean branches' scale, so only the masks can avoid it.

  The last module feeds the output node (every branch is read), so it is left clean. For each rule
  and seed we record the fraction of frozen mask ones that land on clean sources (chance = the clean
  fraction), over all rows and over the *live* rows: a row belongs to a branch of the next module,
  and if that branch is itself useless its output is replaced, nothing depends on its input, and the
  row gets no learning signal at all (3 of every 8 rows of modules 1 .. L-2 here). Also: test top-1 of
  Learned and of Fixed-Random at the same K (same seeds, same planted branches), Welch's t-test
  between them (scipy), and the saturation statistics at freezing.

* ``schedule``: digits {20,4,8}, learned, through the suite's own ``train()``: the reported digits run
  (mask LR 1.0, 30 epochs, freezing at 15) and the paper-length equivalent. The paper's CIFAR joint
  phase is 150 epochs x 391 steps = 58,650 mask steps at LR 0.1, a summed mask LR of 5,865. The
  common-mode drift that saturates ``clip`` grows with the summed LR (steps x LR x mean gradient),
  so the digits run with 15 x 23 = 345 joint steps reaches the paper's summed LR at mask LR 17.
  (Its per-step noise is larger than the paper's, which makes this a harder test, not an easier one.)
  We record the per-epoch mask statistics and the collapse criteria of the issue: rows tied at the
  K-th place (more than K entries at 1.0 included), mean row entropy against 0.97 ln C, rows decided
  by ties at freezing.

Everything runs on the CPU, one thread per run, runs in parallel processes (``--jobs``).

    PYTHONPATH=src python -m bench masks                      # both parts (about an hour on 2 cores)
    PYTHONPATH=src python -m bench masks --part planted --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CONSTRUCTIONS = ("shuffle", "noise", "decoy-noise", "decoy-shuffle")
RESULTS = Path(__file__).resolve().parent / "results"
PAPER_SUMMED_MASK_LR = 150 * math.ceil(50000 / 128) * 0.1  # CIFAR joint phase at the paper's LR


def paper_equivalent_mask_lr(joint_steps: int) -> float:
    """The mask LR that gives ``joint_steps`` the paper's summed mask LR (150 epochs x 391 steps x 0.1)."""
    return round(PAPER_SUMMED_MASK_LR / joint_steps, 2)


@dataclass(frozen=True)
class PlantedRun:
    construction: str
    connectivity: str   # learned | random
    rule: str           # the mask rule (learned), "-" for random
    seed: int
    fan_in: int = 2
    noisy: int = 3      # useless branches per module (of C = 8): chance of a clean source 5/8
    epochs: int = 30
    mask_lr: float | None = None  # None: the paper's summed mask LR over this run's joint phase
    settle: int = 0     # epochs at LR/10 after the first drop before the masks are frozen (the demo's 1)
    stage_width: int = 16
    batch: int = 64


def planted_sources(num_masks: int, cardinality: int, noisy: int, seed: int):
    """(num_masks, C) bool: True for the useless branches of modules 1 .. L-1 (seeded, per module)."""
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    keys = torch.rand(num_masks, cardinality, generator=g)
    idx = keys.argsort(-1)[:, :noisy]
    return torch.zeros(num_masks, cardinality, dtype=torch.bool).scatter_(-1, idx, True)


def live_rows(useless):
    """(num_masks, C) bool: the mask rows whose branch's output is used.

    Mask i, row j is the input of branch j of module i+1. If that branch is itself useless, its output
    is replaced, nothing downstream depends on its input, and its row gets no learning signal: its
    wiring is arbitrary under any rule. The last module (row L-2) is never planted, so all its rows are live.
    """
    import torch

    return torch.cat([~useless[1:], torch.ones(1, useless.shape[1], dtype=torch.bool)])


def clean_share(masks, useless, live_only: bool = False) -> float:
    """Fraction of the ones of binary ``masks`` (num_masks, C rows, C sources) on clean sources
    (``useless[i]``: the useless sources of mask i), over all rows or only the live ones."""
    clean = (~useless).unsqueeze(1).expand_as(masks)
    if live_only:
        keep = live_rows(useless)
        masks, clean = masks[keep], clean[keep]
    return float((masks * clean).sum() / masks.sum())


def _plant(model, useless, construction: str) -> None:
    """Forward hooks that make the planted branches' outputs useless (in training and evaluation)."""
    import torch

    blocks = model.blocks()
    calls = [0]
    # evaluation-time RMS of each module's own (pre-replacement) outputs, useless vs clean branches:
    # a construction the network can escape by shrinking the useless branches shows a ratio near 0
    rms = {"useless": 0.0, "clean": 0.0}
    for i, block in enumerate(blocks[:-1]):
        sel = useless[i].nonzero().flatten()
        keep = (~useless[i]).nonzero().flatten()

        def hook(mod, _inp, y, sel=sel, keep=keep):
            calls[0] += 1
            if not mod.training:
                rms["useless"] += float(y[:, sel].detach().pow(2).mean().sqrt())
                rms["clean"] += float(y[:, keep].detach().pow(2).mean().sqrt())
            y = y.clone()
            part = y[:, sel]
            if construction == "shuffle":
                part = part[torch.randperm(y.shape[0], device=y.device)]
            elif construction == "noise":  # same per-channel mean and std, no information about the image
                mu = part.detach().mean(dim=(0, 3, 4), keepdim=True)
                sd = part.detach().std(dim=(0, 3, 4), keepdim=True)
                part = torch.randn_like(part) * sd + mu
            else:
                # decoys: the scale comes from the module's clean branches (detached), so the network
                # cannot make a useless branch harmless by shrinking it; only the masks can avoid it
                clean = y[:, keep].detach()
                if construction == "decoy-noise":
                    mu = clean.mean(dim=(0, 1, 3, 4), keepdim=True)
                    sd = clean.std(dim=(0, 1, 3, 4), keepdim=True)
                    part = torch.randn_like(part) * sd + mu
                else:  # decoy-shuffle: clean siblings' outputs for other images of the batch
                    src = clean[:, torch.arange(len(sel), device=y.device) % clean.shape[1]]
                    part = src[torch.randperm(y.shape[0], device=y.device)]
            y[:, sel] = part
            return y

        block.register_forward_hook(hook)
    return calls, rms


def run_planted(r: PlantedRun) -> dict:
    import torch

    from maskconnect.connectivity import freeze_masks, mask_banks, mask_stats, param_groups
    from maskconnect.data import build_data
    from maskconnect.mask_rules import mask_rule
    from maskconnect.training.step import Precision, evaluate, train_step
    from maskconnect.models import build_model
    from maskconnect.specs import make_spec

    t0 = time.perf_counter()
    spec = make_spec("20,4,8", dataset="digits", connectivity=r.connectivity, fan_in=r.fan_in, seed=r.seed,
                     stage_width=r.stage_width, num_classes=10)
    torch.manual_seed(r.seed)
    model = build_model(spec)
    bank = mask_banks(model)[0]
    useless = planted_sources(bank.num_masks, spec.cardinality, r.noisy, r.seed)
    # the planted branches are made useless by forward hooks on the blocks: the plain (not the
    # memory-saving) training path calls them; _plant counts calls so a path that skips them fails loudly
    model.save_memory = False
    calls, rms = _plant(model, useless, r.construction)
    data = build_data("digits", batch_size=r.batch, eval_batch_size=512, device=torch.device("cpu"), seed=r.seed)
    precision = Precision.for_device("cpu")
    rule = mask_rule(r.rule if r.connectivity == "learned" else "clip")
    mask_lr = r.mask_lr or paper_equivalent_mask_lr(r.epochs // 2 * data.steps_per_epoch())
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=5e-4, mask_lr=mask_lr), lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    for g in opt.param_groups:
        if g["name"] == "masks":
            g["momentum"] = 0.0
    freeze_at, drops = r.epochs // 2 + r.settle, [r.epochs // 2, (3 * r.epochs) // 4]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=drops, gamma=0.1)
    rule.after_step(mask_banks(model))
    at_freeze, ties = None, 0
    for epoch in range(r.epochs):
        if r.connectivity == "learned" and epoch == freeze_at:
            at_freeze = mask_stats(bank.real, bank.fan_in)
            ties = freeze_masks(model, seed=r.seed)
        banks = [b for b in mask_banks(model) if not b.frozen]
        model.train()
        for x, y in data.train_batches(epoch):
            train_step(model, opt, x, y, precision, banks=banks, rule=rule)
        sched.step()
    steps = r.epochs * data.steps_per_epoch()
    if calls[0] < steps * (len(model.blocks()) - 1):
        raise RuntimeError("planted branches were not applied in training (hooks not called): the model's "
                           "training path bypasses MaskedBlock.forward")
    ev = evaluate(model, data.test_batches(), precision, 10)
    masks = bank.fixed
    on_clean = clean_share(masks, useless)
    on_clean_live = clean_share(masks, useless, live_only=True)
    return {**r.__dict__, "mask_lr": mask_lr, "mask_lr_given": r.mask_lr is not None, "top1": ev["test_top1"], "on_clean": on_clean, "on_clean_live": on_clean_live, "clean_fraction": 1 - r.noisy / spec.cardinality,
            "ties_at_freeze": ties, "stats_at_freeze": at_freeze,
            "useless_rms_ratio": rms["useless"] / rms["clean"] if rms["clean"] else None, "seconds": round(time.perf_counter() - t0, 1)}


@dataclass(frozen=True)
class ScheduleRun:
    rule: str
    mask_lr: float
    label: str
    seed: int = 0
    fan_in: int = 2
    epochs: int = 30


def run_schedule(r: ScheduleRun) -> dict:
    from maskconnect.training import TrainConfig, train
    from maskconnect.training.schedule import default_freeze_epoch, recipe_milestones

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # the demo recipe's LR schedule, with the masks frozen at the first LR drop (the paper's rule,
        # as these records were measured; the demo itself freezes one epoch later)
        cfg = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=r.fan_in, seed=r.seed,
                          recipe="demo", epochs=r.epochs, mask_lr=r.mask_lr, mask_rule=r.rule, out=f"{tmp}/run",
                          freeze_epoch=default_freeze_epoch(recipe_milestones("demo", r.epochs), r.epochs),
                          device="cpu", track=False, progress="none")
        metrics = train(cfg)
        import csv

        with open(f"{tmp}/run/history.csv") as f:
            history = list(csv.DictReader(f))
    keep = ("epoch", "phase", "test_top1", "mask_entropy", "mask_changed", "mask_mean", "mask_at_0", "mask_at_1",
            "mask_margin", "mask_ties")
    history = [{k: (float(h[k]) if k != "phase" else h[k]) for k in keep} for h in history]
    joint = [h for h in history if h["phase"] == "joint"]
    last = joint[-1]
    return {**r.__dict__, "summed_mask_lr": r.mask_lr * len(joint) * 23, "top1": metrics["top1"],
            "rows": metrics["mask_rows"], "tied_at_freeze": metrics["mask_tied_rows"],
            "end_of_joint": last, "history": history, "seconds": round(time.perf_counter() - t0, 1)}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _pool(fn, jobs: list, workers: int) -> list:
    """Runs in worker processes of one thread each (the calling process's thread count is left alone)."""
    with ProcessPoolExecutor(max(1, workers), initializer=_one_thread) as ex:
        return list(ex.map(fn, jobs))


def planted(args) -> dict:
    from scipy import stats

    from maskconnect.mask_rules import MASK_RULES

    seeds = range(args.seeds)
    epochs = 4 if args.quick else args.planted_epochs
    rules = args.rules or list(MASK_RULES)
    kw = dict(epochs=epochs, mask_lr=args.planted_mask_lr, settle=args.planted_settle, noisy=args.noisy,
              fan_in=args.fan_in)
    runs = [PlantedRun(c, "learned", rule, s, **kw) for c in args.constructions for rule in rules for s in seeds]
    runs += [PlantedRun(c, "random", "-", s, **kw) for c in args.constructions for s in seeds]
    res = _pool(run_planted, runs, args.jobs)
    summary = []
    for c in args.constructions:
        rnd = [x["top1"] for x in res if x["construction"] == c and x["connectivity"] == "random"]
        rnd_clean = [x["on_clean"] for x in res if x["construction"] == c and x["connectivity"] == "random"]
        rnd_live = [x["on_clean_live"] for x in res if x["construction"] == c and x["connectivity"] == "random"]
        for rule in rules:
            xs = [x for x in res if x["construction"] == c and x["rule"] == rule]
            top = [x["top1"] for x in xs]
            t = stats.ttest_ind(top, rnd, equal_var=False) if len(top) > 1 else None
            summary.append({
                "construction": c, "rule": rule, "seeds": len(xs),
                "on_clean_mean": _mean([x["on_clean"] for x in xs]), "random_on_clean_mean": _mean(rnd_clean),
                "on_clean_live_mean": _mean([x["on_clean_live"] for x in xs]), "random_on_clean_live_mean": _mean(rnd_live),
                "on_clean_live_at_least_90pct": _mean([x["on_clean_live"] for x in xs]) >= 0.9,
                "useless_rms_ratio_mean": _mean([x["useless_rms_ratio"] for x in xs]),
                "chance": xs[0]["clean_fraction"], "learned_top1_mean": _mean(top), "random_top1_mean": _mean(rnd),
                "welch_t": None if t is None else float(t.statistic), "welch_p_two_sided": None if t is None else float(t.pvalue),
                "learned_beats_random": bool(t is not None and t.statistic > 0 and t.pvalue < 0.05),
                "ties_at_freeze_total": sum(x["ties_at_freeze"] for x in xs),
                "at_1_at_freeze_mean": _mean([x["stats_at_freeze"]["mask_at_1"] for x in xs]),
                "at_0_at_freeze_mean": _mean([x["stats_at_freeze"]["mask_at_0"] for x in xs]),
                "entropy_at_freeze_mean": _mean([x["stats_at_freeze"]["mask_entropy"] for x in xs]),
            })
    return {"runs": res, "summary": summary}


def schedule(args) -> dict:
    from maskconnect.mask_rules import MASK_RULES

    paper_lr = paper_equivalent_mask_lr(15 * 23)
    epochs = 4 if args.quick else 30
    runs = [ScheduleRun(rule, 1.0, "issue: mask LR 1.0, 30 epochs", epochs=epochs) for rule in MASK_RULES]
    if not args.quick:
        runs += [ScheduleRun(rule, paper_lr, f"paper-length: mask LR {paper_lr} (summed LR {PAPER_SUMMED_MASK_LR:.0f})")
                 for rule in MASK_RULES]
    res = _pool(run_schedule, runs, args.jobs)
    ln_c = math.log(8)
    for x in res:
        e = x["end_of_joint"]
        x["verdict"] = {
            "collapsed_rows_fraction": e["mask_ties"] / x["rows"], "collapsed_below_5pct": e["mask_ties"] / x["rows"] < 0.05,
            "entropy_ratio": e["mask_entropy"] / ln_c, "entropy_below_0.97_lnC": e["mask_entropy"] < 0.97 * ln_c,
            "no_ties_at_freeze": x["tied_at_freeze"] == 0,
        }
    return {"runs": res}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x, d=3):
    return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))


def markdown(rec: dict) -> str:
    lines = [f"# Mask rules: {rec['tag']}", "", f"Machine: {rec['machine']}; torch {rec['torch']}; "
             f"{rec['wall_s']:.0f} s wall. Command: `{rec['command']}`.", ""]
    if "planted" in rec:
        p = rec["planted"]
        r0 = p["runs"][0]
        lines += ["## Planted connectivity", "",
                  f"digits {{20,4,8}} (stage width {r0['stage_width']}), K = {r0['fan_in']}, {r0['noisy']} of 8 branches "
                  f"useless in modules 1..L-1, {r0['epochs']} epochs (LR /10 at {r0['epochs'] // 2}, masks frozen at {r0['epochs'] // 2 + r0['settle']}), mask LR "
                  f"{r0['mask_lr']}{'' if r0.get('mask_lr_given') else f' (the paper' + chr(39) + f's summed mask LR {PAPER_SUMMED_MASK_LR:.0f} over the joint phase)'}, batch {r0['batch']}. On clean: fraction of frozen mask ones on clean sources "
                  "(chance = clean fraction), over the *live* rows (rows of branches whose output is used: a useless "
                  "branch's own row gets no learning signal, so its wiring is arbitrary under any rule) and over all rows. "
                  "Welch: Learned vs Fixed-Random top-1 (two-sided). RMS ratio: evaluation RMS of the useless branches' "
                  "own outputs over the clean ones' (the network shrinking what it cannot use).", "",
                  "| construction | rule | seeds | on clean (live rows) | on clean (all rows) | chance | random on clean (live / all) | learned top-1 | random top-1 | Welch t | p | ties at freeze | at 1.0 | at 0.0 | entropy | RMS ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in p["summary"]:
            lines.append(f"| {s['construction']} | {s['rule']} | {s['seeds']} | {_fmt(s.get('on_clean_live_mean'))} | {_fmt(s['on_clean_mean'])} | {_fmt(s['chance'], 2)} | "
                         f"{_fmt(s.get('random_on_clean_live_mean'))} / {_fmt(s['random_on_clean_mean'])} | {_fmt(s['learned_top1_mean'], 2)} | {_fmt(s['random_top1_mean'], 2)} | "
                         f"{_fmt(s['welch_t'], 2)} | {_fmt(s['welch_p_two_sided'], 4)} | {s['ties_at_freeze_total']} | "
                         f"{_fmt(s['at_1_at_freeze_mean'])} | {_fmt(s['at_0_at_freeze_mean'])} | {_fmt(s['entropy_at_freeze_mean'])} | "
                         f"{_fmt(s.get('useless_rms_ratio_mean'), 2)} |")
        lines.append("")
    if "schedule" in rec:
        lines += ["## Long schedule (digits {20,4,8}, learned K=2, seed 0, `train()`)", "",
                  "Statistics at the end of the joint phase. Collapsed: rows tied at the K-th place (more than K "
                  "entries at 1.0 included). Goal (default rule, mask LR 1.0): collapsed < 5%, entropy < 0.97 ln C, "
                  "no ties at freezing.", "",
                  "| run | rule | summed mask LR | collapsed rows | entropy / ln C | at 1.0 | at 0.0 | mean | margin | changed (last joint epoch) | ties at freeze | top-1 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for x in rec["schedule"]["runs"]:
            e, v = x["end_of_joint"], x["verdict"]
            lines.append(f"| {x['label']} | {x['rule']} | {x['summed_mask_lr']:.0f} | {v['collapsed_rows_fraction']:.1%} | "
                         f"{v['entropy_ratio']:.3f} | {e['mask_at_1']:.3f} | {e['mask_at_0']:.3f} | {e['mask_mean']:.3f} | "
                         f"{e['mask_margin']:.3f} | {e['mask_changed']:.0f} | {x['tied_at_freeze']} | {x['top1']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench masks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["planted", "schedule", "all"], default="all")
    p.add_argument("--seeds", type=int, default=4, help="planted: seeds per rule (default 4)")
    p.add_argument("--planted-epochs", type=int, default=30, dest="planted_epochs",
                   help="planted: epochs (default 30; masks frozen at half, mask LR = the paper's summed LR over the joint phase)")
    p.add_argument("--planted-mask-lr", type=float, default=None, dest="planted_mask_lr",
                   help="planted: mask LR (default: the paper's summed mask LR over the joint phase)")
    p.add_argument("--planted-settle", type=int, default=0, dest="planted_settle",
                   help="planted: epochs at LR/10 after the first drop before freezing (default 0; the demo uses 1)")
    p.add_argument("--constructions", nargs="+", default=list(CONSTRUCTIONS), choices=list(CONSTRUCTIONS),
                   help="how the useless branches are made (default: all): shuffle (own output permuted across the "
                        "batch), noise (Gaussian with its own output's statistics), decoy-noise / decoy-shuffle (the "
                        "same with the clean branches' outputs, so the network cannot shrink a useless branch away)")
    p.add_argument("--noisy", type=int, default=3, help="useless branches per planted module, of C = 8 (default 3)")
    p.add_argument("--fan-in", type=int, default=2, dest="fan_in",
                   help="planted: fan-in K of the Learned and Fixed-Random runs (default 2; at K = 1 a branch that "
                        "reads a useless source gets nothing else)")
    p.add_argument("--rules", nargs="+", default=None, metavar="RULE",
                   help="planted: the mask rules to run (default: every rule in maskconnect.mask_rules.MASK_RULES)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 epochs, no paper-length runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.planted_epochs < 2 or args.jobs < 1:
        p.error("--seeds, --jobs must be >= 1 and --planted-epochs >= 2")
    if not 1 <= args.noisy <= 6:
        p.error(f"--noisy {args.noisy}: must be in 1..6 (at least K = 2 of the C = 8 branches stay clean)")
    if not 1 <= args.fan_in <= 8 - args.noisy:
        p.error(f"--fan-in {args.fan_in}: must be in 1..{8 - args.noisy} (at most the {8 - args.noisy} clean branches "
                f"of C = 8 with --noisy {args.noisy})")
    from maskconnect.mask_rules import MASK_RULES

    bad = [r for r in args.rules or [] if r not in MASK_RULES]
    if bad:
        p.error(f"--rules {' '.join(bad)}: unknown; allowed: {', '.join(MASK_RULES)}")
    import torch

    t0 = time.perf_counter()
    tag = args.tag or ("quick" if args.quick else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    rec = {"benchmark": "masks", "tag": tag, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
           "torch": torch.__version__, "python": platform.python_version(), "command": "python -m bench masks " + " ".join(argv or sys.argv[1:])}
    if args.part in ("planted", "all"):
        rec["planted"] = planted(args)
    if args.part in ("schedule", "all"):
        rec["schedule"] = schedule(args)
    rec["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    from maskconnect.io import atomic_write_json, atomic_write_text

    path = args.out / f"masks-{args.part}-{tag}.json"
    atomic_write_json(path, rec)
    md = markdown(rec)
    atomic_write_text(path.with_suffix(".md"), md + "\n")
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
