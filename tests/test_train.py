"""Training runs: the reference digits run, resume after SIGKILL, determinism, errors, tracking."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskconnect.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--arch", "11,2,4", "--stage-width", "8", "--no-track", "--progress", "lines"]


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "maskconnect", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


def _history(run):
    with open(Path(run) / "history.csv") as f:
        return list(csv.DictReader(f))


def test_issue_digits_learned_run(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code = main(["train", "--dataset", "digits", "--arch", "20,4,8", "--connectivity", "learned", "--fan-in", "4",
                 "--recipe", "smoke", "--epochs", "3", "--seed", "0", "--out", str(out), "--no-track", "--progress", "none"])
    elapsed = time.perf_counter() - t0
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "top5", "best_top1", "best_top5", "params_train", "params_test", "flops", "epochs",
                "wall_time_s", "device", "seed", "config", "versions"):
        assert key in m, key
    assert m["top1"] > 80.0, m["top1"]
    assert m["epochs"] == 3 and m["seed"] == 0 and m["config"]["fan_in"] == 4
    assert m["stage_width"] == 64 and m["config"]["stage_width"] is None  # resolved: the paper's {20,4,8}
    from maskconnect.connectivity import count_weights
    from maskconnect.models import build_model
    from maskconnect.specs import make_spec

    expected = count_weights(build_model(make_spec("20,4,8", dataset="digits", connectivity="full")))
    assert m["params_test"] <= m["params_train"] == expected  # a masked model has ResNeXt's weights
    rows = _history(out)
    assert [r["phase"] for r in rows] == ["joint", "joint", "finetune"]   # frozen at the first LR drop
    assert sum(int(r["mask_changed"]) for r in rows if r["phase"] == "joint") > 0  # masks moved
    assert int(rows[-1]["mask_changed"]) == 0
    masks = json.loads((out / "masks.json").read_text())
    binary = torch.tensor(masks["masks"])
    assert binary.shape == (5, 8, 8) and (binary.sum(-1) == 4).all()
    assert (out / "pruned.pt").exists() and (out / "checkpoint.pt").exists()
    print(f"digits learned K=4, 3 epochs: {elapsed:.1f}s, top1 {m['top1']:.2f}")


def test_sigkill_then_rerun_resumes_bit_identical(tmp_path, same_threads):
    args = [*TINY, "--connectivity", "learned", "--fan-in", "2", "--recipe", "smoke", "--epochs", "4", "--seed", "5"]  # frozen after epoch 2
    ref = tmp_path / "ref"
    assert main(["train", *args, "--out", str(ref)]) == 0   # in this process, on same_threads' one thread

    out = tmp_path / "killed"
    # killed right after epoch 2's checkpoint (train()'s kill_after_epoch hook: os._exit, as a SIGKILL);
    # it and the rerun run on one thread too, whatever OMP_NUM_THREADS says
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "train_hooks.py"), "--kill-after", "2", "--", *args,
                             "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, **same_threads})
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert done == 2

    rerun = _cli("train", *args, "--out", str(out), env=same_threads)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after epoch {done}/4" in rerun.stderr
    a, b = json.loads((ref / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    assert a["device"] == b["device"] and "1 threads" in a["device"]   # the pin took: "cpu (<processor>, 1 threads)"
    for key in ("top1", "top5", "test_loss", "best_top1", "params_test"):
        assert a[key] == b[key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(_history(ref)) == strip(_history(out))
    assert json.loads((ref / "masks.json").read_text()) == json.loads((out / "masks.json").read_text())

    # the same command once more: complete, nothing to do, nothing rewritten
    mtime = (out / "metrics.json").stat().st_mtime_ns
    again = _cli("train", *args, "--out", str(out))
    assert again.returncode == 0 and "already complete" in again.stderr
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


def test_same_seed_same_result_different_seed_differs(tmp_path):
    args = [*TINY, "--connectivity", "random", "--fan-in", "2", "--epochs", "2"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert main(["train", *args, "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    a, b, c = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in "abc")
    assert a["test_loss"] == b["test_loss"] and a["top1"] == b["top1"]
    assert a["test_loss"] != c["test_loss"]


def test_output_dir_of_a_different_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code = main(["train", *TINY, "--epochs", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a different run" in err and "epochs=1 there, 2 here" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --replace moves it aside, never deletes it
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--replace"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.json").read_bytes() == before["metrics.json"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--epochs", "3", "--milestones", "1", "--set", "gamma=1e12", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "epoch 2" in err and "last good checkpoint (after epoch 1)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "metrics.json").exists()
    assert len(_history(out)) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "mnist", "--arch", "20,4,8"], "invalid dataset='mnist'"),
        (["--dataset", "digits", "--arch", "20,4,8", "--recipe", "fast"], "invalid choice: 'fast'"),
        (["--dataset", "digits", "--arch", "20,4,8", "--epochs", "0"], "invalid epochs=0"),
        (["--dataset", "digits", "--arch", "20,4,8", "--freeze-epoch", "99", "--epochs", "3"], "invalid freeze_epoch=99"),
        (["--dataset", "digits", "--arch", "20,4,8", "--connectivity", "learned", "--fan-in", "9"], "invalid fan_in=9"),
        (["--dataset", "digits", "--arch", "20,4,8", "--set", "nonsense=1"], "invalid set='nonsense'"),
        (["--dataset", "digits", "--arch", "20,4,8", "--momentum", "-1"], "invalid momentum=-1.0"),
        (["--dataset", "digits", "--arch", "20,4,8", "--set", "label_smoothing=2"], "invalid label_smoothing=2"),
        (["--dataset", "digits", "--arch", "20,4,8", "--set", "milestones=5"], "invalid milestones=5"),
        (["--dataset", "digits", "--arch", "20,4,8", "--set", "synthetic=3"], "invalid synthetic=3"),
    ],
)
def test_bad_training_input_exits_2(tmp_path, capsys, args, needle):
    if "invalid choice" in needle:  # argparse's own check: it exits 2 itself
        with pytest.raises(SystemExit) as exc:
            main(["train", *args, "--out", str(tmp_path / "r"), "--no-track"])
        code = exc.value.code
    else:
        code = main(["train", *args, "--out", str(tmp_path / "r"), "--no-track"])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # validated before anything is written


def test_missing_imagenet_and_corrupted_cifar_exit_2(tmp_path):
    r = _cli("train", "--dataset", "imagenet", "--arch", "50,4,32", "--data-dir", str(tmp_path / "nope"),
             "--out", str(tmp_path / "r1"), "--no-track", "--device", "cpu")
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "cifar"
    (bad / "cifar-10-batches-py").mkdir(parents=True)
    (bad / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    (bad / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"corrupted")
    r = _cli("prepare-data", "--dataset", "cifar10", "--data-dir", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(bad) in r.stderr
    assert (bad / "cifar-10-python.tar.gz").read_bytes() == b"not a tarball"  # nothing destroyed


def test_evaluate_pruned_model_matches(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--connectivity", "random", "--fan-in", "1", "--epochs", "1", "--out", str(out)]) == 0
    assert main(["evaluate", "--run", str(out), "--device", "cpu"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert ev["model"]["test_top1"] == pytest.approx(m["top1"])
    assert ev["pruned"]["test_top1"] == pytest.approx(ev["model"]["test_top1"])
    assert abs(ev["pruned"]["test_loss"] - ev["model"]["test_loss"]) < 1e-4
    assert ev["params_test"] == m["params_test"] < ev["params_train"]


def test_eight_parallel_runs_land_in_one_fresh_mlflow_store(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-m", "maskconnect", "train", "--dataset", "synthetic", "--arch", "11,2,2",
                               "--stage-width", "4", "--set", 'synthetic={"train_size": 64, "test_size": 32, "image_size": 8}',
                               "--epochs", "2", "--seed", str(i), "--out", str(tmp_path / f"r{i}"), "--tracking-uri", uri,
                               "--experiment", "parallel", "--progress", "none"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("parallel")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 8
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_top1")]
        assert sorted(steps) == [1, 2]
        assert run.data.tags["seed"] in {str(i) for i in range(8)} and "git_commit" in run.data.tags


def test_torchrun_two_processes_cpu(tmp_path):
    """Data-parallel training (gloo on CPU): each rank takes half of every global batch, the LR is
    scaled by the global batch, and masks freeze mid-run without DDP complaining."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(port), "-m", "maskconnect", "train", *TINY, "--connectivity", "learned",
                        "--fan-in", "2", "--recipe", "smoke", "--epochs", "2", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _history(out)
    assert [row["phase"] for row in rows] == ["joint", "finetune"]
    assert float(rows[0]["lr"]) == pytest.approx(0.2)  # smoke LR 0.1 for batch 64; global batch 2 x 64
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"


def test_masks_freeze_at_the_first_lr_drop_whatever_the_order(tmp_path):
    from maskconnect.training.config import TrainConfig

    c = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2, epochs=10, milestones=[8, 3],
                    recipe="smoke").resolved()
    assert c.milestones == [3, 8] and c.freeze_epoch == 3
    for recipe in ("paper", "paper-imagenet"):
        c = TrainConfig(dataset="cifar100", arch="29,8,8", connectivity="learned", fan_in=4, recipe=recipe).resolved()
        assert c.freeze_epoch == c.milestones[0] and c.mask_lr is None  # the paper: masks follow the weight LR


def test_the_demo_recipe_is_the_demo_schedule_one_settling_epoch_after_the_drop():
    """The demo recipe carries the demo grid's schedule (docs/design.md section 9): 18 epochs, LR /10 after
    9 and 14, mask LR 2.0, masks frozen one epoch after the first drop; a shorter run keeps its shape."""
    from maskconnect.training.config import TrainConfig

    c = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2).resolved()
    assert (c.epochs, c.milestones, c.freeze_epoch, c.mask_lr) == (18, [9, 14], 10, 2.0)
    c = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2, epochs=6).resolved()
    assert (c.milestones, c.freeze_epoch) == ([3, 4], 4)
    c = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2, epochs=2).resolved()
    assert (c.milestones, c.freeze_epoch) == ([1], 2)  # never past the end of the run
    c = TrainConfig(dataset="digits", arch="20,4,8", connectivity="learned", fan_in=2, freeze_epoch=3, mask_lr=0.5).resolved()
    assert (c.freeze_epoch, c.mask_lr) == (3, 0.5)  # given values win over the recipe's


def test_run_files_are_readable_by_others(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "checkpoint.pt", "history.csv", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


_FAULTS = r"""
import resource, sys, torch
from maskconnect.training.device import tune_cpu_allocator
done = tune_cpu_allocator() if sys.argv[1] == "tune" else None
torch.empty(16 << 20).fill_(1.0)  # 64 MiB, like a {29,64,8} branch-stacked tensor at batch 8
for _ in range(8):  # settle
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16 << 20).fill_(1.0)
print(done, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 8)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_allocator_tuning_reuses_large_blocks_instead_of_faulting_fresh_pages():
    """Real page-fault counts per 64 MiB tensor: without the tuning each is a fresh mmap whose 16k pages
    all fault (measured 16384); with it the freed block is reused (measured 4096). A user's own MALLOC_*
    setting, or MASKCONNECT_TUNE_MALLOC=0, wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)

    def faults(mode, **extra):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    done, tuned = faults("tune")
    _, plain = faults("plain")
    assert done == "True"
    assert plain > 10_000 and tuned < plain / 2
    assert faults("tune", MASKCONNECT_TUNE_MALLOC="0")[0] == "False"
    assert faults("tune", MALLOC_MMAP_THRESHOLD_="65536")[0] == "False"
