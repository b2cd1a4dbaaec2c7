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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__
from .connectivity import (
    changed_rows, current_masks, freeze_masks, live_branches, mask_banks, mask_rule,
    mask_stats, masks_frozen, param_groups,
)
from .engine import Precision, evaluate, resolve_device, train_step, tune_cpu_allocator
from .errors import MaskConnectError, RunDirError, TrainingDiverged
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .models import build_model
from .runlock import RunLock
from .specs import ModelSpec

# --- configuration (torch-free, in config.py: the grid loader checks grids with the same rules) ---

from .config import LEARNED_ONLY, NON_IDENTITY, TrainConfig, config_from_args, identity_of  # noqa: E402,F401

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


CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"   # the checkpoint before the latest: what a run resumes from if the latest is unreadable
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best", "wall_time_s", "config")


def prepare_run_dir(cfg: TrainConfig, replace: bool = False, lock: RunLock | None = None) -> str:
    """Check the output directory (under its lock, when given). Returns "new", "resume" or "complete".

    A directory holding a different run's config is never overwritten: it is an error, or with
    ``replace`` it is moved aside (renamed with a timestamp suffix), not deleted. A run of the same
    config whose files cannot be loaded (no readable checkpoint to resume from; a finished run whose
    model, pruned model or masks are unreadable) is an error naming the file, or with ``replace`` it
    is moved aside too.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        if out.exists() and any(p.name in (CHECKPOINT, PREVIOUS, "metrics.json") for p in out.iterdir()):
            if replace:
                _move_aside(out, "it holds run files but no config.json", lock)
                return "new"
            raise RunDirError(f"output directory {out} holds run files but no config.json; "
                              "move it away, or pass --replace to move it aside")
        return "new"
    try:
        old = json.loads(cfg_path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if replace:
            _move_aside(out, f"its config.json is unreadable ({e})", lock)
            return "new"
        raise RunDirError(f"{cfg_path} is unreadable ({e}); move the directory away or pass --replace") from None
    new = cfg.identity()
    old_id = identity_of(old)
    diff = {k: (old_id.get(k), new.get(k)) for k in {**new, **old_id} if old_id.get(k) != new.get(k)}
    if diff:
        if not replace:
            shown = [k for k in diff if k not in LEARNED_ONLY] or list(diff)  # learned-only fields follow connectivity
            detail = ", ".join(f"{k}={diff[k][0]!r} there, {diff[k][1]!r} here" for k in shown[:4])
            raise RunDirError(f"output directory {out} holds a different run ({detail}); "
                              "choose another --out, or pass --replace to move the old run aside")
        _move_aside(out, "it holds a different run", lock)
        return "new"
    state, problem = _inspect_run(out, cfg)
    if problem:
        if replace:
            _move_aside(out, problem, lock)
            return "new"
        raise RunDirError(f"{problem}. Pass --replace to move this run aside and train it again")
    return state


def _inspect_run(out: Path, cfg: TrainConfig) -> tuple[str, str | None]:
    """The state of a directory holding this run: ("complete" | "resume" | "new", problem or None)."""
    checkpoints = [p for p in (out / CHECKPOINT, out / PREVIOUS) if p.exists()]
    metrics = out / "metrics.json"
    if metrics.exists():
        try:
            record = json.loads(metrics.read_text())
            if not isinstance(record, dict) or record.get("status") != "complete" or "top1" not in record:
                raise ValueError("not a complete run's record")
        except (OSError, ValueError) as e:
            if _checkpoint_problem(out / CHECKPOINT, cfg) is None:
                print(f"{metrics} is unreadable ({e}): rebuilding it from {CHECKPOINT}", file=sys.stderr)
                return "resume", None
            return "complete", f"{metrics} is unreadable ({e}) and {out / CHECKPOINT} cannot rebuild it"
        files = [out / CHECKPOINT] + ([out / "pruned.pt", out / "masks.json"] if cfg.connectivity != "full" else [])
        for f in files:
            problem = _file_problem(f, cfg)
            if problem:
                return "complete", (f"{out} is a finished run (metrics.json), but {f} cannot be loaded ({problem}): "
                                    "its results cannot be evaluated")
        return "complete", None
    if not checkpoints:
        return "new", None
    problems = [f"{p.name}: {why}" for p in checkpoints if (why := _checkpoint_problem(p, cfg))]
    if len(problems) == len(checkpoints):
        missing = "" if len(checkpoints) == 2 else f"; {PREVIOUS if checkpoints[0].name == CHECKPOINT else CHECKPOINT} is missing"
        return "resume", (f"cannot resume {out}: no checkpoint can be loaded ({'; '.join(problems)}{missing})")
    return "resume", None


def _file_problem(path: Path, cfg: TrainConfig) -> str | None:
    if not path.exists():
        return "missing"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return str(e)
        return None
    return _checkpoint_problem(path, cfg) if path.name == CHECKPOINT else _torch_problem(path)


def _torch_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read by torch.load (memory-mapped: the zip's directory is checked, the
    tensors are not read), or None."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zips, bad pickles, I/O errors: torch raises many kinds
        return _short(e)
    return None


def _checkpoint_problem(path: Path, cfg: TrainConfig) -> str | None:
    if not path.exists():
        return "missing"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return _short(e)
    if not isinstance(ck, dict) or any(k not in ck for k in _CHECKPOINT_KEYS):
        return "not a checkpoint of this version"
    if identity_of(ck["config"]) != cfg.identity():
        return "it belongs to a different run (its config differs from config.json)"
    return None


def _short(e: BaseException) -> str:
    """The first sentence of an error, with its type (torch's load errors run to several lines)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    text = f"{type(e).__name__}: {first}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


def _move_aside(out: Path, why: str, lock: RunLock | None) -> Path:
    """Rename the run directory ``out`` to ``out.replaced-<time>`` (never deleted), then lock a fresh ``out``."""
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise RunDirError(f"--replace cannot move --out {out} aside: it is the current directory or holds it; "
                          "give the run its own directory")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{target.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        aside = target.with_name(f"{target.name}.replaced-{stamp}-{n}")
        n += 1
    target.rename(aside)
    print(f"moved the previous run in {out} to {aside} ({why})", file=sys.stderr)
    if lock is not None:
        old = RunLock(aside)
        old.fd, lock.fd = lock.fd, None
        lock.moved_to(out)
        try:
            lock.acquire()
        finally:
            old.release()
    return aside


def _rotate_checkpoint(out: Path) -> None:
    """checkpoint.pt becomes checkpoint.prev.pt (atomically; checkpoint.pt stays until the new one replaces it)."""
    latest, previous = out / CHECKPOINT, out / PREVIOUS
    if not latest.exists():
        return
    tmp = out / f".{PREVIOUS}.{os.getpid()}.tmp"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(latest, tmp)
    except OSError:  # no hard links on this file system: move it (a crash now leaves only the previous one)
        os.replace(latest, previous)
        return
    os.replace(tmp, previous)


def _load_checkpoint(out: Path, cfg: TrainConfig) -> tuple[dict, Path]:
    """The latest loadable checkpoint of ``out`` and its file; says so on stderr when it is the previous one."""
    errors = []
    for path in (out / CHECKPOINT, out / PREVIOUS):
        if not path.exists():
            errors.append(f"{path.name}: missing")
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or any(k not in ck for k in _CHECKPOINT_KEYS):
                raise ValueError("not a checkpoint of this version")
            if identity_of(ck["config"]) != cfg.identity():
                raise ValueError("it belongs to a different run")
        except Exception as e:
            errors.append(f"{path.name}: {_short(e)}")
            continue
        if errors:
            print(f"{out}: {errors[0]}; resuming from {path.name} (epoch {ck['epoch']}) instead", file=sys.stderr)
        return ck, path
    raise RunDirError(f"cannot resume {out}: no checkpoint can be loaded ({'; '.join(errors)}). "
                      "Pass --replace to move this run aside and train it again")


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

    The run directory is locked (:class:`~maskconnect.runlock.RunLock`, rank 0 under torchrun) from
    before its files are inspected until the run ends: a second command on it exits 2 naming this one.

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
    if device.type == "cpu":
        tune_cpu_allocator()
    if dist.world > 1:
        device = _init_distributed(dist, device)
    # rank 0 locks and inspects (and may move aside) the run directory; every rank follows its verdict
    state: list = [None]
    if dist.main:
        try:
            lock.acquire()
            state = [prepare_run_dir(cfg, replace=replace, lock=lock)]
        except MaskConnectError as e:
            state = [("error", str(e))]
            error = e
    if dist.world > 1:
        torch.distributed.broadcast_object_list(state, src=0)
    state = state[0]
    if isinstance(state, tuple):
        _cleanup_distributed(dist)
        if dist.main:
            raise error
        raise RunDirError(state[1])
    if ignored and dist.main:
        print(f"note: {', '.join(f'{k}={getattr(cfg, k)!r}' for k in ignored)} only affect learned runs: ignored for this "
              f"{cfg.connectivity} run (not part of its identity)", file=sys.stderr)
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

    history: list[dict] = []
    best = {"top1": -1.0, "top5": None, "epoch": 0}
    start_epoch, wall = 0, 0.0
    if state == "resume":
        history, best, start_epoch, wall = _resume(out, cfg, model, optimizer, scheduler, dist, device)
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

    tracker = _start_tracker(cfg, out, spec, device) if dist.main and cfg.track else None
    progress = _Progress(cfg.progress, cfg.epochs, data.steps_per_epoch(), enabled=dist.main)
    try:
        return _epochs(cfg, dist, device, out, data, precision, spec, model, optimizer, scheduler, rule, wrap,
                       tracker, progress, history, best, start_epoch, wall, kill_after_epoch)
    except BaseException as e:
        if tracker:  # the MLflow run is not left RUNNING
            tracker.finish({}, [], status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        _cleanup_distributed(dist)
        raise


def _epochs(cfg, dist, device, out, data, precision, spec, model, optimizer, scheduler, rule, wrap, tracker,
            progress, history, best, start_epoch, wall, kill_after_epoch) -> dict:
    """The epoch loop and the end of the run (finish_run); see :func:`train`."""
    learned = spec.connectivity == "learned"
    step_model = wrap(model)
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
            _rotate_checkpoint(out)  # the previous checkpoint stays, in case the latest cannot be read
            atomic_torch_save(out / CHECKPOINT, {
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


def _resume(out: Path, cfg: TrainConfig, model, optimizer, scheduler, dist: Distributed, device: torch.device):
    """Load the latest readable checkpoint (checkpoint.pt, else checkpoint.prev.pt) into model, optimiser,
    scheduler and the RNG; returns (history, best, epoch, wall)."""
    # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the device
    if dist.world > 1:  # every rank resumes from the file rank 0 chose (or stops with its error)
        choice: list = [None]
        if dist.main:
            try:
                choice = [str(_load_checkpoint(out, cfg)[1])]
            except RunDirError as e:
                choice = [e]
        torch.distributed.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], RunDirError):
            raise RunDirError(str(choice[0]))
        ck = torch.load(choice[0], map_location="cpu", weights_only=True)
    else:
        ck = _load_checkpoint(out, cfg)[0]
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
    from .tracking import Tracker, run_tags

    t = Tracker(out, experiment=cfg.experiment, run_name=str(out), uri=cfg.tracking_uri, enabled=True)
    flat = {k: v for k, v in asdict(cfg).items()}
    t.start(flat, {"git_commit": _git_commit() or "unknown", "torch_version": torch.__version__,
                   "device": _device_name(device), "seed": str(cfg.seed),
                   **run_tags({**flat, "arch": spec.arch, "fan_in": spec.fan_in}, cfg.experiment)})
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
