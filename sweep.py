"""The study's hyperparameter search (§4.2): coordinate descent, one trial per subprocess, resumable and parallel.

    python sweep.py exp1 --dry-run                       # the plan: coordinates, options, number of trials
    python sweep.py exp2 --epochs 100 --jobs 4           # run it; restart the same command after any crash
    python sweep.py exp1 --epochs 20 --seeds 3 -- --size 64 --depth 4  # after --: flags for every trial

Coordinate descent: start from estimated defaults; for one hyperparameter at a time, train one model for every
option of it with the others fixed (with --seeds N, N models, seeds 0 .. N-1), keep the best by the mean L1 (or CC)
on each trial's selection split, move on to the next; the val split only reports. A configuration that was already
trained (the incumbent reappears in every later coordinate) is not trained again. A flag the search varies cannot
be given after -- (it would silently win).

Each trial is `python expN_*.py <settings> <extra args> --out DIR/<trial> --epochs E [--seed S] [--resume]`; its
score is read from its final.json, and DIR/results.jsonl gets one line per finished (trial, seed). A restarted sweep
reads that file, repeats nothing finished, and resumes an unfinished trial from its last.pt. A trial that crashes or
diverges is recorded with its status and never chosen. On a CPU, each of the --jobs trials gets cores / jobs threads.
"""
import argparse
import copy
import ctypes
import fcntl
import hashlib
import importlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
EXPERIMENTS = {"exp1": "exp1_unet", "exp2": "exp2_gan", "exp3": "exp3_diffusion"}

# ------------------------------------------------------------------------------------------ the study's spaces
# A space: the starting settings and the coordinates in search order. An option is the flags it sets; "when" makes a
# coordinate conditional on the incumbent's settings. A --space JSON file has the same shape.
OPTIMISERS = [("sgd", "0.005"), ("sgd", "0.01"), ("sgd", "0.02"), ("adam", "0.0005"), ("adam", "0.001"),
              ("adam", "0.002"), ("adadelta", "0.5"), ("adadelta", "1"), ("adadelta", "2")]
BETAS = [["0.9", "0.999"], ["0", "0.999"], ["0.5", "0.999"]]
ADAM_LR = f"{common.DEFAULT_LR['adam']:g}"  # the experiments' own default, from their one table


def coordinate(name, flag, values):
    return {"name": name, "options": [{flag: v} for v in values]}


def optimiser_coordinates(p=""):
    """Optimiser with its learning rate, then Adam's betas only if Adam won (p: "" for exp1, "g-" or "d-" for exp2)."""
    return [{"name": f"{p}opt", "options": [{f"--{p}opt": o, f"--{p}lr": lr} for o, lr in OPTIMISERS]},
            {**coordinate(f"{p}betas", f"--{p}betas", BETAS), "when": {f"--{p}opt": "adam"}}]


SPACES = {
    "exp1": {"start": {"--c": "64", "--opt": "adam", "--lr": ADAM_LR, "--betas": BETAS[0]},
             "coordinates": [coordinate("norm", "--norm", ["batch", "instance"]),
                             coordinate("c", "--c", ["32", "64", "50", "100"]), *optimiser_coordinates()]},
    "exp2": {"start": {"--c": "64", "--d-c": "64", "--g-opt": "adam", "--g-lr": ADAM_LR, "--g-betas": BETAS[0],
                       "--d-opt": "adam", "--d-lr": ADAM_LR, "--d-betas": BETAS[0]},
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
                   "they are spread over them, and several may share one; on a CPU each gets cores / jobs threads")
    p.add_argument("--seeds", type=int, default=1, help="train every trial with seeds 0 .. N-1 and score it by the "
                   "mean; seed 0 is the trial's plain run, so a larger N later adds seeds without repeating any")
    p.add_argument("--only", default=None, help="comma-separated coordinates to search (default: all, in order)")
    p.add_argument("--metric", choices=["sel_l1", "sel_cc"], default="sel_l1", help="what picks the winner, on "
                   "each trial's selection split (the val split only reports; with -- --selection 0 it is the val "
                   "split itself): lowest L1 or highest CC")
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


def score(rows, metric):
    """A trial's score from its rows (one per seed): the mean metric, smaller is better (CC negated); a trial
    with an unfinished, failed or diverged seed is never chosen."""
    if not rows or any(r["status"] != "ok" or r.get(metric) is None for r in rows):
        return float("inf")
    mean = statistics.mean(r[metric] for r in rows)
    return mean if metric.endswith("l1") else -mean


def print_plan(exp, space, coords, epochs, seeds):
    start = as_args(space["start"])
    print(f"{exp} sweep plan: coordinate descent, {epochs} epochs per trial"
          + (f", {seeds} seeds each" if seeds > 1 else "") + f"; start {' '.join(start) or '(defaults)'}")
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
                               if conditional else "")
          + (f", {total * seeds} runs with {seeds} seeds" if seeds > 1 else ""))


def check_extra(parser, extra, coords, space, seeds):
    """The flags after --, as the experiment's parser reads them: refuses a flag that a searched coordinate varies
    (appended after the trial's settings it would win, and the trials' names would lie) or that the sweep sets
    itself, and returns the start settings without those that -- replaces."""
    flag_dest = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:  # a copy of the parser that parses without defaults
        if action.option_strings and action.dest != "help":
            quiet._add_action(copy.copy(action)).default = argparse.SUPPRESS
    given, unknown = quiet.parse_known_args(extra)
    if unknown:
        common.fail(f"after --: {parser.prog} does not take {' '.join(unknown)}")
    given = vars(given)
    own = {"out": "the sweep's --out", "epochs": "the sweep's --epochs", "resume": "the sweep itself"}
    if seeds > 1:
        own["seed"] = "the sweep's --seeds"
    for dest, by in own.items():
        if dest in given:
            common.fail(f"after --: --{dest.replace('_', '-')} is set by {by}; leave it out after --")
    for coord in coords:
        for flag in {f for option in coord["options"] for f in option}:
            if flag not in flag_dest:
                common.fail(f"coordinate {coord['name']}: {parser.prog} has no flag {flag}")
            if flag_dest[flag] in given:
                common.fail(f"after --: {flag} is what the sweep's coordinate '{coord['name']}' varies; leave it "
                            f"out after -- (or leave the coordinate out with --only)")
    replaced = [f for f in space["start"] if flag_dest.get(f) in given]
    if replaced:
        print(f"start: {', '.join(replaced)} replaced by the value after --")
    return {f: v for f, v in space["start"].items() if f not in replaced}


def cpu_threads(jobs):
    """Threads for each of `jobs` CPU trials running at once: an even share of this process's cores, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs), cores


class Runner:
    """Launches trials as subprocesses, at most `jobs` at once, spread over the visible GPUs (on a CPU: each with
    an even share of the cores as its thread count)."""

    def __init__(self, args, script, extra, out):
        self.args, self.script, self.extra, self.out = args, script, extra, out
        self.gpus = [] if args.launcher else visible_gpus()
        self.threads = cpu_threads(args.jobs)[0] if not self.gpus and not args.launcher else None
        self.running = {}  # key -> (Popen, trial, started, gpu)

    def start(self, trial):
        folder = self.out / trial["name"]
        folder.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (folder / "last.pt").exists() else []  # continue an unfinished trial
        seed = ["--seed", str(trial["seed"])] if trial["seed"] else []
        cmd = shlex.split(self.args.launcher) + [sys.executable, str(HERE / self.script), *as_args(trial["config"]),
                                                 *self.extra, *seed, "--out", str(folder), "--epochs",
                                                 str(trial["epochs"]), *resume]
        env, prefix = dict(os.environ), {}
        if self.gpus:  # the GPU with the fewest trials on it
            gpu = min(self.gpus, key=lambda g: sum(1 for *_, used in self.running.values() if used == g))
            prefix = {"CUDA_VISIBLE_DEVICES": gpu}
        elif self.threads:
            prefix = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        env.update(prefix)
        log = open(folder / "sweep.log", "a")
        log.write(f"$ {''.join(f'{k}={v} ' for k, v in prefix.items())}{shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                preexec_fn=die_with_parent)
        log.close()
        self.running[trial["key"]] = (proc, trial, time.time(), prefix.get("CUDA_VISIBLE_DEVICES"))

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
    return {"trial": trial["name"], "key": trial["key"], "config": trial["config_key"], "seed": trial["seed"],
            "coordinate": trial["coordinate"], "option": trial["label"], "args": as_args(trial["config"]),
            "status": status, **{k: final.get(k, final.get("val" + k[3:])) for k in ("sel_l1", "sel_cc")},
            "val_l1": final.get("val_l1"), "val_cc": final.get("val_cc"),
            "seconds": round(seconds, 1), "epochs": trial["epochs"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    module = EXPERIMENTS[args.exp]
    if not (HERE / f"{module}.py").exists():
        common.fail(f"{module}.py not found next to sweep.py")
    parser = importlib.import_module(module).build_parser()
    parser.prog = f"{module}.py"
    epochs = args.epochs or parser.get_default("epochs")
    try:
        space = json.loads(Path(args.space).read_text()) if args.space else SPACES[args.exp]
        coords = [c for c in space["coordinates"] if not args.only or c["name"] in args.only.split(",")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        common.fail(f"--space {args.space}: not a readable search space ({type(e).__name__}: {e})")
    known = [c["name"] for c in space["coordinates"]]
    unknown = sorted(set(args.only.split(",")) - set(known)) if args.only else []
    if unknown:
        common.fail(f"--only {args.only}: unknown coordinate {', '.join(unknown)} (known: {', '.join(known)})")
    if min(args.jobs, epochs, args.seeds) < 1:
        common.fail("--jobs, --epochs and --seeds must be at least 1")
    space = {**space, "start": check_extra(parser, extra, coords, space, args.seeds)}
    print_plan(args.exp, space, coords, epochs, args.seeds)
    if args.dry_run:
        return
    out = common.writable_folder(args.out or f"runs/sweep-{args.exp}")
    lock = open(out / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        common.fail(f"another sweep is running in {out}")
    results_path = out / "results.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = {"seed": 0, "config": row["key"], **row}  # rows of sweeps before --seeds
        print(f"sweep: {len(done)} finished runs in {results_path} will not run again")
    runner = Runner(args, f"{module}.py", extra, out)
    if runner.threads:
        print(f"sweep: CPU trials, {args.jobs} at once with {runner.threads} thread(s) each "
              f"({cpu_threads(args.jobs)[1]} cores)")
    try:
        best_rows = descend(args, space, coords, epochs, runner, done, results_path)
    except KeyboardInterrupt:
        for proc, *_ in runner.running.values():
            proc.kill()
        print(f"\ninterrupted; finished trials are kept in {results_path}: run the same command again to continue")
        sys.exit(130)
    report(args, module, out, done, best_rows, extra, args.full_epochs or parser.get_default("epochs"))


def descend(args, space, coords, epochs, runner, done, results_path):
    """Coordinate descent: train every option of one coordinate (each seed, those not in `done`), keep the best by
    the mean over seeds, go on. Returns the final incumbent's rows (None if nothing finished well)."""
    incumbent, best_rows = dict(space["start"]), None
    t0, ran = time.time(), 0
    for coord in coords:
        if not applies(coord, incumbent):
            print(f"[{coord['name']}] skipped: needs " + ", ".join(f"{f} {v}" for f, v in coord["when"].items()))
            continue
        trials = []
        for option in coord["options"]:  # the incumbent with this coordinate set to each option
            config = {**incumbent, **option}
            key, label = key_of(config), label_of(option)
            trials.append([{"key": key + (f"-s{seed}" if seed else ""), "config_key": key, "config": config,
                            "seed": seed, "coordinate": coord["name"], "label": label, "epochs": epochs,
                            "name": f"{coord['name']}-{label}-{key}" + (f"-s{seed}" if seed else "")}
                           for seed in range(args.seeds)])
        queue = [run for runs in trials for run in runs if run["key"] not in done]
        print(f"[{coord['name']}] {len(trials)} options, {len(queue)} runs to train: "
              + " | ".join(runs[0]["label"] + ("" if any(r in queue for r in runs) else " (done)") for runs in trials),
              flush=True)
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
            shown = (f"selection L1 {common.fmt(row['sel_l1'])} CC {common.fmt(row['sel_cc'], 3)}; val L1 "
                     f"{common.fmt(row['val_l1'])} CC {common.fmt(row['val_cc'], 3)}"
                     if row["status"] == "ok" else row["status"])
            print(f"  {row['coordinate']}={row['option']}" + (f" seed {row['seed']}" if args.seeds > 1 else "")
                  + f": {shown} ({row['seconds']:.0f} s); {left} left in this coordinate, ETA {eta / 60:.1f} min",
                  flush=True)
        rows = [[done[r["key"]] for r in runs] for runs in trials]
        winner = min(range(len(trials)), key=lambda i: score(rows[i], args.metric))
        if score(rows[winner], args.metric) == float("inf"):
            print(f"[{coord['name']}] no trial finished well; keeping the incumbent")
            continue
        incumbent, best_rows = trials[winner][0]["config"], rows[winner]
        print(f"[{coord['name']}] best: {trials[winner][0]['label']} ({args.metric} "
              f"{abs(score(best_rows, args.metric)):.4f}" + (f", mean of {args.seeds} seeds" if args.seeds > 1 else "")
              + ")", flush=True)
    return best_rows


def summary(rows, metric):
    """"mean +- sd" of a metric over a trial's seeds ("—" when a seed has none)."""
    values = [r.get(metric) for r in rows]
    if not values or None in values:
        return "—"
    digits = 4 if metric.endswith("l1") else 3
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{sd}"


def report(args, module, out, done, best_rows, extra, full_epochs):
    """The leaderboard (every trial, best first, mean +- sd over its seeds), best.json, and the command that trains
    the winner in full."""
    trials = {}
    for row in done.values():
        trials.setdefault(row["config"], []).append(row)
    ranked = sorted(trials.values(), key=lambda rows: score(rows, args.metric))
    lines = ["| rank | trial | setting | seeds | status | selection L1 | selection CC | val L1 | val CC | seconds |",
             "|---" * 10 + "|"]
    for i, rows in enumerate(ranked, 1):
        rows.sort(key=lambda r: r["seed"])
        status = ", ".join(sorted({r["status"] for r in rows}))
        lines.append(f"| {i} | {rows[0]['trial']} | {rows[0]['coordinate']}={rows[0]['option']} | {len(rows)} | "
                     f"{status} | {summary(rows, 'sel_l1')} | {summary(rows, 'sel_cc')} | {summary(rows, 'val_l1')} | "
                     f"{summary(rows, 'val_cc')} | {sum(r['seconds'] for r in rows):.0f} |")
    table = "\n".join(lines)
    (out / "leaderboard.md").write_text(table + "\n")
    print("\n" + table)
    if best_rows is None:
        print("\nno trial finished well; no best.json")
        return
    top = best_rows[0]
    command = shlex.join(["python", f"{module}.py", *top["args"], *extra, "--epochs", str(full_epochs)])
    best = {"experiment": module, "metric": args.metric, "trial": top["trial"], "args": top["args"],
            "seeds": len(best_rows), **{k: statistics.mean(r[k] for r in best_rows) for k in ("sel_l1", "sel_cc",
                                                                                                 "val_l1", "val_cc")},
            "epochs": top["epochs"], "command": command}
    (out / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    print(f"\nbest: {top['trial']} (selection L1 {summary(best_rows, 'sel_l1')}, CC {summary(best_rows, 'sel_cc')}; "
          f"val L1 {summary(best_rows, 'val_l1')}, CC {summary(best_rows, 'val_cc')}"
          + (f", {len(best_rows)} seeds" if len(best_rows) > 1 else "") + f"); {out}/best.json\n"
          f"train it in full with:\n  {command}")


if __name__ == "__main__":
    main()
