"""The study's hyperparameter search (§4.2): coordinate descent, one trial per subprocess, resumable and parallel.

    python sweep.py exp1 --dry-run                       # the plan: coordinates, options, number of trials
    python sweep.py exp2 --epochs 100 --jobs 4           # run it; restart the same command after any crash
    python sweep.py exp1 --epochs 20 -- --size 64 --c 16 # everything after -- goes to every trial

Coordinate descent: start from estimated defaults; for one hyperparameter at a time, train one model for every
option of it with the others fixed, keep the best by val L1 (or val CC), move on to the next. A configuration that
was already trained (the incumbent reappears in every later coordinate) is not trained again.

Each trial is `python expN_*.py <settings> <extra args> --out DIR/<trial> --epochs E --resume`; its score is read
from its final.json, and DIR/results.jsonl gets one line per finished trial. A restarted sweep reads that file,
repeats no finished trial, and resumes an unfinished one from its last.pt. A trial that crashes or diverges is
recorded with its status and never chosen.
"""
import argparse
import ctypes
import fcntl
import hashlib
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = {"exp1": "exp1_unet", "exp2": "exp2_gan", "exp3": "exp3_diffusion"}

# ------------------------------------------------------------------------------------------ the study's spaces
# A space: the starting settings and the coordinates in search order. An option is the flags it sets; "when" makes a
# coordinate conditional on the incumbent's settings. A --space JSON file has the same shape.
OPTIMISERS = [("sgd", "0.005"), ("sgd", "0.01"), ("sgd", "0.02"), ("adam", "0.0005"), ("adam", "0.001"),
              ("adam", "0.002"), ("adadelta", "0.5"), ("adadelta", "1"), ("adadelta", "2")]
BETAS = [["0.9", "0.999"], ["0", "0.999"], ["0.5", "0.999"]]


def coordinate(name, flag, values):
    return {"name": name, "options": [{flag: v} for v in values]}


def optimiser_coordinates(p=""):
    """Optimiser with its learning rate, then Adam's betas only if Adam won (p: "" for exp1, "g-" or "d-" for exp2)."""
    return [{"name": f"{p}opt", "options": [{f"--{p}opt": o, f"--{p}lr": lr} for o, lr in OPTIMISERS]},
            {**coordinate(f"{p}betas", f"--{p}betas", BETAS), "when": {f"--{p}opt": "adam"}}]


SPACES = {
    "exp1": {"start": {"--c": "64", "--opt": "adam", "--lr": "0.001", "--betas": BETAS[0]},
             "coordinates": [coordinate("norm", "--norm", ["batch", "instance"]),
                             coordinate("c", "--c", ["32", "64", "50", "100"]), *optimiser_coordinates()]},
    "exp2": {"start": {"--c": "64", "--d-c": "64", "--g-opt": "adam", "--g-lr": "0.001", "--g-betas": BETAS[0],
                       "--d-opt": "adam", "--d-lr": "0.001", "--d-betas": BETAS[0]},
             "coordinates": [coordinate("g-norm", "--g-norm", ["batch", "instance"]),
                             coordinate("d-norm", "--d-norm", ["batch", "instance"]),
                             coordinate("c", "--c", ["32", "64", "50", "100"]),
                             coordinate("d-c", "--d-c", ["32", "64", "50", "100"]),
                             optimiser_coordinates("g-")[0], optimiser_coordinates("d-")[0],
                             optimiser_coordinates("g-")[1], optimiser_coordinates("d-")[1]]},
    "exp3": {"start": {"--c": "64"},
             "coordinates": [coordinate("schedule", "--schedule", ["linear", "cosine", "sigmoid"]),
                             coordinate("T", "--T", ["1000", "2000"]), coordinate("c", "--c", ["32", "64"]),
                             coordinate("lr", "--lr", ["0.0001", "0.0002", "0.0005"])]},
}


def build_parser():
    p = argparse.ArgumentParser(description="Coordinate-descent hyperparameter search over one experiment, as in "
                                "the study (§4.2). Arguments after -- are passed to every trial.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("exp", choices=list(EXPERIMENTS), help="which experiment to search")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the experiment's own)")
    p.add_argument("--full-epochs", type=int, default=None, help="epochs in the printed command that trains the "
                   "winner (default: the experiment's own)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-EXP); restart with the same "
                   "folder to continue")
    p.add_argument("--jobs", type=int, default=1, help="trials of one coordinate run at once; with several GPUs "
                   "they are spread over them, and several may share one")
    p.add_argument("--only", default=None, help="comma-separated coordinates to search (default: all, in order)")
    p.add_argument("--metric", choices=["val_l1", "val_cc"], default="val_l1", help="what picks the winner: "
                   "lowest val L1 or highest val CC")
    p.add_argument("--launcher", default="", help="command prefix for each trial, e.g. \"srun -N1 -n1 "
                   "--gres=gpu:1\" (then GPUs are the launcher's business)")
    p.add_argument("--space", default=None, help="a JSON search space {start, coordinates} instead of the study's")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the number of trials, run nothing")
    return p


# ------------------------------------------------------------------------------------------ coordinate descent
def as_args(config):
    """{"--c": "64", "--betas": ["0.9", "0.999"]} -> ["--c", "64", "--betas", "0.9", "0.999"]."""
    return [w for flag, v in config.items() for w in [flag, *(v if isinstance(v, list) else [str(v)])]]


def key_of(config):
    return hashlib.sha1(json.dumps(sorted(config.items())).encode()).hexdigest()[:8]


def label_of(option):
    return "-".join(str(w) for v in option.values() for w in (v if isinstance(v, list) else [v]))


def applies(coord, config):
    return all(config.get(flag) == value for flag, value in coord.get("when", {}).items())


def score(row, metric):
    """Smaller is better; trials that did not finish well are never chosen."""
    if row["status"] != "ok" or row.get(metric) is None:
        return float("inf")
    return row[metric] if metric == "val_l1" else -row[metric]


def print_plan(exp, space, coords, epochs):
    start = as_args(space["start"])
    print(f"{exp} sweep plan: coordinate descent, {epochs} epochs per trial; start {' '.join(start) or '(defaults)'}")
    incumbent, total, conditional = dict(space["start"]), 0, 0
    for i, coord in enumerate(coords):
        new = sum(1 for o in coord["options"] if i == 0 or {**incumbent, **o} != incumbent)
        when = "".join(f" (only if {f} {v} wins)" for f, v in coord.get("when", {}).items())
        reused = f" + {len(coord['options']) - new} reused" if new < len(coord["options"]) else ""
        print(f"  {i + 1}. {coord['name']}{when}: {' | '.join(label_of(o) for o in coord['options'])}  "
              f"-> {new} trials{reused}")
        total += new
        conditional += new if "when" in coord else 0
    print(f"{total} trials" + (f" ({total - conditional} if the conditional coordinates do not apply)"
                               if conditional else ""))


class Runner:
    """Launches trials as subprocesses, at most `jobs` at once, spread over the visible GPUs."""

    def __init__(self, args, script, extra, out):
        self.args, self.script, self.extra, self.out = args, script, extra, out
        self.gpus = [] if args.launcher else visible_gpus()
        self.running = {}  # key -> (Popen, trial, started, gpu)

    def start(self, trial):
        folder = self.out / trial["name"]
        folder.mkdir(parents=True, exist_ok=True)
        cmd = shlex.split(self.args.launcher) + [sys.executable, str(HERE / self.script), *as_args(trial["config"]),
                                                 *self.extra, "--out", str(folder), "--epochs", str(trial["epochs"]),
                                                 "--resume"]
        env, gpu = dict(os.environ), None
        if self.gpus:  # the GPU with the fewest trials on it
            gpu = min(self.gpus, key=lambda g: sum(1 for *_, used in self.running.values() if used == g))
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = open(folder / "sweep.log", "a")
        log.write(f"$ {f'CUDA_VISIBLE_DEVICES={gpu} ' if gpu else ''}{shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=die_with_parent)
        log.close()
        self.running[trial["key"]] = (proc, trial, time.time(), gpu)

    def wait_one(self):
        """Block until a trial ends; returns its results row."""
        while True:
            for key, (proc, trial, started, _) in list(self.running.items()):
                if proc.poll() is not None:
                    del self.running[key]
                    if proc.returncode in (130, -signal.SIGINT):  # Ctrl-C reached the trial: unfinished, not failed
                        raise KeyboardInterrupt
                    return result_row(trial, proc.returncode, time.time() - started, self.out)
            time.sleep(0.2)


def visible_gpus():
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU")]
    except (OSError, subprocess.SubprocessError):
        return []


def die_with_parent():
    """Linux: a trial is killed when the sweep dies (even by kill -9), so a restart never races an orphan."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def result_row(trial, returncode, seconds, out):
    final_path = out / trial["name"] / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() and returncode in (0, 3) else {}
    status = final.get("status") or f"crashed (exit {returncode})"
    return {"trial": trial["name"], "key": trial["key"], "coordinate": trial["coordinate"], "option": trial["label"],
            "args": as_args(trial["config"]), "status": status, "val_l1": final.get("val_l1"),
            "val_cc": final.get("val_cc"), "seconds": round(seconds, 1), "epochs": trial["epochs"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    module = EXPERIMENTS[args.exp]
    if not (HERE / f"{module}.py").exists():
        sys.exit(f"error: {module}.py not found next to sweep.py")
    defaults = importlib.import_module(module).build_parser()
    epochs = args.epochs or defaults.get_default("epochs")
    try:
        space = json.loads(Path(args.space).read_text()) if args.space else SPACES[args.exp]
        coords = [c for c in space["coordinates"] if not args.only or c["name"] in args.only.split(",")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: --space {args.space}: not a readable search space ({type(e).__name__}: {e})")
    known = [c["name"] for c in space["coordinates"]]
    unknown = sorted(set(args.only.split(",")) - set(known)) if args.only else []
    if unknown:
        sys.exit(f"error: --only {args.only}: unknown coordinate {', '.join(unknown)} (known: {', '.join(known)})")
    if args.jobs < 1 or epochs < 1:
        sys.exit("error: --jobs and --epochs must be at least 1")
    print_plan(args.exp, space, coords, epochs)
    if args.dry_run:
        return
    out = Path(args.out or f"runs/sweep-{args.exp}")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"error: another sweep is running in {out}")
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
        print(f"sweep: {len(done)} finished trials in {results_path} will not run again")
    runner = Runner(args, f"{module}.py", extra, out)
    try:
        best_row = descend(args, space, coords, epochs, runner, done, results_path)
    except KeyboardInterrupt:
        for proc, *_ in runner.running.values():
            proc.kill()
        print(f"\ninterrupted; finished trials are kept in {results_path}: run the same command again to continue")
        sys.exit(130)
    report(args, module, out, done, best_row, extra, args.full_epochs or defaults.get_default("epochs"))


def descend(args, space, coords, epochs, runner, done, results_path):
    """Coordinate descent: train every option of one coordinate (those not in `done`), keep the best, go on.
    Returns the results row of the final incumbent (None if nothing finished well)."""
    incumbent, best_row = dict(space["start"]), None
    t0, ran = time.time(), 0
    for coord in coords:
        if not applies(coord, incumbent):
            print(f"[{coord['name']}] skipped: needs " + ", ".join(f"{f} {v}" for f, v in coord["when"].items()))
            continue
        trials = []
        for option in coord["options"]:  # the incumbent with this coordinate set to each option
            config = {**incumbent, **option}
            key, label = key_of(config), label_of(option)
            trials.append({"key": key, "config": config, "coordinate": coord["name"], "label": label,
                           "name": f"{coord['name']}-{label}-{key}", "epochs": epochs})
        todo = [t for t in trials if t["key"] not in done]
        print(f"[{coord['name']}] {len(trials)} options, {len(todo)} to train: "
              + " | ".join(t["label"] + ("" if t in todo else " (done)") for t in trials), flush=True)
        queue = list(todo)
        while queue or runner.running:
            while queue and len(runner.running) < args.jobs:
                runner.start(queue.pop(0))
            row = runner.wait_one()
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            done[row["key"]] = row
            ran += 1
            left = len(queue) + len(runner.running)
            eta = (time.time() - t0) / ran * left / args.jobs
            shown = f"val L1 {row['val_l1']:.4f} CC {row['val_cc']:.3f}" if row["status"] == "ok" else row["status"]
            print(f"  {row['coordinate']}={row['option']}: {shown} ({row['seconds']:.0f} s); "
                  f"{left} left in this coordinate, ETA {eta / 60:.1f} min", flush=True)
        winner = min(trials, key=lambda t: score(done[t["key"]], args.metric))
        if score(done[winner["key"]], args.metric) == float("inf"):
            print(f"[{coord['name']}] no trial finished well; keeping the incumbent")
            continue
        incumbent, best_row = winner["config"], done[winner["key"]]
        print(f"[{coord['name']}] best: {winner['label']} ({args.metric} {best_row[args.metric]:.4f})", flush=True)
    return best_row


def report(args, module, out, done, best_row, extra, full_epochs):
    """The leaderboard (every trial, best first), best.json, and the command that trains the winner in full."""
    rows = sorted(done.values(), key=lambda r: score(r, args.metric))
    lines = ["| rank | trial | setting | status | val L1 | val CC | seconds |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        fmt = lambda v, d: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {i} | {r['trial']} | {r['coordinate']}={r['option']} | {r['status']} | "
                     f"{fmt(r['val_l1'], 4)} | {fmt(r['val_cc'], 3)} | {r['seconds']:.0f} |")
    table = "\n".join(lines)
    (out / "leaderboard.md").write_text(table + "\n")
    print("\n" + table)
    if best_row is None:
        print("\nno trial finished well; no best.json")
        return
    command = shlex.join(["python", f"{module}.py", *best_row["args"], *extra, "--epochs", str(full_epochs)])
    best = {"experiment": module, "metric": args.metric, "trial": best_row["trial"], "args": best_row["args"],
            "val_l1": best_row["val_l1"], "val_cc": best_row["val_cc"], "epochs": best_row["epochs"],
            "command": command}
    (out / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    print(f"\nbest: {best_row['trial']} (val L1 {best_row['val_l1']:.4f}, CC {best_row['val_cc']:.3f}); "
          f"{out}/best.json\ntrain it in full with:\n  {command}")


if __name__ == "__main__":
    main()
