"""Data and metrics shared by the three experiments.

Data:    load_data() gives the VISCHEMA PLUS train/val split (or the built-in synthetic set) as tensors in [-1, 1].
Metrics: l1_metrics(), cc_metrics() and baseline_metrics() score maps on the [0, 1] scale, as the study reported.
Figures: save_grid() writes rows of image | true map | predicted map as a PNG.

Every tensor that goes into or comes out of a model is in [-1, 1]; every metric is computed on the [0, 1] scale.
A VMS map is an RGB image: green = true VMS (why people remembered), red = false VMS (why they wrongly believed
they did), blue unused.
"""
import csv
import hashlib
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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


def read_categories(root):
    path = root / "viscplus_categories.csv"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        return {row["name"].strip(): row["category"].strip() for row in csv.DictReader(f) if row.get("name")}


def split_names(root, split_seed=0):
    """(train names, val names): the study's split files, or a seeded 80/20 split of the sorted names."""
    train_file, val_file = root / "viscplus_train.csv", root / "viscplus_val.csv"
    if train_file.exists() != val_file.exists():
        missing = val_file if train_file.exists() else train_file
        raise DataError(f"{missing}: missing (give both split files, or neither for an automatic 80/20 split)")
    if train_file.exists():
        train, val = read_names(train_file), read_names(val_file)
        for path, names in ((train_file, train), (val_file, val)):
            if not names:
                raise DataError(f"{path}: empty split file (no names in it)")
        return train, val
    listed = root / "viscplus.csv"
    if listed.exists():
        names = sorted(set(read_names(listed)))
        if not names:
            raise DataError(f"{listed}: empty name list")
    else:
        names = sorted({p.name for d in ("images", "vms") for p in (root / d).iterdir() if not p.name.startswith(".")})
    shuffled = names[:]
    random.Random(split_seed).shuffle(shuffled)
    n_train = round(0.8 * len(names))
    print(f"split: no viscplus_train.csv/viscplus_val.csv in {root}; seeded 80/20 split of the {len(names)} "
          f"sorted names (seed {split_seed}): {n_train} train / {len(names) - n_train} val")
    return sorted(shuffled[:n_train]), sorted(shuffled[n_train:])


def check_pairs(root, names):
    """Every name needs images/<name> and vms/<name>; say which half of a pair is missing."""
    for name in names:
        has_image, has_map = (root / "images" / name).is_file(), (root / "vms" / name).is_file()
        if not has_image and not has_map:
            raise DataError(f"{name}: listed in the split files but neither images/{name} nor vms/{name} exists")
        if not has_map:
            raise DataError(f"{root / 'images' / name}: image without its map (expected {root / 'vms' / name})")
        if not has_image:
            raise DataError(f"{root / 'vms' / name}: map without its image (expected {root / 'images' / name})")


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
    stats = []
    for name in names:
        for d in ("images", "vms"):
            st = (root / d / name).stat()
            stats.append((d, name, st.st_size, st.st_mtime_ns))
    blob = json.dumps([CACHE_VERSION, size, {k: int(v) for k, v in RESAMPLE.items()}, stats]).encode()
    return hashlib.sha256(blob).hexdigest()


def load_pairs(root, names, size):
    """Decoded, resized uint8 tensors (N x 3 x S x S) for images and maps, from the cache when it is current."""
    path, key = cache_file(root, size), cache_key(root, names, size)
    t0 = time.perf_counter()
    if path.exists():
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
    if path is not None:
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"--data {path}: no such folder")
        return root, ""
    candidates = [("$VISCHEMA_DIR", os.environ["VISCHEMA_DIR"])] if os.environ.get("VISCHEMA_DIR") else []
    candidates.append(("default", str(DEFAULT_DATA)))
    for _, p in candidates:
        if Path(p).is_dir():
            return Path(p), ""
    return None, ", ".join(f"{what} {p}" for what, p in candidates) + " not found"


def load_data(path=None, size=64, device="cpu", split_seed=0, synthetic_seed=0):
    """The train/val split as VMSData on `device`; the synthetic set (announced loudly) when no data is found."""
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
    images, maps = load_pairs(root, names, size)
    index = {n: i for i, n in enumerate(names)}
    pick = lambda t, ns: to_model_range(t[[index[n] for n in ns]]).to(device)  # noqa: E731
    categories = read_categories(root)
    print(f"data: VISCHEMA PLUS from {root}: {len(train)} train / {len(val)} val at {size} px"
          + (f", {len(set(categories.values()))} categories" if categories else ""))
    return VMSData(pick(images, train), pick(maps, train), pick(images, val), pick(maps, val),
                   train, val, {n: categories[n] for n in names if n in categories}, str(root))


# ------------------------------------------------------------------------------------------------ the synthetic set
# Object classes: (name, colour RGB in [0, 1], shape, role). "memorable" objects get green VMS rectangles, "lure"
# objects red ones, "neutral" objects none. Class is visible from colour and shape, position is random (with a mild
# centre bias, like photographs), so a model can learn the maps while no constant map can match them.
SYNTH_CLASSES = [
    ("face", (0.95, 0.75, 0.55), "disc", "memorable"),
    ("sign", (1.00, 0.85, 0.10), "square", "memorable"),
    ("car", (0.15, 0.30, 0.90), "rect", "lure"),
    ("tree", (0.15, 0.55, 0.20), "disc", "neutral"),
    ("rock", (0.50, 0.48, 0.45), "rect", "neutral"),
    ("door", (0.45, 0.25, 0.10), "tall", "neutral"),
]
SYNTH_SCENES = ["outdoor", "indoor"]


def synthetic_vischema(size=64, n_train=1280, n_val=320, seed=0, device="cpu", max_objects=6):
    """Photo-like scenes with objects and their VMS maps, deterministic by seed, in the VMSData format."""
    g = torch.Generator().manual_seed(seed)
    n, k = n_train + n_val, max_objects
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    coords = (torch.arange(size) + 0.5) / size
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)

    # Background: a sky/ceiling above a ground/floor at a random horizon, low-frequency texture, sensor noise.
    scene = (rand(n) < 0.5).long()  # 0 outdoor, 1 indoor
    top = torch.where(scene.view(n, 1) == 0, torch.tensor([0.55, 0.70, 0.90]), torch.tensor([0.85, 0.82, 0.75]))
    bottom = torch.where(scene.view(n, 1) == 0, torch.tensor([0.45, 0.55, 0.30]), torch.tensor([0.55, 0.45, 0.35]))
    top, bottom = top + 0.1 * (rand(n, 3) - 0.5), bottom + 0.1 * (rand(n, 3) - 0.5)
    horizon = 0.35 + 0.3 * rand(n, 1, 1, 1)
    ground = (yy > horizon).float()
    img = top.view(n, 3, 1, 1) * (1 - ground) + bottom.view(n, 3, 1, 1) * ground
    texture = F.interpolate(rand(n, 1, 8, 8) - 0.5, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.15 * texture

    # Objects, painted back to front; k per image, some absent.
    cls = torch.multinomial(torch.tensor([0.2, 0.2, 0.15, 0.15, 0.15, 0.15]), n * k, True, generator=g).view(n, k)
    present = rand(n, k) < 0.7
    cx = (0.5 + 0.25 * torch.randn(n, k, generator=g)).clamp(0.1, 0.9)
    cy = (0.55 + 0.2 * torch.randn(n, k, generator=g)).clamp(0.15, 0.9)
    half = 0.06 + 0.08 * rand(n, k)
    shape_of = [s for _, _, s, _ in SYNTH_CLASSES]
    hw = torch.tensor([{"disc": 1.0, "square": 1.0, "rect": 1.6, "tall": 0.6}[s] for s in shape_of])[cls] * half
    hh = torch.tensor([{"disc": 1.0, "square": 1.0, "rect": 0.7, "tall": 1.8}[s] for s in shape_of])[cls] * half
    colour = torch.tensor([c for _, c, _, _ in SYNTH_CLASSES])[cls] + 0.08 * (rand(n, k, 3) - 0.5)
    dx, dy = (xx - cx.view(n, k, 1, 1)) / hw.view(n, k, 1, 1), (yy - cy.view(n, k, 1, 1)) / hh.view(n, k, 1, 1)
    is_disc = torch.tensor([s == "disc" for s in shape_of])[cls].view(n, k, 1, 1)
    inside = torch.where(is_disc, dx ** 2 + dy ** 2 < 1, (dx.abs() < 1) & (dy.abs() < 1)) & present.view(n, k, 1, 1)
    for j in range(k):
        img = torch.where(inside[:, j:j + 1], colour[:, j].view(n, 3, 1, 1), img)
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)

    # Maps: each of three "observers" marks every memorable (green) or lure (red) object with a loose,
    # semi-transparent rectangle; the rectangles stack, as in the real maps.
    role = torch.tensor([["memorable", "lure", "neutral"].index(r) for _, _, _, r in SYNTH_CLASSES])[cls]
    vms = torch.zeros(n, 3, size, size)
    for _ in range(3):
        jx, jy = 0.4 * (rand(n, k, 1, 1) - 0.5), 0.4 * (rand(n, k, 1, 1) - 0.5)
        grow = 1.2 + 0.6 * rand(n, k, 1, 1)
        box = ((dx - jx).abs() < grow) & ((dy - jy).abs() < grow) & present.view(n, k, 1, 1)
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
