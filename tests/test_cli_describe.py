"""`maskconnect describe` and the errors a bad spec gets."""

import json
import subprocess
import sys

import pytest

from maskconnect.cli import main


def _describe(capsys, *args):
    code = main(["describe", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_describe_json_keys_and_values(capsys):
    code, out, _ = _describe(capsys, "--dataset", "cifar100", "--arch", "29,8,8", "--connectivity", "random",
                             "--fan-in", "1", "--seed", "3", "--json")
    assert code == 0
    info = json.loads(out)
    for key in ("params_train", "params_test", "flops", "masks", "modules", "branches_train", "branches_test"):
        assert key in info
    assert info["params_test"] < info["params_train"]       # K=1: the seed's masks leave branches unread
    assert info["masks"] == (info["modules"] - 1) * 8 * 8    # counted apart from weights
    assert info["modules"] == 9 and info["branches_train"] == 72
    _, full_out, _ = _describe(capsys, "--dataset", "cifar100", "--arch", "29,8,8", "--json")
    full = json.loads(full_out)
    # the masked model adds the mixing matmuls and per-branch projections; pruning removes work
    assert info["flops"] > full["flops"] > 0
    assert info["flops_test"] < info["flops"]


def test_describe_learned_before_training_prunes_nothing(capsys):
    code, out, _ = _describe(capsys, "--dataset", "cifar10", "--arch", "20,4,8", "--connectivity", "learned",
                             "--fan-in", "4", "--json")
    info = json.loads(out)
    assert code == 0 and info["params_test"] == info["params_train"]


def test_describe_full_flops_are_twice_the_macs(capsys):
    # ResNeXt-50 32x4d: 4.26 GMACs per 224x224 image (torchvision's documented 4.23 GFLOPS are MACs)
    code, out, _ = _describe(capsys, "--dataset", "imagenet", "--arch", "50,4,32", "--json")
    info = json.loads(out)
    assert code == 0 and abs(info["flops"] / 2 - 4.26e9) / 4.26e9 < 0.02
    assert info["params_train"] == 25028904  # torchvision resnext50_32x4d


def test_describe_text_output(capsys):
    code, out, _ = _describe(capsys, "--dataset", "cifar100", "--arch", "20,4,8")
    assert code == 0 and "params train" in out and "0.273M" in out


@pytest.mark.parametrize(
    "args,field",
    [
        (["--dataset", "cifar100", "--arch", "29,8,8", "--connectivity", "learned", "--fan-in", "0"], "fan_in"),
        (["--dataset", "cifar100", "--arch", "29,8,8", "--connectivity", "random", "--fan-in", "9"], "fan_in"),
        (["--dataset", "cifar100", "--arch", "29,8,8", "--connectivity", "learned"], "fan_in"),
        (["--dataset", "cifar100", "--arch", "30,8,8"], "depth"),
        (["--dataset", "imagenet", "--arch", "29,4,32"], "depth"),
        (["--dataset", "svhn", "--arch", "29,8,8"], "dataset"),
        (["--dataset", "cifar100", "--arch", "29,8,8", "--connectivity", "dense"], "connectivity"),
        (["--dataset", "cifar100", "--arch", "29,0,8"], "width"),
        (["--dataset", "cifar100", "--arch", "29,8,-2"], "cardinality"),
        (["--dataset", "cifar100", "--arch", "29,8"], "arch"),
    ],
)
def test_bad_specs_exit_2_naming_field(capsys, args, field):
    code, out, err = _describe(capsys, *args)
    assert code == 2
    assert f"invalid {field}=" in err
    assert out == ""
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback


def test_entry_point_exit_code_and_help():
    bad = subprocess.run([sys.executable, "-m", "maskconnect", "describe", "--dataset", "cifar100", "--arch", "29,8,8",
                          "--connectivity", "random", "--fan-in", "12"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid fan_in=12" in bad.stderr and "1 <= K <= C=8" in bad.stderr
    helptext = subprocess.run([sys.executable, "-m", "maskconnect", "describe", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "--fan-in" in helptext.stdout
