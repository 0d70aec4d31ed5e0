"""Data and metrics shared by the three experiments.

Data: load_data() gives the VISCHEMA PLUS split (or the synthetic set) as tensors in [-1, 1], the models' range.
Metrics: l1_metrics(), cc_metrics(), baseline_metrics() and fid() score maps on the [0, 1] scale, as the study did.
Figures: save_grid() writes rows of image | true map | predicted map. A VMS map is an RGB image: green = true VMS
(why people remembered), red = false VMS (why they wrongly believed they did), blue unused.
"""
import csv
import hashlib
import json
import os
import random
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

DEFAULT_DATA = Path("data/VISCHEMA_PLUS")
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
    source: str       # the data folder, or "synthetic"


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
    """--data PATH, else $VISCHEMA_DIR, else ./data/VISCHEMA_PLUS. Returns (folder or None, reason for None)."""
    if path is not None and not Path(path).is_dir():
        raise DataError(f"--data {path}: no such folder")
    tried = [p for p in (path, os.environ.get("VISCHEMA_DIR"), str(DEFAULT_DATA)) if p]
    found = next((Path(p) for p in tried if Path(p).is_dir()), None)
    return found, "" if found else " and ".join(tried) + " not found"


def load_data(path=None, size=64, device="cpu", split_seed=0, synthetic_seed=0, refresh=False):
    """The train/val split as VMSData on `device`; the synthetic set (announced loudly) when no data is found.
    refresh: decode the JPEGs even when the cache is current (bench.py times both)."""
    if size < 8:
        raise DataError(f"--size {size}: too small (at least 8 pixels)")
    root, reason = resolve_data(path)
    if root is None:
        print(f"SYNTHETIC DATA: VISCHEMA PLUS not found ({reason}); using the built-in synthetic set. "
              f"For the real study put VISCHEMA PLUS at {DEFAULT_DATA}/ or pass --data PATH (see README).")
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
                   names[:n_train], names[n_train:], categories, "synthetic")


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


def cc_metrics(pred, true, pooled=20):
    """Pearson CC per image, averaged over images: combined map (red + green), green and red channels, at the
    maps' resolution ("cc*") and after area pooling to pooled x pooled ("cc20*", the published CNN's 20x20).
    Images whose true map is constant have no correlation and are skipped; the "*_skipped" keys count them.
    "Constant" allows for JPEG noise: an empty channel of a real map spans up to ~0.04, so a map whose values
    span less than FLAT (0.05) counts as constant. pred, true: N x 3 x H x W on [0, 1]."""
    out = {}
    for suffix, select in (("", lambda m: m[:, 0] + m[:, 1]), ("_green", lambda m: m[:, 1]),
                           ("_red", lambda m: m[:, 0])):
        p, t = (select(m.float()).unsqueeze(1) for m in (pred, true))
        varies = t.flatten(1).amax(1) - t.flatten(1).amin(1) >= FLAT
        p, t = p[varies], t[varies]
        for prefix, (pp, tt) in (("cc", (p, t)),
                                 (f"cc{pooled}", (F.adaptive_avg_pool2d(p, pooled), F.adaptive_avg_pool2d(t, pooled)))):
            r = pearson(pp.flatten(1), tt.flatten(1))
            out[prefix + suffix] = r.mean().item() if len(r) else float("nan")
        out[f"cc{suffix}_skipped"] = int((~varies).sum())
    return out


def map_metrics(pred, true):
    """All of the study's map metrics (L1 and CC), for N x 3 x H x W maps on [0, 1]."""
    return {**l1_metrics(pred, true), **cc_metrics(pred, true)}


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


def save_grid(path, columns, min_side=128, gap=2):
    """PNG of rows image | true map | predicted map (or any columns): `columns` is a list of N x 3 x H x W tensors
    in [-1, 1]; row i shows the i-th entry of each. Small images are upscaled to at least `min_side` pixels."""
    n, side = len(columns[0]), columns[0].shape[-1]
    scale = max(1, -(-min_side // side))
    cell = side * scale
    grid = Image.new("RGB", (len(columns) * (cell + gap) + gap, n * (cell + gap) + gap), "white")
    for i in range(n):
        for j, col in enumerate(columns):
            grid.paste(to_pil(col[i], scale), (gap + j * (cell + gap), gap + i * (cell + gap)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


def fail(message, status=2):
    """Print one clear error line and exit: what scripts do with DataError and bad arguments."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def pick_device(name):
    """--device auto|cpu|cuda -> torch.device (auto: CUDA when available); cuda without a CUDA device fails."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


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
