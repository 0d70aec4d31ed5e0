"""Experiment 3: a conditional denoising diffusion model that samples a photo's VMS map (Algorithm 3).

    python exp3_diffusion.py                                 # c 64, cosine schedule, T 1000, DDIM-50 sampling
    python exp3_diffusion.py --c 16 --epochs 30 --out runs/d  # a small configuration that trains on a CPU
    python exp3_diffusion.py --out runs/d --epochs 40 --resume  # continue (and extend) that run exactly

Palette/SR3 style: a UNet sees concat(photo, noisy map) and the step t (0 .. T-1, as in diffusers) and
predicts the noise, v or the clean map; sampling denoises pure noise into a map, K samples per photo averaged.
Reads top to bottom: settings, the schedules and q(x_t | x_0), the model, the training loop (Algorithm 3), the
samplers, then plumbing. It imports only common.py and pretrained.py from this project; blocks marked
"# >>> shared: NAME", and functions of the same name, are byte-identical in the experiment files having them.
"""
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import pretrained

RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
TRAIN_EVAL = 64  # train_l1: the sampled L1 of this many training photos (all of them cost four val passes)


# --------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = common.ArgumentParser("Experiment 3: conditional diffusion predicting VMS maps (Algorithm 3).")
    g = p.add_argument_group("data")
    common.add_data_flags(g)
    g.add_argument("--diffaug", default=None, help="DiffAugment policies (translation, cutout, flip) for "
                   "each photo and its map; 'none' disables; unset: translation,cutout (--encoder: flip)")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("model")
    g.add_argument("--c", type=int, default=64, help="base channels: the UNet's levels have (c, 2c, 4c, 8c)")
    g.add_argument("--norm", choices=common.NORM_NAMES, default="group", help="norm in the residual blocks")
    g.add_argument("--attn", action="store_true", help="self-attention in the blocks at size/4 and size/8")
    g = p.add_argument_group("pretrained encoder (optional extra: README); its features condition the UNet")
    common.add_encoder_flags(g)
    g = p.add_argument_group("diffusion")
    g.add_argument("--objective", choices=["eps", "v", "x0"], default="x0", help="what the network predicts: "
                   "the noise (the thesis), v = sqrt(ab) eps - sqrt(1-ab) x_0 (Salimans & Ho), the clean map")
    g.add_argument("--schedule", choices=["linear", "cosine", "sigmoid"], default="cosine", help="schedule")
    g.add_argument("--T", type=int, default=1000, help="diffusion steps")
    g.add_argument("--beta-start", type=float, default=1e-4, help="first beta of the linear schedule")
    g.add_argument("--beta-end", type=float, default=0.02, help="last beta of the linear schedule")
    g.add_argument("--input-scale", type=float, default=1.0, help="scales the clean map before noising (Chen "
                   "2023; DDP uses 0.1 for dense prediction): below 1 the noise hides the map sooner")
    g.add_argument("--x0-loss", type=common.optional_loss, default="none", help="a map loss (--loss syntax, "
                   "e.g. 0.5l1+0.5cc) on the predicted clean map, added to the diffusion loss; x0 or v only")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate; unset: 0.001")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="Adam betas")
    g.add_argument("--ema", type=float, default=0.999, help="decay of the moving average that samples")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (eta 0); 0: ancestral, T steps")
    g.add_argument("--samples", type=int, default=1, help="K: sampled maps averaged per photo (what L1 and "
                   "CC score), the K samples of a photo in one batch")
    g.add_argument("--eval-every", type=int, default=5, help="sample the selection and val splits (and "
                   "choose best.pt) every N epochs, and at the last")
    g = p.add_argument_group("run")
    common.add_run_flags(g, __file__, RESUMABLE)
    return p


def checks(args, policy):
    """(ok, message) for each rule the settings must follow; common.refuse stops at the first broken one."""
    x0_terms = set() if args.x0_loss == "none" else {t for _, t in common.parse_loss(args.x0_loss)}
    return [(args.size % 8 == 0, f"--size {args.size} must be a multiple of 8 (the UNet halves it 3 times)"),
            *common.checks(args, policy),
            (args.freeze == 5, "--freeze: exp3's encoder stays frozen (its features are cached)"),
            common.positive(args, "c", "batch_size", "epochs", "T", "samples", "eval_every"),
            (0 <= args.sample_steps <= args.T, f"--sample-steps must be from 0 (ancestral) to --T {args.T}"),
            (0 < args.beta_start <= args.beta_end < 1, "--beta-start, --beta-end need 0 < start <= end < 1"),
            (0 <= args.ema < 1 and args.input_scale > 0, "--ema must be in [0, 1) and --input-scale above 0"),
            (not x0_terms or args.objective != "eps", "--x0-loss needs --objective x0 or v (with eps the "
             "predicted clean map divides the network's error by sqrt(alpha_bar), near 0 at large t)"),
            (args.target == "label" or not {"cc", "kl"} & x0_terms,
             f"--x0-loss {args.x0_loss}: cc and kl compare maps, so they need --target label")]


# -------------------------------------------------------------------------------------------------- diffusion
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
    """q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I), ab = alpha_bar[t] (a float or N x 1 x 1 x 1), and the
    conversions between the network's output (its objective) and (x_0, eps); x_0 is input_scale times the map.
    """

    def __init__(self, schedule="cosine", T=1000, beta_start=1e-4, beta_end=0.02, objective="x0",
                 input_scale=1.0):
        self.alpha_bar = torch.cumprod(1 - beta_schedule(schedule, T, beta_start, beta_end), 0)
        self.T, self.objective, self.input_scale = T, objective, input_scale

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


def diffusion_of(args):
    """The Diffusion of a run's settings."""
    return Diffusion(args.schedule, args.T, args.beta_start, args.beta_end, args.objective, args.input_scale)


# -------------------------------------------------------------------------------------------------- the model
# >>> shared: norms
def group_count(ch):
    """GroupNorm groups: the most groups (at most 32) that leave at least two channels in each."""
    return max([g for g in range(1, 33) if ch % g == 0 and ch // g >= 2] or [1])


NORMS = {
    "batch": lambda ch: nn.BatchNorm2d(ch),
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True),
    "layer": lambda ch: common.GroupNorm(1, ch),  # normalises over channels and pixels of each image
    "group": lambda ch: common.GroupNorm(group_count(ch), ch),  # (in float32 under --amp: faster on a CPU)
    "none": lambda ch: nn.Identity(),
}
# <<< shared: norms


def timestep_embedding(t, dim):
    """Sinusoidal embedding of the steps t (Vaswani et al. 2017, as in DDPM): N integers -> N x dim."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    """(N x cin x H x W, N x E step embedding) -> N x cout x H x W: norm, SiLU, 3x3 conv, plus the projected
    step embedding, norm, SiLU, 3x3 conv, plus the input (1x1 conv when channels change); then, with attn,
    single-head self-attention over the pixels (pre-norm, residual)."""

    def __init__(self, cin, cout, emb, norm, attn=False):
        super().__init__()
        self.norm1, self.conv1 = NORMS[norm](cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
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
    """(N x 6 x S x S concat(photo, x_t), N steps t[, encoder features per level]) -> N x 3 x S x S prediction
    of eps, v or x_0. Levels of (c, 2c, 4c, 8c) channels at S .. S/8 (average pooling), a middle block, a
    decoder that upsamples and concatenates the encoder's features; the step embedding enters every block.
    encoder: a frozen EfficientNet-Lite (pretrained.py) sees the photo at photo_size; its level at each
    resolution, through a 1x1 convolution, is added to that level's input."""

    def __init__(self, c=64, norm="group", attn=False, encoder="scratch", size=64, photo_size=64):
        super().__init__()
        ch, e = [c, 2 * c, 4 * c, 8 * c], 4 * c
        self.embed = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.stem = nn.Conv2d(6, c, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(([c] + ch)[i], ch[i], e, norm, attn and i >= 2) for i in range(4))
        self.mid = ResBlock(ch[3], ch[3], e, norm, attn)
        self.up = nn.ModuleList(ResBlock(ch[i + 1] + ch[i], ch[i], e, norm, attn and i >= 2)
                                for i in range(3))
        self.head = nn.Sequential(NORMS[norm](c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.size, self.cached = size, None
        if encoder != "scratch":  # encoder level k is photo_size / 2^(k+1) wide; UNet level i is S / 2^i
            self.encoder, self.with_photo = pretrained.load_encoder(encoder), True
            self.levels = [min(4, max(0, i + round(math.log2(photo_size / size)) - 1)) for i in range(4)]
            self.cached = sorted(set(self.levels))
            self.cond = nn.ModuleList(nn.Conv2d(self.encoder.level_channels[k], ([c] + ch)[i], 1)
                                      for i, k in enumerate(self.levels))

    def condition(self, photos):
        """(photo at S, its encoder features per UNet level or None) for photos: N x 3 x S x S, or with an
        encoder N x 3 x P x P or their cached Features (the photo at S first)."""
        if self.cached is None:
            return photos, None
        if isinstance(photos, pretrained.Features):
            photo, *feats = photos.levels()
        else:
            with torch.no_grad():  # a few photos per pass on a CPU
                n = common.forward_batch(photos, photos.device)
                each = [self.encoder.levels(x) for x in photos.split(n)]
                feats = [torch.cat([levels[k] for levels in each]) for k in self.cached]
            photo = F.interpolate(photos, size=(self.size,) * 2, mode="bicubic", antialias=True).clamp(-1, 1)
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


# --------------------------------------------------------------------------------------------------- training


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


def train_epoch(model, ema, opt, photos, maps, diffusion, args, policy, step):
    """Algorithm 3, one pass over the shuffled training split (photos, or their cached features, and maps).
    Returns (mean loss, optimiser steps so far)."""
    model.train()
    n, bs = len(maps), min(args.batch_size, len(maps))
    order, loss_sum = torch.randperm(n).to(maps.device), 0.0
    for i in common.progress(n // bs, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = common.augment(photos[idx], maps[idx], policy, args.diffaug_p)     # photos and true maps
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
    """K = `samples` draws of the map for each of N photos (what model.condition takes): their mean and
    per-pixel standard deviation (N x 3 x S x S each, in [-1, 1]). All noise comes from `generator`, x_T as K
    tensors of the maps' shape one after another (the same numbers as K calls with samples=1); the K draws of
    a photo go through the network together, `batch` maps per pass. steps > 0: DDIM, eta 0, from t = round(T -
    i T / steps) - 1 to t - T // steps (diffusers' "trailing" DDIMScheduler); steps = 0: ancestral DDPM over
    all T steps ("fixed_small" variance). x_0 is clipped to the map's range at every step."""
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
    """(maps, std): the mean of `samples` sampled maps per photo in [-1, 1] and the per-pixel standard
    deviation of the samples (the model's uncertainty, on the same scale), for N photos (or their cached
    features). The noise comes from a generator seeded by --seed: the same photos always get the same maps,
    and evaluating never touches the training RNG stream."""
    g = torch.Generator(photos.device).manual_seed(args.seed)
    mean, std = sample(model, photos, diffusion, steps, g, samples, args.amp)
    return common.from_target(mean, photos, args.target), std * (2 if args.target == "sum" else 1)


# --------------------------------------------------------------------------------------------------- plumbing
def load_predictor(run_dir, device="cpu", sample_steps=None, samples=None, with_std=False):
    """(predict_fn, args) from a run folder's best.pt (EMA weights); predict_fn: N photos (or their cached
    features) -> maps in [-1, 1] (with_std: and the per-pixel std of the samples). The sampler's settings
    default to the run's own; predict_fn.model is the network."""
    ck = common.load_checkpoint(Path(run_dir) / "best.pt")
    args = common.saved_settings(build_parser, ck["args"])
    model = UNet(args.c, args.norm, args.attn, args.encoder, args.size, args.photo_size)
    model = common.load_own_state(model, ck["model"]).to(device, memory_format=torch.channels_last)
    steps, k = args.sample_steps if sample_steps is None else sample_steps, samples or args.samples
    run = lambda photos: predict(model, photos.to(device), diffusion_of(args), args, steps, k)  # noqa: E731
    fn = run if with_std else lambda photos: run(photos)[0]
    fn.model = model
    return fn, args


def main(argv=None):
    args = common.parse_args(build_parser, argv, RESUMABLE)   # every setting resolved (--resume: the run's)
    policy = common.augment_policy(args.diffaug)
    common.refuse(checks(args, policy))
    device = common.device_for(args)
    data = common.run_data(args, device)                       # the fit, selection and val splits
    out = common.run_folder(args, __file__)
    torch.manual_seed(args.seed)

    diffusion, unit = diffusion_of(args), common.to_unit
    model = common.build(UNet, dict(c=args.c, norm=args.norm, attn=args.attn, encoder=args.encoder,
                                    size=args.size, photo_size=args.photo_size), data.train_y)
    model = model.to(device, memory_format=torch.channels_last)
    photos = pretrained.split_inputs(model, data, args, device)   # photos, or their cached encoder features
    ema = copy.deepcopy(model).requires_grad_(False)
    net, ema_net = (torch.compile(model), torch.compile(ema)) if args.compile else (model, ema)  # model saves
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                           betas=tuple(args.betas), fused=device.type == "cuda" or None)  # fused: one kernel
    states = {"model": model, "ema": ema, "optimizer": opt}  # what last.pt saves, by name
    ck = common.start_or_resume(args, out, states)
    start, step, best, last, seconds = ck["epoch"], ck.get("step", 0), ck["best"], ck["last"], ck["seconds"]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sampler = f"DDIM-{args.sample_steps}" if args.sample_steps else f"ancestral DDPM-{args.T}"
    print(f"exp3: diffusion UNet c={args.c} ({args.encoder}), {n_params / 1e6:.2f} M trained parameters, "
          f"{args.objective} + {args.x0_loss} on x0, {args.schedule} T={args.T}, {sampler} x{args.samples}, "
          f"Adam lr {args.lr:g}, on {common.device_name(device)}; run folder {out}")
    base = common.baselines(data)                              # the constant maps, printed
    sampled = lambda x: predict(ema_net, x, diffusion, args, args.sample_steps, args.samples)[0]  # noqa: E731
    score = lambda x, y: common.map_metrics(unit(sampled(x)), unit(y))  # noqa: E731

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            train_loss, step = train_epoch(net, ema, opt, photos["train"], data.train_y, diffusion, args,
                                           policy, step)
            if not math.isfinite(train_loss):
                status = "diverged"
                print(f"epoch {epoch}: the loss became {train_loss}; the run diverged")
                break
            row = {"epoch": epoch, "train_loss": train_loss,
                   "val_loss": val_loss(net, photos["val"], data.val_y, diffusion, args)}
            text = f"train loss {train_loss:.4f}  val loss {row['val_loss']:.4f}"
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # sample (EMA weights); choose, report
                t1 = time.perf_counter()
                pred = sampled(photos["val"])
                ms, val = (time.perf_counter() - t1) * 1e3 / len(pred), common.map_metrics(unit(pred),
                                                                                           unit(data.val_y))
                sel = score(photos["sel"], data.sel_y) if args.selection else val
                train = score(photos["train"][:TRAIN_EVAL], data.train_y[:TRAIN_EVAL])["l1"]
                row.update(train_l1=train, sel_l1=sel["l1"], sel_cc=sel["cc"], **common.prefixed("val_", val))
                text, last = text + "  " + common.metrics_text(val), row
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png",
                                 [data.val_x[:8], data.val_y[:8], pred[:8]], ["photo", "true map",
                                                                              f"mean of {args.samples}"])
                if sel["l1"] < best["sel_l1"]:
                    best = {"epoch": epoch, **common.prefixed("sel_", sel), "train_l1": train,
                            **common.prefixed("val_", val, val), "sample_ms_per_map": ms}
                    common.save_atomic({"model": common.own_state(ema), "args": vars(args), "epoch": epoch,
                                        "metrics": best, "experiment": "exp3_diffusion"}, out / "best.pt")
            dt = time.perf_counter() - t0
            seconds += dt
            common.save_last(out, states, args, epoch=epoch, step=step, best=best, last=last, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds,
                                    best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  {text}  {tail}", flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    common.finish(out, args, build_parser, __file__, status=status, epoch=epoch, best=best, last=last,
                  seconds=seconds, baselines=base, params=n_params, train_l1=best.get("train_l1"),
                  sample_ms_per_map=best.get("sample_ms_per_map"), sampler=sampler,
                  sample_steps=args.sample_steps, samples=args.samples)


if __name__ == "__main__":
    main()
