"""Experiment 1: a UNet that turns a photo into its VMS map, trained with an L1 loss (the thesis' Algorithm 1).

    python exp1_unet.py                                  # the thesis' defaults (c 64, depth 5, Adam 0.001, 100 epochs)
    python exp1_unet.py --c 16 --epochs 40 --out runs/u  # a small configuration that trains on a CPU
    python exp1_unet.py --out runs/u --epochs 60 --resume  # continue (and extend) that run exactly

The file reads top to bottom: settings, the model, DiffAugment, the training loop (Algorithm 1), then plumbing
(checkpoints, evaluation, logging). It imports only common.py from this project; exp2 and exp3 carry their own
copies of what they share with it, so that each experiment reads alone.
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
RESUMABLE = {"epochs", "device", "resume", "out", "compile"}  # the settings --resume may change
CHANNELS_LAST = None  # channels_last memory format: None = on CUDA only; bench.py sets True/False to measure it


# ---------------------------------------------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(description="Experiment 1: UNet + L1 loss predicting VMS maps (Algorithm 1).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="VISCHEMA PLUS folder; unset: $VISCHEMA_DIR, else "
                   "./data/VISCHEMA_PLUS, else the built-in synthetic set (announced on the first line)")
    g.add_argument("--size", type=int, default=64, help="side of the square images and maps, in pixels")
    g.add_argument("--target", choices=["label", "sum"], default="label", help="label: predict the map; sum: "
                   "predict (image + map) / 2 and recover the map from it (the thesis' second formulation)")
    g.add_argument("--diffaug", default="translation,cutout", help="DiffAugment policies, comma-separated "
                   "(translation, cutout), applied identically to each photo and its map; 'none' disables")
    g.add_argument("--diffaug-p", type=float, default=0.9, help="probability of each policy per sample")
    g = p.add_argument_group("model")
    g.add_argument("--c", type=int, default=64, help="base channels: the encoder has (3, c, 2c, 4c, 8c, 16c)")
    g.add_argument("--depth", type=int, default=5, help="levels of the UNet (resolution halves between levels)")
    g.add_argument("--norm", choices=list(NORMS), default="batch", help="normalisation after each convolution")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability in the decoder blocks")
    g.add_argument("--no-skip", action="store_true", help="drop the skip connections (the thesis' planned "
                   "'benefits of residual connections' ablation)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", choices=["l1", "l2"], default="l1", help="pixel loss between prediction and target")
    g.add_argument("--opt", choices=list(DEFAULT_LR), default="adam", help="optimiser")
    g.add_argument("--lr", type=float, default=None, help="learning rate; unset: adam 0.001, sgd 0.01, "
                   "adadelta 1.0, adagrad 0.01")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"), help="Adam betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds every random number generator")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (for CUDA, or a CPU with AMX bf16 units)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model: faster steps on CUDA after a "
                   "minute of compiling; the same weights and checkpoints")
    g.add_argument("--out", default=None, help="run folder (default: runs/exp1-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt with its "
                   "saved settings; only --epochs (to extend it) and --device may change")
    g.add_argument("--sample-every", type=int, default=10, help="write a sample grid every N epochs (and last)")
    return p


# ---------------------------------------------------------------------------------------------------- the model
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


class Block(nn.Sequential):
    """Two 3x3 convolutions, each followed by norm and ReLU: N x cin x H x W -> N x cout x H x W."""

    def __init__(self, cin, cout, norm, dropout=0.0):
        bias = norm == "none"  # a norm layer's shift makes the convolution's bias redundant
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True),
                         *([nn.Dropout2d(dropout)] if dropout > 0 else []),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=bias), NORMS[norm](cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """N x 3 x S x S photo in [-1, 1] -> N x 3 x S x S map in [-1, 1] (tanh).

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


# ---------------------------------------------------------------------------------------------------- DiffAugment
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


AUGMENTS = {"translation": translation, "cutout": cutout}


def diff_augment(image, vms, policy, p):
    """The same random transform for each photo and its map: N x 3 x S x S each, returned as a pair."""
    x = torch.cat([image, vms], 1)
    for name in policy:
        x = AUGMENTS[name](x, p)
    return x[:, :3], x[:, 3:]


def to_target(image, vms, target):
    """What the network learns to output: the map itself, or (image + map) / 2 for --target sum."""
    return vms if target == "label" else (image + vms) / 2


def from_target(out, image, target):
    """The map recovered from the network's output (metrics are always on the map)."""
    return out if target == "label" else (2 * out - image).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------- training
def train_epoch(model, opt, data, args, policy, device):
    """Algorithm 1, one pass over the shuffled training split. Returns (mean loss, mean L1 on [0, 1])."""
    model.train()
    n, bs = len(data.train_x), min(args.batch_size, len(data.train_x))
    order = torch.randperm(n).to(device)
    loss_sum, l1_sum, steps = torch.zeros((), device=device), torch.zeros((), device=device), n // bs
    for i in range(steps):
        idx = order[i * bs:(i + 1) * bs]
        image, vms = data.train_x[idx], data.train_y[idx]       # a batch of photos and their true VMS maps
        image, vms = diff_augment(image, vms, policy, args.diffaug_p)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            out = model(to_memory_format(image, device))          # G(x)
        out = out.float()
        target = to_target(image, vms, args.target)
        loss = F.l1_loss(out, target) if args.loss == "l1" else F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()                                           # update the weights by the gradient of the loss
        opt.step()
        loss_sum += loss.detach()
        l1_sum += (from_target(out.detach(), image, args.target) - vms).abs().mean() / 2  # [-1,1] -> [0,1] scale
    return (loss_sum / steps).item(), (l1_sum / steps).item()


@torch.no_grad()
def predict(model, images, target, amp=False, batch=256):
    """Maps in [-1, 1] for N x 3 x S x S photos, in eval mode (batch-norm running statistics, no dropout)."""
    model.eval()
    outs = []
    for x in images.split(batch):
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            out = model(to_memory_format(x, x.device)).float()
        outs.append(from_target(out, x, target))
    return torch.cat(outs)


def load_predictor(run_dir, device="cpu"):
    """(predict_fn, args) from a run folder's best.pt; predict_fn: N x 3 x S x S photos -> maps, both in [-1, 1]."""
    ck = torch.load(Path(run_dir) / "best.pt", map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ck["args"])
    model = UNet(args.c, args.depth, args.norm, args.dropout, skip=not args.no_skip).to(device)
    model.load_state_dict(ck["model"])
    return (lambda images: predict(model, images.to(device), args.target, args.amp)), args


def evaluate(model, images, maps, args):
    return common.map_metrics(common.to_unit(predict(model, images, args.target, args.amp)), common.to_unit(maps))


# ---------------------------------------------------------------------------------------------------- plumbing
def channels_last(device):
    return device.type == "cuda" if CHANNELS_LAST is None else CHANNELS_LAST


def to_memory_format(x, device):
    return x.contiguous(memory_format=torch.channels_last) if channels_last(device) else x


def make_optimizer(params, args):
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.opt]
    if args.opt == "adam":  # fused: one kernel for the whole update on CUDA
        return torch.optim.Adam(params, lr=lr, betas=tuple(args.betas), fused=args.device == "cuda" or None)
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum)
    return {"adadelta": torch.optim.Adadelta, "adagrad": torch.optim.Adagrad}[args.opt](params, lr=lr)


def save_atomic(obj, path):
    """Write to a temporary file and rename: a kill at any moment leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    checks = [(args.size % 2 ** (args.depth - 1) == 0, f"--size {args.size} must be a multiple of "
               f"{2 ** (args.depth - 1)} for --depth {args.depth}"),
              (all(s in AUGMENTS for s in policy), f"--diffaug {args.diffaug}: policies are {', '.join(AUGMENTS)}"),
              (min(args.depth, args.c, args.batch_size, args.epochs) >= 1,
               "--depth, --c, --batch-size and --epochs must be at least 1")]
    for ok, message in checks:
        if not ok:
            common.fail(message)
    device = common.pick_device(args.device)
    args.device = device.type
    out = Path(args.out or time.strftime("runs/exp1-%Y%m%d-%H%M%S"))
    if (out / "last.pt").exists() and not args.resume:
        common.fail(f"{out} already holds a run; add --resume to continue it or choose another --out")
    try:
        data = common.load_data(args.data, args.size, device)
    except common.DataError as e:
        common.fail(str(e))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = UNet(args.c, args.depth, args.norm, args.dropout, skip=not args.no_skip).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model  # trains and predicts; `model` holds the weights we save
    opt = make_optimizer(model.parameters(), args)
    start, best, seconds, kept = 0, {"val_l1": math.inf, "epoch": 0}, 0.0, []
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "last.pt").exists():
        ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        start, best, seconds = ck["epoch"], ck["best"], ck["seconds"]
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        kept = [ln + "\n" for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= start]  # not after last.pt
        print(f"resume: {out} from epoch {start} (best val L1 {best['val_l1']:.4f} at epoch {best['epoch']})")
    (out / "metrics.jsonl").write_text("".join(kept))
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    base = common.baseline_metrics(common.to_unit(data.train_y), common.to_unit(data.val_y))
    print(f"exp1: UNet c={args.c} depth={args.depth} norm={args.norm} skip={not args.no_skip}, "
          f"{n_params / 1e6:.2f} M parameters, {args.opt} lr {args.lr or DEFAULT_LR[args.opt]}, on {device}; "
          f"run folder {out}")
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
            dt = time.perf_counter() - t0
            seconds += dt
            row = {"epoch": epoch, "train_loss": train_loss, "train_l1": train_l1, "val_l1": val["l1"],
                   "val_cc": val["cc"], "seconds": dt}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if val["l1"] < best["val_l1"]:
                best = {"val_l1": val["l1"], "epoch": epoch, **{"val_" + k: v for k, v in val.items()}}
                save_atomic({"model": model.state_dict(), "args": vars(args), "epoch": epoch, "metrics": best,
                             "experiment": "exp1_unet"}, out / "best.pt")
            if epoch % args.sample_every == 0 or epoch == args.epochs:
                pred = predict(net, data.val_x[:8], args.target, args.amp)
                common.save_grid(out / "samples" / f"epoch{epoch:04d}.png", [data.val_x[:8], data.val_y[:8], pred])
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "best": best,
                         "rng": rng_state(), "args": vars(args), "seconds": seconds}, out / "last.pt")
            eta = (args.epochs - epoch) * seconds / epoch  # seconds: all epochs so far, resumed ones too
            print(f"epoch {epoch:4d}/{args.epochs}  train loss {train_loss:.4f}  train L1 {train_l1:.4f}  "
                  f"val L1 {val['l1']:.4f}  val CC {val['cc']:.3f}  {dt:.1f} s/epoch  ETA {eta / 60:.1f} min"
                  + ("  *best" if best["epoch"] == epoch else ""), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python exp1_unet.py --out {out} --resume")
        sys.exit(130)

    final = {"experiment": "exp1_unet", "command": command_line(args),
             "status": status, "epoch": epoch, "best_epoch": best["epoch"],
             "seconds": seconds, "params": n_params, "data": data.source,
             "val_l1": None, "val_l1_green": None, "val_l1_red": None, "val_cc": None, "val_cc20": None}
    if best["epoch"] > 0:
        model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"])
        final.update({k: v for k, v in best.items() if k.startswith("val_")})
        final["train_l1"] = evaluate(net, data.train_x, data.train_y, args)["l1"]
    final["baselines"] = base
    (out / "final.json").write_text(json.dumps(final, indent=1))
    if status != "ok":
        sys.exit(3)
    print(f"done: best val L1 {final['val_l1']:.4f} (median map {base['median']['l1']:.4f}), val CC "
          f"{final['val_cc']:.3f} (mean map {base['mean']['cc']:.3f}) at epoch {best['epoch']}; "
          f"train L1 {final['train_l1']:.4f}; {seconds / 60:.1f} min; {out}/final.json")


if __name__ == "__main__":
    main()
