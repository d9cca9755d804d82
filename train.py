"""metapeft command line: pretrain -> prime -> finetune -> eval, and export.

    python train.py --stage prime                      # the built-in synthetic testbed (made on first use)
    python train.py --stage finetune --model runs/prime-.../model
    python train.py --stage eval --model runs/finetune-.../model
    python train.py --stage prime --model xlm-roberta-base/ --data panx/   # real checkpoint and PAN-X data
    python train.py --stage export --model runs/prime-.../model --format hf-mlm --out primed-xlmr/
    torchrun --standalone --nproc_per_node=4 train.py --stage prime ...   # the meta-batch over 4 processes

Every run writes to its own folder: config.json (all resolved flags) and its outputs; training stages
also metrics.jsonl and checkpoint-<stage>.safetensors (prime: checkpoint-prime-<mode>; resume with
--resume --out DIR). study/experiment.py (none / multitask / maml / prime over seeds) and study/probe.py
run these stages. See README.md.
"""
import argparse
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import data
import metapeft
from model import (PEFT_FILE, WRITING, CheckpointError, Config, Model, PeftConfig, all_finite, atomic_write,
                   copy_lm_head, fresh_phi, load_lora_adapter, load_peft, load_pretrained, open_safetensors,
                   read_json, save_lora_adapter, saved_peft_config, theta_phi)

METHODS = ("none", "multitask", "maml", "prime")
PRIMED_FILE = "primed.json"  # beside a primed model: how it was primed (fine-tuning's config.json records it)


class UsageError(Exception):
    """A user mistake, or a run that cannot go on (it diverged): one line, exit code 2, no traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a stage at a step boundary, after a checkpoint.
    args: (message, signal number)."""


# ------------------------------------------------------------ stages

def prime_stage(args, out, model_dir, data_dir, mode, seed):
    """Priming (or an ablation, --mode): saves the primed encoder (+ meta-learned phi) to out/model."""
    source, prime_langs, evals = resolve_languages(args, data_dir)
    warn_if_not_zero_shot(prime_langs, evals)
    tok = data.load_tokenizer(model_dir)
    labels, _, examples = load_examples(data_dir, "train", [source] + prime_langs, tok, None, args.max_len)
    torch.manual_seed(seed)
    model = load_model(model_dir, tok, args, labels=labels, peft=peft_config(args))
    cfg, device = prime_config(args, mode), device_of(args)
    model.to(device).train()
    if mode != "none":
        inner_lrs = metapeft.make_inner_lrs(model, cfg)
        params = metapeft.outer_params(model, cfg, inner_lrs)
        opt = metapeft.make_optimizer(params, cfg.lr, cfg.weight_decay)
        sched = metapeft.make_scheduler(opt, cfg.warmup, args.prime_steps)
        episodes, pad = episode_config(args, source, prime_langs, args.pairing), tok.token_to_id("<pad>")
        state = {"model": model, "opt": opt, "sched": sched}
        if inner_lrs:
            state["inner_lrs"] = TensorsInPlace(inner_lrs)
        steps = train_steps(out, f"prime-{mode}", args.prime_steps, state, None, args, args.resume)
        for step, metrics in steps:
            tasks = data.episodes(examples, episodes, pad, seed, step)
            loss = torch.zeros((), device=device)
            mine = list(my_share(len(tasks), seed, step))  # this process's tasks, computed together
            if mine:  # the meta-loss is the mean over the tasks; each task's fresh phi drawn from its own seed
                with autocast(args, device):
                    share = [tuple(to_device(b, device) for b in tasks[i]) for i in mine]
                    seeds = [task_seed(seed, step, i) for i in mine]
                    loss = metapeft.meta_loss(model, share, cfg, inner_lrs, seeds) * len(mine) / len(tasks)
            norm = metapeft.step(loss, params, opt, sched, cfg.clip)
            metrics |= {"meta_loss": global_sum(loss), "grad_norm": norm, "lr": sched.get_last_lr()[0],
                        "tokens": sum(int(b["attention_mask"].sum()) for task in tasks for b in task)}
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
        record_priming(out / "model", source, prime_langs, mode)
        if mode == "none" or not set(theta_phi(model)[1]) & set(params):  # phi kept its initial draw: no init
            (out / "model" / PEFT_FILE).unlink(missing_ok=True)        # to offer --phi-init primed
        write_json(out / "model" / PRIMED_FILE, {"mode": mode, "peft": asdict(peft_config(args))})
    return out / "model"


def primed_with(model_dir):
    """How the model in model_dir was primed ({"mode", "peft"}: the PEFT method its inner loop simulated),
    or None for a model that no prime stage saved. Fine-tuning may use another PEFT method (a fresh phi)."""
    path = Path(model_dir) / PRIMED_FILE
    return read_json(path) if path.exists() else None


def finetune_stage(args, out, model_dir, data_dir, seed):
    """Downstream PEFT: theta frozen, PEFT + head trained on the source language until its dev F1 stops
    improving; the best source-dev checkpoint is kept (--curve-langs only logs their dev F1).
    Saves out/model."""
    source = resolve_languages(args, data_dir)[0]
    curve = args.curve_langs.split(",") if args.curve_langs else []
    tok = data.load_tokenizer(model_dir)
    labels, _, train = load_examples(data_dir, "train", [source], tok, None, args.max_len)
    _, dev_sents, dev = load_examples(data_dir, "dev", [source] + curve, tok, labels, args.max_len)
    torch.manual_seed(seed)
    model = load_model(model_dir, tok, args, labels=labels, peft=peft_config(args))
    phi = init_phi(args, model, model_dir)
    device = device_of(args)
    model.to(device).train()
    opt = metapeft.make_optimizer(phi, args.finetune_lr, args.weight_decay)
    # Warm-up, then constant: the rate at a step depends neither on the budget nor on when the run stops.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.finetune_warmup + 1)))
    pad = tok.token_to_id("<pad>")
    best = {"f1": -1.0, "step": 0, "phi": {n: p.detach().clone() for n, p in phi.items()}, "dev_f1s": []}
    batch_of_step = epochs_of_batches(train[source], args.batch_size, pad, seed)
    eval_every = args.eval_every or math.ceil(len(train[source]) / args.batch_size)  # 0: once an epoch
    # parse_args saw to it that every process has one micro-batch or more
    micro = args.micro_batch or math.ceil(args.batch_size / rank_world()[1])
    state = {"model": model, "opt": opt, "sched": sched}
    for step, metrics in train_steps(out, "finetune", args.finetune_steps, state, best, args, args.resume):
        batch = batch_of_step(step)
        labelled, params = int(batch["labels"].ne(data.IGNORE).sum()), dict(model.named_parameters())
        loss = torch.zeros((), device=device)
        for i in my_share(math.ceil(len(batch["labels"]) / micro), seed, step):  # a mean over labelled tokens
            with autocast(args, device):
                part = to_device({k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}, device)
                loss = loss + metapeft.ce_loss(model, params, part, labelled)
        metrics |= {"loss": global_sum(loss), "grad_norm": metapeft.step(loss, phi, opt, sched, args.clip),
                    "lr": sched.get_last_lr()[0], "tokens": int(batch["attention_mask"].sum())}
        if (step + 1) % eval_every == 0 or step + 1 == args.finetune_steps:
            f1s = {lang: evaluate(model, f"finetune dev-{lang}", dev[lang], dev_sents[lang], labels, pad,
                                  args.eval_batch_size)["f1"] for lang in [source] + curve}
            metrics |= {f"dev_f1_{lang}": f1s[lang] for lang in curve}  # a learning curve for analysis only
            f1 = metrics["dev_f1"] = f1s[source]
            best["dev_f1s"].append(f1)
            if f1 > best["f1"]:
                best.update(f1=f1, step=step + 1, phi={n: p.detach().clone() for n, p in phi.items()})
            metrics["stop"] = patience_exhausted(best["dev_f1s"], args.patience)
    model.load_state_dict(best["phi"], strict=False)
    if best["dev_f1s"]:
        log(f"finetune: best {source} dev F1 {best['f1']:.4f} at step {best['step']} "
            f"({len(best['dev_f1s'])} dev evaluations)")
    else:
        log("finetune: no steps, phi saved as initialised (no dev evaluation)")
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
    return out / "model"


def init_phi(args, model, model_dir):
    """phi (PEFT + head) as --phi-init says, theta frozen; returns phi (what fine-tuning trains)."""
    theta, phi = theta_phi(model)
    if args.phi_init == "primed":
        peft = peft_config(args)
        if saved_peft_config(model_dir) != peft:  # none saved, or one of another PEFT configuration
            raise UsageError(f"--phi-init primed: {model_dir} has no meta-learned PEFT init for {peft} "
                             f"(priming learns one with --outer theta+phi, or in multitask mode)")
        load_peft(model, model_dir)
    elif args.phi_init == "fresh":  # also replaces a head that priming saved for the same labels
        model.load_state_dict(fresh_phi(model), strict=False)
    else:  # a peft adapter folder: LoRA and head, e.g. trained with peft
        load_lora_adapter(model, args.phi_init)
    for p in theta.values():
        p.requires_grad_(False)
    return phi


def epochs_of_batches(examples, batch_size, pad, seed):
    """A function step -> its batch: data.batches epoch after epoch, each epoch shuffled by (seed, epoch) and
    made when its first step comes (a resumed run starts mid-epoch)."""
    per_epoch = math.ceil(len(examples) / batch_size)
    made = {}  # the current epoch's batches

    def batch_of_step(step):
        epoch = step // per_epoch
        if epoch not in made:
            made.clear()
            made[epoch] = data.batches(examples, batch_size, pad, True, seed, epoch)
        return made[epoch][step % per_epoch]
    return batch_of_step


def patience_exhausted(dev_f1s, patience):
    """Early stopping: whether the best dev F1 so far (the first of equals) is `patience` evaluations old
    (0: never)."""
    return patience > 0 and len(dev_f1s) - 1 - dev_f1s.index(max(dev_f1s)) >= patience


def eval_stage(args, out, model_dir, data_dir):
    """Test F1 of the source and the evaluation languages (--eval-langs, else all); dev F1 of the source and
    of the priming languages with a dev split: --prime-langs, else those the model was primed on (what
    selection may look at: no target-language label). results.json and results.md."""
    source, prime_langs, evals = resolve_languages(args, data_dir, model_dir)
    tok, peft = data.load_tokenizer(model_dir), saved_peft_config(model_dir)
    model = load_model(model_dir, tok, args, peft=peft)
    if peft:
        load_peft(model, model_dir)
    if not model.labels:
        raise UsageError(f"--model {model_dir}: no token-classification head (run the finetune stage first)")
    model.to(device_of(args))
    pad, scores = tok.token_to_id("<pad>"), {}
    dev_langs = [source] + [l for l in prime_langs if l in data.languages(data_dir, "dev")]
    log(f"eval: test sets {', '.join([source] + evals)}; dev sets {', '.join(dev_langs)} (the source and "
        f"priming languages)")
    for split, langs in (("test", [source] + evals), ("dev", dev_langs)):
        _, sents, examples = load_examples(data_dir, split, langs, tok, model.labels, args.max_len)
        scores[split] = {l: evaluate(model, f"eval {split}-{l}", examples[l], sents[l], model.labels, pad,
                                     args.eval_batch_size) for l in langs}
    result = {"model": str(model_dir), "source": source,
              "f1": {l: r["f1"] for l, r in scores["test"].items()},
              "target_avg_f1": data.macro_average({l: scores["test"][l] for l in evals}),
              "dev_f1": {l: r["f1"] for l, r in scores["dev"].items()}, "detail": scores["test"]}
    write_json(out / "results.json", result)
    table = results_table(source, evals, result)
    write_text(out / "results.md", table)
    print(table)
    return result


def results_table(source, evals, result):
    """results.md: one row of test F1 x 100, the source, each evaluation language, their average."""
    header = "| " + " | ".join([f"{source} (source)"] + evals + ["target avg"]) + " |\n"
    rule = "|---" * (len(evals) + 2) + "|\n"
    row = ("| " + " | ".join(f"{100 * result['f1'][l]:.1f}" for l in [source] + evals)
           + f" | {100 * result['target_avg_f1']:.1f} |\n")
    return header + rule + row


def export_stage(args, model_dir, out):
    """--model in another layout, the tokenizer beside it: hf-mlm (XLMRobertaForMaskedLM, with the MLM
    head the encoder was pretrained with), hf-base (XLMRobertaModel), or peft (LoRA + head as a peft adapter
    folder)."""
    if out.resolve() == model_dir.resolve():
        raise UsageError(f"--out {out}: is the --model folder (the export would overwrite its input)")
    if args.format == "peft":
        peft = saved_peft_config(model_dir)
        if peft is None or peft.method != "lora":
            raise UsageError(f"--format peft: {model_dir} has no LoRA parameters (bottleneck adapters have "
                             f"no common format: they stay in peft.safetensors, see README)")
        model = load_peft(load_pretrained(model_dir, peft=peft), model_dir)
        save_lora_adapter(model, out, model_dir.resolve())
    else:
        log(f"export: reading {model_dir}")
        model = load_pretrained(model_dir, mlm=args.format == "hf-mlm")
        log(f"export: writing {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
        model.save_pretrained(out, layout={"hf-mlm": "mlm", "hf-base": "base"}[args.format])
        copy_priming(model_dir, out)
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")


# ------------------------------------------------------------ languages, examples, configs, models

def resolve_languages(args, data_dir, model_dir=None):
    """(source, priming query languages, evaluation languages), checked against the splits of data_dir.
    Evaluation languages: --eval-langs, else every language with a test split but the source; priming
    languages: --prime-langs, else default_prime_langs (model_dir: the model being evaluated)."""
    have = data.languages(data_dir, "train")
    if args.source not in have:
        raise UsageError(f"--data {data_dir}: no train split for the source language {args.source!r} "
                         f"(found {have})")
    targets = [l for l in data.languages(data_dir, "test") if l != args.source]
    queries = (args.prime_langs.split(",") if args.prime_langs
               else default_prime_langs(args, data_dir, model_dir))
    evals = args.eval_langs.split(",") if args.eval_langs else targets
    curve = args.curve_langs.split(",") if args.curve_langs else []
    for flag, langs, split in (("--prime-langs", queries, "train"), ("--eval-langs", evals, "test"),
                               ("--curve-langs", curve, "dev")):
        if args.source in langs:  # priming's queries, the target average and the curve: the other languages
            raise UsageError(f"{flag} {','.join(langs)}: {args.source} is the source language, expected "
                             f"others")
        found = data.languages(data_dir, split)
        for lang in langs:
            if lang not in found:
                raise UsageError(f"{flag}: no {split} split for {lang!r} in {data_dir} "
                                 f"(found {', '.join(found)})")
    return args.source, queries, evals


def warn_if_not_zero_shot(prime_langs, evals):
    """The warning for priming on languages that are also evaluated on."""
    if set(prime_langs) & set(evals):
        log(f"warning: priming languages {sorted(set(prime_langs) & set(evals))} are also evaluated on: "
            f"their labelled data is seen during priming, so that evaluation is not zero-shot")


def default_prime_langs(args, data_dir, model_dir=None):
    """The priming languages when --prime-langs is not given. Never every language of the folder (on PAN-X
    that primes on, and makes eval score the dev sets of, 39 languages): the languages model_dir's encoder was
    primed on (primed_on: what eval's dev F1 reports), else those with training data but no test split (the
    testbed's es, el). Neither: eval scores the source's dev set alone, finetune needs none, and the stages
    that prime refuse, naming the languages found."""
    recorded = primed_on(model_dir)
    if recorded is not None:
        return recorded
    train_langs = [l for l in data.languages(data_dir, "train") if l != args.source]
    tested = set(data.languages(data_dir, "test"))
    langs = [l for l in train_langs if l not in tested]
    if not langs and args.stage not in ("finetune", "eval"):
        raise UsageError(f"--prime-langs: not given, and every language in {data_dir} with training data has "
                         f"a test split (no default: priming on all would leave no zero-shot target); choose "
                         f"among {','.join(train_langs)}")
    return langs


PRIMING_FILE = "priming.json"  # in a model folder: the source and languages its encoder was primed on


def record_priming(model_out, source, prime_langs, mode):
    """The priming record of a saved model folder (finetune and export carry it along: copy_priming)."""
    write_json(Path(model_out) / PRIMING_FILE, {"source": source, "prime_langs": prime_langs, "mode": mode})


def copy_priming(model_dir, out):
    """model_dir's priming record, if it has one, into the model folder `out` (saved from it)."""
    record = Path(model_dir) / PRIMING_FILE
    if record.exists():
        atomic_write(Path(out) / PRIMING_FILE, functools.partial(shutil.copyfile, record))


def primed_on(model_dir):
    """The priming languages recorded in model_dir (None: not a primed model, or no folder)."""
    path = model_dir and Path(model_dir) / PRIMING_FILE
    if not path or not path.exists():
        return None
    langs = read_json(path).get("prime_langs")
    if not isinstance(langs, list) or not all(isinstance(l, str) for l in langs):
        raise CheckpointError(f"{path}: expected a list of language codes in 'prime_langs'")
    return langs


def load_examples(data_dir, split, langs, tok, labels, max_len):
    """(labels, sentences, examples) of a split per language; labels=None: the first language's. Shows
    progress, language by language."""
    sents, examples, sentences = {}, {}, 0
    report = progress(f"load {split}", len(langs), "sent")
    for i, lang in enumerate(langs, 1):
        sents[lang] = data.read_split(data_dir, split, lang)
        labels = labels or data.label_list(sents[lang])
        data.check_labels(sents[lang], labels, str(data.split_path(data_dir, split, lang)))
        examples[lang] = data.encode(sents[lang], tok, {tag: k for k, tag in enumerate(labels)}, max_len)
        sentences += len(sents[lang])
        report(i, sentences)
    return labels, sents, examples


def evaluate(model, name, examples, sentences, labels, pad, batch_size):
    """metapeft.evaluate with a progress line `name` counting sentences (the examples are in their order)."""
    report = progress(name, len(sentences), "sent")

    def sentences_done(n_examples):  # an example is a window of a sentence: count the sentences reached
        report(examples[n_examples - 1].sent + 1)
    return metapeft.evaluate(model, examples, sentences, labels, pad, batch_size, progress=sentences_done)


def episode_config(args, source, query_langs, pairing):
    """Priming episodes: a task's support is --support-batches batches of --support-size source sentences."""
    return data.EpisodeConfig(source_langs=(source,), query_langs=tuple(query_langs),
                              support_size=args.support_size * args.support_batches,
                              query_size=args.query_size, tasks_per_step=args.tasks, pairing=pairing)


def peft_config(args):
    return checked(args, PeftConfig, method=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                   lora_dropout=args.lora_dropout, lora_targets=tuple(args.lora_targets.split(",")),
                   adapter_size=args.adapter_size, adapter_act=args.adapter_act)


def prime_config(args, mode):
    """Priming's config: the flags named as its fields, and --prime-*; the inner AdamW decays by
    --weight-decay."""
    same = {f.name: getattr(args, f.name) for f in fields(metapeft.PrimeConfig) if hasattr(args, f.name)}
    named = {"mode": mode, "inner_weight_decay": args.weight_decay, "lr": args.prime_lr,
             "warmup": args.prime_warmup}
    return checked(args, metapeft.PrimeConfig, **same | named)


def checked(args, config, **kw):
    """config(**kw), whose own checks fail as a UsageError naming flags (a field named as a flag is one)."""
    try:
        return config(**kw)
    except ValueError as e:
        raise UsageError(as_flags(str(e), args)) from None


def as_flags(text, args):
    """text with each word that is a flag's name written as the flag: inner_steps -> --inner-steps."""
    words = re.split(r"(\w+)", text)  # the words at the odd places
    return "".join("--" + w.replace("_", "-") if w in vars(args) else w for w in words)


def device_of(args):
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(args.device)


def autocast(args, device):
    enabled = args.dtype == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def load_model(model_dir, tok, args, **kw):
    """load_pretrained(model_dir, **kw), checked against the tokenizer and --max-len before it runs."""
    model = load_pretrained(model_dir, **kw)
    cfg, n_tokens = model.cfg, max(tok.get_vocab().values()) + 1
    if n_tokens > cfg.vocab_size:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: token ids up to {n_tokens - 1}, but the "
                              f"model's embedding matrix has {cfg.vocab_size} rows (expected the model's own "
                              f"tokenizer)")
    if tok.token_to_id("<pad>") != cfg.pad_token_id:  # padding and the position ids both follow the model's
        raise CheckpointError(f"{model_dir / 'config.json'}: pad_token_id {cfg.pad_token_id}, but the "
                              f"tokenizer's <pad> is {tok.token_to_id('<pad>')}")
    # positions count from pad_token_id + 1
    if args.max_len + cfg.pad_token_id >= cfg.max_position_embeddings:
        raise UsageError(f"--max-len {args.max_len}: {model_dir} has position embeddings for at most "
                         f"{cfg.max_position_embeddings - cfg.pad_token_id - 1} tokens")
    return model


def save_model(model, out, model_dir):
    """The model in the Hugging Face layout, the tokenizer beside it, and model_dir's MLM head if the model
    has none (so it exports as XLMRobertaForMaskedLM). Never non-finite weights."""
    bad = [n for n, p in model.named_parameters() if not all_finite(p)]
    if bad:
        raise UsageError(f"{out}: not saved: non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}")
    model.save_pretrained(out)
    tokenizer = Path(model_dir) / "tokenizer.json"
    atomic_write(Path(out) / "tokenizer.json", functools.partial(shutil.copyfile, tokenizer))
    copy_priming(model_dir, out)
    if model.lm_head is None:
        copy_lm_head(model_dir, out)


# ------------------------------------------------------------ the testbed and pretraining

# World 0's MLM-pretrained encoder ships with the code (so it is the same on every machine, and the first run
# pretrains nothing); `python train.py --stage pretrain --out DIR` rebuilds it in DIR/model from the world's
# regenerated text.
WORLD0 = Path(__file__).resolve().parent / "world0"
WORLD0_SHA256 = {
    "config.json": "da0b299218c41f8766ff78d560bd88e5e31724b634c02a11edf3545ff79b2cbd",
    "model.safetensors": "1239c687da230c3bc787efc5d34868090d89ce67c8dcff197ba8504b03dac943",
    "tokenizer.json": "4111e4f1fff66b130d6e4a191996d8e51abe60af00af0732750e8da0407e517f",
}


def resolve_inputs(args):
    """(model_dir, data_dir): what is not given is the testbed's, so --data alone needs the pretrain stage,
    and --model alone the testbed's tokenizer. None: pretraining from scratch; exporting, or MLM on --text."""
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    if args.model is not None:
        model = Path(args.model)
        for need in ("config.json", "tokenizer.json", "model.safetensors*"):  # *: or a sharded one's index
            if not list(model.glob(need)):
                raise UsageError(f"--model {model}: no {need.rstrip('*')} (expected a Hugging Face "
                                 f"checkpoint folder)")
    pretraining = args.stage == "pretrain"
    if args.data is not None:
        if args.model is None and not pretraining:
            raise UsageError(f"--data without --model: give the checkpoint to use on {args.data} (the "
                             "testbed's encoder fits only the testbed's data)")
        return args.model and Path(args.model), Path(args.data)
    if args.model and (pretraining and args.text or args.stage == "export"):  # what needs no data
        return Path(args.model), None
    model_dir, data_dir = testbed(args, args.testbed_seed, need_model=args.model is None and not pretraining)
    if args.model is None:
        return None if pretraining else model_dir, data_dir
    if (data_dir / "tokenizer.json").read_bytes() != (Path(args.model) / "tokenizer.json").read_bytes():
        raise UsageError(f"--model {args.model} is not a testbed model: give --data"
                         + (" or --text" if pretraining else ""))
    return Path(args.model), data_dir


def testbed(args, seed, need_model=True):
    """(model_dir, data_dir) of testbed world `seed`, made on first use and cached in <--testbed>-<seed>; the
    encoder is world 0's shipped one, or MLM-pretrained on the world's text."""
    root = Path(f"{args.testbed}-{seed}")
    with making(root):
        return make_testbed(args, seed, need_model, root)


def make_testbed(args, seed, need_model, root):
    model_dir, data_dir = root / "pretrain" / "model", root / "data"
    if not (data_dir / "tokenizer.json").exists():
        log(f"testbed: generating the synthetic multilingual world in {data_dir} (seed {seed})")
        shutil.rmtree(root / "data.tmp", ignore_errors=True)
        data.make_world(root / "data.tmp", data.WorldConfig(seed=seed))
        data.write_tokenizer(root / "data.tmp")
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(root / "data.tmp", data_dir)
    if need_model and seed == 0:
        for name, digest in WORLD0_SHA256.items():
            shipped = WORLD0 / name
            if not shipped.exists() or hashlib.sha256(shipped.read_bytes()).hexdigest() != digest:
                raise CheckpointError(f"{shipped}: missing or not the shipped file (SHA-256 differs); `git "
                                      f"checkout world0` restores it")
        if (data_dir / "tokenizer.json").read_bytes() == (WORLD0 / "tokenizer.json").read_bytes():
            return WORLD0, data_dir
        log(f"testbed: {data_dir}/tokenizer.json differs from the shipped {WORLD0}/tokenizer.json (another "
            f"tokenizers release?): world 0's encoder is pretrained here instead")
    if need_model and not (model_dir / "tokenizer.json").exists():  # the tokenizer is copied last
        log("testbed: MLM-pretraining a tiny encoder on the testbed's text (once; it is cached)")
        pretrain_stage(args, root / "pretrain", data_dir, None, seed, resume=True)
    return model_dir, data_dir


def pretrain_stage(args, out, data_dir, model_dir, seed, resume):
    """MLM pretraining: a tiny encoder from scratch on the testbed's text, or continued MLM of --model on
    --text. Saves an XLMRobertaForMaskedLM-layout checkpoint to out/model."""
    tok_dir = model_dir or data_dir
    tok = data.load_tokenizer(tok_dir)
    held_out, train = mlm_examples(args, data_dir, tok)
    torch.manual_seed(seed)  # initialisation, or continued MLM's dropout
    if model_dir:
        model = load_model(model_dir, tok, args, mlm=True)
    else:
        model = tiny_encoder(args, tok.get_vocab_size())
    device, params = device_of(args), dict(model.named_parameters())
    model.to(device).train()
    mask_id, vocab, pad = tok.token_to_id("<mask>"), tok.get_vocab_size(), tok.token_to_id("<pad>")
    opt = metapeft.make_optimizer(params, args.pretrain_lr, args.weight_decay)
    sched = metapeft.make_scheduler(opt, args.pretrain_steps // 20, args.pretrain_steps)
    masks = torch.Generator().manual_seed(seed)

    def held_out_loss():
        g = torch.Generator().manual_seed(12345)  # the same masks before and after
        model.eval()
        with torch.no_grad():
            losses = [metapeft.mlm_loss(model, to_device(b, device), mask_id, vocab, g).item()
                      for b in data.batches(held_out, args.batch_size, pad)]
        model.train()
        return sum(losses) / len(losses)

    extra = {"loss_before": held_out_loss()}
    batch_of_step = epochs_of_batches(train, args.batch_size, pad, seed)
    state = {"model": model, "opt": opt, "sched": sched,
             "masks": SimpleNamespace(state_dict=masks.get_state, load_state_dict=masks.set_state)}
    for step, metrics in train_steps(out, "pretrain", args.pretrain_steps, state, extra, args, resume):
        batch = batch_of_step(step)
        with autocast(args, device):
            loss = metapeft.mlm_loss(model, to_device(batch, device), mask_id, vocab, masks)
        metrics |= {"loss": loss.item(), "grad_norm": metapeft.step(loss, params, opt, sched, args.clip),
                    "lr": sched.get_last_lr()[0], "tokens": int(batch["attention_mask"].sum())}
    extra["loss_after"] = held_out_loss()
    before = "--model" if model_dir else "untrained"
    log(f"pretrain: held-out MLM loss {extra['loss_before']:.3f} ({before}) -> {extra['loss_after']:.3f} "
        f"(pretrained)")
    write_json(out / "pretrain.json", extra)
    save_model(model, out / "model", tok_dir)
    return out / "model"


def mlm_examples(args, data_dir, tok):
    """(held out, train): the MLM text's lines as examples, one in 50 held out; the text is --text, else the
    testbed's unlabeled.txt."""
    text = Path(args.text) if args.text else Path(data_dir) / "unlabeled.txt"
    if not text.exists():
        message = f"--text {text}: file not found" if args.text else f"{text}: not found (give --text)"
        raise UsageError(message)
    lines = [l for l in data.read_text(text).splitlines() if l.strip()]
    if len(lines) < 20:
        raise UsageError(f"--text {text}: {len(lines)} lines of text, expected at least 20")
    rows = [e.ids[:args.max_len - 1] + [tok.token_to_id("</s>")] for e in tok.encode_batch(lines)]
    examples = [data.Example(r, [data.IGNORE] * len(r), i, []) for i, r in enumerate(rows)]
    return examples[::50], [e for i, e in enumerate(examples) if i % 50]


def tiny_encoder(args, vocab_size):
    """The testbed's encoder, untrained: --tiny-hidden wide, --tiny-layers deep, one head per 32 dimensions.
    No dropout: the tiny encoder's MLM loss falls faster without it."""
    width = args.tiny_hidden
    return Model(Config(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=args.tiny_layers,
                        num_attention_heads=width // 32, intermediate_size=4 * width,
                        max_position_embeddings=args.max_len + 2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0), mlm=True)


# ------------------------------------------------------------ run folders, checkpoints, training loop

def log(msg):
    if rank_world()[0] == 0:  # one voice under torchrun
        print(msg, file=sys.stderr, flush=True)


def write_text(path, text):
    def write(tmp):
        Path(tmp).write_text(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def start_run(args, stage, make=None, keep=False):
    """Create the run folder and write the resolved config (or check it against the one being resumed; make:
    the maker of the parser whose defaults the flags are, train.py's by default). keep: a folder that holds
    outputs is used as it is (a script that keeps its finished work there), not refused."""
    out = Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    found = [out, None, []]  # the folder, why it is refused, what it holds
    if rank_world()[0] == 0:
        try:  # the lock before the look: a launch racing this one finds it taken
            if out.is_dir() or not args.resume:  # (--resume of a folder that is not there makes none)
                lock_run_folder(out)
            found[2] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        except UsageError as e:
            found[1] = str(e)
    # one folder for all processes, named by rank 0's clock, seen before rank 0 writes
    if dist.is_initialized():
        dist.broadcast_object_list(found)
    out, refused, names = found
    if refused:
        raise UsageError(refused)
    # a run that stopped at a bad flag left its config (and the lock file) alone
    held = [n for n in names if n not in ("config.json", LOCK)]
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")} | {"stage": stage}
    if stage == "finetune" and args.model:  # what the model was primed with, whatever --peft fine-tunes with
        config["primed_with"] = primed_with(args.model)
    if args.resume:
        if "config.json" not in names:
            raise UsageError(f"--resume: {out}/config.json not found (give --out the folder of the run to "
                             f"resume)")
        old, defaults = read_json(out / "config.json"), vars((make or make_parser)().parse_args([]))
        # --skip-nonfinite (what a non-finite step does) and --procs (how the work is split) may change; a
        # flag added since the run was started is no difference at its default (which keeps the old behaviour)
        diff = sorted(k for k in config.keys() | old.keys() if config.get(k) != old.get(k) and k not in
                      ("skip_nonfinite", "procs") and not (k not in old and config[k] == defaults.get(k)))
        if diff:
            raise UsageError(f"--resume: flags differ from the run in {out}: {', '.join(diff)}")
    elif held and not keep:
        raise UsageError(f"--out {out}: not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                         f"--resume continues the run in it, or give another folder")
    out.mkdir(parents=True, exist_ok=True)
    if rank_world()[0] == 0:
        write_json(out / "config.json", config)
    PROGRESS.update(out=out, step=0, saved=0)
    return out


LOCK = ".lock"  # a run folder's (and a testbed world's) lock file: its flock is held by the process using it
_run_lock = None  # the file descriptor holding this process's run folder (rank 0 holds one at a time)


def lock_run_folder(out):
    """Hold the run folder `out` for this process until release_run_folder() or its end (kill -9 included:
    the kernel drops a flock with its process, so no lock is ever stale). A folder another process holds (a
    run going on or starting there) is refused in one line naming it and that process; nothing in it is
    touched."""
    global _run_lock
    release_run_folder()
    fd = hold_lock(out, wait=False)
    if fd is None:
        raise UsageError(f"--out {out}: in use by another run ({lock_holder(out)}): wait for it to end, or "
                         f"give another folder")
    _run_lock = fd


def release_run_folder():
    """Let go of the run folder this process holds, if any."""
    global _run_lock
    if _run_lock is not None:
        os.close(_run_lock)
        _run_lock = None


def hold_lock(folder, wait):
    """An open file descriptor of folder/.lock holding its exclusive flock, its text then naming this
    process; None where another process holds it (wait=False). A file system without locks: a warning, and
    no lock."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # no O_TRUNC: its text is the holder's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log(f"warning: {folder / LOCK}: no lock on this file system ({e.strerror}): nothing stops two runs "
            f"in {folder}")
    with contextlib.suppress(OSError):  # what a refused process shows; a full disk is no reason to stop here
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def lock_holder(folder):
    """Who holds folder/.lock, as its text says ("process PID on HOST")."""
    with contextlib.suppress(OSError):
        return (folder / LOCK).read_text().strip() or "a process starting"
    return "a process"


@contextlib.contextmanager
def making(folder):
    """Hold folder/.lock while making what it caches: another process making the same waits, then finds it
    made."""
    try:
        fd = hold_lock(folder, wait=False)
        if fd is None:
            log(f"{folder}: waiting for {lock_holder(folder)}, which is making it")
            fd = hold_lock(folder, wait=True)
    except OSError:  # no lock on a read-only cache: made already (or what it misses fails, naming the file)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


# Where this process's run is, for the one-line stop when another process of it dies: its folder, the step
# under way (0: none yet) and the last checkpoint's step.
PROGRESS = {"out": None, "step": 0, "saved": 0}


def resume_hint():
    """How to go on after a stop, from PROGRESS."""
    out, saved = PROGRESS["out"], PROGRESS["saved"]
    if out is None:
        return "run the same command again"
    return (f"the last checkpoint is step {saved}" if saved else "no checkpoint yet") + \
        f": resume with the same command and --resume --out {out}"


def train_steps(out, name, total, state, extra, args, resume):
    """The steps [start, total) of a training stage as (step, metrics): the stage runs the step and fills
    metrics (metrics["stop"] = True ends the run). Each step is logged and every --ckpt-every steps
    checkpointed (`state`, `extra`, the RNGs), so with `resume` the run goes on as if never stopped. Ctrl-C or
    SIGTERM: checkpoint, then Interrupted. A non-finite metric stops the run, past --skip-nonfinite. Under
    torchrun rank 0 alone writes."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_file = out / f"checkpoint-{name}.safetensors", out / "metrics.jsonl"
    start, stop, skipped = load_checkpoint(ckpt, state, extra) if resume and ckpt.exists() else (0, False, 0)
    if start:
        log(f"{name}: resumed from {ckpt} at step {start}")
    PROGRESS["saved"] = start
    main_rank = rank_world()[0] == 0
    if metrics_file.exists() and main_rank:
        drop_metrics_after(metrics_file, name, start)
    t0, tokens, signals = time.time(), 0, []

    def on_signal(signum, frame):
        if signals:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        signals.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # restored also when the stage's step raises: this generator is then closed
        for step in range(start, start if stop else total):
            metrics = {}
            PROGRESS["step"] = step + 1
            yield step, metrics
            stop, signum = agreed_stop(metrics.pop("stop", False), signals)
            # the same on every rank: the metrics are global sums
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                skipped += 1
                if skipped > args.skip_nonfinite:
                    kept = f"{ckpt} kept" if ckpt.exists() else "no checkpoint yet"
                    raise UsageError(f"{name}: non-finite {', '.join(bad)} at step {step + 1}: stopped, "
                                     f"{kept} (--skip-nonfinite N skips up to N such steps)")
                metrics |= dict.fromkeys(bad) | {"nonfinite_skipped": skipped}  # counted in metrics.jsonl
            if main_rank:
                append_line(metrics_file, json.dumps({"stage": name, "step": step + 1, **metrics}))
                tokens += metrics.get("tokens", 0)
                seconds = max(time.time() - t0, 1e-9)
                line = progress_line(name, step + 1, total, metrics, steps_per_s=(step + 1 - start) / seconds,
                                     tokens_per_s=tokens / seconds)
                show_progress(line, step + 1, total, last=bool(stop) or step + 1 == total)
                if (step + 1) % args.ckpt_every == 0 or step + 1 == total or stop or signum:  # a stopped run
                    try:
                        save_checkpoint(ckpt, state, extra, step + 1, bool(stop), skipped)  # stays stopped
                    except CheckpointError as e:  # disk full, no permission: the last one is kept as it was
                        raise CheckpointError(f"{e}; {resume_hint()}") from None
                    PROGRESS["saved"] = step + 1
            if signum:
                if dist.is_initialized():  # no process exits (and torchrun stops the others) mid-checkpoint
                    dist.barrier()
                raise Interrupted(f"{name}: stopped by {signal.Signals(signum).name} after step {step + 1}, "
                                  f"checkpoint saved in {out}", signum)
            if stop:
                break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def append_line(path, line):
    """Append a line to a text file; a failed write (disk full) names the file."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def drop_metrics_after(metrics_file, name, start):
    """Drops from metrics.jsonl what a killed run of `name` logged after its checkpoint at step `start`."""
    kept = ""
    for line in metrics_file.read_text().splitlines():
        # a line cut by a kill, or not one of ours
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            m = json.loads(line)
            if m["stage"] != name or m["step"] <= start:
                kept += line + "\n"
    write_text(metrics_file, kept)


def agreed_stop(stop, signals):
    """(stop, signal number or 0) as all processes agree: what one decides, all do."""
    agreed = torch.tensor([stop, signals[0] if signals else 0], dtype=torch.float64)
    if dist.is_initialized():
        agreed = agreed.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(agreed, dist.ReduceOp.MAX)
    stop, signum = map(int, agreed.tolist())
    return stop, signum


def progress_line(name, step, total, metrics, *, steps_per_s, tokens_per_s, unit="tok"):
    """`name step/total`, the float metrics, tokens (or other `unit`s) a second and the time left at
    steps_per_s."""
    # whole seconds first: 179.6 s is 3m00s, not 2m60s
    eta = round((total - step) / steps_per_s) if steps_per_s else 0
    items = [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
    rates = f"| {tokens_per_s:.0f} {unit}/s ETA {eta // 60}m{eta % 60:02d}s"
    return " ".join([f"{name} {step}/{total}", *items, rates])


def show_progress(line, step, total, last, previous=None):
    """The progress line of step `step` of `total`: one self-overwriting line on a terminal; in a log file a
    plain line each time a twentieth of total is passed since step `previous` (default: step - 1), and at the
    last."""
    every = max(1, total // 20)
    if sys.stderr.isatty():
        width = shutil.get_terminal_size().columns - 1
        print(f"\r{line[:width]}\033[K", end="\n" if last else "", file=sys.stderr, flush=True)
    elif step // every > (step - 1 if previous is None else previous) // every or last:
        log(line)


PROGRESS_DELAY = 1.0  # seconds: a loop shows progress once it has run this long (a quick one prints nothing)


def progress(name, total, unit):
    """Progress of a loop over `total` items (languages, sentences) outside training, in the training lines'
    format: report(done, counted) after each part, `counted` units (default: done) giving the rate. Silent
    for the loop's first PROGRESS_DELAY seconds."""
    t0, shown = time.time(), [0]

    def report(done, counted=None):
        seconds = time.time() - t0
        if seconds >= PROGRESS_DELAY:
            line = progress_line(name, done, total, {}, steps_per_s=done / seconds, unit=unit,
                                 tokens_per_s=(done if counted is None else counted) / seconds)
            show_progress(line, done, total, done == total, previous=shown[0])
            shown[0] = done
    return report


class TensorsInPlace:
    """Checkpoint state for a dict of tensors that others hold (the optimizer holds the inner learning rates):
    loading copies the saved values into those tensors."""

    def __init__(self, tensors):
        self.tensors = tensors

    def state_dict(self):
        return self.tensors

    def load_state_dict(self, saved):
        for k, v in saved.items():
            self.tensors[k].detach().copy_(v)


def save_checkpoint(path, state, extra, step, stop, skipped):
    """`state`'s state_dicts, `extra`, the RNGs and the loop's counters: the tensors in a safetensors file,
    the rest as JSON in its metadata, {"tensor": key} in their place. Non-finite values are refused: the
    last good checkpoint stays."""
    blob = {key: obj.state_dict() for key, obj in state.items()} | {
        "step": step, "stop": stop, "skipped": skipped, "extra": extra or {},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    tensors = {}

    def moved(t):  # json.dumps calls it for what JSON cannot hold: the tensors
        tensors[key := str(len(tensors))] = t.detach().cpu().contiguous()
        return {"tensor": key}
    meta = json.dumps(blob, default=moved)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise UsageError(f"{path}: not overwritten: non-finite values at step {step} in {len(bad)} state "
                         f"tensor(s)")
    atomic_write(path, functools.partial(save_file, tensors, metadata={"train_state": meta}))


def load_checkpoint(path, state, extra):
    """Restore what save_checkpoint wrote (tensors and JSON: no code runs); returns (step, stop, skipped).
    JSON made the optimizers' integer keys strings and their tuples lists: the keys are turned back, the
    lists do as tuples."""
    with open_safetensors(path) as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get("train_state")

    def decoded(pairs):  # a JSON object: {"tensor": key} is that tensor, digit keys are integers
        if [k for k, _ in pairs] == ["tensor"]:
            return tensors[pairs[0][1]]
        return {int(k) if k.isdigit() else k: v for k, v in pairs}
    try:
        saved = json.loads(meta, object_pairs_hook=decoded)
        for key, obj in state.items():
            obj.load_state_dict(saved[key])
        if extra is not None:
            extra.update(saved["extra"])
        torch.set_rng_state(saved["rng"]["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        return int(saved["step"]), bool(saved["stop"]), int(saved["skipped"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # not ours, or another run's
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not a checkpoint of this run ({why})") from None


# ------------------------------------------------------------ several processes (torchrun)

def rank_world():
    """(rank, number of processes) as set by torchrun; (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


LAUNCHER = "METAPEFT_LAUNCHER"  # in the environment of a process that start_ranks started: its launcher's pid


def start_ranks(args, argv):
    """--procs N > 1: this process becomes rank 0 of N gloo processes (as under torchrun) and starts ranks
    1..N-1 with the same command line, each with its share of the cores, watched (watch_ranks). Returns their
    Popen handles. In a process it started: tie it to its launcher (die_with_parent)."""
    if args.procs < 2:  # parse_args refuses --procs > 1 under torchrun
        die_with_parent(os.environ.pop(LAUNCHER, None))
        return []
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.procs)
    env = {"WORLD_SIZE": str(args.procs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": str(threads)}
    # a session of their own: Ctrl-C reaches this process alone, and the stop it makes reaches them at a
    # step's end
    ranks = [subprocess.Popen([sys.executable, __file__, *map(str, argv), "--procs", "1"],
                              start_new_session=True, env=os.environ | env | {
                                  "RANK": str(r), "LOCAL_RANK": str(r), LAUNCHER: str(os.getpid())})
             for r in range(1, args.procs)]
    os.environ.update(env | {"RANK": "0", "LOCAL_RANK": "0"})
    torch.set_num_threads(threads)
    watch_ranks(ranks)
    return ranks


def die_with_parent(parent):
    """Have the kernel kill this process when its parent (pid `parent`, as text; None: do nothing) ends, even
    by kill -9 (Linux; elsewhere it ends at its next collective)."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it ended before that
        os._exit(2)


# How a started process ends along with this one: done (0), the same error (2) or signal stop (128 + SIGINT
# or SIGTERM) as all processes; any other end (killed, crashed) stops the run.
TOGETHER = (0, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM)
_ranks_ending = threading.Event()  # set when this process ends its started ones itself
_stopping = threading.Lock()  # taken by the first to report a dead process (never released: the process ends)


def watch_ranks(ranks):
    """A thread per started process: one that ends otherwise than TOGETHER stops the run
    (stop_for_dead_rank)."""
    _ranks_ending.clear()

    def watch(rank, process):
        if process.wait() not in TOGETHER and not _ranks_ending.is_set():
            stop_for_dead_rank(ranks, rank)
    for rank, process in enumerate(ranks, 1):
        threading.Thread(target=watch, args=(rank, process), daemon=True).start()


def stop_for_dead_rank(ranks, rank):
    """Started process `rank` died: kill the others (they write nothing), say so in one line with how to
    resume, and exit 2, from whichever thread. A file being written is finished first, so the last checkpoint
    is whole."""
    _stopping.acquire()
    for process in ranks:
        process.kill()
        process.wait()
    code = ranks[rank - 1].returncode
    cause = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    with WRITING:
        log("error: " + stopped_line(f"process {rank} of {len(ranks) + 1}", cause))
        os._exit(2)


def stopped_line(who, cause):
    """The one-line stop: who stopped, why, at which step, and how to go on."""
    step = PROGRESS["step"]
    when = f"at step {step}" if step else "before the first step"
    return f"{who} stopped ({cause}) {when}; {resume_hint()}"


def stop_for_lost_process(error, ranks):
    """If `error` is a collective failing because another process of the run died: the one-line stop, exit 2
    (from rank 0; the others exit silently). Returns if it is not (a bug: it keeps its traceback)."""
    rank, world = rank_world()
    lost = isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and re.search(r"gloo|NCCL",
                                                                                              str(error))
    if world < 2 or not lost:
        return
    for _ in range(100):  # the process that died shows as ended a moment after the collective fails
        dead = [r for r, process in enumerate(ranks, 1) if process.poll() not in (None, 0)]
        if dead:
            stop_for_dead_rank(ranks, dead[0])
        if not ranks:
            break
        time.sleep(0.1)
    if rank == 0:
        log("error: " + stopped_line(f"another of the {world} processes", "its connection was lost"))
    sys.exit(2)


def end_ranks(ranks, failed):
    """This process ends: so do the ones it started, at once after a failure (they write nothing); none is
    left."""
    _ranks_ending.set()
    for process in ranks:
        if failed:
            process.kill()
        process.wait()


def join_process_group(args):
    """Under torchrun (or --procs), join the processes' group: nccl, one GPU per process, or gloo on CPU."""
    if rank_world()[1] == 1:
        return
    gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device_of(args).type == "cuda" else None
    if gpu:
        torch.cuda.set_device(gpu)
    dist.init_process_group("nccl" if gpu else "gloo", device_id=gpu)


def resolve_inputs_in_rank_order(args):
    """resolve_inputs, by rank 0 before the other processes: it makes the testbed, if needed, before they
    read it."""
    rank = rank_world()[0]
    if rank:
        dist.barrier()
    try:
        return resolve_inputs(args)
    finally:  # also when the inputs are bad: the others then find the same error, and all exit alike
        if dist.is_initialized() and not rank:
            dist.barrier()


def my_share(n, seed, step):
    """This process's share of a step's n tasks or micro-batches, torch's RNG reseeded for each from (seed,
    step, index): whichever process computes it draws the same, so N processes make the update of one."""
    rank, world = rank_world()
    for index in range(rank, n, world):
        torch.manual_seed(task_seed(seed, step, index))
        yield index


def task_seed(seed, step, index):
    """The seed of a step's task or micro-batch `index`, whichever process computes it."""
    return (seed * 1_000_003 + step) * 1_000_003 + index


def global_sum(t):
    """A scalar tensor summed over the processes (each one's loss share -> the step's loss), as a float."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


# ------------------------------------------------------------ command line

# The defaults are PrimeConfig's (the study's recipe, at xlm-roberta-base's learning rates) and PeftConfig's;
# the tiny testbed encoder needs larger rates and fewer steps: the `testbed` preset, which every run without
# --data takes.

PRIME, PEFT = metapeft.PrimeConfig(), PeftConfig()
PRESETS = {
    "testbed": {"prime_steps": 60, "prime_lr": 1e-3, "prime_warmup": 10, "inner_lr": 5e-3,
                "finetune_lr": 5e-3},
    "quick": {"prime_steps": 40, "finetune_steps": 300, "seeds": 2},  # --seeds: for a parser that has it
}


def number(kind, ok, allowed):
    """An argparse type: kind(text), refused unless ok(value).
    The error line: "--flag value: must be <allowed>"."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'two'"
    return parse


# 0 means "none" or "skip" where a flag's help says so. NaN fails every comparison.
at_least_0, at_least_1 = number(int, lambda v: v >= 0, ">= 0"), number(int, lambda v: v >= 1, ">= 1")
positive_float = number(float, lambda v: 0 < v < math.inf, "a finite number > 0")
non_negative_float = number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def names(text):
    """An argparse type: a comma-separated list (kept as the text), no item empty or repeated."""
    items = text.split(",")
    if "" in items or len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list, no item empty or "
                                         f"repeated")
    return text


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line through main's handler instead of the usage block."""

    def error(self, message):  # "argument --tasks: 0: must be >= 1" reads "--tasks 0: must be >= 1"
        message = re.sub(r"^argument (\S+): (\S+: (must be|expected) )", r"\1 \2", message)
        raise UsageError(message + " (see --help)")


class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written; every flag's help ends with its default."""


def make_parser(stage=None, description=__doc__):
    """train.py's flags; with `stage`, those of a script that runs that stage of its own (and adds its
    flags): no --stage flag."""
    p = Parser(description=description, formatter_class=HelpFormat)
    a = p.add_argument_group("run").add_argument
    if stage:
        p.set_defaults(stage=stage)
    else:
        a("--stage", choices=("pretrain", "prime", "finetune", "eval", "export"), default="prime",
          help="pretrain: MLM; prime: meta-learn theta for PEFT; finetune: PEFT on the source language; "
               "eval: per-language test F1; export: --model in --format to --out")
    a("--model", help="Hugging Face checkpoint folder, e.g. xlm-roberta-base; omitted: the testbed's encoder")
    a("--data", help="NER data folder ({split}-{lang}.tsv or {lang}/{split}.{tsv,conll,jsonl}); omitted: the "
      "testbed")
    a("--out", help="run folder (one that holds a run needs --resume); omitted: runs/<stage>-<time>")
    a("--resume", action="store_true", help="continue the killed run in --out from its last checkpoint")
    a("--seed", type=at_least_0, default=0, help="seed for initialisation, dropout, batches and episodes")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto",
      help="auto: cuda if a GPU is available, else cpu")
    a("--threads", type=at_least_0, default=0,
      help="CPU threads per process; 0: all cores, but 1 per experiment cell")
    a("--procs", type=at_least_0, default=0, help="prime: processes on this machine sharing each "
      "meta-batch's tasks (as torchrun, gloo); 0: one per core, at most --tasks, on a CPU; 1 on a GPU "
      "(several GPUs: torchrun)")
    a("--dtype", choices=("fp32", "bf16"), default="fp32",
      help="autocast precision on CUDA (CPU: always fp32)")
    a("--ckpt-every", type=at_least_1, default=100, help="steps between checkpoints")
    a("--skip-nonfinite", type=at_least_0, default=0,
      help="non-finite steps to skip (not applied) before one stops")
    a("--testbed", default="runs/testbed", help="synthetic testbed worlds are cached in <this>-<world seed>")
    a("--testbed-seed", type=at_least_0, default=0, help="seed of the synthetic world")
    a("--format", choices=("hf-mlm", "hf-base", "peft"), default="hf-mlm", help="export: hf-mlm "
      "(XLMRobertaForMaskedLM), hf-base (XLMRobertaModel) or peft (LoRA + head as a peft adapter folder)")
    a = p.add_argument_group("data and episodes").add_argument
    a("--source", default="en", help="source language: fine-tuning and episode support batches")
    a("--prime-langs", type=names, help="comma-separated query languages of priming episodes (eval: the "
      "priming languages whose dev F1 it reports); omitted: eval takes those the model was primed on (its "
      "priming.json), else the languages with a train but no test split (the testbed's es, el); if there are "
      "none (PAN-X), prime refuses and eval reports the source's dev F1 alone")
    a("--eval-langs", type=names, help="comma-separated evaluation (target) languages; omitted: all test "
      "languages but the source")
    at_least_3 = number(int, lambda v: v >= 3, ">= 3 (<s>, </s> and one labelled subword)")
    a("--max-len", type=at_least_3, default=128,
      help="subword tokens per window; longer sentences are split, not cut")
    a("--pairing", choices=("cross", "same"), default="cross",
      help="cross: support in the source, query in a priming language; same: one language per task")
    a("--support-size", type=at_least_1, default=8, help="sentences per support batch")
    a("--support-batches", type=at_least_1, default=PRIME.support_batches,
      help="support batches per task, one per inner step, cycling (1: the K inner steps reuse one batch)")
    a("--query-size", type=at_least_1, default=8, help="sentences per query batch")
    a("--tasks", type=at_least_1, default=4, help="tasks (support, query pairs) per meta-step")
    a = p.add_argument_group("PEFT (phi)").add_argument
    a("--peft", choices=("lora", "houlsby", "pfeiffer"), default="lora", help="PEFT method simulated in "
      "priming and used downstream (houlsby: adapters after attention and FFN; pfeiffer: after FFN only)")
    a("--lora-r", type=at_least_1, default=PEFT.lora_r, help="LoRA rank")
    a("--lora-alpha", type=positive_float, default=PEFT.lora_alpha,
      help="LoRA scaling: update = alpha / r * B A")
    a("--lora-dropout", type=number(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=PEFT.lora_dropout,
      help="dropout on LoRA's input")
    a("--lora-targets", type=names, default=",".join(PEFT.lora_targets), help="projections that get LoRA")
    a("--adapter-size", type=at_least_1, default=PEFT.adapter_size, help="adapter bottleneck width")
    a("--adapter-act", choices=("relu", "gelu", "tanh"), default=PEFT.adapter_act,
      help="adapter non-linearity")
    a = p.add_argument_group("priming (MAML)").add_argument
    a("--mode", choices=METHODS, default="prime", help="prime: inner loop simulates PEFT (the paper); maml: "
      "inner loop updates everything; multitask: plain training on the priming data; none: no priming")
    a("--prime-steps", type=at_least_0, default=2000,
      help="outer (meta) steps (0: save the encoder unprimed)")
    a("--inner-steps", type=at_least_0, default=PRIME.inner_steps,
      help="K: simulated PEFT steps per task (0: none)")
    a("--inner-opt", choices=("sgd", "adam"), default=PRIME.inner_opt, help="inner optimizer simulating "
      "PEFT: AdamW as downstream (fresh moments per task, --weight-decay on matrices), or plain SGD")
    a("--inner-lr", type=positive_float, default=PRIME.inner_lr, help="alpha: inner learning rate, the "
      "downstream --finetune-lr for adam (plain SGD needs far more, e.g. 0.3)")
    a("--meta-sgd", action="store_true", help="learn one inner learning rate per tensor (Meta-SGD)")
    a("--first-order", action=argparse.BooleanOptionalAction, default=PRIME.first_order,
      help="first-order meta-gradient (no second derivatives); --no-first-order: second order")
    a("--inner-backprop", type=at_least_0, default=0, help="truncated back-propagation: second order through "
      "the last N inner steps only, first order before (0: all steps)")
    a("--outer", choices=("theta", "theta+phi"), default=PRIME.outer,
      help="what the outer loop updates: the PLM only, or also phi's initialisation")
    a("--phi-start", choices=("fresh", "meta"), default=PRIME.phi_start,
      help="phi at the start of each episode: a fresh draw (as downstream) or the meta-learned init")
    a("--freeze-embeddings", action="store_true", help="keep embeddings fixed during priming")
    a("--prime-lr", type=positive_float, default=PRIME.lr, help="outer AdamW learning rate")
    a("--prime-warmup", type=at_least_0, default=PRIME.warmup, help="outer warm-up steps")
    a = p.add_argument_group("fine-tuning, evaluation, pretraining").add_argument
    a("--phi-init", default="fresh", help="downstream PEFT + head start: fresh, primed (the meta-learned "
      "init saved by priming), or a peft LoRA adapter folder (adapter_config.json + "
      "adapter_model.safetensors)")
    a("--finetune-steps", type=at_least_0, default=2000,
      help="most PEFT training steps on the source language")
    a("--patience", type=at_least_0, default=5,
      help="stop fine-tuning after this many source-dev evaluations without a new best F1 (0: run all steps)")
    a("--finetune-lr", type=positive_float, default=PRIME.inner_lr, help="PEFT AdamW learning rate")
    a("--curve-langs", type=names,
      help="comma-separated languages whose dev F1 finetune also logs (never selects)")
    a("--finetune-warmup", type=at_least_0, default=30,
      help="PEFT learning-rate warm-up steps, then constant")
    a("--batch-size", type=at_least_1, default=32, help="sentences per fine-tuning / pretraining batch")
    a("--micro-batch", type=at_least_0, default=0, help="fine-tuning sentences per forward pass, shared by "
      "the processes under torchrun (each with its own dropout seed: the same weights as one process); 0: "
      "batch / procs")
    a("--eval-every", type=at_least_0, default=100,
      help="steps between source-dev evaluations (0: once an epoch)")
    a("--eval-batch-size", type=at_least_1, default=64, help="sentences per evaluation batch")
    a("--weight-decay", type=non_negative_float, default=PRIME.weight_decay,
      help="AdamW weight decay (matrices only)")
    a("--clip", type=non_negative_float, default=PRIME.clip, help="max gradient norm (0: no clipping)")
    a("--text", help="pretrain: text file (one sentence a line) for continued MLM of --model")
    a("--pretrain-steps", type=at_least_0, default=3000, help="MLM steps (0: save the untrained encoder)")
    a("--pretrain-lr", type=positive_float, default=1e-3, help="MLM AdamW learning rate")
    multiple_of_32 = number(int, lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (heads = width / 32)")
    a("--tiny-hidden", type=multiple_of_32, default=128, help="testbed encoder width (heads = width / 32)")
    a("--tiny-layers", type=at_least_1, default=4, help="testbed encoder layers")
    presets = "; ".join(f"{n}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())
                        for n, flags in PRESETS.items())
    a("--preset", choices=sorted(PRESETS), help="new defaults for the flags they name (flags given "
      f"explicitly keep their value; every run without --data also takes `testbed`): {presets}")
    return p

def parse_args(argv=None, make=make_parser):
    """The resolved flags (make: the maker of the parser, train.py's by default): given ones, then --preset's,
    then `testbed`'s without --data, then the defaults; checked (what the flags' types cannot: combinations)
    before any work, in one line naming the flag."""
    given = make().parse_args(argv)
    presets = [given.preset] if given.preset else []
    if given.data is None and given.preset != "testbed":
        presets.append("testbed")
    parser = make()
    for name in reversed(presets):  # the presets' values become the defaults, the first preset's last
        parser.set_defaults(**{k: v for k, v in PRESETS[name].items() if hasattr(given, k)})  # flags it has
    args = parser.parse_args(argv)
    args.presets = presets
    # one process per core (each with 1 thread) beats one process with all: a small model's ops
    if args.procs == 0:
        cpu = args.stage == "prime" and device_of(args).type == "cpu" and "WORLD_SIZE" not in os.environ
        args.procs = min(len(os.sched_getaffinity(0)), args.tasks) if cpu else 1
    check_flags(args)
    if args.dtype == "bf16" and device_of(args).type == "cpu":
        log("note: --dtype bf16 is autocast on CUDA only; on the CPU this run is fp32")
    return args


def check_flags(args):
    """What the flags' types cannot check: their combinations, and the PEFT and priming configurations."""
    if args.text and args.stage != "pretrain":
        raise UsageError(f"--text {args.text}: only for --stage pretrain (this is --stage {args.stage})")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the folder of the run to resume)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.stage == "export" and not args.out:
        raise UsageError("--stage export needs --out (the folder to write the exported checkpoint to)")
    if args.phi_init not in ("fresh", "primed") and not Path(args.phi_init).is_dir():
        raise UsageError(f"--phi-init {args.phi_init}: not fresh, primed or a folder (a peft LoRA adapter)")
    if args.procs > 1 and (args.stage != "prime" or "WORLD_SIZE" in os.environ):
        raise UsageError(f"--procs {args.procs}: only for --stage prime, in a plain run (torchrun starts its "
                         f"own)")
    world = max(rank_world()[1], args.procs)
    if world > 1 and args.stage not in ("prime", "finetune"):
        raise UsageError(f"--stage {args.stage} runs in one process (torchrun is for prime and finetune)")
    if world > 1 and args.stage == "prime" and args.tasks < world:
        raise UsageError(f"--tasks {args.tasks}: fewer tasks than the {world} processes that share them")
    micro = args.micro_batch or math.ceil(args.batch_size / world)
    if world > 1 and args.stage == "finetune" and math.ceil(args.batch_size / micro) < world:
        raise UsageError(f"--micro-batch {micro}: a batch of {args.batch_size} has fewer micro-batches than "
                         f"the {world} processes that share them")
    peft_config(args)
    if args.stage == "prime":
        prime_config(args, args.mode)


def log_presets(args):
    """The values the presets gave (a flag given explicitly shows its own)."""
    for name in args.presets:
        log(f"preset {name}: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in PRESETS[name]
                                          if hasattr(args, k)))


def note_testbed(args, data_dir):
    """Without --data: a note that this run is on the synthetic testbed, and how to run on real data."""
    if args.data is None:
        where = data_dir or args.testbed + "-<seed>"
        log(f"note: using the built-in synthetic testbed ({where}); for real work pass --model "
            f"path/to/xlm-roberta-base --data path/to/panx (see README)")


@contextlib.contextmanager
def command_line():
    """The body of a command: the project's errors (a user's mistake) become one line and exit code 2, Ctrl-C
    or SIGTERM how to go on. Yields `run`: the body sets run.out to its run folder once made (resuming names
    it), and run.ranks to the processes it started (they end with it)."""
    run = SimpleNamespace(out=None, ranks=[])
    try:
        yield run
    # the project's own errors; bugs keep their traceback
    except (UsageError, data.DataError, CheckpointError) as e:
        log("error: " + " ".join(str(e).split()))  # one line, whatever the message quotes
        sys.exit(2)
    except OSError as e:  # a path the file system refuses (under a file, no permission, disk full)
        log(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
        sys.exit(2)
    except Interrupted as e:
        message, signum = e.args
        how = f"with --resume --out {run.out}" if run.out else "again"
        log(f"{message}; to go on, run the same command {how}")
        sys.exit(128 + signum)
    except Exception as e:  # a bug keeps its traceback; a collective failing as another process died: a line
        stop_for_lost_process(e, run.ranks)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        end_ranks(run.ranks, sys.exc_info()[0])  # the ranks this one started end with it
        release_run_folder()


def main(argv=None):
    """The command line: flags, inputs, run folder, the stage; a user's mistake is one line, exit code 2."""
    with command_line() as run:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        run.ranks = start_ranks(args, sys.argv[1:] if argv is None else argv)
        join_process_group(args)
        model_dir, data_dir = resolve_inputs_in_rank_order(args)
        # export writes a model, not a run
        run.out = out = Path(args.out) if args.stage == "export" else start_run(args, args.stage)
        if args.stage in ("prime", "finetune"):  # the stages the presets are for
            log_presets(args)
        if args.stage not in ("pretrain", "export"):
            note_testbed(args, data_dir)
        if args.stage == "pretrain":  # a fresh tiny encoder (no --model), or continued MLM of --model
            saved = pretrain_stage(args, out, data_dir, model_dir, args.seed, args.resume)
            log(f"pretrain: model saved to {saved}")
        elif args.stage == "prime":
            saved = prime_stage(args, out, model_dir, data_dir, args.mode, args.seed)
            log_saved(args, saved, "finetune", data_dir)
        elif args.stage == "finetune":
            saved = finetune_stage(args, out, model_dir, data_dir, args.seed)
            log_saved(args, saved, "eval", data_dir)
        elif args.stage == "eval":
            eval_stage(args, out, model_dir, data_dir)
            log(f"eval: results in {out}/results.json and results.md")
        else:
            export_stage(args, model_dir, out)
            log(f"export: {args.format} checkpoint written to {out}")
        if dist.is_initialized():  # the processes leave together: gloo may abort one that tears down alone
            dist.barrier()


def log_saved(args, saved, then, data_dir):
    """Where the stage saved its model, and the command of the next stage."""
    data_flag = "" if args.data is None else f" --data {data_dir}"
    log(f"{args.stage}: model saved to {saved}\n"
        f"next: python train.py --stage {then} --model {saved}{data_flag}")


if __name__ == "__main__":
    main()
