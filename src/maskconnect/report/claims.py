"""The paper's claims, each tested on our runs with an interval and a test, and a verdict.

Claims (Ahmed & Torresani, ECCV 2018), by model family:

ResNeXt (sections 4.1-4.2):
  1. Learned connectivity beats Fixed-Full (ResNeXt) at the same capacity.
  2. Fixed-Random connectivity is the worst.
  3. The best fan-in K is intermediate (neither 1 nor C).
  4. K=1 prunes many parameters at about equal accuracy.
  5. Learning the masks costs +39% training time over fixed connectivity.
ResNet (section 4.3, module connectivity over all earlier blocks):
  6. Learned connectivity beats Fixed-Prev (the standard ResNet).
  7. Fixed-Random connectivity loses to Fixed-Prev.
  8. The best fan-in K is intermediate (ResNet-38: K=10 of 17).
  9. Learning the masks costs +13% training time over fixed connectivity.

Verdicts: "reproduced" (the effect in the claimed direction, p < 0.05), "not reproduced" (the
opposite effect with p < 0.05, or for claim 4 too little pruning), "inconclusive" (no runs, fewer than
two seeds on a side, no variance, or p >= 0.05). The overhead claims (5, 9) compare mean training wall
times (see :func:`claim_overhead`). A verdict on a dataset the paper does not use (the ``digits``
demos) says so: it exercises the pipeline and is not evidence about the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..errors import ConfigError
from ..specs import family_of
from .paper import (CONNECTIVITY_NAMES, load_reference, model_label, normalize_model, paper_datasets, paper_stage_width,
                    paper_stats)
from .stats import ALPHA, Interval, WelchResult, welch
from .tables import interval, model_order, summarize

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
    5: "Learning the masks costs +39% training time over fixed connectivity",
    6: "Learned connectivity beats Fixed-Prev (the standard ResNet)",
    7: "Fixed-Random connectivity loses to Fixed-Prev",
    8: "The best fan-in K is intermediate (ResNet-38: K=10 of 17)",
    9: "Learning the masks costs +13% training time over fixed connectivity",
}
# Each family's claims, in the order the report lists them.
FAMILY_CLAIMS = {"resnext": (1, 2, 3, 4, 5), "resnet": (6, 7, 8, 9)}


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


@dataclass(frozen=True)
class Model:
    """What the claims need to know of a model: its family, its own wiring and the fan-ins its masks allow."""

    family: str
    baseline: str     # full | prev
    base_k: int       # C | 1
    kmax: int         # C | L - 1 (the largest fan-in)

    @classmethod
    def of(cls, dataset: str, model: str) -> "Model | None":
        from ..specs import make_spec

        try:
            spec = make_spec(normalize_model(model), dataset=dataset)
        except ConfigError:
            return None
        return cls(spec.family, spec.connectivity, spec.fan_in, spec.max_fan_in)


# ---- helpers ----------------------------------------------------------------------------------------

def _stat(s: pd.DataFrame, conn: str, k: int | None = None, metric: str = "top1") -> Interval | None:
    """The seed statistics of one configuration of the model's summary rows ``s`` (:func:`.tables.summarize`),
    None when it has no run; without ``k``, the connectivity's first row (Fixed-Full and Fixed-Prev
    have one K)."""
    sel = s[s["connectivity"] == conn]
    if k is not None:
        sel = sel[sel["fan_in"] == k]
    return interval(sel.iloc[0], metric) if len(sel) else None


def _by_k(s: pd.DataFrame, conn: str, metric: str = "top1") -> dict[int, Interval]:
    """K -> seed statistics of every configuration of ``conn`` with runs."""
    out = {int(row["fan_in"]): interval(row, metric) for _, row in s[s["connectivity"] == conn].iterrows()}
    return {k: v for k, v in out.items() if v is not None}


def _iv(iv: Interval | None) -> str:
    if iv is None:
        return "no runs"
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


def _as_model(m: "Model | int") -> Model:
    """A :class:`Model`, or C alone for a ResNeXt of cardinality C (Fixed-Full at K = C)."""
    return m if isinstance(m, Model) else Model("resnext", "full", int(m), int(m))


def _paper_k(dataset: str, model: str, m: Model) -> tuple[int | None, str]:
    """The K the paper reports Learned at for this model in a table: C/2 for a ResNeXt (Tables 2 and 3),
    Table 1's (or the ResNet-50 text's) K for a ResNet."""
    if m.family == "resnext":
        return m.base_k // 2, f"K=C/2={m.base_k // 2}, the paper's choice"
    for source in ("eccv-table1", "eccv-text"):
        for k in range(1, m.kmax + 1):
            if paper_stats(dataset, model, "learned", k, source=source) is not None:
                return k, f"K={k}, the paper's (Table 1)" if source == "eccv-table1" else f"K={k}, the paper's"
    return None, ""


# ---- the claims -------------------------------------------------------------------------------------

def claim1(s: pd.DataFrame, dataset: str, model: str, C: "Model | int") -> Finding | None:
    """Claims 1 and 6: Learned (at the paper's K, else the best mean) beats the model's own wiring."""
    m = _as_model(C)
    learned = _by_k(s, "learned")
    if not learned and _stat(s, m.baseline) is None:
        return None
    k_paper, how_paper = _paper_k(dataset, model, m)
    if k_paper is not None and k_paper in learned:
        k, how = k_paper, how_paper
    elif learned:
        k = max(learned, key=lambda k: learned[k].mean)
        how = f"K={k}, the best Learned mean (chosen after seeing the test accuracy, which favours it)"
    else:
        k, how = k_paper or 1, "no Learned runs"
    a, b = learned.get(k), _stat(s, m.baseline)
    w = welch(a, b)
    verdict, why = _directional(w)
    pa, pb = _pc(dataset, model, "learned", k), _pc(dataset, model, m.baseline, m.base_k)
    paper = f"{pa:.2f} vs {pb:.2f} ({pa - pb:+.2f})" if pa is not None and pb is not None else "—"
    base = CONNECTIVITY_NAMES[m.baseline]
    return Finding(1 if m.family == "resnext" else 6, model, f"{_conn('learned', k)} {_iv(a)} vs {base} {_iv(b)}; {how}",
                   _test(w), paper, verdict, why)


def claim2(s: pd.DataFrame, dataset: str, model: str, C: "Model | int") -> list[Finding]:
    """Claim 2 (ResNeXt): each Fixed-Random K below both Fixed-Full and Learned at that K. Claim 7 (ResNet):
    each Fixed-Random K below Fixed-Prev."""
    m = _as_model(C)
    number = 2 if m.family == "resnext" else 7
    names = {"full": "Fixed-Full", "prev": "Fixed-Prev"}
    out = []
    for k, r in sorted(_by_k(s, "random").items()):
        wanted = {names[m.baseline]: _stat(s, m.baseline)}
        if m.family == "resnext":
            wanted[f"Learned K={k}"] = _stat(s, "learned", k)
        others = {n: v for n, v in wanted.items() if v is not None}
        if not others:
            out.append(Finding(number, model, f"Fixed-Random K={k} {_iv(r)}", "nothing to compare with", "—",
                               INCONCLUSIVE, f"no {' or '.join(wanted)} runs of this model"))
            continue
        verdicts, tests, whys = [], [], []
        for name, v in others.items():
            w = welch(v, r)  # other - random > 0 is the claim
            vd, why = _directional(w)
            verdicts.append(vd)
            tests.append(f"{name} − Random: {_test(w)}")
            whys.append(f"vs {name}: {vd} ({why})")
        if all(v == REPRODUCED for v in verdicts) and len(others) == len(wanted):
            verdict = REPRODUCED
        elif NOT_REPRODUCED in verdicts:
            verdict = NOT_REPRODUCED
        else:
            verdict = INCONCLUSIVE
            if len(others) < len(wanted) and all(v == REPRODUCED for v in verdicts):
                whys.append("no " + " or ".join(n.split(" K=")[0] for n in wanted if n not in others)
                            + " runs to compare with")
        pr = _pc(dataset, model, "random", k)
        pb = _pc(dataset, model, m.baseline, m.base_k)
        pl = _pc(dataset, model, "learned", k) if m.family == "resnext" else None
        base_name = "Full" if m.baseline == "full" else "Prev"
        paper = "; ".join(f"{n} {x:.2f}" for n, x in (("Random", pr), (base_name, pb), (f"Learned K={k}", pl))
                          if x is not None) or "—"
        ours = f"Fixed-Random K={k} {_iv(r)}; " + "; ".join(f"{n} {_iv(v)}" for n, v in others.items())
        out.append(Finding(number, model, ours, "; ".join(tests), paper, verdict, "; ".join(whys)))
    return out


def claim3(s: pd.DataFrame, dataset: str, model: str, C: "Model | int") -> Finding | None:
    """Claims 3 and 8: the best Learned K lies strictly between the ends K=1 and the largest K (for a
    ResNeXt K = C is Fixed-Full; for a ResNet the largest is every earlier block, Learned K = L-1), each
    end significantly worse than it."""
    m = _as_model(C)
    series = _by_k(s, "learned")
    if not series:
        return None
    top = m.kmax
    if m.family == "resnext" and top not in series and _stat(s, "full") is not None:
        series[top] = _stat(s, "full")  # K=C is ResNeXt (docs/design.md section 2)
    ours = "; ".join(f"K={k}: {_iv(v)}" for k, v in sorted(series.items()))
    pk = {k: _pc(dataset, model, "learned", k) for k in range(1, top + (m.family == "resnet"))}
    if m.family == "resnext":
        pk[top] = _pc(dataset, model, "full", top)
    pk = {k: v for k, v in pk.items() if v is not None}
    best_paper = max(pk, key=pk.get) if len(pk) >= 2 else None
    paper = (f"best K={best_paper} of K∈{{{_ks(pk)}}}" if best_paper is not None else "—")
    inner = {k: v for k, v in series.items() if 1 < k < top}
    lacking = [f"K={k}" for k in (1, top) if k not in series] + ([] if inner else ["an intermediate K"])
    number = 3 if m.family == "resnext" else 8
    if lacking:
        return Finding(number, model, ours, "—", paper, INCONCLUSIVE, "no runs at " + ", ".join(lacking))
    kbest = max(inner, key=lambda k: inner[k].mean)
    tests, verdicts, whys = [], [], []
    for end in (1, top):
        w = welch(inner[kbest], series[end])
        vd, why = _directional(w)
        verdicts.append(vd)
        tests.append(f"K={kbest} − K={end}: {_test(w)}")
        whys.append(f"vs K={end}: {vd} ({why})")
    verdict = (REPRODUCED if all(v == REPRODUCED for v in verdicts)
               else NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE)
    if best_paper is not None and best_paper != kbest and best_paper in series:
        w = welch(inner[kbest], series[best_paper])
        tests.append(f"ours best K={kbest} − the paper's best K={best_paper}: {_test(w)}")
    whys.append(f"K={kbest} is the best intermediate mean, picked on the test accuracy; "
                "p-values are not corrected for that choice")
    return Finding(number, model, ours, "; ".join(tests), paper, verdict, "; ".join(whys))


def _ks(ks) -> str:
    ks = sorted(ks)
    if len(ks) > 4 and ks == list(range(ks[0], ks[-1] + 1)):
        return f"{ks[0]}..{ks[-1]}"
    return ",".join(map(str, ks))


def claim4(s: pd.DataFrame, dataset: str, model: str, C: "Model | int") -> Finding | None:
    k1, full = _stat(s, "learned", 1), _stat(s, "full")
    C = _as_model(C).base_k
    if k1 is None and full is None:
        return None
    if k1 is None or full is None:
        return Finding(4, model, f"Learned K=1 {_iv(k1)}; Fixed-Full {_iv(full)}", "—", "—",
                       INCONCLUSIVE, f"no {'Learned K=1' if k1 is None else 'Fixed-Full'} runs")
    # Parameters of the K=1 model before pruning ("Params Train", = Fixed-Full's) and after ("Test").
    row = s[(s["connectivity"] == "learned") & (s["fan_in"] == 1)].iloc[0]
    before, after = row["params_train_M"] * 1e6, row["params_test_M"] * 1e6
    w = welch(k1, full)
    accs = f"Learned K=1 {_iv(k1)} vs Fixed-Full {_iv(full)}"
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


def _paper_overhead(family: str) -> float | None:
    """The paper's training-time overhead of learning the masks for a family (its CSV, eccv-text)."""
    df = load_reference()
    sel = df[(df["family"] == family) & (df["metric"] == "train_time_overhead")]
    return float(sel["value"].iloc[0]) if len(sel) else None


def claim_overhead(s: pd.DataFrame, dataset: str, model: str, C: "Model | int") -> list[Finding]:
    """Claims 5 and 9: learning the masks costs the paper's overhead (+39% ResNeXt, +13% ResNet) in training
    time over fixed connectivity. Per K with both Learned and Fixed-Random runs (the same network, the
    same masked computation, masks fixed): the overhead (mean Learned wall time / mean Fixed-Random - 1)
    with a 95% interval from Welch's interval of the difference of wall times. We read the paper's
    number as an upper bound ("an unoptimised implementation"): reproduced when our whole interval lies
    at or below it, not reproduced when it lies above it, inconclusive otherwise. Timings are the
    device's and the implementation's: a CPU run says nothing about the paper's GPUs."""
    m = _as_model(C)
    number = 5 if m.family == "resnext" else 9
    paper = _paper_overhead(m.family)
    out = []
    if "wall_time_s_n" not in s:
        return out
    learned, random = _by_k(s, "learned", "wall_time_s"), _by_k(s, "random", "wall_time_s")
    for k in sorted(set(learned) & set(random)):
        lt, rt = learned[k], random[k]
        base = rt.mean
        over = lt.mean / base - 1
        w = welch(lt, rt)
        ours = (f"Learned K={k} {lt.mean:.1f} s vs Fixed-Random K={k} {base:.1f} s per run "
                f"(n={lt.n}, {rt.n}): {over:+.0%}")
        paper_text = "—" if paper is None else f"{paper:+.0%}"
        if not w.ok or paper is None:
            test = "no test: " + (w.reason or "the paper gives no overhead")
            verdict, why = INCONCLUSIVE, test
        else:
            lo, hi = w.ci_low / base, w.ci_high / base
            test = f"overhead {over:+.0%}, 95% CI [{lo:+.0%}, {hi:+.0%}] (Welch interval of the wall-time difference / Fixed-Random's mean)"
            if hi <= paper:
                verdict, why = REPRODUCED, f"the whole interval lies at or below the paper's {paper:+.0%}"
            elif lo > paper:
                verdict, why = NOT_REPRODUCED, f"the whole interval lies above the paper's {paper:+.0%}"
            else:
                verdict, why = INCONCLUSIVE, f"the interval contains the paper's {paper:+.0%}"
        out.append(Finding(number, model, ours, test, paper_text, verdict, why))
    return out


def evaluate(runs: pd.DataFrame, dataset: str, summary: pd.DataFrame | None = None) -> dict[int, list[Finding]]:
    """Findings per claim for one dataset's runs (one grid), one per model (claims 2, 5, 7 and 9: per K),
    from the runs' summary (:func:`.tables.summarize`; computed here when not given). Each model's
    family decides which claims test it (:data:`FAMILY_CLAIMS`)."""
    out: dict[int, list[Finding]] = {c: [] for c in CLAIMS}
    d = runs[runs["dataset"] == dataset]
    summary = summarize(d) if summary is None else summary
    summary = summary[summary["dataset"] == dataset]
    for model in sorted(d["arch"].unique(), key=model_order):
        m = Model.of(dataset, model)
        if m is None:
            continue
        g = summary[summary["arch"] == model]
        steps = {"resnext": ((claim1, 1), (claim3, 3), (claim4, 4)), "resnet": ((claim1, 6), (claim3, 8))}[m.family]
        for fn, c in steps:
            f = fn(g, dataset, model, m)
            if f is not None:
                out[c].append(f)
        out[2 if m.family == "resnext" else 7].extend(claim2(g, dataset, model, m))
        out[5 if m.family == "resnext" else 9].extend(claim_overhead(g, dataset, model, m))
    return out


def families(runs: pd.DataFrame, dataset: str) -> list[str]:
    """The families of the models of ``dataset``'s runs, in registry order."""
    found = set()
    for model in runs.loc[runs["dataset"] == dataset, "arch"].unique():
        try:
            found.add(family_of(normalize_model(model)).name)
        except ConfigError:
            pass
    return [f for f in FAMILY_CLAIMS if f in found]


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


def claims_markdown(runs: pd.DataFrame, dataset: str, level: int = 2, summary: pd.DataFrame | None = None) -> str:
    """The claims section for one dataset: a table of findings and a verdict line per claim (from the
    runs' ``summary``, :func:`.tables.summarize`, computed here when not given)."""
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
        odd = [m for m in d["arch"].unique()
               if (info := Model.of(dataset, m)) is None or paper_stats(dataset, m, info.baseline, info.base_k) is None]
        if odd:
            lines += [f"> Models the paper does not report on `{dataset}`: "
                      + ", ".join(model_label(m) for m in odd) + ".", ""]
        epochs = sorted(int(e) for e in d["epochs"].dropna().unique())
        if dataset.startswith("cifar") and epochs and epochs != [CIFAR_EPOCHS]:
            lines += [f"> Runs trained for {', '.join(map(str, epochs))} epochs; the paper's protocol is "
                      f"{CIFAR_EPOCHS}. Lower accuracies than the paper's are expected, and the verdicts are "
                      "about these shorter runs.", ""]
    findings = evaluate(runs, dataset, summary)
    for c in [c for fam in families(runs, dataset) for c in FAMILY_CLAIMS[fam]]:
        lines += [f"{h}# Claim {c}: {CLAIMS[c]}", ""]
        fs = findings[c]
        if fs:
            ours = "Ours (training wall time per run)" if c in (5, 9) else "Ours (top-1 %, mean ± 95% CI)"
            lines += [f"| Model | {ours} | Test | Paper | Verdict | Why |",
                      "|:---|:---|:---|:---|:---|:---|"]
            lines += [f"| {model_label(f.model)} | {_cell(f.ours)} | {_cell(f.test)} | {_cell(f.paper)} | "
                      f"{f.verdict} | {_cell(f.why)} |" for f in fs]
            lines.append("")
        verdict, why = combine(fs)
        suffix = f" (demo on `{dataset}`, not evidence about the paper)" if demo else ""
        lines += [f"**Verdict: {verdict}**{suffix} — {why}.", ""]
    return "\n".join(lines)
