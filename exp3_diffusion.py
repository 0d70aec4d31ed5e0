"""Experiment 3: a conditional denoising diffusion model that samples a photo's VMS map (Algorithm 3).

    python exp3_diffusion.py                                  # c 64, cosine schedule, T 1000, DDIM-50 sampling
    python exp3_diffusion.py --c 16 --epochs 30 --out runs/d  # a small configuration that trains on a CPU
    python exp3_diffusion.py --out runs/d --epochs 40 --resume  # continue (and extend) that run exactly

Palette/SR3 style: a UNet sees concat(photo, noisy map) and the step t (0 .. T-1, as in diffusers) and predicts the
noise, v or the clean map; sampling denoises pure noise into a map, K samples per photo averaged. One file, one
experiment, top to bottom: settings, DiffAugment, the schedules and q(x_t | x_0), the model, the training loop
(Algorithm 3), the samplers, then checkpoints and main. From this project it imports common.py, and pretrained.py
only for --encoder; blocks marked "# >>> shared: NAME" are byte-identical in the experiment files that have them.
"""
import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change


# ---------------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 3: conditional diffusion predicts VMS maps (Algorithm 3).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data, g, encoder, diffusion, opt, sampling, run = (p.add_argument_group(title) for title in (
        "data", "model", "pretrained encoder (an optional extra: README): its features condition the UNet",
        "diffusion", "optimisation", "sampling", "run"))
    common.shared_flags(data, encoder, run, __file__, RESUMABLE)
    data.add_argument("--diffaug", default=None, help="DiffAugment policies (translation, cutout, flip) for each photo "
                      "and its map; 'none' disables; unset: translation,cutout (--encoder: flip)")
    g.add_argument("--c", type=common.positive, default=64, help="base channels: the UNet's levels (c, 2c, 4c, 8c)")
    g.add_argument("--norm", choices=list(NORMS), default="group", help="norm in the residual blocks")
    g.add_argument("--attn", action="store_true", help="self-attention in the blocks at size/4 and size/8")
    diffusion.add_argument("--objective", choices=["eps", "v", "x0"], default="x0", help="what the network predicts: "
                           "the noise (the thesis), v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho), the clean map")
    diffusion.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], default="cosine", help="schedule")
    diffusion.add_argument("--T", type=common.positive, default=1000, help="diffusion steps")
    diffusion.add_argument("--beta-start", type=float, default=1e-4, help="first beta of the linear schedule")
    diffusion.add_argument("--beta-end", type=float, default=0.02, help="last beta of the linear schedule")
    diffusion.add_argument("--input-scale", type=float, default=1.0, help="scales the clean map before noising (Chen "
                           "2023; DDP uses 0.1 for dense prediction): below 1 the noise hides the map sooner")
    diffusion.add_argument("--x0-loss", type=common.loss_spec, default="none", help="a map loss (--loss syntax, e.g. "
                           "0.5l1+0.5cc) on the predicted clean map, added to the diffusion loss; x0 or v only")
    opt.add_argument("--lr", type=float, default=None, help="Adam learning rate; unset: 0.001")
    opt.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"), help="Adam betas")
    opt.add_argument("--ema", type=float, default=0.999, help="decay of the moving average that samples")
    opt.add_argument("--batch-size", type=common.positive, default=16, help="images per step")
    opt.add_argument("--epochs", type=common.positive, default=100, help="passes over the training split")
    sampling.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (eta 0); 0: ancestral, T steps")
    sampling.add_argument("--samples", type=common.positive, default=1, help="K: sampled maps averaged per photo (what "
                          "is scored); 1: a real sample (FID: realism), K > 1: a mean, nearer the expected map (CC)")
    sampling.add_argument("--eval-every", type=common.positive, default=5, help="sample the selection and val splits "
                          "(and choose best.pt) every N epochs, and at the last")
    return p


def checks(args):
    """(ok, message) for each rule of this experiment's settings (common.settings adds the shared ones)."""
    x0_terms = set() if args.x0_loss == "none" else {t for _, t in common.parse_loss(args.x0_loss)}
    return [(set(policy(args)) <= set(AUGMENTS), f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
            (args.size % 8 == 0, f"--size {args.size} must be a multiple of 8 (the UNet halves it 3 times)"),
            (args.encoder == "scratch" or set(policy(args)) <= {"flip"}, f"--diffaug {args.diffaug}: with --encoder "
             "the photo's features are cached, so flip (or none) is the only augmentation"),
            (0 <= args.sample_steps <= args.T, f"--sample-steps must be from 0 (ancestral) to --T {args.T}"),
            (0 < args.beta_start <= args.beta_end < 1, "--beta-start, --beta-end need 0 < start <= end < 1"),
            (0 <= args.ema < 1 and args.input_scale > 0, "--ema must be in [0, 1) and --input-scale above 0"),
            (not x0_terms or args.objective != "eps", "--x0-loss needs --objective x0 or v (from eps the clean map "
             "divides the network's error by sqrt(alpha_bar), near 0 at large t)"),
            (args.target == "label" or not {"cc", "kl"} & x0_terms, f"--x0-loss {args.x0_loss}: cc and kl compare "
             "maps, so they need --target label")]


# ------------------------------------------------------------------------------------------------------- DiffAugment
# >>> shared: DiffAugment
# Differentiable augmentation (Zhao et al. 2020) of photos and maps stacked (N x 6 x S x S), so that both move alike;
# each policy acts on each sample with probability p. Uncovered pixels are -1: a black photo, an empty map.
def translation(x, p, ratio=0.125):
    """Shift each sample by up to ratio * size pixels along each axis."""
    n, _, h, w = x.shape
    sh, sw = max(1, round(h * ratio)), max(1, round(w * ratio))
    on = (torch.rand(n, device=x.device) < p).long()
    ty = torch.randint(-sh, sh + 1, (n, 1), device=x.device) * on[:, None]
    tx = torch.randint(-sw, sw + 1, (n, 1), device=x.device) * on[:, None]
    src_y, src_x = torch.arange(h, device=x.device) - ty, torch.arange(w, device=x.device) - tx  # row r shows r - ty
    inside = ((src_y >= 0) & (src_y < h))[:, :, None] & ((src_x >= 0) & (src_x < w))[:, None, :]
    out = x[torch.arange(n, device=x.device)[:, None, None], :, src_y.clamp(0, h - 1)[:, :, None],
            src_x.clamp(0, w - 1)[:, None, :]]  # N x H x W x C
    return torch.where(inside[:, None], out.permute(0, 3, 1, 2), torch.full_like(x, -1))


def cutout(x, p, ratio=0.5):
    """Blank one square of ratio * size at a random position in each sample."""
    n, _, h, w = x.shape
    ch, cw = round(h * ratio), round(w * ratio)
    on = torch.rand(n, 1, device=x.device) < p
    cy = torch.randint(0, h + 1 - ch % 2, (n, 1), device=x.device) - ch // 2  # top-left corner, may lie outside
    cx = torch.randint(0, w + 1 - cw % 2, (n, 1), device=x.device) - cw // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y, in_x = (rows >= cy) & (rows < cy + ch) & on, (cols >= cx) & (cols < cx + cw)
    return x.masked_fill((in_y[:, :, None] & in_x[:, None, :])[:, None], -1)


def flip(x, p):
    """Mirror each sample left-right: the VISCHEMA paper's CNN trained on mirrored copies."""
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < p, x.flip(3), x)


AUGMENTS = {"translation": translation, "cutout": cutout, "flip": flip}


def policy(args):
    """--diffaug "translation,cutout" -> ["translation", "cutout"]; "none" or "" -> []."""
    return [] if args.diffaug.strip() in ("", "none") else [s.strip() for s in args.diffaug.split(",")]


def augment(photos, maps, names, p):
    """The policies `names` applied to each photo and its map alike (N x 3 x S x S each): (photos, maps)."""
    x = torch.cat([photos, maps], 1)
    for name in names:
        x = AUGMENTS[name](x, p)
    return x[:, :3], x[:, 3:]

# <<< shared: DiffAugment


# --------------------------------------------------------------------------------------------------------- diffusion
def beta_schedule(name, T, beta_start=1e-4, beta_end=0.02):
    """The T betas of a noise schedule, float64; alpha_bar[t] = prod over s <= t of (1 - beta[s]).
    linear:  evenly spaced from beta_start to beta_end (Ho et al. 2020; diffusers' "linear").
    cosine:  beta[t] = min(1 - f((t+1)/T) / f(t/T), 0.999), f(u) = cos((u + 0.008) / 1.008 * pi/2)^2
             (Nichol & Dhariwal 2021, s = 0.008; diffusers' "squaredcos_cap_v2").
    sigmoid: the same with f(u) = (sigmoid(3) - sigmoid(6u - 3)) / (sigmoid(3) - sigmoid(-3)), Chen (2023)'s
             sigmoid schedule with start -3, end 3, tau 1."""
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    if name == "cosine":
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # sigmoid
        v_start, v_end = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))  # sigmoid(-3), sigmoid(3)
        f = (v_end - (6 * u - 3).sigmoid()) / (v_end - v_start)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class Diffusion:
    """q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I), ab = alpha_bar[t] (a float or N x 1 x 1 x 1), and the conversions
    between the network's output (its objective) and (x_0, eps); x_0 is input_scale times the map. From a run's
    settings: --schedule, --T, --beta-start, --beta-end, --objective, --input-scale."""

    def __init__(self, args):
        self.alpha_bar = torch.cumprod(1 - beta_schedule(args.schedule, args.T, args.beta_start, args.beta_end), 0)
        self.T, self.objective, self.input_scale = args.T, args.objective, args.input_scale

    @staticmethod
    def noise(x0, eps, ab):
        """A draw of x_t from q(x_t | x_0), given the noise eps ~ N(0, I)."""
        return ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps

    def target(self, x0, eps, ab):
        """What the network learns to output at x_t = noise(x0, eps, ab)."""
        return {"eps": eps, "x0": x0, "v": ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0}[self.objective]

    def split(self, out, x_t, ab):
        """(x_0, eps) implied by the network's output at x_t."""
        if self.objective == "eps":
            return (x_t - (1 - ab) ** 0.5 * out) / ab ** 0.5, out
        if self.objective == "x0":
            return out, (x_t - ab ** 0.5 * out) / (1 - ab) ** 0.5
        return ab ** 0.5 * x_t - (1 - ab) ** 0.5 * out, ab ** 0.5 * out + (1 - ab) ** 0.5 * x_t


# --------------------------------------------------------------------------------------------------------- the model
# >>> shared: norms
class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in float32 under bf16 autocast (--amp), where a CPU's bf16 group norm is slow."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


NORMS = {  # group: the most groups (at most 32) that leave at least two channels in each
    "batch": lambda ch: nn.BatchNorm2d(ch),
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True),
    "layer": lambda ch: GroupNorm(1, ch),  # normalises over channels and pixels of each image
    "group": lambda ch: GroupNorm(max([g for g in range(1, 33) if ch % g == 0 and ch // g >= 2] or [1]), ch),
    "none": lambda ch: nn.Identity(),
}
# <<< shared: norms


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the steps t (Vaswani et al. 2017, as in DDPM): N integers -> N x dim."""
    angles = t.float()[:, None] * torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    """(N x cin x H x W, N x E step embedding) -> N x cout x H x W: norm, SiLU, 3x3 conv, + the projected embedding,
    norm, SiLU, 3x3 conv, + the input (1x1 conv if channels change); with attn then self-attention over the pixels."""

    def __init__(self, cin, cout, emb, norm, attn=False):
        super().__init__()
        self.norm1, self.conv1, self.emb = NORMS[norm](cin), nn.Conv2d(cin, cout, 3, padding=1), nn.Linear(emb, cout)
        self.norm2, self.conv2 = NORMS[norm](cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = nn.MultiheadAttention(cout, 1, batch_first=True) if attn else None
        self.norm3 = NORMS[norm](cout) if attn else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        x = self.skip(x) + self.conv2(F.silu(self.norm2(h)))
        if self.attn is None:
            return x
        z = self.norm3(x).flatten(2).transpose(1, 2)  # N x HW x C: one token per pixel
        return x + self.attn(z, z, z, need_weights=False)[0].transpose(1, 2).reshape(x.shape)


class UNet(nn.Module):
    """(N x 6 x S x S concat(photo, x_t), N steps t[, encoder features per level]) -> N x 3 x S x S prediction of
    eps, v or x_0. Levels of (c, 2c, 4c, 8c) channels at S .. S/8 (average pooling), a middle block, a decoder that
    upsamples and concatenates the encoder's features; the step embedding enters every block. With a pretrained
    encoder, its level nearest in size to each of the UNet's (`cached`) is added, by a 1x1 conv, to that input."""

    def __init__(self, c=64, norm="group", attn=False, encoder=None, size=64):
        super().__init__()
        ch, e = [c, 2 * c, 4 * c, 8 * c], 4 * c  # e: the step embedding's width
        self.embed, self.stem = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e)), nn.Conv2d(6, c, 3, 1, 1)
        self.down = nn.ModuleList(ResBlock(([c] + ch)[i], ch[i], e, norm, attn and i >= 2) for i in range(4))
        self.mid = ResBlock(ch[3], ch[3], e, norm, attn)
        self.up = nn.ModuleList(ResBlock(ch[i + 1] + ch[i], ch[i], e, norm, attn and i >= 2) for i in range(3))
        self.head = nn.Sequential(NORMS[norm](c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.cached, self.size = None, size
        if encoder is not None:  # (the encoder's network loads here)
            sides, channels = encoder.sides, encoder.channels
            self.levels = [min(range(len(sides)), key=lambda k: abs(math.log(sides[k] * 2 ** i / size)))
                           for i in range(4)]
            self.cached = sorted(set(self.levels))
            self.cond = nn.ModuleList(nn.Conv2d(channels[k], ([c] + ch)[i], 1) for i, k in enumerate(self.levels))

    def condition(self, photos):
        """(photo at S, its encoder features per UNet level or None) for N x 3 x S x S photos, or with an encoder
        their cached features whose first level is the photo at S (pretrained.Features.with_photos)."""
        if self.cached is None:
            return photos, None
        photo, *feats = photos.levels()
        return photo, [feats[self.cached.index(k)] for k in self.levels]

    def forward(self, x, t, feats=None):
        emb = self.embed(timestep_embedding(t, self.embed[0].in_features))
        x, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = x if i == 0 else F.avg_pool2d(x, 2)
            if feats is not None:
                h = h + F.interpolate(self.cond[i](feats[i]), size=h.shape[-2:], mode="bilinear")
            x = block(h, emb)
            skips.append(x)
        x = self.mid(x, emb)
        for i in reversed(range(3)):
            x = self.up[i](torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skips[i]], 1), emb)
        return self.head(x)


def inputs(model, encoder, device, data=None, photos=None):
    """What the network is conditioned on, for every split of data (common.VMSData) or for photos at --photo-size
    (N x 3 x P x P): the photos, or with an encoder the features of the levels it reads (cached for data) with the
    photo at --size in front."""
    if encoder is None:
        return data.x if data is not None else photos
    if data is None:
        small = F.interpolate(photos, size=(model.size,) * 2, mode="bicubic", antialias=True).clamp(-1, 1)
        return encoder(photos, model.cached).with_photos(small)
    feats = encoder.features(data, model.cached, device)
    return {s: feats[s].with_photos(data.x[s]) for s in feats}


# >>> shared: encoder
def encoder_of(args):
    """pretrained.Encoder of --encoder, or None for scratch: pretrained.py is imported only for an encoder."""
    if args.encoder == "scratch":
        return None
    import pretrained
    return pretrained.Encoder(args.encoder, args.photo_size)
# <<< shared: encoder


# ------------------------------------------------------------------------------------------ training (Algorithm 3)
def run_model(model, photo, feats, x_t, t, amp):
    """The network's float32 output for concat(photo, x_t) at the steps t, with the photo's encoder features
    (or None), under bf16 autocast with --amp."""
    with torch.autocast(x_t.device.type, torch.bfloat16, enabled=amp):
        return model(torch.cat([photo, x_t], 1), t, feats).float()


def diffusion_loss(model, photos, vms, diffusion, target="label", x0_loss="none", amp=False, generator=None):
    """The loss of Algorithm 3 for a batch of photos (or their cached features) and their maps (N x 3 x S x
    S); noise from `generator`."""
    photo, feats = model.condition(photos)
    x0 = diffusion.input_scale * common.to_target(photo, vms, target)                # the clean signal x_0
    t = torch.randint(0, diffusion.T, (len(x0),), generator=generator, device=x0.device)  # U({0, ..., T-1})
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)               # eps ~ N(0, I)
    ab = diffusion.alpha_bar.to(x0)[t].view(-1, 1, 1, 1)
    x_t = diffusion.noise(x0, eps, ab)                                               # x_t ~ q(x_t | x_0)
    out = run_model(model, photo, feats, x_t, t, amp)         # predict eps (or v, x_0) from concat(x, x_t), t
    loss = F.mse_loss(out, diffusion.target(x0, eps, ab))                            # mean squared error
    if x0_loss != "none":                                     # + a map loss on the predicted clean map
        s = diffusion.input_scale
        loss = loss + common.map_loss(x0_loss, diffusion.split(out, x_t, ab)[0] / s, x0 / s)
    return loss


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- d ema + (1 - d) weights, d = min(decay, (1 + step) / (10 + step)); buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]  # no encoder
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)  # one fused update, not 100
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_epoch(model, ema, opt, x, maps, diffusion, args, step):
    """Algorithm 3, one pass over the shuffled training split (photos, or their cached features, and maps).
    Returns (mean loss, optimiser steps so far)."""
    model.train()
    n, bs = len(maps), min(args.batch_size, len(maps))
    order, loss_sum = torch.randperm(n).to(maps.device), 0.0
    for i in common.progress(n // bs, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = x[idx], maps[idx]                                     # a batch of photos and true maps
        if args.encoder == "scratch":
            image, vms = augment(image, vms, policy(args), args.diffaug_p)
        else:  # cached features know only flip: half the samples, at random, take their mirror image's (and map)
            on = (torch.rand(bs, device=vms.device) < 0.5) & ("flip" in policy(args))
            image, vms = image.flip_where(on), torch.where(on.view(-1, 1, 1, 1), vms.flip(3), vms)
        loss = diffusion_loss(model, image, vms, diffusion, args.target, args.x0_loss, args.amp)  # noise...
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()                                                   # a gradient step on the loss
        step += 1
        update_ema(ema, model, step, args.ema)                       # the weights' moving average samples
        loss_sum += loss.detach()
    return (loss_sum / (n // bs)).item(), step


@torch.no_grad()
def val_loss(model, photos, maps, diffusion, args):
    """diffusion_loss on the val split, unaugmented, t and noise seeded by --seed (the same every epoch)."""
    model.eval()
    g = torch.Generator(maps.device).manual_seed(args.seed)
    loss = sum(diffusion_loss(model, x, y, diffusion, args.target, args.x0_loss, args.amp, g) * len(y)
               for x, y in zip(photos.split(256), maps.split(256)))
    return (loss / len(maps)).item()


# --------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, photos, diffusion, steps=50, generator=None, samples=1, amp=False, batch=None):
    """K = `samples` draws of the map for each of N photos (what model.condition takes): their mean and per-pixel
    standard deviation (N x 3 x S x S each, in [-1, 1]). All noise comes from `generator`, x_T as K tensors one after
    another (the numbers of K calls with samples=1); `batch` maps per pass. steps > 0: DDIM, eta 0, from t = round(T -
    i T / steps) - 1 to t - T // steps (diffusers' "trailing"); steps = 0: ancestral DDPM over all T steps ("fixed_
    small" variance). x_0 is clipped to the map's range at every step."""
    model.eval()
    T, scale, alpha_bar, k = diffusion.T, diffusion.input_scale, diffusion.alpha_bar.tolist(), samples
    photo, feats = model.condition(photos)
    batch = batch or (512 if photo.device.type == "cuda" else 32)
    ts = [round(T - i * T / steps) - 1 for i in range(steps)] if steps else range(T - 1, -1, -1)
    x = torch.stack([torch.randn(photo.shape, generator=generator, device=photo.device) for _ in range(k)],
                    1).flatten(0, 1)                                         # x_T ~ N(0, I), N*K maps
    cond = [c.repeat_interleave(k, 0).split(batch) for c in [photo, *(feats or [])]]  # each photo K times
    for i in common.progress(len(ts), "sample", len(photo)):
        t = ts[i]
        prev = t - (T // steps if steps else 1)
        ab, ab_prev = alpha_bar[t], alpha_bar[prev] if prev >= 0 else 1.0
        out = torch.cat([run_model(model, p, f or None, xs, torch.full((len(xs),), t, device=xs.device), amp)
                         for p, *f, xs in zip(*cond, x.split(batch))])
        x0, eps = diffusion.split(out, x, ab)
        x0 = x0.clamp(-scale, scale)  # the map's range [-1, 1], times --input-scale
        if steps:  # DDIM, eta 0: the point of the deterministic path at prev
            x = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
        else:  # DDPM: the mean of q(x_prev | x_t, x_0), plus noise of its variance except at the last step
            beta = 1 - ab / ab_prev
            x = (ab_prev ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - ab_prev) * x) / (1 - ab)
            if t > 0:
                std = max((1 - ab_prev) / (1 - ab) * beta, 1e-20) ** 0.5
                x = x + std * torch.randn(x.shape, generator=generator, device=x.device)
    draws = (x / scale).unflatten(0, (-1, k))                                # N x K x 3 x S x S
    return draws.mean(1), draws.std(1, correction=0)


def predict(model, photos, diffusion, args, steps, samples):
    """(maps, std) for N photos (or their cached features): the mean of `samples` sampled maps per photo in [-1, 1]
    and the samples' per-pixel standard deviation (the model's uncertainty). The noise comes from a generator seeded
    by --seed: the same photos always get the same maps, and evaluating leaves the training RNG alone."""
    g = torch.Generator(args.device).manual_seed(args.seed)
    mean, std = sample(model, photos, diffusion, steps, g, samples, args.amp)
    return common.from_target(mean, photos, args.target), std * (2 if args.target == "sum" else 1)


# --------------------------------------------------------------------------------------------------- checkpoints
# >>> shared: checkpoints
def save_atomic(obj, path):
    """Write to a temporary file and rename: a kill at any moment leaves the old or the new file, never half."""
    torch.save(obj, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)


def load_checkpoint(path):
    """A run's checkpoint (torch.load, weights only); a missing, truncated or foreign file is one error line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        what = f"damaged or not a checkpoint ({type(e).__name__})" if Path(path).exists() else "no such file"
        common.fail(f"{path}: {what}; evaluate.py reads best.pt, --resume last.pt; to train again, use another --out")


def save_last(out, states, **info):
    """last.pt: the state of every network and optimiser in `states`, the RNG states and `info` (epoch, best, ...)."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    save_atomic({**{name: obj.state_dict() for name, obj in states.items()}, **info, "rng": rng}, out / "last.pt")


def start(args, out, data, states):
    """A new run writes args.json (with the data it found), an empty metrics.jsonl and starts at epoch 0; --resume
    loads last.pt into `states`, restores the RNG, keeps metrics.jsonl up to its epoch. Returns last.pt or a new run."""
    ck, kept = {"epoch": 0, "step": 0, "best": {"sel_l1": math.inf, "epoch": 0}, "seconds": 0.0, "last": None}, []
    if args.resume:
        ck = load_checkpoint(out / "last.pt")
        for name, obj in states.items():
            obj.load_state_dict(ck[name])
        torch.set_rng_state(ck["rng"]["cpu"])
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= ck["epoch"]]
        print(f"resume: {out} from epoch {ck['epoch']} (best.pt: epoch {ck['best']['epoch']})")
    (out / "metrics.jsonl").write_text("".join(kept))
    (out / "args.json").write_text(json.dumps({**vars(args), "data": data.source}, indent=1))
    return ck
# <<< shared: checkpoints


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = common.settings(build_parser, argv, RESUMABLE, checks)  # every setting, resolved (--resume: the run's)
    data, base, out = common.begin(args, __file__)  # the splits, the constant maps' metrics, the run folder
    torch.manual_seed(args.seed)
    diffusion, unit, encoder = Diffusion(args), common.to_unit, encoder_of(args)
    model = UNet(args.c, args.norm, args.attn, encoder, args.size).to(args.device, memory_format=torch.channels_last)
    x = inputs(model, encoder, args.device, data)             # photos, or cached encoder features
    ema = copy.deepcopy(model).requires_grad_(False)
    net, ema_net = (torch.compile(model), torch.compile(ema)) if args.compile else (model, ema)  # model saves
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=tuple(args.betas),
                           fused=args.device == "cuda" or None)  # fused: one kernel on CUDA
    states = {"model": model, "ema": ema, "optimizer": opt}  # what last.pt saves, by name
    first, step, best, last, seconds = map(start(args, out, data, states).get, ("epoch", "step", "best", "last",
                                                                                "seconds"))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sampler = f"DDIM-{args.sample_steps}" if args.sample_steps else f"ancestral DDPM-{args.T}"
    print(f"exp3: {args.encoder} diffusion UNet c={args.c}, {n_params / 1e6:.2f} M trained parameters, "
          f"{args.objective} + {args.x0_loss} on x0, {args.schedule} T={args.T}, {sampler} x{args.samples}, Adam lr "
          f"{args.lr:g}; run folder {out}")
    sampled = lambda x: predict(ema_net, x, diffusion, args, args.sample_steps, args.samples)[0]  # noqa: E731
    score = lambda x, y: common.map_metrics(unit(sampled(x)), unit(y))  # noqa: E731

    status, epoch = "ok", first
    try:
        for epoch in range(first + 1, args.epochs + 1):
            t0 = time.perf_counter()
            train_loss, step = train_epoch(net, ema, opt, x["train"], data.y["train"], diffusion, args, step)
            if not math.isfinite(train_loss):
                status = "diverged"
                print(f"epoch {epoch}: the loss became {train_loss}; the run diverged")
                break
            row = {"epoch": epoch, "train_loss": train_loss,
                   "val_loss": val_loss(net, x["val"], data.y["val"], diffusion, args)}
            text = f"train loss {train_loss:.4f}  val loss {row['val_loss']:.4f}"
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # sample (EMA weights); choose, report
                t1 = time.perf_counter()
                pred = sampled(x["val"])
                ms, val = (time.perf_counter() - t1) * 1e3 / len(pred), common.map_metrics(unit(pred),
                                                                                           unit(data.y["val"]))
                sel = score(x["sel"], data.y["sel"]) if args.selection else val
                train = score(x["train"][:64], data.y["train"][:64])["l1"]  # sampled: 64 photos, not all
                row.update(train_l1=train, sel_l1=sel["l1"], sel_cc=sel["cc"],
                           **{"val_" + k: val[k] for k in common.METRICS_ROW})
                text, last = text + "  " + common.metrics_text(val), row
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.x["val"][:8], data.y["val"][:8],
                                 pred[:8]], ["photo", "true map", f"mean of {args.samples}"])
                if sel["l1"] < best["sel_l1"]:
                    best = {"epoch": epoch, **{"sel_" + k: sel[k] for k in common.METRICS_ROW}, "train_l1": train,
                            **{"val_" + k: v for k, v in val.items()}, "sample_ms_per_map": ms}
                    save_atomic({"model": ema.state_dict(), "args": {**vars(args), "data": data.source},
                                 "epoch": epoch, "metrics": best, "experiment": "exp3_diffusion"}, out / "best.pt")
            dt = time.perf_counter() - t0
            seconds += dt
            save_last(out, states, epoch=epoch, step=step, best=best, last=last, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds, best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  {text}  {tail}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python {Path(__file__).name} --out {out} --resume")
        raise SystemExit(130) from None

    common.finish(out, args, build_parser, __file__, data, status=status, epoch=epoch, best=best, last=last,
                  seconds=seconds, baselines=base, params=n_params, train_l1=best.get("train_l1"),
                  sample_ms_per_map=best.get("sample_ms_per_map"), sampler=sampler, sample_steps=args.sample_steps,
                  samples=args.samples)


if __name__ == "__main__":
    main()
