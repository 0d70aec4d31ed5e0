"""Experiment 1: a UNet that turns a photo into its VMS map, trained with an L1 loss (the thesis' Algorithm 1).

    python exp1_unet.py                                  # the thesis' defaults (c 64, depth 5, Adam 0.001, 100 epochs)
    python exp1_unet.py --c 16 --epochs 40 --out runs/u  # a small configuration that trains on a CPU
    python exp1_unet.py --out runs/u --epochs 60 --resume  # continue (and extend) that run exactly

The file reads top to bottom: settings, the model, DiffAugment, the training loop (Algorithm 1), then plumbing
(checkpoints, evaluation, logging). It imports only common.py from this project; exp2 and exp3 carry their own
copies of what they share with it, so that each experiment reads alone. Blocks between "# >>> shared: NAME" and
"# <<< shared: NAME", and functions of the same name, are byte-identical in every file that has them (test_all.py
checks it), so `diff exp1_unet.py exp2_gan.py` shows what differs in the algorithm.
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


# ---------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 1: UNet + L1 loss predicting VMS maps (Algorithm 1).",
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
    g.add_argument("--c", type=int, default=64, help="base channels: the encoder has (3, c, 2c, 4c, 8c, 16c)")
    g.add_argument("--depth", type=int, default=5, help="levels of the UNet (resolution halves between levels)")
    g.add_argument("--norm", choices=list(NORMS), default="batch", help="normalisation after each convolution")
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
    g = p.add_argument_group("optimisation")
    # >>> shared: loss flag
    g.add_argument("--loss", type=common.loss_spec, default="l1", help="the pixel loss: terms joined by +, each with "
                   "an optional weight: l1, l2, cc (1 - Pearson per map channel), kl (KL divergence of the channels "
                   "as distributions), e.g. l1+0.5cc or kl+cc; cc and kl need --target label")
    # <<< shared: loss flag
    g.add_argument("--opt", choices=list(DEFAULT_LR), default="adam", help="optimiser")
    g.add_argument("--lr", type=float, default=None, help="learning rate; unset: adam 0.001, sgd 0.01, "
                   "adadelta 1.0, adagrad 0.01")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"), help="Adam betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("run")
    common.add_run_flags(g, __file__, RESUMABLE)
    g.add_argument("--sample-every", type=int, default=10, help="write a sample grid every N epochs (and last)")
    return p


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
def train_epoch(model, opt, data, args, policy, device):
    """Algorithm 1, one pass over the shuffled training split. Returns (mean loss, mean L1 on [0, 1])."""
    model.train()
    n, bs = len(data.train_x), min(args.batch_size, len(data.train_x))
    order, sums, steps = torch.randperm(n).to(device), torch.zeros(2, device=device), n // bs
    for i in common.progress(steps, "train", bs):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = data.train_x[idx], data.train_y[idx]       # a batch of photos and their true VMS maps
        image, vms = diff_augment(image, vms, policy, args.diffaug_p)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            out = model(to_memory_format(image, device))          # G(x)
        out = out.float()
        loss = common.map_loss(args.loss, out, to_target(image, vms, args.target))  # L1 (or --loss) to the target
        opt.zero_grad(set_to_none=True)
        loss.backward()                                           # update the weights by the gradient of the loss
        opt.step()
        l1 = (from_target(out.detach(), image, args.target) - vms).abs().mean() / 2  # [-1,1] -> [0,1] scale
        sums += torch.stack([loss.detach(), l1])
    train_loss, train_l1 = (sums / steps).tolist()
    return train_loss, train_l1


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
    device, out, data = common.setup(args, __file__, [
        (args.size % 2 ** (args.depth - 1) == 0, f"--size {args.size} must be a multiple of {2 ** (args.depth - 1)} "
         f"for --depth {args.depth}"),
        (policy is not None, f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
        (min(args.depth, args.c, args.batch_size, args.epochs) >= 1,
         "--depth, --c, --batch-size and --epochs must be at least 1"),
        (args.target == "label" or not {"cc", "kl"} & {t for _, t in common.parse_loss(args.loss)},
         f"--loss {args.loss}: cc and kl compare maps, so they need --target label")])

    model_args = dict(c=args.c, depth=args.depth, norm=args.norm, dropout=args.dropout, skip=not args.no_skip,
                      prior=args.prior)
    model = UNet(**model_args).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model  # trains and predicts; `model` holds the weights we save
    opt = make_optimizer(model.parameters(), args.opt, args.lr, args.betas, args.momentum, device)
    states = {"model": model, "optimizer": opt}  # what last.pt saves, by name
    ck = start_or_resume(args, out, states)
    start, best, seconds = ck["epoch"], ck["best"], ck["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    base = common.baseline_metrics(common.to_unit(data.train_y), common.to_unit(data.val_y))
    print(f"exp1: UNet c={args.c} depth={args.depth} norm={args.norm} skip={not args.no_skip} prior={args.prior}, "
          f"{n_params / 1e6:.2f} M parameters, loss {args.loss}, {args.opt} lr {args.lr or DEFAULT_LR[args.opt]}, "
          f"on {common.device_name(device)}; run folder {out}")
    print("baselines (val): " + " | ".join(f"{k} L1 {m['l1']:.4f} CC {m['cc']:.3f}" for k, m in base.items()))

    status, epoch = "ok", start
    try:
        for epoch in range(start + 1, args.epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_l1 = train_epoch(net, opt, data, args, policy, device)
            if not math.isfinite(train_loss):
                status = "diverged"
                print(f"epoch {epoch}: the loss became {train_loss}; the run diverged")
                break
            val = evaluate(net, data.val_x, data.val_y, args)
            if val["l1"] < best["val_l1"]:
                best = {"val_l1": val["l1"], "epoch": epoch, **{"val_" + k: v for k, v in val.items()}}
                save_atomic({"model": model.state_dict(), "model_args": model_args, "args": vars(args),
                             "epoch": epoch, "metrics": best, "experiment": "exp1_unet"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = predict(net, data.val_x[:8], args.target, args.amp, args.tta)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.val_x[:8], data.val_y[:8], pred],
                                 ["photo", "true map", "predicted"])
            dt = time.perf_counter() - t0
            seconds += dt
            save_last(out, states, args, epoch=epoch, best=best, seconds=seconds)
            row = {"epoch": epoch, "train_loss": train_loss, "train_l1": train_l1,
                   **{"val_" + k: val[k] for k in common.METRICS_ROW}, "seconds": dt}
            tail = common.log_epoch(out, row, epoch, args.epochs, seconds, best["epoch"] == epoch)
            print(f"epoch {epoch:4d}/{args.epochs}  train loss {train_loss:.4f}  train L1 {train_l1:.4f}  "
                  f"{common.metrics_text(val)}  {tail}", flush=True)
    except KeyboardInterrupt:
        common.interrupted(out, __file__)

    train_l1 = None
    if best["epoch"] > 0:
        model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"])
        train_l1 = evaluate(net, data.train_x, data.train_y, args)["l1"]
    common.finish(out, args, build_parser, __file__, status, epoch, best, seconds, base, params=n_params,
                  train_l1=train_l1)


if __name__ == "__main__":
    main()
