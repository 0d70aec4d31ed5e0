"""VISCHEMA PLUS as tensors: the splits (the study's, a fold of a cross-validation, and the selection split carved
from the training split), the decoding and its cache, and the built-in synthetic set where the data is missing.

load_data() gives VMSData: photos and maps as N x 3 x S x S tensors in [-1, 1], the models' range, for the photos
the network fits, the selection split that chooses its checkpoint, and the val split that only reports. A VMS map is
an RGB image: green = true VMS (why people remembered), red = false VMS (why they wrongly believed they did), blue
unused. The cache helpers also keep pretrained.py's encoder features next to the data.
"""
import argparse
import csv
import hashlib
import json
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import synthetic

DEFAULT_DATA = Path("data/VISCHEMA_PLUS")
SYNTHETIC = "synthetic"  # --data synthetic: the built-in set, whatever data the machine has
CACHE_VERSION = 1
RESAMPLE = {"images": Image.BICUBIC, "vms": Image.BOX}  # photos bicubic, maps by area (PIL filters antialias)


class DataError(Exception):
    """Bad input data. The message names the culprit; the scripts print it and exit with status 2."""


@dataclass
class VMSData:
    """The splits, x photos and y maps as N x 3 x S x S float tensors in [-1, 1]. train: the photos the network fits;
    sel: the selection split, carved from the training split, that chooses the checkpoint (with selection off, the
    val split itself); val: the split that reports."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    sel_x: torch.Tensor
    sel_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_names: list
    sel_names: list
    val_names: list
    categories: dict  # name -> scene category ({} when unknown)
    source: str       # the resolved data folder, or "synthetic"


# ---------------------------------------------------------------------------------------------------- the data
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


def fold_spec(text):
    """argparse type for --fold: "K/N" -> "K/N" once 1 <= K <= N and N >= 2."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]) or int(match[2]) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give K/N with 1 <= K <= N and N >= 2, e.g. 1/5")
    return f"{int(match[1])}/{int(match[2])}"


def assign_splits(train, val, selection=0.1, fold=None, split_seed=0):
    """(fit, sel, val) name lists. fold "K/N": the val split is the K-th of N seeded folds of all the pairs, the
    training split the others. selection > 0: that fraction of the training split, seeded, becomes the selection
    split, and the network fits the rest; selection 0: the val split is also the selection split (choosing on the
    split that reports, the thesis' protocol). The seeds depend on split_seed only, not on a run's --seed."""
    if fold:
        k, n = map(int, fold.split("/"))
        pool = sorted(set(train) | set(val))
        order = random.Random(f"fold-{split_seed}").sample(pool, len(pool))
        val = sorted(order[k - 1::n])
        train = sorted(set(pool) - set(val))
    if not selection:
        return list(train), list(val), list(val)
    n_sel = round(selection * len(train))
    if not 1 <= n_sel < len(train):
        raise DataError(f"--selection {selection}: {n_sel} of {len(train)} training photos; the selection split and "
                        "the photos the network fits both need at least one")
    chosen = set(random.Random(f"selection-{split_seed}").sample(sorted(train), n_sel))
    return [n for n in train if n not in chosen], [n for n in train if n in chosen], list(val)


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


def cache_files(root, name):
    """Where a cache file `name` may be: next to the data, and in the user's cache folder (used when the data folder
    is read-only). The first is where it is written when it can be."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vms-regions"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    writable = os.access(root, os.W_OK) and os.stat(root).st_mode & 0o222  # root ignores permissions; honour them
    here, there = root / f".vms_{name}", home / f"{root.name}_{tag}_{name}"
    return [here, there] if writable else [there, here]


def cache_key(root, names, size):
    """Changes whenever a file is added, removed, replaced or touched, or the size or resizing changes."""
    stats = [(d, n, st.st_size, st.st_mtime_ns)
             for n in names for d in ("images", "vms") for st in [(root / d / n).stat()]]
    blob = json.dumps([CACHE_VERSION, size, {k: int(v) for k, v in RESAMPLE.items()}, stats]).encode()
    return hashlib.sha256(blob).hexdigest()


def read_cache(paths, key, what):
    """The contents of the first cache file in `paths` whose key is `key` (None if none is current)."""
    for path in paths:
        if path.exists():
            try:
                t0, cached = time.perf_counter(), torch.load(path, map_location="cpu", weights_only=True)
                if cached.get("key") == key:
                    print(f"{what}: cached load from {path} in {time.perf_counter() - t0:.2f} s")
                    return cached
            except Exception as e:  # a damaged cache is rebuilt, never fatal
                print(f"{what}: ignoring unreadable cache {path} ({type(e).__name__})")
    return None


def write_cache(path, contents):
    """Save atomically (a temporary file, then a rename); returns where it went or why it did not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(contents, tmp)
        os.replace(tmp, path)
        return f"cached to {path}"
    except OSError as e:
        return f"not cached ({e})"


def load_pairs(root, names, size, refresh=False, kinds=("images", "vms")):
    """Decoded, resized uint8 tensors (N x 3 x S x S) of `kinds` (images, vms), from the cache when it is current
    (refresh: decode and rewrite the cache regardless). Only both kinds together are cached."""
    paths, key, both = cache_files(root, f"cache_{size}px.pt"), cache_key(root, names, size), len(kinds) == 2
    cached = None if refresh or not both else read_cache(paths, key, f"data ({len(names)} pairs at {size} px)")
    if cached is not None:
        return [cached["images"], cached["maps"]]
    print(f"data: decoding {len(kinds) * len(names)} JPEGs from {root} and resizing to {size} px"
          + (" (once; cached after)..." if both else "..."))
    t0, arrays = time.perf_counter(), {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        for d in kinds:
            stack = list(pool.map(lambda n: decode(root / d / n, size, RESAMPLE[d]), names))
            arrays[d] = torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).contiguous()
    where = ""
    if both:
        where = "; " + write_cache(paths[0], {"key": key, "names": list(names), "images": arrays["images"],
                                            "maps": arrays["vms"]})
    print(f"data: decoded {len(kinds) * len(names)} files in {time.perf_counter() - t0:.1f} s{where}")
    return [arrays[d] for d in kinds]


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


def load_data(path=None, size=64, device="cpu", selection=0.1, fold=None, split_seed=0, synthetic_seed=0,
              refresh=False):
    """The splits as VMSData on `device` (see assign_splits for selection, fold and split_seed); the synthetic set
    (announced loudly) for --data synthetic or when no data is found. VMSData.source names what was loaded: the
    resolved folder, or "synthetic". refresh: decode the JPEGs even when the cache is current (bench.py)."""
    if size < 8:
        raise DataError(f"--size {size}: too small (at least 8 pixels)")
    root, reason = resolve_data(path)
    if root is None or root == SYNTHETIC:
        print("SYNTHETIC DATA: " + ("--data synthetic" if root else f"VISCHEMA PLUS not found ({reason})")
              + f"; using the built-in synthetic set. For the real study put VISCHEMA PLUS at {DEFAULT_DATA}/ or "
              "pass --data PATH (see README).")
        data = synthetic_vischema(size, seed=synthetic_seed)
        names = data.train_names + data.val_names
        images, maps = torch.cat([data.train_x, data.val_x]), torch.cat([data.train_y, data.val_y])
        train, val, categories = data.train_names, data.val_names, data.categories
    else:
        for d in ("images", "vms"):
            if not (root / d).is_dir():
                raise DataError(f"{root}: no {d}/ folder (expected images/ and vms/ with the same file names)")
        train, val = split_names(root, split_seed)
        check_pairs(root, train + val)
        names = sorted(set(train + val))
        images, maps = (to_model_range(t) for t in load_pairs(root, names, size, refresh))
        categories = {}
        if (root / "viscplus_categories.csv").exists():
            with open(root / "viscplus_categories.csv", encoding="utf-8-sig", newline="") as f:
                categories = {r["name"].strip(): r["category"].strip() for r in csv.DictReader(f) if r.get("name")}
            categories = {n: categories[n] for n in names if n in categories}
    fit, sel, val = assign_splits(train, val, selection, fold, split_seed)
    index = {n: i for i, n in enumerate(names)}
    pick = lambda t, ns: t[[index[n] for n in ns]].to(device)  # noqa: E731
    chooser = (f"{len(sel)} selection (chooses the checkpoint)" if selection else
               "the val split also chooses the checkpoint (selection off)")
    source = SYNTHETIC if root in (None, SYNTHETIC) else str(root)
    where = "the synthetic set" if source == SYNTHETIC else f"VISCHEMA PLUS from {root}"
    print(f"data: {where}{f', fold {fold}' if fold else ''}: {len(fit)} train / {chooser} / {len(val)} val at "
          f"{size} px" + (f", {len(set(categories.values()))} categories" if categories else ""))
    return VMSData(pick(images, fit), pick(maps, fit), pick(images, sel), pick(maps, sel), pick(images, val),
                   pick(maps, val), fit, sel, val, categories, source)


# ------------------------------------------------------------------------------------------------ the synthetic set
def synthetic_vischema(size=64, n_train=1280, n_val=320, seed=0, device="cpu"):
    """The built-in synthetic set (synthetic.py) in the VMSData format, the first n_train scenes the training split
    and the rest the val split (which is also the selection split: load_data carves its own)."""
    images, maps, scenes = (t.to(device) if torch.is_tensor(t) else t for t in synthetic.scenes(size, n_train + n_val,
                                                                                                  seed))
    names = [f"synthetic_{i:04d}.png" for i in range(n_train + n_val)]
    x, y = to_model_range(images), to_model_range(maps)
    print(f"data: synthetic set, {n_train} train / {n_val} val at {size} px (seed {seed})")
    val = slice(n_train, None)
    return VMSData(x[:n_train], y[:n_train], x[val], y[val], x[val], y[val], names[:n_train], names[val], names[val],
                   dict(zip(names, scenes)), SYNTHETIC)
