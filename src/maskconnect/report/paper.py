"""The paper's reported numbers, as shipped in ``maskconnect/paper/reference_results.csv``.

One row per number (source table or figure, dataset, family, model "D,w,C" or "resnetD", connectivity,
fan-in K, metric, stat). This module only reads that file; it never restates a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import pandas as pd

from ..errors import ConfigError
from ..specs import arch_label, canonical_arch, family_of

# Which source wins when the same (dataset, model, connectivity, K, metric) appears in several places:
# the tables (4 runs, best/mean/std, or Table 1's single values) before the values read off a bar chart.
SOURCE_PRIORITY = ("eccv-table2", "v1-poster-cifar10", "eccv-table3", "eccv-table1", "eccv-text", "eccv-fig3",
                   "eccv-fig2")

CONNECTIVITY_NAMES = {"full": "Fixed-Full", "prev": "Fixed-Prev", "random": "Fixed-Random", "learned": "Learned"}


def normalize_model(model) -> str:
    """"29,8,8", "29-8-8", "{29,8,8}", (29, 8, 8) -> "29,8,8"; "ResNet-38" -> "resnet38"
    (:func:`maskconnect.specs.canonical_arch`); any other name passes through, stripped."""
    try:
        return canonical_arch(model)
    except ConfigError:
        pass
    if isinstance(model, (tuple, list)):
        return ",".join(str(int(x)) for x in model)
    return str(model).strip().strip("{}").replace(" ", "")


def model_parts(model) -> tuple[int, int, int] | None:
    """(D, w, C) of a ResNeXt "D,w,C", None for a ResNet or another name."""
    try:
        fam = family_of(normalize_model(model))
    except ConfigError:
        return None
    if fam.name != "resnext":
        return None
    f = fam.parse(normalize_model(model))
    return f["depth"], f["width"], f["cardinality"]


def model_label(model) -> str:
    """The paper's notation: {29,8,8}, ResNet-38."""
    try:
        return arch_label(model)
    except ConfigError:
        return normalize_model(model)


@lru_cache(maxsize=1)
def _reference() -> pd.DataFrame:
    path = resources.files("maskconnect") / "paper" / "reference_results.csv"
    with path.open("r", encoding="utf-8") as f:
        df = pd.read_csv(f, dtype={"model": str, "fan_in": str, "note": str})
    df["note"] = df["note"].fillna("")
    # fan_in is "any" for the training-time overheads; numeric elsewhere.
    df["fan_in"] = pd.to_numeric(df["fan_in"], errors="coerce").astype("Int64")
    df["model"] = df["model"].map(normalize_model)
    return df


def load_reference() -> pd.DataFrame:
    """All of the paper's numbers (a copy; callers may modify it)."""
    return _reference().copy()


@dataclass(frozen=True)
class PaperStats:
    """The paper's numbers for one (dataset, model, connectivity, K, metric)."""

    source: str
    best: float | None = None
    mean: float | None = None
    std: float | None = None
    value: float | None = None  # single number (ImageNet, Fig. 3, parameter counts)
    note: str = ""

    @property
    def center(self) -> float | None:
        """The number ours is compared with: the mean over runs, else the single value."""
        return self.mean if self.mean is not None else self.value

    def label(self, digits: int = 2) -> str:
        """ "73.52 (73.37 ± 0.13)" as in the paper's tables, or the single value."""
        if self.best is not None and self.mean is not None and self.std is not None:
            return f"{self.best:.{digits}f} ({self.mean:.{digits}f} ± {self.std:.{digits}f})"
        if self.value is not None:
            return f"{self.value:.{digits}f}"
        if self.mean is not None:
            return f"{self.mean:.{digits}f}"
        return ""


def paper_stats(dataset: str, model, connectivity: str, fan_in: int, metric: str = "top1",
                source: str | None = None) -> PaperStats | None:
    """The paper's best/mean/std (or single value) for one configuration; None if it reports none.

    ``model`` is "D,w,C" (any spelling accepted by :func:`normalize_model`). ``source`` restricts the
    look-up to one table or figure; otherwise the tables win over Fig. 3 (see SOURCE_PRIORITY).
    """
    df = _reference()
    sel = df[(df["dataset"] == dataset) & (df["model"] == normalize_model(model))
             & (df["connectivity"] == connectivity) & (df["fan_in"] == int(fan_in))
             & (df["metric"] == metric)]
    if source is not None:
        sel = sel[sel["source"] == source]
    if sel.empty:
        return None
    sources = sorted(sel["source"].unique(), key=lambda s: SOURCE_PRIORITY.index(s)
                     if s in SOURCE_PRIORITY else len(SOURCE_PRIORITY))
    chosen = sel[sel["source"] == sources[0]]
    stats = {row.stat: float(row.value) for row in chosen.itertuples() if not math.isnan(row.value)}
    notes = "; ".join(dict.fromkeys(n for n in chosen["note"] if n))
    return PaperStats(source=sources[0], best=stats.get("best"), mean=stats.get("mean"),
                      std=stats.get("std"), value=stats.get("value"), note=notes)


def paper_configs(source: str) -> pd.DataFrame:
    """The (dataset, model, connectivity, fan_in) rows that one table or figure reports."""
    df = _reference()
    sel = df[df["source"] == source]
    return (sel[["dataset", "model", "connectivity", "fan_in"]].drop_duplicates()
            .reset_index(drop=True))


def paper_stage_width(model) -> int | None:
    """The output width of stage 1 in the paper's network (64/256 for the CIFAR ResNeXts, 256 for ImageNet's,
    16 for the CIFAR ResNets; ``maskconnect.specs``); None for a model the paper does not have."""
    try:
        return family_of(normalize_model(model)).paper_stage_width(normalize_model(model))
    except ConfigError:
        return None


def paper_datasets() -> set[str]:
    """Datasets the paper reports results on (cifar10, cifar100, imagenet)."""
    return set(_reference()["dataset"].unique())
