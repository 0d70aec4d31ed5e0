"""Experiment 2: a pix2pix-style conditional GAN that turns a photo into its VMS map (Algorithm 2).

    python exp2_gan.py --g-opt sgd --c 32                        # SGD for the generator, a narrower UNet
    python exp2_gan.py --c 16 --d-c 16 --epochs 20 --out runs/g  # a small configuration that trains on a CPU
    python exp2_gan.py --out runs/g --epochs 30 --resume         # continue (and extend) that run exactly

The generator is exp1's UNet; a discriminator learns to tell true (photo, map) pairs from generated ones, and
the generator to fool it while staying close to the true map under L1. Reads top to bottom: settings, the
networks, the losses, the training loop (Algorithm 2), then plumbing. It imports only common.py and
pretrained.py from this project; blocks marked "# >>> shared: NAME", and functions of the same name, are
byte-identical in the experiment files that have them.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import pretrained

RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
GP_WEIGHT = 10.0  # the gradient penalty's weight in WGAN-GP (Gulrajani et al. 2017)


# ------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = common.ArgumentParser("Experiment 2: a pix2pix-style conditional GAN predicting VMS maps (Algorithm "
                              "2).")
    g = p.add_argument_group("data")
    common.add_data_flags(g)
    g.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies (translation, "
                   "cutout, flip) on what the discriminator sees, alike for photo and map; 'none' disables")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("generator (exp1's UNet)")
    g.add_argument("--g-norm", choices=common.NORM_NAMES, default="batch", help="norm after each convolution")
    # >>> shared: UNet flags
    g.add_argument("--c", type=int, default=64, help="base channels: the levels have (c, 2c, 4c, 8c, 16c)")
    g.add_argument("--depth", type=int, default=5, help="levels of the UNet (the resolution halves between)")
    g.add_argument("--convs", type=int, choices=[1, 2], default=2, help="3x3 convolutions per block: 2, the "
                   "thesis' UNet; 1: faster, less accurate (docs/results.md)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the decoder blocks")
    g.add_argument("--no-skip", action="store_true", help="drop the skip connections (the thesis' planned "
                   "ablation; with --encoder: read only the deepest level)")
    g.add_argument("--prior", choices=["none", "coords", "gauss"], default="none", help="a centre prior "
                   "(docs/experiments.md): coords, x, y and radius channels with the photo; gauss, learned "
                   "2-D Gaussian maps mixed into the last features")
    g.add_argument("--tta", choices=["none", "flip"], default="none", help="flip: each map is the mean of "
                   "those of the photo and its mirror image (evaluations, best.pt's choice, evaluate.py)")
    g = p.add_argument_group("pretrained encoder (optional extra: README)")
    common.add_encoder_flags(g)
    # <<< shared: UNet flags
    g = p.add_argument_group("discriminator")
    g.add_argument("--disc", choices=["patch", "global"], default="patch", help="patch: PatchGAN, a score "
                   "per patch (size/16 x size/16 of them at --d-depth 5); global: one score per image")
    g.add_argument("--d-c", type=int, default=64, help="base channels: the layers have (c, 2c, 4c, 8c, 16c)")
    g.add_argument("--d-depth", type=int, default=5, help="convolutions; all but the last halve the size")
    g.add_argument("--d-norm", choices=common.NORM_NAMES, default="batch", help="norm after each convolution "
                   "but the first")
    g = p.add_argument_group("loss")
    g.add_argument("--gan-loss", choices=["lsgan", "vanilla", "wgan-gp"], default="lsgan", help="lsgan: "
                   "squared error to 1 (real) or 0 (fake), the thesis; vanilla: BCE with logits; wgan-gp: "
                   f"Wasserstein critic + gradient penalty (weight {GP_WEIGHT:g}; not with --d-norm batch)")
    g.add_argument("--l1-weight", type=float, default=100.0, help="generator loss = adversarial + l1_weight "
                   "x the pixel loss; 100: pix2pix and the study's final code; 1: the methodology's equation "
                   "as written")
    g.add_argument("--loss", type=common.loss_spec, default="l1", help="the pixel loss: terms joined by +, "
                   "each with an optional weight: l1, l2, cc (1 - Pearson per channel), kl, e.g. l1+0.5cc")
    g = p.add_argument_group("optimisation")
    for net, name in (("g", "generator"), ("d", "discriminator")):
        g.add_argument(f"--{net}-opt", choices=list(common.DEFAULT_LR), default="adam", help=f"the {name}'s "
                       "optimiser")
        g.add_argument(f"--{net}-lr", type=float, default=None, help=f"the {name}'s learning rate; unset: "
                       "adam 0.001, sgd 0.01, adadelta 1.0, adagrad 0.01")
        g.add_argument(f"--{net}-betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                       help=f"the {name}'s Adam betas")
    g.add_argument("--lr-decay", choices=["none", "cosine"], default="none", help="cosine: both learning "
                   "rates fall towards 0 along a half cosine over the epochs")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (both networks)")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("run")
    common.add_run_flags(g, __file__, RESUMABLE)
    g.add_argument("--eval-every", type=int, default=1, help="evaluate the selection and val splits (and "
                   "choose best.pt) every N epochs, and at the last")
    g.add_argument("--sample-every", type=int, default=10, help="a sample grid every N epochs, and last")
    return p


def checks(args, policy):
    """(ok, message) for each rule the settings must follow; common.refuse stops at the first broken one."""
    depth = max(args.depth, args.d_depth)
    return [common.positive(args, "depth", "d_depth", "c", "d_c", "batch_size", "epochs", "eval_every"),
            (args.size % 2 ** (depth - 1) == 0 and args.size >= 2 ** args.d_depth, f"--size {args.size} must "
             f"be a multiple of {2 ** (args.depth - 1)} for --depth {args.depth}, and of "
             f"{2 ** (args.d_depth - 1)} and at least {2 ** args.d_depth} for --d-depth {args.d_depth}"),
            *common.checks(args, policy, photos_augmented=False),
            (args.gan_loss != "wgan-gp" or args.d_norm != "batch", "--gan-loss wgan-gp needs another "
             "--d-norm than batch (layer, instance, group or none): batch norm breaks the per-sample "
             "gradient penalty")]


# ----------------------------------------------------------------------------------------------- the models
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


# >>> shared: UNet
class Block(nn.Sequential):
    """Two (convs) 3x3 convolutions, each followed by norm and ReLU: N x cin x H x W -> N x cout x H x W."""

    def __init__(self, cin, cout, norm, dropout=0.0, convs=2):
        bias = norm == "none"  # a norm layer's shift makes the convolution's bias redundant
        layers = []
        for i in range(convs):  # dropout, if any, between the two
            layers += [nn.Dropout2d(dropout)] if i and dropout > 0 else []
            layers += [nn.Conv2d(cout if i else cin, cout, 3, padding=1, bias=bias), NORMS[norm](cout),
                       nn.ReLU(inplace=True)]
        super().__init__(*layers)


GAUSS_MAPS = 8  # --prior gauss: how many learned Gaussian maps


def coordinates(x):
    """The coords prior for N x C x H x W inputs: N x 3 x H x W channels x and y (pixel centres, -1 at the
    left and top edge, +1 at the right and bottom) and the radius sqrt(x^2 + y^2) / sqrt(2)."""
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
        self.mean = nn.Parameter(torch.rand(k, 2) - 0.5)                        # (mx, my), near the centre
        self.log_width = nn.Parameter(torch.log(0.2 + 0.4 * torch.rand(k, 2)))  # (sx, sy) in 0.2 .. 0.6

    def forward(self, x):
        xy = coordinates(x)[:1, :2].float()                                     # 1 x 2 x H x W
        z = (xy - self.mean.view(-1, 2, 1, 1)) / self.log_width.exp().view(-1, 2, 1, 1)
        return torch.exp(-0.5 * z.pow(2).sum(1)).unsqueeze(0).expand(len(x), -1, -1, -1).to(x.dtype)


class UNet(nn.Module):
    """N x 3 x S x S photo in [-1, 1] -> N x 3 x S x S map in [-1, 1] (tanh).

    Encoder: `depth` levels with (c, 2c, 4c, ...) channels, max pooling between levels (S must be divisible
    by 2^(depth-1)). Decoder: the mirror image; each level upsamples with a 2x2 transposed convolution and,
    unless skip=False, concatenates the encoder's features of the same resolution (the skip connection). prior
    "coords" adds coordinate channels to the input, "gauss" learned Gaussian maps to the last features."""

    def __init__(self, c=64, depth=5, norm="batch", dropout=0.0, skip=True, prior="none", convs=2):
        super().__init__()
        ch = [c * 2 ** i for i in range(depth)]
        self.skip, self.prior = skip, prior
        self.down = nn.ModuleList(Block(cin, cout, norm, convs=convs) for cin, cout in
                                  zip([3 + 3 * (prior == "coords")] + ch, ch))
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth - 1))
        self.dec = nn.ModuleList(Block(ch[i] * (2 if skip else 1), ch[i], norm, dropout, convs)
                                 for i in range(depth - 1))
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


def make_unet(encoder="scratch", c=64, depth=5, norm="batch", dropout=0.0, skip=True, prior="none", convs=2,
              freeze=5, size=64, photo_size=256):
    """The network from photo to map: the thesis' UNet, or a decoder of this file's Blocks (and prior) on a
    pretrained encoder (pretrained.EncoderUNet)."""
    if encoder == "scratch":
        return UNet(c, depth, norm, dropout, skip, prior, convs)
    block = lambda cin, cout: Block(cin, cout, norm, dropout, convs)  # noqa: E731
    prior = GaussPrior() if prior == "gauss" else None
    return pretrained.EncoderUNet(encoder, freeze, size, photo_size, block, skip, prior, GAUSS_MAPS)
# <<< shared: UNet


class Discriminator(nn.Sequential):
    """Judges (photo, map) pairs: N x 6 x S x S (photo and map stacked, in [-1, 1]) -> raw scores, no sigmoid.

    Trunk: `depth` convolutions with (c, 2c, 4c, ...) channels, each followed by norm (but the first) and
    LeakyReLU 0.2; all but the last are 4x4 with stride 2, the last 3x3 with stride 1, so it ends at
    S / 2^(depth-1) pixels. Head, kind "patch" (PatchGAN): a 3x3 convolution to N x 1 x S/16 x S/16 (depth 5),
    a score per overlapping patch; kind "global": a convolution over the whole trunk output, one score per
    image."""

    def __init__(self, c=64, depth=5, norm="batch", kind="patch", size=64):
        ch, layers = [c * 2 ** i for i in range(depth)], []
        for i, (cin, cout) in enumerate(zip([6] + ch, ch)):
            last, nrm = i == depth - 1, norm if i > 0 else "none"  # no norm on the first layer
            layers += [nn.Conv2d(cin, cout, 3 if last else 4, 1 if last else 2, padding=1,
                                 bias=nrm == "none"), NORMS[nrm](cout), nn.LeakyReLU(0.2)]
        whole = size // 2 ** (depth - 1)                       # the trunk's output size
        head = nn.Conv2d(ch[-1], 1, 3, padding=1) if kind == "patch" else nn.Conv2d(ch[-1], 1, whole)
        super().__init__(*layers, head)


# ----------------------------------------------------------------------------------------------- the losses
def gan_loss(kind, scores, real):
    """The adversarial loss of raw scores (any shape) against the label real (True) or fake (False), as a
    mean. lsgan (Mao et al. 2017): squared error to 1 or 0. vanilla (Goodfellow et al. 2014): binary
    cross-entropy of sigmoid(scores) with 1 or 0. wgan-gp (Gulrajani et al. 2017): -score for real, +score for
    fake, so that the critic's loss (real + fake) estimates minus the Wasserstein distance. The generator uses
    real=True."""
    scores = scores.float()
    if kind == "wgan-gp":
        return -scores.mean() if real else scores.mean()
    loss = F.mse_loss if kind == "lsgan" else F.binary_cross_entropy_with_logits
    return loss(scores, torch.full_like(scores, float(real)))


def gradient_penalty(critic, real, fake):
    """WGAN-GP's penalty: mean over samples of (|d critic(z) / dz| - 1)^2 at a random point z on the line
    between each real and fake input (N x ... each); a sample's gradient is that of the sum of its scores."""
    eps = torch.rand(len(real), *[1] * (real.dim() - 1), device=real.device)
    z = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(z).float().sum(), z, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def d_input(image, vms, policy, p):
    """What the discriminator sees: photo and map stacked (N x 6 x S x S), one DiffAugment transform per
    sample, the same for the photo and its map (real pairs and fake ones alike)."""
    x = torch.cat([image, vms], 1)
    for name in policy:
        x = common.AUGMENTS[name](x, p)
    return x


# ------------------------------------------------------------------------------------------------- training
def train_epoch(G, D, opt_g, opt_d, photos, data, args, policy):
    """Algorithm 2, one pass over the shuffled training split (the generator's inputs: photos, or their cached
    features; the discriminator sees data.train_x). Returns the epoch's means: the generator's adversarial and
    pixel loss (--loss, in the models' range), the discriminator's loss on real and on fake pairs, and the L1
    of the recovered map on [0, 1]."""
    G.train(), D.train()
    n, bs, device = len(data.train_y), min(args.batch_size, len(data.train_y)), data.train_y.device
    order, sums, steps = torch.randperm(n).to(device), torch.zeros(5, device=device), n // bs
    amp = lambda: torch.autocast(device.type, torch.bfloat16, enabled=args.amp)  # noqa: E731
    for i in common.progress(steps, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = data.train_x[idx], data.train_y[idx]       # a batch of photos x and their true maps y
        target = common.to_target(image, vms, args.target)
        # generator step: D should judge (x, G(x)) real, G(x) be close to y: adversarial + l1_weight * L1
        D.requires_grad_(False)                                 # D only passes gradients on to G in this step
        with amp():
            fake = G(photos[idx]).float()                       # G(x)
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
            penalty = GP_WEIGHT * gradient_penalty(D, real_pair, fake_pair) if args.gan_loss == "wgan-gp" \
                else 0
        d_loss = (d_real + d_fake + penalty) / 2              # for wgan-gp: half of WGAN-GP's critic loss
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        train_l1 = (common.from_target(fake.detach(), image, args.target) - vms).abs().mean() / 2  # on [0, 1]
        sums += torch.stack([g_adv, g_pix, d_real, d_fake, train_l1]).detach()
    return dict(zip(["g_adv", "g_pix", "d_real", "d_fake", "train_l1"], (sums / steps).tolist()))


# ------------------------------------------------------------------------------------------------- plumbing
# >>> shared: optimiser and predictor
def make_optimizer(params, name, lr, betas, momentum, device):
    """The optimiser `name` (common.DEFAULT_LR's keys) with learning rate lr; Adam fused on CUDA (device: a
    torch.device or its name)."""
    if name == "adam":  # fused: one kernel for the whole update on CUDA
        fused = torch.device(device).type == "cuda" or None
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return {"adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad}[name](params, lr=lr)


def load_predictor(run_dir, device="cpu", tta=None):
    """(predict_fn, args) from a run folder's best.pt; predict_fn: N photos (at --photo-size, or their cached
    features) -> maps, both in [-1, 1]; predict_fn.model is the network. tta: "none" or "flip" instead of the
    run's own --tta."""
    ck = common.load_checkpoint(Path(run_dir) / "best.pt")
    args = common.saved_settings(build_parser, ck["args"])
    model = common.load_own_state(make_unet(**ck["model_args"]), ck["model"])
    model = model.to(device, memory_format=torch.channels_last)
    tta = args.tta if tta is None else tta
    run = lambda photos: common.predict(model, photos.to(device), args.target, args.amp, tta)  # noqa: E731
    run.model = model
    return run, args
# <<< shared: optimiser and predictor


def main(argv=None):
    args = common.parse_args(build_parser, argv, RESUMABLE)  # every setting resolved (--resume: the run's)
    policy = common.augment_policy(args.diffaug)
    common.refuse(checks(args, policy))
    device = common.device_for(args)
    data = common.run_data(args, device)                      # the fit, selection and val splits
    out = common.run_folder(args, __file__)
    torch.manual_seed(args.seed)

    model_args = dict(encoder=args.encoder, c=args.c, depth=args.depth, norm=args.g_norm,
                      dropout=args.dropout, skip=not args.no_skip, prior=args.prior, convs=args.convs,
                      freeze=args.freeze, size=args.size, photo_size=args.photo_size)
    G = common.build(make_unet, model_args, data.train_y).to(device, memory_format=torch.channels_last)
    D = Discriminator(args.d_c, args.d_depth, args.d_norm, args.disc, args.size)
    D = D.to(device, memory_format=torch.channels_last)
    photos = pretrained.split_inputs(G, data, args, device)  # G's photos, or their cached encoder features
    trained = [p for p in G.parameters() if p.requires_grad]
    opt_g = make_optimizer(trained, args.g_opt, args.g_lr, args.g_betas, args.momentum, device)
    opt_d = make_optimizer(D.parameters(), args.d_opt, args.d_lr, args.d_betas, args.momentum, device)
    states = {"generator": G, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}  # what last.pt saves
    g_net, d_net = G, D                      # compiled: what trains and predicts; G and D hold the weights
    if args.compile:
        g_net, d_net = torch.compile(G), D if args.gan_loss == "wgan-gp" else torch.compile(D)
    ck = common.start_or_resume(args, out, states)
    start, best, last, seconds = ck["epoch"], ck["best"], ck["last"], ck["seconds"]
    n_params, d_params = sum(p.numel() for p in trained), sum(p.numel() for p in D.parameters())
    print(f"exp2: {common.describe(model_args)} ({n_params / 1e6:.2f} M trained, {args.g_opt}) vs "
          f"{args.disc} discriminator c={args.d_c} ({d_params / 1e6:.2f} M, {args.d_opt}); {args.gan_loss} + "
          f"{args.l1_weight:g} x {args.loss}; on {common.device_name(device)}; folder {out}")
    base = common.baselines(data)                             # the constant maps, printed

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            common.set_lr([(opt_g, args.g_lr), (opt_d, args.d_lr)], args.lr_decay, epoch, args.epochs)
            losses = train_epoch(g_net, d_net, opt_g, opt_d, photos["train"], data, args, policy)
            if not all(map(math.isfinite, losses.values())):
                status = "diverged"
                print(f"epoch {epoch}: a loss became non-finite ({losses}); the run diverged")
                break
            row, text = {"epoch": epoch, **losses}, ""
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # choose on the selection split
                val = common.evaluate(g_net, photos["val"], data.val_y, args)  # and report the val split
                sel = common.evaluate(g_net, photos["sel"], data.sel_y, args) if args.selection else val
                row.update(sel_l1=sel["l1"], sel_cc=sel["cc"], **common.prefixed("val_", val))
                text, last = common.metrics_text(val), row
                if sel["l1"] < best["sel_l1"]:
                    best = {"epoch": epoch, **common.prefixed("sel_", sel),
                            **common.prefixed("val_", val, val)}
                    common.save_atomic({"model": common.own_state(G), "model_args": model_args,
                                        "args": vars(args), "epoch": epoch, "metrics": best,
                                        "experiment": "exp2_gan"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = common.predict(g_net, photos["val"][:8], args.target, args.amp, args.tta)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png",
                                 [data.val_x[:8], data.val_y[:8], pred], ["photo", "true map", "predicted"])
            dt = time.perf_counter() - t0
            seconds += dt
            common.save_last(out, states, args, epoch=epoch, best=best, last=last, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds,
                                    best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  G adv {losses['g_adv']:.4f}  G pix "
                  f"{losses['g_pix']:.4f}  D real {losses['d_real']:.4f}  D fake {losses['d_fake']:.4f}  "
                  f"{text}  {tail}", flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    train_l1, n = None, common.TRAIN_EVAL
    if best["epoch"] > 0:  # the chosen weights' L1 on (the first 256 of) the photos they were fitted to
        common.load_own_state(G, common.load_checkpoint(out / "best.pt")["model"])
        train_l1 = common.evaluate(g_net, photos["train"][:n], data.train_y[:n], args)["l1"]
    common.finish(out, args, build_parser, __file__, status=status, epoch=epoch, best=best, last=last,
                  seconds=seconds, baselines=base, params=n_params, d_params=d_params, train_l1=train_l1)


if __name__ == "__main__":
    main()
