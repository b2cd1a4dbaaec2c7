"""The command-line spelling of a :class:`~.config.TrainConfig`: the options of ``maskconnect train``.

Two readers: the ``train`` subcommand (:mod:`maskconnect.cli.train`), and the grid loader, which
checks a grid's ``train:`` overrides as ``maskconnect train`` reads them before any job starts.
Torch-free.
"""

from __future__ import annotations

import argparse


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _epochs(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs separated by commas, e.g. 150,225, got {v!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``maskconnect train``, the fields of :class:`TrainConfig` that
    :func:`~.config.config_from_args` reads."""
    from ..defaults import DEFAULT_MASK_INIT
    from .schedule import RECIPES

    g = p.add_argument_group("model")
    g.add_argument("--dataset", required=True, help="digits, cifar10, cifar100, imagenet or synthetic")
    g.add_argument("--arch", required=True, help="a ResNeXt {D,w,C} as 'D,w,C' (e.g. 29,8,8) or a ResNet as 'resnetD' "
                                                  "(e.g. resnet38, resnet50)")
    # No option has a default of its own: an unset one is None and TrainConfig's default applies, so a
    # field given both as an option and by --set is told apart from a default (config_from_args refuses it)
    g.add_argument("--connectivity", help="full (ResNeXt) or prev (ResNet): the network's own wiring, the default; "
                                          "random or learned: masks of fan-in K")
    g.add_argument("--fan-in", dest="fan_in", type=int, metavar="K",
                   help="fan-in K for random/learned: 1..C for a ResNeXt, 1..L-1 earlier blocks for a ResNet of L blocks")
    g.add_argument("--seed", type=int, help="seed: weights, Fixed-Random masks, data order, mask draws (default 0)")
    g.add_argument("--stage-width", dest="stage_width", type=int, help="output width of stage 1 (default: the paper's)")
    g = p.add_argument_group("recipe (defaults from --recipe)")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="paper: docs/design.md section 6 (CIFAR; paper-imagenet for ImageNet); demo (the default): the demo "
                        "grid's digits schedule (section 9); smoke: tests. Their values: maskconnect/recipes.yaml")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", dest="batch_size", type=int, help="batch per process (global = this x processes)")
    g.add_argument("--lr", type=float, help="LR for --lr-reference-batch images; scaled linearly with the global batch")
    g.add_argument("--lr-reference-batch", dest="lr_reference_batch", type=int,
                   help="the global batch --lr is meant for (default: the recipe's batch)")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", dest="weight_decay", type=float)
    g.add_argument("--milestones", type=_epochs,
                   help="epochs at which the LR is divided by 10, e.g. 150,225 (default: recipe fractions of --epochs)")
    g.add_argument("--freeze-epoch", dest="freeze_epoch", type=int,
                   help="epoch after which learned masks are frozen to top-K (default: the first LR drop plus the recipe's settle_epochs)")
    mask_lrs = ", ".join(f"{name} {'the weight LR' if r['mask_lr'] is None else r['mask_lr']}" for name, r in RECIPES.items())
    g.add_argument("--mask-lr", dest="mask_lr", type=float, help="LR of the real-valued masks, following the weight LR's drops (default: the recipe's: "
                        f"{mask_lrs})")
    g.add_argument("--mask-init", dest="mask_init", type=float, help=f"initial value of the real-valued masks (default {DEFAULT_MASK_INIT})")
    g.add_argument("--mask-rule", dest="mask_rule", metavar="NAME",
                   help="how the real-valued masks are updated (default: the recipe's, projected for every recipe): projected (rows projected onto "
                        "{m in [0,1]^C, sum m = K}), centred (row-centred gradient, then clip) or clip (the "
                        "literal reading: clip to [0,1]); see docs/mask_rules.md")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other TrainConfig field (JSON values), repeatable")
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--data-dir", dest="data_dir", help="dataset folder (default ./data; ImageNet: ./data/imagenet)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
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
