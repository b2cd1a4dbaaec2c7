"""Mask update rules, mask statistics, seeded tie-breaking at freezing, and the mask columns of
history.csv (docs/design.md sections 4, 8 and 11). The identity share and the initial gamma of the shared last BN are in
tests/test_models.py.

References here are computed from the definitions (docs/design.md sections 3, 4, 8 and 11), never read back from the
attributes of the code under test.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from maskconnect.cli import main
from maskconnect.connectivity import MaskBank, freeze_masks, mask_banks, mask_stats, tied_rows, topk_masks
from maskconnect.errors import ConfigError
from maskconnect.mask_rules import MASK_RULES, mask_rule, project_capped_simplex
from maskconnect.models import build_model
from maskconnect.specs import make_spec

SMALL = dict(dataset="synthetic", stage_width=8, num_classes=5, image_size=8)


def _bank(rows=(3, 6, 6), k=2, rule_init=None, seed=0):
    torch.manual_seed(seed)
    b = MaskBank(rows[0], rows[1], k, "learned")
    with torch.no_grad():
        b.real.copy_(torch.rand(rows) if rule_init is None else rule_init)
    return b


# --- the rules --------------------------------------------------------------------------------------

def test_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="mask_rule.*clip.*centred.*projected"):
        mask_rule("softmax")


def test_clip_rule_clips_and_leaves_gradient_alone():
    b = _bank()
    b.real.grad = torch.randn_like(b.real)
    g = b.real.grad.clone()
    with torch.no_grad():
        b.real.mul_(3).sub_(1)  # entries in [-1, 2]
    raw = b.real.detach().clone()
    MASK_RULES["clip"].before_step([b])
    assert torch.equal(b.real.grad, g)
    MASK_RULES["clip"].after_step([b])
    assert torch.equal(b.real, raw.clamp(0, 1))


def test_centred_rule_removes_row_mean_and_keeps_row_sums_inside_bounds():
    b = _bank()
    with torch.no_grad():
        b.real.mul_(0.5).add_(0.25)  # entries in [0.25, 0.75]: no bound reached by a small step
    b.real.grad = torch.randn_like(b.real) * 0.01 + 0.05  # a large common mode, as measured
    sums = b.real.detach().sum(-1).clone()
    opt = torch.optim.SGD([b.real], lr=1.0)
    rule = MASK_RULES["centred"]
    rule.before_step([b])
    assert torch.allclose(b.real.grad.sum(-1), torch.zeros(3, 6), atol=1e-6)
    opt.step()
    rule.after_step([b])
    assert torch.allclose(b.real.sum(-1), sums, atol=1e-5)  # the common mode moved nothing
    assert b.real.min() >= 0 and b.real.max() <= 1


def _reference_projection(v: np.ndarray, k: int) -> np.ndarray:
    """argmin ||m - v||^2 over m in [0,1]^C, sum m = k: an independent solver (scipy SLSQP)."""
    res = optimize.minimize(lambda m: float(((m - v) ** 2).sum()), np.full_like(v, k / len(v)),
                            jac=lambda m: 2 * (m - v), bounds=[(0, 1)] * len(v),
                            constraints=[{"type": "eq", "fun": lambda m: m.sum() - k}], method="SLSQP",
                            options={"ftol": 1e-12, "maxiter": 500})
    assert res.success
    return res.x


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_projection_matches_an_independent_solver(k):
    g = torch.Generator().manual_seed(k)
    v = torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.7 + 0.3
    p = project_capped_simplex(v, k)
    for row, got in zip(v.numpy(), p.numpy()):
        np.testing.assert_allclose(got, _reference_projection(row, k), atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_projection_of_rows_with_different_candidates_matches_the_solver_on_each_row(k):
    """A ResNet's rows (candidates 1..L-1): each row projected onto its own capped simplex, the sum K_j =
    min(K, candidates), the entries outside its candidates 0."""
    from maskconnect.connectivity import candidate_masks

    counts = [1, 2, 4, 6, 9]
    valid = candidate_masks(counts)
    g = torch.Generator().manual_seed(k)
    v = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 0.7 + 0.3) * valid
    p = project_capped_simplex(v, k, valid)
    for row, n, got in zip(v.numpy(), counts, p.numpy()):
        want = np.ones(n) if n <= k else _reference_projection(row[:n], k)
        np.testing.assert_allclose(got[:n], want, atol=1e-5)
        assert (got[n:] == 0).all()


def test_projection_in_float32_on_degenerate_rows():
    k = 3
    rows = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0],                 # K-hot: a vertex, kept
                         [0.5] * 8,                                 # uniform: K/C everywhere
                         [9, -7, 3.5, 0, 0, 0, 2, -1],              # gaps far larger than 1
                         [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 5]],   # one entry above the bound
                        dtype=torch.float32)
    p = project_capped_simplex(rows, k)
    assert p.dtype == torch.float32
    for row, got in zip(rows.double().numpy(), p.numpy()):
        np.testing.assert_allclose(got, _reference_projection(row, k), atol=1e-5)
    assert torch.equal(p[0], rows[0]) and torch.allclose(p[1], torch.full((8,), 3 / 8))


def test_centred_rule_centres_the_gradient_before_the_optimiser_step():
    """Through the training step itself: under `centred` a step moves no row sum (entries away from
    the bounds, plain SGD); under `clip` the same step does (the gradient's common mode)."""
    from maskconnect.connectivity import param_groups
    from maskconnect.training.step import Precision, train_step

    sums = {}
    for name in ("centred", "clip"):
        torch.manual_seed(0)
        model = build_model(make_spec("20,2,4", connectivity="learned", fan_in=2, **SMALL)).train()
        opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=0.0, mask_lr=0.5), lr=0.1)
        real = mask_banks(model)[0].real
        before = real.detach().sum(-1).clone()
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
        train_step(model, opt, x, y, Precision.for_device("cpu"), rule=name)
        assert real.min() > 0 and real.max() < 1          # no bound reached: only the rule acts
        sums[name] = (real.detach().sum(-1) - before).abs().max().item()
    assert sums["centred"] < 1e-5 < sums["clip"], sums


def test_projected_rule_invariants():
    k = 3
    b = _bank(rows=(4, 8, 8), k=k)
    rule = MASK_RULES["projected"]
    rule.after_step([b])
    r = b.real.detach().clone()
    assert torch.allclose(r.sum(-1), torch.full((4, 8), float(k)), atol=1e-5)   # rows on the hull: sum K
    assert r.min() >= 0 and r.max() <= 1
    rule.after_step([b])
    assert torch.allclose(b.real, r, atol=1e-6)                                   # idempotent
    # the common mode is removed: adding a constant to a row projects to the same point
    shifted = project_capped_simplex(r + 0.37, k)
    assert torch.allclose(shifted, r, atol=1e-5)
    # K-hot rows (the vertices of the hull) are fixed points, and at most K entries fit at 1.0
    hot = topk_masks(torch.rand(4, 8, 8), k)
    assert torch.equal(project_capped_simplex(hot, k), hot)
    assert int((project_capped_simplex(torch.rand(4, 8, 8) * 5, k) == 1).sum(-1).max()) <= k


def test_projected_rule_cannot_tie_at_the_kth_place_against_zero():
    # a row pushed hard towards few sources: K entries at 1 and the rest at 0, never K+1 at 1
    v = torch.tensor([[5.0, 4.0, 3.0, -2.0, -3.0, -1.0]])
    p = project_capped_simplex(v, 2)
    assert torch.equal(p, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    assert not tied_rows(p, 2).any()


@pytest.mark.parametrize("name", sorted(MASK_RULES))
def test_rules_leave_frozen_and_random_banks_alone(name):
    learned = _bank()
    learned.freeze()
    with torch.no_grad():
        learned.real.mul_(4).sub_(1.5)       # out of [0, 1] and off the hull: any rule would move it
    learned.real.grad = torch.randn_like(learned.real) + 1.0
    grad = learned.real.grad.clone()
    before = learned.real.detach().clone()
    rnd = MaskBank(3, 6, 2, "random", seed=0)
    binary = rnd.fixed.clone()
    MASK_RULES[name].before_step([learned, rnd])
    MASK_RULES[name].after_step([learned, rnd])
    assert torch.equal(learned.real, before) and torch.equal(rnd.fixed, binary)
    assert torch.equal(learned.real.grad, grad)


# --- statistics and ties ----------------------------------------------------------------------------

def test_mask_stats_on_a_hand_made_bank():
    real = torch.tensor([[[1.0, 1.0, 1.0, 0.0],      # K=2: three at 1 -> decided by a tie
                          [0.9, 0.6, 0.2, 0.0],      # margin 0.4
                          [0.5, 0.5, 0.5, 0.5]]])    # uniform: a tie, entropy ln 4
    s = mask_stats(real, 2)
    assert s["mask_ties"] == 2
    assert s["mask_at_1"] == pytest.approx(3 / 12) and s["mask_at_0"] == pytest.approx(2 / 12)
    assert s["mask_mean"] == pytest.approx(float(real.mean()))
    assert s["mask_margin"] == pytest.approx((0.0 + 0.4 + 0.0) / 3)
    p = np.array([0.9, 0.6, 0.2, 1e-6]) / (1.7 + 1e-6)
    h = (math.log(3) + float(-(p * np.log(p)).sum()) + math.log(4)) / 3
    assert s["mask_entropy"] == pytest.approx(h, rel=1e-5)


def test_freeze_breaks_exact_ties_with_a_seeded_draw_and_counts_them():
    rows, c, k = 400, 8, 2
    real = torch.full((1, rows, c), 0.5)          # every row saturated: all tied
    masks = []
    for seed in (3, 3, 4):
        b = MaskBank(1, c, k, "learned")  # then given 400 rows of C sources
        b.real = torch.nn.Parameter(real.clone())
        b.fixed = torch.zeros(1, rows, c)
        assert b.freeze(generator=torch.Generator().manual_seed(seed)) == rows
        assert b.tied_at_freeze == rows
        masks.append(b.fixed.clone())
    assert torch.equal(masks[0], masks[1])        # same seed, same draw
    assert not torch.equal(masks[0], masks[2])    # another seed, another draw
    assert (masks[0].sum(-1) == k).all()
    # not by index: every source is chosen about equally often (chi-square, 400 rows x 2)
    counts = masks[0][0].sum(0).numpy()
    assert stats.chisquare(counts).pvalue > 0.001, counts
    assert counts[0] < rows                       # index order would pick source 0 in every row


def test_freeze_without_ties_is_plain_topk_and_reports_zero():
    spec = make_spec("20,2,4", connectivity="learned", fan_in=2, **SMALL)
    model = build_model(spec)
    with torch.no_grad():
        mask_banks(model)[0].real.copy_(torch.rand_like(mask_banks(model)[0].real))
    real = mask_banks(model)[0].real.detach().clone()
    assert freeze_masks(model, seed=0) == 0
    expect = np.zeros(real.shape, dtype=np.float32)
    np.put_along_axis(expect, np.argsort(-real.numpy(), axis=-1)[..., :2], 1.0, axis=-1)
    assert np.array_equal(mask_banks(model)[0].fixed.numpy(), expect)


def test_evaluation_before_freezing_and_freezing_break_ties_the_same_way():
    spec = make_spec("20,2,4", connectivity="learned", fan_in=2, seed=3, **SMALL)
    model = build_model(spec).eval()
    seen = model.masks()                       # init 0.5 everywhere: every row tied
    assert freeze_masks(model) == seen.shape[0] * seen.shape[1]
    assert torch.equal(model.masks(), seen)    # the wiring evaluated before freezing is the one frozen


def test_tie_count_survives_a_checkpoint():
    spec = make_spec("20,2,4", connectivity="learned", fan_in=2, **SMALL)
    a, b = build_model(spec), build_model(spec)
    assert freeze_masks(a, seed=1) == mask_banks(a)[0].real.shape[0] * 4  # init 0.5 everywhere: all tied
    b.load_state_dict(a.state_dict())
    assert mask_banks(b)[0].frozen and mask_banks(b)[0].tied_at_freeze == mask_banks(a)[0].tied_at_freeze


# --- the training loop's mask columns ---------------------------------------------------------------

NEW_COLUMNS = ("mask_mean", "mask_at_0", "mask_at_1", "mask_margin", "mask_ties")


@pytest.mark.parametrize("rule", ["projected", "clip"])
def test_history_has_the_mask_columns_and_metrics_count_ties(tmp_path, rule, capsys):
    out = tmp_path / rule
    # clip: a mask LR so large that every step drives each entry to 0 or 1 (|lr * g| >> 1), so a row of
    # C=4 is tied at freezing unless exactly K=2 of its entries are at 1. At mask LR 20 how many of the 8
    # rows saturated depended on the trajectory, i.e. on the CPU's rounding: 3, 1, 1, 0 tied rows for
    # seeds 0-3 on one CPU. At 1000: 5, 4, 7, 5 (each row tied with p ~ 0.6: none tied ~ 0.4^8 < 1e-3).
    mask_lr = "20" if rule == "projected" else "1000"
    code = main(["train", "--dataset", "digits", "--arch", "11,2,4", "--stage-width", "8", "--connectivity", "learned",
                 "--fan-in", "2", "--epochs", "3", "--freeze-epoch", "2", "--mask-lr", mask_lr, "--mask-rule", rule,
                 "--out", str(out), "--no-track", "--progress", "none"])
    assert code == 0
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for col in NEW_COLUMNS + ("mask_entropy", "mask_changed"):
        assert all(r[col] != "" for r in rows), col
    # the last row describes the final real-valued masks: recompute from masks.json by hand
    real = torch.tensor(json.loads((out / "masks.json").read_text())["real"])
    srt = real.sort(-1, descending=True).values
    last = rows[-1]
    assert float(last["mask_mean"]) == pytest.approx(float(real.mean()), abs=1e-5)
    assert float(last["mask_at_1"]) == pytest.approx(float((real == 1).float().mean()), abs=1e-6)
    assert float(last["mask_at_0"]) == pytest.approx(float((real == 0).float().mean()), abs=1e-6)
    assert float(last["mask_margin"]) == pytest.approx(float((srt[..., 1] - srt[..., 2]).mean()), abs=1e-5)
    m = json.loads((out / "metrics.json").read_text())
    assert m["mask_rule"] == rule and m["mask_tied_rows"] == int(last["mask_ties"])
    assert m["mask_rows"] == real.shape[0] * real.shape[1]
    if rule == "projected":
        assert torch.allclose(real.sum(-1), torch.full(real.shape[:2], 2.0), atol=1e-4)
        assert m["mask_tied_rows"] == 0
    else:  # a huge mask LR under clip: rows saturate, ties decide, and the log says so
        assert float(last["mask_at_1"]) > 0.2 and m["mask_tied_rows"] > 0
        assert "decided by exact ties" in capsys.readouterr().err


def test_bad_mask_rule_exits_2_naming_the_field(tmp_path, capsys):
    code = main(["train", "--dataset", "digits", "--arch", "11,2,4", "--connectivity", "learned", "--fan-in", "2",
                 "--mask-rule", "softmax", "--out", str(tmp_path / "r"), "--no-track"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mask_rule" in err and "softmax" in err and "projected" in err
    assert not (tmp_path / "r").exists()


def test_mask_columns_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--arch", "11,2,4", "--stage-width", "8", "--connectivity", "learned",
                 "--fan-in", "2", "--recipe", "smoke", "--epochs", "2", "--out", str(out), "--tracking-uri", uri, "--progress", "none"]) == 0
    client = MlflowClient(uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    for col in NEW_COLUMNS + ("mask_entropy", "mask_changed"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, col)] == [1, 2], col
    assert run.data.metrics["mask_tied_rows"] == 0 and run.data.params["mask_rule"] == "projected"


# ---- the rule in recipes and grids ------------------------------------------------------------------

def test_every_recipe_names_a_rule_and_the_config_takes_it():
    from maskconnect.training.config import TrainConfig
    from maskconnect.training.schedule import RECIPES

    for name, recipe in RECIPES.items():
        assert recipe["mask_rule"] in MASK_RULES, name
        cfg = TrainConfig(dataset="digits", arch="11,2,4", connectivity="learned", fan_in=2, recipe=name).resolved()
        assert cfg.mask_rule == recipe["mask_rule"]
    over = TrainConfig(dataset="digits", arch="11,2,4", connectivity="learned", fan_in=2, recipe="paper", mask_rule="clip")
    assert over.resolved().mask_rule == "clip"  # an explicit rule beats the recipe's


def test_a_grid_passes_its_rule_to_train_and_rejects_an_unknown_one(tmp_path):
    from maskconnect import experiments as G
    from maskconnect.cli import build_parser

    text = """\
name: rules
defaults: {dataset: digits, seeds: [0], recipe: smoke, device: cpu, train: {mask_rule: %s}}
entries:
  - {arch: "20,4,8", connectivity: learned, fan_ins: [2]}
"""
    path = tmp_path / "rules.yaml"
    path.write_text(text % "centred")
    (run,) = G.load_grid(str(path)).runs
    assert "--mask-rule centred" in G.train_command(run)
    args = build_parser().parse_args(["train", *run.train_args(), "--out", str(tmp_path / "r")])
    assert args.mask_rule == "centred"
    path.write_text(text % "softmax")
    with pytest.raises(ConfigError) as info:
        G.load_grid(str(path))
    assert "mask_rule" in str(info.value) and "softmax" in str(info.value) and "projected" in str(info.value)


def test_the_rule_names_in_the_grid_schema_and_recipes_are_the_code_s():
    # the grid schema (jsonschema, checked before any job) and the recipes spell the rules out;
    # they must stay the rules mask_rules.py implements, and the recipes use the library default
    from maskconnect.mask_rules import DEFAULT_MASK_RULE
    from maskconnect.experiments import SCHEMA_PATH
    from maskconnect.training.schedule import RECIPES

    schema = json.loads(SCHEMA_PATH.read_text())
    enum = schema["$defs"]["settings"]["properties"]["train"]["properties"]["mask_rule"]["enum"]
    assert sorted(enum) == sorted(MASK_RULES)
    assert {r["mask_rule"] for r in RECIPES.values()} == {DEFAULT_MASK_RULE}
