"""The benchmarks (bench/): a CPU smoke run of every benchmark, the naive per-branch reference against
the vectorised model, the projection arithmetic, the statistics and the goal bookkeeping."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench  # the repository's bench/ package (tests/conftest.py puts the repository root on sys.path)
from bench.common import Context, goal, summarize
from bench.naive import naive_forward
from bench.projection import BUILTIN_GRIDS, RECIPE, Run, project, run_hours, steps_per_epoch, suite_grids
from bench.workloads import Config, flops_per_image
from maskconnect.models import MaskedResNeXt
from maskconnect.specs import make_spec

ROOT = Path(__file__).resolve().parents[1]

TIMED = ("throughput", "naive", "mixing", "torchvision", "inference", "datapath", "projection")
GPU_GOALS = {"throughput": "learned_k4_vs_full_throughput", "naive": "vectorised_vs_naive",
             "torchvision": "ours_vs_torchvision_resnext50", "datapath": "datapath_overhead"}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the CPU smoke run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: on a shared 2-core machine two threads per process oversubscribe the cores badly.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--device", "cpu", "--threads", "1",
                           "--out", str(out), "--tag", "smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _record(out: Path, name: str) -> dict:
    paths = sorted(out.glob(f"{name}-cpu-smoke.json"))
    assert len(paths) == 1, f"{name}: {sorted(p.name for p in out.iterdir())}"
    return json.loads(paths[0].read_text())


@pytest.mark.parametrize("name", TIMED)
def test_smoke_record_has_the_required_fields(smoke, name):
    out, _ = smoke
    rec = _record(out, name)
    for key in ("device", "device_name", "torch_version", "dtype", "batch", "warmup", "repeats", "config",
                "results", "goals", "timing", "created_utc"):
        assert key in rec, key
    assert rec["device"] == "cpu" and rec["cuda_version"] is None and rec["quick"] is True
    assert rec["dtype"] == "float32" and rec["warmup"] >= 1 and rec["repeats"] >= 1
    assert rec["results"], "no measurements"
    for r in rec["results"]:
        assert r["median"] > 0 and math.isfinite(r["median"])
        assert set(r["spread"]) == {"q1", "q3", "iqr", "min", "max"}
        assert r["spread"]["min"] <= r["median"] <= r["spread"]["max"]
        assert r["repeats"] == rec["repeats"] or name == "throughput"  # ImageNet rows use their own count
        assert len(r["samples"]) == r["repeats"]
        assert r["images_per_s"]["median"] > 0


@pytest.mark.parametrize("name", sorted(GPU_GOALS))
def test_smoke_goals_are_undecided_on_quick_configs(smoke, name):
    """--quick measures other configs (or inputs) than the goals name: the value is kept, no verdict."""
    rec = _record(smoke[0], name)
    goals = {g["id"]: g for g in rec["goals"]}
    g = goals[GPU_GOALS[name]]
    assert g["met"] is None and "--quick" in g["why_null"]
    assert g["decided_on"] == "cpu" and "GPU" in g["caveat"]
    assert isinstance(g["value"], float) and math.isfinite(g["value"])  # measured anyway, for information


def test_smoke_mixing_record(smoke):
    rec = _record(smoke[0], "mixing")
    rows = {r["name"].split(": ", 1)[1]: r for r in rec["results"]}
    # no --compile on a CPU: the eager variants only, and the record says why
    assert set(rows) == {"Fixed-Full tail", "masked, matmul", "masked, bmm"}
    assert any("--compile" in n for n in rec["notes"])
    assert rows["Fixed-Full tail"]["time_vs_full_tail"] == 1.0
    assert all(r["time_vs_full_tail"] > 0 for r in rows.values())


def test_smoke_same_maths_checks(smoke):
    out, stdout = smoke
    assert all(r["eval_max_abs_diff_fp32"] < 1e-4 for r in _record(out, "naive")["results"])
    assert _record(out, "torchvision")["config"]["weights_check_max_abs_diff_fp32"] < 1e-4
    inf = _record(out, "inference")["results"]
    assert all(r["pruned_vs_unpruned_max_abs_diff_fp32"] < 1e-4 for r in inf)
    pruned = next(r for r in inf if r["model"] == "learned K=1 pruned")
    unpruned = next(r for r in inf if r["model"] == "learned K=1 unpruned")
    assert pruned["params"] < unpruned["params"]
    assert "goals (all benchmarks)" in stdout


def test_smoke_projection_is_labelled_cpu(smoke):
    out, _ = smoke
    rec = _record(out, "projection")
    assert {g: v["runs"] for g, v in rec["projection"].items()} == {"cifar100": 64, "cifar10": 36, "imagenet": 9,
                                                                    "cifar100-resnet": 100, "imagenet-resnet": 2,
                                                                    "paper": 211}
    assert "CPU projection" in rec["config"]["unit"]
    assert all(v["hours"] > 0 for v in rec["projection"].values())
    md = (out / "projection-cpu.md").read_text()
    assert "CPU projection" in md and "not GPU-hours" in md and "| paper | 211 |" in md


def test_demo_width_record_compares_each_model_with_its_width_64_self_and_full(tmp_path):
    from bench.common import make_context
    from bench.demo_width import KINDS, WIDTHS, run

    ctx = make_context(torch.device("cpu"), quick=True, steps=1, warmup=1, batch=4, out=tmp_path, tag="t")
    rec = json.loads(run(ctx).read_text())
    rows = {(r["stage_width"], r["connectivity"], r["fan_in"]): r for r in rec["results"]}
    assert len(rows) == len(WIDTHS) * len(KINDS) and rec["batch"] == 4
    for (width, conn, k), r in rows.items():
        assert r["time_vs_width_64"] == pytest.approx(r["median"] / rows[(64, conn, k)]["median"])
        assert r["time_vs_full_same_width"] == pytest.approx(r["median"] / rows[(width, "full", 8)]["median"])
    # the same {D,w,C} at half the stage width: fewer weights, the same for every connectivity (masks aside)
    assert rows[(32, "full", 8)]["params"] < rows[(64, "full", 8)]["params"]
    assert {r["params"] for key, r in rows.items() if key[0] == 32} == {rows[(32, "full", 8)]["params"]}


# --- the naive loop is the same maths --------------------------------------------------------------

@pytest.mark.parametrize("connectivity,k", [("learned", 2), ("random", 2), ("learned", 4)])
def test_naive_loop_matches_vectorised_forward_and_gradients(connectivity, k):
    spec = make_spec("20,2,4", connectivity=connectivity, fan_in=k, dataset="synthetic", stage_width=8, image_size=8)
    torch.manual_seed(0)
    a = MaskedResNeXt(spec).train()
    if a.masks.real is not None:  # non-uniform real-valued masks, so the sampled masks vary by row
        with torch.no_grad():
            a.masks.real.uniform_(0.05, 1.0)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    torch.manual_seed(2)  # the same mask draw for both
    out_a = a(x)
    torch.manual_seed(2)
    out_b = naive_forward(b, x)
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-4)
    F.cross_entropy(out_a, y).backward()
    F.cross_entropy(out_b, y).backward()
    grads = 0
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
            grads += 1
    assert grads == len(list(a.parameters()))  # masks included when learned
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):  # running statistics updated alike
        if p.dtype.is_floating_point:
            torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(naive_forward(b, x), a(x), atol=1e-5, rtol=1e-4)


def test_naive_loop_detects_a_different_mask():
    spec = make_spec("20,2,4", connectivity="random", fan_in=2, dataset="synthetic", stage_width=8, image_size=8)
    torch.manual_seed(0)
    model = MaskedResNeXt(spec).eval()
    x = torch.randn(4, 3, 8, 8)
    other = model.masks().clone()
    other[0] = other[0].flip(-1)  # another connectivity for the second module
    with torch.no_grad():
        assert (naive_forward(model, x, masks=other) - model(x)).abs().max() > 1e-3


# --- projection arithmetic -------------------------------------------------------------------------

def test_grid_run_counts_and_steps():
    runs = {g: sum(r.seeds for r in rs) for g, rs in BUILTIN_GRIDS.items()}
    assert runs == {"cifar100": 64, "cifar10": 36, "imagenet": 9, "cifar100-resnet": 100, "imagenet-resnet": 2,
                    "paper": 211}
    assert steps_per_epoch("cifar") == 391 and steps_per_epoch("imagenet") == 5005
    assert RECIPE["cifar"]["epochs"] == 300 and RECIPE["imagenet"]["epochs"] == 100


def test_projection_arithmetic_for_a_made_up_step_time():
    keys = {r.cost_key for rs in BUILTIN_GRIDS.values() for r in rs}
    by_kind = {"full": 0.1, "learned": 0.2, "random": 0.3, "prev": 0.05}
    steps = {k: by_kind[k[2]] for k in keys}
    proj = project(steps, BUILTIN_GRIDS)
    cifar_h = lambda s: s * 391 * 300 / 3600  # noqa: E731
    imnet_h = lambda s: s * 5005 * 100 / 3600  # noqa: E731
    assert run_hours(0.1, "cifar") == pytest.approx(cifar_h(0.1)) == pytest.approx(3.2583333)
    # cifar10: 3 archs x (full, learned K=4, random K=4) x 4 seeds
    assert proj["cifar10"]["hours"] == pytest.approx(3 * 4 * cifar_h(0.1 + 0.2 + 0.3))
    # cifar100: Table 2 (2 archs x full, learned K=1, learned K=4, random K=4) + Fig. 3 ({20,4,8} K=1..7 + full)
    assert proj["cifar100"]["hours"] == pytest.approx(4 * (2 * cifar_h(0.1 + 0.2 + 0.2 + 0.3) + cifar_h(7 * 0.2 + 0.1)))
    assert proj["imagenet"]["hours"] == pytest.approx(3 * imnet_h(0.1 + 0.2 + 0.3))
    # cifar100-resnet: Table 1 (3 depths x prev, random, learned) + Fig. 2 (16 more learned K), 4 seeds
    assert proj["cifar100-resnet"]["hours"] == pytest.approx(4 * (3 * cifar_h(0.05 + 0.3 + 0.2) + 16 * cifar_h(0.2)))
    assert proj["imagenet-resnet"]["hours"] == pytest.approx(imnet_h(0.05 + 0.2))
    parts = ("cifar100", "cifar10", "imagenet", "cifar100-resnet", "imagenet-resnet")
    assert proj["paper"]["hours"] == pytest.approx(sum(proj[g]["hours"] for g in parts))
    assert proj["paper"]["runs"] == 211


def test_grid_training_flops():
    from bench.projection import grid_flops

    f = grid_flops(BUILTIN_GRIDS)
    full_20 = flops_per_image(Config("20,4,8"))
    masked_20 = flops_per_image(Config("20,4,8", "learned", 4))
    assert full_20 == pytest.approx(0.0849e9, rel=0.01)  # describe's count for ResNeXt {20,4,8}
    one = grid_flops({"g": [Run("cifar100", "20,4,8", "full", 8, 2), Run("cifar100", "20,4,8", "learned", 1, 1)]})["g"]
    assert one == pytest.approx((2 * full_20 + masked_20) * 3 * 50000 * 300)
    assert f["paper"] == pytest.approx(sum(f[g] for g in ("cifar100", "cifar10", "imagenet", "cifar100-resnet",
                                                          "imagenet-resnet")))
    assert f["imagenet"] > f["cifar100"] > 0


def test_builtin_grids_equal_the_suite_grids():
    """The benchmarks' fallback copy of the paper grids must not drift from maskconnect.experiments."""
    try:
        suite = suite_grids()
    except ImportError as e:  # pyyaml / jsonschema missing: nothing to compare with
        pytest.skip(f"maskconnect.experiments unavailable: {e}")
    for name, runs in BUILTIN_GRIDS.items():
        assert sorted(map(repr, runs)) == sorted(map(repr, suite[name])), name


def test_cost_key_ignores_k_and_classes():
    assert Run("cifar10", "20,4,8", "learned", 1, 4).cost_key == Run("cifar100", "20,4,8", "learned", 7, 4).cost_key
    assert Run("imagenet", "50,4,32", "full", None, 1).cost_key != Run("cifar100", "50,4,32", "full", None, 1).cost_key


# --- statistics and goals --------------------------------------------------------------------------

def test_summary_statistics_match_numpy():
    xs = [0.31, 0.12, 0.5, 0.2, 0.27, 0.9, 0.15]
    s = summarize(xs)
    assert s["median"] == pytest.approx(np.median(xs))
    assert s["q1"] == pytest.approx(np.percentile(xs, 25)) and s["q3"] == pytest.approx(np.percentile(xs, 75))
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and (s["min"], s["max"]) == (0.12, 0.9)
    with pytest.raises(ValueError):
        summarize([])


def test_goal_verdicts_and_their_device():
    from maskconnect.training.step import Precision

    gpu = Context(torch.device("cuda"), Precision(torch.device("cuda")), env={"device_name": "test GPU"})
    cpu = Context(torch.device("cpu"), Precision(torch.device("cpu")), env={"device_name": "test CPU"})
    assert goal("g", "", value=0.9, threshold=0.85, ctx=gpu, measured_on="x")["met"] is True
    assert goal("g", "", value=0.8, threshold=0.85, ctx=gpu, measured_on="x")["met"] is False
    assert goal("g", "", value=0.04, threshold=0.05, below=True, ctx=gpu, measured_on="x")["met"] is True
    assert goal("g", "", value=0.06, threshold=0.05, below=True, ctx=gpu, measured_on="x")["met"] is False
    g = goal("g", "", value=0.9, threshold=0.85, ctx=gpu, measured_on="x")
    assert g["decided_on"] == "gpu" and "caveat" not in g and "why_null" not in g
    g = goal("g", "", value=0.9, threshold=0.85, ctx=gpu, measured_on="x", valid=False, why_not="subset")
    assert g["met"] is None and g["why_null"] == "subset"
    g = goal("g", "", value=float("nan"), threshold=0.85, ctx=gpu, measured_on="x")
    assert g["met"] is None and "no value" in g["why_null"]
    # a GPU goal measured on a CPU gets a verdict for that CPU, with the caveat
    g = goal("g", "", value=0.8, threshold=0.85, ctx=cpu, measured_on="x")
    assert g["met"] is False and g["decided_on"] == "cpu" and "says nothing about a GPU" in g["caveat"]


# --- command line ----------------------------------------------------------------------------------

def test_maskconnect_bench_forwards_and_reports_bad_input(capfd):
    # `maskconnect bench` runs `python -m bench` in a child process: its output is the child's (capfd)
    from maskconnect.cli import main

    assert main(["bench", "throughput", "--device", "no-such-device"]) == 2
    assert "device" in capfd.readouterr().err
    assert main(["bench", "--help"]) == 0
    assert "maskconnect bench" in capfd.readouterr().out


def test_maskconnect_bench_outside_a_checkout(tmp_path, monkeypatch, capsys):
    from maskconnect.cli import bench as bench_command, main

    monkeypatch.setattr(bench_command, "REPO_ROOT", tmp_path)
    assert main(["bench", "all", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "maskconnect bench: error:" in err and "checkout" in err and str(tmp_path) in err


def test_the_package_never_imports_the_benchmarks():
    # bench/ imports maskconnect, never the reverse: the subcommand leaves `bench` to its child process
    code = ("import sys; from maskconnect.cli import main; assert main(['bench', '--help']) == 0; "
            "assert 'bench' not in sys.modules and not any(m.startswith('bench.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT / "src")


def test_cuda_check_code_runs_with_cpu_bf16(tmp_path):
    assert bench.main(["cuda-check", "--quick", "--device", "cpu", "--allow-cpu", "--out", str(tmp_path),
                       "--tag", "t"]) == 0
    rec = json.loads((tmp_path / "cuda-check-cpu-t.json").read_text())
    assert rec["passed"] is True
    fp32 = [r for r in rec["results"] if r["variant"] == "fp32 channels_last"]
    assert fp32 and all(r["logits_rel_l2"] < 1e-5 for r in fp32)


def test_cuda_check_without_cuda_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["cuda-check", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert not list(tmp_path.iterdir())


def test_largest_batch_search(monkeypatch):
    from bench import workloads

    tried = []

    def fake_fits(cfg, batch, ctx):
        tried.append(batch)
        return batch <= 100

    monkeypatch.setattr(workloads, "fits", fake_fits)
    assert workloads.largest_batch(None, None) == 96  # 8..64 fit, 128 does not, the midpoint 96 does
    assert tried == [8, 16, 32, 64, 128, 96]
    assert workloads.largest_batch(None, None, cap=64) == 64
    monkeypatch.setattr(workloads, "fits", lambda cfg, b, ctx: False)
    assert workloads.largest_batch(None, None) is None


@pytest.mark.parametrize("arch", ["20,4,8", "29,8,8"])
def test_a_learned_step_dispatches_at_most_twice_the_ops_of_fixed_full(arch):
    """Small models are launch-bound on a GPU: one Learned K=4 training step on the path CUDA runs
    (bench/costparts.py counts its non-view aten ops with a dispatch mode, on any device) may dispatch at
    most 2x Fixed-Full's. The projection's 50-step bisection alone used to add about 350."""
    from bench.costparts import step_ops

    full = sum(step_ops(arch, "cifar100", None, None, batch=2).values())
    learned = step_ops(arch, "cifar100", "learned", 4, batch=2)
    assert sum(learned.values()) <= 2 * full, (sum(learned.values()), full, learned.most_common(5))
    assert learned["bmm"] > 0 and learned["topk"] > 0   # the mixing and the sampling were counted
