"""metapeft command line: pretrain -> prime -> finetune -> eval, and the experiment that compares them.

    python train.py --stage prime                      # the built-in synthetic testbed (made on first use)
    python train.py --stage finetune --model runs/prime-.../model
    python train.py --stage eval --model runs/finetune-.../model
    python train.py --stage experiment --preset quick  # none / multitask / maml / prime, several seeds
    python train.py --stage prime --model xlm-roberta-base/ --data panx/   # real checkpoint and PAN-X data
    python train.py --stage export --model runs/prime-.../model --format hf-mlm --out primed-xlmr/
    torchrun --standalone --nproc_per_node=4 train.py --stage prime ...   # the meta-batch split over 4 processes

Every run writes to its own folder: config.json (all resolved flags) and its outputs; training stages also
metrics.jsonl and checkpoint-<stage>.safetensors (prime: checkpoint-prime-<mode>; resume with --resume --out DIR).
See README.md.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import data
import metapeft
from model import PEFT_FILE, CheckpointError, Config, Model, PeftConfig, atomic_write, copy_lm_head, fresh_phi, \
    load_lora_adapter, load_peft, load_pretrained, open_safetensors, read_json, save_lora_adapter, saved_peft_config, \
    theta_phi

METHODS = ("none", "multitask", "maml", "prime")


class UsageError(Exception):
    """A user mistake, or a run that cannot go on (it diverged): reported as one line, exit code 2, no traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a stage at a step boundary, after a checkpoint. args: (message, signal number)."""


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

    def update(self, step, metrics, last=False):
        seconds = max(time.time() - self.t0, 1e-9)
        self.tokens += metrics.get("tokens", 0)
        rate = (step - self.start) / seconds
        eta = round((self.total - step) / rate) if rate else 0  # whole seconds first: 179.6 s is 3m00s, not 2m60s
        items = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        line = (f"{self.name} {step}/{self.total} {items} | {self.tokens / seconds:.0f} tok/s "
                f"ETA {eta // 60}m{eta % 60:02d}s")
        if self.tty:
            print(f"\r{line[:shutil.get_terminal_size().columns - 1]}\033[K", end="\n" if last or step == self.total else "",
                  file=sys.stderr, flush=True)
        elif step % self.every == 0 or last or step == self.total:
            log(line)


def start_run(args, stage):
    """Create the run folder and write the resolved config (or check it against the one being resumed)."""
    out = Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    found = [out, sorted(p.name for p in out.iterdir()) if out.is_dir() else []]
    if dist.is_initialized():  # one folder for all processes, named by rank 0's clock, seen before rank 0 writes
        dist.broadcast_object_list(found)
    out, names = found
    held = [n for n in names if n != "config.json"]  # a run that stopped at a bad flag left its config alone
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "out")} | {"stage": stage}
    if args.resume:
        if "config.json" not in names:
            raise UsageError(f"--resume: {out}/config.json not found (give --out the folder of the run to resume)")
        old, defaults = read_json(out / "config.json"), vars(make_parser().parse_args([]))
        # --skip-nonfinite may change: it only decides what a non-finite step does, e.g. one that stopped this run;
        # a flag added since the run was started is no difference at its default (which keeps the old behaviour)
        diff = sorted(k for k in config.keys() | old.keys() if config.get(k) != old.get(k) and k != "skip_nonfinite"
                      and not (k not in old and config[k] == defaults.get(k)))
        if diff:
            raise UsageError(f"--resume: flags differ from the run in {out}: {', '.join(diff)}")
    elif held and stage != "experiment":  # an experiment's folder keeps its finished cells
        raise UsageError(f"--out {out}: not empty ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): "
                         f"--resume continues the run in it, or give another folder")
    out.mkdir(parents=True, exist_ok=True)
    if rank_world()[0] == 0:
        atomic_write(out / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train_loop(out, name, total, step_fn, state, extra=None, ckpt_every=100, resume=False, skip_nonfinite=0):
    """Run step_fn(step) -> metrics for steps [start, total): progress line, metrics.jsonl, and a checkpoint
    (save_checkpoint) every ckpt_every steps. Batches are pure functions of (seed, step), so the step count is the
    whole data position. metrics["stop"] = True ends the run early: checkpointed at that step, so a resumed stopped
    run stays stopped. Ctrl-C or SIGTERM: the step in progress ends, is checkpointed, and Interrupted is raised.
    A non-finite metric (metapeft.step then left the weights alone) stops the run, the last checkpoint kept, unless
    it is one of the first skip_nonfinite such steps: those are skipped and counted in metrics.jsonl.
    Under torchrun, rank 0 alone writes metrics and checkpoints, every rank resumes from them, and all stop at the
    same step: a stop, or a signal to any one process, is agreed on (global_max) after each step."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt, metrics_file = out / f"checkpoint-{name}.safetensors", out / "metrics.jsonl"
    start, stop, skipped = load_checkpoint(ckpt, state, extra) if resume and ckpt.exists() else (0, False, 0)
    if start:
        log(f"{name}: resumed from {ckpt} at step {start}")
    main_rank = rank_world()[0] == 0
    if metrics_file.exists() and main_rank:  # drop what a killed run logged after its last checkpoint
        lines = [l for l in metrics_file.read_text().splitlines() if logged_by_then(l, name, start)]
        atomic_write(metrics_file, lambda f: Path(f).write_text("".join(l + "\n" for l in lines)))
    progress, signals = Progress(name, total, start), []

    def on_signal(signum, frame):
        if signals:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        signals.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in range(start, start if stop else total):
            metrics = step_fn(step)
            stop, signum = map(int, global_max([metrics.pop("stop", False), signals[0] if signals else 0]))
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]  # the same on every rank: global sums
            if bad:
                skipped += 1
                if skipped > skip_nonfinite:
                    kept = f"{ckpt} kept" if ckpt.exists() else "no checkpoint yet"
                    raise UsageError(f"{name}: non-finite {', '.join(bad)} at step {step + 1}: stopped, {kept} "
                                     f"(--skip-nonfinite N skips up to N such steps)")
                metrics |= dict.fromkeys(bad) | {"nonfinite_skipped": skipped}
            if main_rank:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps({"stage": name, "step": step + 1, **metrics}) + "\n")
                progress.update(step + 1, metrics, last=bool(stop))
            if main_rank and ((step + 1) % ckpt_every == 0 or step + 1 == total or stop or signum):
                save_checkpoint(ckpt, state, extra, step + 1, bool(stop), skipped)
            if signum:
                if dist.is_initialized():  # no process exits (and has torchrun stop the others) mid-checkpoint
                    dist.barrier()
                raise Interrupted(f"{name}: stopped by {signal.Signals(signum).name} after step {step + 1}, "
                                  f"checkpoint saved in {out}", signum)
            if stop:
                break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def logged_by_then(line, name, start):
    """Whether a metrics.jsonl line was logged before step `start` of stage `name` (or by another stage)."""
    try:
        m = json.loads(line)
        return m["stage"] != name or m["step"] <= start
    except (json.JSONDecodeError, KeyError, TypeError):  # cut by a kill, or not ours
        return False


def save_checkpoint(path, state, extra, step, stop, skipped):
    """Save `state`'s objects' state_dicts, `extra`, the RNG states and the loop's counters as plain data, no code:
    every tensor in one safetensors file under its path (model.encoder..., opt.state.0.exp_avg), the rest as JSON in
    its metadata. One file: one atomic rename. A state with non-finite values is refused, so the last good checkpoint
    stays."""
    blob = {key: obj.state_dict() for key, obj in state.items()} | {
        "step": step, "stop": stop, "skipped": skipped, "extra": extra or {},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    tensors = {}
    meta = json.dumps(to_json(blob, tensors))
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise UsageError(f"{path}: not overwritten: non-finite values at step {step} in {', '.join(bad[:3])}")
    atomic_write(path, lambda f: save_file(tensors, f, metadata={"state": meta}))


def load_checkpoint(path, state, extra):
    """Restore what save_checkpoint wrote into `state`'s objects, `extra` and the RNGs; returns (step, stop,
    skipped). Only tensors and JSON are read, so a checkpoint from elsewhere cannot run code."""
    with open_safetensors(path) as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {}).get("state")
    try:
        saved = from_json(json.loads(meta), tensors)
        for key, obj in state.items():
            obj.load_state_dict(saved[key])
        if extra is not None:
            extra.update(saved["extra"])
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        return int(saved["step"]), bool(saved["stop"]), int(saved["skipped"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # not a train.py checkpoint, or another run's
        raise CheckpointError(f"{path}: not a checkpoint of this run ({' '.join(str(e).split())[:300]})") from None


JSON_TAGS = ("tensor", "tuple", "items")


def to_json(obj, tensors, key=""):
    """obj as JSON, each tensor moved into `tensors` under its path (opt.state.0.exp_avg) and replaced by
    {"tensor": path}; tuples and dicts with keys JSON would change (the optimizer's ints) are tagged to come back."""
    if isinstance(obj, torch.Tensor):
        tensors[key[1:]] = obj.detach().cpu().contiguous()
        return {"tensor": key[1:]}
    if isinstance(obj, (list, tuple)):
        items = [to_json(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        items = [[k, to_json(v, tensors, f"{key}.{k}")] for k, v in obj.items()]
        return dict(items) if all(type(k) is str and k not in JSON_TAGS for k in obj) else {"items": items}
    return obj


def from_json(obj, tensors):
    """The inverse of to_json."""
    if isinstance(obj, dict) and len(obj) == 1 and (tag := next(iter(obj))) in JSON_TAGS:
        v = obj[tag]
        return tensors[v] if tag == "tensor" else tuple(from_json(v, tensors)) if tag == "tuple" else \
            {k: from_json(x, tensors) for k, x in v}
    if isinstance(obj, dict):
        return {k: from_json(v, tensors) for k, v in obj.items()}
    return [from_json(v, tensors) for v in obj] if isinstance(obj, list) else obj


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


def global_max(values):
    """The elementwise max over the processes of a list of numbers (itself in a plain run): what one decides, all do."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t.tolist()


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

# World 0's MLM-pretrained encoder ships with the code (so it is the same on every machine, and the first run pretrains
# nothing); `python train.py --stage pretrain --out DIR` rebuilds it in DIR/model from the world's regenerated text.
WORLD0 = Path(__file__).resolve().parent / "world0"
WORLD0_SHA256 = {
    "config.json": "da0b299218c41f8766ff78d560bd88e5e31724b634c02a11edf3545ff79b2cbd",
    "model.safetensors": "1239c687da230c3bc787efc5d34868090d89ce67c8dcff197ba8504b03dac943",
    "tokenizer.json": "4111e4f1fff66b130d6e4a191996d8e51abe60af00af0732750e8da0407e517f",
}


def shipped_world0(data_dir):
    """Whether the shipped world-0 encoder fits the world generated in data_dir: its files are the ones shipped (SHA-256)
    and its tokenizer is the world's (else the world is pretrained here, as any other)."""
    for name, digest in WORLD0_SHA256.items():
        if not (WORLD0 / name).exists() or hashlib.sha256((WORLD0 / name).read_bytes()).hexdigest() != digest:
            raise CheckpointError(f"{WORLD0 / name}: missing or not the shipped file (SHA-256 differs); `git checkout "
                                  f"world0` restores it")
    if (data_dir / "tokenizer.json").read_bytes() == (WORLD0 / "tokenizer.json").read_bytes():
        return True
    log(f"testbed: {data_dir}/tokenizer.json differs from the shipped {WORLD0}/tokenizer.json (another tokenizers "
        f"release?): world 0's encoder is pretrained here instead")
    return False


def testbed(args, seed, need_model=True):
    """The (model_dir, data_dir) of the synthetic testbed world `seed`, generated on first use and cached in
    <--testbed>-<seed>; the encoder is world 0's shipped one, or MLM-pretrained on the world's text and cached."""
    root = Path(f"{args.testbed}-{seed}")
    model_dir, data_dir = root / "pretrain" / "model", root / "data"
    if not (data_dir / "tokenizer.json").exists():
        log(f"testbed: generating the synthetic multilingual world in {data_dir} (seed {seed})")
        shutil.rmtree(root / "data.tmp", ignore_errors=True)
        data.make_world(root / "data.tmp", data.WorldConfig(seed=seed))
        data.write_tokenizer(root / "data.tmp")
        shutil.rmtree(data_dir, ignore_errors=True)
        os.replace(root / "data.tmp", data_dir)
    if need_model and seed == 0 and shipped_world0(data_dir):
        return WORLD0, data_dir
    if need_model and not (model_dir / "tokenizer.json").exists():  # the tokenizer is copied last
        log("testbed: MLM-pretraining a tiny encoder on the testbed's text (once; it is cached)")
        pretrain(args, root / "pretrain", data_dir, None, seed, resume=True)
    return model_dir, data_dir


def resolve_inputs(args):
    """(model_dir, data_dir) by one rule for every stage: what is not given is the synthetic testbed's, so --data
    alone needs a stage that makes its own model (pretrain), and --model alone a model with the testbed's tokenizer.
    model_dir is None when pretraining from scratch, data_dir None when pretraining --model on --text alone or
    exporting --model."""
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    if args.model is not None:
        model = Path(args.model)
        for need in ("config.json", "tokenizer.json"):
            if not (model / need).exists():
                raise UsageError(f"--model {model}: no {need} (expected a Hugging Face checkpoint folder)")
        if not list(model.glob("model.safetensors*")):
            raise UsageError(f"--model {model}: no model.safetensors (or its sharded index)")
    pretrain = args.stage == "pretrain"
    if args.data is not None:
        if args.model is None and not pretrain:
            raise UsageError(f"--data without --model: give the checkpoint to use on {args.data} (the testbed's "
                             "encoder fits only the testbed's data)")
        return args.model and Path(args.model), Path(args.data)
    if args.model and (pretrain and args.text or args.stage == "export"):  # what needs no data
        return Path(args.model), None
    model_dir, data_dir = testbed(args, args.testbed_seed, need_model=args.model is None and not pretrain)
    if args.model is None:
        return None if pretrain else model_dir, data_dir
    if (data_dir / "tokenizer.json").read_bytes() != (Path(args.model) / "tokenizer.json").read_bytes():
        raise UsageError(f"--model {args.model} is not a testbed model: give --data" + " or --text" * pretrain)
    return Path(args.model), data_dir


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
    curve = args.curve_langs.split(",") if args.curve_langs else []
    for flag, langs, split in (("--prime-langs", prime, "train"), ("--eval-langs", evals, "test"),
                               ("--curve-langs", curve, "dev")):
        if args.source in langs:  # priming's queries, the target average and the curve are of the other languages
            raise UsageError(f"{flag} {','.join(langs)}: {args.source} is the source language, expected others")
        found = data.languages(data_dir, split)
        for lang in langs:
            if lang not in found:
                raise UsageError(f"{flag}: no {split} split for {lang!r} in {data_dir} (found {', '.join(found)})")
    if set(prime) & set(evals) and args.stage in ("prime", "experiment"):
        log(f"warning: priming languages {sorted(set(prime) & set(evals))} are also evaluated on: "
            f"their labelled data is seen during priming, so that evaluation is not zero-shot")
    return args.source, prime, evals


def peft_config(args):
    return PeftConfig(method=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      lora_targets=tuple(args.lora_targets.split(",")), adapter_size=args.adapter_size,
                      adapter_act=args.adapter_act)


def prime_config(args, mode):
    """Priming's config; the inner AdamW decays as the downstream one, by --weight-decay."""
    return metapeft.PrimeConfig(mode=mode, inner_steps=args.inner_steps, inner_lr=args.inner_lr, meta_sgd=args.meta_sgd,
                                first_order=args.first_order, inner_backprop=args.inner_backprop,
                                inner_opt=args.inner_opt, inner_weight_decay=args.weight_decay,
                                support_batches=args.support_batches,
                                outer=args.outer, phi_start=args.phi_start,
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


def load_model(model_dir, tok, args, **kw):
    """load_pretrained(model_dir, **kw), checked against the tokenizer and --max-len before any forward pass."""
    model = load_pretrained(model_dir, **kw)
    cfg, n_tokens = model.cfg, max(tok.get_vocab().values()) + 1
    if n_tokens > cfg.vocab_size:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: token ids up to {n_tokens - 1}, but the model's "
                              f"embedding matrix has {cfg.vocab_size} rows (expected the model's own tokenizer)")
    if tok.token_to_id("<pad>") != cfg.pad_token_id:  # padding and the position ids both follow the model's
        raise CheckpointError(f"{model_dir / 'config.json'}: pad_token_id {cfg.pad_token_id}, but the tokenizer's "
                              f"<pad> is {tok.token_to_id('<pad>')}")
    if args.max_len + cfg.pad_token_id >= cfg.max_position_embeddings:  # positions count from pad_token_id + 1
        raise UsageError(f"--max-len {args.max_len}: {model_dir} has position embeddings for at most "
                         f"{cfg.max_position_embeddings - cfg.pad_token_id - 1} tokens")
    return model


def save_model(model, out, model_dir):
    """The model in the Hugging Face layout, with the tokenizer beside it, so it is a complete checkpoint, and the
    MLM head of model_dir (model.copy_lm_head) if the model has none, so that it exports as XLMRobertaForMaskedLM.
    Never one with non-finite weights."""
    bad = [n for n, p in model.named_parameters() if not p.isfinite().all()]
    if bad:
        raise UsageError(f"{out}: not saved: non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}")
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
        raise UsageError(f"--text {text}: file not found" if args.text else f"{text}: not found (give --text)")
    lines = [l for l in data.read_text(text).splitlines() if l.strip()]
    if len(lines) < 20:
        raise UsageError(f"--text {text}: {len(lines)} lines of text, expected at least 20")
    rows = [e.ids[:args.max_len - 1] + [tok.token_to_id("</s>")] for e in tok.encode_batch(lines)]
    examples = [data.Example(r, [data.IGNORE] * len(r), i, []) for i, r in enumerate(rows)]
    held_out, train = examples[::50], [e for i, e in enumerate(examples) if i % 50]
    seed_everything(seed)  # initialisation, or continued MLM's dropout
    if model_dir:
        model = load_model(model_dir, tok, args, mlm=True)
    else:
        # No dropout: the tiny encoder's MLM loss fell from 5.9 to 4.9 in 1500 steps without it (calibration)
        cfg = Config(vocab_size=tok.get_vocab_size(), hidden_size=args.tiny_hidden, num_hidden_layers=args.tiny_layers,
                     num_attention_heads=args.tiny_hidden // 32, intermediate_size=4 * args.tiny_hidden,
                     max_position_embeddings=args.max_len + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
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
    train_loop(out, "pretrain", args.pretrain_steps, step_fn, state, extra, args.ckpt_every, resume,
               args.skip_nonfinite)
    extra["loss_after"] = held_out_loss()
    log(f"pretrain: held-out MLM loss {extra['loss_before']:.3f} ({'--model' if model_dir else 'untrained'}) -> "
        f"{extra['loss_after']:.3f} (pretrained)")
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


def episode_config(args, source, query_langs, pairing):
    """Priming episodes as the flags give them: each task's support holds --support-batches batches of
    --support-size source sentences (one per inner step), its query --query-size sentences."""
    return data.EpisodeConfig(source_langs=(source,), query_langs=tuple(query_langs),
                              support_size=args.support_size * args.support_batches, query_size=args.query_size,
                              tasks_per_step=args.tasks, pairing=pairing)


def prime(args, out, model_dir, data_dir, mode, seed):
    """Priming (or an ablation): saves the primed encoder (+ meta-learned phi) to out/model."""
    source, prime_langs, _ = languages(args, data_dir)
    tok = data.load_tokenizer(model_dir)
    labels, _, examples = load_examples(data_dir, "train", [source] + prime_langs, tok, None, args.max_len)
    seed_everything(seed)
    model = load_model(model_dir, tok, args, labels=labels, peft=peft_config(args))
    cfg = prime_config(args, mode)
    device = device_of(args)
    model.to(device).train()
    if mode != "none":
        inner_lrs = metapeft.make_inner_lrs(model, cfg)
        params = metapeft.outer_params(model, cfg, inner_lrs)
        opt = metapeft.make_optimizer(params, cfg.lr, cfg.weight_decay)
        sched = metapeft.make_scheduler(opt, cfg.warmup, args.prime_steps)
        episodes = episode_config(args, source, prime_langs, args.pairing)
        pad = tok.token_to_id("<pad>")

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
        train_loop(out, f"prime-{mode}", args.prime_steps, step_fn, state, None, args.ckpt_every, args.resume,
                   args.skip_nonfinite)
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
        if mode == "none" or not set(theta_phi(model)[1]) & set(params):  # phi kept its initial draw: no init
            (out / "model" / PEFT_FILE).unlink(missing_ok=True)        # to offer --phi-init primed
    return out / "model"


def patience_exhausted(dev_f1s, patience):
    """Early stopping: True once the best of the dev F1s so far (the first of equals) is `patience` evaluations
    old. patience 0: never (the run takes its whole budget)."""
    return patience > 0 and len(dev_f1s) - 1 - dev_f1s.index(max(dev_f1s)) >= patience


def finetune(args, out, model_dir, data_dir, seed):
    """Downstream PEFT: theta frozen, PEFT + head trained on the source language until its dev F1 stops improving
    (patience_exhausted) or the budget ends; the checkpoint with the best source-language dev F1 is kept (no
    target-language data is used; --curve-langs only logs their dev F1). Saves out/model."""
    source, curve = languages(args, data_dir)[0], args.curve_langs.split(",") if args.curve_langs else []
    tok = data.load_tokenizer(model_dir)
    labels, _, train = load_examples(data_dir, "train", [source], tok, None, args.max_len)
    _, dev_sents, dev = load_examples(data_dir, "dev", [source] + curve, tok, labels, args.max_len)
    train = train[source]
    seed_everything(seed)
    peft = peft_config(args)
    model = load_model(model_dir, tok, args, labels=labels, peft=peft)
    theta, phi = theta_phi(model)
    if args.phi_init == "primed":
        saved = saved_peft_config(model_dir)
        if saved is None:
            raise UsageError(f"--phi-init primed: {model_dir} has no meta-learned PEFT init (priming learns one with "
                             f"--outer theta+phi, or in multitask mode)")
        if saved != peft:
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
    # Warm-up, then constant: the learning rate at a step depends neither on the budget nor on when the run stops.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.finetune_warmup + 1)))
    pad = tok.token_to_id("<pad>")
    per_epoch = math.ceil(len(train) / args.batch_size)
    best = {"f1": -1.0, "step": 0, "phi": {n: p.detach().clone() for n, p in phi.items()}, "dev_f1s": []}
    eval_every = args.eval_every or per_epoch
    micro = args.micro_batch or math.ceil(args.batch_size / rank_world()[1])  # check_args: one or more per process

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
            f1s = {lang: metapeft.evaluate(model, dev[lang], dev_sents[lang], labels, pad, args.eval_batch_size)["f1"]
                   for lang in [source] + curve}
            metrics |= {f"dev_f1_{lang}": f1s[lang] for lang in curve}  # a learning curve for analysis only
            f1 = metrics["dev_f1"] = f1s[source]
            best["dev_f1s"].append(f1)
            if f1 > best["f1"]:
                best.update(f1=f1, step=step + 1, phi={n: p.detach().clone() for n, p in phi.items()})
            metrics["stop"] = patience_exhausted(best["dev_f1s"], args.patience)
        return metrics

    train_loop(out, "finetune", args.finetune_steps, step_fn, {"model": model, "opt": opt, "sched": sched}, best,
               args.ckpt_every, args.resume, args.skip_nonfinite)
    copy_into(phi, best["phi"])
    log(f"finetune: best {source} dev F1 {best['f1']:.4f} at step {best['step']} ({len(best['dev_f1s'])} dev "
        f"evaluations)" if best["dev_f1s"] else "finetune: no steps, phi saved as initialised (no dev evaluation)")
    if rank_world()[0] == 0:
        save_model(model, out / "model", model_dir)
    return out / "model"


def export(args, model_dir, out):
    """--model in another layout, the tokenizer beside it: hf-mlm (XLMRobertaForMaskedLM, with the MLM head the
    encoder was pretrained with), hf-base (XLMRobertaModel), or peft (LoRA + head as a peft adapter folder)."""
    if out.resolve() == model_dir.resolve():
        raise UsageError(f"--out {out}: is the --model folder (the export would overwrite its input)")
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
    """Entity F1 on the test split of the source and every evaluation language; results.json + results.md. Also
    the dev F1 of the source and of the priming languages that have a dev split: what hyper-parameter selection may
    look at (zero-shot transfer measured without target-language labels)."""
    source, prime_langs, evals = languages(args, data_dir)
    tok = data.load_tokenizer(model_dir)
    peft = saved_peft_config(model_dir)
    model = load_model(model_dir, tok, args, peft=peft)
    if peft:
        load_peft(model, model_dir)
    if not model.labels:
        raise UsageError(f"--model {model_dir}: no token-classification head (run the finetune stage first)")
    model.to(device_of(args))
    pad = tok.token_to_id("<pad>")

    def scores(split, langs):
        _, sents, examples = load_examples(data_dir, split, langs, tok, model.labels, args.max_len)
        return {lang: metapeft.evaluate(model, examples[lang], sents[lang], model.labels, pad, args.eval_batch_size)
                for lang in langs}
    per_lang = scores("test", [source] + evals)
    dev = scores("dev", [source] + [l for l in prime_langs if l in data.languages(data_dir, "dev")])
    result = {"model": str(model_dir), "source": source, "f1": {l: r["f1"] for l, r in per_lang.items()},
              "target_avg_f1": data.macro_average({l: per_lang[l] for l in evals}),
              "dev_f1": {l: r["f1"] for l, r in dev.items()}, "detail": per_lang}
    atomic_write(out / "results.json", lambda f: Path(f).write_text(json.dumps(result, indent=2) + "\n"))
    table = "| " + " | ".join([f"{source} (source)"] + evals + ["target avg"]) + " |\n" + \
            "|---" * (len(evals) + 2) + "|\n| " + \
            " | ".join(f"{100 * result['f1'][l]:.1f}" for l in [source] + evals) + f" | {100 * result['target_avg_f1']:.1f} |\n"
    atomic_write(out / "results.md", lambda f: Path(f).write_text(table))
    print(table)
    return result


def probe(args, out, model_dir, data_dir):
    """What priming changed, the primed --model against the --base it started from (default: the testbed's
    pretrained encoder): (a) ||theta_primed - theta_base|| / ||theta_base|| per layer group; (b) the priming
    objective (mode prime, fresh phi) on held-out episodes (seed + 10**6) per priming and target language
    (targets: their train split, else dev); (c) the PEFT learning curve: dev F1 after 25, 50, 100, ... steps
    (only the source's selects anything, in finetune). probe.json and probe.md."""
    models = {"base": Path(args.base) if args.base else testbed(args, args.testbed_seed)[0], "primed": model_dir}
    source, prime_langs, evals = languages(args, data_dir)
    base, primed = (theta_phi(load_pretrained(d))[0] for d in models.values())
    if {n: p.shape for n, p in base.items()} != {n: p.shape for n, p in primed.items()}:
        raise UsageError(f"--base {models['base']} and --model {model_dir}: different architectures")
    group = lambda n: f"layer {n.split('.')[2]}" if n.startswith("encoder.layers.") else "embeddings"
    norm = lambda tensors: math.sqrt(sum(t.double().pow(2).sum().item() for t in tensors))
    change = {g: norm(primed[n] - base[n] for n in base if g in ("all", group(n))) /
                 norm(base[n] for n in base if g in ("all", group(n)))
              for g in [*dict.fromkeys(map(group, base)), "all"]}

    tok, have = data.load_tokenizer(model_dir), data.languages(data_dir, "train")
    labels, _, examples = load_examples(data_dir, "train", [source] + [l for l in prime_langs + evals if l in have],
                                        tok, None, args.max_len)
    examples |= load_examples(data_dir, "dev", [l for l in evals if l not in have], tok, labels, args.max_len)[2]
    cfg = replace(prime_config(args, "prime"), phi_start="fresh", outer="theta", meta_sgd=False)
    device, pad, loss = device_of(args), tok.token_to_id("<pad>"), {}
    for name, folder in models.items():
        model = load_model(folder, tok, args, labels=labels, peft=peft_config(args)).to(device).train()
        seed_everything(args.seed)  # the same fresh phi and dropout for both encoders
        loss[name] = {}
        for lang in prime_langs + evals:
            episodes = episode_config(args, source, [lang], "cross")
            with autocast(args, device):
                loss[name][lang] = statistics.mean(
                    metapeft.meta_loss(model, [(to_device(s, device), to_device(q, device)) for s, q in
                                               data.episodes(examples, episodes, pad, args.seed + 10**6, step)], cfg).item()
                    for step in range(args.probe_episodes))

    points = [25 * 2 ** k for k in range(int(math.log2(max(1, args.finetune_steps // 25))) + 1)]
    tune = argparse.Namespace(**vars(args) | {"patience": 0, "eval_every": 25, "phi_init": "fresh",
                                              "curve_langs": ",".join(evals)})
    curve = {}
    for name, folder in models.items():
        finetune(tune, out / f"finetune-{name}", folder, data_dir, args.seed)
        lines = [json.loads(l) for l in (out / f"finetune-{name}" / "metrics.jsonl").read_text().splitlines()]
        curve[name] = {l["step"]: {source: l["dev_f1"]} | {lang: l[f"dev_f1_{lang}"] for lang in evals}
                       for l in lines if l["step"] in points}
        for f1 in curve[name].values():
            f1["target avg"] = statistics.mean(f1[lang] for lang in evals)

    result = {"base": str(models["base"]), "primed": str(model_dir), "theta_change": change, "meta_loss": loss,
              "dev_f1_curve": curve}
    atomic_write(out / "probe.json", lambda f: Path(f).write_text(json.dumps(result, indent=2) + "\n"))
    md = "| layer group | ‖θ primed − θ base‖ / ‖θ base‖ |\n|---|---|\n" + \
         "".join(f"| {g} | {c:.2e} |\n" for g, c in change.items()) + \
         "\n| held-out priming loss | base | primed |\n|---|---|---|\n" + \
         "".join(f"| {lang} ({'priming' if lang in prime_langs else 'target'}) | {loss['base'][lang]:.4f} | "
                 f"{loss['primed'][lang]:.4f} |\n" for lang in prime_langs + evals) + \
         f"\n| PEFT steps | {source} dev F1 base | primed | target dev F1 avg base | primed |\n|---|---|---|---|---|\n" + \
         "".join(f"| {p} | " + " | ".join(f"{100 * curve[m][p][c]:.1f}" for c in (source, "target avg")
                                          for m in models) + " |\n" for p in points)
    atomic_write(out / "probe.md", lambda f: Path(f).write_text(md))
    print(md)


SEED_STRIDE = 1000  # run r of a cell with seed s uses seed s + 1000 r: the first run is the single-run cell's


def cell(args, run, model_dir, data_dir, method, seed):
    """One experiment cell: --prime-seeds priming runs with `method` (none: one, not primed), each fine-tuned
    --finetune-seeds times and evaluated; run/results.json holds every run's results and their mean, which scores the
    cell (averaging runs removes their noise from the comparison). The first run uses seed `seed` for both stages, so
    a cell of one run is that run; its resolved flags are in run/config.json (cells of one table may come from runs
    with different flags)."""
    run.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"method": method, "seed": seed}
    atomic_write(run / "config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))
    runs, single = [], cell_runs(args, method) == 1
    for i in range(1 if method == "none" else args.prime_seeds):
        prime_seed = seed + SEED_STRIDE * i
        folder = run if single else run / f"prime{i}"
        primed = model_dir if method == "none" else prime(args, folder / "prime", model_dir, data_dir, method, prime_seed)
        for j in range(args.finetune_seeds):
            leaf = folder if single else folder / f"finetune{j}"
            tuned = finetune(args, leaf / "finetune", primed, data_dir, seed + SEED_STRIDE * j)
            runs.append(evaluate(args, leaf, tuned, data_dir) | {"prime_seed": prime_seed,
                                                                  "finetune_seed": seed + SEED_STRIDE * j})
    if single:
        return runs[0]
    mean = lambda key: {l: statistics.mean(r[key][l] for r in runs) for l in runs[0][key]}
    result = {"f1": mean("f1"), "dev_f1": mean("dev_f1"),
              "target_avg_f1": statistics.mean(r["target_avg_f1"] for r in runs), "runs": runs}
    atomic_write(run / "results.json", lambda f: Path(f).write_text(json.dumps(result, indent=2) + "\n"))
    return result


def cell_runs(args, method):
    """How many prime -> finetune runs score one cell of `method`."""
    return (1 if method == "none" else args.prime_seeds) * args.finetune_seeds


def cell_done(run, n_runs):
    """Whether the cell in folder `run` has finished with n_runs runs (a cell of one run keeps no list of runs)."""
    path = run / "results.json"
    return path.exists() and len(read_json(path).get("runs", [None])) == n_runs


def logged(path, fn, *fn_args):
    """fn(*fn_args) with its standard output and error appended to the file `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*fn_args)


def run_jobs(jobs, threads, calls):
    """Each call (log_file, fn, *fn_args) as fn(*fn_args) at `threads` CPU threads: here when jobs is 1, else in
    `jobs` spawned processes with their output in log_file. Yields (call, result) as each ends."""
    if jobs == 1 or len(calls) < 2:
        torch.set_num_threads(threads)
        yield from ((call, call[1](*call[2:])) for call in calls)
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                               initargs=(threads,))

    def stop(signum, frame):  # Ctrl-C or SIGTERM to this process (or to all): the cells are ended below
        raise Interrupted(f"experiment: stopped by {signal.Signals(signum).name}, its finished cells kept", signum)

    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        futures = {pool.submit(logged, *call): call for call in calls}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except Interrupted:  # here or in a cell: no cell is left running without this process (outputs are atomic)
        for p in multiprocessing.active_children():
            p.kill()
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        pool.shutdown(cancel_futures=True)


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


def paired(diffs):
    """Mean of per-seed paired differences, its 95% t confidence interval (None for one seed), and wins (> 0)."""
    n, mean = len(diffs), statistics.mean(diffs)
    half = t_quantile(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    ci = None if half is None else [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "wins": sum(d > 0 for d in diffs), "n": n}


def experiment(args, out, model_dir, data_dir):
    """For each seed and method: prime (or not) -> finetune -> eval, in --jobs processes; with --per-world, seed s
    runs on testbed world s (each world built once, before the cells). experiment.md: mean +- std per language
    and on the target average, and each method's paired per-seed difference from `none` with its 95% confidence
    interval and wins; experiment.json: that, per language, and the per-seed scores."""
    methods = args.methods.split(",")
    seeds = list(range(args.seed, args.seed + args.seeds))
    # Every cell (and world) runs at the same thread count whatever --jobs is, so the table is too (a thread count
    # changes how float sums are split). 1 thread: the testbed's tiny models gain little from more.
    threads = args.threads or 1
    jobs = args.jobs or (max(1, os.cpu_count() // threads) if device_of(args).type == "cpu" else 1)
    inputs = dict.fromkeys(seeds, (model_dir, data_dir))
    if args.per_world:
        worlds = [(Path(f"{args.testbed}-{s}") / "log.txt", testbed, args, s) for s in seeds]
        inputs = {call[-1]: dirs for call, dirs in run_jobs(jobs, threads, worlds)}
    source, _, evals = languages(args, inputs[seeds[0]][1])
    # finished cells are kept: a killed experiment resumes cell by cell
    todo = [(out / f"seed{s}" / m / "log.txt", cell, args, out / f"seed{s}" / m, *inputs[s], m, s)
            for s in seeds for m in methods if not cell_done(out / f"seed{s}" / m, cell_runs(args, m))]
    todo.sort(key=lambda call: call[-2] == "none")  # the short cells last: no process idles while one primes
    for n, (call, result) in enumerate(run_jobs(jobs, threads, todo), 1):
        log(f"experiment: cell {n}/{len(todo)} done: seed {call[-1]}, {call[-2]}: target avg F1 "
            f"{100 * result['target_avg_f1']:.1f}")
    cols = [source] + evals + ["avg", "select"]
    # select: the mean dev F1 of the priming languages (of the source if none has a dev split), the number that
    # hyper-parameters are chosen by; no target-language label enters it
    select = lambda r: 100 * statistics.mean([f for l, f in r["dev_f1"].items() if l != source] or [r["dev_f1"][source]])
    results = {m: {s: read_json(out / f"seed{s}" / m / "results.json") for s in seeds} for m in methods}
    # every run of every cell, its target average and languages (a cell's score is their mean)
    runs = {m: {s: [{k: r[k] for k in ("prime_seed", "finetune_seed", "target_avg_f1", "f1", "dev_f1")}
                    for r in res["runs"]] for s, res in per_seed.items() if "runs" in res}
            for m, per_seed in results.items()}
    scores = {m: {s: {c: select(r) if c == "select" else 100 * (r["target_avg_f1"] if c == "avg" else r["f1"][c])
                      for c in cols} for s, r in per_seed.items()} for m, per_seed in results.items()}
    spread = lambda v: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
    summary = {m: {c: spread([scores[m][s][c] for s in seeds]) for c in cols} for m in methods}
    # every method against every one before it in the order none < multitask < maml < prime, whatever --methods'
    # order, paired by seed
    ordered = sorted(methods, key=METHODS.index)
    vs = {f"{a} - {b}": {c: paired([scores[a][s][c] - scores[b][s][c] for s in seeds]) for c in cols}
          for i, a in enumerate(ordered) for b in ordered[:i]}
    vs_none = {m: vs[f"{m} - none"] for m in methods if f"{m} - none" in vs}
    ci = lambda d: f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else ""
    rows = []
    for m in methods:
        cells = [f"{summary[m][c]['mean']:.1f} ± {summary[m][c]['std']:.1f}" for c in cols]
        if m in vs_none:
            d = vs_none[m]["avg"]
            cells += [f"{d['mean']:+.1f} {ci(d)}", f"{d['wins']}/{d['n']}"]
        else:
            cells += ["", ""]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    head = (f"| method | {source} (source) | " + " | ".join(evals) + " | target avg | selection (dev) "
            "| Δ avg vs none [95% CI] | wins |\n")
    table = head + "|---" * (len(cols) + 3) + "|\n" + "\n".join(rows) + "\n"
    worlds = "one testbed world per seed" if args.per_world else "one world"
    per_cell = {m: cell_runs(args, m) for m in methods}
    averaged = "" if set(per_cell.values()) == {1} else " Each cell is the mean of its runs (" + ", ".join(
        f"{m} {n}" for m, n in per_cell.items()) + f": --prime-seeds {args.prime_seeds} x --finetune-seeds {args.finetune_seeds})."
    note = (f"\nEntity F1 (x100) on test, mean ± std over {args.seeds} seed(s) from {args.seed}, {worlds}.{averaged} Δ: mean "
            f"per-seed difference from none on the target average, 95% t-interval (-0.0: below zero by less than "
            f"0.05); wins: seeds where it beats none. "
            f"selection: dev F1 of the priming languages (no target labels), what hyper-parameters are chosen by.\n")
    pairs = "\n| paired, target avg | Δ | 95% CI | wins |\n|---|---|---|---|\n" + "".join(
        f"| {k} | {d['avg']['mean']:+.1f} | {ci(d['avg'])} | {d['avg']['wins']}/{d['avg']['n']} |\n" for k, d in vs.items()
    ) if vs else ""
    result = {"seeds": seeds, "per_world": args.per_world, "scores": scores, "summary": summary, "paired": vs}
    if any(runs.values()):
        result["runs"] = runs
    atomic_write(out / "experiment.json", lambda f: Path(f).write_text(json.dumps(result, indent=2) + "\n"))
    atomic_write(out / "experiment.md", lambda f: Path(f).write_text(table + note + pairs))
    print(table + note + pairs)


# ----------------------------------------------------------------------------- command line

# The flags' defaults are the dataclasses': PrimeConfig's are the priming recipe the study selected, at the learning
# rates of xlm-roberta-base. The testbed's tiny encoder needs larger ones and fewer steps: the `testbed` preset, which
# every run without --data takes (logged, and saved in config.json).
PRIME, PEFT = metapeft.PrimeConfig(), PeftConfig()
PRESETS = {
    "testbed": {"prime_steps": 60, "prime_lr": 1e-3, "prime_warmup": 10, "inner_lr": 5e-3, "finetune_lr": 5e-3},
    "quick": {"prime_steps": 40, "finetune_steps": 300, "seeds": 2},  # the whole experiment in minutes on 2 cores
}


# Allowed values of every numeric flag: flag -> (test, what the error says). Checked before any work; None (a flag
# whose default is derived from others) passes. 0 means "none" or "skip" where the flag's help says so.
AT_LEAST_0, AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
RATE = (lambda v: 0 < v < math.inf, "a finite number > 0")  # NaN fails every comparison
FINITE_AT_LEAST_0 = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
RANGES = {
    "seed": AT_LEAST_0, "ckpt_every": AT_LEAST_1, "skip_nonfinite": AT_LEAST_0, "testbed_seed": AT_LEAST_0,
    "max_len": (lambda v: v >= 3, ">= 3 (<s>, </s> and one labelled subword)"),
    "support_size": AT_LEAST_1, "support_batches": AT_LEAST_1, "query_size": AT_LEAST_1, "tasks": AT_LEAST_1,
    "lora_r": AT_LEAST_1, "lora_alpha": RATE, "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adapter_size": AT_LEAST_1, "prime_steps": AT_LEAST_0, "inner_steps": AT_LEAST_0, "inner_lr": RATE,
    "inner_backprop": AT_LEAST_0, "prime_lr": RATE, "prime_warmup": AT_LEAST_0, "finetune_steps": AT_LEAST_0,
    "patience": AT_LEAST_0, "finetune_lr": RATE, "finetune_warmup": AT_LEAST_0, "batch_size": AT_LEAST_1,
    "micro_batch": AT_LEAST_0, "eval_every": AT_LEAST_0, "eval_batch_size": AT_LEAST_1,
    "weight_decay": FINITE_AT_LEAST_0, "clip": FINITE_AT_LEAST_0, "pretrain_steps": AT_LEAST_0, "pretrain_lr": RATE,
    "tiny_hidden": (lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (heads = width / 32)"),
    "tiny_layers": AT_LEAST_1, "seeds": AT_LEAST_1, "prime_seeds": AT_LEAST_1, "finetune_seeds": AT_LEAST_1, "jobs": AT_LEAST_0, "threads": AT_LEAST_0,
    "probe_episodes": AT_LEAST_1,
}


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line through main's handler instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def check_args(args):
    """Reject out-of-range numbers and invalid settings before any work, in one line naming the flag."""
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be {allowed}")
    for flag in ("methods", "prime_langs", "eval_langs", "curve_langs", "lora_targets"):
        items = (getattr(args, flag) or "").split(",")
        if getattr(args, flag) is not None and ("" in items or len(set(items)) < len(items)):
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: expected a comma-separated list, "
                             f"no item empty or repeated")
    if args.stage == "probe" and args.model is None:
        raise UsageError("--stage probe: give the primed encoder as --model (and the unprimed one as --base)")
    if args.stage == "probe" and args.base is None and args.data is not None:
        raise UsageError("--stage probe with --data: give the unprimed encoder as --base")
    if args.stage == "probe" and args.finetune_steps < 25:
        raise UsageError(f"--stage probe: --finetune-steps {args.finetune_steps}: the learning curve needs at least 25")
    if args.text and args.stage != "pretrain":
        raise UsageError(f"--text {args.text}: only for --stage pretrain (this is --stage {args.stage})")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the folder of the run to resume)")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
    if args.per_world and (args.stage != "experiment" or args.model or args.data):
        raise UsageError("--per-world: only for --stage experiment on the testbed (no --model, --data)")
    if args.stage == "export" and not args.out:
        raise UsageError("--stage export needs --out (the folder to write the exported checkpoint to)")
    if args.phi_init not in ("fresh", "primed") and not Path(args.phi_init).is_dir():
        raise UsageError(f"--phi-init {args.phi_init}: not fresh, primed or a folder (a peft LoRA adapter)")
    world = rank_world()[1]
    if world > 1 and args.stage not in ("prime", "finetune"):
        raise UsageError(f"--stage {args.stage} runs in one process (torchrun is for prime and finetune)")
    if world > 1 and args.stage == "prime" and args.tasks < world:
        raise UsageError(f"--tasks {args.tasks}: fewer tasks than the {world} processes that share them")
    micro = args.micro_batch or math.ceil(args.batch_size / world)
    if world > 1 and args.stage == "finetune" and math.ceil(args.batch_size / micro) < world:
        raise UsageError(f"--micro-batch {micro}: a batch of {args.batch_size} has fewer micro-batches than the "
                         f"{world} processes that share them")
    modes = {"prime": [args.mode], "probe": ["prime"],
             "experiment": [m for m in methods if m != "none"]}.get(args.stage, [])
    try:
        peft_config(args)
        for m in modes:
            prime_config(args, m)
    except ValueError as e:  # PeftConfig's and PrimeConfig's own checks, their field names put as the flags'
        raise UsageError(re.sub(r"\w+", lambda w: "--" + w[0].replace("_", "-") if w[0] in vars(args) else w[0],
                                str(e))) from None
    if args.dtype == "bf16" and device_of(args).type == "cpu":
        log("note: --dtype bf16 is autocast on CUDA only; on the CPU this run is fp32")


def make_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    a = lambda g, *n, **k: g.add_argument(*n, **{**k, "help": k["help"] + " (default: %(default)s)"})
    g = p.add_argument_group("run")
    a(g, "--stage", choices=("pretrain", "prime", "finetune", "eval", "experiment", "probe", "export"), default="prime",
      help="pretrain: MLM; prime: meta-learn theta for PEFT; finetune: PEFT on the source language; eval: per-language "
           "test F1; experiment: none/multitask/maml/prime x seeds -> one table; probe: primed --model vs --base; "
           "export: --model in --format to --out")
    a(g, "--model", help="Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer.json), e.g. "
      "xlm-roberta-base; omitted: the synthetic testbed's pretrained encoder")
    a(g, "--data", help="NER data folder: XTREME's {split}-{lang}.tsv or {lang}/{split}.{tsv,conll,jsonl}; "
      "omitted: the synthetic testbed")
    a(g, "--out", help="run folder (one that holds a run needs --resume); omitted: runs/<stage>-<time>")
    a(g, "--resume", action="store_true", default=False, help="continue the killed run in --out from its last checkpoint")
    a(g, "--seed", type=int, default=0, help="seed for initialisation, dropout, batches and episodes")
    a(g, "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train; auto: cuda if a GPU is available, else cpu")
    a(g, "--threads", type=int, default=0, help="CPU threads per process; 0: all cores, but 1 per experiment cell")
    a(g, "--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast precision on CUDA (CPU: always fp32)")
    a(g, "--ckpt-every", type=int, default=100, help="steps between checkpoints")
    a(g, "--skip-nonfinite", type=int, default=0, help="steps with a non-finite loss or gradient norm to skip (not "
      "applied; counted in metrics.jsonl) before such a step stops the run")
    a(g, "--testbed", default="runs/testbed",
      help="synthetic testbed worlds (data + pretrained model) are cached in <this>-<world seed>")
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
    a(g, "--support-batches", type=int, default=PRIME.support_batches,
      help="support batches per task, one per inner step, cycling (1: the K inner steps reuse one batch)")
    a(g, "--query-size", type=int, default=8, help="sentences per query batch")
    a(g, "--tasks", type=int, default=4, help="tasks (support, query pairs) per meta-step")
    g = p.add_argument_group("PEFT (phi)")
    a(g, "--peft", choices=("lora", "houlsby", "pfeiffer"), default="lora",
      help="PEFT method simulated in priming and used downstream (houlsby: adapters after attention and FFN; "
           "pfeiffer: after FFN only)")
    a(g, "--lora-r", type=int, default=PEFT.lora_r, help="LoRA rank")
    a(g, "--lora-alpha", type=float, default=PEFT.lora_alpha, help="LoRA scaling numerator (update = alpha / r * B A)")
    a(g, "--lora-dropout", type=float, default=PEFT.lora_dropout, help="dropout on LoRA's input")
    a(g, "--lora-targets", default=",".join(PEFT.lora_targets),
      help="comma-separated projections: query key value attn_out ffn_in ffn_out")
    a(g, "--adapter-size", type=int, default=PEFT.adapter_size, help="adapter bottleneck width")
    a(g, "--adapter-act", choices=("relu", "gelu", "tanh"), default=PEFT.adapter_act, help="adapter non-linearity")
    g = p.add_argument_group("priming (MAML)")
    a(g, "--mode", choices=METHODS, default="prime",
      help="prime: inner loop simulates PEFT (the paper); maml: inner loop updates everything; multitask: plain "
           "training on the priming data; none: no priming")
    a(g, "--prime-steps", type=int, default=2000, help="outer (meta) steps (0: save the encoder unprimed)")
    a(g, "--inner-steps", type=int, default=PRIME.inner_steps, help="K: simulated PEFT steps per task (0: none)")
    a(g, "--inner-opt", choices=("sgd", "adam"), default=PRIME.inner_opt,
      help="inner optimizer simulating PEFT: AdamW as downstream (fresh moments per task, --weight-decay on "
           "matrices), or plain SGD")
    a(g, "--inner-lr", type=float, default=PRIME.inner_lr,
      help="alpha: inner learning rate, the downstream --finetune-lr for adam (plain SGD needs far more, e.g. 0.3)")
    a(g, "--meta-sgd", action="store_true", default=False, help="learn one inner learning rate per tensor (Meta-SGD)")
    a(g, "--first-order", action=argparse.BooleanOptionalAction, default=PRIME.first_order,
      help="first-order meta-gradient (no second derivatives); --no-first-order: second order")
    a(g, "--inner-backprop", type=int, default=0,
      help="truncated back-propagation: second order through the last N inner steps only, first order before "
           "(0: all steps)")
    a(g, "--outer", choices=("theta", "theta+phi"), default=PRIME.outer,
      help="what the outer loop updates: the PLM only, or also phi's initialisation")
    a(g, "--phi-start", choices=("fresh", "meta"), default=PRIME.phi_start,
      help="phi at the start of each episode: a fresh draw (as downstream) or the meta-learned init")
    a(g, "--freeze-embeddings", action="store_true", default=False, help="keep embeddings fixed during priming")
    a(g, "--prime-lr", type=float, default=PRIME.lr, help="outer AdamW learning rate")
    a(g, "--prime-warmup", type=int, default=PRIME.warmup, help="outer warm-up steps")
    g = p.add_argument_group("fine-tuning, evaluation, pretraining")
    a(g, "--phi-init", default="fresh",
      help="downstream PEFT + head start: fresh, primed (the meta-learned init saved by priming), or a peft LoRA "
           "adapter folder (adapter_config.json + adapter_model.safetensors, e.g. trained with peft)")
    a(g, "--finetune-steps", type=int, default=2000, help="most PEFT training steps on the source language")
    a(g, "--patience", type=int, default=5,
      help="stop fine-tuning after this many source-dev evaluations without a new best F1 (0: run all steps)")
    a(g, "--finetune-lr", type=float, default=PRIME.inner_lr, help="PEFT AdamW learning rate")
    a(g, "--curve-langs", help="comma-separated languages whose dev F1 finetune also logs (analysis only, never "
      "selects); omitted: none")
    a(g, "--finetune-warmup", type=int, default=30, help="PEFT learning-rate warm-up steps, then constant")
    a(g, "--batch-size", type=int, default=32, help="sentences per fine-tuning / pretraining batch")
    a(g, "--micro-batch", type=int, default=0,
      help="fine-tuning sentences per forward pass; under torchrun the processes share a batch's micro-batches, "
           "each with its own dropout seed, so a run gives the weights of one process with the same value "
           "(0: batch size / processes)")
    a(g, "--eval-every", type=int, default=100, help="steps between source-dev evaluations (0: once an epoch)")
    a(g, "--eval-batch-size", type=int, default=64, help="sentences per evaluation batch")
    a(g, "--weight-decay", type=float, default=PRIME.weight_decay, help="AdamW weight decay (matrices only)")
    a(g, "--clip", type=float, default=PRIME.clip, help="max gradient norm (0: no clipping)")
    a(g, "--text", help="pretrain: text file (one sentence a line) for continued MLM of --model")
    a(g, "--pretrain-steps", type=int, default=3000, help="MLM steps (0: save the untrained encoder)")
    a(g, "--pretrain-lr", type=float, default=1e-3, help="MLM AdamW learning rate")
    a(g, "--tiny-hidden", type=int, default=128, help="testbed encoder width (heads = width / 32)")
    a(g, "--tiny-layers", type=int, default=4, help="testbed encoder layers")
    g = p.add_argument_group("experiment")
    a(g, "--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    a(g, "--seeds", type=int, default=3, help="seeds per method (seed, seed+1, ...)")
    a(g, "--prime-seeds", type=int, default=1, help="priming runs per cell (seeds seed, seed+1000, ...), each fine-tuned "
      "--finetune-seeds times; the cell scores the mean of its runs (none: one, unprimed)")
    a(g, "--finetune-seeds", type=int, default=1, help="fine-tuning runs per primed encoder (seeds seed, seed+1000, ...)")
    a(g, "--per-world", action="store_true", default=False,
      help="testbed only: seed s runs on its own world, --testbed-seed s (built once each, before the cells)")
    a(g, "--jobs", type=int, default=0, help="cells (and worlds) run in this many processes, logs in their folders; 0: cores / --threads on a CPU, 1 on a GPU; the table is the same bit for bit for every N")
    a(g, "--base", help="probe: the unprimed encoder --model was primed from; omitted: the testbed's pretrained one")
    a(g, "--probe-episodes", type=int, default=10, help="probe: held-out meta-batches per language for the priming loss")
    a(g, "--preset", choices=sorted(PRESETS), help="new defaults for the flags they name (flags given explicitly keep "
      "their value; every run without --data also takes `testbed`): " + "; ".join(
          f"{n}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items()) for n, preset in PRESETS.items()))
    return p


def parse_args(argv=None):
    """The resolved flags: given ones, then --preset's, then `testbed`'s without --data, then the defaults; checked."""
    p = make_parser()
    args = p.parse_args(argv)
    for action in p._actions:  # parsed again with no defaults: what remains is what the command line gave
        action.default = argparse.SUPPRESS
    given = vars(p.parse_args(argv))
    args.presets = [args.preset] * bool(args.preset) + ["testbed"] * (args.data is None and args.preset != "testbed")
    for k, v in [kv for name in args.presets for kv in PRESETS[name].items()]:
        if k not in given:
            setattr(args, k, v)
            given[k] = v  # the first preset that names a flag wins
    check_args(args)
    return args


def main(argv=None):
    out = None
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        dist_setup(args)
        rank = rank_world()[0]
        if rank:  # rank 0 makes the testbed, if needed, before the others read it
            dist.barrier()
        try:
            model_dir, data_dir = (None, None) if args.per_world else resolve_inputs(args)
        finally:  # also when the inputs are bad: the others then find the same error, and all exit alike
            if dist.is_initialized() and not rank:
                dist.barrier()
        out = Path(args.out) if args.stage == "export" else start_run(args, args.stage)  # export: a checkpoint folder
        for name in args.presets * (args.stage in ("prime", "finetune", "experiment", "probe")):  # who uses them
            log(f"preset {name}: " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in PRESETS[name]))
        on_testbed = args.data is None
        if on_testbed and args.stage not in ("pretrain", "export"):
            log(f"note: using the built-in synthetic testbed ({data_dir or args.testbed + '-<seed>'}); for real work pass "
                f"--model path/to/xlm-roberta-base --data path/to/panx (see README)")
        if args.stage == "pretrain":  # a fresh tiny encoder (no --model), or continued MLM of --model
            target = pretrain(args, out, data_dir, model_dir, args.seed, args.resume)
            log(f"pretrain: model saved to {target}")
        elif args.stage == "prime":
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
        elif args.stage == "probe":
            probe(args, out, model_dir, data_dir)
            log(f"probe: tables in {out}/probe.md, numbers in probe.json")
        elif args.stage == "export":
            export(args, model_dir, out)
            log(f"export: {args.format} checkpoint written to {out}")
        else:
            experiment(args, out, model_dir, data_dir)
            log(f"experiment: table in {out}/experiment.md")
        if dist.is_initialized():  # the processes leave together: gloo may abort one that tears down alone
            dist.barrier()
    except (UsageError, data.DataError, CheckpointError) as e:  # the project's own errors; bugs keep their traceback
        log("error: " + " ".join(str(e).split()))  # one line, whatever the message quotes
        sys.exit(2)
    except OSError as e:  # a path the file system refuses (under a file, no permission, disk full)
        log(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
        sys.exit(2)
    except Interrupted as e:
        message, signum = e.args
        log(f"{message}; to go on, run the same command " + (f"with --resume --out {out}" if out else "again"))
        sys.exit(128 + signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
