"""Experiment 2: a pix2pix-style conditional GAN that turns a photo into its VMS map (the thesis' Algorithm 2).

    python exp2_gan.py --g-opt sgd --c 32                        # SGD for the generator, a narrower UNet
    python exp2_gan.py --c 16 --d-c 16 --epochs 20 --out runs/g  # a small configuration that trains on a CPU
    python exp2_gan.py --out runs/g --epochs 30 --resume         # continue (and extend) that run exactly

The generator is exp1's UNet; a discriminator learns to tell true (photo, map) pairs from generated ones, and the
generator to fool it while staying close to the true map under L1. Reads top to bottom: settings, networks, losses,
DiffAugment, the training loop (Algorithm 2), plumbing. It imports only common.py from this project.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "adadelta": 1.0, "adagrad": 1e-2}
GP_WEIGHT = 10.0  # the gradient penalty's weight in WGAN-GP (Gulrajani et al. 2017)
RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
CHANNELS_LAST = None  # channels_last memory format: None = on CUDA only; bench.py sets True/False to measure it


# ---------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 2: pix2pix-style conditional GAN predicting VMS maps "
                                "(Algorithm 2).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="VISCHEMA PLUS folder; unset: $VISCHEMA_DIR, else "
                   "./data/VISCHEMA_PLUS, else the built-in synthetic set (announced on the first line)")
    g.add_argument("--size", type=int, default=64, help="side of the square images and maps, in pixels")
    g.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                   "predict (image + map) / 2 and recover the map from it (the thesis' second formulation)")
    g.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies (translation, cutout) on "
                   "what the discriminator sees, the same for a photo and its map; 'none' disables")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("generator (exp1's UNet)")
    g.add_argument("--c", type=int, default=64, help="base channels: the encoder has (3, c, 2c, 4c, 8c, 16c)")
    g.add_argument("--depth", type=int, default=5, help="levels of the UNet (resolution halves between levels)")
    g.add_argument("--g-norm", choices=list(NORMS), default="batch", help="normalisation after each convolution")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the decoder blocks")
    g.add_argument("--no-skip", action="store_true", help="drop the skip connections (the thesis' planned ablation)")
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
    g.add_argument("--l1-weight", type=float, default=100.0, help="generator loss = adversarial + l1_weight * L1; "
                   "100: pix2pix and the study's final code; 1: the methodology's equation as written")
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
    g.add_argument("--seed", type=int, default=0, help="seeds every random number generator")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (for CUDA, or a CPU with AMX bf16 units)")
    g.add_argument("--compile", action="store_true", help="torch.compile G, and D unless wgan-gp (no double backward "
                   "there): faster steps on CUDA after a minute of compiling; the same weights and checkpoints")
    g.add_argument("--out", default=None, help="run folder (default: runs/exp2-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt with its "
                   "saved settings; only --epochs (to extend it) and --device may change")
    g.add_argument("--sample-every", type=int, default=10, help="write a sample grid every N epochs (and last)")
    return p


# ---------------------------------------------------------------------------------------------------- the models
NORMS = {  # group: the most groups (at most 32) that leave at least two channels in each
    "batch": lambda ch: nn.BatchNorm2d(ch),
    "instance": lambda ch: nn.InstanceNorm2d(ch, affine=True),
    "layer": lambda ch: nn.GroupNorm(1, ch),  # normalises over channels and pixels of each image
    "group": lambda ch: nn.GroupNorm(max([g for g in range(1, 33) if ch % g == 0 and ch // g >= 2] or [1]), ch),
    "none": lambda ch: nn.Identity(),
}


class Block(nn.Sequential):
    """Two 3x3 convolutions, each followed by norm and ReLU: N x cin x H x W -> N x cout x H x W."""

    def __init__(self, cin, cout, norm, dropout=0.0):
        bias = norm == "none"  # a norm layer's shift makes the convolution's bias redundant
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True),
                         *([nn.Dropout2d(dropout)] if dropout > 0 else []),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """The generator. N x 3 x S x S photo in [-1, 1] -> N x 3 x S x S map in [-1, 1] (tanh).

    Encoder: `depth` levels with (c, 2c, 4c, ...) channels, max pooling between levels (S must be divisible by
    2^(depth-1)). Decoder: the mirror image; each level upsamples with a 2x2 transposed convolution and, unless
    skip=False, concatenates the encoder's features of the same resolution (the skip connection)."""

    def __init__(self, c=64, depth=5, norm="batch", dropout=0.0, skip=True):
        super().__init__()
        ch = [c * 2 ** i for i in range(depth)]
        self.skip = skip
        self.down = nn.ModuleList(Block(cin, cout, norm) for cin, cout in zip([3] + ch, ch))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(Block(ch[i] * (2 if skip else 1), ch[i], norm, dropout) for i in range(depth - 1))
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.up[i](x)
            x = self.dec[i](torch.cat([x, skips[i]], 1) if self.skip else x)
        return torch.tanh(self.head(x))


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
# Differentiable augmentation (Zhao et al. 2020) of what the discriminator sees, real and fake: the (photo, map) stack,
# so both move together; each policy per sample with probability p; fill -1: a black photo and an empty map.
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


AUGMENTS = {"translation": translation, "cutout": cutout}


def diff_augment(image, vms, policy, p):
    """The discriminator's input: photo and map stacked (N x 6 x S x S), one random transform per sample."""
    x = torch.cat([image, vms], 1)
    for name in policy:
        x = AUGMENTS[name](x, p)
    return to_memory_format(x, x.device)


def to_target(image, vms, target):
    """What the generator learns to output: the map itself, or (image + map) / 2 for --target sum."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from the generator's output (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------- training
def train_epoch(G, D, opt_g, opt_d, data, args, policy, device):
    """Algorithm 2, one pass over the shuffled training split. Returns the epoch's means: generator adversarial
    and L1 loss, discriminator loss on real and on fake pairs, and the L1 of the recovered map (both on [0, 1])."""
    G.train(), D.train()
    n, bs = len(data.train_x), min(args.batch_size, len(data.train_x))
    order = torch.randperm(n).to(device)
    sums, steps = torch.zeros(5, device=device), n // bs
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=args.amp)  # noqa: E731
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = data.train_x[idx], data.train_y[idx]       # a batch of photos x and their true VMS maps y
        target = to_target(image, vms, args.target)
        # generator step: D should judge (x, G(x)) real, and G(x) should be close to y: adversarial + l1_weight * L1
        D.requires_grad_(False)                                 # D only passes gradients on to G in this step
        with amp():
            fake = G(to_memory_format(image, device)).float()  # G(x)
            g_adv = gan_loss(args.gan_loss, D(diff_augment(image, fake, policy, args.diffaug_p)), real=True)
        g_l1 = F.l1_loss(fake, target)
        opt_g.zero_grad(set_to_none=True)
        (g_adv + args.l1_weight * g_l1).backward()
        opt_g.step()
        # discriminator step: (x, y) is real, (x, G(x)) with G held fixed is fake; the loss is halved
        D.requires_grad_(True)
        real_pair = diff_augment(image, target, policy, args.diffaug_p)
        fake_pair = diff_augment(image, fake.detach(), policy, args.diffaug_p)
        with amp():
            d_real = gan_loss(args.gan_loss, D(real_pair), real=True)
            d_fake = gan_loss(args.gan_loss, D(fake_pair), real=False)
            penalty = GP_WEIGHT * gradient_penalty(D, real_pair, fake_pair) if args.gan_loss == "wgan-gp" else 0
        d_loss = (d_real + d_fake + penalty) / 2              # for wgan-gp: half of WGAN-GP's critic loss
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        train_l1 = (from_target(fake.detach(), image, args.target) - vms).abs().mean()
        sums += torch.stack([g_adv, g_l1 / 2, d_real, d_fake, train_l1 / 2]).detach()  # L1s on the [0, 1] scale
    return dict(zip(["g_adv", "g_l1", "d_real", "d_fake", "train_l1"], (sums / steps).tolist()))


@torch.no_grad()
def predict(G, images, target, amp=False, batch=256):
    """Maps in [-1, 1] for N x 3 x S x S photos, in eval mode (batch-norm running statistics, no dropout)."""
    G.eval()
    with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
        out = torch.cat([G(to_memory_format(x, x.device)).float() for x in images.split(batch)])
    return from_target(out, images, target)


def load_predictor(run_dir, device="cpu"):
    """(predict_fn, args) from a run folder's best.pt; predict_fn: N x 3 x S x S photos -> maps, both in [-1, 1]."""
    ck = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ck["args"])
    G = UNet(args.c, args.depth, args.g_norm, args.dropout, skip=not args.no_skip).to(device)
    G.load_state_dict(ck["generator"])
    return (lambda images: predict(G, images.to(device), args.target, args.amp)), args


# ---------------------------------------------------------------------------------------------------- plumbing
def channels_last(device):
    return device.type == "cuda" if CHANNELS_LAST is None else CHANNELS_LAST


def to_memory_format(x, device):
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device) else x


def make_optimizer(params, name, lr, betas, momentum, device):
    lr = lr if lr is not None else DEFAULT_LR[name]
    if name == "adam":  # fused: one kernel for the whole update on CUDA
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=device == "cuda" or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return {"adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad}[name](params, lr=lr)


def save_atomic(obj, path):
    """Write to a temporary file and rename: a kill at any moment leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def command_line(args):
    """The command that reproduces this run: the script and every setting that differs from its default."""
    words = ["python", Path(__file__).name]
    for action in build_parser()._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in ("help", "resume", "out") or value == action.default:
            continue
        flag = action.option_strings[0]
        words += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    return " ".join(words)


def parse_args(argv=None):
    """Flags -> args; with --resume the run's saved settings, where only RESUMABLE ones may change."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    if args.out is None:
        parser.error("--resume needs --out, the run folder to continue")
    saved = Path(args.out) / "args.json"
    if not (Path(args.out) / "last.pt").exists() or not saved.exists():
        print(f"resume: nothing to resume in {args.out} (no last.pt yet); starting a new run there")
        return args
    given = build_parser()
    for action in given._actions:
        action.default = argparse.SUPPRESS
    given = vars(given.parse_args(argv))  # only the flags that were typed
    saved = json.loads(saved.read_text())
    if given.get("data") and saved.get("data") and Path(given["data"]).resolve() == Path(saved["data"]).resolve():
        given["data"] = saved["data"]  # the same folder, written another way
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v)
    if changed:
        parser.error(f"--resume keeps a run's settings but --epochs, --device and --compile; cannot change "
                     f"{', '.join(changed)}")
    defaults = vars(parser.parse_args([]))  # settings added to the script since the run began
    return argparse.Namespace(**{**defaults, **saved, **given, "resume": True})


def main(argv=None):
    args = parse_args(argv)
    policy = [] if args.diffaug.strip() in ("", "none") else [s.strip() for s in args.diffaug.split(",")]
    checks = [(args.size % 2 ** (max(args.depth, args.d_depth) - 1) == 0 and args.size >= 2 ** args.d_depth,
               f"--size {args.size} must be a multiple of {2 ** (args.depth - 1)} for --depth {args.depth}, and of "
               f"{2 ** (args.d_depth - 1)} and at least {2 ** args.d_depth} for --d-depth {args.d_depth}"),
              (all(s in AUGMENTS for s in policy), f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
              (min(args.depth, args.d_depth, args.c, args.d_c, args.batch_size, args.epochs) >= 1,
               "--depth, --d-depth, --c, --d-c, --batch-size and --epochs must be at least 1"),
              (args.gan_loss != "wgan-gp" or args.d_norm != "batch", "--gan-loss wgan-gp needs another --d-norm than "
               "batch (layer, instance, group or none): batch norm breaks the per-sample gradient penalty")]
    for message in [message for ok, message in checks if not ok][:1]:
        common.fail(message)
    device = common.pick_device(args.device)
    args.device = device.type
    out = Path(args.out or time.strftime("runs/exp2-%Y%m%d-%H%M%S"))
    if (out / "last.pt").exists() and not args.resume:
        common.fail(f"{out} already holds a run; add --resume to continue it or choose another --out")
    try:
        data = common.load_data(args.data, args.size, device)
    except common.DataError as e:
        common.fail(str(e))
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    fmt = torch.channels_last if channels_last(device) else torch.preserve_format
    G = UNet(args.c, args.depth, args.g_norm, args.dropout, skip=not args.no_skip).to(device, memory_format=fmt)
    D = Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, args.size).to(device, memory_format=fmt)
    opt_g = make_optimizer(G.parameters(), args.g_opt, args.g_lr, args.g_betas, args.momentum, args.device)
    opt_d = make_optimizer(D.parameters(), args.d_opt, args.d_lr, args.d_betas, args.momentum, args.device)
    states = {"generator": G, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}  # saved in last.pt, by name
    g_net, d_net = (torch.compile(G), D if args.gan_loss == "wgan-gp" else torch.compile(D)) if args.compile else (G, D)
    start, best, seconds, kept = 0, {"val_l1": math.inf, "epoch": 0}, 0.0, []
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        for name, obj in states.items():
            obj.load_state_dict(ck[name])
        torch.set_rng_state(ck["rng"]["cpu"])
        if ck["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        start, best, seconds = ck["epoch"], ck["best"], ck["seconds"]
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= start]  # not after last.pt
        print(f"resume: {out} from epoch {start} (best val L1 {best['val_l1']:.4f} at epoch {best['epoch']})")
    (out / "metrics.jsonl").write_text("".join(kept))
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    n_params, d_params = (sum(p.numel() for p in net.parameters()) for net in (G, D))
    unit = common.to_unit  # model range [-1, 1] -> metrics' [0, 1]
    base = common.baseline_metrics(unit(data.train_y), unit(data.val_y))
    print(f"exp2: UNet c={args.c} ({n_params / 1e6:.2f} M, {args.g_opt}) vs {args.disc} discriminator c={args.d_c} "
          f"({d_params / 1e6:.2f} M, {args.d_opt}); {args.gan_loss} + {args.l1_weight:g} x L1; {device}; folder {out}")
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
            val = common.map_metrics(unit(predict(g_net, data.val_x, args.target, args.amp)), unit(data.val_y))
            dt = time.perf_counter() - t0
            seconds += dt
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, **losses, "val_l1": val["l1"], "val_cc": val["cc"],
                                    "seconds": dt}) + "\n")
            if val["l1"] < best["val_l1"]:
                best = {"val_l1": val["l1"], "epoch": epoch, **{"val_" + k: v for k, v in val.items()}}
                save_atomic({"generator": G.state_dict(), "args": vars(args), "epoch": epoch, "metrics": best,
                             "experiment": "exp2_gan"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = predict(g_net, data.val_x[:8], args.target, args.amp)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.val_x[:8], data.val_y[:8], pred])
            rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # [] without CUDA
            save_atomic({**{name: obj.state_dict() for name, obj in states.items()}, "epoch": epoch, "best": best,
                         "rng": rng, "args": vars(args), "seconds": seconds}, out / "last.pt")
            eta = (args.epochs - epoch) * seconds / epoch  # seconds: all epochs so far, resumed ones too
            print(f"epoch {epoch:4d}/{args.epochs}  G adv {losses['g_adv']:.4f}  G L1 {losses['g_l1']:.4f}  "
                  f"D real {losses['d_real']:.4f}  D fake {losses['d_fake']:.4f}  val L1 {val['l1']:.4f}  val CC "
                  f"{val['cc']:.3f}  {dt:.1f} s/epoch  ETA {eta / 60:.1f} min"
                  + ("  *best" if best["epoch"] == epoch else ""), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python exp2_gan.py --out {out} --resume")
        sys.exit(130)

    final = {"experiment": "exp2_gan", "command": command_line(args), "status": status, "epoch": epoch,
             "best_epoch": best["epoch"], "seconds": seconds, "params": n_params, "d_params": d_params,
             "data": data.source, **dict.fromkeys(["val_l1", "val_l1_green", "val_l1_red", "val_cc", "val_cc20"])}
    if best["epoch"] > 0:
        G.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["generator"])
        final.update({k: v for k, v in best.items() if k.startswith("val_")})
        final["train_l1"] = common.l1_metrics(unit(predict(g_net, data.train_x, args.target, args.amp)),
                                              unit(data.train_y))["l1"]
    final["baselines"] = base
    (out / "final.json").write_text(json.dumps(final, indent=1))
    if status != "ok":
        sys.exit(3)
    print(f"done: best val L1 {final['val_l1']:.4f} (median map {base['median']['l1']:.4f}), val CC "
          f"{final['val_cc']:.3f} (mean map {base['mean']['cc']:.3f}) at epoch {best['epoch']}; {out}/final.json")


if __name__ == "__main__":
    main()
