"""Data and metrics shared by the three experiments.

Data: load_data() gives the VISCHEMA PLUS split (or the synthetic set) as tensors in [-1, 1], the models' range.
Metrics: l1_metrics(), cc_metrics(), baseline_metrics() and fid() score maps on the [0, 1] scale, as the study did.
Figures: save_grid() writes rows of image | true map | predicted map. A VMS map is an RGB image: green = true VMS
(why people remembered), red = false VMS (why they wrongly believed they did), blue unused.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import random
import re
import sys
import textwrap
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

DEFAULT_DATA = Path("data/VISCHEMA_PLUS")
SYNTHETIC = "synthetic"  # --data synthetic: the built-in set, whatever data the machine has
CACHE_VERSION = 1
RESAMPLE = {"images": Image.BICUBIC, "vms": Image.BOX}  # photos bicubic, maps by area (PIL filters antialias)


class DataError(Exception):
    """Bad input data. The message names the culprit; the scripts print it and exit with status 2."""


@dataclass
class VMSData:
    """One train/val split. x: photos, y: VMS maps; N x 3 x S x S float tensors in [-1, 1]."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_names: list
    val_names: list
    categories: dict  # name -> scene category ({} when unknown)
    source: str       # the resolved data folder, or "synthetic"


# ---------------------------------------------------------------------------------------------------- the real data
def read_names(path):
    """Names from a split file: one per line, LF or CRLF, blank lines and a UTF-8 BOM ignored."""
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_names(root, split_seed=0):
    """(train names, val names): the study's split files, or a seeded 80/20 split of the sorted names."""
    train_file, val_file, listed = root / "viscplus_train.csv", root / "viscplus_val.csv", root / "viscplus.csv"
    if train_file.exists() != val_file.exists():
        raise DataError(f"{val_file if train_file.exists() else train_file}: missing (give both split files, or "
                        "neither for an automatic 80/20 split)")
    if train_file.exists():
        train, val = read_names(train_file), read_names(val_file)
        if not train or not val:
            raise DataError(f"{val_file if train else train_file}: empty split file (no names in it)")
        return train, val
    names = sorted(set(read_names(listed)) if listed.exists() else
                   {p.name for d in ("images", "vms") for p in (root / d).iterdir() if not p.name.startswith(".")})
    if not names:
        raise DataError(f"{listed if listed.exists() else root / 'images'}: no names")
    shuffled = random.Random(split_seed).sample(names, len(names))
    n_train = round(0.8 * len(names))
    print(f"split: no viscplus_train.csv/viscplus_val.csv in {root}; seeded 80/20 split of the {len(names)} "
          f"sorted names (seed {split_seed}): {n_train} train / {len(names) - n_train} val")
    return sorted(shuffled[:n_train]), sorted(shuffled[n_train:])


def check_pairs(root, names):
    """Every name needs images/<name> and vms/<name>; say which half of a pair is missing."""
    for name in names:
        image, vms = root / "images" / name, root / "vms" / name
        if not image.is_file() or not vms.is_file():
            raise DataError(f"{image}: image without its map (expected {vms})" if image.is_file() else
                            f"{vms}: map without its image (expected {image})" if vms.is_file() else
                            f"{name}: listed in the split files but neither {image} nor {vms} exists")


def decode(path, size, resample):
    """One file -> size x size x 3 uint8 array. Grayscale, RGBA, palette and any input size are converted."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), resample))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a decodable image ({e})") from None


def cache_file(root, size):
    """The cache lives next to the data, or in the user's cache folder when the data folder is read-only."""
    writable = os.access(root, os.W_OK) and os.stat(root).st_mode & 0o222  # root ignores permissions; honour them
    if writable:
        return root / f".vms_cache_{size}px.pt"
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vms-regions"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return home / f"{root.name}_{tag}_{size}px.pt"


def cache_key(root, names, size):
    """Changes whenever a file is added, removed, replaced or touched, or the size or resizing changes."""
    stats = [(d, n, st.st_size, st.st_mtime_ns)
             for n in names for d in ("images", "vms") for st in [(root / d / n).stat()]]
    blob = json.dumps([CACHE_VERSION, size, {k: int(v) for k, v in RESAMPLE.items()}, stats]).encode()
    return hashlib.sha256(blob).hexdigest()


def load_pairs(root, names, size, refresh=False):
    """Decoded, resized uint8 tensors (N x 3 x S x S) for images and maps, from the cache when it is current
    (refresh: decode and rewrite the cache regardless)."""
    path, key = cache_file(root, size), cache_key(root, names, size)
    t0 = time.perf_counter()
    if path.exists() and not refresh:
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == key:
                print(f"data: cached load of {len(names)} pairs at {size} px from {path} "
                      f"in {time.perf_counter() - t0:.2f} s")
                return cached["images"], cached["maps"]
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            print(f"data: ignoring unreadable cache {path} ({type(e).__name__})")
    print(f"data: decoding {2 * len(names)} JPEGs from {root} and resizing to {size} px (once; cached after)...")
    arrays = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        for d in ("images", "vms"):
            stack = list(pool.map(lambda n: decode(root / d / n, size, RESAMPLE[d]), names))
            arrays[d] = torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).contiguous()
    seconds = time.perf_counter() - t0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"key": key, "names": list(names), "images": arrays["images"], "maps": arrays["vms"]}, tmp)
        os.replace(tmp, path)
        where = f"cached to {path}"
    except OSError as e:
        where = f"not cached ({e})"
    print(f"data: decoded {2 * len(names)} files in {seconds:.1f} s; {where}")
    return arrays["images"], arrays["vms"]


def to_model_range(u8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return u8.float().div_(127.5).sub_(1)


def resolve_data(path=None):
    """--data PATH, else $VISCHEMA_DIR, else ./data/VISCHEMA_PLUS. Returns (the folder, resolved, or "synthetic" for
    --data synthetic; None with the reason when no folder is found)."""
    if path == SYNTHETIC:
        return SYNTHETIC, ""
    if path is not None and not Path(path).is_dir():
        raise DataError(f"--data {path}: no such folder")
    tried = [p for p in (path, os.environ.get("VISCHEMA_DIR"), str(DEFAULT_DATA)) if p]
    found = next((Path(p).resolve() for p in tried if Path(p).is_dir()), None)
    return found, "" if found else " and ".join(tried) + " not found"


def same_data(a, b):
    """Whether two --data values name the same data: the same folder written any way, or both the synthetic set."""
    if SYNTHETIC in (a, b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def load_data(path=None, size=64, device="cpu", split_seed=0, synthetic_seed=0, refresh=False):
    """The train/val split as VMSData on `device`; the synthetic set (announced loudly) for --data synthetic or when
    no data is found. VMSData.source names what was loaded: the resolved folder, or "synthetic".
    refresh: decode the JPEGs even when the cache is current (bench.py times both)."""
    if size < 8:
        raise DataError(f"--size {size}: too small (at least 8 pixels)")
    root, reason = resolve_data(path)
    if root is None or root == SYNTHETIC:
        print("SYNTHETIC DATA: " + ("--data synthetic" if root else f"VISCHEMA PLUS not found ({reason})")
              + f"; using the built-in synthetic set. For the real study put VISCHEMA PLUS at {DEFAULT_DATA}/ or "
              "pass --data PATH (see README).")
        return synthetic_vischema(size, seed=synthetic_seed, device=device)
    for d in ("images", "vms"):
        if not (root / d).is_dir():
            raise DataError(f"{root}: no {d}/ folder (expected images/ and vms/ with the same file names)")
    train, val = split_names(root, split_seed)
    check_pairs(root, train + val)
    names = sorted(set(train + val))
    images, maps = load_pairs(root, names, size, refresh)
    index = {n: i for i, n in enumerate(names)}
    pick = lambda t, ns: to_model_range(t[[index[n] for n in ns]]).to(device)  # noqa: E731
    categories = {}
    if (root / "viscplus_categories.csv").exists():
        with open(root / "viscplus_categories.csv", encoding="utf-8-sig", newline="") as f:
            categories = {r["name"].strip(): r["category"].strip() for r in csv.DictReader(f) if r.get("name")}
    print(f"data: VISCHEMA PLUS from {root}: {len(train)} train / {len(val)} val at {size} px"
          + (f", {len(set(categories.values()))} categories" if categories else ""))
    return VMSData(pick(images, train), pick(maps, train), pick(images, val), pick(maps, val),
                   train, val, {n: categories[n] for n in names if n in categories}, str(root))


# ------------------------------------------------------------------------------------------------ the synthetic set
# Object classes: name, colour (RGB in [0, 1]), width and height factors, round or not, role. "memorable" objects get
# green VMS rectangles, "lure" objects red ones, "neutral" objects none. The class shows in colour and shape, the
# position is random (centre-biased, like photographs): a model can learn the maps, no constant map can match them.
SYNTH_CLASSES = [("face", (0.95, 0.75, 0.55), 1.0, 1.0, True, "memorable"),
                 ("sign", (1.00, 0.85, 0.10), 1.0, 1.0, False, "memorable"),
                 ("car", (0.15, 0.30, 0.90), 1.6, 0.7, False, "lure"),
                 ("tree", (0.15, 0.55, 0.20), 1.0, 1.0, True, "neutral"),
                 ("rock", (0.50, 0.48, 0.45), 1.6, 0.7, False, "neutral"),
                 ("door", (0.45, 0.25, 0.10), 0.6, 1.8, False, "neutral")]
SYNTH_SCENES = ["outdoor", "indoor"]


def synthetic_vischema(size=64, n_train=1280, n_val=320, seed=0, device="cpu", max_objects=6):
    """Photo-like scenes with objects and their VMS maps, deterministic by seed, in the VMSData format."""
    g = torch.Generator().manual_seed(seed)
    n, k = n_train + n_val, max_objects
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    table = lambda i: torch.tensor([c[i] for c in SYNTH_CLASSES])  # noqa: E731
    yy = xx = (torch.arange(size) + 0.5) / size
    yy, xx = yy.view(1, 1, size, 1), xx.view(1, 1, 1, size)

    # Background: sky (or ceiling) over ground (or floor) at a random horizon, low-frequency texture.
    scene = (rand(n) < 0.5).long()  # 0 outdoor, 1 indoor
    top = torch.tensor([[0.55, 0.70, 0.90], [0.85, 0.82, 0.75]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    bottom = torch.tensor([[0.45, 0.55, 0.30], [0.55, 0.45, 0.35]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    ground = (yy > 0.35 + 0.3 * rand(n, 1, 1, 1)).float()
    img = top.view(n, 3, 1, 1) * (1 - ground) + bottom.view(n, 3, 1, 1) * ground
    img = img + 0.15 * F.interpolate(rand(n, 1, 8, 8) - 0.5, size=(size, size), mode="bicubic", align_corners=False)

    # Objects, painted back to front; k per image, some absent; then sensor noise.
    cls = torch.multinomial(torch.tensor([0.2, 0.2, 0.15, 0.15, 0.15, 0.15]), n * k, True, generator=g).view(n, k)
    present = (rand(n, k) < 0.7).view(n, k, 1, 1)
    cx = (0.5 + 0.25 * torch.randn(n, k, generator=g)).clamp(0.1, 0.9).view(n, k, 1, 1)
    cy = (0.55 + 0.2 * torch.randn(n, k, generator=g)).clamp(0.15, 0.9).view(n, k, 1, 1)
    half = (0.06 + 0.08 * rand(n, k)).view(n, k, 1, 1)
    dx, dy = (xx - cx) / (table(2)[cls].view(n, k, 1, 1) * half), (yy - cy) / (table(3)[cls].view(n, k, 1, 1) * half)
    round_ = table(4)[cls].view(n, k, 1, 1)
    inside = torch.where(round_, dx ** 2 + dy ** 2 < 1, (dx.abs() < 1) & (dy.abs() < 1)) & present
    colour = table(1)[cls] + 0.08 * (rand(n, k, 3) - 0.5)
    for j in range(k):
        img = torch.where(inside[:, j:j + 1], colour[:, j].view(n, 3, 1, 1), img)
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)

    # Maps: each of three "observers" marks every memorable (green) or lure (red) object with a loose,
    # semi-transparent rectangle; the rectangles stack, as in the real maps.
    role = torch.tensor([["memorable", "lure", "neutral"].index(c[5]) for c in SYNTH_CLASSES])[cls]
    vms = torch.zeros(n, 3, size, size)
    for _ in range(3):
        jx, jy = 0.4 * (rand(n, k, 1, 1) - 0.5), 0.4 * (rand(n, k, 1, 1) - 0.5)
        grow = 1.2 + 0.6 * rand(n, k, 1, 1)
        box = ((dx - jx).abs() < grow) & ((dy - jy).abs() < grow) & present
        alpha = (0.25 + 0.2 * rand(n, k, 1, 1)) * box
        for channel, which in ((1, 0), (0, 1)):
            hit = (role == which).view(n, k, 1, 1)
            vms[:, channel] = 1 - (1 - vms[:, channel]) * torch.prod(1 - alpha * hit, dim=1)

    # The same uint8 round trip as decoded JPEGs, so both sources reach the models the same way.
    quantise = lambda t: to_model_range((t * 255).round().clamp(0, 255).to(torch.uint8)).to(device)  # noqa: E731
    names = [f"synthetic_{i:04d}.png" for i in range(n)]
    categories = {name: SYNTH_SCENES[s] for name, s in zip(names, scene.tolist())}
    print(f"data: synthetic set, {n_train} train / {n_val} val at {size} px (seed {seed})")
    return VMSData(quantise(img[:n_train]), quantise(vms[:n_train]), quantise(img[n_train:]), quantise(vms[n_train:]),
                   names[:n_train], names[n_train:], categories, SYNTHETIC)


# --------------------------------------------------------------------------------------------------------- metrics
FLAT = 0.05  # a true map spanning less than this on [0, 1] is "constant" (JPEG noise of an empty channel)


def to_unit(x):
    """Model range [-1, 1] -> pixel scale [0, 1]."""
    return (x + 1) / 2


def l1_metrics(pred, true):
    """Mean |pred - true| over pixels and channels, and for the green (true VMS) and red (false VMS) channels.
    pred, true: N x 3 x H x W on [0, 1]."""
    d = (pred.float() - true.float()).abs()
    return {"l1": d.mean().item(), "l1_green": d[:, 1].mean().item(), "l1_red": d[:, 0].mean().item()}


def pearson(a, b):
    """Per-row Pearson correlation of two N x P tensors (float64). A constant row of `a` correlates 0."""
    a, b = a.double() - a.double().mean(1, keepdim=True), b.double() - b.double().mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


CHANNELS = {"": lambda m: m[:, 0] + m[:, 1], "_green": lambda m: m[:, 1], "_red": lambda m: m[:, 0]}  # combined


def is_flat(maps):
    """Per map (N x ... on [0, 1]): whether it spans less than FLAT, i.e. is constant but for JPEG noise."""
    flat = maps.flatten(1)
    return flat.amax(1) - flat.amin(1) < FLAT


def per_image_metrics(pred, true, pooled=20):
    """Per-image L1 ("l1", over pixels and channels) and Pearson CC (combined map, green and red channels, at the
    maps' resolution "cc*" and area-pooled to pooled x pooled "cc20*"), as float64 tensors of N values; a CC is NaN
    where the true map is flat (it has no correlation). pred, true: N x 3 x H x W on [0, 1]."""
    out = {"l1": (pred.double() - true.double()).abs().flatten(1).mean(1)}
    for suffix, select in CHANNELS.items():
        p, t = (select(m.float()).unsqueeze(1) for m in (pred, true))
        flat = is_flat(t)
        for prefix, (pp, tt) in (("cc", (p, t)),
                                 (f"cc{pooled}", (F.adaptive_avg_pool2d(p, pooled), F.adaptive_avg_pool2d(t, pooled)))):
            out[prefix + suffix] = pearson(pp.flatten(1), tt.flatten(1)).masked_fill(flat, float("nan"))
    return out


def cc_metrics(pred, true, pooled=20):
    """Pearson CC per image, averaged over images: combined map (red + green), green and red channels, at the
    maps' resolution ("cc*") and after area pooling to pooled x pooled ("cc20*", the published CNN's 20x20).
    Images whose true map is constant have no correlation and are skipped; the "*_skipped" keys count them.
    "Constant" allows for JPEG noise: an empty channel of a real map spans up to ~0.04, so a map whose values
    span less than FLAT (0.05) counts as constant. pred, true: N x 3 x H x W on [0, 1]."""
    per_image, out = per_image_metrics(pred, true, pooled), {}
    for key, r in per_image.items():
        if key.startswith("cc"):
            kept = r[~r.isnan()]
            out[key] = kept.mean().item() if len(kept) else float("nan")
            if key.startswith(f"cc{pooled}"):
                out["cc" + key[2 + len(str(pooled)):] + "_skipped"] = int(r.isnan().sum())
    return out


def map_metrics(pred, true):
    """All of the study's map metrics (L1 and CC), for N x 3 x H x W maps on [0, 1]."""
    return {**l1_metrics(pred, true), **cc_metrics(pred, true)}


METRICS_ROW = ("l1", "l1_green", "l1_red", "cc", "cc_green", "cc_red", "cc20")  # what metrics.jsonl keeps per epoch


def fmt(value, digits=4):
    """A number for tables and progress lines; "—" for None and NaN (a run with no finite value)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_text(m, prefix="val"):
    """One progress-line piece: L1, then CC combined, green (true VMS), red (false VMS), and at 20x20."""
    return (f"{prefix} L1 {fmt(m['l1'])}  CC {fmt(m['cc'], 3)} green {fmt(m['cc_green'], 3)} red "
            f"{fmt(m['cc_red'], 3)} CC20 {fmt(m['cc20'], 3)}")


# ---------------------------------------------------------------------------------------------------------- losses
# --loss (and exp3's --x0-loss): a weighted sum of terms, "l1", "l1+0.5cc", "2l1+cc", "kl+0.5cc". Every term compares
# the network's output with its target, N x 3 x H x W in the models' range [-1, 1].
LOSS_TERM = re.compile(r"^(\d*\.?\d*(?:e-?\d+)?)\*?(l1|l2|cc|kl)$")
EPS = 1e-7


def parse_loss(spec):
    """"l1+0.5cc" -> [(1.0, "l1"), (0.5, "cc")]; ValueError naming the term it cannot read."""
    terms = []
    for term in spec.replace(" ", "").split("+"):
        match = LOSS_TERM.match(term)
        if not match or match[1] in (".", "e"):
            raise ValueError(f"{term!r} is not a term: a weight (optional) and one of l1, l2, cc, kl, as in 2l1+0.5cc")
        terms.append((float(match[1]) if match[1] else 1.0, match[2]))
    return terms


def loss_spec(spec):
    """argparse type for --loss: the spec itself, once it reads."""
    try:
        parse_loss(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def optional_loss(spec):
    """argparse type for exp3's --x0-loss: "none", or a --loss spec."""
    return spec if spec == "none" else loss_spec(spec)


def map_loss(spec, out, target):
    """The weighted sum of the terms of `spec` between out and target (N x 3 x H x W in [-1, 1]):
    l1, l2: mean absolute or squared difference over pixels and channels (F.l1_loss, F.mse_loss);
    cc: 1 - Pearson correlation per image and map channel (green, red), averaged over the channels whose target is
        not flat (a third of the red maps are empty: no correlation there, and no NaN or infinite gradient);
    kl: KL divergence KL(target || out) per image and map channel, each channel shifted to [0, 1] and normalised to
        sum to 1 (the saliency models' loss), averaged over the same channels."""
    total = 0
    for weight, term in parse_loss(spec):
        if term in ("l1", "l2"):
            value = F.l1_loss(out, target) if term == "l1" else F.mse_loss(out, target)
        else:
            p, t = ((m[:, :2].float() + 1) / 2 for m in (out, target))  # red and green on [0, 1], per image
            p, t = p.flatten(2), t.flatten(2)
            keep = ~is_flat(t.flatten(0, 1)).view(t.shape[:2])
            if term == "cc":
                p, t = p - p.mean(2, keepdim=True), t - t.mean(2, keepdim=True)
                r = (p * t).sum(2) / ((p.pow(2).sum(2) + EPS).sqrt() * (t.pow(2).sum(2) + EPS).sqrt())
                per_channel = 1 - r
            else:
                p, t = p.clamp_min(0), t.clamp_min(0)
                p, t = p / (p.sum(2, keepdim=True) + EPS), t / (t.sum(2, keepdim=True) + EPS)
                per_channel = (t * torch.log(EPS + t / (p + EPS))).sum(2)
            value = (per_channel * keep).sum() / keep.sum().clamp_min(1)
        total = total + weight * value
    return total


def baseline_maps(train_y):
    """The constant predictors, from the training maps on [0, 1]: all-black, per-pixel mean and per-pixel median
    (the average of the two middle values for an even count, as numpy)."""
    y = train_y.float()
    n = len(y)
    lo = y.kthvalue((n + 1) // 2, dim=0).values
    hi = y.kthvalue(n // 2 + 1, dim=0).values
    return {"black": torch.zeros_like(y[0]), "mean": y.mean(0), "median": (lo + hi) / 2}


def baseline_metrics(train_y, val_y):
    """map_metrics for each constant predictor on val_y. train_y, val_y on [0, 1]."""
    return {name: map_metrics(m.expand_as(val_y), val_y) for name, m in baseline_maps(train_y).items()}


# --------------------------------------------------------------------------------------------------------- figures
def to_pil(x, scale=1):
    """A 3 x H x W tensor in [-1, 1] -> PIL image, upscaled `scale` times with nearest neighbours."""
    arr = (to_unit(x.detach().float().cpu()).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save_grid(path, columns, labels=None, row_labels=None, min_side=128, gap=2, photos=1):
    """PNG of rows photo | true map | predicted map (or any columns): `columns` is a list of N x 3 x H x W tensors in
    [-1, 1]; row i shows the i-th entry of each. The first `photos` columns are photos, the others maps, shown with
    their unused blue channel at zero (as in the data) so that every map looks like a true map. `labels` name the
    columns in a header, `row_labels` the rows at the left. Small images are upscaled to at least `min_side` px."""
    n, side = len(columns[0]), columns[0].shape[-1]
    scale = max(1, -(-min_side // side))
    cell, left = side * scale, 60 if row_labels else 0
    heads = [textwrap.wrap(str(label), cell // 6) for label in labels or []]
    top = 4 + 12 * max(map(len, heads)) if heads else 0                 # long labels wrap onto more lines
    grid = Image.new("RGB", (left + len(columns) * (cell + gap) + gap, top + n * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        if heads:
            draw.multiline_text((left + gap + j * (cell + gap) + 2, 2), "\n".join(heads[j]), fill="black", spacing=2)
        for i in range(n):
            x = col[i] if j < photos else torch.cat([col[i][:2], torch.full_like(col[i][2:], -1)])
            grid.paste(to_pil(x, scale), (left + gap + j * (cell + gap), top + gap + i * (cell + gap)))
    for i, label in enumerate(row_labels or []):
        draw.text((2, top + gap + i * (cell + gap) + cell // 2 - 6), str(label)[:9], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


# ------------------------------------------------------------------------------------------------ command lines
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show (unset, or an off switch)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def fail(message, status=2):
    """Print one clear error line and exit: what scripts do with DataError and bad arguments."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def writable_folder(path, flag="--out"):
    """Create the folder `path` (and its parents) and check that files can be written there; one error line if not."""
    probe = Path(path) / f".write-test-{os.getpid()}"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")
    return Path(path)


def add_run_flags(g, script, resumable):
    """The flags every experiment has for running a run: --seed --device --amp --compile --out --resume."""
    g.add_argument("--seed", type=int, default=0, help="seeds every random number generator")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast: faster on CUDA and on CPUs with bf16 units "
                   "(AMX), slower on other CPUs")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks: faster steps on CUDA after "
                   "a minute of compiling; the same weights and checkpoints")
    g.add_argument("--out", default=None, help=f"run folder (default: runs/{Path(script).stem.split('_')[0]}"
                   "-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt with its "
                   f"saved settings and data; only {changeable(resumable)} may change (--epochs extends it)")


def changeable(resumable):
    return ", ".join(sorted("--" + k.replace("_", "-") for k in resumable - {"out", "resume"}))


def parse_args(build_parser, argv, resumable):
    """Flags -> args; with --resume the run's saved settings and data, where only `resumable` settings may change
    (the same data folder may be written another way)."""
    args = build_parser().parse_args(argv)
    if not args.resume:
        return args
    if args.out is None:
        fail("--resume needs --out, the run folder to continue")
    if not (Path(args.out) / "last.pt").exists() or not (Path(args.out) / "args.json").exists():
        fail(f"--resume: no run to continue in {args.out} (no last.pt and args.json); check the folder, or leave out "
             "--resume to start a new run there")
    typed = build_parser()
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    given = vars(typed.parse_args(argv))  # only the flags that were typed
    saved = json.loads((Path(args.out) / "args.json").read_text())
    data = given.pop("data", None)
    if data is not None and saved.get("data") is not None and not same_data(data, saved["data"]):
        fail(f"--resume: {args.out} was trained on {saved['data']}, not on --data {data}")
    saved["data"] = saved.get("data") or data  # a run recorded without its data takes --data
    changed = sorted(k for k, v in given.items() if k not in resumable and saved.get(k) != v)
    if changed:
        fail(f"--resume keeps a run's settings but {changeable(resumable)}; cannot change {', '.join(changed)}")
    defaults = vars(build_parser().parse_args([]))  # settings added to the script since the run began
    return argparse.Namespace(**{**defaults, **saved, **given, "resume": True})


def command_line(parser, args, script):
    """The command that reproduces a run: the script and every setting that differs from its default."""
    words = ["python", Path(script).name]
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "resume", "out") or value == action.default:
            continue
        flag = action.option_strings[0]
        words += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def setup(args, script, checks):
    """Refuses bad settings (the message of the first failed (ok, message) check), then picks the device, the run
    folder and the data, and seeds torch. Returns (device, out, data); args.device and args.data then name what the
    run uses (the resolved data folder, or "synthetic"), for args.json, --resume and final.json's command."""
    for message in [message for ok, message in checks if not ok][:1]:
        fail(message)
    device = pick_device(args.device)
    out = Path(args.out or time.strftime(f"runs/{Path(script).stem.split('_')[0]}-%Y%m%d-%H%M%S"))
    if (out / "last.pt").exists() and not args.resume:
        fail(f"{out} already holds a run; add --resume to continue it or choose another --out")
    writable_folder(out)
    try:
        data = load_data(args.data, args.size, device)
    except DataError as e:
        fail(str(e))
    args.device, args.data = device.type, data.source
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device, out, data


def log_epoch(out, row, epoch, epochs, seconds, is_best):
    """Appends an epoch's row to out/metrics.jsonl; returns its progress line's end: seconds per epoch and ETA."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    eta = (epochs - epoch) * seconds / epoch  # seconds: all epochs so far, resumed ones too
    return f"{row['seconds']:.1f} s/epoch  ETA {eta / 60:.1f} min" + ("  *best" if is_best else "")


def finish(out, args, build_parser, script, status, epoch, best, seconds, base, **extra):
    """Writes out/final.json (the best epoch's val metrics, the run's status, the command that reproduces it) and
    prints the run's last line; exits with status 3 unless the run is ok and has a finite val L1."""
    final = {"experiment": Path(script).stem, "command": command_line(build_parser(), args, script),
             "status": status, "epoch": epoch, "best_epoch": best["epoch"], "seconds": seconds, "data": args.data,
             **{"val_" + k: None for k in METRICS_ROW}, "train_l1": None,
             **{k: v for k, v in best.items() if k.startswith("val_") and best["epoch"]}, **extra, "baselines": base}
    (Path(out) / "final.json").write_text(json.dumps(final, indent=1))
    if status == "ok" and final["val_l1"] is None:
        print(f"done: no epoch gave a finite val L1; {out}/final.json")
    if status != "ok" or final["val_l1"] is None:
        sys.exit(3)
    print(f"done: best val L1 {fmt(final['val_l1'])} (median map {fmt(base['median']['l1'])}), val CC "
          f"{fmt(final['val_cc'], 3)} (mean map {fmt(base['mean']['cc'], 3)}) at epoch {best['epoch']}; train L1 "
          f"{fmt(final['train_l1'])}; {seconds / 60:.1f} min; {out}/final.json")


def interrupted(out, script):
    print(f"\ninterrupted; continue with: python {Path(script).name} --out {out} --resume")
    sys.exit(130)


def pick_device(name):
    """--device auto|cpu|cuda -> torch.device (auto: CUDA when available); cuda without a CUDA device fails."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def device_name(device):
    """"cpu (2 threads)" or "cuda (NVIDIA H100 ...)": what a run's start line says about where it runs."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n > 1 else ''})"


def progress(steps, label, images_per_step, stream=None):
    """Yields 0 .. steps-1 and shows how far a long loop is: steps done, images per second and the time left. On a
    terminal one line is rewritten in place at most 4 times a second and erased at the end; in a file or pipe (a
    sweep's log) a plain line is written every $VMS_PROGRESS_SECONDS seconds (default 60)."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    every = 0.25 if tty else float(os.environ.get("VMS_PROGRESS_SECONDS", 60))
    t0 = last = time.perf_counter()
    for i in range(steps):
        yield i
        now = time.perf_counter()
        if now - last >= every and i + 1 < steps:
            last, rate = now, (i + 1) / (now - t0)
            line = (f"  {label} {i + 1}/{steps}  {rate * images_per_step:.0f} img/s  "
                    f"{(steps - i - 1) / rate:.0f} s left")
            stream.write(f"\r{line}\x1b[K" if tty else line + "\n")
            stream.flush()
    if tty and last > t0:
        stream.write("\r\x1b[K")
        stream.flush()


# ------------------------------------------------------------------------------------------------------------- FID
# FID's network is TensorFlow's Inception of 2015-12-05 as ported by pytorch-fid (FID_WEIGHTS). This copy of the
# architecture has that file's parameter names and shapes, so the file loads strictly. No file, no FID: it is then
# reported as unavailable, never computed from random weights.
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _add_units(block, **units):
    """Register TF Inception's units (pytorch-fid's BasicConv2d: conv without bias, batch norm eps 0.001, ReLU)
    on `block`, each given as name=(in, out, kernel, stride=1, padding=0)."""
    for name, (cin, cout, kernel, *rest) in units.items():
        stride, padding = (rest + [1, 0][len(rest):])[:2]
        block.add_module(name, nn.Sequential(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
            bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU())))


def _chain(x, *units):
    for unit in units:
        x = unit(x)
    return x


def _avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TensorFlow's average pool ignores the padding


R7, C7, R3, C3 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))  # 1xk, kx1


class _MixedA(nn.Module):  # Mixed_5b, 5c, 5d at 35 x 35
    def __init__(self, cin, pool):
        super().__init__()
        _add_units(self, branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                   branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                   branch_pool=(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg(x))], 1)


class _MixedB(nn.Module):  # Mixed_6a, 35 x 35 -> 17 x 17
    def __init__(self, cin):
        super().__init__()
        _add_units(self, branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                   branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)


class _MixedC(nn.Module):  # Mixed_6b to 6e at 17 x 17: 7 x 7 convolutions factorised into 1 x 7 and 7 x 1
    def __init__(self, cin, c):
        super().__init__()
        _add_units(self, branch1x1=(cin, 192, 1), branch7x7_1=(cin, c, 1), branch7x7_2=(c, c, *R7),
                   branch7x7_3=(c, 192, *C7), branch7x7dbl_1=(cin, c, 1), branch7x7dbl_2=(c, c, *C7),
                   branch7x7dbl_3=(c, c, *R7), branch7x7dbl_4=(c, c, *C7), branch7x7dbl_5=(c, 192, *R7),
                   branch_pool=(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *(getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6))),
                          self.branch_pool(_avg(x))], 1)


class _MixedD(nn.Module):  # Mixed_7a, 17 x 17 -> 8 x 8
    def __init__(self, cin):
        super().__init__()
        _add_units(self, branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                   branch7x7x3_2=(192, 192, *R7), branch7x7x3_3=(192, 192, *C7), branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, *(getattr(self, f"branch7x7x3_{i}") for i in range(1, 5))),
                          F.max_pool2d(x, 3, 2)], 1)


class _MixedE(nn.Module):  # Mixed_7b, 7c at 8 x 8; the FID graph's 7c pools by max (an accident kept for FID)
    def __init__(self, cin, pool):
        super().__init__()
        _add_units(self, branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *R3),
                   branch3x3_2b=(384, 384, *C3), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                   branch3x3dbl_3a=(384, 384, *R3), branch3x3dbl_3b=(384, 384, *C3), branch_pool=(cin, 192, 1))
        self.pool = pool

    def forward(self, x):
        a, b = self.branch3x3_1(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """N x 3 x H x W images in [0, 1] -> N x 2048 pool features, as pytorch-fid computes them: resize to 299 x 299
    (bilinear, align_corners False), scale to [-1, 1], Inception up to the global average pool. weights_path: the
    FID weights file, loaded strictly (without one the weights are random: for tests only, never for a score)."""

    def __init__(self, weights_path=None):
        super().__init__()
        _add_units(self, Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                   Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_MixedC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _MixedD(768), _MixedE(1280, "avg"), _MixedE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # ImageNet logits: unused by FID, but part of the file
        if weights_path is not None:
            self.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.eval().requires_grad_(False)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = F.max_pool2d(_chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, 2)
        x = F.max_pool2d(_chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, 2)
        x = _chain(x, *(getattr(self, f"Mixed_{b}") for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a",
                                                               "7b", "7c")))
        return x.mean((2, 3))


def inception_weights(path=None):
    """(weights file, "") from --inception-weights or the torch hub cache, else (None, why FID is unavailable)."""
    if path:
        return (Path(path), "") if Path(path).is_file() else (None, f"--inception-weights {path}: no such file")
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
    return (hub, "") if hub.is_file() else (None, f"no FID weights: pass --inception-weights PATH or put "
                                                  f"pytorch-fid's {FID_WEIGHTS} in {hub.parent}")


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. Tr((S1 S2)^(1/2)) is the sum of the square roots
    of the eigenvalues of S1^(1/2) S2 S1^(1/2): symmetric, with the eigenvalues of S1 S2, so no scipy is needed."""
    mu1, s1, mu2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    eig = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0)
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()).item()


@torch.no_grad()
def fid(net, pred, true, batch=50):
    """FID between two sets of maps (N x 3 x H x W on [0, 1]), with an InceptionV3FID that holds the real weights."""
    stats = []
    for maps in (pred, true):
        feats = torch.cat([net(b.float()) for b in maps.split(batch)]).double()
        stats += [feats.mean(0), torch.cov(feats.T)]
    return frechet_distance(*stats)
