"""Figures: effect of fan-in K (the paper's Fig. 3), a learned connectivity graph (Fig. 4), and
training curves (test accuracy and mask entropy per epoch).

Figures are drawn on ``matplotlib.figure.Figure`` objects and rendered by the Agg (PNG) and PDF
canvases directly, so nothing here touches pyplot's global backend or state; seaborn supplies the
style. Each figure is written as PNG and PDF with atomic writes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..io import atomic_write_bytes
from ..errors import ConfigError
from ..specs import make_spec
from .dynamics import uniform_entropy
from .paper import CONNECTIVITY_NAMES, model_label, paper_stats
from .tables import interval, summarize

LIVE, DEAD = "#1f5fa8", "#c8c8c8"
PALETTE = {"full": "#4d4d4d", "prev": "#4d4d4d", "random": "#d95f02", "learned": "#1b9e77"}


def _style():
    return sns.axes_style("whitegrid")


def save_figure(fig: Figure, out_base) -> list[Path]:
    """<out_base>.png (150 dpi) and <out_base>.pdf; PDF without a creation date, so reruns on the
    same data give the same bytes."""
    out_base = Path(out_base)
    paths = []
    for ext, kw in (("png", {"dpi": 150}), ("pdf", {"metadata": {"CreationDate": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight", **kw)
        paths.append(atomic_write_bytes(out_base.with_name(out_base.name + f".{ext}"), buf.getvalue()))
    return paths


def _stats_by_k(s: pd.DataFrame, metric: str) -> pd.DataFrame:
    """K, mean, interval half-width and n of summary rows ``s`` (one connectivity of one model)."""
    rows = []
    for _, row in s.sort_values("fan_in").iterrows():
        iv = interval(row, metric)
        if iv is not None:
            rows.append({"K": int(row["fan_in"]), "mean": iv.mean, "half": iv.half_width or 0.0, "n": iv.n})
    return pd.DataFrame(rows, columns=["K", "mean", "half", "n"])


# ---- (a) effect of fan-in K -------------------------------------------------------------------------

def plot_fanin(runs: pd.DataFrame, dataset: str, model: str, out_base, metric: str = "top1",
               summary: pd.DataFrame | None = None) -> list[Path]:
    """Accuracy vs fan-in K for Learned (and Fixed-Random) runs of one model: mean with 95% t-interval
    error bars (none for n=1), every seed as a dot, the model's own wiring (Fixed-Full at K = C for a
    ResNeXt, Fixed-Prev for a ResNet) as a horizontal line with its band, and the paper's values (its
    tables, Fig. 3 or Fig. 2) as crosses and a dotted line."""
    g = runs[(runs["dataset"] == dataset) & (runs["arch"] == model)]
    s = summarize(g) if summary is None else summary
    s = s[(s["dataset"] == dataset) & (s["arch"] == model)]
    try:
        spec = make_spec(model, dataset=dataset)
        base, base_k, kmax = spec.connectivity, spec.fan_in, spec.max_fan_in
        title = f"{spec.fam.title} {model_label(model)}" if spec.family == "resnext" else model_label(model)
    except ConfigError:
        base, base_k = "full", int(g["fan_in"].max())
        kmax, title = base_k, model_label(model)
    with _style():
        fig = Figure(figsize=(5.5 if kmax <= 8 else 7.5, 3.6))
        ax = fig.add_subplot()
        for conn in ("learned", "random"):
            gc = g[g["connectivity"] == conn]
            if gc.empty:
                continue
            st = _stats_by_k(s[s["connectivity"] == conn], metric)
            ax.errorbar(st["K"], st["mean"], yerr=st["half"], fmt="o-", color=PALETTE[conn], capsize=3,
                        label=f"{CONNECTIVITY_NAMES[conn]} (ours, mean ± 95% CI)")
            jitter = (np.arange(len(gc)) % 5 - 2) * 0.04
            sns.scatterplot(x=gc["fan_in"].to_numpy() + jitter, y=gc[metric].to_numpy(), ax=ax,
                            color=PALETTE[conn], alpha=0.35, s=14, legend=False)
        fixed = s[s["connectivity"] == base]
        iv = interval(fixed.iloc[0], metric) if len(fixed) else None
        name = f"{CONNECTIVITY_NAMES[base]} K={base_k}"
        if iv is not None:
            ax.axhline(iv.mean, color=PALETTE[base], lw=1.2,
                       label=f"{name} (ours{', n=1' if iv.n == 1 else ', 95% CI band'})")
            if iv.half_width:
                ax.axhspan(iv.low, iv.high, color=PALETTE[base], alpha=0.12, lw=0)
        ks = range(1, kmax + 1)
        paper = [(k, paper_stats(dataset, model, "learned", k, metric)) for k in ks]
        paper = [(k, p.center) for k, p in paper if p is not None and p.center is not None]
        if paper:
            ax.plot(*zip(*paper), "x--", color=PALETTE["learned"], alpha=0.6, ms=7, lw=0.8,
                    label="Learned (paper)")
        pbase = paper_stats(dataset, model, base, base_k, metric)
        if pbase is not None and pbase.center is not None:
            ax.axhline(pbase.center, color=PALETTE[base], ls=":", lw=1.2, label=f"{CONNECTIVITY_NAMES[base]} (paper)")
        ax.set_xticks(list(ks))
        ax.set_xlim(0.5, kmax + 0.5)
        ax.set_xlabel("fan-in K")
        ax.set_ylabel(f"test {metric} accuracy (%)")
        ax.set_title(f"{dataset}, {title}: effect of fan-in K", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        return save_figure(fig, out_base)


# ---- (b) learned connectivity (Fig. 4) --------------------------------------------------------------

def live_branches(masks: list) -> list[list[bool]]:
    """Branches that survive pruning, from the output backwards: the last module's branches all
    live; a branch lives if a live branch of the next module selects it (docs/design.md section 5)."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    C = masks[0].shape[1] if masks else 0
    live = [np.ones(C, dtype=bool)]
    for m in reversed(masks):  # m: rows = branches of module i+1, columns = branches of module i
        live.insert(0, m[live[0]].any(axis=0))
    return [lv.tolist() for lv in live]


def live_blocks(mask: list) -> list[bool]:
    """ResNet blocks that survive pruning, from the output backwards: the last block lives; a block lives
    if a live later block reads it (row j-1 of ``mask`` is block j's choice among blocks 0..j-1)."""
    m = np.asarray(mask, dtype=bool)
    live = [False] * m.shape[0] + [True]
    for b in range(m.shape[0] - 1, -1, -1):
        live[b] = bool(any(m[j - 1, b] and live[j] for j in range(b + 1, m.shape[0] + 1)))
    return live


def load_masks(path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("live") is None:
        data["live"] = live_blocks(data["masks"][0]) if data.get("family") == "resnet" else live_branches(data["masks"])
    return data


def plot_masks(masks, out_base, title: str | None = None) -> list[Path]:
    """Draw the frozen connectivity like the paper's Fig. 4: one row per module (module 1 at the top),
    one node per branch, an edge for each selected connection (mask = 1) between consecutive modules.
    Pruned branches (not live) and the edges into them are grey. ``masks`` is a masks.json path or
    its parsed content."""
    data = load_masks(masks) if isinstance(masks, (str, Path)) else dict(masks)
    if data.get("family") == "resnet":
        return plot_block_masks(data, out_base, title)
    if data.get("live") is None:
        data["live"] = live_branches(data["masks"])
    mlist = [np.asarray(m, dtype=int) for m in data["masks"]]
    live = [np.asarray(lv, dtype=bool) for lv in data["live"]]
    L = len(live)
    C = int(data.get("cardinality") or live[0].size)
    with _style():
        fig = Figure(figsize=(min(14, 1.5 + 0.55 * C), min(18, 1.4 + 0.55 * (L + 1))))
        ax = fig.add_subplot()
        xs = np.arange(C) - (C - 1) / 2

        def y(i):  # module i (0-based) at height -i; the stem sits at +1, the output at -L
            return -float(i)

        for k in range(C):  # stem -> module 1
            ax.plot([0, xs[k]], [1, y(0)], color=LIVE, lw=0.4, alpha=0.3, zorder=1)
            ax.plot([xs[k], 0], [y(L - 1), y(L)], color=LIVE, lw=0.4, alpha=0.3, zorder=1)
        for i, m in enumerate(mlist):  # mask of module i+2: row j = branch of module i+2, col k of i+1
            for j, k in zip(*np.nonzero(m)):
                on = live[i + 1][j]
                ax.plot([xs[k], xs[j]], [y(i), y(i + 1)], color=LIVE if on else DEAD,
                        lw=1.0 if on else 0.7, ls="-" if on else "--", zorder=2 if on else 1)
        for i in range(L):
            ax.scatter(xs, np.full(C, y(i)), s=70, c=[LIVE if a else DEAD for a in live[i]],
                       edgecolors="white", linewidths=0.8, zorder=3)
            ax.text(xs[0] - 0.8, y(i), f"module {i + 1}", ha="right", va="center", fontsize=7)
        for yy, name in ((1, "stem"), (y(L), "output")):
            ax.scatter([0], [yy], s=90, marker="s", c="#333333", zorder=3)
            ax.text(0.4, yy, name, va="center", fontsize=7)
        n_live = int(sum(lv.sum() for lv in live))
        ax.set_title((title + "\n" if title else f"K={data.get('fan_in')}: ")
                     + f"{n_live}/{L * C} branches live (grey: pruned)", fontsize=9)
        ax.set_xlim(xs[0] - 3.2, xs[-1] + 1.2)
        ax.set_axis_off()
        return save_figure(fig, out_base)


def plot_block_masks(data: dict, out_base, title: str | None = None) -> list[Path]:
    """A ResNet's frozen connectivity as a matrix: one row per block (block 2 at the top), one column per
    earlier block it may read, a filled cell for each block it reads (the previous block on the
    diagonal: the standard ResNet is the diagonal alone). Rows of pruned blocks, and the cells they
    read, are grey."""
    m = np.asarray(data["masks"][0], dtype=int)
    live = np.asarray(data.get("live") or live_blocks(m), dtype=bool)
    n = m.shape[0] + 1
    with _style():
        fig = Figure(figsize=(min(12, 1.5 + 0.32 * n), min(12, 1.2 + 0.32 * n)))
        ax = fig.add_subplot()
        ax.grid(False)
        for j in range(1, n):
            for k in range(j):
                on, alive = bool(m[j - 1, k]), bool(live[j])
                face = (LIVE if alive else DEAD) if on else "white"
                ax.add_patch(Rectangle((k, j - 1), 1, 1, facecolor=face, edgecolor="#dddddd", lw=0.5))
        ax.set_xlim(0, n - 1)
        ax.set_ylim(n - 1, 0)
        ax.set_xticks(np.arange(n - 1) + 0.5, [str(k + 1) for k in range(n - 1)], fontsize=6)
        ax.set_yticks(np.arange(n - 1) + 0.5, [str(j + 1) for j in range(1, n)], fontsize=6)
        ax.set_xlabel("earlier block read")
        ax.set_ylabel("block")
        ax.set_aspect("equal")
        ax.set_title((title + "\n" if title else f"K={data.get('fan_in')}: ")
                     + f"{int(live.sum())}/{n} blocks live (grey: pruned)", fontsize=9)
        return save_figure(fig, out_base)


# ---- (c) training curves ----------------------------------------------------------------------------

def _histories(runs: pd.DataFrame) -> pd.DataFrame:
    frames = []
    for r in runs.itertuples():
        p = Path(r.path) / "history.csv"
        if not p.is_file():
            continue
        try:
            h = pd.read_csv(p)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
        if h.empty or "epoch" not in h:
            continue
        h = h.assign(config=f"{CONNECTIVITY_NAMES.get(r.connectivity, r.connectivity)} K={r.fan_in}",
                     connectivity=r.connectivity, seed=r.seed, dataset=r.dataset, arch=r.arch, fan_in=int(r.fan_in))
        frames.append(h)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_history(runs: pd.DataFrame, out_base, title: str = "") -> list[Path]:
    """Test top-1 accuracy (top panel) and mean mask entropy (bottom panel, Learned runs) per epoch,
    one line per run, coloured by configuration; a dotted line marks where masks were frozen (first
    fine-tuning epoch). Returns [] when no run has a readable history.csv."""
    h = _histories(runs)
    if h.empty:
        return []
    for col in ("test_top1", "mask_entropy"):
        h[col] = pd.to_numeric(h.get(col), errors="coerce")
    with _style():
        fig = Figure(figsize=(6.5, 5.2))
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        order = list(dict.fromkeys(h.sort_values(["connectivity", "config"])["config"]))
        palette = dict(zip(order, sns.color_palette("tab10", len(order))))
        sns.lineplot(data=h, x="epoch", y="test_top1", hue="config", units="seed", estimator=None,
                     hue_order=order, palette=palette, lw=0.9, ax=ax1)
        ax1.set_ylabel("test top-1 (%)")
        ent = h.dropna(subset=["mask_entropy"])
        if len(ent):
            sns.lineplot(data=ent, x="epoch", y="mask_entropy", hue="config", units="seed", estimator=None,
                         hue_order=[c for c in order if c in set(ent["config"])], palette=palette, lw=0.9,
                         ax=ax2, legend=False)
        else:
            ax2.text(0.5, 0.5, "no learned masks in these runs", ha="center", va="center",
                     transform=ax2.transAxes, fontsize=8)
        ax2.set_ylabel("mask entropy (nats)")
        ax2.set_xlabel("epoch")
        if "phase" in h:
            frozen = h[h["phase"] == "finetune"].groupby(["config", "seed"])["epoch"].min()
            if len(frozen):
                for ax in (ax1, ax2):
                    ax.axvline(float(frozen.median()) - 0.5, color="#555555", ls=":", lw=1)
                ax2.text(float(frozen.median()), ax2.get_ylim()[1], " masks frozen", va="top", fontsize=7)
        if ax1.get_legend() is not None:
            ax1.legend(fontsize=7, title=None)
        if title:
            ax1.set_title(title, fontsize=10)
        return save_figure(fig, out_base)


# ---- (d) mask dynamics ------------------------------------------------------------------------------

MASK_PANELS = (("mask_entropy", "entropy / uniform row's"), ("mask_changed", "rows whose top-K changed"),
               ("mask_at_1", "fraction of entries at 1.0"), ("mask_at_0", "fraction of entries at 0.0"),
               ("mask_margin", "margin K-th - (K+1)-th"), ("mask_ties", "rows tied at the K-th place"))


def plot_mask_dynamics(runs: pd.DataFrame, out_base, title: str = "") -> list[Path]:
    """What the real-valued masks did, per epoch, one line per Learned run (colour: K): normalised row
    entropy, rows whose top-K set changed, the fractions of entries at each clip bound, the mean gap
    between the K-th and (K+1)-th value, and rows tied at the K-th place (saturation). The dotted line
    marks the freezing. Returns [] when no Learned run has the mask columns."""
    h = _histories(runs[runs["connectivity"] == "learned"])
    if h.empty or not all(c in h for c in (p for p, _ in MASK_PANELS)):
        return []
    for col, _ in MASK_PANELS:
        h[col] = pd.to_numeric(h[col], errors="coerce")
    uniform = {(r.dataset, r.arch, int(r.fan_in)): uniform_entropy(r.dataset, r.arch, int(r.fan_in), r.cardinality)
               for r in runs.itertuples()}
    h["mask_entropy"] = h["mask_entropy"] / [uniform.get(key, np.nan) for key in zip(h["dataset"], h["arch"], h["fan_in"])]
    h = h.dropna(subset=["mask_entropy"])
    if h.empty:
        return []
    with _style():
        fig = Figure(figsize=(8.5, 6.4))
        axes = fig.subplots(3, 2, sharex=True).ravel()
        order = list(dict.fromkeys(h.sort_values("config")["config"]))
        palette = dict(zip(order, sns.color_palette("viridis", len(order))))
        for i, (ax, (col, label)) in enumerate(zip(axes, MASK_PANELS)):
            sns.lineplot(data=h, x="epoch", y=col, hue="config", units="seed", estimator=None, hue_order=order,
                         palette=palette, lw=0.9, ax=ax, legend=i == 0)
            ax.set_ylabel(label, fontsize=8)
            frozen = h[h["phase"] == "finetune"].groupby(["config", "seed"])["epoch"].min() if "phase" in h else []
            if len(frozen):
                ax.axvline(float(frozen.median()) - 0.5, color="#555555", ls=":", lw=1)
        if axes[0].get_legend() is not None:
            axes[0].legend(fontsize=7, title=None)
        if title:
            fig.suptitle(title, fontsize=10)
        return save_figure(fig, out_base)
