"""Evaluating a finished run directory again (``maskconnect evaluate``): its final model with the
frozen masks and its pruned model, on the test set.

A random or learned run without ``pruned.pt`` (deleted, or lost in a copy) is not evaluated as if
nothing could be pruned: the pruned model is rebuilt from the checkpoint's frozen masks, with the
same function that wrote ``pruned.pt`` (``maskconnect.models.pruning.prune``), and a note says so.
A ``params_test`` that differs from the run's ``metrics.json`` is named in a warning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import RunDirError


def evaluate_run(run: Path, *, data_dir: str | None = None, device: str = "auto") -> dict:
    """Top-1/top-5 of the run's model and of its pruned model, their parameters and FLOPs. Every file
    is loaded before the data, so an unreadable one is named in seconds (:class:`RunDirError`)."""
    import torch

    from ..connectivity import count_weights, freeze_masks, mask_banks, masks_frozen
    from ..data import build_data
    from ..models.counting import count_flops
    from ..models import build_model
    from ..models.pruning import branch_counts, load_pruned, prune
    from .config import TrainConfig, identity_of
    from .device import resolve_device
    from .rundir import CHECKPOINT
    from .step import Precision, evaluate

    run = Path(run)
    if not run.is_dir():
        raise RunDirError(f"--run {run} is not a run directory")
    if not (run / "metrics.json").exists() or not (run / CHECKPOINT).exists():
        raise RunDirError(f"{run} is not a complete run (metrics.json and checkpoint.pt are needed)")
    try:
        cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise RunDirError(f"{run / 'config.json'} is missing or not a config of this version ({e})") from None
    # every file is loaded before the data: an unreadable one is named, in seconds
    ck = _load(run / CHECKPOINT, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    _check_same_run(run, cfg, ck, identity_of)
    state = ck["model"]
    compact = _load(run / "pruned.pt", load_pruned) if (run / "pruned.pt").exists() else None
    dev = resolve_device(device)
    precision = Precision.for_device(dev, amp=cfg.amp, channels_last=cfg.channels_last)
    data = build_data(cfg.dataset, data_dir=data_dir or cfg.data_dir, batch_size=cfg.batch_size,
                      eval_batch_size=cfg.eval_batch_size, device=dev, seed=cfg.seed, augment=False,
                      workers=cfg.workers, synthetic=cfg.synthetic or None, download=False)
    spec = TrainConfig.spec(cfg, num_classes=data.info.num_classes)
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunDirError(f"{run / CHECKPOINT} does not hold the model config.json describes "
                          f"({str(e).splitlines()[0]})") from None
    pruned_from = "pruned.pt"
    if compact is None and mask_banks(model):
        if not masks_frozen(model):  # the joint phase ran to the end: the run's last pass froze them, from the seed
            freeze_masks(model, seed=cfg.seed)
        compact = prune(model).eval()
        pruned_from = "checkpoint.pt (rebuilt: pruned.pt is missing)"
        print(f"note: {run / 'pruned.pt'} is missing: the pruned model is rebuilt from the frozen masks in "
              f"{run / CHECKPOINT}", file=sys.stderr)
    model = precision.prepare_model(model).eval()
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    result = {"run": str(run), "model": evaluate(model, data.test_batches(), precision, data.info.num_classes),
              "params_train": count_weights(model), "flops": count_flops(model, shape)}
    result["params_test"], result["flops_test"] = result["params_train"], result["flops"]
    if compact is not None:
        compact = precision.prepare_model(compact)
        result["pruned"] = evaluate(compact, data.test_batches(), precision, data.info.num_classes)
        result["params_test"] = count_weights(compact)
        result["flops_test"] = count_flops(compact, shape)
        result["branches_per_module"] = branch_counts(compact)
        result["pruned_from"] = pruned_from
    _compare_metrics(run, result)
    return result


def _check_same_run(run: Path, cfg, ck, identity_of) -> None:
    """A :class:`RunDirError` when config.json is not the config the checkpoint was trained with (an
    edited config.json would build another model and evaluate it with the wrong weights)."""
    saved = ck.get("config") if isinstance(ck, dict) else None
    if not isinstance(ck, dict) or "model" not in ck:
        raise RunDirError(f"{run / 'checkpoint.pt'} is not a checkpoint of this version (no model in it); train the "
                          "run again with its command and --replace")
    if not isinstance(saved, dict):
        return
    here, there = identity_of(vars(cfg)), identity_of(saved)
    diff = [k for k in {**here, **there} if here.get(k) != there.get(k)]
    if diff:
        shown = ", ".join(f"{k}={here.get(k)!r} in config.json, {there.get(k)!r} in checkpoint.pt" for k in diff[:3])
        raise RunDirError(f"{run / 'config.json'} is not the config {run / 'checkpoint.pt'} was trained with "
                          f"({shown}): was config.json edited? Restore it, or train the run again with --replace")


def _compare_metrics(run: Path, result: dict) -> None:
    """Warn when the evaluated parameter counts are not those of the run's metrics.json."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    for key in ("params_train", "params_test"):
        if isinstance(metrics, dict) and metrics.get(key) is not None and metrics[key] != result[key]:
            print(f"warning: {key}={result[key]} evaluated here, {metrics[key]} in {run / 'metrics.json'}: the "
                  f"model files of {run} do not match its record (was a file replaced?)", file=sys.stderr)


def _load(path: Path, load):
    """``load(path)``, or a :class:`RunDirError` naming the file and the way forward."""
    try:
        return load(path)
    except Exception as e:  # truncated zips, bad pickles, I/O errors: torch raises many kinds
        from .rundir import load_error

        raise RunDirError(f"{path} cannot be loaded ({load_error(path, e)}); the run's results are not usable: "
                          "train it again with its command and --replace") from None
