"""One training run, as the paper's schedule (docs/design.md sections 4 and 6; the rules in :mod:`.schedule`):

    joint phase  epochs 1 .. freeze_epoch: the weights and the real-valued masks are learned together,
                 each step drawing K sources per branch from the masks (Fixed runs: the whole run)
    freeze       every mask row fixed to its top-K entries (exact ties drawn from the run's seed)
    fine-tune    the remaining epochs: the weights adapt to the fixed wiring
    finish       prune what no live part reads, count FLOPs, write masks.json, pruned.pt and, last,
                 metrics.json

:func:`train` reads like that (torchvision's references/classification/train.py is the shape):
:func:`train_one_epoch` and :func:`~.step.evaluate` per epoch, the freeze where the joint phase ends,
:func:`finish_run` at the end. Every epoch ends with a history.csv row and a checkpoint
(:mod:`.rundir`), then the run's callbacks (tracking is one: :class:`TrackingCallback`). The run
directory's lock and its verdict (new, resume, complete) are :class:`~.rundir.RunDirectory`'s.
Re-running the same command resumes from the last checkpoint; on the CPU the resumed run ends
bit-identical to an uninterrupted one, because every source of randomness is either a pure function
of (seed, epoch) (data order and augmentation) or saved in the checkpoint (the torch RNG that draws the
masks).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ..connectivity import changed_rows, current_masks, freeze_masks, mask_banks, masks_frozen
from ..errors import TrainingDiverged
from ..mask_rules import MaskRule, mask_rule
from ..models import build_model
from ..specs import ModelSpec
from . import rundir
from .rundir import State
from .config import TrainConfig
from .ddp import Distributed, cleanup_distributed, epoch_means, init_distributed, wrap_ddp
from .device import configure_cudnn, resolve_device, tune_cpu_allocator
from .progress import Progress
from .schedule import build_optimizer, joint_phase_over, phase, scaled_lr
from .step import Precision, evaluate, train_step


class Callback(Protocol):
    """Called on every rank after each epoch's checkpoint (rank 0 writes it), and once when the run ends
    (``error`` None when it completed; ``metrics`` None when it did not, and {} on the other ranks)."""

    def epoch_end(self, row: dict) -> None: ...

    def run_end(self, metrics: dict | None, files: list[Path], error: BaseException | None) -> None: ...


def train(cfg: TrainConfig, *, replace: bool = False, callbacks: Sequence[Callback] = ()) -> dict:
    """Train (or resume, or skip if complete) the run ``cfg`` describes; returns its metrics.

    The run directory is locked (rank 0 under torchrun) from before its files are inspected until the
    run ends: a second command on it exits 2 naming this one. ``callbacks`` run after each epoch's
    checkpoint and at the end (:class:`Callback`); tracking (MLflow) is one more on rank 0 when ``cfg.track``.
    """
    ignored = cfg.ignored_fields()
    cfg = cfg.resolved()
    dist = Distributed.from_env()
    device = resolve_device(cfg.device)
    configure_cudnn()
    if device.type == "cpu":
        tune_cpu_allocator()
    if dist.world > 1:
        device = init_distributed(dist, device)
    try:
        with rundir.RunDirectory(cfg, dist, replace=replace) as run_dir:
            if ignored and dist.main:
                print(f"note: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in ignored)} only affect learned runs: "
                      f"ignored for this {cfg.connectivity} run (not part of its identity)", file=sys.stderr)
            if run_dir.state == "complete":
                return run_dir.complete_metrics()
            return _train(cfg, dist, device, run_dir, list(callbacks))
    finally:
        cleanup_distributed(dist)


def _train(cfg: TrainConfig, dist: Distributed, device: torch.device, run_dir: "rundir.RunDirectory",
           callbacks: list[Callback]) -> dict:
    from ..data import build_data

    out = Path(cfg.out)
    precision = Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last)
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size * dist.world,
                      eval_batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed, augment=cfg.augment,
                      workers=cfg.workers, synthetic=cfg.synthetic or None)
    data.shard(dist.rank, dist.world)
    if cfg.batch_size * dist.world > data.train_size and dist.main:
        print(f"warning: {_batch_text(cfg, dist.world, data.train_size)}", file=sys.stderr, flush=True)
    spec = TrainConfig.spec(cfg, num_classes=data.info.num_classes)
    learned = spec.connectivity == "learned"

    torch.manual_seed(cfg.seed)  # initial weights (and, later, the mask draws) come from the seed
    model = precision.prepare_model(build_model(spec))
    optimizer, scheduler = build_optimizer(cfg, model, dist.world)
    rule = mask_rule(cfg.mask_rule)
    if run_dir.state == "resume":
        state = run_dir.resume(model, optimizer, scheduler, device)
    else:
        state = State()
        rule.after_step(mask_banks(model))  # start inside the rule's feasible set (projected: on the hull)
        run_dir.start()
    if dist.main and cfg.track:
        callbacks.append(TrackingCallback.start(cfg, out, spec, device))
    progress = Progress(cfg.progress, cfg.epochs, data.steps_per_epoch(), enabled=dist.main)

    def step_model():  # the model as the steps run it (DDP, compiled): made again after the freeze
        m = wrap_ddp(model, dist, device)
        return torch.compile(m) if cfg.compile else m

    try:
        runner, t_run, start = step_model(), time.perf_counter(), state.epoch
        for epoch in range(start, cfg.epochs + 1):   # the pass after the last epoch only ends the joint phase
            if learned and joint_phase_over(epoch, cfg.freeze_epoch) and not masks_frozen(model):
                freeze(model, cfg, warn=dist.main)   # masks fixed to top-K; the weights are fine-tuned
                if epoch < cfg.epochs:
                    runner = step_model()
            if epoch == cfg.epochs:
                break
            t0 = time.perf_counter()
            progress.start_epoch(epoch + 1)
            row = train_one_epoch(runner, model, optimizer, scheduler, rule, data, precision, cfg, dist, device,
                                  epoch, progress)
            row["epoch_time_s"] = time.perf_counter() - t0
            state.record(row)
            if dist.main:
                state.code_history = rundir.add_code_epoch(state.code_history, run_dir.code, epoch + 1)
                run_dir.checkpoint(state, model, optimizer, scheduler, device, wall=state.wall + time.perf_counter() - t_run)
            progress.end_epoch(row, eta_s=(time.perf_counter() - t_run) / (epoch + 1 - start) * (cfg.epochs - epoch - 1))
            for cb in callbacks:
                cb.epoch_end(row)
        state.wall += time.perf_counter() - t_run
        metrics = finish_run(cfg, model, spec, state, device, out, run_dir.code) if dist.main else {}
    except BaseException as e:
        for cb in callbacks:   # e.g. the MLflow run is not left RUNNING
            cb.run_end(None, [], e)
        raise
    for cb in callbacks:
        cb.run_end(metrics, [out / n for n in ("metrics.json", "masks.json", "config.json", "history.csv")
                             if (out / n).exists()], None)
    return metrics


def train_one_epoch(runner, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, rule: MaskRule,
                    data, precision: Precision, cfg: TrainConfig, dist: Distributed, device: torch.device,
                    epoch: int, progress: Progress) -> dict:
    """One epoch (0-based ``epoch``) of training steps, the LR schedule's step and the evaluation: its
    history row (without its time). ``runner`` is the model as the steps run it (DDP, compiled)."""
    learned = any(b.kind == "learned" for b in mask_banks(model))
    phase_name = phase(learned, masks_frozen(model))
    before = current_masks(model) if learned else None
    banks = [b for b in mask_banks(model) if not b.frozen]  # what the rule updates
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, y in data.train_batches(epoch):
        loss, c = train_step(runner, optimizer, precision.prepare_input(x), y, precision,
                             label_smoothing=cfg.label_smoothing, banks=banks, rule=rule)
        loss_sum += loss * y.shape[0]
        correct += c
        seen += y.shape[0]
        progress.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    scheduler.step()
    train_loss, train_top1 = epoch_means(loss_sum, correct, seen, dist, device)
    # the test loss too: the epoch's last step may have broken the weights after the last train loss
    ev = evaluate(model, data.test_batches(), precision, data.info.num_classes) if math.isfinite(train_loss) else None
    if ev is None or not math.isfinite(ev["test_loss"]):
        raise _diverged(train_loss, ev, epoch, Path(cfg.out), _lr_text(cfg, dist.world, data.train_size))
    return {"epoch": epoch + 1, "phase": phase_name, "lr": lrs["weights"], "mask_lr": lrs.get("masks"),
            "train_loss": train_loss, "train_top1": train_top1, **ev, **_mask_columns(model, before)}


def _batch_text(cfg: TrainConfig, world: int, train_size: int) -> str:
    return (f"--batch-size {cfg.batch_size}{f' x {world} processes' if world > 1 else ''} is larger than the "
            f"{train_size} training images: each epoch is one step on all of them, and the LR is scaled for a "
            f"batch of {cfg.batch_size * world} ({_scaling(cfg, world)})")


def _scaling(cfg: TrainConfig, world: int) -> str:
    lr = scaled_lr(cfg.lr, cfg.batch_size, world, cfg.lr_reference_batch)
    return f"--lr {cfg.lr:g} is meant for a batch of {cfg.lr_reference_batch}: {cfg.lr:g} x {cfg.batch_size * world} / {cfg.lr_reference_batch} = {lr:.3g}"


def _lr_text(cfg: TrainConfig, world: int, train_size: int) -> str:
    """What a diverged run's message adds: the LR scaling, when it raised the LR, and a batch larger
    than the training set (two causes the advice "lower --lr" would hide)."""
    causes = []
    if cfg.batch_size * world > cfg.lr_reference_batch:
        causes.append(f"The LR was scaled up linearly with the batch ({_scaling(cfg, world)}; "
                      "--lr-reference-batch sets the batch --lr is meant for).")
    if cfg.batch_size * world > train_size:
        causes.append(f"The batch ({cfg.batch_size * world}) is larger than the {train_size} training images.")
    return (" " + " ".join(causes)) if causes else ""


def _diverged(train_loss: float, ev: dict | None, epoch: int, out: Path, causes: str = "") -> TrainingDiverged:
    which = "training" if ev is None else "test"
    bad = train_loss if ev is None else ev["test_loss"]
    last = f"the last good checkpoint (after epoch {epoch}) is kept in {out / rundir.CHECKPOINT}" if epoch else "no checkpoint was written"
    return TrainingDiverged(f"{which} loss became {bad} in epoch {epoch + 1}; {last}.{causes} Lower --lr or check the data.")


def _mask_columns(model, before) -> dict:
    """The mask columns of a history row: statistics of the real-valued masks and the rows whose
    top-K set changed this epoch (learned runs; empty otherwise)."""
    bank = next((b for b in mask_banks(model) if b.real is not None), None)
    if bank is None:
        return {}
    return {**bank.stats(), "mask_changed": changed_rows(before, current_masks(model))}


def freeze(model, cfg: TrainConfig, warn: bool = True) -> int:
    """End the joint phase: freeze the learned masks (exact ties broken by a draw from the run's seed)
    and warn when rows were saturated or tied: such rows were not decided by what the masks learned."""
    bank = mask_banks(model)[0]
    stats = bank.stats()
    ties = freeze_masks(model, seed=cfg.seed)
    rows = bank.rows
    if warn and (ties or stats["mask_at_1"] > 0.5 or stats["mask_at_0"] == 1.0):
        print(f"warning: freezing masks with mask rule {cfg.mask_rule!r}: {ties} of {rows} rows were decided by exact "
              f"ties (broken at random from seed {cfg.seed}); {stats['mask_at_1']:.0%} of entries at 1.0, "
              f"{stats['mask_at_0']:.0%} at 0.0. Saturated rows sample uniformly and learn nothing "
              f"(docs/mask_rules.md).", file=sys.stderr, flush=True)
    return ties


def finish_run(cfg: TrainConfig, model, spec: ModelSpec, state: State, device: torch.device, out: Path,
               code: dict | None) -> dict:
    """The end of the run (masks frozen): prune once, count parameters and FLOPs, and write masks.json,
    pruned.pt and metrics.json (last: its presence means the run is complete)."""
    from ..models.counting import count_flops
    from ..models.pruning import live_parts, prune, prune_report, save_pruned

    model.eval()
    compact = prune(model) if spec.masked else None
    sizes = prune_report(model, compact)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    sizes["flops"] = sizes["flops_test"] = count_flops(model, shape)
    if compact is not None:
        rundir.write_masks(out, spec, mask_banks(model)[0], live_parts(model))
        sizes["flops_test"] = count_flops(compact, shape)
        save_pruned(out / "pruned.pt", compact)
    precision = Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last).describe()
    return rundir.write_metrics(out, cfg, spec, state.history, state.best, sizes=sizes, wall=state.wall, device=device,
                                precision=precision, mask_fields=_mask_metrics(model, cfg, spec), code=code,
                                code_history=state.code_history)


def _mask_metrics(model, cfg: TrainConfig, spec: ModelSpec) -> dict:
    """metrics.json's mask fields (learned runs): the rule, the rows decided by ties at freezing, and
    the final statistics of the real-valued masks (connectivity.mask_stats)."""
    if spec.connectivity != "learned":
        return {}
    bank = mask_banks(model)[0]
    return {"mask_rule": cfg.mask_rule, "mask_tied_rows": bank.tied_at_freeze or 0,
            "mask_rows": bank.rows, **{f"final_{k}": v for k, v in bank.stats().items()}}


class TrackingCallback:
    """The run in MLflow (``maskconnect.tracking.Tracker``): its parameters and tags at the start, each
    epoch's row, and at the end its metrics and files (a failed or killed run is marked so)."""

    def __init__(self, tracker):
        self.tracker = tracker

    @classmethod
    def start(cls, cfg: TrainConfig, out: Path, spec: ModelSpec, device: torch.device) -> "TrackingCallback":
        from ..provenance import git_commit, run_device
        from ..tracking import Tracker, run_tags

        t = Tracker(out, experiment=cfg.experiment, run_name=str(out), uri=cfg.tracking_uri, enabled=True)
        flat = asdict(cfg)
        t.start(flat, {"git_commit": git_commit() or "unknown", "torch_version": torch.__version__,
                       "device": run_device(device), "seed": str(cfg.seed),
                       **run_tags({**flat, "arch": spec.arch, "fan_in": spec.fan_in}, cfg.experiment)})
        return cls(t)

    def epoch_end(self, row: dict) -> None:
        self.tracker.log_epoch(row, step=row["epoch"])

    def run_end(self, metrics: dict | None, files: list[Path], error: BaseException | None) -> None:
        if error is None:
            self.tracker.finish(metrics or {}, files)
        else:
            self.tracker.finish({}, [], status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
