"""What a run shows while it trains: a tqdm bar on a terminal, one plain line per epoch otherwise."""

from __future__ import annotations

import sys


class Progress:
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
