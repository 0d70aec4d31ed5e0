"""How fast is it? Data loading, training and inference of the three experiments, measured in one process.

    python bench.py --quick                                  # CPU, small models: a few minutes
    python bench.py --device cuda --json runs/bench.json     # the thesis' sizes on a GPU

data:  decode_s (decode and resize every JPEG of the dataset), cached_load_s (the same from the cache),
       trial_startup_s (a new process importing an experiment and loading the cached data: a sweep trial's overhead).
exp1, exp2, exp3: train_img_s (training images per second through the experiment's own training loop), infer_ms
       (ms per map, batched over the val split; exp1 also with 16 and 256 photos per forward pass); exp3 also
       sample_ms_ddim (DDIM at its default steps), sample_ms_ddpm (ancestral over all T) and 4 samples x DDIM-5 with
       32 and 512 maps per forward pass. Then the options that change speed, each measured beside the plain
       configuration and given as a ratio of images per second (above 1: faster): bf16 autocast (--amp),
       channels_last toggled, torch.compile.
Everything is timed after a warm-up, with CUDA synchronised around each measurement.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import evaluate
import exp1_unet
import exp2_gan
import exp3_diffusion


def build_parser():
    p = argparse.ArgumentParser(description="Time data loading, training and inference of the three experiments.",
                                formatter_class=common.HelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--size", type=int, default=64, help="image and map size in pixels")
    p.add_argument("--quick", action="store_true", help="small models (c 16) and fewer steps: minutes on a CPU")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder (default as the experiments: --data, "
                   "$VISCHEMA_DIR, ./data/VISCHEMA_PLUS); without it the data timings are skipped")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison (slow to compile)")
    return p


def clock(fn, device, repeats=1):
    """Seconds per call of fn() after one warm-up call, the best of `repeats` (evaluate.timed syncs CUDA)."""
    fn()
    return min(evaluate.timed(fn, device=device)[1] for _ in range(repeats))


# ---------------------------------------------------------------------------------------------------- data
def bench_data(args):
    root, _ = common.resolve_data(args.data)
    if root is None:
        return {"skipped": "no VISCHEMA PLUS found (--data, $VISCHEMA_DIR, ./data/VISCHEMA_PLUS)"}
    t0 = time.perf_counter()
    common.load_data(root, args.size, refresh=True)
    decode_s = time.perf_counter() - t0
    cached_load_s = min(clock(lambda: common.load_data(root, args.size), torch.device("cpu"), repeats=3), decode_s)
    code = f"import exp1_unet, common; common.load_data({str(root)!r}, {args.size})"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return {"decode_s": decode_s, "cached_load_s": cached_load_s, "cache_speedup": decode_s / cached_load_s,
            "trial_startup_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------- experiments
def fake_data(n, size, device):
    """Random photos and maps in the VMSData format: speed does not depend on the pixels."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(n, 3, size, size, generator=g).mul(2).sub(1).to(device) for _ in range(2))
    return common.VMSData(x, y, x, y, [], [], {}, "benchmark")


def configure(module, flags, variant, device):
    """The experiment's own settings for `flags`, with one speed option changed: --amp on, or channels_last the
    opposite of the experiment's choice for this device (on for CUDA, off for CPU)."""
    args = module.build_parser().parse_args(flags + (["--amp"] if variant == "amp" else []))
    args.device = device.type
    module.CHANNELS_LAST = (device.type != "cuda") if variant == "channels_last" else None
    return args


def prepare(module, model, device, variant):
    """The model on the device in the memory format the experiment would use; compiled for the compile variant."""
    model = model.to(device)
    if module.channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if variant == "compile" else model


def bench_exp1(args, device, variants):
    flags = ["--c", "16"] if args.quick else []
    data, out = fake_data(128 if args.quick else 512, args.size, device), {}
    for variant in variants:
        a = configure(exp1_unet, flags, variant, device)
        model = prepare(exp1_unet, exp1_unet.UNet(a.c, a.depth, a.norm, a.dropout, not a.no_skip), device, variant)
        opt = exp1_unet.make_optimizer(model.parameters(), a.opt, a.lr, a.betas, a.momentum, device)
        seconds = clock(lambda: exp1_unet.train_epoch(model, opt, data, a, ["translation", "cutout"], device), device)
        out[variant] = {"train_img_s": len(data.train_x) // a.batch_size * a.batch_size / seconds,
                        "infer_ms": 1000 * clock(lambda: exp1_unet.predict(model, data.val_x, a.target, a.amp),
                                                 device, repeats=3) / len(data.val_x)}
        if variant == "plain":  # the default forward batch (16 photos on a CPU, 256 on CUDA) against 256 and 16
            for batch in (16, 256):
                out[variant][f"infer_ms_batch{batch}"] = 1000 * clock(lambda: exp1_unet.predict(
                    model, data.val_x, a.target, a.amp, batch=batch), device, repeats=3) / len(data.val_x)
    return out


def bench_exp2(args, device, variants):
    flags = ["--c", "16", "--d-c", "16"] if args.quick else []
    data, out = fake_data(64 if args.quick else 512, args.size, device), {}
    for variant in variants:
        a = configure(exp2_gan, flags, variant, device)
        G = prepare(exp2_gan, exp2_gan.UNet(a.c, a.depth, a.g_norm, a.dropout, not a.no_skip), device, variant)
        D = prepare(exp2_gan, exp2_gan.Discriminator(a.d_c, a.d_depth, a.d_norm, a.disc, a.size), device, variant)
        opt_g = exp2_gan.make_optimizer(G.parameters(), a.g_opt, a.g_lr, a.g_betas, a.momentum, device)
        opt_d = exp2_gan.make_optimizer(D.parameters(), a.d_opt, a.d_lr, a.d_betas, a.momentum, device)
        seconds = clock(lambda: exp2_gan.train_epoch(G, D, opt_g, opt_d, data, a, ["translation", "cutout"], device),
                        device)
        out[variant] = {"train_img_s": len(data.train_x) // a.batch_size * a.batch_size / seconds,
                        "infer_ms": 1000 * clock(lambda: exp2_gan.predict(G, data.val_x, a.target, a.amp),
                                                 device, repeats=3) / len(data.val_x)}
    return out


def bench_exp3(args, device, variants):
    flags = ["--c", "16"] if args.quick else []
    data, out = fake_data(64 if args.quick else 512, args.size, device), {}
    for variant in variants:
        a = configure(exp3_diffusion, flags, variant, device)
        model = prepare(exp3_diffusion, exp3_diffusion.UNet(a.c, a.norm, a.attn), device, variant)
        ema = prepare(exp3_diffusion, exp3_diffusion.UNet(a.c, a.norm, a.attn), device, "plain").requires_grad_(False)
        opt = exp3_diffusion.make_optimizer(model.parameters(), "adam", a.lr, a.betas, 0.0, device)
        diffusion = exp3_diffusion.Diffusion(a)
        step = [0]

        def train():
            _, step[0] = exp3_diffusion.train_epoch(model, ema, opt, data, diffusion, a, ["translation", "cutout"],
                                                    step[0])
        seconds = clock(train, device)
        images = data.val_x[:8] if args.quick else data.val_x  # the same batch for both samplers
        ddim = clock(lambda: exp3_diffusion.sample(model, images, diffusion, a.sample_steps, amp=a.amp), device)
        out[variant] = {"train_img_s": len(data.train_x) // a.batch_size * a.batch_size / seconds,
                        "sample_ms_ddim": 1000 * ddim / len(images), "infer_ms": 1000 * ddim / len(images)}
        if variant == "plain":  # ancestral over all T: once, without a warm-up (the DDIM runs warmed up the model)
            ddpm = evaluate.timed(exp3_diffusion.sample, model, images, diffusion, 0, amp=a.amp, device=device)[1]
            out[variant]["sample_ms_ddpm"] = 1000 * ddpm / len(images)
            out[variant]["ddpm_over_ddim"] = out[variant]["sample_ms_ddpm"] / out[variant]["sample_ms_ddim"]
            photos = data.val_x[:64]  # 4 samples x DDIM-5 of 64 photos, 32 and 512 maps per forward pass
            for batch in (32, 512):
                out[variant][f"sample_ms_k4_ddim5_batch{batch}"] = 1000 * clock(lambda: exp3_diffusion.sample(
                    model, photos, diffusion, 5, samples=4, amp=a.amp, batch=batch), device) / len(photos)
    return out


def summarise(results):
    """Plain numbers at the top level, each option as a ratio of training (and inference) speed to plain."""
    plain = results["plain"]
    summary = dict(plain)
    for variant, m in results.items():
        if variant != "plain":
            summary[f"{variant}_train_ratio"] = m["train_img_s"] / plain["train_img_s"]
            summary[f"{variant}_infer_ratio"] = plain["infer_ms"] / m["infer_ms"]
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    variants = ["plain", "amp", "channels_last"] + ([] if args.no_compile else ["compile"])
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    report = {"device": hardware, "torch": torch.__version__, "size": args.size, "quick": args.quick}
    print(f"bench: {hardware}, torch {torch.__version__}, {args.size} px" + (", --quick" if args.quick else ""))
    report["data"] = bench_data(args)
    print(f"data: {json.dumps(report['data'])}", flush=True)
    for name, fn in (("exp1", bench_exp1), ("exp2", bench_exp2), ("exp3", bench_exp3)):
        t0 = time.perf_counter()
        report[name] = summarise(fn(args, device, variants))
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in report[name].items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
