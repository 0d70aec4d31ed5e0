"""Experiment 3: a conditional denoising diffusion model that samples a photo's VMS map (the thesis' Algorithm 3).

    python exp3_diffusion.py                                    # c 64, cosine schedule, T 1000, DDIM-50 sampling
    python exp3_diffusion.py --c 16 --epochs 30 --out runs/d     # a small configuration that trains on a CPU
    python exp3_diffusion.py --out runs/d --epochs 40 --resume   # continue (and extend) that run exactly

Palette/SR3 style: a UNet sees concat(photo, noisy map) and the step t (0 .. T-1, as in diffusers) and predicts the
noise, v or the clean map; sampling denoises pure noise into a map, K samples per photo averaged. The file reads top
to bottom: settings, the schedules and q(x_t | x_0), the model, DiffAugment, the training loop (Algorithm 3), the
samplers, plumbing. It imports only common.py from this project; blocks marked "# >>> shared: NAME", and functions
of the same name, are byte-identical in the experiment files that have them.
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

# >>> shared: constants
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "adadelta": 1.0, "adagrad": 1e-2}
RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
CHANNELS_LAST = None  # channels_last memory format: None = on CUDA only; bench.py sets True/False to measure it
# <<< shared: constants
TRAIN_EVAL = 64  # train_l1 is the sampled L1 of this many training photos (all 1280 would cost four val passes)


# ---------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 3: conditional diffusion predicting VMS maps (Algorithm 3).",
                                formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    # >>> shared: data flags
    g.add_argument("--data", default=None, help="VISCHEMA PLUS folder, or 'synthetic' for the built-in set; unset: "
                   "$VISCHEMA_DIR, else ./data/VISCHEMA_PLUS, else the synthetic set (announced on the first line)")
    g.add_argument("--size", type=int, default=64, help="side of the square images and maps, in pixels")
    g.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                   "predict (photo + map) / 2 and recover the map from it (the thesis' second formulation)")
    # <<< shared: data flags
    g.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies, comma-separated "
                   "(translation, cutout, flip), applied identically to each photo and its map; 'none' disables")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("model")
    g.add_argument("--c", type=int, default=64, help="base channels: the UNet's levels have (c, 2c, 4c, 8c)")
    g.add_argument("--norm", choices=list(NORMS), default="group", help="normalisation in the residual blocks")
    g.add_argument("--attn", action="store_true", help="self-attention in the blocks at size/4 and size/8")
    g = p.add_argument_group("diffusion")
    g.add_argument("--objective", choices=["eps", "v", "x0"], default="x0", help="what the network predicts: the "
                   "noise (the thesis' choice), v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho), or the clean map. "
                   "x0 by measurement: 15 CPU epochs side by side sampled val L1 0.080 (x0), 0.102 (v), 0.445 (eps)")
    g.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], default="cosine", help="noise schedule")
    g.add_argument("--T", type=int, default=1000, help="diffusion steps")
    g.add_argument("--beta-start", type=float, default=1e-4, help="first beta of the linear schedule")
    g.add_argument("--beta-end", type=float, default=0.02, help="last beta of the linear schedule")
    g.add_argument("--input-scale", type=float, default=1.0, help="scales the clean map before noising (Chen 2023; "
                   "DDP uses 0.1 for dense prediction): below 1 the noise hides the map sooner")
    g.add_argument("--x0-loss", type=common.optional_loss, default="none", help="adds a map loss on the network's "
                   "predicted clean map to the diffusion loss, in --loss syntax with its weights (e.g. 0.5l1+0.5cc); "
                   "needs --objective x0 or v")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"), help="Adam betas")
    g.add_argument("--ema", type=float, default=0.999, help="decay of the weights' moving average, which samples")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-steps", type=int, default=50, help="N: DDIM, eta 0, N steps; 0: ancestral DDPM, T steps")
    g.add_argument("--samples", type=int, default=1, help="K: sampled maps averaged per photo (what L1 and CC score); "
                   "the K samples of a photo go through the network in one batch")
    g.add_argument("--eval-every", type=int, default=5, help="sample val maps (L1, CC, best.pt) every N epochs")
    g = p.add_argument_group("run")
    common.add_run_flags(g, __file__, RESUMABLE)
    return p


# ---------------------------------------------------------------------------------------------------- diffusion
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
    elif name == "sigmoid":
        v_start, v_end = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))  # sigmoid(-3), sigmoid(3)
        f = (v_end - (6 * u - 3).sigmoid()) / (v_end - v_start)
    else:
        raise ValueError(f"unknown schedule {name!r}")
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


class Diffusion:
    """q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I), ab = alpha_bar[t] (a float or N x 1 x 1 x 1), and the conversions
    between the network's output (--objective) and (x_0, eps); x_0 is --input-scale times the generated signal."""

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


# ---------------------------------------------------------------------------------------------------- the model
# >>> shared: norms
def group_count(ch):
    """GroupNorm groups: the most groups (at most 32) that leave at least two channels in each."""
    return max([g for g in range(1, 33) if ch % g == 0 and ch // g >= 2] or [1])


NORMS = {
    "batch": lambda ch: nn.BatchNorm2d(ch),
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True),
    "layer": lambda ch: nn.GroupNorm(1, ch),  # normalises over channels and pixels of each image
    "group": lambda ch: nn.GroupNorm(group_count(ch), ch),
    "none": lambda ch: nn.Identity(),
}
# <<< shared: norms


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the steps t (Vaswani et al. 2017, as in DDPM): N integers -> N x dim."""
    angles = t.float()[:, None] * torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    """(N x cin x H x W, N x E step embedding) -> N x cout x H x W: norm, SiLU, 3x3 conv, plus the projected step
    embedding, norm, SiLU, 3x3 conv, plus the input (1x1 conv when channels change); then, with attn, single-head
    self-attention over the pixels (pre-norm, residual)."""

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
    """(N x 6 x S x S concat(photo, x_t), N steps t) -> N x 3 x S x S prediction of eps, v or x_0 (no squashing).
    Levels of (c, 2c, 4c, 8c) channels at S .. S/8 (average pooling), a middle block, a decoder that upsamples and
    concatenates the encoder's features; the step embedding (sinusoidal, then an MLP) enters every block."""

    def __init__(self, c=64, norm="group", attn=False):
        super().__init__()
        ch, e = [c, 2 * c, 4 * c, 8 * c], 4 * c
        self.embed = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.stem = nn.Conv2d(6, c, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(([c] + ch)[i], ch[i], e, norm, attn and i >= 2) for i in range(4))
        self.mid = ResBlock(ch[3], ch[3], e, norm, attn)
        self.up = nn.ModuleList(ResBlock(ch[i + 1] + ch[i], ch[i], e, norm, attn and i >= 2) for i in range(3))
        self.head = nn.Sequential(NORMS[norm](c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x, t):
        emb = self.embed(timestep_embedding(t, self.embed[0].in_features))
        x, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2), emb)
            skips.append(x)
        x = self.mid(x, emb)
        for i in reversed(range(3)):
            x = self.up[i](torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skips[i]], 1), emb)
        return self.head(x)


# ---------------------------------------------------------------------------------------------------- DiffAugment
# >>> shared: DiffAugment
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
# <<< shared: DiffAugment


def diff_augment(image, vms, policy, p):
    """The same random transform for each photo and its map: N x 3 x S x S each, returned as a pair."""
    x = torch.cat([image, vms], 1)
    for name in policy:
        x = AUGMENTS[name](x, p)
    return x[:, :3], x[:, 3:]


# >>> shared: targets
def to_target(image, vms, target):
    """What the network learns to produce: the map itself, or (image + map) / 2 for --target sum."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from what the network produced (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)
# <<< shared: targets


# ---------------------------------------------------------------------------------------------------- training
def run_model(model, image, x_t, t, amp):
    """The network's float32 output for concat(photo, x_t) at the steps t (bf16 autocast with --amp)."""
    x = to_memory_format(torch.cat([image, x_t], 1), x_t.device)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        return model(x, t).float()


def diffusion_loss(model, image, vms, diffusion, args, generator=None):
    """The loss of Algorithm 3 for a batch of photos and their maps (N x 3 x S x S each); noise from `generator`."""
    x0 = args.input_scale * to_target(image, vms, args.target)                        # the clean signal x_0
    t = torch.randint(0, diffusion.T, (len(x0),), generator=generator, device=x0.device)  # t ~ U({0, ..., T-1})
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)                # eps ~ N(0, I)
    ab = diffusion.alpha_bar.to(x0)[t].view(-1, 1, 1, 1)
    x_t = diffusion.noise(x0, eps, ab)                                                # x_t ~ q(x_t | x_0)
    out = run_model(model, image, x_t, t, args.amp)              # predict eps (or v, x_0) from concat(x, x_t) and t
    loss = F.mse_loss(out, diffusion.target(x0, eps, ab))                             # mean squared error
    if args.x0_loss != "none":                                   # + a map loss on the predicted clean map
        loss = loss + common.map_loss(args.x0_loss, diffusion.split(out, x_t, ab)[0] / args.input_scale,
                                      x0 / args.input_scale)
    return loss


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- d ema + (1 - d) weights, d = min(decay, (1 + step) / (10 + step)) (a warm-up); buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)  # one fused update, not 100 small
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_epoch(model, ema, opt, data, diffusion, args, policy, step):
    """Algorithm 3, one pass over the shuffled training split. Returns (mean loss, optimiser steps so far)."""
    model.train()
    n, bs = len(data.train_x), min(args.batch_size, len(data.train_x))
    order, loss_sum = torch.randperm(n).to(data.train_x.device), 0.0
    for i in common.progress(n // bs, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = diff_augment(data.train_x[idx], data.train_y[idx], policy, args.diffaug_p)  # photos, true maps
        loss = diffusion_loss(model, image, vms, diffusion, args)    # noise the maps, predict, MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()                                                   # a gradient step on the loss
        step += 1
        update_ema(ema, model, step, args.ema)                       # the moving average of the weights samples
        loss_sum += loss.detach()
    return (loss_sum / (n // bs)).item(), step


@torch.no_grad()
def val_loss(model, data, diffusion, args):
    """diffusion_loss on the val split (no augmentation), t and noise seeded by --seed: the same draws every epoch."""
    model.eval()
    g = torch.Generator(data.val_x.device).manual_seed(args.seed)
    pairs = zip(data.val_x.split(256), data.val_y.split(256))
    return (sum(diffusion_loss(model, x, y, diffusion, args, g) * len(x) for x, y in pairs) / len(data.val_x)).item()


# ---------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, images, diffusion, steps=50, generator=None, samples=1, amp=False, batch=None):
    """K = `samples` draws of the generated signal for each of N photos (N x 3 x S x S): returns their mean and
    per-pixel standard deviation (N x 3 x S x S each, the signal in [-1, 1]); all noise comes from `generator`, x_T as
    K tensors of the photos' shape one after the other: the same numbers as K calls with samples=1. The K draws of a
    photo go through the network together, `batch` maps per forward pass (by default 32 on a CPU, where small batches
    run fastest, 512 on CUDA). steps > 0: DDIM, eta 0, at t = round(T - i T / steps) - 1, i < steps, each going to
    t - T // steps (diffusers' DDIMScheduler: "trailing" spacing, clip_sample, set_alpha_to_one); steps = 0:
    ancestral DDPM over all T steps (DDPMScheduler, "fixed_small" variance). x_0 is clipped to [-1, 1] at every step."""
    model.eval()
    T, scale, alpha_bar, k = diffusion.T, diffusion.input_scale, diffusion.alpha_bar.tolist(), samples
    batch = batch or (512 if images.device.type == "cuda" else 32)
    ts = [round(T - i * T / steps) - 1 for i in range(steps)] if steps else range(T - 1, -1, -1)
    x = torch.stack([torch.randn(images.shape, generator=generator, device=images.device) for _ in range(k)],
                    1).flatten(0, 1)                                            # x_T ~ N(0, I), N*K maps
    photos = images.repeat_interleave(k, 0)                                     # each photo K times, in a row
    for i in common.progress(len(ts), "sample", len(images)):
        t = ts[i]
        prev = t - (T // steps if steps else 1)
        ab, ab_prev = alpha_bar[t], alpha_bar[prev] if prev >= 0 else 1.0
        out = torch.cat([run_model(model, p, xs, torch.full((len(xs),), t, device=xs.device), amp)
                         for p, xs in zip(photos.split(batch), x.split(batch))])
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
    draws = (x / scale).unflatten(0, (-1, k))                                   # N x K x 3 x S x S
    return draws.mean(1), draws.std(1, correction=0)


def predict(model, images, diffusion, args, steps, samples):
    """(maps, std): the mean of `samples` sampled maps per photo in [-1, 1], and the per-pixel standard deviation of
    the samples (the model's uncertainty, on the same scale), for N x 3 x S x S photos. The noise comes from a
    generator seeded by --seed: the same photos always get the same maps, and evaluating never touches the
    training RNG stream."""
    g = torch.Generator(images.device).manual_seed(args.seed)
    mean, std = sample(model, images, diffusion, steps, g, samples, args.amp)
    return from_target(mean, images, args.target), std * (2 if args.target == "sum" else 1)


def load_predictor(run_dir, device="cpu", sample_steps=None, samples=None, with_std=False):
    """(predict_fn, args) from a run folder's best.pt (EMA weights); predict_fn: N x 3 x S x S photos -> maps, both
    in [-1, 1] (with_std: (maps, per-pixel std of the samples)). The sampler settings default to the run's own
    (--sample-steps, --samples)."""
    ck = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=True)
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **ck["args"]})  # flags newer than the run
    model = UNet(args.c, args.norm, args.attn).to(device)
    model.load_state_dict(ck["model"])
    steps, k = args.sample_steps if sample_steps is None else sample_steps, samples or args.samples
    run = lambda images: predict(model, images.to(device), Diffusion(args), args, steps, k)  # noqa: E731
    return (run if with_std else lambda images: run(images)[0]), args


# ---------------------------------------------------------------------------------------------------- plumbing
# >>> shared: checkpoints
def channels_last(device):
    return device.type == "cuda" if CHANNELS_LAST is None else CHANNELS_LAST


def to_memory_format(x, device):
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device) else x


def make_optimizer(params, name, lr, betas, momentum, device):
    """The optimiser `name` (DEFAULT_LR's keys) with lr (None: its default); Adam fused on CUDA (device: a
    torch.device or its name)."""
    lr = lr if lr is not None else DEFAULT_LR[name]
    if name == "adam":  # fused: one kernel for the whole update on CUDA
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=torch.device(device).type == "cuda" or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return {"adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad}[name](params, lr=lr)


def save_atomic(obj, path):
    """Write to a temporary file and rename: a kill at any moment leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def start_or_resume(args, out, states):
    """A new run writes args.json and an empty metrics.jsonl. --resume loads last.pt into `states` (name -> object
    with load_state_dict), restores the RNG and keeps the metrics rows up to last.pt's epoch. Returns last.pt's
    contents, or the start of a new run: epoch 0, no best yet, no seconds."""
    ck, kept = {"epoch": 0, "best": {"val_l1": math.inf, "epoch": 0}, "seconds": 0.0}, []
    if args.resume:
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        for name, obj in states.items():
            obj.load_state_dict(ck[name])
        torch.set_rng_state(ck["rng"]["cpu"])
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= ck["epoch"]]  # not after it
        print(f"resume: {out} from epoch {ck['epoch']} (best val L1 {common.fmt(ck['best']['val_l1'])} at epoch "
              f"{ck['best']['epoch']})")
    (out / "metrics.jsonl").write_text("".join(kept))
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    return ck


def save_last(out, states, args, **info):
    """last.pt: every state dict in `states`, the RNG states, the args and `info` (epoch, best, seconds, ...)."""
    save_atomic({**{name: obj.state_dict() for name, obj in states.items()}, **info, "rng": rng_state(),
                 "args": vars(args)}, out / "last.pt")
# <<< shared: checkpoints


def main(argv=None):
    args = common.parse_args(build_parser, argv, RESUMABLE)
    policy = augment_policy(args.diffaug)
    x0_terms = set() if args.x0_loss == "none" else {t for _, t in common.parse_loss(args.x0_loss)}
    device, out, data = common.setup(args, __file__, [
        (args.size % 8 == 0, f"--size {args.size} must be a multiple of 8 (the UNet halves it three times)"),
        (policy is not None, f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
        (min(args.c, args.batch_size, args.epochs, args.T, args.samples, args.eval_every) >= 1,
         "--c, --batch-size, --epochs, --T, --samples and --eval-every must be at least 1"),
        (0 <= args.sample_steps <= args.T, f"--sample-steps must be between 0 (ancestral) and --T {args.T}"),
        (0 < args.beta_start <= args.beta_end < 1, "--beta-start and --beta-end need 0 < start <= end < 1"),
        (0 <= args.ema < 1 and args.input_scale > 0, "--ema must be in [0, 1) and --input-scale above 0"),
        (not x0_terms or args.objective != "eps", "--x0-loss needs --objective x0 or v (with eps the predicted "
         "clean map divides the network's error by sqrt(alpha_bar), near 0 at large t)"),
        (args.target == "label" or not {"cc", "kl"} & x0_terms,
         f"--x0-loss {args.x0_loss}: cc and kl compare maps, so they need --target label")])

    diffusion, unit = Diffusion(args), common.to_unit
    model = UNet(args.c, args.norm, args.attn).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    net, ema_net = (torch.compile(model), torch.compile(ema)) if args.compile else (model, ema)  # `model`, `ema` save
    opt = make_optimizer(model.parameters(), "adam", args.lr, args.betas, 0.0, device)
    states = {"model": model, "ema": ema, "optimizer": opt}  # what last.pt saves, by name
    ck = start_or_resume(args, out, states)
    start, step, best, seconds = ck["epoch"], ck.get("step", 0), ck["best"], ck["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    sampler = f"DDIM-{args.sample_steps}" if args.sample_steps else f"ancestral DDPM-{args.T}"
    base = common.baseline_metrics(unit(data.train_y), unit(data.val_y))
    print(f"exp3: diffusion UNet c={args.c} norm={args.norm} attn={args.attn}, {n_params / 1e6:.2f} M parameters, "
          f"objective {args.objective}" + (f" + {args.x0_loss} on x0" if x0_terms else "") + f", {args.schedule} "
          f"schedule T={args.T}, sampler {sampler} x{args.samples}, Adam lr {args.lr}, on "
          f"{common.device_name(device)}; run folder {out}")
    print("baselines (val): " + " | ".join(f"{k} L1 {m['l1']:.4f} CC {m['cc']:.3f}" for k, m in base.items()))

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            train_loss, step = train_epoch(net, ema, opt, data, diffusion, args, policy, step)
            if not math.isfinite(train_loss):
                status = "diverged"
                print(f"epoch {epoch}: the loss became {train_loss}; the run diverged")
                break
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss(net, data, diffusion, args),
                   "train_l1": None, **{"val_" + k: None for k in common.METRICS_ROW}}
            text = f"train loss {train_loss:.4f}  val loss {row['val_loss']:.4f}"
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # sample maps with the EMA weights
                t1 = time.perf_counter()
                pred = predict(ema_net, data.val_x, diffusion, args, args.sample_steps, args.samples)[0]
                ms, val = (time.perf_counter() - t1) * 1e3 / len(pred), common.map_metrics(unit(pred), unit(data.val_y))
                train = predict(ema_net, data.train_x[:TRAIN_EVAL], diffusion, args, args.sample_steps, args.samples)[0]
                row.update(train_l1=common.l1_metrics(unit(train), unit(data.train_y[:TRAIN_EVAL]))["l1"],
                           **{"val_" + k: val[k] for k in common.METRICS_ROW})
                text += "  " + common.metrics_text(val)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.val_x[:8], data.val_y[:8], pred[:8]],
                                 ["photo", "true map", f"mean of {args.samples}"])
                if val["l1"] < best["val_l1"]:
                    best = {"epoch": epoch, **{"val_" + k: v for k, v in val.items()}, "train_l1": row["train_l1"],
                            "sample_ms_per_map": ms}
                    save_atomic({"model": ema.state_dict(), "args": vars(args), "epoch": epoch, "metrics": best,
                                 "experiment": "exp3_diffusion"}, out / "best.pt")
            dt = time.perf_counter() - t0
            seconds += dt
            save_last(out, states, args, epoch=epoch, step=step, best=best, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds, best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  {text}  {tail}", flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    common.finish(out, args, build_parser, __file__, status, epoch, best, seconds, base, params=n_params,
                  train_l1=best.get("train_l1"), sample_ms_per_map=best.get("sample_ms_per_map"), sampler=sampler,
                  sample_steps=args.sample_steps, samples=args.samples)


if __name__ == "__main__":
    main()
