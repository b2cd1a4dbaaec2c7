"""The run directory's files (docs/run_format.md): is this directory new, a run to resume, a finished
run or someone else's (:func:`prepare_run_dir`); the checkpoint, written every epoch with the one
before it kept, and loaded to resume; config.json, history.csv, masks.json and metrics.json.
:class:`RunDirectory` is a run's hold on its directory for the run's length: the lock, the verdict every
rank follows, the start, the checkpoints and the resume.

Only files here: what goes into them (freezing, pruning, FLOPs) is the loop's (:mod:`.loop`).
Every file is written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MaskConnectError, RunDirError
from ..io import atomic_torch_save, atomic_write_json, atomic_write_text
from ..provenance import run_device, versions
from ..specs import MASKED, ModelSpec
from .config import LEARNED_ONLY, TrainConfig, identity_of
from .ddp import Distributed, from_main
from .lock import RunLock

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"   # the checkpoint before the latest: what a run resumes from if the latest is unreadable
METRICS = "metrics.json"
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng", "history", "best", "wall_time_s", "config")

HISTORY_COLUMNS = ["epoch", "phase", "lr", "mask_lr", "train_loss", "train_top1", "test_loss", "test_top1",
                   "test_top5", "mask_entropy", "mask_changed", "mask_mean", "mask_at_0", "mask_at_1", "mask_margin",
                   "mask_ties", "epoch_time_s"]


# --- what the directory holds --------------------------------------------------------------------

def prepare_run_dir(cfg: TrainConfig, replace: bool = False, lock: RunLock | None = None,
                    code: dict | None = None) -> str:
    """Check the output directory (under its lock, when given). Returns "new", "resume" or "complete".

    A directory holding a different run's config is never overwritten: it is an error, or with
    ``replace`` it is moved aside (renamed with a timestamp suffix), not deleted. A run of the same
    config whose files cannot be loaded (no readable checkpoint to resume from; a finished run whose
    model, pruned model or masks are unreadable) is an error naming the file, or with ``replace`` it
    is moved aside too. A different run that never finished an epoch (config.json, no checkpoint,
    history or result) is moved aside without ``replace``: there is nothing of it to keep or resume,
    so a rerun after a bad first try (a batch too large, a diverged first epoch) is not refused. With
    ``replace``, a finished run whose last epochs were trained by other code than ``code``
    (:func:`~maskconnect.provenance.code_state`: another digest of the training code) is moved aside
    too: the pipelines rerun a training job when its code changed, and it must then train again. An
    unfinished run resumes under the new code and records both (``code_history``).
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        if out.exists() and any(p.name in (CHECKPOINT, PREVIOUS, METRICS) for p in out.iterdir()):
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
        if not replace and not _trained(out):
            _move_aside(out, "it held a different run that never finished an epoch", lock)
            return "new"
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
    made_by = trained_by(out) if state == "complete" and code is not None else None
    if made_by and made_by != code["code_digest"]:
        why = f"it was trained by other code (training code {made_by[:12]} there, {code['code_digest'][:12]} here)"
        if replace:
            _move_aside(out, why, lock)
            return "new"
        print(f"note: {out}: {why}; pass --replace to train it again with this code", file=sys.stderr)
    return state


def _trained(out: Path) -> bool:
    """Whether ``out`` holds anything a run wrote after its first epoch (a checkpoint, history, a result)."""
    return any((out / name).exists() for name in (CHECKPOINT, PREVIOUS, METRICS, "history.csv", "masks.json", "pruned.pt"))


def trained_by(out: Path) -> str | None:
    """The digest of the training code that trained the last epochs of the finished run in ``out``
    (metrics.json's ``code_history``), or None when not recorded (runs from before the record)."""
    try:
        history = json.loads((out / METRICS).read_text()).get("code_history") or []
        return history[-1].get("code_digest")
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return None


def add_code_epoch(code_history: list[dict], code: dict, epoch: int) -> list[dict]:
    """``code_history`` with epoch ``epoch`` (1-based) trained by ``code`` (provenance.code_state): the
    last entry grows when the same code trained the epoch before, else a new entry starts."""
    last = code_history[-1] if code_history else None
    if last is not None and last["epochs"][1] == epoch - 1 and all(last.get(k) == v for k, v in code.items()):
        return code_history[:-1] + [{**last, "epochs": [last["epochs"][0], epoch]}]
    return code_history + [{**code, "epochs": [epoch, epoch]}]


def _inspect_run(out: Path, cfg: TrainConfig) -> tuple[str, str | None]:
    """The state of a directory holding this run: ("complete" | "resume" | "new", problem or None)."""
    checkpoints = [p for p in (out / CHECKPOINT, out / PREVIOUS) if p.exists()]
    metrics = out / METRICS
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
        files = [out / CHECKPOINT] + ([out / "pruned.pt", out / "masks.json"] if cfg.connectivity in MASKED else [])
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
        return load_error(path, e)
    return None


def _checkpoint_problem(path: Path, cfg: TrainConfig) -> str | None:
    if not path.exists():
        return "missing"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return load_error(path, e)
    if not isinstance(ck, dict) or any(k not in ck for k in _CHECKPOINT_KEYS):
        return "not a checkpoint of this version"
    if identity_of(ck["config"]) != cfg.identity():
        return "it belongs to a different run (its config differs from config.json)"
    return None


def load_error(path: Path, e: BaseException) -> str:
    """Why torch.load failed on ``path``, in our words where torch's would mislead: an empty file, or
    one that is not a zip archive (what torch.save writes), where torch speaks of pickles and of
    re-saving with other options; else the first sentence of its error (:func:`short_error`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return short_error(e)
    if not head:
        return "an empty file (0 bytes): it was never written, or it was cut to nothing"
    if head != b"PK\x03\x04":
        return "not a file torch.save writes (not a zip archive): damaged, or another kind of file"
    return short_error(e)


def short_error(e: BaseException) -> str:
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


# --- the checkpoint ------------------------------------------------------------------------------

def save_checkpoint(out: Path, state: dict) -> None:
    """Write ``state`` as checkpoint.pt, keeping the one before as checkpoint.prev.pt."""
    _rotate_checkpoint(out)  # the previous checkpoint stays, in case the latest cannot be read
    atomic_torch_save(out / CHECKPOINT, state)


def write_checkpoint(out: Path, cfg, world: int, state: State, model, optimizer, scheduler, device: torch.device,
                     wall: float) -> None:
    """What the training loop writes after each epoch: history.csv, then the checkpoint of the model, the
    optimiser, the LR schedule, the RNG and the run's state (the one before it kept)."""
    write_history(out, state.history)  # before the checkpoint; resume rewrites it
    save_checkpoint(out, {
        "epoch": state.epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": rng_state(device), "history": state.history,
        "best": state.best, "wall_time_s": wall, "config": asdict(cfg), "world": world,
        "code_history": state.code_history,
    })


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


def load_checkpoint(out: Path, cfg: TrainConfig) -> tuple[dict, Path]:
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
            errors.append(f"{path.name}: {load_error(path, e)}")
            continue
        if errors:
            print(f"{out}: {errors[0]}; resuming from {path.name} (epoch {ck['epoch']}) instead", file=sys.stderr)
        return ck, path
    raise RunDirError(f"cannot resume {out}: no checkpoint can be loaded ({'; '.join(errors)}). "
                      "Pass --replace to move this run aside and train it again")


def rng_state(device: torch.device) -> dict:
    """The torch RNG (it draws the masks) as the checkpoint keeps it."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- the other files -----------------------------------------------------------------------------

def write_config(out: Path, cfg: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", asdict(cfg))


def write_history(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in HISTORY_COLUMNS})
    atomic_write_text(out / "history.csv", buf.getvalue())


def write_masks(out: Path, spec: ModelSpec, bank, live: list) -> None:
    """masks.json (docs/run_format.md): the binary masks, the real-valued ones (learned), what lives
    (``models.pruning.live_parts``: live branches per module, or live blocks)."""
    masks = bank.fixed.detach().cpu()
    atomic_write_json(out / "masks.json", {
        "family": spec.family, "arch": spec.arch, "cardinality": spec.cardinality, "fan_in": spec.fan_in,
        "connectivity": spec.connectivity, "modules": spec.num_modules, "masks": masks.int().tolist(),
        "real": None if bank.real is None else [[[round(v, 6) for v in r] for r in m] for m in bank.real.detach().cpu().tolist()],
        "live": live,
    })


def read_metrics(out: Path) -> dict:
    return json.loads((out / METRICS).read_text())


def write_metrics(out: Path, cfg: TrainConfig, spec: ModelSpec, history: list[dict], best: dict, *, sizes: dict,
                  wall: float, device: torch.device, precision: dict, mask_fields: dict, code: dict,
                  code_history: list[dict]) -> dict:
    """metrics.json, the run's record, written last (its presence means the run is complete).

    ``sizes``: params_train, params_test, masks, branches_test, flops, flops_test; ``precision``: the
    autocast dtype and memory format; ``mask_fields``: the learned masks' final state (or nothing);
    ``code``: the code finishing the run (provenance.code_state); ``code_history``: which code trained
    which epochs (:func:`add_code_epoch`)."""
    last = history[-1]
    metrics = {
        "status": "complete",
        "dataset": cfg.dataset, "family": spec.family, "arch": spec.arch, "depth": spec.depth, "width": spec.width,
        "cardinality": spec.cardinality, "stage_width": spec.stage_width, "connectivity": spec.connectivity,
        "fan_in": spec.fan_in, "seed": cfg.seed, "top1": last["test_top1"], "top5": last["test_top5"], "best_top1": best["top1"], "best_top5": best["top5"],
        "best_epoch": best["epoch"], "test_loss": last["test_loss"],
        **{k: sizes[k] for k in ("params_train", "params_test", "masks", "branches_test", "flops", "flops_test")},
        "epochs": cfg.epochs, "wall_time_s": round(wall, 3), "device": run_device(device),
        **precision, **mask_fields,
        "config": asdict(cfg), "versions": versions(), "git_commit": code["git_commit"], "git_dirty": code["git_dirty"],
        "code_history": code_history,
    }
    atomic_write_json(out / METRICS, metrics)
    return metrics


# --- a run's hold on its directory ---------------------------------------------------------------

@dataclass
class State:
    """What a run has done so far, as its checkpoint keeps it: epochs done, the history, the best epoch,
    the wall time spent, which code trained which epochs."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "top5": None, "epoch": 0})
    wall: float = 0.0
    code_history: list[dict] = field(default_factory=list)

    def record(self, row: dict) -> None:
        self.history.append(row)
        self.epoch = row["epoch"]
        if row["test_top1"] > self.best["top1"]:
            self.best = {"top1": row["test_top1"], "top5": row["test_top5"], "epoch": row["epoch"]}


@dataclass(frozen=True)
class Verdict:
    """Rank 0's decision about the directory, which every rank follows: "new", "resume" or "complete",
    or the error that stops the run."""

    state: str | None
    error: str | None = None


class RunDirectory:
    """A run's hold on its directory (``with RunDirectory(cfg, dist, replace=...) as d:``): rank 0 locks it
    (:class:`~.lock.RunLock`) before its files are inspected and until the run ends, decides what it holds
    (:func:`prepare_run_dir`: ``d.state`` is "new", "resume" or "complete") and every rank follows. Then
    :meth:`start` (a new run's config.json), :meth:`resume` (the latest readable checkpoint), and every
    epoch :meth:`checkpoint`. ``code`` is the code running (provenance.code_state; rank 0 only)."""

    def __init__(self, cfg: TrainConfig, dist: Distributed, *, replace: bool = False):
        from ..provenance import code_state

        self.cfg, self.dist, self.replace, self.out = cfg, dist, replace, Path(cfg.out)
        self.lock = RunLock(cfg.out) if dist.main else None
        self.code = code_state("train") if dist.main else None
        self.state: str | None = None

    def __enter__(self) -> "RunDirectory":
        verdict, error = None, None
        if self.dist.main:
            try:
                self.lock.acquire()
                verdict = Verdict(prepare_run_dir(self.cfg, replace=self.replace, lock=self.lock, code=self.code))
            except MaskConnectError as e:
                verdict, error = Verdict(None, str(e)), e
        verdict = from_main(self.dist, verdict)
        if verdict.error is not None:
            self.__exit__(None, None, None)
            raise error if error is not None else RunDirError(verdict.error)
        self.state = verdict.state
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()

    def complete_metrics(self) -> dict:
        """A finished run's metrics (rank 0; the other ranks get {}), and a line saying nothing is to do."""
        metrics = read_metrics(self.out)
        if not self.dist.main:
            return {}
        print(f"{self.out}: already complete (top-1 {metrics['top1']:.2f}); nothing to do", file=sys.stderr)
        return metrics

    def start(self) -> None:
        if self.dist.main:
            write_config(self.out, self.cfg)

    def checkpoint(self, state: State, model, optimizer, scheduler, device: torch.device, wall: float) -> None:
        """history.csv, then the checkpoint (the one before it kept): what a rerun resumes from."""
        write_checkpoint(self.out, self.cfg, self.dist.world, state, model, optimizer, scheduler, device, wall)

    def resume(self, model, optimizer, scheduler, device: torch.device) -> State:
        """Load the latest readable checkpoint (checkpoint.pt, else checkpoint.prev.pt) into the model, the
        optimiser, the scheduler and the RNG; every rank from the file rank 0 chose (or stops with its
        error). Returns the run's :class:`State`."""
        out, cfg, dist = self.out, self.cfg, self.dist
        # on the CPU: RNG states must stay CPU tensors; load_state_dict copies onto the device
        if dist.world > 1:
            choice = None
            if dist.main:
                try:
                    choice = str(load_checkpoint(out, cfg)[1])
                except RunDirError as e:
                    choice = e
            choice = from_main(dist, choice)
            if isinstance(choice, RunDirError):
                raise RunDirError(str(choice))
            ck = torch.load(choice, map_location="cpu", weights_only=True)
        else:
            ck = load_checkpoint(out, cfg)[0]
        if ck.get("world", 1) != dist.world:
            raise RunDirError(f"{out} was trained with {ck.get('world', 1)} processes, this run has {dist.world}: "
                              "the global batch and LR would change; resume with the same number of processes")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], device)
        if dist.main:
            write_history(out, ck["history"])  # a kill may have left it one epoch ahead
            print(f"{out}: resuming after epoch {ck['epoch']}/{ck['config']['epochs']}", file=sys.stderr)
        # a checkpoint from before the code history: its epochs' code is unknown
        unknown = [{"git_commit": None, "git_dirty": None, "code_digest": None, "epochs": [1, ck["epoch"]]}] if ck["epoch"] else []
        return State(ck["epoch"], ck["history"], ck["best"], ck["wall_time_s"], ck.get("code_history", unknown))
