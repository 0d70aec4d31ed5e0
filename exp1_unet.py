"""Experiment 1: a UNet that turns a photo into its VMS map, trained with an L1 loss (Algorithm 1).

    python exp1_unet.py                                  # the thesis' defaults (c 64, Adam, 100 epochs)
    python exp1_unet.py --c 16 --epochs 40 --out runs/u  # a small configuration that trains on a CPU
    python exp1_unet.py --out runs/u --epochs 60 --resume  # continue (and extend) that run exactly
    python exp1_unet.py --encoder lite0 --out runs/e     # on ImageNet features (the optional extra, README)

Reads top to bottom: settings, the model, the training loop (Algorithm 1), then plumbing. It imports only
common.py (data, metrics, DiffAugment, run plumbing) and pretrained.py from this project; exp2 and exp3 carry
their own copies of what they share with it, so that each experiment reads alone. Blocks between
"# >>> shared: NAME" and "# <<< shared: NAME", and functions of the same name, are byte-identical in every
file that has them (test_all.py checks it), so `diff exp1_unet.py exp2_gan.py` shows what the GAN adds.
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


# ------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = common.ArgumentParser("Experiment 1: UNet + L1 loss predicting VMS maps (Algorithm 1).")
    g = p.add_argument_group("data")
    common.add_data_flags(g)
    g.add_argument("--diffaug", default=None, help="DiffAugment policies (translation, cutout, flip) for "
                   "each photo and its map; 'none' disables; unset: translation,cutout (--encoder: flip)")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("model")
    g.add_argument("--norm", choices=common.NORM_NAMES, default="batch", help="norm after each convolution")
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
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", type=common.loss_spec, default="l1", help="the pixel loss: terms joined by +, "
                   "each with an optional weight: l1, l2, cc (1 - Pearson per channel), kl, e.g. l1+0.5cc")
    g.add_argument("--opt", choices=list(common.DEFAULT_LR), default="adam", help="optimiser")
    g.add_argument("--lr", type=float, default=None, help="learning rate; unset: adam 0.001, sgd 0.01, "
                   "adadelta 1.0, adagrad 0.01")
    g.add_argument("--lr-decay", choices=["none", "cosine"], default="none", help="cosine: the learning rate "
                   "falls from --lr towards 0 along a half cosine over the epochs")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="Adam betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
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
    return [common.positive(args, "depth", "c", "batch_size", "epochs", "eval_every"),
            (args.size % 2 ** (args.depth - 1) == 0, f"--size {args.size} must be a multiple of "
             f"{2 ** (args.depth - 1)} for --depth {args.depth}"),
            *common.checks(args, policy)]


# ------------------------------------------------------------------------------------------------ the model
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


# ------------------------------------------------------------------------------------------------- training
def train_epoch(model, opt, photos, maps, args, policy):
    """Algorithm 1, one pass over the shuffled training split (photos, or their cached features, and maps).
    Returns (mean loss, mean L1 on [0, 1])."""
    model.train()
    n, bs = len(maps), min(args.batch_size, len(maps))
    order, sums, steps = torch.randperm(n).to(maps.device), torch.zeros(2, device=maps.device), n // bs
    for i in common.progress(steps, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = common.augment(photos[idx], maps[idx], policy, args.diffaug_p)  # photos x, true maps y
        with torch.autocast(maps.device.type, torch.bfloat16, enabled=args.amp):
            out = model(image).float()                                           # G(x)
        loss = common.map_loss(args.loss, out, common.to_target(image, vms, args.target))  # L1 (or --loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()                                          # update the weights by the loss's gradient
        opt.step()
        l1 = (common.from_target(out.detach(), image, args.target) - vms).abs().mean() / 2  # on [0, 1]
        sums += torch.stack([loss.detach(), l1])
    train_loss, train_l1 = (sums / steps).tolist()
    return train_loss, train_l1


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

    model_args = dict(encoder=args.encoder, c=args.c, depth=args.depth, norm=args.norm, dropout=args.dropout,
                      skip=not args.no_skip, prior=args.prior, convs=args.convs, freeze=args.freeze,
                      size=args.size, photo_size=args.photo_size)
    model = common.build(make_unet, model_args, data.train_y).to(device, memory_format=torch.channels_last)
    photos = pretrained.split_inputs(model, data, args, device)  # photos, or their cached encoder features
    net = torch.compile(model) if args.compile else model  # trains and predicts; `model` holds the weights
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trained, args.opt, args.lr, args.betas, args.momentum, device)
    states = {"model": model, "optimizer": opt}  # what last.pt saves, by name
    ck = common.start_or_resume(args, out, states)
    start, best, last, seconds = ck["epoch"], ck["best"], ck["last"], ck["seconds"]
    decay = ", cosine decay" if args.lr_decay == "cosine" else ""
    print(f"exp1: {common.describe(model_args)}, {sum(p.numel() for p in trained) / 1e6:.2f} M trained "
          f"parameters, loss {args.loss}, {args.opt} lr {args.lr:g}{decay}, on {common.device_name(device)}; "
          f"run folder {out}")
    base = common.baselines(data)                             # the constant maps, printed

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            common.set_lr([(opt, args.lr)], args.lr_decay, epoch, args.epochs)
            train_loss, train_l1 = train_epoch(net, opt, photos["train"], data.train_y, args, policy)
            if not math.isfinite(train_loss):
                status = "diverged"
                print(f"epoch {epoch}: the loss became {train_loss}; the run diverged")
                break
            row, text = {"epoch": epoch, "train_loss": train_loss, "train_l1": train_l1}, ""
            if epoch % args.eval_every == 0 or epoch == args.epochs:  # choose on the selection split
                val = common.evaluate(net, photos["val"], data.val_y, args)  # and report the val split
                sel = common.evaluate(net, photos["sel"], data.sel_y, args) if args.selection else val
                row.update(sel_l1=sel["l1"], sel_cc=sel["cc"], **common.prefixed("val_", val))
                text, last = common.metrics_text(val), row
                if sel["l1"] < best["sel_l1"]:
                    best = {"epoch": epoch, **common.prefixed("sel_", sel),
                            **common.prefixed("val_", val, val)}
                    common.save_atomic({"model": common.own_state(model), "model_args": model_args,
                                        "args": vars(args), "epoch": epoch, "metrics": best,
                                        "experiment": "exp1_unet"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = common.predict(net, photos["val"][:8], args.target, args.amp, args.tta)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png",
                                 [data.val_x[:8], data.val_y[:8], pred], ["photo", "true map", "predicted"])
            dt = time.perf_counter() - t0
            seconds += dt
            common.save_last(out, states, args, epoch=epoch, best=best, last=last, seconds=seconds)
            tail = common.log_epoch(out, {**row, "seconds": dt}, epoch, args.epochs, seconds,
                                    best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  train loss {train_loss:.4f}  train L1 {train_l1:.4f}  "
                  f"{text}  {tail}", flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    train_l1, n = None, common.TRAIN_EVAL
    if best["epoch"] > 0:  # the chosen weights' L1 on (the first 256 of) the photos they were fitted to
        common.load_own_state(model, common.load_checkpoint(out / "best.pt")["model"])
        train_l1 = common.evaluate(net, photos["train"][:n], data.train_y[:n], args)["l1"]
    common.finish(out, args, build_parser, __file__, status=status, epoch=epoch, best=best, last=last,
                  seconds=seconds, baselines=base, params=sum(p.numel() for p in trained), train_l1=train_l1)


if __name__ == "__main__":
    main()
