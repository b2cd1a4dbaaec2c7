"""Report layer: statistics against hand-computed values, tables against the paper, figures, REPORT.md.

Run directories are faked by writing the files of docs/run_format.md (metrics.json, history.csv,
masks.json); no training and no torch are needed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from maskconnect.cli.report import add_report_arguments, run_report
from maskconnect.errors import ConfigError
from maskconnect.experiments import parse_run_id
from maskconnect.report import build_report
from maskconnect.report.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, combine, evaluate
from maskconnect.report.figures import live_branches
from maskconnect.report.paper import load_reference, normalize_model, paper_stats
from maskconnect.report.runs import missing_runs, scan_runs
from maskconnect.report.stats import t_interval, welch
from maskconnect.report.tables import PAPER_TABLES, build_tables, latex_table, markdown_document, summarize

# ---- fake run directories ---------------------------------------------------------------------------


def write_run(root: Path, dataset: str, arch: str, conn: str, k: int, seed: int, top1: float, *,
              params_train: int = 843_000, params_test: int | None = None, epochs: int = 300,
              status: str = "complete", history: bool = False, masks: bool = False,
              stage_width: int | None = None) -> Path:
    """One run directory laid out as docs/run_format.md says, at <root>/<run_id>."""
    d, w, c = (int(x) for x in arch.split(","))
    run = root / dataset / arch.replace(",", "-") / f"{conn}-K{k}" / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    metrics = {
        "status": status, "dataset": dataset, "arch": arch, "depth": d, "width": w, "cardinality": c,
        "connectivity": conn, "fan_in": k, "seed": seed, "top1": top1, "top5": min(100.0, top1 + 18),
        "best_top1": top1 + 0.1, "best_top5": min(100.0, top1 + 18.1), "test_loss": 1.0,
        "params_train": params_train,
        "params_test": params_train if params_test is None else params_test,
        "masks": 0 if conn == "full" else 9 * c * c, "flops": 269_000_000, "epochs": epochs,
        "wall_time_s": 1.0, "device": "cpu", "config": {}, "versions": {}, "git_commit": None,
    }
    if stage_width is not None:
        metrics["stage_width"] = stage_width
    (run / "metrics.json").write_text(json.dumps(metrics))
    if history:
        lines = ["epoch,phase,lr,mask_lr,train_loss,train_top1,test_loss,test_top1,test_top5,"
                 "mask_entropy,mask_changed,epoch_time_s"]
        for e in range(1, epochs + 1):
            phase = "fixed" if conn != "learned" else ("joint" if e <= epochs // 2 else "finetune")
            ent = "" if conn != "learned" else f"{math.log(c) * math.exp(-e / 3):.4f}"
            lines.append(f"{e},{phase},0.1,0.1,{1 / e:.3f},{50 + e},{1 / e:.3f},{top1 - 5 / e:.2f},"
                         f"90,{ent},0,0.5")
        (run / "history.csv").write_text("\n".join(lines) + "\n")
    if masks and conn != "full":
        rng = np.random.default_rng(seed)
        mods = []
        for _ in range(d // 3 - 1):  # any module count will do for drawing
            m = np.zeros((c, c), dtype=int)
            for j in range(c):
                m[j, rng.choice(c, k, replace=False)] = 1
            mods.append(m.tolist())
        (run / "masks.json").write_text(json.dumps(
            {"cardinality": c, "fan_in": k, "connectivity": conn, "modules": len(mods) + 1, "masks": mods,
             "live": live_branches(mods)}))
    return run


# CIFAR-100 {29,8,8}, two seeds per configuration, means 73.30 / 73.70 / 75.70 / 72.70.
TABLE2_RUNS = {("full", 8): [73.4, 73.2], ("learned", 1): [73.8, 73.6],
               ("learned", 4): [75.8, 75.6], ("random", 4): [72.6, 72.8]}


@pytest.fixture(scope="module")
def cifar_results(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    root = results / "runs" / "table2"
    for (conn, k), accs in TABLE2_RUNS.items():
        for seed, acc in enumerate(accs):
            write_run(root, "cifar100", "29,8,8", conn, k, seed, acc,
                      params_test=None if conn == "full" else 650_000, epochs=6, history=True, masks=True)
    # a run still training: config.json only, no metrics.json
    running = root / "cifar100" / "29-8-8" / "learned-K4" / "seed2"
    running.mkdir(parents=True)
    (running / "config.json").write_text("{}")
    return results


EXPECTED = [f"cifar100/29-8-8/{c}-K{k}/seed{s}" for (c, k) in TABLE2_RUNS for s in range(3)]


@pytest.fixture(scope="module")
def cifar_report(cifar_results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    written = build_report(cifar_results, out, grid="table2", expected=EXPECTED)
    return out, written


# ---- statistics -------------------------------------------------------------------------------------


def test_t_interval_matches_hand_computation():
    iv = t_interval([1, 2, 3, 4])
    # mean = 10/4 = 2.5; s^2 = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2)/3 = 5/3, s = 1.290994
    # t(0.975, df=3) = 3.182446 (t table); half-width = 3.182446 * 1.290994 / sqrt(4) = 2.054260
    assert iv.n == 4 and iv.best == 4
    assert iv.mean == pytest.approx(2.5)
    assert iv.std == pytest.approx(1.290994, abs=1e-6)
    assert iv.half_width == pytest.approx(2.054260, abs=1e-5)
    assert (iv.low, iv.high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-5)
    # 90%: t(0.95, 3) = 2.353363 -> 2.353363 * 1.290994 / 2 = 1.519093
    assert t_interval([1, 2, 3, 4], confidence=0.90).half_width == pytest.approx(1.519093, abs=1e-5)


def test_t_interval_one_seed_all_equal_and_missing_values():
    one = t_interval([73.5])
    assert (one.mean, one.n, one.best, one.half_width, one.std) == (73.5, 1, 73.5, None, None)
    same = t_interval([75.1, 75.1, 75.1])  # rounding of the mean must not give a 1e-15 std
    assert same.std == 0.0 and same.half_width == 0.0 and same.mean == pytest.approx(75.1)
    # None/NaN (top-5 of a dataset with < 5 classes) are ignored, not propagated
    assert t_interval([1.0, None, float("nan"), 3.0]).n == 2
    with pytest.raises(ValueError):
        t_interval([None, float("nan")])


def test_welch_matches_hand_computation():
    a, b = [1, 2, 3, 4], [2, 3, 4, 5, 6]
    w = welch(t_interval(a), t_interval(b))
    # var a = 5/3, var b = 10/4 = 2.5; se^2 = (5/3)/4 + 2.5/5 = 0.916667, se = 0.957427
    # t = (2.5 - 4) / 0.957427 = -1.566699
    # df = se^4 / ((0.416667^2)/3 + (0.5^2)/4) = 0.840278 / 0.120370 = 6.980769 (Welch-Satterthwaite)
    assert w.diff == pytest.approx(-1.5)
    assert w.t == pytest.approx(-1.566699, abs=1e-6)
    assert w.df == pytest.approx(6.980769, abs=1e-6)
    # p = 2 * P(T_6.98 > 1.566699), computed from the t distribution independently of ttest_ind
    assert w.p == pytest.approx(2 * st.t.sf(1.566699, 6.980769), abs=1e-6)
    assert w.p == pytest.approx(0.16129, abs=1e-4)
    half = st.t.ppf(0.975, 6.980769) * 0.957427
    assert (w.ci_low, w.ci_high) == pytest.approx((-1.5 - half, -1.5 + half), abs=1e-4)
    assert w.ok and not w.significant


def test_welch_undefined_cases_say_why():
    w = welch(t_interval([75.0]), t_interval([73.0, 73.5]))
    assert w.p is None and w.t is None and "n<2" in w.reason and w.diff == pytest.approx(1.75)
    w = welch(t_interval([75.0, 75.0]), t_interval([73.0, 73.0]))
    assert w.p is None and "no variance" in w.reason
    # one constant side is a valid Welch test: t = (75 - 73.25) / sqrt(0.125/2) = 7.0
    w = welch(t_interval([75.0, 75.0]), t_interval([73.0, 73.5]))
    assert w.ok and w.t == pytest.approx(7.0) and w.reason == ""
    w = welch(None, t_interval([73.0, 73.5]))  # a side with no run
    assert w.diff is None and w.p is None and "n<2 in a (n=0)" in w.reason


# ---- the paper's numbers ----------------------------------------------------------------------------


def test_paper_numbers_lookup():
    ref = load_reference()
    assert {"eccv-table2", "eccv-fig3", "v1-poster-cifar10", "eccv-table3"} <= set(ref["source"])
    full = paper_stats("cifar100", "29-8-8", "full", 8)
    assert (full.best, full.mean, full.std) == (73.52, 73.37, 0.13)
    assert full.label() == "73.52 (73.37 ± 0.13)" and full.source == "eccv-table2"
    assert paper_stats("cifar100", (20, 4, 8), "learned", 4).value == 71.81  # Fig. 3
    assert paper_stats("imagenet", "{50,4,32}", "learned", 16, "top5").center == 94.1
    assert paper_stats("cifar100", "29,8,8", "learned", 4, "params_test").value == 0.81e6
    assert paper_stats("cifar100", "29,8,8", "random", 1) is None
    assert normalize_model("{29,64,8}") == "29,64,8"


# ---- runs -------------------------------------------------------------------------------------------


def test_scan_runs_reads_complete_runs_and_lists_the_rest(cifar_results, tmp_path):
    runs, skipped = scan_runs(cifar_results)
    assert len(runs) == 8 and set(runs["grid"]) == {"table2"}
    assert set(runs["run_id"]) >= {"table2/cifar100/29-8-8/full-K8/seed0"}
    assert runs.loc[runs["connectivity"] == "full", "fan_in"].eq(8).all()
    assert [s.reason for s in skipped] == ["no metrics.json: in progress or stopped"]
    # an unfinished metrics.json is not a result
    write_run(tmp_path, "cifar100", "29,8,8", "full", 8, 0, 70.0, status="running")
    runs2, skipped2 = scan_runs(tmp_path)
    assert runs2.empty and "not 'complete'" in skipped2[0].reason


def test_expected_run_ids_and_missing_runs(cifar_results):
    assert parse_run_id("cifar100/29-8-8/learned-K4/seed0") == {
        "dataset": "cifar100", "arch": "29,8,8", "connectivity": "learned", "fan_in": 4, "seed": 0}
    assert parse_run_id("grid/cifar100/29-8-8/full/seed1")["fan_in"] == 8  # full: K = C
    with pytest.raises(ValueError):
        parse_run_id("cifar100/29-8-8/learned/seed0")  # learned needs K
    miss = missing_runs(scan_runs(cifar_results)[0], EXPECTED)
    assert sorted(miss["fan_in"]) == [1, 4, 4, 8] and set(miss["seed"]) == {2}


# ---- tables -----------------------------------------------------------------------------------------


def _table2(cifar_results):
    tables = build_tables(scan_runs(cifar_results)[0])
    names = [t.spec.name for t in tables]
    assert names == ["table2_cifar100"], names  # nothing outside Table 2, no K-sweep model
    return tables[0]


def test_table2_rows_bold_and_paper_columns(cifar_results):
    t = _table2(cifar_results)
    rows = list(zip(t.cells["Model"], t.cells["Connectivity"], t.cells["K"]))
    assert rows == [("{29,8,8}", "Fixed-Full", "8"), ("{29,8,8}", "Fixed-Random", "4"),
                    ("{29,8,8}", "Learned", "1"), ("{29,8,8}", "Learned", "4")]
    main = "Top-1 (%) mean ± 95% CI"
    # two seeds 73.4, 73.2: s = 0.141421, t(0.975, 1) = 12.7062 -> half-width 12.7062 * 0.1 = 1.27
    assert t.cells[main].tolist() == ["73.30 ± 1.27", "72.70 ± 1.27", "73.70 ± 1.27", "75.70 ± 1.27"]
    assert t.bold[main].tolist() == [False, False, False, True]  # Learned K=4 has the best mean
    assert not t.bold.drop(columns=[main]).to_numpy().any()
    paper = t.cells["Paper top-1 best (mean ± std)"].tolist()
    assert paper == ["73.52 (73.37 ± 0.13)", "72.85 (72.66 ± 0.24)", "73.91 (73.76 ± 0.14)",
                     "75.89 (75.77 ± 0.12)"]
    # ours - paper mean: 73.30 - 73.37, 72.70 - 72.66, 73.70 - 73.76, 75.70 - 75.77
    assert t.cells["Δ top-1 vs paper"].tolist() == ["-0.07", "+0.04", "-0.06", "-0.07"]
    assert t.cells["Params test (M)"].tolist() == ["0.843", "0.65", "0.65", "0.65"]
    # p only on Learned rows; K=1 has no Fixed-Random K=1 to compare with
    assert t.cells["p vs Full"].tolist()[:2] == ["—", "—"]
    assert t.cells["p vs Random (same K)"].tolist() == ["—", "—", "—", "0.002"]
    # Learned K=4 vs Full: diff 2.40, se = sqrt(0.02/2 + 0.02/2) = 0.141421, t = 16.97, df = 2
    # p = 2 * P(T_2 > 16.97) = 0.00345
    assert t.cells["p vs Full"].tolist()[3] == "0.003"
    assert t.data.loc[3, "p_vs_baseline"] == pytest.approx(2 * st.t.sf(2.4 / math.sqrt(0.02), 2), rel=1e-6)
    assert any("{29,64,8} Fixed-Full K=8" in n for n in t.notes)  # paper rows we have not run


def _check_booktabs(tex: str):
    body = "\n".join(ln for ln in tex.splitlines() if not ln.startswith("%"))
    order = [body.index(s) for s in ("\\begin{tabular}", "\\toprule", "\\midrule", "\\bottomrule",
                                     "\\end{tabular}")]
    assert order == sorted(order)
    unescaped = re.sub(r"\\[{}]", "", body)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    ncols = len(re.match(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1))
    rows = [ln for ln in body.splitlines() if ln.rstrip().endswith("\\\\")]
    assert len(rows) >= 2
    for ln in rows:
        assert len(re.findall(r"(?<!\\)&", ln)) == ncols - 1, ln
    assert "nan" not in body.lower()


def test_latex_is_balanced_booktabs(cifar_results):
    t = _table2(cifar_results)
    tex = latex_table(t)
    _check_booktabs(tex)
    assert "\\textbf{75.70 $\\pm$ 1.27}" in tex
    assert "73.52 (73.37 $\\pm$ 0.13)" in tex and "\\{29,8,8\\}" in tex
    md = markdown_document(t)
    assert "**75.70 ± 1.27**" in md and md.count("**75.70") == 1


def test_one_seed_and_all_equal_render_without_nan(tmp_path):
    write_run(tmp_path, "cifar100", "20,4,8", "full", 8, 0, 70.0)  # n=1
    for seed in range(3):  # all equal
        write_run(tmp_path, "cifar100", "20,4,8", "learned", 4, seed, 71.5)
    write_run(tmp_path, "cifar100", "20,4,8", "learned", 2, 0, 70.5)
    tables = build_tables(scan_runs(tmp_path)[0])
    assert [t.spec.name for t in tables] == ["fig3_ksweep_cifar100"]
    t = tables[0]
    main = "Top-1 (%) mean ± 95% CI"
    assert t.cells[main].tolist() == ["70.00 (n=1)", "70.50 (n=1)", "71.50 ± 0.00"]
    assert t.cells["Std"].tolist() == ["—", "—", "0.00"]
    assert t.cells["p vs Full"].tolist() == ["—", "n<2", "n<2"]
    assert t.cells["Paper top-1"].tolist() == ["70.21", "70.14", "71.81"]  # Fig. 3: single values
    tex, md = latex_table(t), markdown_document(t)
    _check_booktabs(tex)
    for text in (tex, md, t.cells.to_string()):
        assert "nan" not in text.lower() and "n=1" in text


def test_partial_grid_lists_missing_runs_without_crashing(tmp_path):
    # only Learned K=4 finished: no Fixed-Full, no Fixed-Random, one seed
    write_run(tmp_path, "cifar100", "29,8,8", "learned", 4, 0, 75.0)
    runs = scan_runs(tmp_path)[0]
    miss = missing_runs(runs, EXPECTED)
    assert len(miss) == len(EXPECTED) - 1
    (t,) = build_tables(runs, miss)
    assert t.cells["K"].tolist() == ["4"]
    note = next(n for n in t.notes if n.startswith("Missing runs"))
    assert "cifar100/29-8-8/full-K8/seed0" in note and "cifar100/29-8-8/learned-K4/seed0" not in note
    assert t.cells["p vs Full"].tolist() == ["—"] and "no Fixed-Full runs" in t.data.loc[0, "p_vs_baseline_reason"]
    _check_booktabs(latex_table(t))
    # nothing finished at all: still a report, no table rows
    assert summarize(runs.iloc[:0]).empty


def test_every_paper_table_has_a_spec():
    by_source = {s.source: s for s in PAPER_TABLES}
    assert set(by_source) == {"eccv-table2", "v1-poster-cifar10", "eccv-table3", "eccv-fig3", "eccv-table1", "eccv-fig2",
                              "eccv-text"}
    assert by_source["eccv-table3"].metrics == ("top1", "top5")
    assert by_source["eccv-fig3"].model_set() == {"20,4,8"}


# ---- build_report: files, figures, REPORT.md ---------------------------------------------------------


def test_build_report_writes_tables_figures_and_report(cifar_report):
    out, written = cifar_report
    for ext in ("tex", "md", "csv"):
        assert f"tables/table2_cifar100.{ext}" in written
    pngs = [p for k, p in written.items() if k.endswith(".png")]
    names = {Path(k).name for k in written}
    assert {"fanin_cifar100_29-8-8.png", "curves_cifar100_29-8-8.png"} <= names
    assert {"masks_cifar100_29-8-8_K1_seed0.png", "masks_cifar100_29-8-8_K4_seed0.png"} <= names
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
        assert p.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert all(p.is_file() for p in written.values())
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def claim_verdicts(text: str) -> dict[int, str]:
    """Each claim's verdict in a REPORT.md of one dataset, read from that claim's own section (its heading
    up to the next heading), never from a later claim's."""
    verdicts: dict[int, str] = {}
    for claim, section in re.findall(r"^#+ Claim (\d): [^\n]*\n(.*?)(?=^#|\Z)", text, re.M | re.S):
        found = re.findall(r"^\*\*Verdict: (reproduced|not reproduced|inconclusive)\*\*", section, re.M)
        assert len(found) == 1 and int(claim) not in verdicts, (claim, section)
        verdicts[int(claim)] = found[0]
    return verdicts


def test_report_has_a_verdict_per_claim_and_lists_missing_runs(cifar_report):
    out, _ = cifar_report
    text = (out / "REPORT.md").read_text()
    # two seeds a side, each pair 0.2 apart: s = 0.141421, Welch se = 0.141421, df = 2, t(0.975, 2) = 4.302653
    # 1: Learned K=4 - Full = +2.40, t = 16.97, p = 0.003: reproduced
    # 2: Full - Random K=4 = +0.60, t = 4.24, p = 0.051 (>= 0.05; Learned K=4 - Random is p = 0.002): inconclusive
    # 3: K=4 - K=1 = +2.00 (t = 14.1, p = 0.005) and K=4 - K=C (Full) = +2.40: reproduced
    # 4: 23% pruned; K=1 - Full = +0.40, interval +0.40 -+ 0.61 = [-0.21, +1.01], above -0.5: reproduced
    # 5: every fake run took 1.0 s: no variance, no test of the overhead: inconclusive
    # (the ResNet claims 6-9 test ResNet runs only)
    assert claim_verdicts(text) == {1: REPRODUCED, 2: INCONCLUSIVE, 3: REPRODUCED, 4: REPRODUCED, 5: INCONCLUSIVE}
    assert "`cifar100/29-8-8/learned-K4/seed2`" in text  # expected, still running
    assert "in progress or stopped" in text
    assert "not evidence about the paper" not in text  # CIFAR-100 is the paper's dataset
    assert "epochs; the paper's protocol is 300" in text  # the fake runs are 6 epochs long
    assert "nan" not in text.lower()


def test_demo_dataset_is_labelled_as_not_evidence(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    for seed, (f, l1, l2) in enumerate([(95.0, 95.3, 96.0), (95.2, 95.1, 95.9), (94.8, 95.5, 96.2)]):
        write_run(res, "digits", "11,2,4", "full", 4, seed, f, params_train=20_000, epochs=3, history=True)
        write_run(res, "digits", "11,2,4", "learned", 1, seed, l1, params_train=20_000, params_test=15_000,
                  epochs=3, history=True, masks=True)
        write_run(res, "digits", "11,2,4", "learned", 2, seed, l2, params_train=20_000, params_test=19_000,
                  epochs=3)
    written = build_report(res, out)
    assert "tables/table_digits.md" in written
    text = (out / "REPORT.md").read_text()
    assert "Demo, not evidence about the paper" in text
    assert text.count("(demo on `digits`, not evidence about the paper)") == 5
    # Fixed-Random was not run: claim 2 cannot be judged; Learned K=2 (96.03) beats Full (95.00) clearly
    verdicts = claim_verdicts(text)
    assert verdicts[2] == INCONCLUSIVE and verdicts[1] == REPRODUCED


def test_a_stage_width_other_than_the_papers_is_named_in_the_report(tmp_path):
    # {20,4,8} is a paper model with stage width 64 (docs/design.md section 1); the demo grid runs it at 32 (section 9)
    res = tmp_path / "results"
    for seed in range(2):
        write_run(res, "digits", "20,4,8", "full", 8, seed, 95.0 + seed, epochs=3, stage_width=32)
        write_run(res, "cifar100", "20,4,8", "full", 8, seed, 70.0 + seed, epochs=3, stage_width=64)
        write_run(res, "cifar100", "29,8,8", "full", 8, seed, 72.0 + seed, epochs=3)  # older run format
    build_report(res, tmp_path / "out")
    text = (tmp_path / "out" / "REPORT.md").read_text()
    sections = {part.split("`")[1]: part for part in re.split(r"#+ Claims on ", text)[1:]}
    assert "{20,4,8} at stage width 32 (the paper's: 64)" in sections["digits"]
    assert "Stage widths differ" not in sections["cifar100"]  # the paper's width, or none recorded
    assert text.count("Stage widths differ from the paper's") == 1


def test_claim_verdicts_follow_the_tests(tmp_path):
    for seed, (full, learned) in enumerate([(75.0, 73.0), (75.2, 73.1), (74.9, 72.8)]):
        write_run(tmp_path, "cifar100", "29,8,8", "full", 8, seed, full)
        write_run(tmp_path, "cifar100", "29,8,8", "learned", 4, seed, learned)
    write_run(tmp_path, "cifar100", "29,8,8", "learned", 1, 0, 74.0, params_test=650_000)
    found = evaluate(scan_runs(tmp_path)[0], "cifar100")
    assert found[1][0].verdict == NOT_REPRODUCED  # Learned significantly worse than Full
    assert found[4][0].verdict == INCONCLUSIVE and "n<2" in found[4][0].why  # one K=1 seed
    # the only intermediate K (4) is significantly below K=C (Fixed-Full): the best K is an end point
    assert found[3][0].verdict == NOT_REPRODUCED and "vs K=1: inconclusive (n<2" in found[3][0].why
    assert combine([]) == (INCONCLUSIVE, "no runs test this claim")
    assert combine([found[1][0]])[0] == NOT_REPRODUCED
    # combining rows of several models: all must reproduce; one contradiction among reproductions is mixed
    from dataclasses import replace

    yes, no = replace(found[1][0], verdict=REPRODUCED), found[1][0]
    assert combine([yes, yes]) == (REPRODUCED, "every model tested reproduces it")
    assert combine([yes, no]) == (INCONCLUSIVE, "mixed: 1 of 2 rows reproduce it")
    assert combine([no, found[4][0]])[0] == NOT_REPRODUCED  # a contradiction and an inconclusive row
    assert combine([found[4][0]])[0] == INCONCLUSIVE


def _welch_ci(a, b) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b), Welch's, from scipy (not maskconnect.report.stats)."""
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(ci.low), float(ci.high)


def test_claim2_needs_both_comparison_groups(tmp_path):
    """Claim 2 says Fixed-Random is the worst: it is reproduced only when Random is significantly below
    both Fixed-Full and Learned at its K. With one of them never run, the verdict is inconclusive, however
    clearly Random loses to the other."""
    full, random, learned = [75.0, 75.2, 74.9], [72.0, 72.3, 71.9], [76.0, 76.2, 75.9]
    assert _welch_ci(full, random)[0] > 0 and _welch_ci(learned, random)[0] > 0  # both clearly above Random

    def verdict(groups, root):
        for conn, k, accs in groups:
            for seed, acc in enumerate(accs):
                write_run(root, "cifar100", "29,8,8", conn, k, seed, acc)
        (finding,) = evaluate(scan_runs(root)[0], "cifar100")[2]
        return finding

    both = verdict([("full", 8, full), ("random", 4, random), ("learned", 4, learned)], tmp_path / "both")
    assert both.verdict == REPRODUCED
    no_learned = verdict([("full", 8, full), ("random", 4, random)], tmp_path / "no-learned")
    assert no_learned.verdict == INCONCLUSIVE and "no Learned runs to compare with" in no_learned.why
    no_full = verdict([("random", 4, random), ("learned", 4, learned)], tmp_path / "no-full")
    assert no_full.verdict == INCONCLUSIVE and "no Fixed-Full runs to compare with" in no_full.why


# Claim 4's non-inferiority margin, from the paper's "about equal accuracy" as the report's method states it:
# the LOWER end of the 95% interval of (K=1 - Fixed-Full) must lie above -0.5 points.
MARGIN = -0.5


@pytest.mark.parametrize("k1,full,expected", [
    # interval [-4.43, +1.77]: its upper end is above the margin, its lower end far below: not shown
    ([70.802, 72.17, 73.538], [72.132, 73.5, 74.868], INCONCLUSIVE),
    # interval [+0.27, +0.73], wholly above the margin: about equal
    ([73.7, 73.8, 73.9], [73.4, 73.3, 73.2], REPRODUCED),
    # interval [-2.95, -2.12], wholly below the margin: K=1 is worse
    ([71.0, 71.2, 71.4], [73.9, 73.7, 73.6], NOT_REPRODUCED),
], ids=["straddles", "above", "below"])
def test_claim4_reads_the_lower_end_of_the_interval(k1, full, expected, tmp_path):
    low, high = _welch_ci(k1, full)
    if expected == INCONCLUSIVE:
        assert (round(low, 2), round(high, 2)) == (-4.43, 1.77) and low < MARGIN < high
    elif expected == REPRODUCED:
        assert MARGIN < low
    else:
        assert high < MARGIN
    for seed, (a, b) in enumerate(zip(k1, full)):
        write_run(tmp_path, "cifar100", "29,8,8", "learned", 1, seed, a, params_test=650_000)  # 23% pruned
        write_run(tmp_path, "cifar100", "29,8,8", "full", 8, seed, b)
    (finding,) = evaluate(scan_runs(tmp_path)[0], "cifar100")[4]
    assert f"[{low:+.2f}, {high:+.2f}]" in finding.test
    assert finding.verdict == expected, (finding.test, finding.why)


def test_live_branches_from_masks():
    # C=2, K=1: module 2 branch 0 reads branch 1 of module 1, branch 1 reads branch 1 too
    assert live_branches([[[0, 1], [0, 1]]]) == [[False, True], [True, True]]


def test_cli_arguments_and_empty_results(tmp_path):
    parser = add_report_arguments(argparse.ArgumentParser())
    (tmp_path / "results").mkdir()
    exp = tmp_path / "expected.txt"
    exp.write_text("# grid targets\ncifar100/29-8-8/full-K8/seed0\n")
    args = parser.parse_args(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out"),
                              "--expected", str(exp)])
    assert run_report(args) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "No complete run yet" in text and "`cifar100/29-8-8/full-K8/seed0`" in text
    exp.write_text("cifar100/not-a-run-id\n")
    with pytest.raises(ConfigError, match="expected"):
        run_report(args)
    with pytest.raises(ConfigError, match="results"):
        build_report(tmp_path / "nowhere", tmp_path / "out2")


def test_report_layer_imports_neither_torch_nor_mlflow():
    # Registering the CLI subcommand must not need the report extra (the GPU box has torch only) ...
    code = ("import sys, argparse, maskconnect.cli.report as r; r.add_report_arguments(argparse.ArgumentParser()); "
            "bad = {'pandas', 'scipy', 'seaborn', 'matplotlib'} & set(sys.modules); assert not bad, bad; "
            # ... and building a report never needs torch or mlflow.
            "import maskconnect.report.build; "
            "bad = {'torch', 'mlflow'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
