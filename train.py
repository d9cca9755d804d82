"""metapeft command line: pretrain -> prime -> finetune -> eval, and the experiment that compares them.

    python train.py --stage prime                      # the built-in synthetic testbed (made on first use)
    python train.py --stage finetune --model runs/prime-.../model
    python train.py --stage eval --model runs/finetune-.../model
    python train.py --stage experiment --preset quick  # none / multitask / maml / prime, several seeds
    python train.py --stage prime --model xlm-roberta-base/ --data panx/   # real checkpoint and PAN-X data
    python train.py --stage export --model runs/prime-.../model --format hf-mlm --out primed-xlmr/
    torchrun --standalone --nproc_per_node=4 train.py --stage prime ...   # the meta-batch split over 4 processes

Every run writes to its own folder: config.json (all resolved flags), metrics.jsonl, checkpoint-<stage>.pt (resume
with --resume --out DIR) and its outputs. See README.md.
"""
import argparse
import functools
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import metapeft
from model import CheckpointError, Config, Model, PeftConfig, atomic_write, copy_lm_head, fresh_phi, \
    load_lora_adapter, load_peft, load_pretrained, save_lora_adapter, saved_peft_config, theta_phi

METHODS = ("none", "multitask", "maml", "prime")


class UsageError(Exception):
    """A user mistake: reported as one line, exit code 2, no traceback."""


# ----------------------------------------------------------------------------- run hygiene

def log(msg):
    if rank_world()[0] == 0:  # one voice under torchrun
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """One self-overwriting line on a terminal, a plain line every `every` steps in a log file."""

    def __init__(self, name, total, start):
        self.name, self.total, self.start, self.t0, self.tokens = name, total, start, time.time(), 0
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)

    def update(self, step, metrics):
        seconds = max(time.time() - self.t0, 1e-9)
        self.tokens += metrics.get("tokens", 0)
        rate = (step - self.start) / seconds
        eta = (self.total - step) / rate if rate else 0
        items = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        line = (f"{self.name} {step}/{self.total} {items} | {self.tokens / seconds:.0f} tok/s "
                f"ETA {eta // 60:.0f}m{eta % 60:02.0f}s")
        if self.tty:
            print(f"\r{line[:shutil.get_terminal_size().columns - 1]}\033[K", end="" if step < self.total else "\n",
                  file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            log(line)


def start_run(args, stage):
    """Create the run folder and write the resolved config (or check it against the one being resumed)."""
    out = [Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if dist.is_initialized():  # one folder for all processes, named by rank 0's clock
        dist.broadcast_object_list(out)
    out = out[0]
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")} | {"stage": stage}
    if args.resume:
        if not (out / "config.json").exists():
            raise UsageError(f"--resume: {out}/config.json not found (give --out the folder of the run to resume)")
        old = json.loads((out / "config.json").read_text())
        diff = sorted(k for k in config.keys() | old.keys() if config.get(k) != old.get(k))
        if diff:
            raise UsageError(f"--resume: flags differ from the run in {out}: {', '.join(diff)}")
    out.mkdir(parents=True, exist_ok=True)
    if rank_world()[0] == 0:
        atomic_write(out / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train_loop(out, name, total, step_fn, state, extra=None, ckpt_every=100, resume=False):
    """Run step_fn(step) -> metrics for steps [start, total): progress line, metrics.jsonl, and an atomic
    checkpoint (every tensor in `state`'s objects, RNG states, the `extra` dict) every ckpt_every steps.
    Batches are pure functions of (seed, step), so the step count is the whole data position. Under torchrun,
    rank 0 alone writes metrics and checkpoints, and every rank resumes from them."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_file, start = out / f"checkpoint-{name}.pt", out / "metrics.jsonl", 0
    if resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        for key, obj in state.items():
            obj.load_state_dict(saved[key])
        if extra is not None:
            extra.update(saved["extra"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        start = saved["step"]
        log(f"{name}: resumed from {ckpt} at step {start}")
    main_rank = rank_world()[0] == 0
    if metrics_file.exists() and main_rank:  # drop what a killed run logged after its last checkpoint
        lines = [l for l in metrics_file.read_text().splitlines()
                 if json.loads(l)["stage"] != name or json.loads(l)["step"] <= start]
        atomic_write(metrics_file, lambda f: Path(f).write_text("".join(l + "\n" for l in lines)))
    progress = Progress(name, total, start)
    for step in range(start, total):
        metrics = step_fn(step)
        if not main_rank:
            continue
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"stage": name, "step": step + 1, **metrics}) + "\n")
        progress.update(step + 1, metrics)
        if (step + 1) % ckpt_every == 0 or step + 1 == total:
            blob = {key: obj.state_dict() for key, obj in state.items()} | {
                "step": step + 1, "extra": extra or {},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
            atomic_write(ckpt, lambda f: torch.save(blob, f))


# ----------------------------------------------------------------------------- several processes (torchrun)

def rank_world():
    """(rank, number of processes) as set by torchrun; (0, 1) in a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dist_setup(args):
    """Join torchrun's process group when there is more than one process (nccl on GPUs, one GPU per process;
    gloo on CPU). A plain run starts none."""
    if rank_world()[1] > 1:
        gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device_of(args).type == "cuda" else None
        if gpu:
            torch.cuda.set_device(gpu)
        dist.init_process_group("nccl" if gpu else "gloo", device_id=gpu)


def my_share(n):
    """The indices of a step's n tasks or micro-batches that this process computes: every world-th from its rank.
    metapeft.step sums the processes' gradients, so each share's loss is weighted as in the whole step's loss."""
    rank, world = rank_world()
    return range(rank, n, world)


def seeded(seed, step, index):
    """Reseed torch's RNG (fresh phi draws, dropout) for one task or micro-batch from (seed, step, index): it draws
    the same numbers whichever process computes it, so N processes make the update of one."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_000_003 + index)


def global_sum(t):
    """A scalar tensor summed over the processes (each one's loss share -> the step's loss), as a float."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


class Stateful:
    """Gives any state (a random generator, a dict of tensors) the state_dict / load_state_dict of a checkpoint."""

    def __init__(self, get, set):
        self.state_dict, self.load_state_dict = get, set


@torch.no_grad()
def copy_into(dst, src):
    """Copy each tensor of dict src into the tensor of the same name in dict dst."""
    for k, v in src.items():
        dst[k].copy_(v)


# ----------------------------------------------------------------------------- inputs

def testbed(args, need_model=True):
    """The synthetic testbed's (model_dir, data_dir), generated and MLM-pretrained on first use, then cached."""
    root = Path(args.testbed)
    model_dir, data_dir = root / "pretrain" / "model", root / "data"
    if not (data_dir / "tokenizer.json").exists():
        log(f"testbed: generating the synthetic multilingual world in {data_dir} (seed {args.testbed_seed})")
        shutil.rmtree(root / "data.tmp", ignore_errors=True)
        data.make_world(root / "data.tmp", data.WorldConfig(seed=args.testbed_seed))
        data.write_tokenizer(root / "data.tmp")
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(root / "data.tmp", data_dir)
    if need_model and not (model_dir / "tokenizer.json").exists():  # the tokenizer is copied last
        log("testbed: MLM-pretraining a tiny encoder on the testbed's text (once; it is cached)")
        pretrain(args, root / "pretrain", data_dir, None, args.testbed_seed, resume=True)
    return model_dir, data_dir


def checkpoint_dir(path):
    """--model as a Path, checked to be a complete Hugging Face checkpoint folder."""
    model = Path(path)
    for need in ("config.json", "tokenizer.json"):
        if not (model / need).exists():
            raise UsageError(f"--model {model}: no {need} (expected a Hugging Face checkpoint folder)")
    if not list(model.glob("model.safetensors*")):
        raise UsageError(f"--model {model}: no model.safetensors (or its sharded index)")
    return model


def resolve_inputs(args):
    """(model_dir, data_dir): the user's, or the synthetic testbed's."""
    if (args.model is None) != (args.data is None) and args.stage not in ("finetune", "eval"):
        raise UsageError("give both --model and --data (a real checkpoint and its data), or neither (the testbed)")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    if args.model is not None:
        checkpoint_dir(args.model)
    if args.data is not None:
        return Path(args.model), Path(args.data)
    model_dir, data_dir = testbed(args, need_model=args.model is None)
    if args.model is not None and (data_dir / "tokenizer.json").read_bytes() != (Path(args.model) / "tokenizer.json").read_bytes():
        raise UsageError(f"--model {args.model} is not a testbed model: give --data too")
    return Path(args.model or model_dir), data_dir


def languages(args, data_dir):
    """(source, priming query languages, evaluation languages), with the zero-shot warning."""
    have = data.languages(data_dir, "train")
    if args.source not in have:
        raise UsageError(f"--data {data_dir}: no train split for the source language {args.source!r} (found {have})")
    targets = [l for l in data.languages(data_dir, "test") if l != args.source]
    # Default priming languages: those with training data but no test split (the testbed's), else all but the source.
    prime = [l for l in have if l != args.source and l not in targets] or [l for l in have if l != args.source]
    prime = args.prime_langs.split(",") if args.prime_langs else prime
    evals = args.eval_langs.split(",") if args.eval_langs else targets
    for lang in prime + evals:
        if lang not in have + targets:
            raise UsageError(f"unknown language {lang!r}: {data_dir} has {sorted(set(have + targets))}")
    if set(prime) & set(evals) and args.stage in ("prime", "experiment"):
        log(f"warning: priming languages {sorted(set(prime) & set(evals))} are also evaluated on: "
            f"their labelled data is seen during priming, so that evaluation is not zero-shot")
    return args.source, prime, evals


def peft_config(args):
    return PeftConfig(method=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      lora_targets=tuple(args.lora_targets.split(",")), adapter_size=args.adapter_size,
                      adapter_act=args.adapter_act)


def prime_config(args, mode):
    return metapeft.PrimeConfig(mode=mode, inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_sgd=args.meta_sgd,
                                first_order=args.first_order, outer=args.outer, phi_start=args.phi_start,
                                freeze_embeddings=args.freeze_embeddings, lr=args.prime_lr, weight_decay=args.weight_decay,
                                warmup=args.prime_warmup, clip=args.clip)


def device_of(args):
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(args.device)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and device.type == "cuda")


def save_model(model, out, model_dir):
    """The model in the Hugging Face layout, with the tokenizer beside it, so it is a complete checkpoint, and the
    MLM head of model_dir (model.copy_lm_head) if the model has none, so that it exports as XLMRobertaForMaskedLM."""
    model.save_pretrained(out)
    shutil.copyfile(Path(model_dir) / "tokenizer.json", Path(out) / "tokenizer.json")
    if model.lm_head is None:
        copy_lm_head(model_dir, out)


# ----------------------------------------------------------------------------- stages

def pretrain(args, out, data_dir, model_dir, seed, resume):
    """MLM pretraining: a tiny encoder from scratch on the testbed's unlabeled text, or continued MLM of
    --model on --text. Saves an XLMRobertaForMaskedLM-layout checkpoint folder to out/model."""
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = model_dir or data_dir
    tok = data.load_tokenizer(tok_dir)
    text = Path(args.text) if args.text else Path(data_dir) / "unlabeled.txt"
    if not text.exists():
        raise UsageError(f"--text {text}: file not found")
    lines = [l for l in text.read_text(encoding="utf-8").splitlines() if l.strip()]
    if len(lines) < 20:
        raise UsageError(f"--text {text}: {len(lines)} lines of text, expected at least 20")
    rows = [e.ids[:args.max_len - 1] + [tok.token_to_id("</s>")] for e in tok.encode_batch(lines)]
    examples = [data.Example(r, [data.IGNORE] * len(r), i, []) for i, r in enumerate(rows)]
    held_out, train = examples[::50], [e for i, e in enumerate(examples) if i % 50]
    if model_dir:
        model = load_pretrained(model_dir, mlm=True)
    else:
        cfg = Config(vocab_size=tok.get_vocab_size(), hidden_size=args.tiny_hidden, num_hidden_layers=args.tiny_layers,
                     num_attention_heads=args.tiny_hidden // 32, intermediate_size=4 * args.tiny_hidden,
                     max_position_embeddings=args.max_len + 2)
        seed_everything(seed)
        model = Model(cfg, mlm=True)
    device = device_of(args)
    model.to(device).train()
    mask_id, vocab, pad = tok.token_to_id("<mask>"), tok.get_vocab_size(), tok.token_to_id("<pad>")
    params = dict(model.named_parameters())
    opt = metapeft.make_optimizer(params, args.pretrain_lr, args.weight_decay)
    sched = metapeft.make_scheduler(opt, args.pretrain_steps // 20, args.pretrain_steps)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(train) / args.batch_size)

    def held_out_loss():
        g = torch.Generator().manual_seed(12345)  # the same masks before and after
        model.eval()
        with torch.no_grad():
            losses = [metapeft.mlm_loss(model, to_device(b, device), mask_id, vocab, g).item()
                      for b in data.batches(held_out, args.batch_size, pad)]
        model.train()
        return statistics.mean(losses)

    extra = {"loss_before": held_out_loss()}

    epoch_batches = functools.lru_cache(1)(lambda epoch: data.batches(train, args.batch_size, pad, True, seed, epoch))

    def step_fn(step):
        batch = epoch_batches(step // per_epoch)[step % per_epoch]
        with autocast(args, device):
            loss = metapeft.mlm_loss(model, to_device(batch, device), mask_id, vocab, gen)
        norm = metapeft.step(loss, params, opt, sched, args.clip)
        return {"loss": loss.item(), "grad_norm": norm, "lr": sched.get_last_lr()[0],
                "tokens": int(batch["attention_mask"].sum())}

    state = {"model": model, "opt": opt, "sched": sched, "masks": Stateful(gen.get_state, gen.set_state)}
    train_loop(out, "pretrain", args.pretrain_steps, step_fn, state, extra, args.ckpt_every, resume)
    extra["loss_after"] = held_out_loss()
    log(f"pretrain: held-out MLM loss {extra['loss_before']:.3f} (untrained) -> {extra['loss_after']:.3f} (pretrained)")
    atomic_write(out / "pretrain.json", lambda f: Path(f).write_text(json.dumps(extra, indent=2) + "\n"))
    save_model(model, out / "model", tok_dir)
    return out / "model"


def load_examples(data_dir, split, langs, tok, labels, max_len):
    """(labels, sentences, examples) of a split per language. labels=None takes them from the first language's
    sentences (the source's training data); unknown labels are an error naming the file."""
    sents = {lang: data.read_split(data_dir, split, lang) for lang in langs}
    labels = labels or data.label_list(sents[langs[0]])
    label2id = {l: i for i, l in enumerate(labels)}
    for lang, s in sents.items():
        data.check_labels(s, labels, str(data.split_path(data_dir, split, lang)))
    return labels, sents, {lang: data.encode(s, tok, label2id, max_len) for lang, s in sents.items()}


def prime(args, out, model_dir, data_dir, mode, seed):
    """Priming (or an ablation): saves the primed encoder (+ meta-learned phi) to out/model."""
    source, prime_langs, _ = languages(args, data_dir)
    tok = data.load_tokenizer(model_dir)
    labels, _, examples = load_examples(data_dir, "train", [source] + prime_langs, tok, None, args.max_len)
    seed_everything(seed)
    model = load_pretrained(model_dir, labels=labels, peft=peft_config(args))
    cfg = prime_config(args, mode)
    device = device_of(args)
    model.to(device).train()
    if mode != "none":
        inner_lrs = metapeft.make_inner_lrs(model, cfg)
        params = metapeft.outer_params(model, cfg, inner_lrs)
        opt = metapeft.make_optimizer(params, cfg.lr, cfg.weight_decay)
        sched = metapeft.make_scheduler(opt, cfg.warmup, args.prime_steps)
        episodes = data.EpisodeConfig(source_langs=(source,), query_langs=tuple(prime_langs),
                                      support_size=args.support_size, query_size=args.query_size,
                                      tasks_per_step=args.tasks, pairing=args.pairing)
        pad = tok.token_to_id("<pad>")
        if args.tasks < rank_world()[1]:
            raise UsageError(f"--tasks {args.tasks}: fewer tasks than the {rank_world()[1]} processes that share them")

        def step_fn(step):
            tasks = data.episodes(examples, episodes, pad, seed, step)
            loss = torch.zeros((), device=device)
            for i in my_share(len(tasks)):  # the meta-loss is the mean over the tasks
                seeded(seed, step, i)
                with autocast(args, device):
                    task = tuple(to_device(b, device) for b in tasks[i])
                    loss = loss + metapeft.meta_loss(model, [task], cfg, inner_lrs) / len(tasks)
            norm = metapeft.step(loss, params, opt, sched, cfg.clip)
            return {"meta_loss": global_sum(loss), "grad_norm": norm, "lr": sched.get_last_lr()[0],
                    "tokens": sum(int(b["attention_mask"].sum()) for task in tasks for b in task)}

        state = {"model": model, "opt": opt, "sched": sched}
        if inner_lrs:
            state["inner_lrs"] = Stateful(lambda: {k: v.detach().clone() for k, v in inner_lrs.items()},
                                          lambda saved: copy_into(inner_lrs, saved))
        train_loop(out, f"prime-{mode}", args.prime_steps, step_fn, state, None, args.ckpt_every, args.resume)
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
    return out / "model"


def finetune(args, out, model_dir, data_dir, seed):
    """Downstream PEFT: theta frozen, PEFT + head trained on the source language; the checkpoint with the best
    source-language dev F1 is kept (no target-language data is used). Saves out/model."""
    source = args.source
    tok = data.load_tokenizer(model_dir)
    labels, _, train = load_examples(data_dir, "train", [source], tok, None, args.max_len)
    _, dev_sents, dev = load_examples(data_dir, "dev", [source], tok, labels, args.max_len)
    train, dev_sents, dev = train[source], dev_sents[source], dev[source]
    seed_everything(seed)
    peft = peft_config(args)
    model = load_pretrained(model_dir, labels=labels, peft=peft)
    theta, phi = theta_phi(model)
    if args.phi_init == "primed":
        if saved_peft_config(model_dir) != peft:
            raise UsageError(f"--phi-init primed: {model_dir} has no PEFT init for {peft}")
        load_peft(model, model_dir)
    elif args.phi_init == "fresh":  # also replaces a head that priming saved for the same labels
        copy_into(phi, fresh_phi(model))
    else:  # a peft adapter folder: LoRA and head, e.g. trained with peft
        load_lora_adapter(model, args.phi_init)
    for p in theta.values():
        p.requires_grad_(False)
    device = device_of(args)
    model.to(device).train()
    opt = metapeft.make_optimizer(phi, args.finetune_lr, args.weight_decay)
    sched = metapeft.make_scheduler(opt, args.finetune_steps // 10, args.finetune_steps)
    pad = tok.token_to_id("<pad>")
    per_epoch = math.ceil(len(train) / args.batch_size)
    best = {"f1": -1.0, "step": 0, "phi": {n: p.detach().clone() for n, p in phi.items()}}
    eval_every = args.eval_every or per_epoch
    world = rank_world()[1]
    micro = args.micro_batch or math.ceil(args.batch_size / world)
    if math.ceil(args.batch_size / micro) < world:
        raise UsageError(f"--micro-batch {micro}: a batch of {args.batch_size} has fewer micro-batches than the "
                         f"{world} processes that share them")

    epoch_batches = functools.lru_cache(1)(lambda epoch: data.batches(train, args.batch_size, pad, True, seed, epoch))

    def step_fn(step):
        batch = epoch_batches(step // per_epoch)[step % per_epoch]
        labelled, params = int(batch["labels"].ne(data.IGNORE).sum()), dict(model.named_parameters())
        loss = torch.zeros((), device=device)
        for i in my_share(math.ceil(len(batch["labels"]) / micro)):  # the loss is a mean over labelled tokens
            seeded(seed, step, i)
            with autocast(args, device):
                part = to_device({k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}, device)
                loss = loss + metapeft.ce_loss(model, params, part, labelled)
        metrics = {"loss": global_sum(loss), "grad_norm": metapeft.step(loss, phi, opt, sched, args.clip),
                   "lr": sched.get_last_lr()[0], "tokens": int(batch["attention_mask"].sum())}
        if (step + 1) % eval_every == 0 or step + 1 == args.finetune_steps:
            f1 = metapeft.evaluate(model, dev, dev_sents, labels, pad, args.eval_batch_size)["f1"]
            metrics["dev_f1"] = f1
            if f1 > best["f1"]:
                best.update(f1=f1, step=step + 1, phi={n: p.detach().clone() for n, p in phi.items()})
        return metrics

    train_loop(out, "finetune", args.finetune_steps, step_fn, {"model": model, "opt": opt, "sched": sched}, best,
               args.ckpt_every, args.resume)
    copy_into(phi, best["phi"])
    log(f"finetune: best {source} dev F1 {best['f1']:.4f} at step {best['step']}")
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
    return out / "model"


def export(args, model_dir, out):
    """--model in another layout, the tokenizer beside it: hf-mlm (XLMRobertaForMaskedLM, with the MLM head the
    encoder was pretrained with), hf-base (XLMRobertaModel), or peft (LoRA + head as a peft adapter folder)."""
    if args.format == "peft":
        peft = saved_peft_config(model_dir)
        if peft is None or peft.method != "lora":
            raise UsageError(f"--format peft: {model_dir} has no LoRA parameters (bottleneck adapters have no common "
                             f"format: they stay in peft.safetensors, see README)")
        model = load_peft(load_pretrained(model_dir, peft=peft), model_dir)
        save_lora_adapter(model, out, model_dir.resolve())
    else:
        model = load_pretrained(model_dir, mlm=args.format == "hf-mlm")
        model.save_pretrained(out, layout={"hf-mlm": "mlm", "hf-base": "base"}[args.format])
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")


def evaluate(args, out, model_dir, data_dir):
    """Entity F1 on the test split of the source and every evaluation language; results.json + results.md."""
    source, _, evals = languages(args, data_dir)
    tok = data.load_tokenizer(model_dir)
    peft = saved_peft_config(model_dir)
    model = load_pretrained(model_dir, peft=peft)
    if peft:
        load_peft(model, model_dir)
    if not model.labels:
        raise UsageError(f"--model {model_dir}: no token-classification head (run the finetune stage first)")
    model.to(device_of(args))
    _, sents, examples = load_examples(data_dir, "test", [source] + evals, tok, model.labels, args.max_len)
    pad = tok.token_to_id("<pad>")
    per_lang = {lang: metapeft.evaluate(model, examples[lang], sents[lang], model.labels, pad, args.eval_batch_size)
                for lang in [source] + evals}
    result = {"model": str(model_dir), "source": source, "f1": {l: r["f1"] for l, r in per_lang.items()},
              "target_avg_f1": data.macro_average({l: per_lang[l] for l in evals}), "detail": per_lang}
    atomic_write(out / "results.json", lambda f: Path(f).write_text(json.dumps(result, indent=2) + "\n"))
    table = "| " + " | ".join([f"{source} (source)"] + evals + ["target avg"]) + " |\n" + \
            "|---" * (len(evals) + 2) + "|\n| " + \
            " | ".join(f"{100 * result['f1'][l]:.1f}" for l in [source] + evals) + f" | {100 * result['target_avg_f1']:.1f} |\n"
    atomic_write(out / "results.md", lambda f: Path(f).write_text(table))
    print(table)
    return result


def experiment(args, out, model_dir, data_dir):
    """For each seed and method: prime (or not) -> finetune -> eval. One table: mean +- std per language and the
    target average, and each method's delta against `none`."""
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    source, _, evals = languages(args, data_dir)
    results = {}
    for seed in range(args.seed, args.seed + args.seeds):
        for m in methods:
            run = out / f"seed{seed}" / m
            run.mkdir(parents=True, exist_ok=True)
            done = run / "results.json"
            if not done.exists():  # finished cells are kept: a killed experiment resumes cell by cell
                log(f"experiment: seed {seed}, method {m}")
                primed = model_dir if m == "none" else prime(args, run / "prime", model_dir, data_dir, m, seed)
                tuned = finetune(args, run / "finetune", primed, data_dir, seed)
                evaluate(args, run, tuned, data_dir)
            results[seed, m] = json.loads(done.read_text())
    cols = [source] + evals + ["avg"]
    score = lambda r, c: 100 * (r["target_avg_f1"] if c == "avg" else r["f1"][c])
    rows, summary = [], {}
    for m in methods:
        vals = {c: [score(results[s, m], c) for s in range(args.seed, args.seed + args.seeds)] for c in cols}
        summary[m] = {c: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0} for c, v in vals.items()}
        cells = [f"{summary[m][c]['mean']:.1f} ± {summary[m][c]['std']:.1f}" for c in cols]
        if "none" in summary and m != "none":
            delta = summary[m]["avg"]["mean"] - summary["none"]["avg"]["mean"]
            cells.append(f"{delta:+.1f}")
        else:
            cells.append("")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    head = f"| method | {source} (source) | " + " | ".join(evals) + " | target avg | Δ avg vs none |\n"
    table = head + "|---" * (len(cols) + 2) + "|\n" + "\n".join(rows) + "\n"
    note = f"\nEntity F1 (x100) on test, mean ± std over {args.seeds} seed(s) from {args.seed}.\n"
    atomic_write(out / "experiment.json", lambda f: Path(f).write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(out / "experiment.md", lambda f: Path(f).write_text(table + note))
    print(table + note)


# ----------------------------------------------------------------------------- command line

PRESETS = {  # --preset quick: the whole experiment on the testbed in a few minutes on 2 CPU cores
    "quick": {"prime_steps": 40, "finetune_steps": 300, "seeds": 2},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    a = lambda g, *n, **k: g.add_argument(*n, **{**k, "help": k["help"] + " (default: %(default)s)"})
    g = p.add_argument_group("run")
    a(g, "--stage", choices=("pretrain", "prime", "finetune", "eval", "experiment", "export"), default="prime",
      help="pretrain: MLM; prime: meta-learn theta for PEFT; finetune: PEFT on the source language; eval: per-language "
           "test F1; experiment: none/multitask/maml/prime x seeds -> one table; export: --model in --format to --out")
    a(g, "--model", help="Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json), e.g. "
      "xlm-roberta-base; omitted: the synthetic testbed's pretrained encoder")
    a(g, "--data", help="NER data folder: XTREME's {split}-{lang}.tsv or {lang}/{split}.{tsv,conll,jsonl}; "
      "omitted: the synthetic testbed")
    a(g, "--out", help="run folder; omitted: runs/<stage>-<time>")
    a(g, "--resume", action="store_true", default=False, help="continue the killed run in --out from its last checkpoint")
    a(g, "--seed", type=int, default=0, help="seed for initialisation, dropout, batches and episodes")
    a(g, "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    a(g, "--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast precision on CUDA (CPU: always fp32)")
    a(g, "--ckpt-every", type=int, default=100, help="steps between checkpoints")
    a(g, "--testbed", default="runs/testbed", help="where the synthetic testbed (data + pretrained model) is cached")
    a(g, "--testbed-seed", type=int, default=0, help="seed of the synthetic world")
    a(g, "--format", choices=("hf-mlm", "hf-base", "peft"), default="hf-mlm",
      help="export: hf-mlm (XLMRobertaForMaskedLM), hf-base (XLMRobertaModel) or peft (LoRA + head as a peft "
           "adapter folder)")
    g = p.add_argument_group("data and episodes")
    a(g, "--source", default="en", help="source language: fine-tuning and episode support batches")
    a(g, "--prime-langs", help="comma-separated query languages of priming episodes; omitted: the languages with a train but no test "
           "split (the testbed's es, el), else all but the source")
    a(g, "--eval-langs", help="comma-separated evaluation (target) languages; omitted: all test languages but the source")
    a(g, "--max-len", type=int, default=128, help="subword tokens per window; longer sentences are split, not cut")
    a(g, "--pairing", choices=("cross", "same"), default="cross",
      help="cross: support in the source, query in a priming language; same: one language per task")
    a(g, "--support-size", type=int, default=8, help="sentences per support batch")
    a(g, "--query-size", type=int, default=8, help="sentences per query batch")
    a(g, "--tasks", type=int, default=4, help="tasks (support, query pairs) per meta-step")
    g = p.add_argument_group("PEFT (phi)")
    a(g, "--peft", choices=("lora", "houlsby", "pfeiffer"), default="lora",
      help="PEFT method simulated in priming and used downstream (houlsby: adapters after attention and FFN; "
           "pfeiffer: after FFN only)")
    a(g, "--lora-r", type=int, default=8, help="LoRA rank")
    a(g, "--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (update = alpha / r * B A)")
    a(g, "--lora-dropout", type=float, default=0.0, help="dropout on LoRA's input")
    a(g, "--lora-targets", default="query,key,value,attn_out,ffn_in,ffn_out", help="comma-separated projections: query key value attn_out ffn_in ffn_out")
    a(g, "--adapter-size", type=int, default=64, help="adapter bottleneck width")
    a(g, "--adapter-act", choices=("relu", "gelu", "tanh"), default="relu", help="adapter non-linearity")
    g = p.add_argument_group("priming (MAML)")
    a(g, "--mode", choices=METHODS, default="prime",
      help="prime: inner loop simulates PEFT (the paper); maml: inner loop updates everything; multitask: plain "
           "training on the priming data; none: no priming")
    a(g, "--prime-steps", type=int, default=50, help="outer (meta) steps")
    a(g, "--inner-steps", type=int, default=1, help="K: simulated PEFT steps per task")
    a(g, "--inner-lr", type=float, default=0.3, help="alpha: inner SGD learning rate")
    a(g, "--meta-sgd", action="store_true", default=False, help="learn one inner learning rate per tensor (Meta-SGD)")
    a(g, "--first-order", action="store_true", default=False, help="first-order meta-gradient (no second derivatives)")
    a(g, "--outer", choices=("theta", "theta+phi"), default="theta",
      help="what the outer loop updates: the PLM only, or also phi's initialisation")
    a(g, "--phi-start", choices=("fresh", "meta"), default="fresh",
      help="phi at the start of each episode: a fresh draw (as downstream) or the meta-learned init")
    a(g, "--freeze-embeddings", action="store_true", default=False, help="keep embeddings fixed during priming")
    a(g, "--prime-lr", type=float, default=1e-4, help="outer AdamW learning rate")
    a(g, "--prime-warmup", type=int, default=10, help="outer warm-up steps")
    g = p.add_argument_group("fine-tuning, evaluation, pretraining")
    a(g, "--phi-init", default="fresh",
      help="downstream PEFT + head start: fresh, primed (the meta-learned init saved by priming), or a peft LoRA "
           "adapter folder (adapter_config.json + adapter_model.safetensors, e.g. trained with peft)")
    a(g, "--finetune-steps", type=int, default=600, help="PEFT training steps on the source language")
    a(g, "--finetune-lr", type=float, default=2e-3, help="PEFT AdamW learning rate")
    a(g, "--batch-size", type=int, default=32, help="sentences per fine-tuning / pretraining batch")
    a(g, "--micro-batch", type=int, default=0,
      help="fine-tuning sentences per forward pass; under torchrun the processes share a batch's micro-batches, "
           "each with its own dropout seed, so a run gives the weights of one process with the same value "
           "(0: batch size / processes)")
    a(g, "--eval-every", type=int, default=0, help="steps between source-dev evaluations (0: once an epoch)")
    a(g, "--eval-batch-size", type=int, default=64, help="sentences per evaluation batch")
    a(g, "--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices only)")
    a(g, "--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a(g, "--text", help="pretrain: text file (one sentence a line) for continued MLM of --model")
    a(g, "--pretrain-steps", type=int, default=600, help="MLM steps")
    a(g, "--pretrain-lr", type=float, default=1e-3, help="MLM AdamW learning rate")
    a(g, "--tiny-hidden", type=int, default=128, help="testbed encoder width (heads = width / 32)")
    a(g, "--tiny-layers", type=int, default=4, help="testbed encoder layers")
    g = p.add_argument_group("experiment")
    a(g, "--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    a(g, "--seeds", type=int, default=3, help="seeds per method (seed, seed+1, ...)")
    a(g, "--preset", choices=sorted(PRESETS), help="named settings that override the step and seed counts")
    args = p.parse_args(argv)
    for k, v in PRESETS.get(args.preset, {}).items():
        setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world = rank_world()
    try:
        if world > 1 and args.stage not in ("prime", "finetune"):
            raise UsageError(f"--stage {args.stage} runs in one process (torchrun is for prime and finetune)")
        dist_setup(args)
        if args.stage == "export":
            if args.model is None or args.out is None:
                raise UsageError("--stage export needs --model (a model folder) and --out (the folder to write)")
            export(args, checkpoint_dir(args.model), Path(args.out))
            log(f"export: {args.format} checkpoint written to {args.out}")
            return
        if args.stage == "pretrain":  # continued MLM of --model on --text, or a fresh tiny encoder on testbed text
            if args.model and not args.text:
                raise UsageError("--stage pretrain with --model continues MLM on --text FILE: give --text")
            data_dir = None if args.model else Path(args.data) if args.data else testbed(args, need_model=False)[1]
            out = start_run(args, "pretrain")
            target = pretrain(args, out, data_dir, args.model and Path(args.model), args.seed, args.resume)
            log(f"pretrain: model saved to {target}")
            return
        if rank:  # rank 0 makes the testbed, if needed, before the others read it
            dist.barrier()
        model_dir, data_dir = resolve_inputs(args)
        if world > 1 and not rank:
            dist.barrier()
        out = start_run(args, args.stage)
        on_testbed = args.data is None
        if on_testbed:
            log(f"note: using the built-in synthetic testbed ({data_dir}); for real work pass "
                f"--model path/to/xlm-roberta-base --data path/to/panx (see README)")
        if args.stage == "prime":
            primed = prime(args, out, model_dir, data_dir, args.mode, args.seed)
            log(f"prime: primed model saved to {primed}\nnext: python train.py --stage finetune --model {primed}"
                + ("" if on_testbed else f" --data {data_dir}"))
        elif args.stage == "finetune":
            tuned = finetune(args, out, model_dir, data_dir, args.seed)
            log(f"finetune: model saved to {tuned}\nnext: python train.py --stage eval --model {tuned}"
                + ("" if on_testbed else f" --data {data_dir}"))
        elif args.stage == "eval":
            evaluate(args, out, model_dir, data_dir)
            log(f"eval: results in {out}/results.json and results.md")
        else:
            experiment(args, out, model_dir, data_dir)
            log(f"experiment: table in {out}/experiment.md")
    except (UsageError, data.DataError, CheckpointError, ValueError) as e:  # ValueError: a rejected PEFT/priming config
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
