"""The study's figures, drawn from the committed results alone (no run), and a run's training curves.

    python study/figures.py study                           # every figure: study/results -> study/figures/*.svg, .png
    python study/figures.py study answer                    # one of them (answer, spread, languages, probe, thesis)
    python study/figures.py run runs/prime-<time>           # its metrics.jsonl -> runs/prime-<time>/curves.svg, .png
    python study/figures.py run runs/finetune-a runs/finetune-b --out runs/a-vs-b   # several runs overlaid

Needs matplotlib (requirements-test.txt); nothing else in the project imports it. The same inputs give the same
bytes (one bundled font, glyphs as paths, no date, a fixed hash salt for the SVG's ids), so a figure that changes in
a diff is data that changed. A run that is still going is drawn up to its last complete line.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
# Every study with its table, first to last; the last two, powered and pre-registered, are set apart.
STUDIES = [("first study", "final"), ("replication", "replication"), ("v2", "v2"), ("v3", "v3"),
           ("v3 replication", "v3-replication"), ("v3, another CPU", "v3-cpu2"), ("v4", "v4"), ("v5", "v5")]
SET_APART = ("v4", "v5")
COMPARISONS = ["prime - none", "prime - multitask", "prime - maml", "multitask - none"]
BAND = (-1, 1)  # v4's and v5's pre-registered equivalence band: an interval inside it is "equivalent within 1 F1"
SPREAD = {"v5": ["prime - multitask", "prime - none", "multitask - none"],
          "v4": ["prime - multitask", "prime - maml", "prime - none", "multitask - none"]}
LANGUAGE_COMPARISONS = ["prime - none", "prime - multitask"]
V6_TABLES = ["v6", "v6-study-partial"]  # the final table, else the latest partial one
V6_COMPARISONS = ["prime[lora] -> lora - prime[houlsby] -> lora",  # primary: matched minus mismatched priming
                  "prime[houlsby] -> houlsby - prime[lora] -> houlsby",
                  "prime[lora] -> lora - none -> lora", "prime[houlsby] -> houlsby - none -> houlsby"]
PROBES = {"prime": "probe-v4-world1001-prime", "multitask": "probe-v4-world1001-multitask"}  # v4's, world 1001
RUN_PANELS = {"meta_loss": "meta-loss", "loss": "loss", "grad_norm": "gradient norm", "lr": "learning rate",
              "dev_f1": "source dev F1"}
COLORS = {"v4": "#1f77b4", "v5": "#d62728", "v6": "#9467bd", "base": "#7f7f7f", "prime": "#d62728",
          "multitask": "#2ca02c"}
STYLE = {"svg.hashsalt": "metapeft", "svg.fonttype": "path", "font.family": "DejaVu Sans", "font.size": 9,
         "axes.spines.top": False, "axes.spines.right": False}


class FigureError(Exception):
    """A missing or malformed input: one line that names the file."""


def load_json(path):
    """A JSON file's contents; a missing or malformed file is a FigureError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FigureError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FigureError(f"{path}: not valid JSON ({e})") from None


def field(report, path, *keys):
    """report[k1][k2]...; a missing key is a FigureError naming the file and the keys."""
    for i, k in enumerate(keys):
        if not isinstance(report, dict) or k not in report:
            raise FigureError(f"{path}: no {'/'.join(map(str, keys[:i + 1]))} (expected an experiment.json)")
        report = report[k]
    return report


def interval(report, path, comparison, column="avg"):
    """(mean, low, high) of a paired difference in an experiment.json, or None where its methods were not run."""
    if comparison not in field(report, path, "paired"):
        return None
    d = field(report, path, "paired", comparison, column)
    ci = field(report, path, "paired", comparison, column, "ci95")
    if not (isinstance(ci, list) and len(ci) == 2):
        raise FigureError(f"{path}: paired/{comparison}/{column}/ci95: expected [low, high], got {ci!r}")
    return field(d, path, "mean"), ci[0], ci[1]


def per_world(report, path, comparison):
    """The per-world differences a - b of the target average, in the table's order of worlds."""
    a, b = comparison.split(" - ")
    return [field(report, path, "scores", a, str(s), "avg") - field(report, path, "scores", b, str(s), "avg")
            for s in field(report, path, "seeds")]


def tables(results):
    """{study: (path, experiment.json)} of every study in STUDIES."""
    return {name: (results / f"{stem}.json", load_json(results / f"{stem}.json")) for name, stem in STUDIES}


def worlds(report, path):
    """'first-last' of a table's worlds."""
    seeds = field(report, path, "seeds")
    return f"{seeds[0]}-{seeds[-1]}"


def draw_answer(results):
    """Forest plot: each study's paired differences with 95% intervals, one panel per comparison."""
    studies = tables(results)
    rows = list(studies)
    y = {name: -(i + (1 if name in SET_APART else 0)) for i, name in enumerate(rows)}  # a gap before them
    gap = max(y[name] for name in SET_APART) + 1
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, len(COMPARISONS), sharey=True, sharex=True)
    for ax, comparison in zip(axes, COMPARISONS):
        ax.axvspan(*BAND, color="#e8e8e8", zorder=0)
        ax.axvline(0, color="black", linewidth=0.8, zorder=1)
        ax.axhline(gap, color="#bbbbbb", linewidth=0.6, linestyle=":")
        for name, (path, report) in studies.items():
            found = interval(report, path, comparison)
            apart = name in SET_APART
            if found is None:
                ax.text(0, y[name], "not run", ha="center", va="center", color="#777777", fontsize=8,
                        bbox={"facecolor": "white", "edgecolor": "none"})
                continue
            mean, lo, hi = found
            color = COLORS.get(name, "black")
            ax.plot([lo, hi], [y[name]] * 2, color=color, linewidth=2.2 if apart else 1.2, gid=f"ci:{name}:{comparison}")
            ax.plot([mean], [y[name]], "o" if apart else "s", color=color, markersize=6 if apart else 4,
                    gid=f"mean:{name}:{comparison}")
            if apart:
                ax.annotate(f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]", (mean, y[name]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7, color=color,
                            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.3})
        ax.set_title(comparison, fontsize=10)
        ax.set_xlabel("Δ target-average F1")
    axes[0].set_yticks([y[n] for n in rows], [f"{n} ({worlds(studies[n][1], studies[n][0])})" for n in rows])
    for label, name in zip(axes[0].get_yticklabels(), rows):
        label.set_fontweight("bold" if name in SET_APART else "normal")
    powered = " and ".join(f"{n} ({len(field(studies[n][1], studies[n][0], 'seeds'))} worlds)" for n in SET_APART)
    fig.suptitle("Paired per-world difference with 95% t-interval; grey: the pre-registered [-1, +1] band; "
                 f"{powered} powered to decide", fontsize=9)
    return fig


def worlds_row(ax, y, report, path, comparison, color, name):
    """One comparison at height y: each world's difference (a dot), the mean and its 95% interval (a bar above
    them). Returns the row's label: how many worlds went each way."""
    diffs = per_world(report, path, comparison)
    jitter = [((i * 0.6180339887) % 1 - 0.5) * 0.5 for i in range(len(diffs))]  # fixed, no random draw
    ax.scatter(diffs, [y + j for j in jitter], s=6, color=color, alpha=0.55, linewidths=0,
               gid=f"worlds:{name}:{comparison}")
    mean, lo, hi = interval(report, path, comparison)
    ax.plot([lo, hi], [y + 0.38] * 2, color="black", linewidth=2, gid=f"ci:{name}:{comparison}")
    ax.plot([mean], [y + 0.38], "|", color="black", markersize=9, markeredgewidth=2)
    return f"{name} {comparison}\n{sum(d > 0 for d in diffs)} of {len(diffs)} worlds above 0"


def spread_axes(fig):
    """An axes with the equivalence band and the zero line, for worlds_row's rows."""
    ax = fig.subplots()
    ax.axvspan(*BAND, color="#e8e8e8", zorder=0)
    ax.axvline(0, color="black", linewidth=0.8, zorder=1)
    ax.set_xlabel("per-world difference of the target-average test F1 (x100); bar: mean and 95% t-interval")
    return ax


def draw_spread(results):
    """Each world's difference in v5 and v4, with the mean and its interval: how many worlds went each way."""
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    ax = spread_axes(fig)
    labels = []
    for study, comparisons in SPREAD.items():
        path = results / f"{study}.json"
        report = load_json(path)
        for comparison in comparisons:
            labels.append(worlds_row(ax, -len(labels), report, path, comparison, COLORS[study], study))
    ax.set_yticks(range(0, -len(labels), -1), labels, fontsize=8)
    return fig


def draw_thesis(results):
    """v6, "know where you're going": each world's matched minus mismatched priming per downstream method (the
    primary comparisons) and matched priming against none, with the means and their intervals. From the final
    table (v6.json), else the latest partial one, then titled as descriptive."""
    path = next((p for p in (results / f"{stem}.json" for stem in V6_TABLES) if p.exists()),
                results / f"{V6_TABLES[0]}.json")
    report = load_json(path)
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = spread_axes(fig)
    labels = [worlds_row(ax, -i, report, path, c, COLORS["v6"] if i < 2 else COLORS["base"], "v6")
              for i, c in enumerate(V6_COMPARISONS)]
    ax.set_yticks(range(0, -len(labels), -1), [label.removeprefix("v6 ") for label in labels], fontsize=8)
    seeds = field(report, path, "seeds")
    partial = ", PARTIAL: descriptive, not the verdict" if field(report, path, "partial") else ""
    fig.suptitle(f"v6, {len(seeds)} worlds ({worlds(report, path)}){partial}\ntop two (primary): priming for the "
                 "PEFT method that follows minus priming for the other; below: minus no priming", fontsize=9)
    return fig


def draw_languages(results):
    """Per language (the source and each target) and the target average: v4's and v5's intervals."""
    langs = None
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, len(LANGUAGE_COMPARISONS), sharey=True, sharex=True)
    for ax, comparison in zip(axes, LANGUAGE_COMPARISONS):
        ax.axvspan(*BAND, color="#e8e8e8", zorder=0)
        ax.axvline(0, color="black", linewidth=0.8, zorder=1)
        for offset, study in ((0.15, "v4"), (-0.15, "v5")):
            path = results / f"{study}.json"
            report = load_json(path)
            cols = [c for c in field(report, path, "paired", comparison) if c != "select"]
            langs = langs or cols
            for i, lang in enumerate(langs):
                mean, lo, hi = interval(report, path, comparison, lang)
                ax.plot([lo, hi], [-i + offset] * 2, color=COLORS[study], linewidth=1.6,
                        gid=f"ci:{study}:{comparison}:{lang}")
                ax.plot([mean], [-i + offset], "o", color=COLORS[study], markersize=4,
                        label=f"{study} ({len(field(report, path, 'seeds'))} worlds)" if i == 0 else None)
        ax.set_title(comparison, fontsize=10)
        ax.set_xlabel("Δ test F1 (x100), 95% t-interval")
    names = [f"{lang} (source)" if i == 0 else "target avg" if lang == "avg" else lang for i, lang in enumerate(langs)]
    axes[0].set_yticks([-i for i in range(len(langs))], names)
    axes[-1].legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def markdown_tables(path):
    """{first header cell: rows of cells} of every table in a Markdown file."""
    found, rows = {}, None
    for line in Path(path).read_text().splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = found.setdefault(cells[0], [])
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        else:
            rows = None
    return found


def load_probe(results, stem):
    """A probe's theta change per layer group and its PEFT dev-F1 curves (x100: source and target average, of the
    base and the primed encoder): from STEM.json (probe.py's probe.json) if committed, else from its STEM.md."""
    path = results / f"{stem}.json"
    if path.exists():
        r = load_json(path)
        curve = field(r, path, "dev_f1_curve")
        return {"theta": field(r, path, "theta_change"),
                "curve": {who: {int(step): (100 * next(iter(f1.values())), 100 * f1["target avg"])
                                for step, f1 in field(curve, path, who).items()} for who in ("base", "primed")}}
    path = results / f"{stem}.md"
    if not path.exists():
        raise FigureError(f"{path}: missing (and no {stem}.json)")
    found = markdown_tables(path)
    try:
        theta = {g: float(c) for g, c in found["layer group"]}
        steps = [(int(r[0]), [float(x) for x in r[1:5]]) for r in found["PEFT steps"]]
    except (KeyError, ValueError) as e:
        raise FigureError(f"{path}: expected probe.py's tables 'layer group' and 'PEFT steps' ({e!r})") from None
    return {"theta": theta, "curve": {"base": {s: (v[0], v[2]) for s, v in steps},
                                      "primed": {s: (v[1], v[3]) for s, v in steps}}}


def draw_probe(results):
    """The probes: the PEFT learning curve of each primed encoder against its base, and how far priming moved theta."""
    probes = {method: load_probe(results, stem) for method, stem in PROBES.items()}
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    curve_ax, theta_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    base = next(iter(probes.values()))["curve"]["base"]
    for who, curve in [("base", base)] + [(m, p["curve"]["primed"]) for m, p in probes.items()]:
        steps = sorted(curve)
        name = "base (not primed)" if who == "base" else f"primed: {who}"
        curve_ax.plot(steps, [curve[s][1] for s in steps], "o-", color=COLORS[who], markersize=3, label=name,
                      gid=f"curve:{who}:target avg")
        curve_ax.plot(steps, [curve[s][0] for s in steps], "o--", color=COLORS[who], markersize=3, linewidth=0.9,
                      gid=f"curve:{who}:source")
    curve_ax.set_xscale("log", base=2)
    curve_ax.set_xticks(sorted(base), [str(s) for s in sorted(base)])
    curve_ax.minorticks_off()
    curve_ax.set_xlabel("PEFT fine-tuning steps")
    curve_ax.set_ylabel("dev F1 (x100): source dashed, target avg solid")
    curve_ax.legend(fontsize=8, frameon=False, loc="center right", bbox_to_anchor=(1, 0.6))
    curve_ax.set_title("PEFT learning curve, world 1001 (v4)", fontsize=10)
    groups = list(next(iter(probes.values()))["theta"])
    width = 0.8 / len(probes)
    for k, (method, p) in enumerate(probes.items()):
        xs = [i + (k - (len(probes) - 1) / 2) * width for i in range(len(groups))]
        theta_ax.bar(xs, [100 * p["theta"][g] for g in groups], width, color=COLORS[method], label=method,
                     gid=f"theta:{method}")
    theta_ax.set_xticks(range(len(groups)), groups, rotation=30)
    theta_ax.set_ylabel("‖θ primed − θ base‖ / ‖θ base‖ (%)")
    theta_ax.legend(fontsize=8, frameon=False)
    theta_ax.set_title("change of θ per layer group", fontsize=10)
    return fig


STUDY_FIGURES = {"answer": draw_answer, "spread": draw_spread, "languages": draw_languages, "probe": draw_probe,
                 "thesis": draw_thesis}


def read_metrics(folder):
    """The steps logged in a run folder's metrics.jsonl; a last line still being written is left out."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise FigureError(f"{path}: missing (expected a run folder of train.py's prime, finetune or pretrain stage)")
    text = path.read_text()
    lines = text.split("\n")
    complete, partial = lines[:-1], lines[-1]  # text after the last newline is a line still being written
    steps = []
    for n, line in enumerate(complete, 1):
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FigureError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(steps[-1], dict) or "step" not in steps[-1]:
            raise FigureError(f"{path}:{n}: expected an object with a step")
    if not steps:
        raise FigureError(f"{path}: no complete step logged yet" + (" (one being written)" if partial else ""))
    return steps


def draw_run(folders):
    """One panel per metric the runs logged (meta-loss, loss, gradient norm, learning rate, dev F1 with its best
    step marked), each run a line."""
    runs = {Path(f): read_metrics(f) for f in folders}
    keys = [k for k in RUN_PANELS if any(k in s for steps in runs.values() for s in steps)]
    fig = Figure(figsize=(3.2 * len(keys), 3), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for folder, steps in runs.items():
        name = f"{folder.name} ({steps[0].get('stage', '?')})"
        for ax, key in zip(axes, keys):
            points = [(s["step"], s[key]) for s in steps if s.get(key) is not None]
            if not points:
                continue
            line, = ax.plot(*zip(*points), "o-" if key == "dev_f1" else "-", markersize=3, linewidth=1,
                            label=name, gid=f"{key}:{folder}")
            if key == "dev_f1":  # the checkpoint fine-tuning keeps: the first step with the highest dev F1
                best = max(points, key=lambda p: p[1])
                ax.plot(*best, "*", color=line.get_color(), markersize=12, gid=f"best:{folder}")
                ax.annotate(f"best {best[1]:.3f} at {best[0]}", best, textcoords="offset points", xytext=(4, -12),
                            fontsize=7)
    for ax, key in zip(axes, keys):
        ax.set_title(RUN_PANELS[key], fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7, frameon=False)
    return fig


def save(fig, stem):
    """stem.svg and stem.png, each written whole (temp file + rename), with no date or version in them."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    for fmt, metadata in (("svg", {"Date": None, "Creator": None}), ("png", {"Software": None})):
        path = Path(f"{stem}.{fmt}")
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format=fmt, metadata=metadata, dpi=150)
        os.replace(tmp, path)
        print(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("study", help="the study's figures from its committed results")
    s.add_argument("names", nargs="*", help=f"which of {', '.join(STUDY_FIGURES)} (default: all)")
    s.add_argument("--results", type=Path, default=HERE / "results", help="the folder of the result files")
    s.add_argument("--out", type=Path, default=HERE / "figures", help="where NAME.svg and NAME.png are written")
    r = sub.add_parser("run", help="a run's metrics.jsonl curves; several runs overlaid")
    r.add_argument("folders", nargs="+", help="run folders (their metrics.jsonl)")
    r.add_argument("--out", help="STEM of STEM.svg and STEM.png (default: FIRST_FOLDER/curves)")
    args = p.parse_args(argv)
    if args.what == "study" and not set(args.names) <= set(STUDY_FIGURES):
        p.error(f"study: unknown figure(s) {', '.join(sorted(set(args.names) - set(STUDY_FIGURES)))} "
                f"(choose from {', '.join(STUDY_FIGURES)})")
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # the same bytes whatever a matplotlibrc says
        matplotlib.rcParams.update(STYLE)
        try:
            if args.what == "study":
                for name in args.names or STUDY_FIGURES:
                    save(STUDY_FIGURES[name](args.results), args.out / name)
            else:
                save(draw_run(args.folders), args.out or Path(args.folders[0]) / "curves")
        except FigureError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
