"""Result tables: ours (mean ± 95% t interval over seeds) beside the paper's "best (mean ± std)".

One table per paper table or figure (ResNeXt: CIFAR-100 Table 2, CIFAR-10 poster table, ImageNet Table 3,
Fig. 3 K-sweep; ResNet: CIFAR-100 Table 1, Fig. 2 K-sweep, ImageNet ResNet-50) and one generic table per
dataset for the configurations no paper table shows (e.g. the ``digits`` demos). Each is written three ways: booktabs LaTeX (a fragment to ``\\input``), Markdown and CSV.
The CSV holds the numbers (empty where undefined); the LaTeX and Markdown hold formatted text in which
an undefined quantity is a dash or "n=1", never "nan".

Rows are configurations (dataset, model, connectivity, K); statistics are over seeds of the final
test accuracy (``top1`` in metrics.json). "Best" is the best seed, as the paper's "best".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..experiments import run_id
from ..io import atomic_write_text
from ..specs import FAMILIES, baseline_of, family_of
from .paper import CONNECTIVITY_NAMES, model_label, normalize_model, paper_configs, paper_stats
from .runs import KEY, Provenance, code_provenance
from .stats import Interval, t_interval, welch

GROUP = ["dataset", "arch", "connectivity", "fan_in"]
CONN_ORDER = {"full": 0, "prev": 0, "random": 1, "learned": 2}
METRIC_NAMES = {"top1": "Top-1", "top5": "Top-5"}
DASH = "—"


@dataclass(frozen=True)
class TableSpec:
    """Which runs a table shows and which paper numbers sit beside them."""

    name: str
    title: str
    dataset: str
    source: str | None = None  # a `source` of reference_results.csv; None: no paper columns
    metrics: tuple[str, ...] = ("top1",)
    models: frozenset[str] | None = None  # None: the models of `source`, or all (generic table)
    paper_rows_only: bool = False  # only the (model, connectivity, K) the source reports (a model in two sources)
    paper_dataset: str | None = None  # the paper's numbers of another dataset, for shape (the digits demos)

    @property
    def reference_dataset(self) -> str:
        return self.paper_dataset or self.dataset

    def model_set(self) -> frozenset[str] | None:
        if self.models is not None or self.source is None:
            return self.models
        cfg = paper_configs(self.source)
        return frozenset(cfg.loc[cfg["dataset"] == self.reference_dataset, "model"])

    def paper_rows(self) -> frozenset[tuple[str, str, int]]:
        """(model, connectivity, K) of the rows the source reports on its dataset."""
        cfg = paper_configs(self.source)
        cfg = cfg[cfg["dataset"] == self.reference_dataset]
        return frozenset((m, c, int(k)) for m, c, k in zip(cfg["model"], cfg["connectivity"], cfg["fan_in"]))

    def selects(self, df: pd.DataFrame) -> pd.Series:
        """Which rows of ``df`` (columns dataset, arch, connectivity, fan_in) belong in this table."""
        keep = df["dataset"] == self.dataset
        models = self.model_set()
        if models is not None:
            keep &= df["arch"].isin(models)
        if self.paper_rows_only:
            rows = self.paper_rows()
            keep &= pd.Series([(a, c, int(k)) in rows for a, c, k in zip(df["arch"], df["connectivity"], df["fan_in"])],
                              index=df.index, dtype=bool)
        return keep


PAPER_TABLES = (
    TableSpec("table2_cifar100", "CIFAR-100, ResNeXt (ECCV 2018 Table 2)", "cifar100", "eccv-table2"),
    TableSpec("table_cifar10", "CIFAR-10, ResNeXt (arXiv:1709.09582 poster)", "cifar10", "v1-poster-cifar10"),
    TableSpec("table3_imagenet", "ImageNet, single-crop validation (ECCV 2018 Table 3)", "imagenet",
              "eccv-table3", metrics=("top1", "top5")),
    TableSpec("fig3_ksweep_cifar100", "CIFAR-100, effect of fan-in K, ResNeXt {20,4,8} (ECCV 2018 Fig. 3)",
              "cifar100", "eccv-fig3"),
    TableSpec("table1_resnet_cifar100", "CIFAR-100, ResNet, learned module connectivity (ECCV 2018 Table 1)",
              "cifar100", "eccv-table1", paper_rows_only=True),
    TableSpec("fig2_ksweep_resnet38", "CIFAR-100, effect of fan-in K, learned ResNet-38 (ECCV 2018 Fig. 2)",
              "cifar100", "eccv-fig2", paper_rows_only=True),
    TableSpec("resnet50_imagenet", "ImageNet, ResNet-50, single-crop validation (ECCV 2018 text)", "imagenet",
              "eccv-text", paper_rows_only=True),
    # the embedded data in Table 1's shape, the paper's CIFAR-100 numbers beside it for shape, not comparison
    TableSpec("table1_shape_digits", "digits, ResNet-38 in the shape of ECCV 2018 Table 1 (paper: CIFAR-100)",
              "digits", "eccv-table1", models=frozenset({"resnet38"}), paper_rows_only=True, paper_dataset="cifar100"),
)


@dataclass
class Table:
    """A table ready to write: numbers (``data``), formatted cells, which cells are bold, notes."""

    spec: TableSpec
    data: pd.DataFrame  # numeric, one row per configuration: the CSV
    cells: pd.DataFrame  # formatted text (Markdown spelling), same rows
    bold: pd.DataFrame  # bool, same shape as cells
    blocks: list  # model of each row: a rule separates blocks in LaTeX
    notes: list[str] = field(default_factory=list)
    code: Provenance | None = None  # which code trained the table's runs (its last note says it)


# ---- numbers ----------------------------------------------------------------------------------------

def model_order(arch) -> tuple:
    """Sort key of a model: the family (in registry order), then depth, width and cardinality."""
    try:
        fam = family_of(normalize_model(arch))
    except ConfigError:
        return (len(FAMILIES), 0, 0, 0)
    f = fam.parse(normalize_model(arch))
    return (list(FAMILIES).index(fam.name), f["depth"], f["width"], f["cardinality"])


def _baseline(arch) -> tuple[str, int] | None:
    try:
        return baseline_of(normalize_model(arch))
    except ConfigError:
        return None


def _sort_key(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(_m=df["arch"].map(model_order), _c=df["connectivity"].map(lambda c: CONN_ORDER.get(c, 9)))


SUMMARY_METRICS = ("top1", "top5", "wall_time_s")


def interval(row, metric: str = "top1") -> Interval | None:
    """A summary row's seed statistics of ``metric`` as an :class:`~.stats.Interval` (None: no run has it)."""
    n = row.get(f"{metric}_n")
    if n is None or pd.isna(n) or int(n) == 0:
        return None
    val = lambda c: None if pd.isna(row.get(c)) else float(row.get(c))  # noqa: E731
    return Interval(mean=float(row[f"{metric}_mean"]), half_width=val(f"{metric}_ci95"), std=val(f"{metric}_std"),
                    n=int(n), best=float(row[f"{metric}_best"]))


def summarize(runs: pd.DataFrame, metrics=SUMMARY_METRICS) -> pd.DataFrame:
    """The one summary: one row per configuration (dataset, arch, connectivity, fan_in) of the runs
    table with its seed statistics (the only place a t-interval is computed) and, for Learned rows, Welch
    tests vs the same model's baseline wiring (Fixed-Full for a ResNeXt, Fixed-Prev for a ResNet) and vs
    Fixed-Random of the same model and K. The tables, figures, claims, DVC metrics and K-effect CSVs are
    all read from it. Undefined numbers are NaN here (empty in CSV); the reasons are in the *_reason
    columns."""
    cols = [*GROUP, "n", "seeds", "epochs"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_ci95", f"{m}_std", f"{m}_best", f"{m}_n"]
    cols += ["params_train_M", "params_test_M", "flops", "diff_vs_baseline", "p_vs_baseline", "p_vs_baseline_reason",
             "diff_vs_random", "p_vs_random", "p_vs_random_reason"]
    if runs is None or len(runs) == 0:
        return pd.DataFrame(columns=cols)
    groups = {k: g for k, g in runs.groupby(GROUP, sort=False)}
    seeds = {}  # (configuration, metric) -> its Interval, None where no run has the metric
    for key, g in groups.items():
        for m in metrics:
            vals = g[m].dropna() if m in g else pd.Series(dtype=float)
            seeds[key, m] = t_interval(vals) if len(vals) else None
    rows = []
    for (dataset, arch, conn, k), g in groups.items():
        row = {"dataset": dataset, "arch": arch, "connectivity": conn, "fan_in": int(k), "n": len(g),
               "seeds": ",".join(str(s) for s in sorted(g["seed"])),
               "epochs": ",".join(str(int(e)) for e in sorted(g["epochs"].dropna().unique()))}
        for m in metrics:
            iv = seeds[(dataset, arch, conn, k), m]
            if iv is not None:
                row.update({f"{m}_mean": iv.mean, f"{m}_ci95": iv.half_width, f"{m}_std": iv.std,
                            f"{m}_best": iv.best, f"{m}_n": iv.n})
            else:
                row[f"{m}_n"] = 0
        row["params_train_M"] = g["params_train"].mean() / 1e6
        row["params_test_M"] = g["params_test"].mean() / 1e6
        row["flops"] = g["flops"].mean() if "flops" in g else float("nan")
        if conn == "learned":
            base = _baseline(arch)
            refs = {"baseline": (dataset, arch, *base) if base else None, "random": (dataset, arch, "random", int(k))}
            for name, ref in refs.items():
                other = groups.get(ref)
                if other is None:
                    which = CONNECTIVITY_NAMES[ref[2] if ref else "full"] if name == "baseline" else CONNECTIVITY_NAMES[name]
                    row[f"p_vs_{name}_reason"] = f"no {which} runs"
                    continue
                w = welch(seeds[(dataset, arch, conn, k), "top1"], seeds[ref, "top1"])
                row.update({f"diff_vs_{name}": w.diff, f"p_vs_{name}": w.p, f"p_vs_{name}_reason": w.reason})
        rows.append(row)
    df = pd.DataFrame(rows).reindex(columns=cols)
    df = _sort_key(df).sort_values(["dataset", "_m", "_c", "fan_in"]).drop(columns=["_m", "_c"])
    for c in df.columns:
        if c.endswith("_reason"):
            df[c] = df[c].astype(object).fillna("")
    return df.reset_index(drop=True)


def _add_paper(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Paper columns for each row, from spec.source (NaN where the paper has no number)."""
    df = df.copy()
    for m in spec.metrics:
        stats = [paper_stats(spec.reference_dataset, r.arch, r.connectivity, r.fan_in, m, spec.source)
                 for r in df.itertuples()]
        for s in ("best", "mean", "std", "value"):
            df[f"paper_{m}_{s}"] = [getattr(p, s) if p else None for p in stats]
            df[f"paper_{m}_{s}"] = df[f"paper_{m}_{s}"].astype(float)
        center = [p.center if p else None for p in stats]
        # across datasets a difference means nothing: left undefined
        diff = df[f"{m}_mean"] - pd.Series(center, index=df.index, dtype=float)
        df[f"diff_{m}_vs_paper"] = diff if spec.reference_dataset == spec.dataset else float("nan")
    for which in ("train", "test"):
        vals = [paper_stats(spec.reference_dataset, r.arch, r.connectivity, r.fan_in, f"params_{which}", spec.source)
                for r in df.itertuples()]
        df[f"paper_params_{which}_M"] = pd.Series([v.value / 1e6 if v else None for v in vals],
                                                  index=df.index, dtype=float)
    return df


# ---- formatting -------------------------------------------------------------------------------------

def _ok(x) -> bool:
    return x is not None and not pd.isna(x)


def fmt_num(x, digits: int = 2, signed: bool = False) -> str:
    if not _ok(x):
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_params(x) -> str:
    """Millions with three significant digits: 34.4, 0.843, 0.0123."""
    return f"{x:.3g}" if _ok(x) else DASH


def fmt_mean_ci(mean, half, n, digits: int = 2) -> str:
    """ "75.10 ± 0.35", or "75.10 (n=1)" when one seed gives no interval."""
    if not _ok(mean):
        return DASH
    if not _ok(half):
        return f"{mean:.{digits}f} (n={int(n)})"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_p(p, reason: str = "") -> str:
    if _ok(p):
        return "<0.001" if p < 0.001 else f"{p:.3f}"
    if not reason:
        return DASH
    if reason.startswith("n<2"):
        return "n<2"
    if reason.startswith("no variance"):
        return "no var."
    return DASH


def _paper_cell(row, m: str) -> str:
    best, mean, std, value = (row.get(f"paper_{m}_{s}") for s in ("best", "mean", "std", "value"))
    if _ok(best) and _ok(mean) and _ok(std):
        return f"{best:.2f} ({mean:.2f} ± {std:.2f})"
    if _ok(value):
        return f"{value:.2f}"
    return DASH


def _format(df: pd.DataFrame, spec: TableSpec, with_paper: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    out: dict[str, list] = {"Model": [model_label(a) for a in df["arch"]],
                            "Connectivity": [CONNECTIVITY_NAMES.get(c, c) for c in df["connectivity"]],
                            "K": [str(k) for k in df["fan_in"]]}
    bold_cols = {}
    has_p_params = with_paper and df[["paper_params_train_M", "paper_params_test_M"]].notna().any().any()
    for m in spec.metrics:
        label = METRIC_NAMES.get(m, m)
        main = f"{label} (%) mean ± 95% CI"
        out[main] = [fmt_mean_ci(r[f"{m}_mean"], r[f"{m}_ci95"], r[f"{m}_n"]) for _, r in df.iterrows()]
        bold_cols[main] = m
        pre = "" if len(spec.metrics) == 1 else f"{label} "
        out[f"{pre}Std"] = [fmt_num(x) for x in df[f"{m}_std"]]
        out[f"{pre}Best"] = [fmt_num(x) for x in df[f"{m}_best"]]
    out["n"] = [str(int(n)) for n in df["n"]]
    out["Params train (M)"] = [fmt_params(x) for x in df["params_train_M"]]
    out["Params test (M)"] = [fmt_params(x) for x in df["params_test_M"]]
    if with_paper:
        for m in spec.metrics:
            label = METRIC_NAMES.get(m, m)
            over_runs = df[f"paper_{m}_mean"].notna().any()  # else single values (Fig. 3, ImageNet)
            head = f"Paper {label.lower()}" + (" best (mean ± std)" if over_runs else "")
            if spec.reference_dataset != spec.dataset:
                head += f" ({spec.reference_dataset})"
            out[head] = [_paper_cell(r, m) for _, r in df.iterrows()]
            if spec.reference_dataset == spec.dataset:
                out[f"Δ {label.lower()} vs paper"] = [fmt_num(x, signed=True) for x in df[f"diff_{m}_vs_paper"]]
        if has_p_params:
            out["Paper params train / test (M)"] = [
                DASH if not (_ok(a) or _ok(b)) else f"{fmt_params(a)} / {fmt_params(b)}"
                for a, b in zip(df["paper_params_train_M"], df["paper_params_test_M"])]
    out[_baseline_header(df)] = [fmt_p(p, r) if c == "learned" else DASH
                                 for p, r, c in zip(df["p_vs_baseline"], df["p_vs_baseline_reason"], df["connectivity"])]
    out["p vs Random (same K)"] = [fmt_p(p, r) if c == "learned" else DASH
                                   for p, r, c in zip(df["p_vs_random"], df["p_vs_random_reason"],
                                                      df["connectivity"])]
    cells = pd.DataFrame(out, index=range(len(df)))
    bold = pd.DataFrame(False, index=cells.index, columns=cells.columns)
    models = df["arch"].to_numpy()
    for col, m in bold_cols.items():
        means = df[f"{m}_mean"].to_numpy(dtype=float)
        for model in dict.fromkeys(models):
            idx = np.flatnonzero((models == model) & np.isfinite(means))
            if len(idx) >= 2:  # a block of one row has nothing to be best against
                top = means[idx].max()
                for i in idx[np.isclose(means[idx], top, rtol=0, atol=1e-9)]:
                    bold.loc[i, col] = True
    return cells, bold


def _baseline_header(df: pd.DataFrame) -> str:
    """"p vs Full" (ResNeXt rows), "p vs Prev" (ResNet rows), or "p vs baseline" when a table holds both."""
    names = {CONNECTIVITY_NAMES[b[0]].removeprefix("Fixed-") for b in map(_baseline, df["arch"]) if b}
    return f"p vs {names.pop()}" if len(names) == 1 else "p vs baseline"


def build_table(summary: pd.DataFrame, spec: TableSpec, *, missing: pd.DataFrame | None = None,
                exclude: tuple[TableSpec, ...] = (), runs: pd.DataFrame | None = None) -> Table | None:
    """The table for one spec from :func:`summarize` output, or None if no run belongs in it.

    ``missing`` (columns KEY) are expected runs without a complete run; those of this table are
    listed in its notes, as are the paper's rows that no run reproduces. Rows that a table of
    ``exclude`` shows are left out (the generic table of a dataset shows what no paper table does).
    ``runs`` (the runs summarized) give the table's code provenance: its last note names the commits
    its runs were trained from and warns when they are several or a tree had uncommitted changes.
    """
    def chosen(df: pd.DataFrame) -> pd.DataFrame:
        keep = spec.selects(df)
        for other in exclude:
            keep &= ~other.selects(df)
        return df[keep]

    sel = chosen(summary).reset_index(drop=True)
    notes = []
    if missing is not None and len(missing):
        mm = chosen(missing)
        if len(mm):
            ids = [run_id(*r) for r in mm[KEY].itertuples(index=False, name=None)]
            notes.append(f"Missing runs ({len(ids)} expected, not complete): " + ", ".join(ids) + ".")
    if sel.empty and not notes:
        return None
    with_paper = spec.source is not None
    if with_paper:
        sel = _add_paper(sel, spec)
        cfg = paper_configs(spec.source)
        cfg = cfg[cfg["dataset"] == spec.reference_dataset]
        have = set(zip(sel["arch"], sel["connectivity"], sel["fan_in"]))
        models = spec.model_set()
        absent = [f"{model_label(r.model)} {CONNECTIVITY_NAMES.get(r.connectivity, r.connectivity)} K={r.fan_in}"
                  for r in cfg.itertuples() if (r.model, r.connectivity, int(r.fan_in)) not in have
                  and (models is None or r.model in models)]
        if absent:
            notes.append("Paper rows with no run here: " + ", ".join(absent) + ".")
        # the paper's own caveats for the numbers shown ("read off the bar chart", "Xie et al. ...")
        extra = sorted({piece for r in sel.itertuples() for m in spec.metrics
                        if (p := paper_stats(spec.reference_dataset, r.arch, r.connectivity, r.fan_in, m, spec.source))
                        for piece in p.note.split("; ") if piece and piece != "4 runs"})
        if extra:
            notes.append("Paper notes: " + "; ".join(extra) + ".")
    if sel.empty:
        notes.insert(0, "No complete run for this table yet.")
        cells = pd.DataFrame()
        bold = pd.DataFrame()
    else:
        cells, bold = _format(sel, spec, with_paper)
    notes.append("Ours: final test accuracy over seeds, mean ± half-width of the 95% Student-t interval "
                 "(\"n=1\": one seed, no interval); Best: best seed; bold: best mean of a model. "
                 "p: Welch's two-sided t-test on seeds of a Learned row vs the same model's own wiring (Fixed-Full "
                 "for a ResNeXt, Fixed-Prev for a ResNet) and vs Fixed-Random of the same model and K (\"n<2\": "
                 "fewer than two seeds on a side)."
                 + (" Δ: our mean minus the paper's mean (or its single value)." if with_paper
                    and spec.reference_dataset == spec.dataset else "")
                 + (f" The paper's numbers are {spec.reference_dataset}'s, beside ours for the table's shape: another "
                    "dataset, not a comparison." if spec.reference_dataset != spec.dataset else ""))
    code = None
    if runs is not None and not sel.empty:
        code = code_provenance(chosen(runs))
        warning = code.warning()
        notes.append(f"Code: {code.describe()}." + (f" Warning: this table {warning}." if warning else ""))
    data = sel.rename(columns={"arch": "model"})
    return Table(spec=spec, data=data, cells=cells, bold=bold, blocks=list(sel["arch"]), notes=notes, code=code)


def build_tables(runs: pd.DataFrame, missing: pd.DataFrame | None = None, *,
                 summary: pd.DataFrame | None = None) -> list[Table]:
    """All tables for the runs of one grid: the paper tables they touch, then one generic table per
    dataset for the configurations no paper table covers. ``summary``: summarize(runs), if at hand."""
    if summary is None:
        summary = summarize(runs)
    tables = []
    for spec in PAPER_TABLES:
        t = build_table(summary, spec, missing=missing, runs=runs)
        if t is not None:  # rows, or at least the note listing this table's missing runs
            tables.append(t)
    datasets = list(summary["dataset"])
    if missing is not None:
        datasets += list(missing["dataset"])
    for ds in dict.fromkeys(datasets):
        papers = tuple(p for p in PAPER_TABLES if p.dataset == ds)
        if any(p.paper_dataset is None for p in papers):
            spec = TableSpec(f"table_{ds}_other", f"{ds}: configurations outside the paper's tables", ds)
        else:
            spec = TableSpec(f"table_{ds}", f"{ds} (not a dataset of the paper)", ds)
        t = build_table(summary, spec, missing=missing, exclude=papers, runs=runs)
        if t is not None:
            tables.append(t)
    return tables


# ---- writers ----------------------------------------------------------------------------------------

def markdown_table(cells: pd.DataFrame, bold: pd.DataFrame | None = None) -> str:
    """A GitHub-style pipe table. (pandas' to_markdown needs `tabulate`, which is not a declared
    dependency of the report extra, so the suite writes its own: it is ten lines.)"""
    if cells.empty:
        return ""
    numeric = [c not in ("Model", "Connectivity") for c in cells.columns]

    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in cells.columns) + " |",
             "|" + "|".join("---:" if r else ":---" for r in numeric) + "|"]
    for i in range(len(cells)):
        vals = [esc(v) for v in cells.iloc[i]]
        if bold is not None:
            vals = [f"**{v}**" if bold.iat[i, j] else v for j, v in enumerate(vals)]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "—": "---", "Δ": r"$\Delta$", "<": r"$<$", ">": r"$>$", "−": "$-$"}


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX that compiles with any inputenc (ASCII only)."""
    out = []
    for ch in str(text):
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or ch)
    return "".join(out)


def latex_table(table: Table) -> str:
    """A booktabs tabular (\\toprule/\\midrule/\\bottomrule) via pandas Styler, a fragment to \\input;
    a \\midrule separates model blocks. Needs \\usepackage{booktabs}."""
    header = [f"% {table.spec.title}", "% Generated by `maskconnect report`; needs \\usepackage{booktabs}."]
    header += ["% " + latex_escape(n).replace("\n", " ") for n in table.notes]
    if table.cells.empty:
        return "\n".join(header) + "\n"
    cells = table.cells.map(latex_escape)
    cells.columns = [latex_escape(c) for c in table.cells.columns]
    props = pd.DataFrame(np.where(table.bold.to_numpy(), "textbf: --rwrap;", ""),
                         index=cells.index, columns=cells.columns)
    colfmt = "".join("l" if c in ("Model", "Connectivity") else "r" for c in table.cells.columns)
    styler = cells.style.hide(axis="index").apply(lambda _: props, axis=None)
    body = styler.to_latex(hrules=True, column_format=colfmt).splitlines()
    # Rows sit between the header's \midrule and \bottomrule, one line each, in table order.
    start = body.index("\\midrule") + 1
    end = body.index("\\bottomrule")
    rows = body[start:end]
    merged = []
    for i, line in enumerate(rows):
        if i and table.blocks[i] != table.blocks[i - 1]:
            merged.append("\\midrule")
        merged.append(line)
    return "\n".join(header + body[:start] + merged + body[end:]) + "\n"


def markdown_document(table: Table, level: int = 3) -> str:
    parts = ["#" * level + " " + table.spec.title, ""]
    if not table.cells.empty:
        parts += [markdown_table(table.cells, table.bold)]
    parts += [f"- {n}" for n in table.notes]
    return "\n".join(parts) + "\n"


def write_table(table: Table, out_dir) -> dict[str, Path]:
    """<out_dir>/<name>.tex, .md, .csv (atomic writes). Returns the paths by extension."""
    out_dir = Path(out_dir)
    return {
        "tex": atomic_write_text(out_dir / f"{table.spec.name}.tex", latex_table(table)),
        "md": atomic_write_text(out_dir / f"{table.spec.name}.md", markdown_document(table, level=1)),
        "csv": atomic_write_text(out_dir / f"{table.spec.name}.csv",
                                 table.data.to_csv(index=False, float_format="%.6g")),
    }
