"""Tests of the dataset layer (maskconnect.data) on tiny on-disk fixtures; no download needed."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils

from maskconnect.data import (DATASETS, DataBundle, DatasetInfo, batch_bounds, build_data,
                              crop_flip, dataset_info, epoch_seed)
from maskconnect.errors import ConfigError, DataError


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng, n):
    # values 1..255 so that padding (0) is recognisable after un-normalising
    return rng.integers(1, 256, size=(n, 3072), dtype=np.uint8)


def write_tiny_cifar10(root, per_batch=6, n_test=13, seed=0):
    """cifar-10-batches-py in the real format: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _write_pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                                   "labels": y, "data": x,
                                                   "filenames": [f"f{i}_{k}.png" for k in range(per_batch)]})
        xs.append(x)
        ys += y
    xt, yt = _images(rng, n_test), rng.integers(0, 10, n_test).tolist()
    _write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": yt, "data": xt,
                                          "filenames": [f"t{k}.png" for k in range(n_test)]})
    _write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                            "label_names": [f"class{k}" for k in range(10)]})
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys), xt.reshape(-1, 3, 32, 32), np.array(yt)


def write_tiny_cifar100(root, n_train=20, n_test=9, seed=1):
    """cifar-100-python in the real format: train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n), rng.integers(0, 100, n).tolist()
        _write_pickle(folder / split, {"filenames": [f"{split}{k}.png" for k in range(n)],
                                       "batch_label": f"{split} batch", "fine_labels": fine,
                                       "coarse_labels": [f // 5 for f in fine], "data": x})
        out += [x.reshape(-1, 3, 32, 32), np.array(fine)]
    _write_pickle(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                                    "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    return out


@pytest.fixture
def md5_ok(monkeypatch):
    """Let the hand-written fixture pass torchvision's hard-coded md5 list (files must still exist)."""
    monkeypatch.setattr(tv_utils, "check_md5", lambda fpath, md5, **kw: True)


@pytest.fixture
def cifar10_dir(tmp_path):
    return tmp_path, write_tiny_cifar10(tmp_path)


def _unnormalise(bundle, x):
    return x * bundle.std + bundle.mean


def _collect(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def _reference_augment(img, dy, dx, flip, pad):
    """numpy reference: zero pad, crop at (dy, dx), then mirror."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


# ----------------------------------------------------------------------------- registry, config


def test_registry_and_info():
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "imagenet", "synthetic"}
    assert DATASETS["cifar100"] == DatasetInfo("cifar100", 100, 3, 32, "cifar")
    assert DATASETS["imagenet"].image_size == 224 and DATASETS["imagenet"].layout == "imagenet"
    assert dataset_info("digits") == DatasetInfo("digits", 10, 1, 8, "cifar")
    assert dataset_info("synthetic", image_size=96, num_classes=7).layout == "imagenet"
    assert dataset_info("synthetic", image_size=64).layout == "cifar"
    with pytest.raises(Exception):
        DATASETS["cifar10"].num_classes = 3  # frozen


def test_unknown_dataset_is_config_error():
    for call in (lambda: build_data("mnist"), lambda: dataset_info("mnist")):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.field == "dataset" and err.value.value == "mnist"
        assert "dataset" in str(err.value) and "cifar10" in str(err.value)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        build_data("synthetic", batch_size=0)
    with pytest.raises(ConfigError, match="synthetic"):
        build_data("synthetic", synthetic={"nonsense": 1})
    with pytest.raises(ConfigError, match="synthetic.num_classes"):
        build_data("synthetic", synthetic={"num_classes": 1})


def test_batch_bounds_policy():
    assert batch_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert batch_bounds(11, 3) == [(0, 3), (3, 6), (6, 9), (9, 11)]        # incomplete batch kept
    assert batch_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]                # no batch of one
    assert batch_bounds(10, 3, merge_singleton=False)[-1] == (9, 10)       # test: keep everything
    assert batch_bounds(1, 4) == [(0, 1)]
    assert epoch_seed(0, 1) != epoch_seed(1, 0) and epoch_seed(3, 4) == epoch_seed(3, 4)


def test_crop_flip_matches_reference():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(1, 256, (5, 3, 6, 7), generator=g, dtype=torch.uint8)
    idx = torch.tensor([4, 0, 2, 2, 1])
    dy = torch.tensor([0, 4, 8, 3, 4])
    dx = torch.tensor([8, 4, 0, 5, 1])
    flip = torch.tensor([False, True, True, False, False])
    out = crop_flip(raw, idx, dy, dx, flip, pad=4)
    assert out.shape == (5, 3, 6, 7) and out.dtype == torch.uint8
    for k in range(5):
        ref = _reference_augment(raw[idx[k]].numpy(), int(dy[k]), int(dx[k]), bool(flip[k]), 4)
        assert np.array_equal(out[k].numpy(), ref)
    assert torch.equal(out[1], raw[0].flip(-1))     # centred crop + flip = mirror image
    assert (out[0, :, :, -4:] == 0).all()           # shifted by 4 to the left: zero padding enters
    assert torch.equal(crop_flip(raw, idx, None, None, None, 4), raw[idx])


# ----------------------------------------------------------------------------- digits


def test_digits_fixed_split_and_normalisation():
    a = build_data("digits", seed=0, augment=False, batch_size=256)
    b = build_data("digits", seed=123, augment=False, batch_size=256)
    assert a.info == DATASETS["digits"]
    assert (a.train_size, a.test_size) == (1442, 355) and a.train_size + a.test_size == 1797
    xa, ya = _collect(a.test_batches())
    xb, yb = _collect(b.test_batches())
    assert torch.equal(xa, xb) and torch.equal(ya, yb)                     # split ignores the seed
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert set(a.y_train.tolist()) == set(range(10)) == set(ya.tolist())
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 36                       # stratified 80/20
    x, y = _collect(a.train_batches(0))
    assert x.shape == (1442, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert float(a.mean) == pytest.approx(a.x_train.mean().item())
    assert a.x_train.min() == 0 and a.x_train.max() == 16


def test_digits_are_scikit_learns_load_digits(monkeypatch):
    """The CSV read without importing scikit-learn gives load_digits' images and labels, in its order;
    without the file, load_digits itself is used."""
    from sklearn.datasets import load_digits

    from maskconnect.data import sources

    ref = load_digits()
    for missing in (False, True):
        if missing:
            monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
        pixels, labels = sources._read_digits()
        assert np.array_equal(pixels, ref.data) and np.array_equal(labels, ref.target)
    xtr, ytr, xte, yte, _, _ = sources.load_digits_tensors()
    test = sources.digits_split(ref.target)
    assert torch.equal(xte, torch.from_numpy(ref.images[test].astype(np.float32))[:, None])
    assert torch.equal(ytr, torch.from_numpy(ref.target[~test]))


def test_digits_augmentation_is_shift_without_flip():
    b = build_data("digits", seed=3, batch_size=500)
    draws = b.epoch_draws(2)
    assert draws["flip"] is None
    assert set(draws["dy"].tolist()) == {0, 1, 2} and set(draws["dx"].tolist()) == {0, 1, 2}
    x, _ = next(b.train_batches(2))
    raw = _unnormalise(b, x)
    assert x.shape == (500, 1, 8, 8)
    for k in range(0, 500, 37):
        ref = _reference_augment(b.x_train[draws["perm"][k]].numpy(), int(draws["dy"][k]),
                                 int(draws["dx"][k]), False, 1)
        assert np.allclose(raw[k].numpy(), ref, atol=1e-4)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_shapes_ranges_and_test_order(cifar10_dir, md5_ok):
    root, (xtr, ytr, xte, yte) = cifar10_dir
    b = build_data("cifar10", data_dir=root, download=False, batch_size=8, eval_batch_size=5, seed=1)
    assert isinstance(b, DataBundle) and b.info == DATASETS["cifar10"]
    assert (b.train_size, b.test_size) == (30, 13)
    assert b.x_train.dtype == torch.uint8 and b.x_train.shape == (30, 3, 32, 32)
    assert torch.equal(b.x_train, torch.from_numpy(xtr))                  # HWC -> CHW done right
    batches = list(b.test_batches())
    assert [len(y) for _, y in batches] == [5, 5, 3]                       # nothing dropped
    x, y = _collect(batches)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(yte))                            # in order, each once
    assert torch.allclose(_unnormalise(b, x), torch.from_numpy(xte).float(), atol=1e-3)
    assert -3 < x.min() < -1 and 1 < x.max() < 3                           # normalised range
    train = list(b.train_batches(0))
    assert [len(y) for _, y in train] == [8, 8, 8, 6] and len(train) == b.steps_per_epoch()
    for xb, yb in train:
        assert xb.shape[1:] == (3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.device.type == "cpu" and 0 <= yb.min() and yb.max() < 10


def test_cifar10_augmentation(cifar10_dir, md5_ok):
    root, _ = cifar10_dir
    b = build_data("cifar10", data_dir=root, download=False, batch_size=30, seed=5)
    draws = b.epoch_draws(1)
    assert draws["flip"].any() and not draws["flip"].all()                # some samples flipped
    assert (draws["dy"] != 4).any() and draws["dy"].max() <= 8
    x, y = next(b.train_batches(1))
    assert x.shape == (30, 3, 32, 32)                                        # crop keeps the size
    raw = _unnormalise(b, x).round()
    assert (raw == 0).any()                                                   # zero padding shows
    assert torch.equal(y, b.y_train[draws["perm"]])
    for k in range(30):
        ref = _reference_augment(b.x_train[draws["perm"][k]].numpy(), int(draws["dy"][k]),
                                 int(draws["dx"][k]), bool(draws["flip"][k]), 4)
        assert np.array_equal(raw[k].to(torch.uint8).numpy(), ref)
    plain = build_data("cifar10", data_dir=root, download=False, batch_size=30, seed=5, augment=False)
    xp, yp = next(plain.train_batches(1))
    assert torch.equal(yp, y)                                                # same shuffle
    assert torch.allclose(_unnormalise(plain, xp), b.x_train[draws["perm"]].float(), atol=1e-3)


def test_determinism_and_resume(cifar10_dir, md5_ok):
    root, _ = cifar10_dir
    kw = dict(data_dir=root, download=False, batch_size=7)
    a, b = build_data("cifar10", seed=2, **kw), build_data("cifar10", seed=2, **kw)
    state = torch.get_rng_state()
    run_a = [list(a.train_batches(e)) for e in range(3)]
    assert torch.equal(torch.get_rng_state(), state)                        # global RNG untouched
    # a "restarted" run that starts at epoch 2 sees exactly the uninterrupted batches
    torch.manual_seed(999)
    for (xa, ya), (xb, yb) in zip(run_a[2], b.train_batches(2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # mid-epoch resume
    for (xa, ya), (xb, yb) in zip(run_a[1][2:], b.train_batches(1, start_step=2), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.epoch_draws(0)["perm"], a.epoch_draws(1)["perm"])   # new order each epoch
    other = build_data("cifar10", seed=3, **kw)
    assert not torch.equal(a.epoch_draws(0)["perm"], other.epoch_draws(0)["perm"])
    for e in range(3):                                                       # every sample once
        assert sorted(a.epoch_draws(e)["perm"].tolist()) == list(range(30))
        assert sum(len(y) for _, y in run_a[e]) == 30


def test_cifar100_fine_labels(tmp_path, md5_ok):
    xtr, ytr, xte, yte = write_tiny_cifar100(tmp_path)
    b = build_data("cifar100", data_dir=tmp_path, download=False, batch_size=4, augment=False)
    assert b.info.num_classes == 100 and (b.train_size, b.test_size) == (20, 9)
    assert torch.equal(b.y_train, torch.from_numpy(ytr)) and torch.equal(b.x_train, torch.from_numpy(xtr))
    x, y = _collect(b.test_batches())
    assert x.shape == (9, 3, 32, 32) and torch.equal(y, torch.from_numpy(yte))
    assert b.mean.flatten()[0].item() == pytest.approx(0.5071 * 255)


def test_cifar_corrupted_or_missing_is_data_error(tmp_path):
    write_tiny_cifar10(tmp_path)
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:100])                            # truncated file
    with pytest.raises(DataError) as err:                                    # real md5 check
        build_data("cifar10", data_dir=tmp_path, download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "download" in str(err.value)
    empty = tmp_path / "nothing"
    with pytest.raises(DataError, match="cifar-100-python"):
        build_data("cifar100", data_dir=empty, download=False)


def test_cifar_download_integrity_failure_is_data_error(tmp_path, monkeypatch):
    fetched = []

    def fake_urlretrieve(url, fpath, *a, **kw):                             # a damaged archive
        fetched.append(url)
        with open(fpath, "wb") as f:
            f.write(b"not a tarball")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_is_remote_location_available", lambda: False)
    monkeypatch.setattr(tv_utils, "_urlretrieve", fake_urlretrieve)
    with pytest.raises(DataError) as err:
        build_data("cifar10", data_dir=tmp_path, download=True)
    assert fetched and "cifar-10-python.tar.gz" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cifar_on_cuda_matches_cpu(cifar10_dir, md5_ok):
    root, _ = cifar10_dir
    cpu = build_data("cifar10", data_dir=root, download=False, batch_size=8, seed=4)
    gpu = build_data("cifar10", data_dir=root, download=False, batch_size=8, seed=4, device="cuda")
    assert gpu.x_train.is_cuda and gpu.x_train.dtype == torch.uint8
    for (xc, yc), (xg, yg) in zip(cpu.train_batches(3), gpu.train_batches(3), strict=True):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-5)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_config_and_fixed_data():
    cfg = {"num_classes": 4, "image_size": 12, "in_channels": 2, "train_size": 33, "test_size": 10}
    a = build_data("synthetic", synthetic=cfg, seed=0, batch_size=16)
    b = build_data("synthetic", synthetic=cfg, seed=9, batch_size=16)
    assert a.info == DatasetInfo("synthetic", 4, 2, 12, "cifar") == dataset_info("synthetic", **cfg)
    assert (a.train_size, a.test_size, a.steps_per_epoch()) == (33, 10, 2)  # 16 + 17 (no batch of 1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    x, y = next(a.train_batches(0))
    assert x.shape == (16, 2, 12, 12) and x.dtype == torch.float32 and y.max() < 4
    assert abs(a.x_train.mean().item()) < 0.1 and abs(a.x_train.std().item() - 1) < 0.1
    d = build_data("synthetic")
    assert d.info == DATASETS["synthetic"] and (d.train_size, d.test_size) == (512, 256)


# ----------------------------------------------------------------------------- ImageFolder / ImageNet


def write_tiny_imagefolder(root, classes=("cat", "dog", "eel"), n_train=3, n_val=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (300, 260), (64, 200)]
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                w, h = sizes[(ci + k) % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{k}.JPEG", quality=90)
    return root


def test_imagefolder_loads_and_is_deterministic(tmp_path):
    root = write_tiny_imagefolder(tmp_path / "imnet")
    b = build_data("imagenet", data_dir=root, batch_size=4, eval_batch_size=4, workers=0, seed=1)
    assert b.info == DatasetInfo("imagenet", 3, 3, 224, "imagenet")         # real class count
    assert (b.train_size, b.test_size, b.steps_per_epoch()) == (9, 6, 2)    # 4 + 5
    x, y = _collect(b.test_batches())
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1, 1, 2, 2]                                  # every val image once
    assert -2.2 < x.min() < -1.5 and 2.0 < x.max() < 2.7                     # ImageNet normalisation
    e0 = list(b.train_batches(0))
    assert [tuple(xb.shape) for xb, _ in e0] == [(4, 3, 224, 224), (5, 3, 224, 224)]
    assert sorted(torch.cat([yb for _, yb in e0]).tolist()) == [0] * 3 + [1] * 3 + [2] * 3
    again = build_data("imagenet", data_dir=root, batch_size=4, workers=1, seed=1)
    for (xa, ya), (xb, yb) in zip(e0, again.train_batches(0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)                   # independent of workers
    e1 = list(b.train_batches(1))
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(e0, e1))


def test_imagefolder_missing_is_data_error(tmp_path):
    missing = tmp_path / "no_such_imagenet"
    with pytest.raises(DataError) as err:
        build_data("imagenet", data_dir=missing, workers=0)
    assert str(missing) in str(err.value) and "train" in str(err.value) and "val" in str(err.value)
    root = write_tiny_imagefolder(tmp_path / "imnet")
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DataError) as err:
        build_data("imagenet", data_dir=root, workers=0)
    assert str(root / "val") in str(err.value)
    (root / "val").mkdir()                                                     # val without classes
    with pytest.raises(DataError, match="val"):
        build_data("imagenet", data_dir=root, workers=0)
