"""``maskconnect train``: train and evaluate one model (resumable); writes a run directory."""

from __future__ import annotations

import argparse
import json

from ..training.options import add_train_arguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it says something: not for unset options (they come from the
    recipe, and their help says so) nor where the help already names the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train and evaluate one model (resumable); writes a run directory",
        description="Train one model. Re-running the same command resumes from the last checkpoint; a complete "
                    "run is a no-op. Files: config.json, history.csv, checkpoint.pt, metrics.json, masks.json, "
                    "pruned.pt (docs/run_format.md). Unset options come from --recipe.",
        formatter_class=_HelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from ..training.config import config_from_args
    from ..training.loop import train
    from .messages import one_line_warnings

    with one_line_warnings("train"):
        metrics = train(config_from_args(args), replace=args.replace)
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("top1", "top5", "best_top1", "params_train", "params_test", "flops")}))
    return 0
