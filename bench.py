"""How fast is it? Data loading, training and inference of the three experiments, and their networks against their
peers, each measured side by side in one process.

    python bench.py --quick                                   # CPU, small models (c 16): a few minutes
    python bench.py --device cuda --json runs/bench.json      # the thesis' sizes (c 64) on a GPU
    python bench.py --peers --json runs/peers.json            # our networks against pix2pix's and diffusers' (1 thread)
    python bench.py --gpu-check                               # on a CUDA machine: the whole GPU check, < 10 minutes

Every comparison is measured in this one process: the variants run in turn (A B C A B C ...) for --repeats rounds
after a warm-up call each; a ratio is the median over the rounds of the ratio within a round, an absolute figure the
best round. Compare ratios, never absolute times taken in different processes or on a machine shared with other work.
Training and inference run on random tensors of the data's shape; the data timings need the real dataset.

What it reports (printed, and with --json written; keys in brackets):
  device and hardware: the CPU model and its flags (avx2, avx512f, avx512_bf16, amx) or the GPU, torch, threads.
  data: [decode_s] decode and resize every JPEG; [cached_load_s] the same from the cache; [cache_speedup];
      [trial_startup_s] a new process importing an experiment and loading the cache (a sweep trial's overhead).
  exp1, exp2, exp3: [train_img_s] training images per second through the experiment's own train_epoch and optimiser;
      [infer_ms] ms per map, batched as the experiment predicts; exp1 also [infer_ms_batch16] and [infer_ms_batch256]
      (photos per forward pass); exp3: infer_ms is [sample_ms_ddim] (DDIM at its default steps), [sample_ms_ddpm]
      (ancestral over all T) and [ddpm_over_ddim] on the same photos, [sample_ms_k4_ddim5_batch32] and [..._batch512]
      (ms per photo of 4 samples x DDIM-5 with 32 or 512 maps per forward pass).
  The speed options, each the speed with the option over the speed without it (above 1: the option is faster):
      [amp_train_ratio] [amp_infer_ratio] bf16 autocast (--amp) against float32; on a CPU without bf16 units (no
          AVX-512 BF16 or AMX) it is not run ("amp": {"skipped": why}): it is many times slower there;
      [channels_last_train_ratio] [channels_last_infer_ratio] the channels_last memory format, which the experiments
          use on every device, against the contiguous (NCHW) format;
      [compile_train_ratio] [compile_infer_ratio] torch.compile (--compile) against eager, [compile_s] the seconds
          compiling adds to the first training epoch and inference pass, [epoch_s] the estimated seconds of one epoch
          of the study's split (1152 training photos, and the maps evaluated per epoch), [compile_pays_after_epochs]
          compile_s over the seconds compiling saves per such epoch (null: it saves nothing). compile_s is a cold
          compile only where the inductor cache ($TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_<user>) does not
          hold these graphs yet; from the cache it takes seconds.
  encoder: exp1's recommended network (EfficientNet-Lite0 frozen, photos 6x the map's side), needs the lite0 extra:
      [step_ms_from_photos] [step_ms_from_features] one training step (batch 16) with the encoder run on the photos
      and from their cached features, [features_speedup] their ratio, [features_ms_per_photo] the features of one
      photo and its mirror image (computed once per photo and cached), [epoch_s_from_photos]
      [epoch_s_from_features] one epoch of the study's split each way, [infer_ms] ms per map from the photo, batched
      as the experiments predict on this device, and [infer_ms_batch16] with 16 photos per pass.
  --peers: each network against its peers at (about) equal parameters, in one thread on a CPU: [params], [gflops]
      (forward pass per image, as torch.utils.flop_counter counts it: convolutions and matrix products, a multiply-add
      = 2), [train_img_s] (forward, backward and Adam step, batch 16), [infer_ms] (ms per map, batch 16, eval mode, no
      grad; for exp3 one denoising step), [train_ratio] [infer_ratio] (speed over the first row of its group's).
  --gpu-check: [steps] the test suite's CUDA test, one epoch of each experiment (and the user's example command),
      this benchmark on CUDA; each with [status], [seconds] and [result].
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import exp1_unet
import exp2_gan
import exp3_diffusion
import pretrained
import vischema

HERE = Path(__file__).resolve().parent
PARTS = ("data", "exp1", "exp2", "exp3", "encoder")
STUDY_TRAIN = 1152  # photos an epoch of the study's split trains on: 1280 less the 10% selection split
EVAL_MAPS = {"exp1": 448, "exp2": 448, "exp3": 512 / 5}  # maps predicted per epoch: selection + val split every epoch;
# exp3 samples selection, val and 64 training photos every 5 epochs (--eval-every 5)
NO_BF16 = ("this CPU has no bf16 units (AVX-512 BF16 or AMX), where bf16 autocast runs many times slower than float32; "
           "the experiments turn --amp off here")
GPU_CHECK_SECONDS = 540  # --gpu-check's budget: a step starts only inside it, so that all ends within 10 minutes


# ---------------------------------------------------------------------------------------------------- settings
def parts(text):
    """argparse type for --only: "exp1,exp3" -> ["exp1", "exp3"]."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or not set(names) <= set(PARTS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(PARTS)}, comma-separated")
    return names


def build_parser():
    p = common.ArgumentParser("Time data loading, training and inference of the three experiments, the speed options "
                              "(bf16 autocast, channels_last, torch.compile) as ratios, and the networks against "
                              "their peers, side by side in one process.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--size", type=int, default=64, help="image and map side in pixels (a multiple of 16, at least 32)")
    p.add_argument("--quick", action="store_true", help="small models (c 16), fewer images and rounds: a few minutes "
                   "on one CPU thread; with --peers: only the c 16 networks")
    p.add_argument("--only", type=parts, default=",".join(PARTS), metavar="PARTS", help="what to time, comma-separated "
                   f"from {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=None, help="rounds of each interleaved timing (a ratio is the median "
                   "round's); unset: 3 with --quick, 5 without")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); unset: torch's "
                   "default ($OMP_NUM_THREADS, else every core), and 1 with --peers")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder (as the experiments: unset: $VISCHEMA_DIR, then "
                   "./data/VISCHEMA_PLUS); without it the data timings are skipped")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison (minutes of "
                   "compiling on a CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (with --gpu-check: unset "
                   "means runs/gpu-check.json)")
    p.epilog = ("Speed ratios are the speed with an option over the speed without it (above 1: the option is faster): "
                "amp = bf16 autocast against float32 (not run on a CPU without bf16 units); channels_last = the "
                "channels_last memory format, which the experiments use, against contiguous; compile = torch.compile "
                "against eager. Every ratio is measured in this one process, the variants interleaved.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--peers", action="store_true", help="instead: each experiment's network against its peers "
                      "at equal parameters (pix2pix's UnetGenerator and NLayerDiscriminator, diffusers' UNet2DModel; "
                      "exp1's UNet with one convolution per block), a markdown table of params, FLOPs and speed")
    mode.add_argument("--gpu-check", action="store_true", help="instead: the whole GPU check on a CUDA machine in "
                      "under 10 minutes (test_all.py cuda, one epoch of each experiment and of the user's command "
                      "exp2_gan.py --g-opt sgd --c 32, this benchmark on CUDA); a summary table and JSON")
    return p


# ---------------------------------------------------------------------------------------------------- timing
def seconds(fn, device):
    """Seconds one call of fn() takes, with CUDA synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def rounds(fns, device, repeats, failed=None):
    """Interleaved timings of name -> callable: a warm-up call of each, then `repeats` rounds that call each in turn
    (A B C A B C ...). Returns (name -> warm-up seconds, name -> seconds in each round). With `failed` (a dict), a
    callable whose warm-up raises is dropped and failed[name] says why."""
    warm = {}
    for name, fn in list(fns.items()):
        try:
            warm[name] = seconds(fn, device)
        except Exception as e:  # noqa: BLE001  (torch.compile without a working compiler, ...)
            if failed is None:
                raise
            failed[name] = why(e)
    times = {name: [] for name in warm}
    for _ in range(repeats):
        for name in warm:
            times[name].append(seconds(fns[name], device))
    return warm, times


def why(e):
    """An exception in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def n_rounds(args):
    """--repeats, or its default: 3 with --quick, 5 without."""
    return args.repeats or (3 if args.quick else 5)


def ratio(off, on):
    """The speed with an option over the speed without it: the median over rounds of time off / time on."""
    return statistics.median(a / b for a, b in zip(off, on))


def n_params(model):
    """A network's parameter count."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- hardware
def hardware(device):
    """What the figures come from: the GPU, or the CPU's model, family and flags from /proc/cpuinfo."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"kind": "cuda", "gpu": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2 ** 30), "cuda": torch.version.cuda}
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: (re.findall(rf"^{key}\s*:\s*(.*)$", info, re.M) or [""])[0].strip()  # noqa: E731
    flags = set(field("flags").split())
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"kind": "cpu", "model": field("model name") or "unknown CPU", "family": field("cpu family"),
            "cpu_model": field("model"), "flags": {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                                                   "avx512_bf16": "avx512_bf16" in flags,
                                                   "amx": bool({"amx_bf16", "amx_tile"} & flags)},
            "bf16_units": common.cpu_bf16(), "torch_capability": capability, "cores": os.cpu_count()}


def describe_hardware(hw, threads):
    """"CPU: AMD EPYC (family 26; avx2 avx512f avx512_bf16, no amx), 1 thread" or "cuda: NVIDIA H100 ..."."""
    if hw["kind"] == "cuda":
        return f"cuda: {hw['gpu']} (compute capability {hw['capability']}, {hw['memory_gib']} GiB)"
    have = " ".join(k for k, v in hw["flags"].items() if v) or "none of avx2, avx512f, avx512_bf16, amx"
    lacking = ", no " + " ".join(k for k, v in hw["flags"].items() if not v) if not all(hw["flags"].values()) else ""
    family = f"family {hw['family']}; " if hw["family"] else ""
    return f"CPU: {hw['model']} ({family}{have}{lacking}), {threads} thread{'s' * (threads > 1)}"


# ---------------------------------------------------------------------------------------------------- data
def bench_data(args):
    """The data timings (their prints silenced), or {"skipped": why} without VISCHEMA PLUS."""
    try:
        root, reason = vischema.resolve_data(args.data)
    except vischema.DataError as e:
        return {"skipped": str(e)}
    if root is None or root == vischema.SYNTHETIC:
        return {"skipped": f"no VISCHEMA PLUS ({reason or '--data synthetic'})"}
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        vischema.load_data(root, args.size, refresh=True)   # decodes (PIL, in threads) and rewrites the cache
        decode_s = time.perf_counter() - t0
        cached = [seconds(lambda: vischema.load_data(root, args.size), torch.device("cpu")) for _ in range(3)]
    code = f"import exp1_unet, vischema; vischema.load_data({str(root)!r}, {args.size})"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    startup = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, check=True, capture_output=True)
        startup.append(time.perf_counter() - t0)
    return {"decode_s": decode_s, "cached_load_s": min(cached), "cache_speedup": decode_s / min(cached),
            "trial_startup_s": min(startup)}


# ---------------------------------------------------------------------------------------------------- experiments
def workload(quick, device):
    """How many images each timing uses: train (the fake training split), val (photos per inference pass), ddim and
    ddpm (exp3's photos for DDIM and for ancestral sampling: T network calls), k4 (exp3's 4 x DDIM-5 photos)."""
    if quick:
        return {"train": 64, "val": 256, "ddim": 8, "ddpm": 2, "k4": 32}
    if device.type == "cuda":
        return {"train": 512, "val": 1024, "ddim": 256, "ddpm": 64, "k4": 128}
    return {"train": 128, "val": 256, "ddim": 16, "ddpm": 2, "k4": 128}


def fake_data(n_train, n_val, size, device):
    """Random photos and maps in [-1, 1] in the VMSData format: speed does not depend on the pixels."""
    g = torch.Generator().manual_seed(0)
    make = lambda n: torch.rand(n, 3, size, size, generator=g).mul(2).sub(1).to(device)  # noqa: E731
    tx, ty, vx, vy = make(n_train), make(n_train), make(n_val), make(n_val)
    return vischema.VMSData(tx, ty, vx, vy, vx, vy, [], [], [], {}, "benchmark")


def exp_args(module, flags, size, device, amp=False):
    """The experiment's own settings for `flags`, resolved as its main resolves them, with --amp on or off."""
    args = common.resolve(module.build_parser().parse_args([*flags, "--size", str(size)]))
    args.device, args.amp = device.type, amp
    return args


def unet_of(module, a, norm):
    """The experiment's photo-to-map network for its settings a (make_unet as its main calls it, scratch)."""
    return module.make_unet(c=a.c, depth=a.depth, norm=norm, dropout=a.dropout, skip=not a.no_skip, prior=a.prior,
                            convs=a.convs)


def place(model, device, variant):
    """A network on the device in the experiments' memory format (channels_last), or contiguous for that variant."""
    return model.to(device, memory_format=torch.contiguous_format if variant == "contiguous" else torch.channels_last)


def variants_for(args, device):
    """(variants to time, name -> why a variant is not timed)."""
    skipped = {}
    if device.type == "cpu" and not common.cpu_bf16():
        skipped["amp"] = NO_BF16
    if args.no_compile:
        skipped["compile"] = "--no-compile"
    return [v for v in ("plain", "amp", "contiguous", "compile") if v not in skipped], skipped


def trained(variants, build, device, repeats, skipped):
    """Interleaved training and inference rounds of every variant: build(variant) -> (train one epoch, one inference
    pass). Returns (warm-up seconds, seconds per round) for "train" and "infer"; a variant that fails to run is
    dropped and `skipped` says why."""
    fns, failed = {}, {}
    for v in variants:
        try:
            fns[v] = build(v)
        except Exception as e:  # noqa: BLE001  (torch.compile where dynamo does not run, ...)
            failed[v] = why(e)
    train = rounds({v: f[0] for v, f in fns.items()}, device, repeats, failed)
    infer = rounds({v: f[1] for v, f in fns.items() if v not in failed}, device, repeats, failed)
    for v, reason in failed.items():
        skipped[v] = f"failed: {reason}"
        for timings in (*train, *infer):
            timings.pop(v, None)
    return {"train": train, "infer": infer}


def figures(name, timed, skipped, n_train, n_infer):
    """An experiment's figures from its rounds: speeds of the plain configuration, each option as a ratio."""
    (warm_t, train), (warm_i, infer) = timed["train"], timed["infer"]
    out = {"train_img_s": n_train / min(train["plain"]), "infer_ms": 1000 * min(infer["plain"]) / n_infer}
    epoch = lambda v: STUDY_TRAIN / n_train * min(train[v]) + EVAL_MAPS[name] / n_infer * min(infer[v])  # noqa: E731
    out["epoch_s"] = epoch("plain")
    for option, (off, on) in {"amp": ("plain", "amp"), "channels_last": ("contiguous", "plain"),
                              "compile": ("plain", "compile")}.items():
        if off in train and on in train:
            out[f"{option}_train_ratio"] = ratio(train[off], train[on])
            out[f"{option}_infer_ratio"] = ratio(infer[off], infer[on])
    if "compile" in train:  # the warm-up's extra seconds over the best round, less those of the eager warm-up
        extra = lambda v: warm_t[v] - min(train[v]) + warm_i[v] - min(infer[v])  # noqa: E731
        out["compile_s"] = max(0.0, extra("compile") - extra("plain"))
        saved = epoch("plain") - epoch("compile")
        out["compile_pays_after_epochs"] = out["compile_s"] / saved if saved > 0 else None
    for option, why in skipped.items():
        out[option if option in ("amp", "compile") else f"{option}_variant"] = {"skipped": why}
    return out


def bench_exp1(args, device, variants, skipped=None):
    """exp1's figures: training through exp1_unet.train_epoch, inference through common.predict."""
    n, skipped = workload(args.quick, device), {} if skipped is None else skipped
    flags = ["--c", "16"] if args.quick else []
    data = fake_data(n["train"], n["val"], args.size, device)
    a0 = exp_args(exp1_unet, flags, args.size, device)
    policy = common.augment_policy(a0.diffaug)
    models = {}

    def build(variant):
        a = exp_args(exp1_unet, flags, args.size, device, amp=variant == "amp")
        torch.manual_seed(0)
        model = place(unet_of(exp1_unet, a, a.norm), device, variant)
        net = models[variant] = torch.compile(model) if variant == "compile" else model
        opt = exp1_unet.make_optimizer([p for p in model.parameters() if p.requires_grad], a.opt, a.lr, a.betas,
                                       a.momentum, device)
        return (lambda: exp1_unet.train_epoch(net, opt, data.train_x, data.train_y, a, policy),
                lambda: common.predict(net, data.val_x, a.target, a.amp))

    out = figures("exp1", trained(variants, build, device, n_rounds(args), skipped), skipped, n["train"], n["val"])
    net = models["plain"]                   # photos per forward pass: the CPU default 16 against the CUDA default 256
    _, times = rounds({b: lambda b=b: common.predict(net, data.val_x, a0.target, batch=b) for b in (16, 256)},
                      device, n_rounds(args))
    out.update({f"infer_ms_batch{b}": 1000 * min(t) / n["val"] for b, t in times.items()})
    config = f"c {a0.c}, depth {a0.depth}, {a0.norm} norm, {a0.opt}, batch {a0.batch_size}, {args.size} px"
    return {"config": config, "params": n_params(net), **out}


def bench_exp2(args, device, variants, skipped=None):
    """exp2's figures: training through exp2_gan.train_epoch (generator and discriminator), inference of the
    generator through common.predict."""
    n, skipped = workload(args.quick, device), {} if skipped is None else skipped
    flags = ["--c", "16", "--d-c", "16"] if args.quick else []
    data = fake_data(n["train"], n["val"], args.size, device)
    a0 = exp_args(exp2_gan, flags, args.size, device)
    policy = common.augment_policy(a0.diffaug)
    params = {}

    def build(variant):
        a = exp_args(exp2_gan, flags, args.size, device, amp=variant == "amp")
        torch.manual_seed(0)
        G = place(unet_of(exp2_gan, a, a.g_norm), device, variant)
        D = place(exp2_gan.Discriminator(a.d_c, a.d_depth, a.d_norm, a.disc, a.size), device, variant)
        params.update(G=n_params(G), D=n_params(D))
        opt_g = exp2_gan.make_optimizer([p for p in G.parameters() if p.requires_grad], a.g_opt, a.g_lr, a.g_betas,
                                        a.momentum, device)
        opt_d = exp2_gan.make_optimizer(D.parameters(), a.d_opt, a.d_lr, a.d_betas, a.momentum, device)
        if variant == "compile":            # as exp2's main: the critic of WGAN-GP stays eager (double backward)
            G, D = torch.compile(G), D if a.gan_loss == "wgan-gp" else torch.compile(D)
        return (lambda: exp2_gan.train_epoch(G, D, opt_g, opt_d, data.train_x, data, a, policy),
                lambda: common.predict(G, data.val_x, a.target, a.amp))

    out = figures("exp2", trained(variants, build, device, n_rounds(args), skipped), skipped, n["train"], n["val"])
    config = (f"generator c {a0.c} ({a0.g_opt}), {a0.disc} discriminator d-c {a0.d_c} ({a0.d_opt}), {a0.gan_loss}, "
              f"batch {a0.batch_size}, {args.size} px")
    return {"config": config, "params": params["G"], "d_params": params["D"], **out}


def bench_exp3(args, device, variants, skipped=None):
    """exp3's figures: training through exp3_diffusion.train_epoch (with its EMA), sampling through
    exp3_diffusion.sample."""
    n, skipped = workload(args.quick, device), {} if skipped is None else skipped
    flags = ["--c", "16"] if args.quick else []
    data = fake_data(n["train"], max(n["ddim"], n["ddpm"], n["k4"]), args.size, device)
    a0 = exp_args(exp3_diffusion, flags, args.size, device)
    policy, diffusion = common.augment_policy(a0.diffaug), exp3_diffusion.diffusion_of(a0)
    photos, models = data.val_x[:n["ddim"]], {}

    def build(variant):
        a = exp_args(exp3_diffusion, flags, args.size, device, amp=variant == "amp")
        torch.manual_seed(0)
        model = place(exp3_diffusion.UNet(a.c, a.norm, a.attn), device, variant)
        ema = copy.deepcopy(model).requires_grad_(False)
        net = models[variant] = torch.compile(model) if variant == "compile" else model
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=tuple(a.betas),
                               fused=device.type == "cuda" or None)      # as exp3's main builds it
        step = [0]

        def train():
            _, step[0] = exp3_diffusion.train_epoch(net, ema, opt, data.train_x, data.train_y, diffusion, a, policy,
                                                    step[0])
        return train, lambda: exp3_diffusion.sample(net, photos, diffusion, a.sample_steps, amp=a.amp)

    out = figures("exp3", trained(variants, build, device, n_rounds(args), skipped), skipped, n["train"], n["ddim"])
    net = models["plain"]
    out["sample_ms_ddim"] = out["infer_ms"]
    few = data.val_x[:n["ddpm"]]            # ancestral over all T against DDIM on the same photos, once each
    ddim = seconds(lambda: exp3_diffusion.sample(net, few, diffusion, a0.sample_steps), device)
    ddpm = seconds(lambda: exp3_diffusion.sample(net, few, diffusion, 0), device)
    out.update(sample_ms_ddpm=1000 * ddpm / len(few), ddpm_over_ddim=ddpm / ddim)
    many = data.val_x[:n["k4"]]             # 4 samples x DDIM-5 per photo, 32 and 512 maps per forward pass
    _, times = rounds({b: lambda b=b: exp3_diffusion.sample(net, many, diffusion, 5, samples=4, batch=b)
                       for b in (32, 512)}, device, n_rounds(args))
    out.update({f"sample_ms_k4_ddim5_batch{b}": 1000 * min(t) / len(many) for b, t in times.items()})
    config = (f"c {a0.c}, {a0.norm} norm, objective {a0.objective}, {a0.schedule} T {a0.T}, DDIM-{a0.sample_steps} "
              f"on {len(photos)} photos, ancestral on {len(few)}, 4 x DDIM-5 on {len(many)}, batch {a0.batch_size}, "
              f"{args.size} px")
    return {"config": config, "params": n_params(net), **out}


def bench_encoder(args, device, variants=None, skipped=None):
    """exp1's recommended network on the Lite0 encoder: a training step from the photos (the frozen encoder runs
    every step) against one from the cached features, the features' one-off cost, and inference from the photo.
    {"skipped": why} without the extra."""
    if not pretrained.available("lite0"):
        return {"skipped": f"no EfficientNet-Lite0 weights: {pretrained.EXTRAS['lite0']}"}
    photo, n = 6 * args.size, 16                                      # 384-px photos for 64-px maps
    a = exp_args(exp1_unet, ["--encoder", "lite0", "--photo-size", str(photo)], args.size, device)
    torch.manual_seed(0)
    model = place(exp1_unet.make_unet("lite0", norm=a.norm, size=args.size, photo_size=photo), device, "plain")
    opt = exp1_unet.make_optimizer([p for p in model.parameters() if p.requires_grad], a.opt, a.lr, a.betas,
                                   a.momentum, device)
    g = torch.Generator().manual_seed(0)
    photos = torch.rand(n, 3, photo, photo, generator=g).mul(2).sub(1).to(device)
    maps = torch.rand(n, 3, args.size, args.size, generator=g).mul(2).sub(1).to(device)
    features = pretrained.encode(model.encoder, model.cached, photos).to(device)  # encode() returns them on the CPU

    def step(x):
        model.train()
        loss = (model(x) - maps).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    encode = lambda: pretrained.encode(model.encoder, model.cached, photos)  # noqa: E731
    _, times = rounds({"photos": lambda: step(photos), "features": lambda: step(features), "encode": encode},
                      device, n_rounds(args))
    _, infer = rounds({b: lambda b=b: common.predict(model, photos, a.target, batch=b)
                       for b in (None, 16)}, device, n_rounds(args))
    steps = STUDY_TRAIN / n
    out = {"config": f"lite0 frozen, photo {photo} px, batch {n}, {args.size}-px maps",
           "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "step_ms_from_photos": 1000 * min(times["photos"]), "step_ms_from_features": 1000 * min(times["features"]),
           "features_speedup": ratio(times["photos"], times["features"]),
           "features_ms_per_photo": 1000 * min(times["encode"]) / n,
           "infer_ms": 1000 * min(infer[None]) / n, "infer_ms_batch16": 1000 * min(infer[16]) / n}
    out["epoch_s_from_photos"] = steps * out["step_ms_from_photos"] / 1000
    out["epoch_s_from_features"] = steps * out["step_ms_from_features"] / 1000
    return out


def encoder_line(m):
    """The printed line of the encoder part."""
    if "skipped" in m:
        return f"encoder: skipped ({m['skipped']})"
    return (f"encoder ({m['config']}): training step {m['step_ms_from_photos']:.0f} ms from the photos, "
            f"{m['step_ms_from_features']:.0f} ms from the cached features ({m['features_speedup']:.1f}x; an epoch "
            f"{m['epoch_s_from_photos']:.0f} s against {m['epoch_s_from_features']:.0f} s); the features "
            f"{m['features_ms_per_photo']:.0f} ms per photo and mirror, once; {m['infer_ms']:.1f} ms per map from "
            f"the photo ({m['infer_ms_batch16']:.1f} with 16 photos per pass)")


def part_summary(name, m):
    """A few words on one part's result, for --gpu-check's table."""
    if "skipped" in m:
        return f"{name} skipped"
    if "failed" in m:
        return f"{name} failed: {m['failed']}"
    if name == "data":
        return f"data: the cached load {m['cached_load_s']:.2f} s"
    if name == "encoder":
        return f"encoder {m['step_ms_from_features']:.0f} ms per step, {m['infer_ms']:.2f} ms per map"
    return f"{name} {m['train_img_s']:.0f} img/s, {m['infer_ms']:.2f} ms per map"


def exp_line(name, m):
    """One printed line per experiment."""
    def option(key):
        if isinstance(m.get(key), dict):
            return f"{key} skipped"
        if f"{key}_train_ratio" not in m:
            return f"{key} —"
        return f"{key} {m[f'{key}_train_ratio']:.2f}x / {m[f'{key}_infer_ratio']:.2f}x"
    extra = ""
    if name == "exp1":
        extra = f" (batch 16: {m['infer_ms_batch16']:.2f}, 256: {m['infer_ms_batch256']:.2f})"
    if name == "exp3":
        extra = (f" DDIM; ancestral {m['sample_ms_ddpm']:.0f} ms ({m['ddpm_over_ddim']:.0f}x); 4 x DDIM-5 "
                 f"{m['sample_ms_k4_ddim5_batch32']:.1f} / {m['sample_ms_k4_ddim5_batch512']:.1f} ms per photo at 32 / "
                 "512 maps per pass")
    pays = ""
    if "compile_s" in m:
        epochs = m["compile_pays_after_epochs"]
        pays = f"; compiling {m['compile_s']:.0f} s " + ("never pays" if epochs is None else
                                                         f"pays after {epochs:.1f} epochs")
    return (f"{name} ({m['config']}): {m['train_img_s']:.1f} img/s training, {m['infer_ms']:.2f} ms per map{extra}; "
            f"speed ratios training / inference: {option('amp')}, {option('channels_last')}, "
            f"{option('compile')}{pays}")


# ---------------------------------------------------------------------------------------------------- peers
# The peers, written for this benchmark only from the published architectures (nothing at run time uses them).
class Pix2PixUNet(nn.Module):
    """pix2pix's UnetGenerator (Isola et al. 2017; junyanz/pytorch-CycleGAN-and-pix2pix) with batch norm and no
    dropout: N x 3 x S x S -> N x 3 x S x S (tanh). `downs` 4x4 stride-2 convolutions take the photo to
    S / 2^downs pixels with (ngf, 2, 4, 8, 8, ...) x ngf channels, LeakyReLU 0.2 before each but the first, batch norm
    after each but the first and the innermost; 4x4 stride-2 transposed convolutions, ReLU before, batch norm after
    (tanh after the last), come back up, each reading its level's output concatenated with the encoder's."""

    def __init__(self, ngf=64, downs=6, cin=3, cout=3):
        super().__init__()
        outs = [ngf * min(2 ** i, 8) for i in range(downs)]
        ins = [cin, *outs[:-1]]
        self.down = nn.ModuleList(nn.Sequential(*[nn.LeakyReLU(0.2, True)] * (i > 0),
                                                nn.Conv2d(ins[i], outs[i], 4, 2, 1, bias=False),
                                                *[nn.BatchNorm2d(outs[i])] * (0 < i < downs - 1)) for i in range(downs))
        self.up = nn.ModuleList(nn.Sequential(nn.ReLU(True), nn.ConvTranspose2d(outs[i] * (1 + (i < downs - 1)),
                                                                                ins[i] if i else cout, 4, 2, 1,
                                                                                bias=i == 0),
                                              nn.BatchNorm2d(ins[i]) if i else nn.Tanh()) for i in range(downs))

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.up[-1](x)
        for i in reversed(range(len(self.up) - 1)):
            x = self.up[i](torch.cat([skips[i], x], 1))
        return x


def patch_gan(ndf=64, layers=3, cin=6):
    """pix2pix's NLayerDiscriminator (PatchGAN) with batch norm: N x 6 x S x S -> N x 1 x P x P raw scores. 4x4
    convolutions: `layers` with stride 2 ((1, 2, 4, ...) x ndf channels, at most 8 ndf), one more with stride 1, each
    followed by batch norm (but the first) and LeakyReLU 0.2, then a 4x4 convolution to one score per patch."""
    mult = [min(2 ** i, 8) for i in range(layers + 1)]
    seq = [nn.Conv2d(cin, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    for i in range(1, layers + 1):
        seq += [nn.Conv2d(ndf * mult[i - 1], ndf * mult[i], 4, 2 if i < layers else 1, 1, bias=False),
                nn.BatchNorm2d(ndf * mult[i]), nn.LeakyReLU(0.2, True)]
    return nn.Sequential(*seq, nn.Conv2d(ndf * mult[-1], 1, 4, 1, 1))


def groups(ch):
    """GroupNorm groups: 32, or fewer where the channels do not divide by 32."""
    return math.gcd(32, ch)


class DiffusersResnet(nn.Module):
    """diffusers' ResnetBlock2D as UNet2DModel builds it: (N x cin x H x W, N x E step embedding) -> N x cout x H x W:
    GroupNorm, SiLU, 3x3 conv, plus a linear map of SiLU(embedding); GroupNorm, SiLU, 3x3 conv; plus the input (a 1x1
    conv where the channels change)."""

    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel in its DDPM layout without attention (DownBlock2D and UpBlock2D at every level, a
    middle of two resnets): (N x 6 x S x S, N steps) -> N x 3 x S x S. Levels of (b, 2b, 3b, 4b) channels (the
    default's proportions, 224 .. 896), `layers` resnets per level down and layers + 1 up, each up resnet reading the
    output of a down resnet (or of the stem, or of a downsampler) concatenated; a 3x3 stride-2 conv down, nearest
    neighbours and a 3x3 conv up; the sinusoidal step embedding (b values, cosines first) through Linear, SiLU,
    Linear to 4b."""

    def __init__(self, b=64, mult=(1, 2, 3, 4), layers=2, cin=6, cout=3):
        super().__init__()
        ch, e = [b * m for m in mult], 4 * b
        self.b = b
        self.embed = nn.Sequential(nn.Linear(b, e), nn.SiLU(), nn.Linear(e, e))
        self.stem = nn.Conv2d(cin, ch[0], 3, padding=1)
        self.down, self.downsample, skips, prev = nn.ModuleList(), nn.ModuleList(), [ch[0]], ch[0]
        for i, c in enumerate(ch):
            self.down.append(nn.ModuleList(DiffusersResnet(prev if j == 0 else c, c, e) for j in range(layers)))
            skips += [c] * (layers + (i < len(ch) - 1))
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, 2, 1))
            prev = c
        self.mid = nn.ModuleList([DiffusersResnet(prev, prev, e), DiffusersResnet(prev, prev, e)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(ch))):
            blocks = []
            for _ in range(layers + 1):
                blocks.append(DiffusersResnet(prev + skips.pop(), ch[i], e))
                prev = ch[i]
            self.up.append(nn.ModuleList(blocks))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch[i], ch[i], 3, padding=1))
        self.head = nn.Sequential(nn.GroupNorm(groups(ch[0]), ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cout, 3, padding=1))

    def forward(self, x, t):
        half = self.b // 2
        angles = t.float()[:, None] * torch.exp(-math.log(1e4) * torch.arange(half, device=t.device) / half)
        emb = self.embed(torch.cat([angles.cos(), angles.sin()], 1))
        x = self.stem(x)
        skips = [x]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                x = block(x, emb)
                skips.append(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
                skips.append(x)
        for block in self.mid:
            x = block(x, emb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], 1), emb)
            if i < len(self.upsample):
                x = self.upsample[i](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.head(x)


def one_conv(unet):
    """exp1's UNet with one 3x3 convolution per block instead of two: each Block's second convolution, norm and ReLU
    become identities (what a cheaper option would buy)."""
    for block in unet.modules():
        if isinstance(block, exp1_unet.Block):
            for i in range(len(block) - 3, len(block)):
                block[i] = nn.Identity()
    return unet


def matched(make, target, widths):
    """The width in `widths` whose network make(width) has the parameter count closest to target (built on the meta
    device: no memory, no initialisation)."""
    with torch.device("meta"):
        return min(widths, key=lambda w: abs(n_params(make(w)) - target))


def peer_groups(args):
    """(experiment, [(name, build)]) groups: our network first, its peers after it, at equal parameters."""
    size, downs = args.size, args.size.bit_length() - 1  # pix2pix: the most downsamplings the photo allows (1 x 1)
    for c in (16,) if args.quick else (16, 64):
        ngf = matched(lambda w: Pix2PixUNet(w, downs), n_params(exp1_unet.UNet(c, 5)), range(2, 257))
        yield "exp1", [(f"exp1 UNet c {c} (depth 5)", lambda c=c: exp1_unet.UNet(c, 5)),
                       (f"pix2pix UnetGenerator ngf {ngf} ({downs} downs)", lambda n=ngf: Pix2PixUNet(n, downs)),
                       (f"exp1 UNet c {c}, one conv per block", lambda c=c: one_conv(exp1_unet.UNet(c, 5)))]
    for c in (16,) if args.quick else (16, 64):
        ours = lambda c=c: exp2_gan.Discriminator(c, 5, "batch", "patch", size)  # noqa: E731
        ndf = matched(patch_gan, n_params(ours()), range(2, 257))
        yield "exp2", [(f"exp2 Discriminator d-c {c} (patch)", ours),
                       (f"pix2pix NLayerDiscriminator ndf {ndf} (3 layers)", lambda n=ndf: patch_gan(n))]
    for c in (16,) if args.quick else (16, 64):
        b = matched(DiffusersUNet, n_params(exp3_diffusion.UNet(c)), range(4, 513, 2))
        yield "exp3", [(f"exp3 UNet c {c} (group norm)", lambda c=c: exp3_diffusion.UNet(c)),
                       (f"diffusers UNet2DModel-style ({b}, {2 * b}, {3 * b}, {4 * b})", lambda b=b: DiffusersUNet(b))]


def forward_flops(model, inputs):
    """FLOPs of one forward pass, as torch.utils.flop_counter counts them (convolutions and matrix products; a
    multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    model.eval()
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def bench_peers(args, device):
    """Rows of the peers table: each group's networks timed in turn, training (forward, backward, Adam step) and
    inference (eval mode, no grad) at batch 16, every network in channels_last as the experiments run."""
    batch, rows, target = 16, [], 0.3 if args.quick else 1.0  # seconds per timed measurement, at least
    for exp, group in peer_groups(args):
        torch.manual_seed(0)
        cin = 3 if exp == "exp1" else 6
        x = torch.rand(batch, cin, args.size, args.size, device=device) * 2 - 1
        inputs = (x, torch.randint(0, 1000, (batch,), device=device)) if exp == "exp3" else (x,)
        nets, trains, infers = {}, {}, {}
        for name, build in group:
            net = nets[name] = build().to(device, memory_format=torch.channels_last)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

            def train(net=net, opt=opt):
                net.train()
                loss = net(*inputs).float().square().mean()   # the loss's own cost is negligible
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            @torch.no_grad()
            def infer(net=net):
                net.eval()
                net(*inputs)
            trains[name], infers[name] = train, infer
        flops = {name: forward_flops(net, [t[:1] for t in inputs]) for name, net in nets.items()}
        timed = {}
        for kind, fns in (("train", trains), ("infer", infers)):
            reps = {}
            for name, fn in fns.items():    # calls per measurement: `target` seconds' worth, after a first call
                fn()
                reps[name] = max(1, math.ceil(target / seconds(fn, device)))
            calls = {name: lambda fn=fn, k=reps[name]: [fn() for _ in range(k)] for name, fn in fns.items()}
            _, times = rounds(calls, device, n_rounds(args))
            timed[kind] = {name: [s / reps[name] for s in t] for name, t in times.items()}
        first = group[0][0]
        for name, _ in group:
            train, infer = timed["train"][name], timed["infer"][name]
            rows.append({"experiment": exp, "network": name, "params": n_params(nets[name]),
                         "gflops": flops[name] / 1e9, "train_img_s": batch / min(train),
                         "infer_ms": 1000 * min(infer) / batch, "train_ratio": ratio(timed["train"][first], train),
                         "infer_ratio": ratio(timed["infer"][first], infer)})
        print(f"  {exp}: " + "; ".join(f"{r['network']} {r['train_ratio']:.2f}x / {r['infer_ratio']:.2f}x"
                                       for r in rows[-len(group):]), flush=True)
    return rows


def peers_table(rows):
    """The markdown table of --peers."""
    lines = ["| network | params | GFLOPs per image (forward) | training, img/s | inference, ms per map | speed "
             "against the group's first, training / inference |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['params'] / 1e6:.2f} M | {r['gflops']:.3f} | {r['train_img_s']:.1f} | "
                     f"{r['infer_ms']:.2f} | {r['train_ratio']:.2f} / {r['infer_ratio']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the GPU check
def run_logged(argv, log, timeout):
    """Runs `python argv...` in this folder, output to the file `log`; its exit status, or None when it ran past
    timeout seconds (then it and its children are killed)."""
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if hasattr(os, "killpg"):
                os.killpg(p.pid, signal.SIGKILL)
            else:
                p.kill()
            p.wait()
            return None


def tail(log, n=1):
    """The last n non-empty lines of a log file, joined."""
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])


def run_step(argv, out, log, timeout):
    """One subprocess step of --gpu-check: (status, result). An experiment's result is its final.json's val L1, CC
    and seconds; anything else's the last line of its log."""
    status = run_logged(argv, log, timeout)
    result = tail(log)
    if (out / "final.json").exists():
        final = json.loads((out / "final.json").read_text())
        result = (f"val L1 {common.fmt(final.get('val_l1'))}, CC {common.fmt(final.get('val_cc'), 3)}; "
                  f"{final.get('seconds', 0):.1f} s for the epoch")
    return "timeout" if status is None else "ok" if status == 0 else f"failed (exit {status})", result


def gpu_check(args):
    """The whole GPU check: the CUDA test, one epoch of each experiment and of the user's command, this benchmark
    on CUDA, and the --amp --compile epochs as time allows; a summary table, JSON; exit status 1 if a step failed."""
    if not torch.cuda.is_available():
        common.fail(f"--gpu-check needs a CUDA device, and torch {torch.__version__} sees none here")
    t_start, tmp, steps = time.perf_counter(), Path(tempfile.mkdtemp(prefix="vms-gpu-check-")), []
    gpu = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "steps": steps}
    print(f"gpu check: {gpu['gpu']}, torch {torch.__version__}; logs and runs in {tmp}", flush=True)
    one = ["--epochs", "1"]
    plan = [("test_all.py cuda", ["test_all.py", "cuda"], 300),
            ("exp2 --g-opt sgd --c 32 (the user's command)", ["exp2_gan.py", "--g-opt", "sgd", "--c", "32", *one], 120),
            ("exp1 defaults (c 64, 64 px)", ["exp1_unet.py", *one], 120),
            ("exp3 defaults (c 64, DDIM-50)", ["exp3_diffusion.py", *one], 180),
            ("bench.py --device cuda", None, None),
            *[(f"{s.split('_')[0]} --amp --compile", [s, *one, "--amp", "--compile"], 240)
              for s in ("exp1_unet.py", "exp2_gan.py", "exp3_diffusion.py")],
            ("exp1 --size 128 --amp", ["exp1_unet.py", *one, "--size", "128", "--amp"], 120)]
    for name, argv, cap in plan:
        left = t_start + GPU_CHECK_SECONDS - time.perf_counter()
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if argv and argv[0] != "test_all.py":
            argv = [*argv, "--device", "cuda", "--out", str(tmp / slug)]
        row = {"step": name, "command": "python " + " ".join(argv or ["bench.py", "--device", "cuda"]),
               "status": "skipped", "seconds": 0.0, "result": "out of time"}
        steps.append(row)
        t0 = time.perf_counter()
        if left < 30:
            pass
        elif argv:
            row["status"], row["result"] = run_step(argv, tmp / slug, tmp / f"{slug}.log", min(cap, left))
            row["log"] = str(tmp / f"{slug}.log")
        else:                               # this benchmark, in this process; compiling takes minutes
            flags = ["--device", "cuda", "--repeats", "3", "--only", "exp1,exp2,exp3,encoder"]
            flags += [] if left > 300 else ["--no-compile"]
            row["command"] = "python bench.py " + " ".join(flags)
            try:
                deadline = time.perf_counter() + left
                gpu["bench"] = report = run(build_parser().parse_args(flags), flags, deadline)
                row["status"] = "failed" if any("failed" in report.get(k, {}) for k in PARTS) else "ok"
                row["result"] = "; ".join(part_summary(k, m) for k, m in report.items() if k in PARTS)
            except (Exception, SystemExit) as e:  # noqa: BLE001  every step is reported, then the next one runs
                row.update(status="failed", result=f"{type(e).__name__}: {e}"[:300], traceback=traceback.format_exc())
            torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t0
        print(f"  {name}: {row['status']} in {row['seconds']:.0f} s; {row['result']}", flush=True)

    gpu["seconds"] = time.perf_counter() - t_start
    print(f"\ngpu check: {gpu['gpu']}, torch {torch.__version__}, {gpu['seconds'] / 60:.1f} min\n"
          "| step | status | seconds | result |\n|---|---|---|---|")
    for row in steps:
        print(f"| {row['step']} | {row['status']} | {row['seconds']:.0f} | {row['result']} |")
    path = Path(args.json or "runs/gpu-check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gpu, indent=1))
    bad = [row["step"] for row in steps if row["status"] not in ("ok", "skipped")]
    if bad:
        print(f"wrote {path}; failed: {', '.join(bad)}; their logs are in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)
    skipped = [row["step"] for row in steps if row["status"] == "skipped"]
    print(f"wrote {path}; every step that ran passed" + (f" (out of time: {', '.join(skipped)})" if skipped else ""))
    return 0


# ---------------------------------------------------------------------------------------------------- main
def run(args, argv, deadline=None):
    """The benchmark (or the peers table) for the parsed args of the flags argv: the report, printed as it goes. A
    part does not start within 90 s of the deadline (a time.perf_counter() value; --gpu-check's budget)."""
    device = common.pick_device(args.device)
    if args.size % 16 or args.size < 32:
        common.fail(f"--size {args.size}: a multiple of 16, at least 32 (the experiments' default depths)")
    if args.peers and args.size & (args.size - 1):
        common.fail(f"--size {args.size}: --peers needs a power of two (pix2pix's UNet halves it down to 1 pixel)")
    if args.repeats is not None and args.repeats < 1:
        common.fail("--repeats must be at least 1")
    threads = args.threads or (1 if args.peers and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    hw = hardware(device)
    report = {"device": describe_hardware(hw, torch.get_num_threads()), "hardware": hw, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "size": args.size, "quick": args.quick, "repeats": n_rounds(args),
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python bench.py", *argv])}
    rounds_ = f"{n_rounds(args)} round" + "s" * (n_rounds(args) > 1)
    print(f"bench: {report['device']}, torch {torch.__version__}, {args.size} px, {rounds_}"
          + (", --quick" if args.quick else ""), flush=True)
    if args.peers:
        t0 = time.perf_counter()
        report["peers"] = bench_peers(args, device)
        report["peers_note"] = ("batch 16, channels_last, Adam; FLOPs of one forward pass per image as "
                                "torch.utils.flop_counter counts them (convolutions and matrix products, a "
                                "multiply-add = 2); speed ratios against the group's first row, median of the "
                                "interleaved rounds")
        print(peers_table(report["peers"]) + f"\n({time.perf_counter() - t0:.0f} s)")
        return report
    variants, skipped = variants_for(args, device)
    for part, fn in (("data", bench_data), ("exp1", bench_exp1), ("exp2", bench_exp2), ("exp3", bench_exp3),
                     ("encoder", bench_encoder)):
        if part not in args.only:
            continue
        if deadline is not None and time.perf_counter() > deadline - 90:
            report[part] = {"skipped": "out of time (--gpu-check's budget)"}
            continue
        t0 = time.perf_counter()
        try:
            if part == "data":
                report[part] = bench_data(args)
                print(f"data: {json.dumps(report[part])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            elif part == "encoder":
                report[part] = bench_encoder(args, device)
                print(encoder_line(report[part]) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            else:
                report[part] = fn(args, device, variants, dict(skipped))
                report[part]["seconds"] = time.perf_counter() - t0
                print(exp_line(part, report[part]) + f"  ({report[part]['seconds']:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001  under --gpu-check a failing part is reported and the others kept
            if deadline is None:
                raise
            report[part] = {"failed": f"{type(e).__name__}: {e}"[:300], "traceback": traceback.format_exc()}
            print(f"{part}: failed ({report[part]['failed']})", flush=True)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.gpu_check:
        sys.exit(gpu_check(args))
    report = run(args, argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
