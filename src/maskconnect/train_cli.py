"""``maskconnect train``, ``evaluate`` and ``prepare-data``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import RunDirError


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def register(sub) -> None:
    from .recipes import RECIPES

    p = sub.add_parser(
        "train", help="train and evaluate one model (resumable); writes a run directory",
        description="Train one model. Re-running the same command resumes from the last checkpoint; a complete "
                    "run is a no-op. Files: config.json, history.csv, checkpoint.pt, metrics.json, masks.json, "
                    "pruned.pt (docs/run_format.md). Unset options come from --recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--dataset", required=True, help="digits, cifar10, cifar100, imagenet or synthetic")
    g.add_argument("--arch", required=True, help="{D,w,C} as 'D,w,C'")
    g.add_argument("--connectivity", default="full", help="full, random or learned")
    g.add_argument("--fan-in", dest="fan_in", type=int, metavar="K", help="fan-in K for random/learned")
    g.add_argument("--seed", type=int, default=0, help="seed: weights, Fixed-Random masks, data order, mask draws")
    g.add_argument("--stage-width", dest="stage_width", type=int, help="output width of stage 1 (default: the paper's)")
    g = p.add_argument_group("recipe (defaults from --recipe)")
    g.add_argument("--recipe", default="demo", choices=sorted(RECIPES),
                   help="paper: design.md section 6 (CIFAR; paper-imagenet for ImageNet); demo/smoke: short CPU recipes")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", dest="batch_size", type=int, help="batch per process (global = this x processes)")
    g.add_argument("--lr", type=float, help="LR for --lr-reference-batch images; scaled linearly with the global batch")
    g.add_argument("--lr-reference-batch", dest="lr_reference_batch", type=int,
                   help="the global batch --lr is meant for (default: the recipe's batch)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--milestones", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="epochs at which the LR is divided by 10, e.g. 150,225 (default: recipe fractions of --epochs)")
    g.add_argument("--freeze-epoch", dest="freeze_epoch", type=int,
                   help="epoch after which learned masks are frozen to top-K (default: the first LR drop)")
    g.add_argument("--mask-lr", dest="mask_lr", type=float, help="LR of the real-valued masks (default: the weight LR and schedule)")
    g.add_argument("--mask-init", dest="mask_init", type=float, help="initial value of the real-valued masks (default 0.5)")
    g.add_argument("--mask-rule", dest="mask_rule", metavar="NAME",
                   help="how the real-valued masks are updated (default: the recipe's, projected for every recipe): projected (rows projected onto "
                        "{m in [0,1]^C, sum m = K}), centred (row-centred gradient, then clip) or clip (the "
                        "literal reading: clip to [0,1]); see docs/mask_rules.md")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig field (JSON values), repeatable")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--data-dir", dest="data_dir", help="dataset folder (default ./data; ImageNet: ./data/imagenet)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, help="DataLoader workers (ImageNet)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (any device; on a CPU the masked mixing measured slower compiled: bench/README.md)")
    g.add_argument("--amp", type=_bool, nargs="?", const=True, metavar="BOOL",
                   help="bf16 autocast (default: on for CUDA, off for the CPU; given, it applies on either)")
    g.add_argument("--channels-last", dest="channels_last", type=_bool, nargs="?", const=True, metavar="BOOL",
                   help="channels_last memory format (default: on for CUDA, off for the CPU; given, it applies on either)")
    g.add_argument("--experiment", help="MLflow experiment (default maskconnect/<dataset>)")
    g.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db)")
    g.add_argument("--no-track", dest="track", action="store_false", default=None, help="do not log to MLflow")
    g.add_argument("--progress", choices=["auto", "bar", "lines", "none"], help="progress display (auto: bar on a terminal)")
    g.add_argument("--replace", action="store_true",
                   help="if --out holds a different run, or a run whose files cannot be loaded, move it aside (never "
                        "deleted) and train afresh; a readable run of this config is resumed (or complete) as without it")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a finished run's model and its pruned model",
                       description="Evaluate a run directory's final model (frozen masks) and pruned model on the "
                                   "test set; writes eval.json (top-1/top-5 of both, params, FLOPs).")
    p.add_argument("--run", required=True, help="run directory (holding metrics.json and checkpoint.pt)")
    p.add_argument("--out", help="output JSON (default RUN/eval.json)")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("prepare-data", help="download and verify a dataset (no-op for digits and synthetic)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--marker", help="file written (JSON) once the data is ready, for pipelines")
    p.set_defaults(func=_cmd_prepare)


def _cmd_train(args) -> int:
    from .track_cli import one_line_warnings
    from .train import config_from_args, train

    with one_line_warnings("train"):
        metrics = train(config_from_args(args), replace=args.replace)
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "best_top1", "params_train", "params_test", "flops")}))
    return 0


def evaluate_run(run: Path, *, data_dir: str | None = None, device: str = "auto") -> dict:
    import torch

    from .connectivity import count_weights
    from .data import build_data
    from .describe import count_flops
    from .engine import Precision, evaluate, resolve_device
    from .models import build_model
    from .pruning import load_pruned
    from .train import CHECKPOINT, TrainConfig

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
        result["branches_per_module"] = compact.branches
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


def _cmd_evaluate(args) -> int:
    from .io import atomic_write_json, check_output_file

    run = Path(args.run)
    if not run.is_dir():
        raise RunDirError(f"--run {run} is not a run directory")
    # checked before evaluating: a path that cannot be written fails in seconds, not after the evaluation
    out = check_output_file(args.out if args.out is not None else run / "eval.json", "--out")
    result = evaluate_run(run, data_dir=args.data_dir, device=args.device)
    atomic_write_json(out, result)
    print(json.dumps(result))
    return 0


def _cmd_prepare(args) -> int:
    import time

    from .data import build_data, dataset_info
    from .io import atomic_write_json

    info = dataset_info(args.dataset)
    if info.name not in ("digits", "synthetic"):
        data = build_data(info.name, data_dir=args.data_dir, batch_size=128, device="cpu", download=info.name != "imagenet")
        sizes = {"train": data.train_size, "test": data.test_size}
    else:
        sizes = {}
    if args.marker:
        atomic_write_json(args.marker, {"dataset": info.name, "data_dir": args.data_dir, **sizes,
                                        "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"{info.name}: ready {sizes}")
    return 0
