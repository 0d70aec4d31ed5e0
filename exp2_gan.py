"""Experiment 2: a pix2pix-style conditional GAN that turns a photo into its VMS map (Algorithm 2).

    python exp2_gan.py --g-opt sgd --c 32                        # SGD for the generator, a narrower UNet
    python exp2_gan.py --c 16 --d-c 16 --epochs 20 --out runs/g  # a small configuration that trains on a CPU
    python exp2_gan.py --out runs/g --epochs 30 --resume         # continue (and extend) that run exactly

The generator is exp1's UNet; a discriminator learns to tell true (photo, map) pairs from generated ones, the
generator to fool it while staying close to the true map under the pixel loss (L1).
Top to bottom: settings, DiffAugment, the model, the training loop (Algorithm 2), checkpoints, main. It imports
common.py (data, metrics, plumbing), and pretrained.py only for --encoder. Blocks between "# >>> shared: NAME" and
"# <<< shared: NAME" are byte-identical in every experiment file that has them (test_all.py checks it).
"""
import argparse
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
GP_WEIGHT = 10.0  # the gradient penalty's weight in WGAN-GP (Gulrajani et al. 2017)


# ---------------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 2: a pix2pix-style conditional GAN predicts VMS maps "
                                "(Algorithm 2).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data, g, encoder, d, loss, opt, run = (p.add_argument_group(title) for title in (
        "data", "generator (exp1's UNet)", "pretrained encoder (an optional extra: README)", "discriminator", "loss",
        "optimisation", "run"))
    common.shared_flags(data, encoder, run, __file__, RESUMABLE)
    data.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies (translation, cutout, "
                      "flip) on what the discriminator sees, alike for photo and map; 'none' disables")
    g.add_argument("--g-norm", dest="norm", choices=list(NORMS), default="batch", help="norm after each convolution")
    # >>> shared: UNet flags
    g.add_argument("--c", type=common.positive, default=64, help="base channels: the levels have (c, 2c, 4c, ...)")
    g.add_argument("--depth", type=common.positive, default=5, help="levels of the UNet (each halves the resolution)")
    g.add_argument("--convs", type=int, choices=[1, 2], default=2, help="3x3 convolutions per block: 2, the thesis' "
                   "UNet; 1: faster, less accurate (docs/results.md)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the decoder blocks")
    g.add_argument("--no-skip", action="store_true", help="drop the skip connections (the thesis' planned ablation; "
                   "with --encoder: read only the deepest level)")
    g.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: each map is the mean of those of "
                   "the photo and its mirror image (evaluations, best.pt's choice, evaluate.py)")
    # <<< shared: UNet flags
    d.add_argument("--disc", choices=["patch", "global"], default="patch", help="patch: PatchGAN, a score per patch "
                   "(size/16 x size/16 of them at --d-depth 5); global: one score per image")
    d.add_argument("--d-c", type=common.positive, default=64, help="base channels: the layers have (c, 2c, 4c, ...)")
    d.add_argument("--d-depth", type=common.positive, default=5, help="convolutions; all but the last halve the size")
    d.add_argument("--d-norm", choices=list(NORMS), default="batch", help="norm after each convolution but the first")
    loss.add_argument("--gan-loss", choices=["lsgan", "vanilla", "wgan-gp"], default="lsgan", help="lsgan: squared "
                      "error to 1 (real) or 0 (fake), the thesis; vanilla: BCE with logits; wgan-gp: Wasserstein "
                      f"critic + gradient penalty (weight {GP_WEIGHT:g}; not with --d-norm batch)")
    loss.add_argument("--l1-weight", type=float, default=100.0, help="generator loss = adversarial + l1_weight x the "
                      "pixel loss; 100: pix2pix and the study's code (CC); 1: the equation as written; 0: none (FID)")
    loss.add_argument("--loss", type=common.loss_spec, default="l1", help="the pixel loss: terms joined by +, each "
                      "with an optional weight: l1, l2, cc (1 - Pearson per channel), kl, e.g. l1+0.5cc")
    for net, name in (("g", "generator"), ("d", "discriminator")):
        opt.add_argument(f"--{net}-opt", choices=list(common.DEFAULT_LR), default="adam", help=f"{name}'s optimiser")
        opt.add_argument(f"--{net}-lr", type=float, default=None, help=f"the {name}'s learning rate; unset: adam "
                         "0.001, sgd 0.01, adadelta 1.0, adagrad 0.01")
        opt.add_argument(f"--{net}-betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                         help=f"the {name}'s Adam betas")
    opt.add_argument("--lr-decay", choices=["none", "cosine"], default="none", help="cosine: the learning rates fall "
                     "towards 0 along a half cosine over the epochs")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    opt.add_argument("--batch-size", type=common.positive, default=16, help="images per step")
    opt.add_argument("--epochs", type=common.positive, default=100, help="passes over the training split")
    run.add_argument("--eval-every", type=common.positive, default=1, help="evaluate the selection and val splits "
                     "(and choose best.pt) every N epochs, and at the last")
    run.add_argument("--sample-every", type=common.positive, default=10, help="a sample grid every N epochs, and last")
    return p


def checks(args):
    """(ok, message) for each rule of this experiment's settings (common.settings adds the shared ones)."""
    depth = max(args.depth, args.d_depth)
    return [(set(policy(args)) <= set(AUGMENTS), f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
            (args.size % 2 ** (depth - 1) == 0 and args.size >= 2 ** args.d_depth, f"--size {args.size} must be a "
             f"multiple of {2 ** (args.depth - 1)} for --depth {args.depth}, and of {2 ** (args.d_depth - 1)} and at "
             f"least {2 ** args.d_depth} for --d-depth {args.d_depth}"),
            (args.gan_loss != "wgan-gp" or args.d_norm != "batch", "--gan-loss wgan-gp needs another --d-norm than "
             "batch (layer, instance, group or none): batch norm breaks the per-sample gradient penalty"),
            (args.target == "label" or not {"cc", "kl"} & {t for _, t in common.parse_loss(args.loss)},
             f"--loss {args.loss}: cc and kl compare maps, so they need --target label")]


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


# >>> shared: UNet
class Block(nn.Sequential):
    """convs (1 or 2) 3x3 convolutions, each followed by norm and ReLU: N x cin x H x W -> N x cout x H x W."""

    def __init__(self, cin, cout, norm, dropout=0.0, convs=2):
        layers = []
        for i in range(convs):  # dropout, if any, between the two; a norm's shift makes the conv's bias redundant
            layers += [nn.Dropout2d(dropout)] if i and dropout > 0 else []
            layers += [nn.Conv2d(cout if i else cin, cout, 3, padding=1, bias=norm == "none"), NORMS[norm](cout),
                       nn.ReLU(inplace=True)]
        super().__init__(*layers)


class UNet(nn.Module):
    """N x 3 x S x S photo in [-1, 1] -> N x 3 x S x S map in [-1, 1] (tanh).

    Encoder: `depth` levels of (c, 2c, 4c, ...) channels, max pooling between them (S divisible by 2^(depth-1));
    decoder: the mirror image, each level upsampling (2x2 transposed convolution) and, unless skip is False,
    concatenating the encoder's features of its resolution (the skip connection)."""

    def __init__(self, c=64, depth=5, norm="batch", dropout=0.0, skip=True, convs=2):
        super().__init__()
        ch = [c * 2 ** i for i in range(depth)]
        self.skip, self.cached = skip, None
        self.down = nn.ModuleList(Block(cin, cout, norm, convs=convs) for cin, cout in zip([3] + ch, ch))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(Block(ch[i] * (1 + skip), ch[i], norm, dropout, convs) for i in range(depth - 1))
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1) if self.skip else self.up[i](x))
        return torch.tanh(self.head(x))


class Decoder(nn.Module):
    """Cached features of a pretrained encoder's levels (pretrained.Features) -> N x 3 x S x S map in [-1, 1] (tanh).

    From the deepest of the levels at most S wide (`read`; at photo size 4 S: strides 4 to 32): upsample (bilinear) to
    the next level's side, concatenate that level (skip False: not), a Block of widths[i] channels; upsample to S, a
    1x1 head starting at the training maps' mean. Levels of over 512 channels (the Inception's) go through 1x1
    convolutions to 256 (the deepest), 128, ... first. `cached`: the levels it takes."""

    def __init__(self, encoder, size, norm, maps, dropout=0.0, skip=True, convs=2, widths=(96, 64, 32, 16)):
        super().__init__()
        ch, self.sides, self.size, self.skip = encoder.channels, encoder.sides, size, skip  # (the network loads)
        self.read = [k for k in range(len(ch)) if self.sides[k] <= size]
        self.cached, self.reduce = self.read if skip else self.read[-1:], None
        if max(ch) > 512:
            wide = {k: 256 // 2 ** i for i, k in enumerate(reversed(self.read))}
            self.reduce = nn.ModuleDict({str(k): nn.Conv2d(ch[k], wide[k], 1) for k in self.cached})
            ch = [wide.get(k, c) for k, c in enumerate(ch)]
        cin, blocks = ch[self.read[-1]], []
        for k, width in zip(reversed(self.read[:-1]), widths):
            blocks.append(Block(cin + ch[k] * skip, width, norm, dropout, convs))
            cin = width
        self.dec, self.head = nn.ModuleList(blocks), nn.Conv2d(cin, 3, 1)
        with torch.no_grad():
            self.head.bias.copy_(maps.float().mean((0, 2, 3)).clamp(-0.99, 0.99).atanh())

    def forward(self, x):
        feats = dict(zip(self.cached, x.levels()))
        if self.reduce is not None:
            feats = {k: self.reduce[str(k)](f) for k, f in feats.items()}
        y = feats[self.read[-1]]
        for k, block in zip(reversed(self.read[:-1]), self.dec):
            y = F.interpolate(y, size=(self.sides[k],) * 2, mode="bilinear", align_corners=False)
            y = block(torch.cat([y, feats[k]], 1) if self.skip else y)
        if y.shape[-1] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.tanh(self.head(y))


def make_unet(args, encoder, maps):
    """The thesis' UNet for the settings `args`, or a Decoder on `encoder` whose head starts at the maps' mean."""
    if encoder is None:
        return UNet(args.c, args.depth, args.norm, args.dropout, not args.no_skip, args.convs)
    return Decoder(encoder, args.size, args.norm, maps, args.dropout, not args.no_skip, args.convs)
# <<< shared: UNet


class Discriminator(nn.Sequential):
    """Judges (photo, map) pairs: N x 6 x S x S (photo and map stacked, in [-1, 1]) -> raw scores, no sigmoid.

    Trunk: `depth` convolutions of (c, 2c, 4c, ...) channels, each followed by norm (but the first) and LeakyReLU
    0.2; all but the last are 4x4 with stride 2, the last 3x3 with stride 1, so it ends at S / 2^(depth-1) pixels.
    Head, kind "patch" (PatchGAN): a 3x3 convolution to N x 1 x S/16 x S/16 (depth 5), a score per overlapping
    patch; kind "global": a convolution over the whole trunk output, one score per image."""

    def __init__(self, c=64, depth=5, norm="batch", kind="patch", size=64):
        ch, layers = [c * 2 ** i for i in range(depth)], []
        for i, (cin, cout) in enumerate(zip([6] + ch, ch)):
            last, nrm = i == depth - 1, norm if i > 0 else "none"  # no norm on the first layer
            layers += [nn.Conv2d(cin, cout, 3 if last else 4, 1 if last else 2, padding=1, bias=nrm == "none"),
                       NORMS[nrm](cout), nn.LeakyReLU(0.2)]
        whole = size // 2 ** (depth - 1)                        # the trunk's output size
        super().__init__(*layers, nn.Conv2d(ch[-1], 1, 3, padding=1) if kind == "patch" else nn.Conv2d(ch[-1], 1,
                                                                                                            whole))


# -------------------------------------------------------------------------------------------------------- the losses
def gan_loss(kind, scores, real):
    """The adversarial loss of raw scores (any shape) against the label real (True) or fake (False), as a mean.
    lsgan (Mao et al. 2017): squared error to 1 or 0. vanilla (Goodfellow et al. 2014): binary cross-entropy of
    sigmoid(scores) with 1 or 0. wgan-gp (Gulrajani et al. 2017): -score for real, +score for fake, so that the
    critic's loss (real + fake) estimates minus the Wasserstein distance. The generator uses real=True."""
    scores = scores.float()
    if kind == "wgan-gp":
        return -scores.mean() if real else scores.mean()
    loss = F.mse_loss if kind == "lsgan" else F.binary_cross_entropy_with_logits
    return loss(scores, torch.full_like(scores, float(real)))


def gradient_penalty(critic, real, fake):
    """WGAN-GP's penalty: mean over samples of (|d critic(z) / dz| - 1)^2 at a random point z on the line between
    each real and fake input (N x ... each); a sample's gradient is that of the sum of its scores."""
    eps = torch.rand(len(real), *[1] * (real.dim() - 1), device=real.device)
    z = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(z).float().sum(), z, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


# >>> shared: encoder
def encoder_of(args):
    """pretrained.Encoder of --encoder, or None for scratch: pretrained.py is imported only for an encoder."""
    if args.encoder == "scratch":
        return None
    import pretrained
    return pretrained.Encoder(args.encoder, args.photo_size)
# <<< shared: encoder


# ------------------------------------------------------------------------------------------ training (Algorithm 2)
def train_epoch(G, D, opt_g, opt_d, x, photos, maps, args):
    """Algorithm 2, one pass over the shuffled training split: x the generator's inputs (photos, or their cached
    features), photos and maps what the discriminator sees. Returns the epoch's means: the generator's adversarial
    and pixel loss (--loss, in the models' range), the discriminator's loss on real and on fake pairs, and the L1 of
    the recovered map on [0, 1]."""
    G.train(), D.train()
    n, bs = len(maps), min(args.batch_size, len(maps))
    order, sums, steps = torch.randperm(n).to(maps.device), torch.zeros(5, device=maps.device), n // bs
    amp = lambda: torch.autocast(args.device, torch.bfloat16, enabled=args.amp)  # noqa: E731
    pair = lambda image, vms: torch.cat(augment(image, vms, policy(args), args.diffaug_p), 1)  # noqa: E731
    for i in common.progress(steps, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = photos[idx], maps[idx]                     # a batch of photos x and their true maps y
        target = common.to_target(image, vms, args.target)
        # generator step: D should judge (x, G(x)) real, G(x) be close to y: adversarial + l1_weight * L1
        D.requires_grad_(False)                                 # D only passes gradients on to G in this step
        with amp():
            fake = G(x[idx]).float()                            # G(x)
            g_adv = gan_loss(args.gan_loss, D(pair(image, fake)), real=True)
        g_pix = common.map_loss(args.loss, fake, target)        # L1 (or --loss) to the target
        opt_g.zero_grad(set_to_none=True)
        (g_adv + args.l1_weight * g_pix).backward()
        opt_g.step()
        # discriminator step: (x, y) is real, (x, G(x)) with G held fixed is fake; the loss is halved
        D.requires_grad_(True)
        real_pair, fake_pair = pair(image, target), pair(image, fake.detach())
        with amp():
            d_real = gan_loss(args.gan_loss, D(real_pair), real=True)
            d_fake = gan_loss(args.gan_loss, D(fake_pair), real=False)
            penalty = GP_WEIGHT * gradient_penalty(D, real_pair, fake_pair) if args.gan_loss == "wgan-gp" else 0
        d_loss = (d_real + d_fake + penalty) / 2               # for wgan-gp: half of WGAN-GP's critic loss
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        train_l1 = (common.from_target(fake.detach(), image, args.target) - vms).abs().mean() / 2  # on [0, 1]
        sums += torch.stack([g_adv, g_pix, d_real, d_fake, train_l1]).detach()
    return dict(zip(["g_adv", "g_pix", "d_real", "d_fake", "train_l1"], (sums / steps).tolist()))


# >>> shared: predict
@torch.no_grad()
def predict(model, x, args, tta=None):
    """Maps in [-1, 1] of N photos (or their features) in eval mode, a few per pass on a CPU; tta (unset: --tta) "flip":
    the mean of the maps of each photo and of its mirror image, mirrored back."""
    model.eval()
    outs, tta = [], args.tta if tta is None else tta
    for part in x.split(256 if args.device == "cuda" else max(1, 16 * 64 * 64 // max(64, args.size) ** 2)):
        with torch.autocast(args.device, torch.bfloat16, enabled=args.amp):
            out = model(part).float()
            if tta == "flip":
                out = (out + model(part.flip(3)).float().flip(3)) / 2
        outs.append(common.from_target(out, part, args.target))
    return torch.cat(outs)


def scores(model, x, maps, args):
    """common.map_metrics of the maps predicted for photos (or features) x against their true maps (in [-1, 1])."""
    return common.map_metrics(common.to_unit(predict(model, x, args)), common.to_unit(maps))


def make_optimizer(params, name, lr, betas, momentum, device):
    """The optimiser `name` (common.DEFAULT_LR's keys) with learning rate lr; Adam fused (one kernel) on CUDA."""
    options = {"adam": dict(betas=tuple(betas), fused=device == "cuda" or None), "sgd": dict(momentum=momentum)}
    optimiser = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adadelta": torch.optim.Adadelta}.get(name)
    return (optimiser or torch.optim.Adagrad)(params, lr=lr, **options.get(name, {}))
# <<< shared: predict


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
    encoder = encoder_of(args)                                    # None: the UNet sees the photos themselves
    model = make_unet(args, encoder, data.y["train"]).to(args.device, memory_format=torch.channels_last)
    D = Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, args.size)
    D = D.to(args.device, memory_format=torch.channels_last)
    x = encoder.features(data, model.cached, args.device) if encoder else data.x  # photos, or cached features
    net = torch.compile(model) if args.compile else model  # trains and predicts; `model` holds the weights
    d_net = torch.compile(D) if args.compile and args.gan_loss != "wgan-gp" else D
    trained = [p for p in model.parameters() if p.requires_grad]
    opt_g = make_optimizer(trained, args.g_opt, args.g_lr, args.g_betas, args.momentum, args.device)
    opt_d = make_optimizer(D.parameters(), args.d_opt, args.d_lr, args.d_betas, args.momentum, args.device)
    states = {"generator": model, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}  # what last.pt saves, by name
    first, best, last, seconds = map(start(args, out, data, states).get, ("epoch", "best", "last", "seconds"))
    n_params, d_params = sum(p.numel() for p in trained), sum(p.numel() for p in D.parameters())
    print(f"exp2: {args.encoder} {type(model).__name__} ({n_params / 1e6:.2f} M trained parameters, {args.g_opt}) vs "
          f"{args.disc} discriminator c={args.d_c} ({d_params / 1e6:.2f} M, {args.d_opt}); {args.gan_loss} + "
          f"{args.l1_weight:g} x {args.loss}; run folder {out}")

    status, epoch = "ok", first
    try:
        for epoch in range(first + 1, args.epochs + 1):
            t0 = time.perf_counter()
            common.set_lr(opt_g, args.g_lr, args.lr_decay, epoch, args.epochs)
            common.set_lr(opt_d, args.d_lr, args.lr_decay, epoch, args.epochs)
            losses = train_epoch(net, d_net, opt_g, opt_d, x["train"], data.x["train"], data.y["train"], args)
            if not all(map(math.isfinite, losses.values())):
                status = "diverged"
                print(f"epoch {epoch}: a loss became non-finite ({losses}); the run diverged")
                break
            row, text = {"epoch": epoch, **losses}, ""
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # choose on the selection split, report val
                val = scores(net, x["val"], data.y["val"], args)
                sel = scores(net, x["sel"], data.y["sel"], args) if args.selection else val
                row.update(sel_l1=sel["l1"], sel_cc=sel["cc"], **{"val_" + k: val[k] for k in common.METRICS_ROW})
                text, last = common.metrics_text(val), row
                if sel["l1"] < best["sel_l1"]:
                    best = {"epoch": epoch, **{"sel_" + k: sel[k] for k in common.METRICS_ROW},
                            **{"val_" + k: v for k, v in val.items()}}
                    save_atomic({"model": model.state_dict(), "args": {**vars(args), "data": data.source},
                                 "epoch": epoch, "metrics": best, "experiment": Path(__file__).stem}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.x["val"][:8], data.y["val"][:8],
                                 predict(net, x["val"][:8], args)], ["photo", "true map", "predicted"])
            dt = time.perf_counter() - t0
            seconds += dt
            save_last(out, states, epoch=epoch, best=best, last=last, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds, best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()) +
                  f"  {text}  {tail}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python {Path(__file__).name} --out {out} --resume")
        raise SystemExit(130) from None

    if best["epoch"]:  # the chosen weights' L1 on (the first 256 of) the photos they were fitted to
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    train_l1 = scores(net, x["train"][:256], data.y["train"][:256], args)["l1"] if best["epoch"] else None
    common.finish(out, args, build_parser, __file__, data, status=status, epoch=epoch, best=best, last=last,
                  seconds=seconds, baselines=base, params=n_params, d_params=d_params, train_l1=train_l1)


if __name__ == "__main__":
    main()
