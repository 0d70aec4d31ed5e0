"""How fast is it? Training and inference of the three experiments with and without each speed option, the data cache
and the encoder's feature cache, every comparison measured side by side in one process.

    python tools/bench.py --quick                               # CPU, small networks (c 16): a few minutes
    python tools/bench.py --device cuda --json runs/bench.json  # the study's sizes (c 64) on a GPU
    python tools/bench.py --only exp1 encoder --repeats 5       # some parts

The variants of a comparison run in turn (A B A B ...) for --repeats rounds after a warm-up each: a ratio (a variant's
speed over the first's; above 1: faster) is the median of the ratios within a round, an absolute figure the best round.
Ratios are what to compare; absolute times describe only the machine they were taken on (the first line names it).
Training runs through each experiment's own train_epoch and optimiser on the synthetic set, inference through its own
predict (exp3: DDIM at its default steps, one sample per map).
"""
import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import exp1_unet  # noqa: E402
import exp2_gan  # noqa: E402
import exp3_diffusion  # noqa: E402

EXPERIMENTS = {"exp1": exp1_unet, "exp2": exp2_gan, "exp3": exp3_diffusion}
PARTS = ("data", "exp1", "exp2", "exp3", "encoder")


def hardware(device):
    """One line: the CPU (model and the flags that matter for bf16) or the GPU, torch, threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in f" {info} "]
    return f"{model} ({' '.join(flags) or 'no AVX2'}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def rounds(variants, repeats, sync):
    """{name: best seconds}, {name: median over rounds of its time over the first variant's} for `variants` (name ->
    function), run in turn for `repeats` rounds after one warm-up call each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    first = next(iter(times))
    return ({n: min(t) for n, t in times.items()},
            {n: statistics.median(a / b for a, b in zip(times[first], t)) for n, t in times.items()})  # speed ratios


def bf16_units(device):
    return device.type == "cuda" or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()


def experiment(name, args, device, data, sync):
    """Training images per second and inference ms per map of one experiment, and the speed of each option against the
    plain run (above 1: the option is faster)."""
    module, c = EXPERIMENTS[name], 16 if args.quick else 64
    flags = ["--data", "synthetic", "--device", device.type, "--c", c, "--size", args.size, "--batch-size", 16]
    flags += {"exp2": ["--d-c", c], "exp3": ["--eval-every", 1]}.get(name, [])
    n = 64 if args.quick else 256                      # training photos per timed call
    x, y = data.x["train"][:n].to(device), data.y["train"][:n].to(device)

    def build(amp=False, channels_last=True, compiled=False):
        s = common.settings(module.build_parser, [str(f) for f in flags] + ["--amp"] * amp, module.RESUMABLE,
                            module.checks)
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if name == "exp3":
            net = module.UNet(s.c, s.norm, s.attn, None, s.size).to(device, memory_format=fmt)
            ema, diffusion = copy.deepcopy(net).requires_grad_(False), module.Diffusion(s)
            opt = torch.optim.Adam(net.parameters(), lr=s.lr, betas=tuple(s.betas), fused=device.type == "cuda" or None)
            run = torch.compile(net) if compiled else net
            train = lambda: module.train_epoch(run, ema, opt, x, y, diffusion, s, 0)  # noqa: E731
            infer = lambda: module.predict(run, x[:16], diffusion, s, s.sample_steps, 1)  # noqa: E731
            return train, infer
        net = module.make_unet(s, None, y).to(device, memory_format=fmt)
        run = torch.compile(net) if compiled else net
        opt = module.make_optimizer(net.parameters(), getattr(s, "opt", "adam"), s.lr if name == "exp1" else s.g_lr,
                                    s.betas if name == "exp1" else s.g_betas, s.momentum, device.type)
        if name == "exp1":
            train = lambda: module.train_epoch(run, opt, x, y, s)  # noqa: E731
        else:
            D = module.Discriminator(s.d_c, s.d_depth, s.d_norm, s.disc, s.size).to(device, memory_format=fmt)
            opt_d = module.make_optimizer(D.parameters(), s.d_opt, s.d_lr, s.d_betas, s.momentum, device.type)
            train = lambda: module.train_epoch(run, D, opt, opt_d, x, x, y, s)  # noqa: E731
        return train, lambda: module.predict(run, x, s)
    variants = {"plain": build(), "contiguous": build(channels_last=False)}
    skipped = {} if bf16_units(device) else {"amp": "no bf16 units (AVX-512 BF16 or AMX): bf16 autocast is many "
                                                    "times slower here"}
    if not skipped:
        variants["amp"] = build(amp=True)
    if args.compile:
        variants["compile"] = build(compiled=True)
    with contextlib.redirect_stdout(io.StringIO()):  # (the training loops' progress lines)
        train_s, train_ratio = rounds({k: v[0] for k, v in variants.items()}, args.repeats, sync)
        infer_s, infer_ratio = rounds({k: v[1] for k, v in variants.items()}, args.repeats, sync)
    maps = 16 if name == "exp3" else n
    return {"train_img_s": n / train_s["plain"], "infer_ms": 1000 * infer_s["plain"] / maps, "skipped": skipped,
            **{f"{k}_train_ratio": v for k, v in train_ratio.items() if k != "plain"},
            **{f"{k}_infer_ratio": v for k, v in infer_ratio.items() if k != "plain"}}


def data_part(args):
    """Decoding every JPEG against loading the cache (real data only)."""
    root, _ = common.resolve_data(args.data)
    if root in (None, common.SYNTHETIC):
        return {"skipped": "needs the real data (--data PATH or $VISCHEMA_DIR)"}
    names = sorted(set(sum(common.split_names(root), [])))
    key, paths = common.cache_key(root, names, args.size), common.cache_files(root, f"cache_{args.size}px.pt")

    def decode():  # what load_data caches, so that a cache the warm-up makes is load_data's own
        return {"names": names, "images": common.decode_all(root, "images", names, args.size),
                "maps": common.decode_all(root, "vms", names, args.size)}
    load = lambda: common.cached(paths, key, "data", decode)  # noqa: E731
    with contextlib.redirect_stdout(io.StringIO()):
        load()
        best, _ = rounds({"decode": decode, "cached": load}, max(1, args.repeats // 2), lambda: None)
    return {"decode_s": best["decode"], "cached_load_s": best["cached"],
            "cache_speedup": best["decode"] / best["cached"]}


def encoder_part(args, device, data, sync):
    """One exp1 training step of the Lite0 decoder with the encoder run on the photos, against from cached features."""
    import pretrained
    if not pretrained.available("lite0"):
        return {"skipped": f"needs the extra: {pretrained.EXTRAS['lite0']}"}
    flags = ["--data", "synthetic", "--encoder", "lite0", "--photo-size", "384", "--device", device.type]
    s = common.settings(exp1_unet.build_parser, flags, exp1_unet.RESUMABLE, exp1_unet.checks)
    enc = pretrained.Encoder("lite0", 384)
    torch.manual_seed(0)
    model = exp1_unet.make_unet(s, enc, data.y["train"]).to(device, memory_format=torch.channels_last)
    opt = exp1_unet.make_optimizer(model.parameters(), "adam", 1e-3, (0.9, 0.999), 0.9, device.type)
    photos, y = torch.rand(16, 3, 384, 384, device=device) * 2 - 1, data.y["train"][:16].to(device)
    with contextlib.redirect_stdout(io.StringIO()):
        feats = enc(photos, model.cached).to(device)

    def step(x):
        opt.zero_grad()
        common.map_loss("l1", model(x), y).backward()
        opt.step()
    with contextlib.redirect_stdout(io.StringIO()):
        best, ratio = rounds({"photos": lambda: step(enc(photos, model.cached).to(device)),
                              "features": lambda: step(feats)}, args.repeats, sync)
        one, _ = rounds({"features": lambda: enc(photos[:1], model.cached)}, args.repeats, sync)
    return {"step_ms_from_photos": 1000 * best["photos"], "step_ms_from_features": 1000 * best["features"],
            "features_speedup": ratio["features"], "features_ms_per_photo": 1000 * one["features"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small networks (c 16) and few photos: minutes on a CPU")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to measure (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--repeats", type=int, default=3, help="rounds of each comparison (after one warm-up)")
    p.add_argument("--size", type=int, default=64, help="the maps' side, px")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder for the data part (default: $VISCHEMA_DIR)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile against eager (minutes to compile)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {"hardware": hardware(device)}
    print(results["hardware"], flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        data = common.load_data("synthetic", args.size)
    for part in args.only:
        results[part] = data_part(args) if part == "data" else encoder_part(args, device, data, sync) \
            if part == "encoder" else experiment(part, args, device, data, sync)
        print(f"{part}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in results[part].items()), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
