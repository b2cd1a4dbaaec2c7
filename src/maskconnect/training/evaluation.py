"""Evaluating a finished run directory again (``maskconnect evaluate``): its final model with the
frozen masks and its pruned model, on the test set."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RunDirError


def evaluate_run(run: Path, *, data_dir: str | None = None, device: str = "auto") -> dict:
    """Top-1/top-5 of the run's model and of its pruned model, their parameters and FLOPs. Every file
    is loaded before the data, so an unreadable one is named in seconds (:class:`RunDirError`)."""
    import torch

    from ..connectivity import count_weights
    from ..data import build_data
    from ..models.counting import count_flops
    from ..models import build_model
    from ..models.pruning import branch_counts, load_pruned
    from .config import TrainConfig
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
    state = _load(run / CHECKPOINT, lambda p: torch.load(p, map_location="cpu", weights_only=True)["model"])
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
        raise RunDirError(f"{run / CHECKPOINT} does not hold this run's model ({str(e).splitlines()[0]})") from None
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
    return result


def _load(path: Path, load):
    """``load(path)``, or a :class:`RunDirError` naming the file and the way forward."""
    try:
        return load(path)
    except Exception as e:  # truncated zips, bad pickles, I/O errors: torch raises many kinds
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        why = f"{type(e).__name__}: {lines[0].split('. ')[0] if lines else ''}"
        raise RunDirError(f"{path} cannot be loaded ({why[:160]}); the run's results are not usable: "
                          "train it again with its command and --replace") from None
