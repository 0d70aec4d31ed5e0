"""Turn trained runs into a shipped model folder: the weights in float16 where that changes no metric by more than
0.0001, with what they score and where they come from.

    python tools/ship.py runs/e/lite0-s0 --out models/exp1-lite0 --data PATH        # one run
    python tools/ship.py runs/e/lite0-s0 runs/e/inc-s0 --out models/vms --data PATH  # an ensemble: the mean map

A single run becomes a run folder without last.pt (best.pt, args.json, final.json); several become an ensemble: one
such folder per member and an ensemble.json that names them, which evaluate.py reads as one model. The val metrics
(L1, CC, CC green, CC red, CC20) are computed before and after the conversion on the run's own data and recorded
(final.json's val_*, or ensemble.json's); `shipped` records the runs, their float32 metrics and the commit.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import evaluate  # noqa: E402

KEYS = ("l1", "l1_green", "l1_red", "cc", "cc_green", "cc_red", "cc20")


def scores(folders, data, device):
    """The val metrics of the runs in `folders` as one model (an ensemble when several)."""
    runs = [evaluate.Run(f, device, data=data) for f in folders]
    model = runs[0] if len(runs) == 1 else evaluate.Ensemble(runs)
    maps = common.to_unit(model.maps("val")[0].float()).cpu()
    return {k: v for k, v in common.map_metrics(maps, common.to_unit(model.data.y["val"]).cpu()).items() if k in KEYS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (with best.pt, args.json and final.json)")
    p.add_argument("--out", required=True, help="the model folder to write (it must not exist yet)")
    p.add_argument("--data", default=None, help="VISCHEMA PLUS folder, where the runs' recorded one is elsewhere")
    args = p.parse_args(argv)
    out, device = Path(args.out), torch.device("cpu")
    if out.exists():
        common.fail(f"--out {out}: already exists")
    folders = [Path(r) for r in args.runs]
    before = scores(folders, args.data, device)
    members = [out] if len(folders) == 1 else [out / f.name for f in folders]
    for src, dst in zip(folders, members):
        dst.mkdir(parents=True)
        ck = torch.load(src / "best.pt", map_location="cpu", weights_only=True)
        ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
        torch.save(ck, dst / "best.pt")
        for name in ("args.json", "final.json"):
            shutil.copy(src / name, dst / name)
    after = scores(members, args.data, device)
    worst = max(abs(after[k] - before[k]) for k in KEYS)
    if worst > 1e-4:
        shutil.rmtree(out)
        common.fail(f"float16 weights change a metric by {worst:.6f} (more than 0.0001); not shipped")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    shipped = {"from": [str(f) for f in folders], "float32": before, "float16_largest_change": worst, "commit": commit}
    record = {**{"val_" + k: v for k, v in after.items()}, "shipped": shipped}
    if len(folders) == 1:
        final = json.loads((out / "final.json").read_text())
        (out / "final.json").write_text(json.dumps({**final, **record}, indent=1))
    else:
        (out / "ensemble.json").write_text(json.dumps({"members": [m.name for m in members], **record}, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: " + ", ".join(f"{k} {after[k]:.4f}" for k in KEYS) + f" (float16; largest change {worst:.6f}); "
          f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
