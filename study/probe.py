"""What priming changed, a primed --model against the --base it started from: the relative change of theta per layer
group, the priming loss on held-out episodes per language, and the PEFT dev-F1 learning curve of each.
probe.json and probe.md in --out; every train.py flag applies (the episodes and the fine-tuning are train.py's).

    python study/probe.py --model runs/prime-<time>/model                 # against the testbed's pretrained encoder
    python study/probe.py --model primed/ --base xlm-roberta-base/ --data panx/
"""
import sys
from pathlib import Path

if __name__ == "__main__":  # the repository (train.py, data.py) on the path, where python put study/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
import argparse
import json
import math
import statistics
from dataclasses import replace

import torch

import data
import metapeft
import train
from model import load_pretrained, theta_phi
from train import UsageError, to_device


def probe(args, out, model_dir, data_dir):
    """probe.json: theta_change, meta_loss (per encoder and language), dev_f1_curve; probe.md: the three tables."""
    models = {"base": Path(args.base) if args.base else train.testbed(args, args.testbed_seed)[0], "primed": model_dir}
    source, prime_langs, evals = train.resolve_languages(args, data_dir, model_dir)  # model_dir: its priming.json
    base, primed = (theta_phi(load_pretrained(d))[0] for d in models.values())
    if {n: p.shape for n, p in base.items()} != {n: p.shape for n, p in primed.items()}:
        raise UsageError(f"--base {models['base']} and --model {model_dir}: different architectures")
    group = lambda n: f"layer {n.split('.')[2]}" if n.startswith("encoder.layers.") else "embeddings"
    norm = lambda tensors: math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))
    change = {g: norm(primed[n] - base[n] for n in base if g in ("all", group(n))) /
                 norm(base[n] for n in base if g in ("all", group(n)))
              for g in [*dict.fromkeys(map(group, base)), "all"]}
    tok, have = data.load_tokenizer(model_dir), data.languages(data_dir, "train")
    train_langs = [source] + [l for l in prime_langs + evals if l in have]
    labels, _, examples = train.load_examples(data_dir, "train", train_langs, tok, None, args.max_len)
    examples |= train.load_examples(data_dir, "dev", [l for l in evals if l not in have], tok, labels, args.max_len)[2]
    cfg = replace(train.prime_config(args, "prime"), phi_start="fresh", outer="theta", meta_sgd=False)
    device, pad, loss = train.device_of(args), tok.token_to_id("<pad>"), {}
    for name, folder in models.items():
        model = train.load_model(folder, tok, args, labels=labels, peft=train.peft_config(args)).to(device).train()
        torch.manual_seed(args.seed)  # the same fresh phi and dropout for both encoders
        loss[name] = {}
        for lang in prime_langs + evals:
            episodes = train.episode_config(args, source, [lang], "cross")
            with train.autocast(args, device):
                losses = [metapeft.meta_loss(model, [(to_device(s, device), to_device(q, device)) for s, q in
                                                     data.episodes(examples, episodes, pad, args.seed + 10**6, step)],
                                             cfg).item() for step in range(args.probe_episodes)]
            loss[name][lang] = statistics.mean(losses)
    points = [25 * 2 ** k for k in range(int(math.log2(max(1, args.finetune_steps // 25))) + 1)]
    tune = argparse.Namespace(**vars(args) | {"patience": 0, "eval_every": 25, "phi_init": "fresh",
                                              "curve_langs": ",".join(evals)})
    curve = {}
    for name, folder in models.items():
        train.finetune_stage(tune, out / f"finetune-{name}", folder, data_dir, args.seed)
        lines = [json.loads(l) for l in (out / f"finetune-{name}" / "metrics.jsonl").read_text().splitlines()]
        curve[name] = {l["step"]: {source: l["dev_f1"]} | {lang: l[f"dev_f1_{lang}"] for lang in evals}
                       for l in lines if l["step"] in points}
        for f1 in curve[name].values():
            f1["target avg"] = statistics.mean(f1[lang] for lang in evals)
    train.write_json(out / "probe.json", {"base": str(models["base"]), "primed": str(model_dir),
                                          "theta_change": change, "meta_loss": loss, "dev_f1_curve": curve})
    md = ("| layer group | ‖θ primed − θ base‖ / ‖θ base‖ |\n|---|---|\n"
          + "".join(f"| {g} | {c:.2e} |\n" for g, c in change.items())
          + "\n| held-out priming loss | base | primed |\n|---|---|---|\n"
          + "".join(f"| {lang} ({'priming' if lang in prime_langs else 'target'}) | {loss['base'][lang]:.4f} | "
                    f"{loss['primed'][lang]:.4f} |\n" for lang in prime_langs + evals)
          + f"\n| PEFT steps | {source} dev F1 base | primed | target dev F1 avg base | primed |\n" + "|---" * 5 + "|\n"
          + "".join(f"| {p} | " + " | ".join(f"{100 * curve[m][p][c]:.1f}" for c in (source, "target avg")
                                             for m in models) + " |\n" for p in points))
    train.write_text(out / "probe.md", md)
    print(md)
    train.log(f"probe: tables in {out}/probe.md, numbers in probe.json")


def make_parser():
    """train.py's flags (the episodes and fine-tuning use them) and the probe's."""
    p = train.make_parser("probe", __doc__)
    a = p.add_argument_group("probe").add_argument
    a("--base", help="the unprimed encoder --model was primed from; omitted: the testbed's pretrained one")
    a("--probe-episodes", type=train.at_least_1, default=10, help="held-out meta-batches per language")
    return p


def check(args):
    """What the flags' types cannot check."""
    if args.model is None:
        raise UsageError("probe: give the primed encoder as --model (and the unprimed one as --base)")
    if args.base is None and args.data is not None:
        raise UsageError("probe with --data: give the unprimed encoder as --base")
    if args.finetune_steps < 25:
        raise UsageError(f"probe: --finetune-steps {args.finetune_steps}: the learning curve needs at least 25")
    train.prime_config(args, "prime")


def main(argv=None):
    """The probe's command line, train.py's errors and interruptions handled as there."""
    with train.command_line() as run:
        args = train.parse_args(argv, make_parser)
        check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        model_dir, data_dir = train.resolve_inputs(args)
        run.out = train.start_run(args, "probe", make_parser)
        train.log_presets(args)
        train.note_testbed(args, data_dir)
        probe(args, run.out, model_dir, data_dir)


if __name__ == "__main__":
    main()
