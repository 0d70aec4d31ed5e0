"""Experiment 2: a pix2pix-style conditional GAN that turns a photo into its VMS map (the thesis' Algorithm 2).

    python exp2_gan.py --g-opt sgd --c 32                        # SGD for the generator, a narrower UNet
    python exp2_gan.py --c 16 --d-c 16 --epochs 20 --out runs/g  # a small configuration that trains on a CPU
    python exp2_gan.py --out runs/g --epochs 30 --resume         # continue (and extend) that run exactly

The generator is exp1's UNet; a discriminator learns to tell true (photo, map) pairs from generated ones, and the
generator to fool it while staying close to the true map under L1. Reads top to bottom: settings, networks, losses,
DiffAugment, the training loop (Algorithm 2), plumbing. It imports only common.py from this project; blocks marked
"# >>> shared: NAME", and functions of the same name, are byte-identical in the experiment files that have them.
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

# >>> shared: constants
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "adadelta": 1.0, "adagrad": 1e-2}
RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
CHANNELS_LAST = None  # channels_last memory format: None = on CUDA only; bench.py sets True/False to measure it
# <<< shared: constants
GP_WEIGHT = 10.0  # the gradient penalty's weight in WGAN-GP (Gulrajani et al. 2017)


# ---------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 2: pix2pix-style conditional GAN predicting VMS maps "
                                "(Algorithm 2).", formatter_class=common.HelpFormatter)
    g = p.add_argument_group("data")
    # >>> shared: data flags
    g.add_argument("--data", default=None, help="VISCHEMA PLUS folder, or 'synthetic' for the built-in set; unset: "
                   "$VISCHEMA_DIR, else ./data/VISCHEMA_PLUS, else the synthetic set (announced on the first line)")
    g.add_argument("--size", type=int, default=64, help="side of the square images and maps, in pixels")
    g.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                   "predict (photo + map) / 2 and recover the map from it (the thesis' second formulation)")
    # <<< shared: data flags
    g.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies (translation, cutout, "
                   "flip) on what the discriminator sees, the same for a photo and its map; 'none' disables")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("generator (exp1's UNet)")
    g.add_argument("--c", type=int, default=64, help="base channels: the encoder has (3, c, 2c, 4c, 8c, 16c)")
    g.add_argument("--depth", type=int, default=5, help="levels of the UNet (resolution halves between levels)")
    g.add_argument("--g-norm", choices=list(NORMS), default="batch", help="normalisation after each convolution")
    # >>> shared: UNet flags
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the decoder blocks")
    g.add_argument("--no-skip", action="store_true", help="drop the skip connections (the thesis' planned "
                   "'benefits of residual connections' ablation)")
    g.add_argument("--prior", choices=["none", "coords", "gauss"], default="none", help="a centre prior: coords "
                   "feeds normalised x, y and radius channels with the photo (+3 x 9c parameters in the first "
                   f"convolution); gauss concatenates {GAUSS_MAPS} learned 2-D Gaussian maps (mean and width per axis) "
                   f"to the last features and mixes them with a 3x3 convolution (+(c + {GAUSS_MAPS}) x 9c + c + "
                   f"{4 * GAUSS_MAPS} parameters)")
    g.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: every prediction (the val "
                   "evaluation, best.pt's choice, evaluate.py) is the mean of the maps of the photo and of its "
                   "mirror image, mirrored back; twice the inference cost")
    # <<< shared: UNet flags
    g = p.add_argument_group("discriminator")
    g.add_argument("--disc", choices=["patch", "global"], default="patch", help="patch: PatchGAN, a score per "
                   "patch (size/16 x size/16 of them at --d-depth 5); global: one score per image")
    g.add_argument("--d-c", type=int, default=64, help="base channels: the layers have (6, c, 2c, 4c, 8c, 16c)")
    g.add_argument("--d-depth", type=int, default=5, help="convolutions; all but the last halve the resolution")
    g.add_argument("--d-norm", choices=list(NORMS), default="batch", help="norm after each convolution but the first")
    g = p.add_argument_group("loss")
    g.add_argument("--gan-loss", choices=["lsgan", "vanilla", "wgan-gp"], default="lsgan", help="lsgan: squared error "
                   "to 1 (real) or 0 (fake), the thesis; vanilla: BCE with logits; wgan-gp: Wasserstein critic + "
                   f"gradient penalty (weight {GP_WEIGHT:g}; not with --d-norm batch)")
    g.add_argument("--l1-weight", type=float, default=100.0, help="generator loss = adversarial + l1_weight x the "
                   "pixel loss (--loss); 100: pix2pix and the study's final code; 1: the methodology's equation as "
                   "written")
    # >>> shared: loss flag
    g.add_argument("--loss", type=common.loss_spec, default="l1", help="the pixel loss: terms joined by +, each with "
                   "an optional weight: l1, l2, cc (1 - Pearson per map channel), kl (KL divergence of the channels "
                   "as distributions), e.g. l1+0.5cc or kl+cc; cc and kl need --target label")
    # <<< shared: loss flag
    g = p.add_argument_group("optimisation")
    for net, name in (("g", "generator"), ("d", "discriminator")):
        g.add_argument(f"--{net}-opt", choices=list(DEFAULT_LR), default="adam", help=f"the {name}'s optimiser")
        g.add_argument(f"--{net}-lr", type=float, default=None, help=f"the {name}'s learning rate; unset: adam "
                       "0.001, sgd 0.01, adadelta 1.0, adagrad 0.01")
        g.add_argument(f"--{net}-betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                       help=f"the {name}'s Adam betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (both networks)")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("run")
    common.add_run_flags(g, __file__, RESUMABLE)
    g.add_argument("--sample-every", type=int, default=10, help="write a sample grid every N epochs (and last)")
    return p


# ---------------------------------------------------------------------------------------------------- the models
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


# >>> shared: UNet
class Block(nn.Sequential):
    """Two 3x3 convolutions, each followed by norm and ReLU: N x cin x H x W -> N x cout x H x W."""

    def __init__(self, cin, cout, norm, dropout=0.0):
        bias = norm == "none"  # a norm layer's shift makes the convolution's bias redundant
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True),
                         *([nn.Dropout2d(dropout)] if dropout > 0 else []),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True))


GAUSS_MAPS = 8  # --prior gauss: how many learned Gaussian maps


def coordinates(x):
    """The coords prior for N x C x H x W inputs: N x 3 x H x W channels x and y (pixel centres, -1 at the left and
    top edge, +1 at the right and bottom) and the radius sqrt(x^2 + y^2) / sqrt(2) (0 at the centre, 1 at a corner)."""
    n, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
    yy, xx = ys.view(h, 1).expand(h, w), xs.view(1, w).expand(h, w)
    return torch.stack([xx, yy, (xx ** 2 + yy ** 2).sqrt() / 2 ** 0.5]).expand(n, 3, h, w)


class GaussPrior(nn.Module):
    """The gauss prior: k learned 2-D Gaussian maps exp(-((x - mx)^2 / 2 sx^2 + (y - my)^2 / 2 sy^2)) on the
    coordinates' grid, means and log-widths per axis as parameters (SAM's learned priors). N x C x H x W in ->
    N x k x H x W out, the same maps for every image."""

    def __init__(self, k=GAUSS_MAPS):
        super().__init__()
        self.mean = nn.Parameter(torch.rand(k, 2) - 0.5)                  # (mx, my), near the centre
        self.log_width = nn.Parameter(torch.log(0.2 + 0.4 * torch.rand(k, 2)))  # (sx, sy) between 0.2 and 0.6

    def forward(self, x):
        xy = coordinates(x)[:1, :2].float()                               # 1 x 2 x H x W
        z = (xy - self.mean.view(-1, 2, 1, 1)) / self.log_width.exp().view(-1, 2, 1, 1)
        return torch.exp(-0.5 * z.pow(2).sum(1)).unsqueeze(0).expand(len(x), -1, -1, -1).to(x.dtype)


class UNet(nn.Module):
    """N x 3 x S x S photo in [-1, 1] -> N x 3 x S x S map in [-1, 1] (tanh).

    Encoder: `depth` levels with (c, 2c, 4c, ...) channels, max pooling between levels (S must be divisible by
    2^(depth-1)). Decoder: the mirror image; each level upsamples with a 2x2 transposed convolution and, unless
    skip=False, concatenates the encoder's features of the same resolution (the skip connection). prior "coords"
    adds coordinate channels to the input, "gauss" learned Gaussian maps to the last features (see --prior)."""

    def __init__(self, c=64, depth=5, norm="batch", dropout=0.0, skip=True, prior="none"):
        super().__init__()
        ch = [c * 2 ** i for i in range(depth)]
        self.skip, self.prior = skip, prior
        self.down = nn.ModuleList(Block(cin, cout, norm) for cin, cout in
                                  zip([3 + 3 * (prior == "coords")] + ch, ch))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(Block(ch[i] * (2 if skip else 1), ch[i], norm, dropout) for i in range(depth - 1))
        if prior == "gauss":
            self.gauss = GaussPrior()
            self.mix = nn.Sequential(nn.Conv2d(c + GAUSS_MAPS, c, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        if self.prior == "coords":
            x = torch.cat([x, coordinates(x)], 1)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](x)
            x = self.dec[i](torch.cat([x, skips[i]], 1) if self.skip else x)
        if self.prior == "gauss":
            x = self.mix(torch.cat([x, self.gauss(x)], 1))
        return torch.tanh(self.head(x))
# <<< shared: UNet


class Discriminator(nn.Sequential):
    """Judges (photo, map) pairs: N x 6 x S x S (photo and map stacked, in [-1, 1]) -> raw scores, no sigmoid.

    Trunk: `depth` convolutions with (c, 2c, 4c, ...) channels, each followed by norm (but the first) and LeakyReLU
    0.2; all but the last are 4x4 with stride 2, the last 3x3 with stride 1, so it ends at S / 2^(depth-1) pixels.
    Head, kind "patch" (PatchGAN): a 3x3 convolution to N x 1 x S/16 x S/16 (depth 5), a score per overlapping
    patch; kind "global": a convolution over the whole trunk output to N x 1 x 1 x 1, one score per image."""

    def __init__(self, c=64, depth=5, norm="batch", kind="patch", size=64):
        ch, layers = [c * 2 ** i for i in range(depth)], []
        for i, (cin, cout) in enumerate(zip([6] + ch, ch)):
            last, nrm = i == depth - 1, norm if i > 0 else "none"  # no norm on the first layer
            layers += [nn.Conv2d(cin, cout, 3 if last else 4, 1 if last else 2, padding=1, bias=nrm == "none"),
                       NORMS[nrm](cout), nn.LeakyReLU(0.2)]
        head = nn.Conv2d(ch[-1], 1, 3, padding=1) if kind == "patch" else nn.Conv2d(ch[-1], 1, size // 2 ** (depth - 1))
        super().__init__(*layers, head)


# ---------------------------------------------------------------------------------------------------- the losses
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


def d_input(image, vms, policy, p):
    """What the discriminator sees: photo and map stacked (N x 6 x S x S), one DiffAugment transform per sample, the
    same for the photo and its map (real pairs and fake ones alike)."""
    x = torch.cat([image, vms], 1)
    for name in policy:
        x = AUGMENTS[name](x, p)
    return to_memory_format(x, x.device)


# >>> shared: targets
def to_target(image, vms, target):
    """What the network learns to produce: the map itself, or (image + map) / 2 for --target sum."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from what the network produced (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)
# <<< shared: targets


# ---------------------------------------------------------------------------------------------------- training
def train_epoch(G, D, opt_g, opt_d, data, args, policy, device):
    """Algorithm 2, one pass over the shuffled training split. Returns the epoch's means: the generator's adversarial
    and pixel loss (--loss, in the models' range), the discriminator's loss on real and on fake pairs, and the L1
    of the recovered map on [0, 1]."""
    G.train(), D.train()
    n, bs = len(data.train_x), min(args.batch_size, len(data.train_x))
    order, sums, steps = torch.randperm(n).to(device), torch.zeros(5, device=device), n // bs
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=args.amp)  # noqa: E731
    for i in common.progress(steps, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = data.train_x[idx], data.train_y[idx]       # a batch of photos x and their true VMS maps y
        target = to_target(image, vms, args.target)
        # generator step: D should judge (x, G(x)) real, and G(x) should be close to y: adversarial + l1_weight * L1
        D.requires_grad_(False)                                 # D only passes gradients on to G in this step
        with amp():
            fake = G(to_memory_format(image, device)).float()  # G(x)
            g_adv = gan_loss(args.gan_loss, D(d_input(image, fake, policy, args.diffaug_p)), real=True)
        g_pix = common.map_loss(args.loss, fake, target)        # L1 (or --loss) to the target
        opt_g.zero_grad(set_to_none=True)
        (g_adv + args.l1_weight * g_pix).backward()
        opt_g.step()
        # discriminator step: (x, y) is real, (x, G(x)) with G held fixed is fake; the loss is halved
        D.requires_grad_(True)
        real_pair = d_input(image, target, policy, args.diffaug_p)
        fake_pair = d_input(image, fake.detach(), policy, args.diffaug_p)
        with amp():
            d_real = gan_loss(args.gan_loss, D(real_pair), real=True)
            d_fake = gan_loss(args.gan_loss, D(fake_pair), real=False)
            penalty = GP_WEIGHT * gradient_penalty(D, real_pair, fake_pair) if args.gan_loss == "wgan-gp" else 0
        d_loss = (d_real + d_fake + penalty) / 2              # for wgan-gp: half of WGAN-GP's critic loss
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        train_l1 = (from_target(fake.detach(), image, args.target) - vms).abs().mean() / 2  # [-1,1] -> [0,1] scale
        sums += torch.stack([g_adv, g_pix, d_real, d_fake, train_l1]).detach()
    return dict(zip(["g_adv", "g_pix", "d_real", "d_fake", "train_l1"], (sums / steps).tolist()))


# >>> shared: prediction
@torch.no_grad()
def predict(model, images, target, amp=False, tta="none", batch=None):
    """Maps in [-1, 1] for N x 3 x S x S photos, in eval mode (batch-norm running statistics, no dropout). tta
    "flip": the mean of the maps of each photo and of its mirror image, mirrored back. batch: photos per forward
    pass; by default 16 on a CPU (small batches stay in its caches: 2.4x faster than 256, docs/results.md), 256 on
    CUDA."""
    model.eval()
    outs = []
    for x in images.split(batch or (256 if images.device.type == "cuda" else 16)):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            out = model(to_memory_format(x, x.device)).float()
            if tta == "flip":
                out = (out + model(to_memory_format(x.flip(3), x.device)).float().flip(3)) / 2
        outs.append(from_target(out, x, target))
    return torch.cat(outs)


def load_predictor(run_dir, device="cpu", tta=None):
    """(predict_fn, args) from a run folder's best.pt; predict_fn: N x 3 x S x S photos -> maps, both in [-1, 1].
    tta: "none" or "flip" instead of the run's own --tta."""
    ck = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=True)
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **ck["args"]})  # flags newer than the run
    model = UNet(**ck["model_args"]).to(device)
    model.load_state_dict(ck["model"])
    tta = args.tta if tta is None else tta
    return (lambda images: predict(model, images.to(device), args.target, args.amp, tta)), args


def evaluate(model, images, maps, args):
    """map_metrics of the model's maps for photos and their true maps (all in [-1, 1])."""
    pred = predict(model, images, args.target, args.amp, args.tta)
    return common.map_metrics(common.to_unit(pred), common.to_unit(maps))
# <<< shared: prediction


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
    depth = max(args.depth, args.d_depth)
    device, out, data = common.setup(args, __file__, [
        (args.size % 2 ** (depth - 1) == 0 and args.size >= 2 ** args.d_depth, f"--size {args.size} must be a "
         f"multiple of {2 ** (args.depth - 1)} for --depth {args.depth}, and of {2 ** (args.d_depth - 1)} and at "
         f"least {2 ** args.d_depth} for --d-depth {args.d_depth}"),
        (policy is not None, f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
        (min(args.depth, args.d_depth, args.c, args.d_c, args.batch_size, args.epochs) >= 1,
         "--depth, --d-depth, --c, --d-c, --batch-size and --epochs must be at least 1"),
        (args.target == "label" or not {"cc", "kl"} & {t for _, t in common.parse_loss(args.loss)},
         f"--loss {args.loss}: cc and kl compare maps, so they need --target label"),
        (args.gan_loss != "wgan-gp" or args.d_norm != "batch", "--gan-loss wgan-gp needs another --d-norm than "
         "batch (layer, instance, group or none): batch norm breaks the per-sample gradient penalty")])

    model_args = dict(c=args.c, depth=args.depth, norm=args.g_norm, dropout=args.dropout, skip=not args.no_skip,
                      prior=args.prior)
    fmt = torch.channels_last if channels_last(device) else torch.preserve_format
    G = UNet(**model_args).to(device, memory_format=fmt)
    D = Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, args.size).to(device, memory_format=fmt)
    opt_g = make_optimizer(G.parameters(), args.g_opt, args.g_lr, args.g_betas, args.momentum, device)
    opt_d = make_optimizer(D.parameters(), args.d_opt, args.d_lr, args.d_betas, args.momentum, device)
    states = {"generator": G, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}  # what last.pt saves, by name
    g_net, d_net = (torch.compile(G), D if args.gan_loss == "wgan-gp" else torch.compile(D)) if args.compile else (G, D)
    ck = start_or_resume(args, out, states)
    start, best, seconds = ck["epoch"], ck["best"], ck["seconds"]
    n_params, d_params = (sum(p.numel() for p in net.parameters()) for net in (G, D))
    base = common.baseline_metrics(common.to_unit(data.train_y), common.to_unit(data.val_y))
    print(f"exp2: UNet c={args.c} prior={args.prior} ({n_params / 1e6:.2f} M, {args.g_opt}) vs {args.disc} "
          f"discriminator c={args.d_c} ({d_params / 1e6:.2f} M, {args.d_opt}); {args.gan_loss} + {args.l1_weight:g} "
          f"x {args.loss}; on {common.device_name(device)}; folder {out}")
    print("baselines (val): " + " | ".join(f"{k} L1 {m['l1']:.4f} CC {m['cc']:.3f}" for k, m in base.items()))

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            losses = train_epoch(g_net, d_net, opt_g, opt_d, data, args, policy, device)
            if not all(map(math.isfinite, losses.values())):
                status = "diverged"
                print(f"epoch {epoch}: a loss became non-finite ({losses}); the run diverged")
                break
            val = evaluate(g_net, data.val_x, data.val_y, args)
            if val["l1"] < best["val_l1"]:
                best = {"val_l1": val["l1"], "epoch": epoch, **{"val_" + k: v for k, v in val.items()}}
                save_atomic({"model": G.state_dict(), "model_args": model_args, "args": vars(args), "epoch": epoch,
                             "metrics": best, "experiment": "exp2_gan"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = predict(g_net, data.val_x[:8], args.target, args.amp, args.tta)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.val_x[:8], data.val_y[:8], pred],
                                 ["photo", "true map", "predicted"])
            dt = time.perf_counter() - t0
            seconds += dt
            save_last(out, states, args, epoch=epoch, best=best, seconds=seconds)
            row = {"epoch": epoch, **losses, **{"val_" + k: val[k] for k in common.METRICS_ROW}, "seconds": dt}
            tail = common.log_epoch(out, row, epoch, args.epochs, seconds, best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  G adv {losses['g_adv']:.4f}  G pix {losses['g_pix']:.4f}  "
                  f"D real {losses['d_real']:.4f}  D fake {losses['d_fake']:.4f}  {common.metrics_text(val)}  {tail}",
                  flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    train_l1 = None
    if best["epoch"] > 0:
        G.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"])
        train_l1 = evaluate(g_net, data.train_x, data.train_y, args)["l1"]
    common.finish(out, args, build_parser, __file__, status, epoch, best, seconds, base, params=n_params,
                  d_params=d_params, train_l1=train_l1)


if __name__ == "__main__":
    main()
