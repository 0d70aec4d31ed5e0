"""Compare trained runs: every number and figure of the study's results chapter, honest about the baselines.

    python evaluate.py runs/exp1 runs/exp2 runs/exp3 --out runs/eval      # tables and figures
    python evaluate.py runs/sweep-exp1                                     # a sweep folder: all its trials
    python evaluate.py --predict runs/exp1 --images a.jpg b.png --out maps # maps for your own photos

For every run (its best.pt) and for the constant baselines (all-black, mean map, median map) on the same split and
size: L1 (overall, green = true VMS, red = false VMS), Pearson CC (combined, per channel, native and 20x20), the
train-vs-val L1 gap, per-category L1 and CC, inference time per map (batch 1 and batched), and FID between
predicted and true maps when the FID weights are available. Writes results.md, results.json and PNG figures.
"""
import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common

EXPERIMENTS = ("exp1_unet", "exp2_gan", "exp3_diffusion")
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate trained runs against each other and the constant baselines, "
                                "or predict maps for your own images (--predict).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (with best.pt), or sweep folders meaning all their trials")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder (default: the data each run was trained on)")
    p.add_argument("--split", choices=["val", "train"], default="val", help="the split the tables report")
    p.add_argument("--out", default="runs/eval", help="where results.md, results.json and the figures go")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(default: the torch hub cache); without it FID is reported as unavailable")
    p.add_argument("--sample-steps", type=int, default=None, help="diffusion runs: DDIM steps (0: ancestral over "
                   "all T; default: the run's own setting)")
    p.add_argument("--samples", type=int, default=None, help="diffusion runs: samples averaged per map "
                   "(default: the run's own setting)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--rows", type=int, default=6, help="val images shown in the comparison figures")
    p.add_argument("--predict", metavar="RUN", default=None, help="predict maps for --images with RUN's best.pt")
    p.add_argument("--images", nargs="+", default=[], help="your own photos (any size) for --predict")
    return p


# ---------------------------------------------------------------------------------------------------- runs
def expand_runs(paths):
    """Run folders from the command line; a folder without best.pt of its own means every run inside it."""
    runs = []
    for p in map(Path, paths):
        if (p / "best.pt").exists():
            runs.append(p)
        elif p.is_dir() and sorted(q.parent for q in p.glob("*/best.pt")):
            runs += sorted(q.parent for q in p.glob("*/best.pt"))
        else:
            common.fail(f"{p}: not a run folder (no best.pt) nor a folder of runs")
    return runs


def experiment_of(run):
    """Which experiment made a run: final.json says so, else best.pt."""
    final = run / "final.json"
    name = json.loads(final.read_text()).get("experiment") if final.exists() else None
    name = name or torch.load(run / "best.pt", map_location="cpu", weights_only=True).get("experiment")
    if name not in EXPERIMENTS:
        common.fail(f"{run}: cannot tell which experiment made it (no 'experiment' in final.json or best.pt)")
    return name


def load_predictor(run, device, sample_steps=None, samples=None):
    """(predict_fn, args, experiment): predict_fn maps photos in [-1, 1] to maps in [-1, 1]."""
    name = experiment_of(run)
    module = importlib.import_module(name)
    options = {k: v for k, v in (("sample_steps", sample_steps), ("samples", samples)) if v is not None}
    predict, args = module.load_predictor(run, device, **options) if name == "exp3_diffusion" else \
        module.load_predictor(run, device)
    return predict, args, name


def timed(fn, *a, device, **kw):
    """(fn(*a, **kw), seconds it took), with CUDA synchronised before and after (bench.py times with it too)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def per_image_cc(pred, true):
    """Pearson CC of the combined (red + green) maps, per image (nan where the true map is flat)."""
    p, t = (m[:, 0] + m[:, 1] for m in (pred, true))
    flat = t.flatten(1).amax(1) - t.flatten(1).amin(1) < common.FLAT
    return torch.where(flat, torch.tensor(float("nan"), dtype=torch.float64), common.pearson(p.flatten(1),
                                                                                             t.flatten(1)))


def evaluate_run(run, data, args, device, inception):
    """Metrics, timing, FID and the predictions (on [0, 1]) of one run on data (VMSData)."""
    predict, run_args, name = load_predictor(run, device, args.sample_steps, args.samples)
    x, y = (data.val_x, data.val_y) if args.split == "val" else (data.train_x, data.train_y)
    predict(x[:2])                                                      # warm-up (cudnn, allocator, lazy init)
    pred, seconds = timed(predict, x, device=device)
    one = [timed(predict, x[i:i + 1], device=device)[1] for i in range(min(10, len(x)))]
    pred, true = common.to_unit(pred.float()).cpu(), common.to_unit(y).cpu()
    m = common.map_metrics(pred, true)
    train_pred = pred if args.split == "train" else common.to_unit(predict(data.train_x).float()).cpu()
    m["train_l1"] = common.l1_metrics(train_pred, common.to_unit(data.train_y).cpu())["l1"]
    m["gap_l1"] = m["l1"] - m["train_l1"]
    m["ms_per_map_batched"] = 1000 * seconds / len(x)
    m["ms_per_map_batch1"] = 1000 * float(np.median(one))
    m["fid"] = common.fid(inception, pred, true) if inception is not None else None
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").exists() else {}
    names = data.val_names if args.split == "val" else data.train_names
    cats = {}
    for i, n in enumerate(names):
        cats.setdefault(data.categories.get(n, "?"), []).append(i)
    per_cat = {c: {**common.l1_metrics(pred[i], true[i]), "cc": common.cc_metrics(pred[i], true[i])["cc"],
                   "n": len(i)} for c, i in sorted(cats.items())} if data.categories else {}
    row = {"run": run.name, "path": str(run), "experiment": name, "command": final.get("command", ""),
           "epochs": final.get("epoch"), "best_epoch": final.get("best_epoch"), "status": final.get("status"),
           "params": final.get("params"), "metrics": m, "per_category": per_cat,
           "metrics_file": str(run / "metrics.jsonl")}
    print(f"{run}: {name}, {args.split} L1 {m['l1']:.4f} CC {m['cc']:.3f} gap {m['gap_l1']:+.4f}, "
          f"{m['ms_per_map_batched']:.2f} ms/map batched, {m['ms_per_map_batch1']:.1f} ms/map alone", flush=True)
    return row, pred, per_image_cc(pred, true)


# ---------------------------------------------------------------------------------------------------- figures
def line_plot(path, series, title, ylabel, size=(720, 420)):
    """A line chart with pillow: series is a list of (label, xs, ys); no matplotlib needed."""
    w, h = size
    left, right, top, bottom = 70, 200, 40, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pts = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        d.line([left - 4, sy(yv), left, sy(yv)], fill="black")
        d.text((4, sy(yv) - 6), f"{yv:.4g}", fill="black")
        d.line([sx(xv), h - bottom, sx(xv), h - bottom + 4], fill="black")
        d.text((sx(xv) - 8, h - bottom + 8), f"{xv:.0f}", fill="black")
    d.text((left, 12), title, fill="black")
    d.text((w // 2 - 60, h - 20), f"epoch    ({ylabel})", fill="black")
    for k, (label, xs, ys) in enumerate(series):
        colour = COLOURS[k % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        elif line:
            d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        d.line([w - right + 10, top + 10 + 16 * k, w - right + 30, top + 10 + 16 * k], fill=colour, width=3)
        d.text((w - right + 36, top + 4 + 16 * k), label[:24], fill="black")
    im.save(path)


def training_curves(rows, out):
    """Train and val L1 per epoch for every run, and each GAN's losses."""
    series = []
    for r in rows:
        lines = [json.loads(x) for x in Path(r["metrics_file"]).read_text().splitlines() if x.strip()] \
            if Path(r["metrics_file"]).exists() else []
        epochs = [x["epoch"] for x in lines]
        series.append((f"{r['run']} val", epochs, [x.get("val_l1") for x in lines]))
        series.append((f"{r['run']} train", epochs, [x.get("train_l1") for x in lines]))
        if r["experiment"] == "exp2_gan":
            line_plot(out / f"curves_gan_{r['run']}.png", [(k, epochs, [x.get(k) for x in lines])
                                                          for k in ("g_adv", "g_l1", "d_real", "d_fake")],
                      f"{r['run']}: GAN losses per epoch", "loss")
    line_plot(out / "curves_l1.png", series, "L1 per epoch: train (augmented batches, train mode) and val",
              "L1 on [0, 1]")


# ---------------------------------------------------------------------------------------------------- tables
def fmt(v, digits=4):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def results_markdown(rows, baselines, args, fid_note, device):
    cols = "| run | experiment | L1 | L1 green | L1 red | CC | CC green | CC red | CC20 | train L1 | gap | FID | " \
           "ms/map batched | ms/map alone |"
    lines = [f"Split: {args.split}; device: {device}; FID: {fid_note}", "", cols, "|" + "---|" * 14]
    for size, base in baselines.items():
        for name, m in base.items():
            lines.append(f"| {name} map ({size} px) | baseline | {fmt(m['l1'])} | {fmt(m['l1_green'])} | "
                         f"{fmt(m['l1_red'])} | {fmt(m['cc'], 3)} | {fmt(m['cc_green'], 3)} | {fmt(m['cc_red'], 3)} "
                         f"| {fmt(m['cc20'], 3)} | — | — | — | — | — |")
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['run']} | {r['experiment']} | {fmt(m['l1'])} | {fmt(m['l1_green'])} | {fmt(m['l1_red'])} "
                     f"| {fmt(m['cc'], 3)} | {fmt(m['cc_green'], 3)} | {fmt(m['cc_red'], 3)} | {fmt(m['cc20'], 3)} "
                     f"| {fmt(m['train_l1'])} | {m['gap_l1']:+.4f} | {fmt(m['fid'], 1)} | "
                     f"{m['ms_per_map_batched']:.2f} | {m['ms_per_map_batch1']:.1f} |")
    cats = sorted({c for r in rows for c in r["per_category"]})
    if cats:
        lines += ["", "Per category (L1 / CC):", "",
                  "| category | n | " + " | ".join(r["run"] for r in rows) + " |", "|---|---|" + "---|" * len(rows)]
        for c in cats:
            n = next(r["per_category"][c]["n"] for r in rows if c in r["per_category"])
            lines.append(f"| {c} | {n} | " + " | ".join(
                f"{fmt(r['per_category'][c]['l1'])} / {fmt(r['per_category'][c]['cc'], 3)}"
                if c in r["per_category"] else "—" for r in rows) + " |")
    lines += ["", "Commands:", ""] + [f"- {r['run']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- your images
def predict_images(args, device):
    """Maps and overlays for the user's own photos, with one run's best checkpoint."""
    if not args.images:
        common.fail("--predict needs --images PHOTO [PHOTO ...]")
    run = expand_runs([args.predict])[0]
    predict, run_args, name = load_predictor(run, device, args.sample_steps, args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = run_args.size
    predict(torch.zeros(1, 3, size, size, device=device))               # warm-up
    for path in map(Path, args.images):
        try:
            with Image.open(path) as im:
                photo = im.convert("RGB")
        except (OSError, ValueError) as e:
            common.fail(f"{path}: not a decodable image ({e})")
        x = torch.from_numpy(np.asarray(photo.resize((size, size), Image.BICUBIC))).permute(2, 0, 1)[None]
        x = common.to_model_range(x).to(device)
        vms, seconds = timed(predict, x, device=device)
        vms = F.interpolate(common.to_unit(vms.float()).clamp(0, 1).cpu(), size=(photo.height, photo.width),
                            mode="bilinear", align_corners=False)[0]
        vms_img = Image.fromarray((vms * 255).round().byte().permute(1, 2, 0).numpy())
        alpha = Image.fromarray((vms[:2].amax(0) * 0.85 * 255).round().byte().numpy())  # stronger where memorable
        overlay = Image.composite(vms_img, photo, alpha)
        vms_img.save(out / f"{path.stem}_vms.png")
        overlay.save(out / f"{path.stem}_overlay.png")
        print(f"{path}: {photo.width}x{photo.height} -> {out / (path.stem + '_vms.png')}, "
              f"{out / (path.stem + '_overlay.png')}; {1000 * seconds:.1f} ms for the map ({name} on {device})")


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    device = common.pick_device(args.device)
    if args.predict:
        return predict_images(args, device)
    if not args.runs:
        common.fail("give run folders to compare (or --predict RUN --images ...); see --help")
    runs = expand_runs(args.runs)
    weights, why = common.inception_weights(args.inception_weights)
    if args.inception_weights and weights is None:
        common.fail(why)
    inception = common.InceptionV3FID(weights) if weights else None
    fid_note = f"{weights.name}" if weights else f"unavailable ({why})"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets, baselines, rows, preds, ccs = {}, {}, [], [], []
    for run in runs:
        saved = json.loads((run / "args.json").read_text()) if (run / "args.json").exists() else {}
        final = json.loads((run / "final.json").read_text()) if (run / "final.json").exists() else {}
        source = args.data or (None if final.get("data") == "synthetic" else final.get("data") or saved.get("data"))
        key = (source, saved.get("size", 64))
        if key not in datasets:
            try:
                datasets[key] = common.load_data(source, key[1], device)
            except common.DataError as e:
                common.fail(str(e))
            d = datasets[key]
            ys = (d.val_y, d.train_y) if args.split == "val" else (d.train_y, d.train_y)
            baselines[f"{key[1]}"] = common.baseline_metrics(common.to_unit(d.train_y).cpu(),
                                                             common.to_unit(ys[0]).cpu())
        row, pred, cc = evaluate_run(run, datasets[key], args, device, inception)
        rows.append(row)
        preds.append((key, pred))
        ccs.append(cc)
    (out / "results.md").write_text(results_markdown(rows, baselines, args, fid_note, device))
    (out / "results.json").write_text(json.dumps({"split": args.split, "device": str(device), "fid": fid_note,
                                                  "baselines": baselines, "runs": rows}, indent=1))

    # Figures: the same images across runs; each run's best and worst maps (by per-image CC); training curves.
    key0 = preds[0][0]
    d = datasets[key0]
    x, y = (d.val_x, d.val_y) if args.split == "val" else (d.train_x, d.train_y)
    same = [p * 2 - 1 for k, p in preds if k == key0]
    common.save_grid(out / "compare.png", [x[:args.rows], y[:args.rows]] + [p[:args.rows] for p in same])
    for (key, pred), cc, r in zip(preds, ccs, rows):
        dk = datasets[key]
        xk, yk = (dk.val_x, dk.val_y) if args.split == "val" else (dk.train_x, dk.train_y)
        order = [i for i in torch.argsort(torch.nan_to_num(cc, nan=-2), descending=True).tolist() if not cc[i].isnan()]
        pick = order[:3] + order[-3:]
        common.save_grid(out / f"best_worst_{r['run']}.png", [xk[pick], yk[pick], pred[pick] * 2 - 1])
    training_curves(rows, out)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and figures in {out}")


if __name__ == "__main__":
    main()
