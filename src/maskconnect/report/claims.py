"""The paper's claims, each tested on our runs with an interval and a test, and a verdict.

Claims (Ahmed & Torresani, ECCV 2018, sections 4.1-4.2):
  1. Learned connectivity beats Fixed-Full (ResNeXt) at the same capacity.
  2. Fixed-Random connectivity is the worst.
  3. The best fan-in K is intermediate (neither 1 nor C).
  4. K=1 prunes many parameters at about equal accuracy.

Verdicts: "reproduced" (the effect in the claimed direction, p < 0.05), "not reproduced" (the
opposite effect with p < 0.05, or for claim 4 too little pruning), "inconclusive" (no runs, fewer than
two seeds on a side, no variance, or p >= 0.05). A verdict on a dataset the paper does not use (the
``digits`` demo) says so: it exercises the pipeline and is not evidence about the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..experiments import run_id
from .dynamics import dynamics_markdown
from .paper import CONNECTIVITY_NAMES, model_label, model_parts, paper_datasets, paper_stage_width, paper_stats
from .runs import KEY
from .stats import ALPHA, WelchResult, t_interval, welch
from .tables import markdown_document

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

# Claim 4 thresholds (ours; the paper says "many" and "about equal"). Its own numbers: K=1 removes
# 24% ({29,8,8}) and 40% ({29,64,8}) of the parameters at +0.39 and +0.03 points.
PRUNE_MIN = 0.10  # at least 10% of the parameters removed
NONINFERIORITY_MARGIN = 0.5  # lower end of the 95% CI of (K=1 - Fixed-Full) above -0.5 points
CIFAR_EPOCHS = 300  # the ResNeXt CIFAR protocol (docs/design.md section 6)

CLAIMS = {
    1: "Learned connectivity beats Fixed-Full (ResNeXt) at the same capacity",
    2: "Fixed-Random connectivity is the worst",
    3: "The best fan-in K is intermediate (1 < K < C)",
    4: "K=1 prunes many parameters at about equal accuracy",
}


@dataclass(frozen=True)
class Finding:
    """One claim tested on one model of one dataset."""

    claim: int
    model: str
    ours: str
    test: str
    paper: str
    verdict: str
    why: str


# ---- helpers ----------------------------------------------------------------------------------------

def _vals(g: pd.DataFrame, conn: str, k: int | None = None) -> pd.Series:
    sel = g[g["connectivity"] == conn]
    if k is not None:
        sel = sel[sel["fan_in"] == k]
    return sel["top1"].dropna()


def _iv(vals) -> str:
    if len(vals) == 0:
        return "no runs"
    iv = t_interval(vals)
    if iv.half_width is None:
        return f"{iv.mean:.2f} (n=1)"
    return f"{iv.mean:.2f} ± {iv.half_width:.2f} (n={iv.n})"


def _test(w: WelchResult) -> str:
    if w.diff is None:
        return "no test: a side has no runs"
    if not w.ok:
        return f"Δ={w.diff:+.2f}; no test: {w.reason}"
    p = "<0.001" if w.p < 0.001 else f"{w.p:.3f}"
    return f"Δ={w.diff:+.2f} [{w.ci_low:+.2f}, {w.ci_high:+.2f}], Welch t={w.t:.2f}, p={p}"


def _directional(w: WelchResult) -> tuple[str, str]:
    """Verdict for "a > b" from Welch's test of a - b."""
    if w.diff is None:
        return INCONCLUSIVE, "a side has no runs"
    if not w.ok:
        return INCONCLUSIVE, w.reason
    if w.p < ALPHA:
        return (REPRODUCED, f"p={w.p:.3g} < {ALPHA}") if w.diff > 0 else \
            (NOT_REPRODUCED, f"significant in the opposite direction (p={w.p:.3g})")
    return INCONCLUSIVE, f"p={w.p:.3g} ≥ {ALPHA}" + ("; the difference has the opposite sign" if w.diff <= 0 else "")


def _pc(dataset, model, conn, k):
    p = paper_stats(dataset, model, conn, k)
    return None if p is None else p.center


def _conn(conn, k):
    return f"{CONNECTIVITY_NAMES[conn]} K={k}"


# ---- the four claims --------------------------------------------------------------------------------

def claim1(g: pd.DataFrame, dataset: str, model: str, C: int) -> Finding | None:
    learned = g[g["connectivity"] == "learned"]
    if learned.empty and _vals(g, "full").empty:
        return None
    if (learned["fan_in"] == C // 2).any():
        k, how = C // 2, f"K=C/2={C // 2}, the paper's choice"
    elif len(learned):
        k = int(learned.groupby("fan_in")["top1"].mean().idxmax())
        how = f"K={k}, the best Learned mean (chosen after seeing the test accuracy, which favours it)"
    else:
        k, how = C // 2, "no Learned runs"
    a, b = _vals(g, "learned", k), _vals(g, "full")
    w = welch(a, b)
    verdict, why = _directional(w)
    pa, pb = _pc(dataset, model, "learned", k), _pc(dataset, model, "full", C)
    paper = f"{pa:.2f} vs {pb:.2f} ({pa - pb:+.2f})" if pa is not None and pb is not None else "—"
    return Finding(1, model, f"{_conn('learned', k)} {_iv(a)} vs Fixed-Full {_iv(b)}; {how}", _test(w),
                   paper, verdict, why)


def claim2(g: pd.DataFrame, dataset: str, model: str, C: int) -> list[Finding]:
    out = []
    for k in sorted(g.loc[g["connectivity"] == "random", "fan_in"].unique()):
        r = _vals(g, "random", k)
        others = {"Fixed-Full": _vals(g, "full"), f"Learned K={k}": _vals(g, "learned", k)}
        others = {n: v for n, v in others.items() if len(v)}
        if not others:
            out.append(Finding(2, model, f"Fixed-Random K={k} {_iv(r)}", "nothing to compare with", "—",
                               INCONCLUSIVE, "no Fixed-Full or Learned runs of this model"))
            continue
        verdicts, tests, whys = [], [], []
        for name, v in others.items():
            w = welch(v, r)  # other - random > 0 is the claim
            vd, why = _directional(w)
            verdicts.append(vd)
            tests.append(f"{name} − Random: {_test(w)}")
            whys.append(f"vs {name}: {vd} ({why})")
        if all(v == REPRODUCED for v in verdicts) and len(others) == 2:
            verdict = REPRODUCED
        elif NOT_REPRODUCED in verdicts:
            verdict = NOT_REPRODUCED
        else:
            verdict = INCONCLUSIVE
            if len(others) < 2 and all(v == REPRODUCED for v in verdicts):
                whys.append(f"no {'Learned' if 'Fixed-Full' in others else 'Fixed-Full'} runs to compare with")
        pr, pf, pl = (_pc(dataset, model, "random", k), _pc(dataset, model, "full", C),
                      _pc(dataset, model, "learned", k))
        paper = "; ".join(f"{n} {x:.2f}" for n, x in (("Random", pr), ("Full", pf), (f"Learned K={k}", pl))
                          if x is not None) or "—"
        ours = f"Fixed-Random K={k} {_iv(r)}; " + "; ".join(f"{n} {_iv(v)}" for n, v in others.items())
        out.append(Finding(2, model, ours, "; ".join(tests), paper, verdict, "; ".join(whys)))
    return out


def claim3(g: pd.DataFrame, dataset: str, model: str, C: int) -> Finding | None:
    learned = g[g["connectivity"] == "learned"]
    if learned.empty:
        return None
    series = {int(k): v["top1"].dropna() for k, v in learned.groupby("fan_in")}
    if C not in series and len(_vals(g, "full")):
        series[C] = _vals(g, "full")  # K=C is ResNeXt (docs/design.md section 2)
    ours = "; ".join(f"K={k}: {_iv(v)}" for k, v in sorted(series.items()))
    pk = {k: _pc(dataset, model, "learned", k) for k in range(1, C)}
    pk[C] = _pc(dataset, model, "full", C)
    pk = {k: v for k, v in pk.items() if v is not None}
    paper = (f"best K={max(pk, key=pk.get)} of K∈{{{','.join(map(str, sorted(pk)))}}}"
             if len(pk) >= 2 else "—")
    inner = {k: v for k, v in series.items() if 1 < k < C and len(v)}
    lacking = [f"K={k}" for k in (1, C) if k not in series] + ([] if inner else ["an intermediate K"])
    if lacking:
        return Finding(3, model, ours, "—", paper, INCONCLUSIVE, "no runs at " + ", ".join(lacking))
    kbest = max(inner, key=lambda k: inner[k].mean())
    tests, verdicts, whys = [], [], []
    for end in (1, C):
        w = welch(inner[kbest], series[end])
        vd, why = _directional(w)
        verdicts.append(vd)
        tests.append(f"K={kbest} − K={end}: {_test(w)}")
        whys.append(f"vs K={end}: {vd} ({why})")
    verdict = (REPRODUCED if all(v == REPRODUCED for v in verdicts)
               else NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE)
    whys.append(f"K={kbest} is the best intermediate mean, picked on the test accuracy; "
                "p-values are not corrected for that choice")
    return Finding(3, model, ours, "; ".join(tests), paper, verdict, "; ".join(whys))


def claim4(g: pd.DataFrame, dataset: str, model: str, C: int) -> Finding | None:
    k1 = g[(g["connectivity"] == "learned") & (g["fan_in"] == 1)]
    full = g[g["connectivity"] == "full"]
    if k1.empty and full.empty:
        return None
    if k1.empty or full.empty:
        return Finding(4, model, f"Learned K=1 {_iv(k1['top1'])}; Fixed-Full {_iv(full['top1'])}", "—", "—",
                       INCONCLUSIVE, f"no {'Learned K=1' if k1.empty else 'Fixed-Full'} runs")
    # Parameters of the K=1 model before pruning ("Params Train", = Fixed-Full's) and after ("Test").
    before, after = k1["params_train"].mean(), k1["params_test"].mean()
    w = welch(k1["top1"], full["top1"])
    accs = f"Learned K=1 {_iv(k1['top1'].dropna())} vs Fixed-Full {_iv(full['top1'].dropna())}"
    if not (before > 0 and after >= 0):
        return Finding(4, model, accs, _test(w), "—", INCONCLUSIVE, "metrics.json lacks parameter counts")
    cut = 1 - after / before
    ours = f"params {before / 1e6:.3g}M → {after / 1e6:.3g}M ({-cut:+.0%}); {accs}"
    if cut < PRUNE_MIN:
        verdict, why = NOT_REPRODUCED, f"pruning removes {cut:.0%} of the parameters (< {PRUNE_MIN:.0%})"
    elif not w.ok:
        verdict, why = INCONCLUSIVE, f"pruning removes {cut:.0%}; accuracy untested: {w.reason}"
    elif w.ci_low >= -NONINFERIORITY_MARGIN:
        verdict, why = REPRODUCED, (f"pruning removes {cut:.0%}; the 95% CI of the accuracy difference "
                                    f"lies above -{NONINFERIORITY_MARGIN} points")
    elif w.ci_high < -NONINFERIORITY_MARGIN:
        verdict, why = NOT_REPRODUCED, f"K=1 is worse by more than {NONINFERIORITY_MARGIN} points (whole CI)"
    else:
        verdict, why = INCONCLUSIVE, (f"pruning removes {cut:.0%}, but the 95% CI of the accuracy "
                                      f"difference reaches below -{NONINFERIORITY_MARGIN} points")
    pt = paper_stats(dataset, model, "learned", 1, "params_test")
    pf = paper_stats(dataset, model, "full", C, "params_train")
    pa, pb = _pc(dataset, model, "learned", 1), _pc(dataset, model, "full", C)
    paper = "—"
    if pt and pf and pa is not None and pb is not None:
        paper = (f"params {pf.value / 1e6:.3g}M → {pt.value / 1e6:.3g}M ({pt.value / pf.value - 1:+.0%}); "
                 f"{pa:.2f} vs {pb:.2f} ({pa - pb:+.2f})")
    return Finding(4, model, ours, _test(w), paper, verdict, why)


def evaluate(runs: pd.DataFrame, dataset: str) -> dict[int, list[Finding]]:
    """Findings per claim for one dataset's runs (one grid), one per model (claim 2: per random K)."""
    out: dict[int, list[Finding]] = {c: [] for c in CLAIMS}
    d = runs[runs["dataset"] == dataset]
    for model in sorted(d["arch"].unique(), key=lambda m: model_parts(m) or (10**9, 0, 0)):
        parts = model_parts(model)
        if parts is None:
            continue
        g, C = d[d["arch"] == model], parts[2]
        for c, fn in ((1, claim1), (3, claim3), (4, claim4)):
            f = fn(g, dataset, model, C)
            if f is not None:
                out[c].append(f)
        out[2].extend(claim2(g, dataset, model, C))
    return out


def combine(findings: list[Finding]) -> tuple[str, str]:
    """One verdict per claim: reproduced if every model reproduces it, not reproduced if some model
    contradicts it and none reproduces it, inconclusive otherwise."""
    if not findings:
        return INCONCLUSIVE, "no runs test this claim"
    vs = [f.verdict for f in findings]
    if all(v == REPRODUCED for v in vs):
        return REPRODUCED, "every model tested reproduces it"
    if NOT_REPRODUCED in vs and REPRODUCED not in vs:
        return NOT_REPRODUCED, "at least one model contradicts it and none reproduces it"
    if REPRODUCED in vs:
        return INCONCLUSIVE, f"mixed: {vs.count(REPRODUCED)} of {len(vs)} rows reproduce it"
    return INCONCLUSIVE, "every row is inconclusive (see Why)"


# ---- Markdown ---------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _stage_width_note(d: pd.DataFrame) -> str:
    """A line naming the models whose runs use a stage width other than the paper's (``stage_width``
    in a grid's ``train``), since {D,w,C} alone then does not say which network it is; '' if none."""
    if "stage_width" not in d:
        return ""
    odd = []
    for arch, g in d.groupby("arch", sort=True):
        paper = paper_stage_width(arch)
        used = sorted({int(v) for v in g["stage_width"].dropna()})
        if paper is not None and used and used != [paper]:
            odd.append(f"{model_label(arch)} at stage width {', '.join(map(str, used))} (the paper's: {paper})")
    if not odd:
        return ""
    return ("Stage widths differ from the paper's: " + "; ".join(odd)
            + ". Parameter counts, FLOPs and accuracies are those of this network, not of the paper's model.")


def claims_markdown(runs: pd.DataFrame, dataset: str, level: int = 2) -> str:
    """The claims section for one dataset: a table of findings and a verdict line per claim."""
    h = "#" * level
    demo = dataset not in paper_datasets()
    lines = [f"{h} Claims on `{dataset}`", ""]
    d = runs[runs["dataset"] == dataset]
    if demo:
        lines += [f"> **Demo, not evidence about the paper.** `{dataset}` is not a dataset of the paper, and "
                  "its models are not the paper's configurations. The verdicts below say whether the claims "
                  "hold on this demo; they say nothing about whether the paper's results reproduce.", ""]
    narrow = _stage_width_note(d)
    if narrow:
        lines += [f"> {narrow}", ""]
    if not demo:
        odd = [m for m in d["arch"].unique() if paper_stats(dataset, m, "full", (model_parts(m) or (0, 0, 0))[2])
               is None]
        if odd:
            lines += [f"> Models the paper does not report on `{dataset}`: "
                      + ", ".join(model_label(m) for m in odd) + ".", ""]
        epochs = sorted(int(e) for e in d["epochs"].dropna().unique())
        if dataset.startswith("cifar") and epochs and epochs != [CIFAR_EPOCHS]:
            lines += [f"> Runs trained for {', '.join(map(str, epochs))} epochs; the paper's protocol is "
                      f"{CIFAR_EPOCHS}. Lower accuracies than the paper's are expected, and the verdicts are "
                      "about these shorter runs.", ""]
    findings = evaluate(runs, dataset)
    for c, title in CLAIMS.items():
        lines += [f"{h}# Claim {c}: {title}", ""]
        fs = findings[c]
        if fs:
            lines += ["| Model | Ours (top-1 %, mean ± 95% CI) | Test | Paper | Verdict | Why |",
                      "|:---|:---|:---|:---|:---|:---|"]
            lines += [f"| {model_label(f.model)} | {_cell(f.ours)} | {_cell(f.test)} | {_cell(f.paper)} | "
                      f"{f.verdict} | {_cell(f.why)} |" for f in fs]
            lines.append("")
        verdict, why = combine(fs)
        suffix = f" (demo on `{dataset}`, not evidence about the paper)" if demo else ""
        lines += [f"**Verdict: {verdict}**{suffix} — {why}.", ""]
    return "\n".join(lines)


METHOD = f"""\
How to read this report: every number of ours is the final test accuracy (%) over seeds, given as
mean ± half-width of the 95% Student-t interval (\"n=1\" where one seed gives no interval). Comparisons
use Welch's two-sided t-test on the seeds (Δ with its 95% interval). A claim is **reproduced** when the
effect has the claimed sign with p < {ALPHA}, **not reproduced** when the opposite effect has p < {ALPHA}
(claim 4: or pruning removes less than {PRUNE_MIN:.0%} of the parameters, or K=1 is worse by more than
{NONINFERIORITY_MARGIN} points over its whole interval), and **inconclusive** otherwise (too few seeds,
no variance, p ≥ {ALPHA}). Claim 4's "about equal accuracy" is a non-inferiority check: the lower end of
the 95% interval of (K=1 − Fixed-Full) must lie above −{NONINFERIORITY_MARGIN} points. The paper's
numbers come from its tables (best (mean ± std) over 4 runs) and Fig. 3 (read off the bar chart).
Known inconsistencies in the paper: its text claims gains "up to 2.2%" while Table 2 gives +2.37 and
+1.82 (best over best); Table 3 lists ResNeXt-101 32x4d top-5 as 94.1 where ResNeXt's paper gives 94.4.
We compare with the table values.
"""


def report_document(*, source: str, n_runs: int, grids: dict, skipped: list, missing: pd.DataFrame | None,
                    problems: list[str]) -> str:
    """REPORT.md. ``grids`` maps a grid name ("" for none) to a dict with ``runs`` (DataFrame),
    ``tables`` (list of (Table, {ext: relative path})) and ``figures`` (list of (caption, relative png))."""
    lines = ["# MaskConnect reproduction report", "",
             f"Runs from `{source}`: {n_runs} complete, {len(skipped)} left out"
             + (f", {len(missing)} expected but missing" if missing is not None else "") + ".", "",
             METHOD]
    multi = len(grids) > 1
    for name, part in grids.items():
        base = 2
        if multi or name:
            lines += [f"## Grid `{name or '(top level)'}`", ""]
            base = 3
        runs = part["runs"]
        if runs.empty:
            lines += ["No complete run yet.", ""]
        for ds in dict.fromkeys(runs["dataset"]):
            lines.append(claims_markdown(runs, ds, level=base))
            lines.append(dynamics_markdown(runs, ds, level=base))
        if part["tables"]:
            lines += ["#" * base + " Tables", ""]
            for table, paths in part["tables"]:
                links = ", ".join(f"[{ext}]({p})" for ext, p in paths.items())
                lines += [markdown_document(table, level=base + 1).rstrip("\n"), f"- Files: {links}.", ""]
        if part["figures"]:
            lines += ["#" * base + " Figures", ""]
            for caption, png in part["figures"]:
                lines += [f"**{caption}**", "", f"![{caption}]({png})", ""]
    if missing is not None and len(missing):
        lines += ["## Missing runs", "", f"{len(missing)} expected runs have no complete run:", ""]
        lines += [f"- `{run_id(*r)}`" for r in missing[KEY].itertuples(index=False, name=None)]
        lines.append("")
    if skipped:
        lines += ["## Run directories left out", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in skipped]
        lines.append("")
    if problems:
        lines += ["## Figures not drawn", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)
