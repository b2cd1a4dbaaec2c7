"""One training run, as the paper's schedule (docs/design.md sections 4 and 6; the rules in :mod:`.schedule`):

    joint phase  epochs 1 .. freeze_epoch: the weights and the real-valued masks are learned together,
                 each step drawing K sources per branch from the masks (Fixed runs: the whole run)
    freeze       every mask row fixed to its top-K entries (exact ties drawn from the run's seed)
    fine-tune    the remaining epochs: the weights adapt to the fixed wiring
    finish       prune the branches no live branch reads, count FLOPs, write masks.json, pruned.pt
                 and, last, metrics.json

Every epoch ends with an evaluation, a history.csv row and a checkpoint (:mod:`.rundir`). Re-running
the same command resumes from the last checkpoint; on the CPU the resumed run ends bit-identical to an
uninterrupted one, because every source of randomness is either a pure function of (seed, epoch)
(data order and augmentation) or saved in the checkpoint (the torch RNG that draws the masks).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..connectivity import changed_rows, current_masks, freeze_masks, mask_banks, masks_frozen
from ..errors import MaskConnectError, RunDirError, TrainingDiverged
from ..mask_rules import mask_rule
from ..models import build_model
from ..specs import ModelSpec
from . import rundir
from .config import TrainConfig
from .ddp import Distributed, cleanup_distributed, epoch_means, from_main, init_distributed, wrap_ddp
from .device import configure_cudnn, resolve_device, tune_cpu_allocator
from .lock import RunLock
from .progress import Progress
from .schedule import build_optimizer, joint_phase_over, phase, scaled_lr
from .step import Precision, evaluate, train_step


@dataclass
class _Run:
    """What every epoch of one run works with."""
    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    out: Path
    data: object
    precision: Precision
    spec: ModelSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    rule: object
    tracker: object
    progress: Progress

    @property
    def learned(self) -> bool:
        return self.spec.connectivity == "learned"

    def step_model(self):
        """The model as the step runs it (DDP, compiled); built again after freezing the masks."""
        model = wrap_ddp(self.model, self.dist, self.device)
        return torch.compile(model) if self.cfg.compile else model


def train(cfg: TrainConfig, *, replace: bool = False, kill_after_epoch: int | None = None) -> dict:
    """Train (or resume, or skip if complete) the run ``cfg`` describes; returns its metrics.

    The run directory is locked (:class:`~maskconnect.training.lock.RunLock`, rank 0 under torchrun)
    from before its files are inspected until the run ends: a second command on it exits 2 naming this one.

    ``kill_after_epoch`` exists for tests of resumption: the process exits abruptly (``os._exit``)
    right after that epoch's checkpoint, as a SIGKILL would.
    """
    ignored = cfg.ignored_fields()
    cfg = cfg.resolved()
    dist = Distributed.from_env()
    lock = RunLock(cfg.out) if dist.main else None
    try:
        return _train(cfg, dist, lock, replace=replace, kill_after_epoch=kill_after_epoch, ignored=ignored)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, dist: Distributed, lock: RunLock | None, *, replace: bool,
           kill_after_epoch: int | None, ignored: list[str]) -> dict:
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    configure_cudnn()
    if device.type == "cpu":
        tune_cpu_allocator()
    if dist.world > 1:
        device = init_distributed(dist, device)
    # rank 0 locks and inspects (and may move aside) the run directory; every rank follows its verdict
    state = None
    if dist.main:
        try:
            lock.acquire()
            state = rundir.prepare_run_dir(cfg, replace=replace, lock=lock)
        except MaskConnectError as e:
            state = ("error", str(e))
            error = e
    state = from_main(dist, state)
    if isinstance(state, tuple):
        cleanup_distributed(dist)
        if dist.main:
            raise error
        raise RunDirError(state[1])
    if ignored and dist.main:
        print(f"note: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in ignored)} only affect learned runs: ignored for this "
              f"{cfg.connectivity} run (not part of its identity)", file=sys.stderr)
    if state == "complete":
        metrics = rundir.read_metrics(out)
        if dist.main:
            print(f"{out}: already complete (top-1 {metrics['top1']:.2f}); nothing to do", file=sys.stderr)
        cleanup_distributed(dist)
        return metrics if dist.main else {}

    precision = Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last)

    from ..data import build_data

    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size * dist.world,
                      eval_batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed, augment=cfg.augment,
                      workers=cfg.workers, synthetic=cfg.synthetic or None)
    data.shard(dist.rank, dist.world)
    if cfg.batch_size * dist.world > data.train_size and dist.main:
        print(f"warning: {_batch_text(cfg, dist.world, data.train_size)}", file=sys.stderr, flush=True)
    spec = TrainConfig.spec(cfg, num_classes=data.info.num_classes)

    torch.manual_seed(cfg.seed)  # initial weights (and, later, the mask draws) come from the seed
    model = precision.prepare_model(build_model(spec))
    optimizer, scheduler = build_optimizer(cfg, model, dist.world)
    rule = mask_rule(cfg.mask_rule)

    history: list[dict] = []
    best = {"top1": -1.0, "top5": None, "epoch": 0}
    start_epoch, wall = 0, 0.0
    if state == "resume":
        history, best, start_epoch, wall = _resume(out, cfg, model, optimizer, scheduler, dist, device)
    else:
        rule.after_step(mask_banks(model))  # start inside the rule's feasible set (projected: on the hull)
        if dist.main:
            rundir.write_config(out, cfg)

    tracker = _start_tracker(cfg, out, spec, device) if dist.main and cfg.track else None
    run = _Run(cfg, dist, device, out, data, precision, spec, model, optimizer, scheduler, rule, tracker,
               Progress(cfg.progress, cfg.epochs, data.steps_per_epoch(), enabled=dist.main))
    try:
        return _epochs(run, history, best, start_epoch, wall, kill_after_epoch)
    except BaseException as e:
        if tracker:  # the MLflow run is not left RUNNING
            tracker.finish({}, [], status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        cleanup_distributed(dist)
        raise


def _epochs(r: _Run, history: list[dict], best: dict, start_epoch: int, wall: float, kill_after_epoch: int | None) -> dict:
    """The epochs (joint phase, freeze, fine-tune) and the end of the run; see :func:`train`."""
    cfg, model = r.cfg, r.model
    step_model = r.step_model()
    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        if r.learned and joint_phase_over(epoch, cfg.freeze_epoch) and not masks_frozen(model):
            freeze(model, cfg, warn=r.dist.main)  # the joint phase ends: masks fixed to top-K, weights fine-tuned
            step_model = r.step_model()
        row = _epoch(r, step_model, epoch)
        row["epoch_time_s"] = time.perf_counter() - t0
        history.append(row)
        if row["test_top1"] > best["top1"]:
            best = {"top1": row["test_top1"], "top5": row["test_top5"], "epoch": epoch + 1}
        elapsed = wall + time.perf_counter() - t_run
        if r.dist.main:
            rundir.write_history(r.out, history)  # before the checkpoint; resume rewrites it
            rundir.save_checkpoint(r.out, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": r.optimizer.state_dict(),
                "scheduler": r.scheduler.state_dict(), "rng": rundir.rng_state(r.device), "history": history,
                "best": best, "wall_time_s": elapsed, "config": asdict(cfg), "world": r.dist.world,
            })
            if r.tracker:
                r.tracker.log_epoch(row, step=epoch + 1)
        done = epoch + 1 - start_epoch
        r.progress.end_epoch(row, eta_s=(time.perf_counter() - t_run) / done * (cfg.epochs - epoch - 1))
        if kill_after_epoch is not None and epoch + 1 == kill_after_epoch:
            os._exit(137)

    wall += time.perf_counter() - t_run
    if not r.dist.main:
        cleanup_distributed(r.dist)
        return {}
    metrics = finish_run(cfg, model, r.spec, history, best, wall, r.device, r.out)
    if r.tracker:
        files = [r.out / n for n in ("metrics.json", "masks.json", "config.json", "history.csv") if (r.out / n).exists()]
        r.tracker.finish(metrics, files)
    cleanup_distributed(r.dist)
    return metrics


def _epoch(r: _Run, step_model, epoch: int) -> dict:
    """One epoch of steps, the LR schedule's step and the evaluation: its history row (without its time)."""
    model = r.model
    frozen_phase = phase(r.learned, masks_frozen(model))
    before = current_masks(model) if r.learned else None
    banks = [b for b in mask_banks(model) if not b.frozen]  # what the rule updates
    model.train()
    loss_sum = torch.zeros((), device=r.device)
    correct = torch.zeros((), dtype=torch.long, device=r.device)
    seen = 0
    r.progress.start_epoch(epoch + 1)
    for x, y in r.data.train_batches(epoch):
        loss, c = train_step(step_model, r.optimizer, r.precision.prepare_input(x), y, r.precision,
                             label_smoothing=r.cfg.label_smoothing, banks=banks, rule=r.rule)
        loss_sum += loss * y.shape[0]
        correct += c
        seen += y.shape[0]
        r.progress.step()
    lrs = {g["name"]: g["lr"] for g in r.optimizer.param_groups}
    r.scheduler.step()
    train_loss, train_top1 = epoch_means(loss_sum, correct, seen, r.dist, r.device)
    # the test loss too: the epoch's last step may have broken the weights after the last train loss
    ev = evaluate(model, r.data.test_batches(), r.precision, r.data.info.num_classes) if math.isfinite(train_loss) else None
    if ev is None or not math.isfinite(ev["test_loss"]):
        raise _diverged(train_loss, ev, epoch, r.out, _lr_text(r.cfg, r.dist.world, r.data.train_size))
    return {"epoch": epoch + 1, "phase": frozen_phase, "lr": lrs["weights"], "mask_lr": lrs.get("masks"),
            "train_loss": train_loss, "train_top1": train_top1, **ev, **_mask_columns(model, before)}


def _resume(out: Path, cfg: TrainConfig, model, optimizer, scheduler, dist: Distributed, device: torch.device):
    """Load the latest readable checkpoint (checkpoint.pt, else checkpoint.prev.pt) into model, optimiser,
    scheduler and the RNG; returns (history, best, epoch, wall)."""
    # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the device
    if dist.world > 1:  # every rank resumes from the file rank 0 chose (or stops with its error)
        choice = None
        if dist.main:
            try:
                choice = str(rundir.load_checkpoint(out, cfg)[1])
            except RunDirError as e:
                choice = e
        choice = from_main(dist, choice)
        if isinstance(choice, RunDirError):
            raise RunDirError(str(choice))
        ck = torch.load(choice, map_location="cpu", weights_only=True)
    else:
        ck = rundir.load_checkpoint(out, cfg)[0]
    if ck.get("world", 1) != dist.world:
        raise RunDirError(f"{out} was trained with {ck.get('world', 1)} processes, this run has {dist.world}: "
                          "the global batch and LR would change; resume with the same number of processes")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    rundir.set_rng_state(ck["rng"], device)
    if dist.main:
        rundir.write_history(out, ck["history"])  # a kill may have left it one epoch ahead
        print(f"{out}: resuming after epoch {ck['epoch']}/{ck['config']['epochs']}", file=sys.stderr)
    return ck["history"], ck["best"], ck["epoch"], ck["wall_time_s"]


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


def finish_run(cfg: TrainConfig, model, spec: ModelSpec, history: list[dict], best: dict, wall: float,
               device: torch.device, out: Path) -> dict:
    """The end of the run: freeze (if the joint phase ran to the end), prune, count parameters and FLOPs,
    and write masks.json, pruned.pt and metrics.json (last: its presence means the run is complete)."""
    from ..models.counting import count_flops
    from ..models.pruning import live_parts, prune, prune_report, save_pruned

    model.eval()
    if spec.connectivity == "learned" and not masks_frozen(model):
        freeze(model, cfg)
    compact = prune(model) if spec.masked else None
    sizes = prune_report(model, compact)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    sizes["flops"] = sizes["flops_test"] = count_flops(model, shape)
    if compact is not None:
        rundir.write_masks(out, spec, mask_banks(model)[0], live_parts(model))
        sizes["flops_test"] = count_flops(compact, shape)
        save_pruned(out / "pruned.pt", compact)
    precision = Precision.for_device(device, amp=cfg.amp, channels_last=cfg.channels_last).describe()
    return rundir.write_metrics(out, cfg, spec, history, best, sizes=sizes, wall=wall, device=device,
                                precision=precision, mask_fields=_mask_metrics(model, cfg, spec))


def _mask_metrics(model, cfg: TrainConfig, spec: ModelSpec) -> dict:
    """metrics.json's mask fields (learned runs): the rule, the rows decided by ties at freezing, and
    the final statistics of the real-valued masks (connectivity.mask_stats)."""
    if spec.connectivity != "learned":
        return {}
    bank = mask_banks(model)[0]
    return {"mask_rule": cfg.mask_rule, "mask_tied_rows": bank.tied_at_freeze or 0,
            "mask_rows": bank.rows, **{f"final_{k}": v for k, v in bank.stats().items()}}


def _start_tracker(cfg: TrainConfig, out: Path, spec: ModelSpec, device: torch.device):
    from ..provenance import git_commit, run_device
    from ..tracking import Tracker, run_tags

    t = Tracker(out, experiment=cfg.experiment, run_name=str(out), uri=cfg.tracking_uri, enabled=True)
    flat = asdict(cfg)
    t.start(flat, {"git_commit": git_commit() or "unknown", "torch_version": torch.__version__,
                   "device": run_device(device), "seed": str(cfg.seed),
                   **run_tags({**flat, "arch": spec.arch, "fan_in": spec.fan_in}, cfg.experiment)})
    return t
