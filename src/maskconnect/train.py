"""Training runs: config and recipes, the epoch loop with the MaskConnect schedule, resumable
checkpoints, run-directory files, optional MLflow tracking.

A run directory (see docs/run_format.md) holds config.json, history.csv, checkpoint.pt and, once the
run is complete, metrics.json, masks.json and pruned.pt. Re-running the same command resumes from
the last checkpoint; on CPU the resumed run ends bit-identical to an uninterrupted one, because every
source of randomness is either a pure function of (seed, epoch) (data order and augmentation) or
saved in the checkpoint (the torch RNG that draws the masks).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import __version__
from .connectivity import (
    changed_rows, current_masks, freeze_masks, live_branches, mask_banks, mask_rule,
    mask_stats, masks_frozen, param_groups,
)
from .engine import Precision, evaluate, resolve_device, train_step, tune_cpu_allocator
from .errors import ConfigError, RunDirError, TrainingDiverged
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .models import build_model
from .specs import ModelSpec, make_spec

# --- configuration -------------------------------------------------------------------------------

from .recipes import RECIPES  # noqa: E402  (torch-free, so the CLI can list them quickly)

# Fields that do not change what a run computes: they may differ when a run is resumed.
NON_IDENTITY = {"out", "data_dir", "device", "workers", "experiment", "tracking_uri", "track", "compile", "progress"}


@dataclass
class TrainConfig:
    dataset: str
    arch: str
    connectivity: str = "full"
    fan_in: int | None = None
    seed: int = 0
    out: str = "results/runs/manual"
    recipe: str = "demo"
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    lr_reference_batch: int | None = None   # lr is for this global batch; scaled linearly otherwise
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool = False
    milestones: list[int] | None = None
    gamma: float = 0.1
    label_smoothing: float = 0.0
    mask_lr: float | None = None            # default: the weight LR and its schedule
    mask_momentum: float = 0.0
    mask_init: float = 0.5
    mask_rule: str | None = None            # how the real-valued masks are updated (connectivity.MASK_RULES); default: the recipe's
    freeze_epoch: int | None = None         # default: the first LR drop
    stage_width: int | None = None
    augment: bool = True
    amp: bool | None = None                 # bf16 autocast; None: the device's default (CUDA on, CPU off)
    channels_last: bool | None = None       # channels_last tensors; None: the device's default (CUDA on, CPU off)
    compile: bool = False
    data_dir: str | None = None
    device: str = "auto"
    workers: int = 4
    synthetic: dict = field(default_factory=dict)
    experiment: str | None = None
    tracking_uri: str | None = None
    track: bool = True
    progress: str = "auto"                  # auto (bar on a terminal), bar, lines, none

    def resolved(self) -> "TrainConfig":
        """Fill recipe defaults and check every field; returns a new config."""
        if self.recipe not in RECIPES:
            raise ConfigError("recipe", self.recipe, f"one of {', '.join(RECIPES)}")
        r = RECIPES[self.recipe]
        c = TrainConfig(**asdict(self))
        for name in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "mask_rule"):
            if getattr(c, name) is None:
                setattr(c, name, r[name])
        if c.lr_reference_batch is None:
            c.lr_reference_batch = c.batch_size if self.batch_size is None or self.lr is not None else r["batch_size"]
        if c.eval_batch_size is None:
            c.eval_batch_size = max(c.batch_size, 256)
        _positive("epochs", c.epochs)
        _positive("batch_size", c.batch_size)
        _positive("eval_batch_size", c.eval_batch_size)
        _positive("lr_reference_batch", c.lr_reference_batch)
        if not (isinstance(c.lr, (int, float)) and c.lr > 0 and math.isfinite(c.lr)):
            raise ConfigError("lr", c.lr, "a positive finite number")
        if c.mask_lr is not None and not (c.mask_lr > 0):
            raise ConfigError("mask_lr", c.mask_lr, "a positive number (or omitted: the weight LR)")
        if c.milestones is None:
            drops = {max(1, round(f * c.epochs)) for f in r["milestone_fracs"]}
            c.milestones = sorted(m for m in drops if m < c.epochs)
        if not isinstance(c.milestones, list) or not all(isinstance(m, int) and not isinstance(m, bool) for m in c.milestones):
            raise ConfigError("milestones", c.milestones, "a list of epochs, e.g. [150, 225]")
        c.milestones = sorted(c.milestones)
        if any(not 0 < m < c.epochs for m in c.milestones):
            raise ConfigError("milestones", c.milestones, f"epochs strictly between 0 and epochs={c.epochs}")
        for name, lo, hi, allowed in (
            ("momentum", 0.0, None, "a number >= 0"), ("weight_decay", 0.0, None, "a number >= 0"),
            ("mask_momentum", 0.0, None, "a number >= 0"), ("gamma", 0.0, None, "a number > 0 (LR factor at each milestone)"),
            ("label_smoothing", 0.0, 1.0, "a number in [0, 1)"),
        ):
            v = getattr(c, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo and (hi is None or v < hi)
            if not ok or (name == "gamma" and v == 0):
                raise ConfigError(name, v, allowed)
        if c.nesterov and c.momentum <= 0:
            raise ConfigError("nesterov", c.nesterov, "false unless momentum > 0")
        if not isinstance(c.workers, int) or c.workers < 0:
            raise ConfigError("workers", c.workers, "an integer >= 0")
        if not isinstance(c.synthetic, dict):
            raise ConfigError("synthetic", c.synthetic, 'a JSON object, e.g. {"train_size": 512, "image_size": 32}')
        for flag in ("nesterov", "augment", "compile", "track"):
            if not isinstance(getattr(c, flag), bool):
                raise ConfigError(flag, getattr(c, flag), "true or false")
        for flag in ("amp", "channels_last"):
            if getattr(c, flag) is not None and not isinstance(getattr(c, flag), bool):
                raise ConfigError(flag, getattr(c, flag), "true, false or null (the device's default)")
        if not isinstance(c.mask_init, (int, float)) or isinstance(c.mask_init, bool):
            raise ConfigError("mask_init", c.mask_init, "a number in (0, 1]")
        mask_rule(c.mask_rule)  # raises ConfigError naming the allowed rules
        spec = self.spec(c)  # validates dataset/arch/connectivity/fan_in
        c.fan_in = spec.fan_in
        if c.freeze_epoch is None:
            c.freeze_epoch = c.milestones[0] if c.milestones else c.epochs
        if not (isinstance(c.freeze_epoch, int) and 0 <= c.freeze_epoch <= c.epochs):
            raise ConfigError("freeze_epoch", c.freeze_epoch, f"an epoch in 0..epochs={c.epochs} (masks are learned before it)")
        if c.progress not in ("auto", "bar", "lines", "none"):
            raise ConfigError("progress", c.progress, "auto, bar, lines or none")
        if c.experiment is None:
            c.experiment = f"maskconnect/{c.dataset}"
        return c

    @staticmethod
    def spec(c: "TrainConfig", num_classes: int | None = None) -> ModelSpec:
        syn = c.synthetic or {}
        return make_spec(
            c.arch, connectivity=c.connectivity, fan_in=c.fan_in, dataset=c.dataset, seed=c.seed,
            stage_width=c.stage_width, mask_init=c.mask_init, num_classes=num_classes or syn.get("num_classes"),
            in_channels=syn.get("in_channels"), image_size=syn.get("image_size"),
        )

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in NON_IDENTITY}


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(name, v, "a positive integer")


HISTORY_COLUMNS = ["epoch", "phase", "lr", "mask_lr", "train_loss", "train_top1", "test_loss", "test_top1",
                   "test_top5", "mask_entropy", "mask_changed", "mask_mean", "mask_at_0", "mask_at_1", "mask_margin",
                   "mask_ties", "epoch_time_s"]


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _git_commit() -> str | None:
    from .tracking import git_commit  # no mlflow import at module level there

    return git_commit(Path(__file__).resolve().parent)


def versions() -> dict:
    import torchvision

    return {"maskconnect": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def prepare_run_dir(cfg: TrainConfig, replace: bool = False) -> str:
    """Check the output directory. Returns "new", "resume" or "complete".

    A directory holding a different run's config is never overwritten: it is an error, or with
    ``replace`` it is moved aside (renamed with a timestamp suffix), not deleted.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    cfg_path = out / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{cfg_path} is unreadable ({e}); move the directory away or pass --replace") from None
        new = cfg.identity()
        diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
        if diff:
            if not replace:
                detail = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in list(diff.items())[:4])
                raise RunDirError(f"output directory {out} holds a different run ({detail}); "
                                  "choose another --out, or pass --replace to move the old run aside")
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            print(f"moved the previous run in {out} to {aside}", file=sys.stderr)
            return "new"
        if (out / "metrics.json").exists():
            return "complete"
        return "resume" if (out / "checkpoint.pt").exists() else "new"
    if out.exists() and any(p.name in ("checkpoint.pt", "metrics.json") for p in out.iterdir()):
        raise RunDirError(f"output directory {out} holds run files but no config.json; move it away")
    return "new"


class _Progress:
    """A tqdm bar on a terminal; one plain line per epoch otherwise (pipelines, logs)."""

    def __init__(self, mode: str, total_epochs: int, steps: int, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.steps, self.bar = total_epochs, steps, None

    def start_epoch(self, epoch: int, start_step: int = 0):
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps, initial=start_step, desc=f"epoch {epoch}/{self.total}", leave=False, dynamic_ncols=True)

    def step(self, **post):
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix(post, refresh=False)

    def end_epoch(self, row: dict, eta_s: float):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        top5 = "" if row["test_top5"] in (None, "") else f" top5 {row['test_top5']:.2f}"
        ent = "" if row.get("mask_entropy") in (None, "") else f" H(mask) {row['mask_entropy']:.3f} changed {row['mask_changed']}"
        if row.get("mask_ties"):  # saturated rows: their top-K set is decided by ties, not by learning
            ent += f" TIED {row['mask_ties']} (at 1.0: {row['mask_at_1']:.0%})"
        line = (f"epoch {row['epoch']}/{self.total} [{row['phase']}] loss {row['train_loss']:.4f} train {row['train_top1']:.2f} "
                f"| test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2f}{top5}{ent} | lr {row['lr']:.4g} "
                f"| {row['epoch_time_s']:.1f}s, ETA {_fmt(eta_s)}")
        print(line, file=sys.stderr if self.mode == "bar" else sys.stdout, flush=True)


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(cfg: TrainConfig, *, replace: bool = False, kill_after_epoch: int | None = None) -> dict:
    """Train (or resume, or skip if complete) the run ``cfg`` describes; returns its metrics.

    ``kill_after_epoch`` exists for tests of resumption: the process exits abruptly (``os._exit``)
    right after that epoch's checkpoint, as a SIGKILL would.
    """
    cfg = cfg.resolved()
    dist = Distributed.from_env()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    if dist.world > 1:
        device = _init_distributed(dist, device)
    # rank 0 inspects (and may move aside) the run directory; every rank follows its verdict
    state = [prepare_run_dir(cfg, replace=replace) if dist.main else None]
    if dist.world > 1:
        torch.distributed.broadcast_object_list(state, src=0)
    state = state[0]
    if state == "complete":
        metrics = json.loads((out / "metrics.json").read_text())
        if dist.main:
            print(f"{out}: already complete (top-1 {metrics['top1']:.2f}); nothing to do", file=sys.stderr)
        _cleanup_distributed(dist)
        return metrics if dist.main else {}

    precision = Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last)

    from .data import build_data

    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size * dist.world,
                      eval_batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed, augment=cfg.augment,
                      workers=cfg.workers, synthetic=cfg.synthetic or None)
    data.shard(dist.rank, dist.world)
    spec = TrainConfig.spec(cfg, num_classes=data.info.num_classes)

    torch.manual_seed(cfg.seed)  # initial weights (and, later, the mask draws) come from the seed
    model = precision.prepare_model(build_model(spec))
    optimizer, scheduler = _optimizer(cfg, model, dist.world)
    rule = mask_rule(cfg.mask_rule)
    learned = spec.connectivity == "learned"

    history: list[dict] = []
    best = {"top1": -1.0, "top5": None, "epoch": 0}
    start_epoch, wall = 0, 0.0
    if state == "resume":
        history, best, start_epoch, wall = _resume(out, model, optimizer, scheduler, dist, device)
    else:
        rule.after_step(mask_banks(model))  # start inside the rule's feasible set (projected: on the hull)
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "config.json", asdict(cfg))

    def wrap(model):
        # DDP registers the parameters that need gradients when it is built: re-wrap after freezing
        # the masks (the real-valued masks stop receiving gradients then).
        if dist.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(model) if cfg.compile else model

    step_model = wrap(model)
    tracker = _start_tracker(cfg, out, spec, device) if dist.main and cfg.track else None
    progress = _Progress(cfg.progress, cfg.epochs, data.steps_per_epoch(), enabled=dist.main)
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if learned and epoch >= cfg.freeze_epoch and not masks_frozen(model):
            _freeze(model, cfg, warn=dist.main)  # the joint phase ends: masks fixed to top-K, weights fine-tuned
            step_model = wrap(model)
        phase = "fixed" if not learned else ("finetune" if masks_frozen(model) else "joint")
        before = current_masks(model) if learned else None
        banks = [b for b in mask_banks(model) if not b.frozen]  # what the rule updates
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        progress.start_epoch(epoch + 1)
        for x, y in data.train_batches(epoch):
            loss, c = train_step(step_model, optimizer, precision.prepare_input(x), y, precision,
                                 label_smoothing=cfg.label_smoothing, banks=banks, rule=rule)
            loss_sum += loss * y.shape[0]
            correct += c
            seen += y.shape[0]
            progress.step()
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        scheduler.step()
        train_loss, train_top1 = _epoch_means(loss_sum, correct, seen, dist, device)
        # the test loss too: the epoch's last step may have broken the weights after the last train loss
        ev = evaluate(model, data.test_batches(), precision, data.info.num_classes) if math.isfinite(train_loss) else None
        if ev is None or not math.isfinite(ev["test_loss"]):
            if tracker:
                tracker.finish({}, [], status="FAILED")
            _cleanup_distributed(dist)
            raise _diverged(train_loss, ev, epoch, out)
        row = {"epoch": epoch + 1, "phase": phase, "lr": lrs["weights"], "mask_lr": lrs.get("masks"),
               "train_loss": train_loss, "train_top1": train_top1, **ev, **_mask_columns(model, before),
               "epoch_time_s": time.perf_counter() - t0}
        history.append(row)
        if ev["test_top1"] > best["top1"]:
            best = {"top1": ev["test_top1"], "top5": ev["test_top5"], "epoch": epoch + 1}
        elapsed = wall + time.perf_counter() - t_run
        if dist.main:
            _write_history(out / "history.csv", history)  # before the checkpoint; resume rewrites it
            atomic_torch_save(out / "checkpoint.pt", {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(device), "history": history,
                "best": best, "wall_time_s": elapsed, "config": asdict(cfg), "world": dist.world,
            })
            if tracker:
                tracker.log_epoch(row, step=epoch + 1)
        done = epoch + 1 - start_epoch
        progress.end_epoch(row, eta_s=(time.perf_counter() - t_run) / done * (cfg.epochs - epoch - 1))
        if kill_after_epoch is not None and epoch + 1 == kill_after_epoch:
            os._exit(137)

    wall += time.perf_counter() - t_run
    if not dist.main:
        _cleanup_distributed(dist)
        return {}
    metrics = finish_run(cfg, model, spec, history, best, wall, device, out)
    if tracker:
        files = [out / n for n in ("metrics.json", "masks.json", "config.json", "history.csv") if (out / n).exists()]
        tracker.finish(metrics, files)
    _cleanup_distributed(dist)
    return metrics


def _optimizer(cfg: TrainConfig, model, world: int):
    """SGD over the weights and (learned) the real-valued masks in their own group, and the LR schedule."""
    lr = cfg.lr * cfg.batch_size * world / cfg.lr_reference_batch  # linear scaling rule (Goyal et al. 2017)
    groups = param_groups(model, lr=lr, weight_decay=cfg.weight_decay, mask_lr=cfg.mask_lr)
    for g in groups:
        if g["name"] == "masks":
            g["momentum"] = cfg.mask_momentum
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)


def _resume(out: Path, model, optimizer, scheduler, dist: Distributed, device: torch.device):
    """Load the checkpoint into model, optimiser, scheduler and the RNG; returns (history, best, epoch, wall)."""
    # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the device
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ck.get("world", 1) != dist.world:
        raise RunDirError(f"{out} was trained with {ck.get('world', 1)} processes, this run has {dist.world}: "
                          "the global batch and LR would change; resume with the same number of processes")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    _set_rng_state(ck["rng"], device)
    if dist.main:
        _write_history(out / "history.csv", ck["history"])  # a kill may have left it one epoch ahead
        print(f"{out}: resuming after epoch {ck['epoch']}/{ck['config']['epochs']}", file=sys.stderr)
    return ck["history"], ck["best"], ck["epoch"], ck["wall_time_s"]


def _epoch_means(loss_sum, correct, seen: int, dist: Distributed, device: torch.device) -> tuple[float, float]:
    """Mean training loss and top-1 (%) of the epoch, over every process."""
    if dist.world > 1:
        stats = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        torch.distributed.all_reduce(stats)
        loss_sum, correct, seen = stats[0], stats[1], int(stats[2])
    return float(loss_sum) / max(seen, 1), 100.0 * float(correct) / max(seen, 1)


def _diverged(train_loss: float, ev: dict | None, epoch: int, out: Path) -> TrainingDiverged:
    which = "training" if ev is None else "test"
    bad = train_loss if ev is None else ev["test_loss"]
    last = f"the last good checkpoint (after epoch {epoch}) is kept in {out / 'checkpoint.pt'}" if epoch else "no checkpoint was written"
    return TrainingDiverged(f"{which} loss became {bad} in epoch {epoch + 1}; {last}. Lower --lr or check the data.")


def _mask_columns(model, before) -> dict:
    """The mask columns of a history row: statistics of the real-valued masks and the rows whose
    top-K set changed this epoch (learned runs; empty otherwise)."""
    bank = next((b for b in mask_banks(model) if b.real is not None), None)
    if bank is None:
        return {}
    return {**mask_stats(bank.real, bank.fan_in), "mask_changed": changed_rows(before, current_masks(model))}


def _freeze(model, cfg: TrainConfig, warn: bool = True) -> int:
    """Freeze the learned masks (exact ties broken by a draw from the run's seed) and warn when rows
    were saturated or tied: such rows were not decided by what the masks learned."""
    bank = mask_banks(model)[0]
    stats = mask_stats(bank.real, bank.fan_in)
    ties = freeze_masks(model, seed=cfg.seed)
    rows = bank.real.shape[0] * bank.real.shape[1]
    if warn and (ties or stats["mask_at_1"] > 0.5 or stats["mask_at_0"] == 1.0):
        print(f"warning: freezing masks with mask rule {cfg.mask_rule!r}: {ties} of {rows} rows were decided by exact "
              f"ties (broken at random from seed {cfg.seed}); {stats['mask_at_1']:.0%} of entries at 1.0, "
              f"{stats['mask_at_0']:.0%} at 0.0. Saturated rows sample uniformly and learn nothing "
              f"(docs/mask_rules.md).", file=sys.stderr, flush=True)
    return ties


def finish_run(cfg: TrainConfig, model, spec: ModelSpec, history: list[dict], best: dict, wall: float,
               device: torch.device, out: Path) -> dict:
    """Freeze, save masks and the pruned model, write metrics.json (last: its presence = complete)."""
    from .describe import count_flops
    from .pruning import prune, prune_report, save_pruned

    model.eval()
    if spec.connectivity == "learned" and not masks_frozen(model):
        _freeze(model, cfg)
    report = prune_report(model)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    flops = count_flops(model, shape)
    flops_test = flops
    if spec.masked:
        bank = mask_banks(model)[0]
        masks = bank.binary.detach().cpu()
        atomic_write_json(out / "masks.json", {
            "cardinality": spec.cardinality, "fan_in": spec.fan_in, "connectivity": spec.connectivity,
            "modules": spec.num_modules, "masks": masks.int().tolist(),
            "real": None if bank.real is None else [[[round(v, 6) for v in r] for r in m] for m in bank.real.detach().cpu().tolist()],
            "live": [l.tolist() for l in live_branches(masks)],
        })
        compact = prune(model)
        flops_test = count_flops(compact, shape)
        save_pruned(out / "pruned.pt", compact)
    last = history[-1]
    metrics = {
        "status": "complete",
        "dataset": cfg.dataset, "arch": spec.arch, "depth": spec.depth, "width": spec.width,
        "cardinality": spec.cardinality, "stage_width": spec.stage_width, "connectivity": spec.connectivity,
        "fan_in": spec.fan_in, "seed": cfg.seed, "top1": last["test_top1"], "top5": last["test_top5"], "best_top1": best["top1"], "best_top5": best["top5"],
        "best_epoch": best["epoch"], "test_loss": last["test_loss"],
        "params_train": report["params_train"], "params_test": report["params_test"], "masks": report["masks"],
        "branches_test": report["branches_test"], "flops": flops, "flops_test": flops_test,
        "epochs": cfg.epochs, "wall_time_s": round(wall, 3), "device": _device_name(device),
        **Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last).describe(),
        **_mask_metrics(model, cfg, spec),
        "config": asdict(cfg), "versions": versions(), "git_commit": _git_commit(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _mask_metrics(model, cfg: TrainConfig, spec: ModelSpec) -> dict:
    """metrics.json's mask fields (learned runs): the rule, the rows decided by ties at freezing, and
    the final statistics of the real-valued masks (connectivity.mask_stats)."""
    if spec.connectivity != "learned":
        return {}
    bank = mask_banks(model)[0]
    stats = mask_stats(bank.real, bank.fan_in)
    return {"mask_rule": cfg.mask_rule, "mask_tied_rows": bank.tied_at_freeze or 0,
            "mask_rows": bank.real.shape[0] * bank.real.shape[1], **{f"final_{k}": v for k, v in stats.items()}}


def _start_tracker(cfg: TrainConfig, out: Path, spec: ModelSpec, device: torch.device):
    from .tracking import Tracker

    t = Tracker(out, experiment=cfg.experiment, run_name=str(out), uri=cfg.tracking_uri, enabled=True)
    flat = {k: v for k, v in asdict(cfg).items()}
    t.start(flat, {"git_commit": _git_commit() or "unknown", "torch_version": torch.__version__,
                   "device": _device_name(device), "seed": str(cfg.seed), "connectivity": spec.connectivity,
                   "arch": spec.arch, "fan_in": str(spec.fan_in), "dataset": cfg.dataset})
    return t


def _init_distributed(dist: Distributed, device: torch.device) -> torch.device:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend)
    return device


def _cleanup_distributed(dist: Distributed) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError("set", item, "key=value with key a TrainConfig field")
        k, v = item.split("=", 1)
        if k not in names:
            raise ConfigError("set", k, f"a TrainConfig field: {', '.join(sorted(names))}")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return TrainConfig(**kw)
