"""The experiment that compares the methods: a cell per seed and method (prime or not -> finetune -> eval, with
train.py's stages and every train.py flag), in --jobs processes; one table of per-language F1 with each method's
paired per-seed difference from the others (mean, 95% t-interval, wins).

    python study/experiment.py --preset quick                        # the testbed, 2 seeds: minutes on 2 cores
    python study/experiment.py --per-world --seed 1 --seeds 10       # seed s on its own testbed world s
    python study/experiment.py --model xlm-roberta-base/ --data panx/ --prime-langs de,es,nl,ru,zh \
        --methods none,prime --seeds 3

The folder (--out) keeps each cell's runs, config.json and results.json, and experiment.json / experiment.md;
finished cells are kept, so a killed experiment resumes (the same command with --resume --out DIR).
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # the repository (train.py, data.py) on the path, where python put study/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import argparse
import contextlib
import json
import math
import multiprocessing
import os
import signal
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict

import torch
import train
from train import METHODS, UsageError, log, read_json, write_json, write_text

SEED_STRIDE = 1000  # run r of a cell with seed s uses seed s + 1000 r: the first run is the single-run cell's


def experiment(args, out, model_dir, data_dir):
    """Runs the cells not finished yet, then writes experiment.json (each cell's scores: F1 x 100, `avg` the target
    average, `select` the priming languages' dev F1; mean +- std per method; paired differences) and experiment.md."""
    methods, seeds = args.methods.split(","), list(range(args.seed, args.seed + args.seeds))
    # One thread count for every cell whatever --jobs is, so the table is too (it changes how float sums are split).
    threads = args.threads or 1
    jobs = args.jobs or (max(1, os.cpu_count() // threads) if train.device_of(args).type == "cpu" else 1)
    inputs = dict.fromkeys(seeds, (model_dir, data_dir))
    if args.per_world:
        worlds = [(Path(f"{args.testbed}-{s}") / "log.txt", train.testbed, args, s) for s in seeds]
        inputs = {call[-1]: dirs for call, dirs in run_jobs(jobs, threads, worlds)}
    source, prime_langs, evals = train.resolve_languages(args, inputs[seeds[0]][1])
    train.warn_if_not_zero_shot(prime_langs, evals)
    folder = lambda s, m: out / f"seed{s}" / cell_name(args, m)[1]
    todo = [(folder(s, m) / "log.txt", cell, args, folder(s, m), *inputs[s], m, s)
            for s in seeds for m in methods if not cell_done(folder(s, m), cell_runs(args, m))]
    todo.sort(key=lambda call: call[-2] == "none")  # the short cells last: no process idles while one primes
    for n, (call, result) in enumerate(run_jobs(jobs, threads, todo), 1):
        log(f"experiment: cell {n}/{len(todo)} done: seed {call[-1]}, {call[-2]}: target avg F1 "
            f"{100 * result['target_avg_f1']:.1f}")
    named = {cell_name(args, m)[0]: m for m in methods}  # from here on, cells go by name (prime[houlsby] -> lora)
    methods = list(named)
    results = {n: {s: read_json(folder(s, m) / "results.json") for s in seeds} for n, m in named.items()}

    # select: what hyper-parameters are chosen by, the priming languages' mean dev F1 (no target-language label)
    select = lambda r: statistics.mean([f for l, f in r["dev_f1"].items() if l != source] or [r["dev_f1"][source]])
    cols = [source] + evals + ["avg", "select"]
    scores = {m: {s: {l: 100 * r["f1"][l] for l in [source] + evals} | {"avg": 100 * r["target_avg_f1"],
                                                                         "select": 100 * select(r)}
                  for s, r in results[m].items()} for m in methods}
    spread = lambda v: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
    summary = {m: {c: spread([scores[m][s][c] for s in seeds]) for c in cols} for m in methods}
    ordered = sorted(methods, key=lambda m: METHODS.index(named[m]))  # a - b for every b before a in METHODS
    vs = {f"{a} - {b}": {c: paired([scores[a][s][c] - scores[b][s][c] for s in seeds]) for c in cols}
          for i, a in enumerate(ordered) for b in ordered[:i]}
    report = {"seeds": seeds, "per_world": args.per_world, "scores": scores, "summary": summary, "paired": vs}
    runs = {m: {s: [{k: r[k] for k in ("prime_seed", "finetune_seed", "target_avg_f1", "f1", "dev_f1")}
                    for r in res["runs"]] for s, res in results[m].items() if "runs" in res} for m in methods}
    if any(runs.values()):
        report["runs"] = runs

    ci = lambda d: f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else ""
    table = (f"| method | {source} (source) | " + " | ".join(evals) + " | target avg | selection (dev) "
             "| Δ avg vs none [95% CI] | wins |\n" + "|---" * (len(cols) + 3) + "|\n")
    for m in methods:
        d = vs.get(f"{m} - none", {}).get("avg")
        cells = [f"{summary[m][c]['mean']:.1f} ± {summary[m][c]['std']:.1f}" for c in cols]
        cells += [f"{d['mean']:+.1f} {ci(d)}", f"{d['wins']}/{d['n']}"] if d else ["", ""]
        table += f"| {m} | " + " | ".join(cells) + " |\n"
    per_cell = {m: cell_runs(args, named[m]) for m in methods}
    averaged = "" if set(per_cell.values()) == {1} else (
        " Each cell is the mean of its runs (" + ", ".join(f"{m} {n}" for m, n in per_cell.items())
        + f": --prime-seeds {args.prime_seeds} x --finetune-seeds {args.finetune_seeds}).")
    table += (f"\nEntity F1 (x100) on test, mean ± std over {args.seeds} seed(s) from {args.seed}, "
              f"{'one testbed world per seed' if args.per_world else 'one world'}.{averaged} Δ: mean per-seed "
              f"difference from none on the target average, 95% t-interval (-0.0: below zero by less than 0.05); "
              f"wins: seeds where it beats none. selection: dev F1 of the priming languages (no target labels), what "
              f"hyper-parameters are chosen by.\n")
    if vs:
        table += "\n| paired, target avg | Δ | 95% CI | wins |\n|---|---|---|---|\n" + "".join(
            f"| {k} | {d['avg']['mean']:+.1f} | {ci(d['avg'])} | {d['avg']['wins']}/{d['avg']['n']} |\n"
            for k, d in vs.items())
    write_json(out / "experiment.json", report)
    write_text(out / "experiment.md", table)
    print(table)
    log(f"experiment: table in {out}/experiment.md")


def cell(args, run, model_dir, data_dir, method, seed):
    """One experiment cell: --prime-seeds priming runs with `method` (none: one), each fine-tuned --finetune-seeds
    times and evaluated; it scores the mean of its runs (results.json). A cell of one run is that run."""
    run.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    primed_with = None if method == "none" else priming(args, method)
    if args.primed and method != "none":
        primed_with |= {"model": args.primed}
    write_json(run / "config.json", config | {"method": method, "seed": seed, "primed_with": primed_with})
    runs, single = [], cell_runs(args, method) == 1
    for i in range(1 if method == "none" else args.prime_seeds):
        prime_seed, folder = seed + SEED_STRIDE * i, run if single else run / f"prime{i}"
        primed = (model_dir if method == "none" else Path(args.primed) if args.primed
                  else train.prime_stage(primer(args), folder / "prime", model_dir, data_dir, method, prime_seed))
        for j in range(args.finetune_seeds):
            finetune_seed, leaf = seed + SEED_STRIDE * j, folder if single else folder / f"finetune{j}"
            tuned = train.finetune_stage(args, leaf / "finetune", primed, data_dir, finetune_seed)
            runs.append(train.eval_stage(args, leaf, tuned, data_dir) | {"prime_seed": prime_seed,
                                                                          "finetune_seed": finetune_seed})
    if single:
        return runs[0]
    mean = lambda key: {l: statistics.mean(r[key][l] for r in runs) for l in runs[0][key]}
    result = {"f1": mean("f1"), "dev_f1": mean("dev_f1"),
              "target_avg_f1": statistics.mean(r["target_avg_f1"] for r in runs), "runs": runs}
    write_json(run / "results.json", result)
    return result


def priming(args, method):
    """How a cell of `method` primes ({"mode", "peft"}, as train.py's primed.json records it)."""
    return json.loads(json.dumps({"mode": method, "peft": asdict(train.peft_config(primer(args)))}))  # lists


def primer(args):
    """The flags priming runs with: the cell's, its inner loop simulating --prime-peft."""
    return argparse.Namespace(**vars(args) | {"peft": prime_peft(args)})



def prime_peft(args):
    """The PEFT method that priming simulates: --prime-peft, by default the one fine-tuning uses (--peft)."""
    return args.prime_peft or args.peft


def cell_name(args, method):
    """A cell's name in the table and its folder under seed<s>/: `prime[X] -> Y` and prime-X when it primes for PEFT
    X but fine-tunes with Y, else (as for `none`) the method's own name for both."""
    if method == "none" or prime_peft(args) == args.peft:
        return method, method
    return f"{method}[{prime_peft(args)}] -> {args.peft}", f"{method}-{prime_peft(args)}"


def cell_runs(args, method):
    """How many prime -> finetune runs score one cell of `method`."""
    return (1 if method == "none" else args.prime_seeds) * args.finetune_seeds


def cell_done(run, n_runs):
    """Whether the cell in folder `run` has finished with n_runs runs (a cell of one run keeps no list of runs)."""
    path = run / "results.json"
    return path.exists() and len(read_json(path).get("runs", [None])) == n_runs


def paired(diffs):
    """Mean of per-seed paired differences, its 95% t confidence interval (None for one seed), and wins (> 0)."""
    n, mean = len(diffs), statistics.mean(diffs)
    half = t_quantile(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "ci95": None if half is None else [mean - half, mean + half],
            "wins": sum(d > 0 for d in diffs), "n": n}


def t_quantile(p, dof):
    """Student's t quantile for p > 0.5: bisection on the CDF, the CDF by Simpson's rule on the density."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    pdf = lambda t: c * (1 + t * t / dof) ** (-(dof + 1) / 2)
    cdf = lambda x, n=1000: 0.5 + x / n / 3 * sum((1 if i in (0, n) else 2 + 2 * (i % 2)) * pdf(i * x / n)
                                                  for i in range(n + 1))
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < p else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def run_jobs(jobs, threads, calls):
    """Each call (log_file, fn, *fn_args) as fn(*fn_args) at `threads` CPU threads: here when jobs is 1, else in
    `jobs` spawned processes with their output in log_file. Yields (call, result) as each ends."""
    if jobs == 1 or len(calls) < 2:
        torch.set_num_threads(threads)
        yield from ((call, call[1](*call[2:])) for call in calls)
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=cell_process,
                               initargs=(threads, str(os.getpid())))

    def stop(signum, frame):  # Ctrl-C or SIGTERM to this process (or to all): the cells are ended below
        raise train.Interrupted(f"experiment: stopped by {signal.Signals(signum).name}, its finished cells kept",
                                signum)

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        futures = {pool.submit(logged, *call): call for call in calls}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except train.Interrupted:  # here or in a cell: no cell is left running without this process (outputs are atomic)
        for p in multiprocessing.active_children():
            p.kill()
        raise
    except BrokenProcessPool:  # a cell's process was killed (out of memory?) or crashed: the pool stops the others
        raise UsageError(f"experiment: a cell's process stopped, its cell unfinished; the finished cells are kept: "
                         f"resume with the same command and --resume --out {train.PROGRESS['out']}") from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        pool.shutdown(cancel_futures=True)


def cell_process(threads, parent):
    """A process of run_jobs' pool: `threads` threads, and it ends with the experiment's process (`parent`), even
    one killed by kill -9, so no cell runs on in a folder whose lock is gone."""
    train.die_with_parent(parent)
    torch.set_num_threads(threads)


def logged(path, fn, *fn_args):
    """fn(*fn_args) with its standard output and error appended to the file `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*fn_args)


def make_parser():
    """train.py's flags (every cell runs with them) and the experiment's."""
    p = train.make_parser("experiment", __doc__)
    a = p.add_argument_group("experiment").add_argument
    a("--methods", type=train.names, default=",".join(METHODS), help="comma-separated methods to compare")
    a("--seeds", type=train.at_least_1, default=3, help="seeds per method (seed, seed+1, ...)")
    a("--prime-seeds", type=train.at_least_1, default=1, help="priming runs per cell (seeds seed, seed+1000, ...), "
      "each fine-tuned --finetune-seeds times; the cell scores the mean of its runs (none: one, unprimed)")
    a("--finetune-seeds", type=train.at_least_1, default=1,
      help="fine-tuning runs per primed encoder (seed, seed+1000, ...)")
    a("--prime-peft", choices=("lora", "houlsby", "pfeiffer"), help="PEFT method that priming simulates (its "
      "settings: --lora-* / --adapter-*), fine-tuning then using --peft from a fresh phi; default: --peft")
    a("--primed", help="fine-tune this primed model (a cell's prime/model folder) in the priming cell "
      "instead of priming again: one seed, one priming run, and the priming its primed.json records must be "
      "--methods' and --prime-peft's (to fine-tune one primed encoder with several PEFT methods)")
    a("--per-world", action="store_true", help="testbed only: seed s runs on its own world, --testbed-seed s")
    a("--jobs", type=train.at_least_0, default=0, help="processes running the cells (and worlds), logs in their "
      "folders; 0: cores / --threads on a CPU, 1 on a GPU; the table is the same bit for bit for every N")
    return p


def check(args):
    """What the flags' types cannot check: combinations, and each method's priming configuration."""
    if args.per_world and (args.model or args.data):
        raise UsageError("--per-world: only on the testbed (no --model, --data)")
    for m in args.methods.split(","):
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
        if m != "none":
            train.prime_config(args, m)
    if args.primed:
        primed_cells = [m for m in args.methods.split(",") if m != "none"]
        if len(primed_cells) != 1 or args.seeds != 1 or args.prime_seeds != 1:
            raise UsageError("--primed: one priming method in --methods, --seeds 1 and --prime-seeds 1 (it is one "
                             "primed model)")
        record, want = train.primed_with(args.primed), priming(args, primed_cells[0])
        if record is None:
            raise UsageError(f"--primed {args.primed}: no {train.PRIMED_FILE} there (not a model a prime stage saved)")
        if record != want:
            raise UsageError(f"--primed {args.primed}: {train.PRIMED_FILE} says {record}, but these flags prime "
                             f"with {want}")
    if args.phi_init == "primed" and prime_peft(args) != args.peft:
        raise UsageError(f"--phi-init primed: priming learns a {prime_peft(args)} init, but --peft is {args.peft} "
                         f"(fine-tuning with another PEFT method starts from a fresh phi)")


def main(argv=None):
    """The experiment's command line, train.py's errors and interruptions handled as there."""
    with train.command_line() as run:
        args = train.parse_args(argv, make_parser)
        check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        model_dir, data_dir = (None, None) if args.per_world else train.resolve_inputs(args)
        run.out = train.start_run(args, "experiment", make_parser, keep=True)  # it keeps the finished cells
        train.log_presets(args)
        train.note_testbed(args, data_dir)
        experiment(args, run.out, model_dir, data_dir)


if __name__ == "__main__":
    main()
