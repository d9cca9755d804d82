"""Speed and memory of metapeft against transformers (+ peft). The last line printed is one JSON object.

    python bench/run.py --quick                         # 2 layers, vocab 50k, batches 8 x 64: a smoke run
    python bench/run.py                                 # xlm-roberta-base: 12 layers, vocab 250,002, batches 8 x 128
    python bench/run.py --no-padding                    # every row full length
    python bench/run.py --device cuda --dtype bf16      # on a GPU (bench/gpu.sh runs it)
    python bench/run.py --sections prime --out bench/results/NAME.json    # the testbed's meta-step alone

Sections, from one checkpoint the script writes (random weights, a trained-looking LoRA):
  matmul   this machine's matmul rate on the encoder's own shapes (torch.mm, the benchmark's dtype)
  parity   max |ours - transformers| of the encoder's hidden states, eval mode
  encoder  forward+backward of our encoder vs transformers' XLMRobertaModel (sdpa), dropout on
  meta     one priming meta-step (K = 1 inner SGD step on LoRA r = 8 on query/value + head, phi0 = the
           checkpoint's, gradient of theta only) with the outer AdamW step, first and second order: ours
           (metapeft.meta_loss + metapeft.step) vs the same algorithm on transformers + peft driven by
           torch.func.functional_call, as a performance-aware user writes it: sdpa attention (its math kernel for
           the passes differentiated twice, as ours), loss.backward(inputs=theta), clip_grad_norm_ and
           torch.optim.AdamW(fused=True); dropout 0, so gradients agree
  recipe   the whole priming step of the study's recipe (RECIPE: K = 20 inner AdamW steps, each on a new support
           batch of --batch rows, first order) on --tasks tasks with the outer step; the reference adapts a per-task
           copy of the LoRA + head tensors with torch.optim.AdamW(fused=True) (autograd.grad into .grad, then
           .step()); also against the sequential code (below)
  prime    the testbed's priming meta-step as `python train.py --stage prime` takes it (4 tasks, the testbed
           preset of the recipe, world 0's encoder, one process): ours (the tasks together) vs the sequential code
The sequential code: metapeft.py, model.py (and their data.py, train.py) of SEQUENTIAL_COMMIT, the last whose
meta_loss took one task at a time
(train.py called it once per task); the variants' table is VARIANTS.
  profile  (not by default) one step of meta (second order) and recipe per stack: the ops' CPU time by kind
           (matmuls, attention, elementwise, optimizer) and the rest (Python, autograd, dispatch); the matmuls'
           FLOP/s against the matmul section's rate
Batches: rows of --seq / 2 to --seq tokens, padded to the longest row of the batch (as data.collate pads); with
--no-padding every row is --seq tokens. The report gives each section's padding fraction.
Every variant runs in a fresh process (its own peak memory, no shared allocator state), in alternating order over
--repeats rounds; each process times --steps steps after one warm-up step. Figures are medians. Ratios are ours
relative to the reference: speed-ups above 1 are faster, memory ratios below 1 smaller.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The code before the task-batched meta-step (meta_loss one task at a time), for the variants of settings["code"]
# "sequential": run_variant puts its files (write_sequential_code) in a folder named by BENCH_CODE, imported first.
SEQUENTIAL_COMMIT = "e516686"
if os.environ.get("BENCH_CODE"):
    sys.path.insert(0, os.environ["BENCH_CODE"])
import data  # noqa: E402
import metapeft as mp  # noqa: E402
from model import Config, Model, PeftConfig, hf_key, load_peft, load_pretrained  # noqa: E402

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
PEFT = PeftConfig(method="lora", lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets=("query", "value"))
# Every PrimeConfig field the bench relies on, explicitly: the dataclass's defaults follow the study and may change.
PRIME_COMMON = dict(mode="prime", meta_sgd=False, inner_backprop=0, outer="theta", phi_start="meta",
                    freeze_embeddings=False, lr=2e-5, weight_decay=0.01, warmup=0, clip=1.0, inner_betas=(0.9, 0.999),
                    inner_eps=1e-8, inner_weight_decay=0.01)
# The meta section's step: K = 1 SGD step on the whole support batch, first or second order.
META = dict(inner_opt="sgd", inner_steps=1, support_batches=1, inner_lr=1e-3)
# The study's selected inner loop (study/README.md): 20 AdamW steps at the downstream PEFT lr, each on a new support
# batch, first order. phi starts at the checkpoint's (phi_start "meta", not the study's fresh draw, which costs
# nothing measurable) so that both stacks take the same step and their gradients can be compared.
RECIPE = dict(inner_opt="adam", inner_steps=20, support_batches=20, inner_lr=5e-4, first_order=True)
SIZES = {"full": dict(layers=12, vocab=250002, batch=8, seq=128), "quick": dict(layers=2, vocab=50000, batch=8, seq=64)}
# Our bf16 hidden states may be at most this many times as far (mean absolute error) from transformers' fp32 states
# as transformers' own bf16 states are.
BF16_TOLERANCE = 1.5
# Dense peak TFLOP/s (bf16, fp32 without TF32) of GPUs we may be lent, for MFU against the data sheet.
PEAK_TFLOPS = {"H200": (989.4, 66.9), "H100": (989.4, 66.9), "A100": (312.0, 19.5)}


# ----------------------------------------------------------------------------- in the child process

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(fn, args, device):
    """Seconds of each of args.steps calls of fn after one warm-up call, and the peak memory (MB) over them: the
    CUDA allocator's peak, or the process's resident-set high-water mark (reset after the warm-up step).
    On a CPU the seconds are the process's CPU time: with one thread that is the wall time of an idle machine, and
    unlike wall time it does not count the time other jobs on a shared machine hold the cores."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(args.steps):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    return times, peak


def forward_flops(batch, layers):
    """Matmul FLOPs of one forward pass of the encoder on a batch: the projections and FFN on its real tokens (the
    work either stack must do; padding is extra work, which ours skips), attention over all positions, as both
    stacks' kernels compute it. Backward passes count as 2 forward passes; LoRA and the head are negligible."""
    cfg, (B, S) = Config(), batch["input_ids"].shape
    H, I = cfg.hidden_size, cfg.intermediate_size
    tokens = int(batch["attention_mask"].sum())
    return layers * (2 * tokens * (4 * H * H + 2 * H * I) + 2 * 2 * B * S * S * H)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()


def make_batches(args, n, device, rows=None, seed=0):
    """n batches of `rows` (default args.batch) rows of random tokens and random labels, each row of a random length
    from half to all of args.seq (all of it with args.no_padding), padded to the batch's longest row."""
    gen = torch.Generator().manual_seed(seed)
    rows, out = rows or args.batch, []
    for _ in range(n):
        lengths = torch.randint(args.seq if args.no_padding else args.seq // 2, args.seq + 1, (rows,), generator=gen)
        width = int(lengths.max())
        ids = torch.randint(3, args.vocab, (rows, width), generator=gen)
        pad = torch.arange(width) >= lengths[:, None]
        ids[:, 0] = 0
        ids[torch.arange(rows), lengths - 1] = 2
        ids[pad] = 1
        labels = torch.randint(len(LABELS), ids.shape, generator=gen).masked_fill(ids <= 2, -100)
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": (~pad).long(), "labels": labels}.items()})
    return out


def hf_model(ckpt, attention, device):
    """transformers' XLMRobertaForTokenClassification + peft LoRA, weights from the checkpoint, all trainable."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    hf = AutoModelForTokenClassification.from_pretrained(ckpt, attn_implementation=attention)
    model = get_peft_model(hf, LoraConfig(r=PEFT.lora_r, lora_alpha=PEFT.lora_alpha, lora_dropout=0.0,
                                          target_modules=list(PEFT.lora_targets)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(ckpt / "peft.safetensors").items():
            params[f"base_model.model.{hf_key(n)}.default.weight"].copy_(t)
        for p in params.values():  # own memory, not pages of the checkpoint file that loading may have mapped
            p.data = p.data.clone()
    for p in params.values():
        p.requires_grad_(True)  # peft froze the base and the head; priming trains theta and adapts the head
    return model.to(device)


def is_phi(name):
    """LoRA or head, under our names and under peft's (base_model.model.classifier.weight, ...lora_A.default...)."""
    return "lora_" in name or "classifier." in name


def recipe_tasks(args, device):
    """--tasks tasks of the recipe: each a support batch of support_batches x --batch rows (split by rows, one part
    per inner step, as train.py's priming data), padded as a whole to its longest row, and a query batch of --batch
    rows."""
    return [(make_batches(args, 1, device, rows=args.batch * RECIPE["support_batches"], seed=1 + 2 * t)[0],
             make_batches(args, 1, device, seed=2 + 2 * t)[0]) for t in range(getattr(args, "tasks", 1))]


def padding_fraction(batches):
    return round(1 - torch.cat([b["attention_mask"].flatten() for b in batches]).float().mean().item(), 3)


def ours_meta_step(ckpt, cfg, device):
    """Our meta-step: metapeft.meta_loss with phi0 = the checkpoint's phi, then metapeft.step."""
    model = load_peft(load_pretrained(ckpt, labels=LABELS, peft=PEFT), ckpt).to(device).train()
    params = mp.outer_params(model, cfg)
    opt = mp.make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = mp.make_scheduler(opt, cfg.warmup, 1000)
    return lambda tasks, amp: mp.step(_loss(amp, lambda: mp.meta_loss(model, tasks, cfg)), params, opt, sched,
                                      cfg.clip)


def reference_meta_step(ckpt, cfg, device):
    """The same meta-step as a performance-aware user writes it on transformers + peft + functional_call: sdpa
    attention (its math kernel where a pass is differentiated twice: the fused kernels have no double backward),
    the inner AdamW as torch's fused one on a per-task copy of phi (first order), the outer one fused too."""
    model = hf_model(ckpt, "sdpa", device).train()
    params = dict(model.named_parameters())
    phi = [n for n in params if is_phi(n)]
    theta = [p for n, p in params.items() if not is_phi(n)]
    opt = torch.optim.AdamW([{"params": [p for p in theta if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in theta if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    sched = mp.make_scheduler(opt, cfg.warmup, 1000)
    if cfg.inner_opt == "adam" and not cfg.first_order:
        raise ValueError("the reference's inner AdamW (torch.optim.AdamW, in place) is first order only")

    def loss(p, batch):
        logits = functional_call(model, p, (), {"input_ids": batch["input_ids"],
                                                "attention_mask": batch["attention_mask"]}).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)

    def adapted(support):
        """The parameters after the inner loop (phi adapted, theta as it is), as task_loss's."""
        supports = [dict(zip(support, rows))
                    for rows in zip(*(t.tensor_split(cfg.support_batches) for t in support.values()))]
        p = dict(params)
        if cfg.inner_opt == "adam":
            copy = {n: params[n].detach().clone().requires_grad_() for n in phi}
            inner = torch.optim.AdamW(
                [{"params": [t for t in copy.values() if t.ndim >= 2], "weight_decay": cfg.inner_weight_decay},
                 {"params": [t for t in copy.values() if t.ndim < 2], "weight_decay": 0.0}],
                lr=cfg.inner_lr, betas=cfg.inner_betas, eps=cfg.inner_eps, fused=True)
            for k in range(cfg.inner_steps):
                grads = torch.autograd.grad(loss(p | copy, supports[k % len(supports)]), list(copy.values()))
                for t, g in zip(copy.values(), grads):
                    t.grad = g
                inner.step()
            return p | copy
        for k in range(cfg.inner_steps):
            with nullcontext() if cfg.first_order else sdpa_kernel([SDPBackend.MATH]):
                support_loss = loss(p, supports[k % len(supports)])
            grads = torch.autograd.grad(support_loss, [p[n] for n in phi], create_graph=not cfg.first_order)
            p.update({n: p[n] - cfg.inner_lr * g for n, g in zip(phi, grads)})
        return p

    def meta_loss(tasks):
        return sum(loss(adapted(support), query) for support, query in tasks) / len(tasks)

    def step(tasks, amp):
        loss = _loss(amp, lambda: meta_loss(tasks))
        loss.backward(inputs=theta)
        norm = torch.nn.utils.clip_grad_norm_(theta, cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return norm
    return step


def _loss(amp, fn):
    with amp:
        return fn()


def matmul_rate(args, device, settings):
    """This machine's matmul rate on the encoder's own shapes."""
    cfg, tokens = Config(), args.batch * args.seq
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shapes = [(tokens, cfg.hidden_size, cfg.hidden_size), (tokens, cfg.hidden_size, cfg.intermediate_size),
              (tokens, cfg.intermediate_size, cfg.hidden_size)]
    mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for m, k, n in shapes]
    reps = 10 if device.type == "cpu" else 200
    times, peak = timed_steps(lambda: [a @ b for a, b in mats for _ in range(reps)], args, device)
    flops = reps * sum(2 * m * k * n for m, k, n in shapes)
    return {"peak_mb": peak, "times": times, "flop_per_s": flops / statistics.median(times)}


def parity(args, device, settings):
    """max |ours - transformers| of the encoder's hidden states in fp32, and both stacks' bf16 errors."""
    from transformers import XLMRobertaModel
    ckpt = Path(args.ckpt)
    ours = load_pretrained(ckpt / "encoder").encoder.to(device).eval()
    ref = XLMRobertaModel.from_pretrained(ckpt / "encoder", attn_implementation="sdpa",
                                          add_pooling_layer=False).to(device).eval()
    batch = make_batches(args, 1, device)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()  # padded positions' states are unused (and differ between attention kernels)
    states = {}
    for dtype in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            states[dtype] = (ours(ids, mask).float()[real],
                             ref(ids, attention_mask=mask).last_hidden_state.float()[real])
    want = states["fp32"][1]
    out = {"parity_fp32_max_abs_diff": (states["fp32"][0] - want).abs().max().item(),
           "parity_max_abs_state": want.abs().max().item()}
    # bf16 has no exact answer: both stacks' bf16 states against transformers' fp32 ones
    for who, state in zip(("ours", "hf"), states["bf16"]):
        out[f"parity_bf16_{who}_mean_abs_err"] = (state - want).abs().mean().item()
        out[f"parity_bf16_{who}_max_abs_err"] = (state - want).abs().max().item()
    return out


def encoder_step(args, device, settings):
    """Forward + backward of one encoder (ours or transformers'), dropout on."""
    ckpt = Path(args.ckpt)
    if settings["stack"] == "ours":
        model = load_pretrained(ckpt / "encoder").to(device).train()
        run = lambda ids, mask: model.encoder(ids, mask)
    else:
        from transformers import XLMRobertaModel
        model = XLMRobertaModel.from_pretrained(ckpt / "encoder", attn_implementation="sdpa",
                                                add_pooling_layer=False).to(device).train()
        run = lambda ids, mask: model(ids, attention_mask=mask).last_hidden_state
    batch, amp = make_batches(args, 1, device)[0], autocast(args, device)

    def step():
        model.zero_grad(set_to_none=True)  # as a training step does, so gradients never accumulate
        with amp:
            loss = run(batch["input_ids"], batch["attention_mask"]).float().square().mean()
        loss.backward()
    times, peak = timed_steps(step, args, device)
    return {"peak_mb": peak, "step_s": statistics.median(times), "times": times,
            "flops": 3 * forward_flops(batch, args.layers)}


def meta_step(args, device, settings):
    """A meta-step (section meta or recipe) of one stack, timed; grad_norm_first is the warm-up step's norm: the
    same weights in every stack, so it must agree."""
    step, tasks, flops = meta_variant(settings, args, device)
    norms, amp = [], autocast(args, device)
    times, peak = timed_steps(lambda: norms.append(float(step(tasks, amp))), args, device)
    return {"peak_mb": peak, "step_s": statistics.median(times), "times": times, "grad_norm_first": norms[0],
            "flops": flops, "padding_fraction": padding_fraction([b for task in tasks for b in task])}


def profile(args, device, settings):
    step, tasks, _ = meta_variant(VARIANTS[settings["of"]][1], args, device)
    amp = autocast(args, device)
    return profile_step(lambda: step(tasks, amp), device)


def testbed_prime_step(args, device, settings):
    """The testbed's priming meta-step as `python train.py --stage prime` takes it (its default recipe, world 0's
    encoder, meta-step 1's tasks) in one process: this code's meta_loss on all tasks at once, or the sequential
    code's train.py loop (torch reseeded per task, meta_loss on one task at a time). Both draw each task's fresh phi
    from the same seed, so their gradients agree."""
    import train
    targs = train.parse_args(["--stage", "prime", "--testbed", args.testbed, "--procs", "1"])
    model_dir, data_dir = train.resolve_inputs(targs)  # makes the testbed world on first use
    source, langs, _ = train.resolve_languages(targs, data_dir)
    tok = data.load_tokenizer(model_dir)
    labels, _, examples = train.load_examples(data_dir, "train", [source] + langs, tok, None, targs.max_len)
    model = train.load_model(model_dir, tok, targs, labels=labels, peft=train.peft_config(targs)).to(device).train()
    cfg = train.prime_config(targs, "prime")
    episodes = train.episode_config(targs, source, langs, targs.pairing)
    tasks = [tuple({k: v.to(device) for k, v in batch.items()} for batch in task)
             for task in data.episodes(examples, episodes, tok.token_to_id("<pad>"), seed=0, step=1)]
    params = mp.outer_params(model, cfg)
    opt = mp.make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = mp.make_scheduler(opt, cfg.warmup, targs.prime_steps)
    seeds = range(len(tasks))

    def loss():
        if settings["code"] == "batched":
            return mp.meta_loss(model, tasks, cfg, None, seeds)
        total = 0
        for task, seed in zip(tasks, seeds):
            torch.manual_seed(seed)
            total = total + mp.meta_loss(model, [task], cfg) / len(tasks)
        return total
    norms = []
    times, peak = timed_steps(lambda: norms.append(mp.step(loss(), params, opt, sched, cfg.clip)), args, device)
    return {"peak_mb": peak, "step_s": statistics.median(times), "times": times, "grad_norm_first": norms[0],
            "tasks": len(tasks), "tokens": sum(int(b["attention_mask"].sum()) for t in tasks for b in t)}


# Every variant the parent runs, each in a fresh process: name -> (builder, settings). settings["code"]
# "sequential" runs the code of SEQUENTIAL_COMMIT (metapeft.py and model.py; the rest is this checkout's).
VARIANTS = {
    "matmul": (matmul_rate, {}),
    "parity": (parity, {}),
    "encoder_ours": (encoder_step, {"stack": "ours"}),
    "encoder_hf": (encoder_step, {"stack": "hf"}),
    **{f"meta_{stack}_{order}": (meta_step, {"section": "meta", "stack": stack, "order": order})
       for order in (1, 2) for stack in ("ours", "reference")},
    "recipe_ours": (meta_step, {"section": "recipe", "stack": "ours"}),
    "recipe_reference": (meta_step, {"section": "recipe", "stack": "reference"}),
    "recipe_sequential": (meta_step, {"section": "recipe", "stack": "ours", "code": "sequential"}),
    "prime_batched": (testbed_prime_step, {"code": "batched"}),
    "prime_sequential": (testbed_prime_step, {"code": "sequential"}),
    **{f"profile_{name}": (profile, {"of": name})
       for name in ("meta_ours_2", "meta_reference_2", "recipe_ours", "recipe_reference")},
}
# The variants of each section, in the order they run; a section's comparisons: (key, ours, the one compared to).
SECTIONS = {
    "matmul": ["matmul"],
    "encoder": ["encoder_ours", "encoder_hf"],
    "meta": ["meta_ours_1", "meta_reference_1", "meta_ours_2", "meta_reference_2"],
    "recipe": ["recipe_ours", "recipe_reference", "recipe_sequential"],
    "prime": ["prime_batched", "prime_sequential"],
}
COMPARISONS = {
    "encoder": [("encoder", "encoder_ours", "encoder_hf")],
    "meta": [("metastep1", "meta_ours_1", "meta_reference_1"), ("metastep2", "meta_ours_2", "meta_reference_2")],
    "recipe": [("recipe", "recipe_ours", "recipe_reference"), ("recipe_vs_sequential", "recipe_ours",
                                                                "recipe_sequential")],
    "prime": [("prime", "prime_batched", "prime_sequential")],
}


def child(args):
    """Run one variant in this (fresh) process; print its figures as one JSON line."""
    import peft, transformers  # noqa: F401  in every variant, so that all start from the same resident memory
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    build, settings = VARIANTS[args.child]
    print(json.dumps(build(args, torch.device(args.device), settings)))


def meta_variant(settings, args, device):
    """(step, tasks, matmul FLOPs of a step) of a meta or recipe variant's settings."""
    ckpt = Path(args.ckpt) / "meta"
    make = ours_meta_step if settings["stack"] == "ours" else reference_meta_step
    if settings["section"] == "recipe":
        cfg = mp.PrimeConfig(**PRIME_COMMON, **RECIPE)
        tasks = recipe_tasks(args, device)
        # each inner step: forward, backward to phi (through every layer: about one forward); query: fwd, bwd
        flops = sum(forward_flops(support, args.layers) * 2 + forward_flops(query, args.layers) * 3
                    for support, query in tasks)
    else:
        order = settings["order"]
        cfg = mp.PrimeConfig(**PRIME_COMMON, **META, first_order=order == 1)
        tasks = [tuple(make_batches(args, 2, device))]
        # support: forward, backward (second order: both once more); query: forward, backward
        flops = (forward_flops(tasks[0][0], args.layers) * (2 if order == 1 else 6)
                 + forward_flops(tasks[0][1], args.layers) * 3)
    return make(ckpt, cfg, device), tasks, flops


# Kinds of op in profile_step's table: ATen op names, or parts of them; bmm is attention's (our projections and
# transformers' are mm or addmm), so "attention" is its matmuls plus softmax and the fused kernels.
OP_KINDS = (("matmul", {"mm", "addmm"}), ("attention", {"bmm", "baddbmm", "softmax", "scaled_dot_product"}),
            ("optimizer", {"_adamw", "_foreach_", "linalg_vector_norm"}))


def op_kind(op):
    return next((kind for kind, names in OP_KINDS if op in names or any(len(n) > 5 and n in op for n in names)),
                "elementwise")


def matmul_flops(func, args):
    """FLOPs of an mm, addmm, bmm or baddbmm call, else 0."""
    name = func.overloadpacket.__name__
    if name in ("mm", "bmm"):
        a, b = args[0], args[1]
    elif name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    else:
        return 0
    return 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]


def profile_step(fn, device):
    """Where one step's CPU time goes: each ATen op's thread CPU time, taken around the op by a TorchDispatchMode
    (torch.profiler's times are wall times, which other jobs on a shared machine inflate at random), summed by kind
    of op. 'other' is the rest of that step's CPU time: Python, autograd's and the dispatcher's own work, and the
    timer's (step_s is an untimed step's CPU time, for comparison). Matmul FLOP/s: their FLOPs over their time."""
    from collections import defaultdict
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTimes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds, self.flops = defaultdict(float), defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.thread_time()
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            self.seconds[name] += time.thread_time() - start
            self.flops[name] += matmul_flops(func, args)
            return out

    fn()  # warm-up
    start = time.process_time()
    fn()
    total = time.process_time() - start
    with OpTimes() as ops:
        start = time.process_time()
        fn()
        profiled = time.process_time() - start
    kinds = dict.fromkeys(("matmul", "attention", "elementwise", "optimizer"), 0.0)
    flops = {"matmul": 0, "attention": 0}
    for op, seconds in ops.seconds.items():
        kind = op_kind(op)
        kinds[kind] += seconds
        if kind in flops:
            flops[kind] += ops.flops[op]
    out = {"step_s": round(total, 4), "profiled_s": round(profiled, 4),
           "ops_s": {k: round(v, 4) for k, v in kinds.items()}}
    out["ops_s"]["other"] = round(profiled - sum(kinds.values()), 4)
    out["flop_per_s"] = {k: f / kinds[k] if kinds[k] else None for k, f in flops.items()}
    out["top_ops_s"] = {op: round(t, 4) for op, t in sorted(ops.seconds.items(), key=lambda x: -x[1])[:12]}
    return out


# ----------------------------------------------------------------------------- in the parent process

def write_checkpoints(args, root):
    """root/meta: a token-classification checkpoint with a trained-looking LoRA (B != 0, so both stacks must really
    apply it), dropout 0; root/encoder: the same weights with dropout 0.1 (the weights file is a link)."""
    torch.manual_seed(0)
    cfg = Config(vocab_size=args.vocab, num_hidden_layers=args.layers, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    model = Model(cfg, LABELS, PEFT)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.02)
    model.save_pretrained(root / "meta")
    (root / "encoder").mkdir()
    config = json.loads((root / "meta" / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (root / "encoder" / "config.json").write_text(json.dumps(config))
    (root / "encoder" / "model.safetensors").symlink_to(root / "meta" / "model.safetensors")


def run_variant(name, args, ckpt):
    """The figures (a dict) of one variant, run in a fresh process."""
    flags = [f"--{k}={getattr(args, k)}" for k in ("layers", "vocab", "batch", "seq", "tasks", "steps", "threads",
                                                   "device", "dtype")]
    if args.no_padding:
        flags.append("--no-padding")
    env = dict(os.environ)
    if VARIANTS[name][1].get("code") == "sequential":
        env["BENCH_CODE"] = str(Path(ckpt) / "sequential")
    proc = subprocess.run([sys.executable, __file__, *flags, f"--child={name}", f"--ckpt={ckpt}",
                           f"--testbed={Path(ckpt) / 'testbed'}"], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"bench variant {name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {out}", file=sys.stderr, flush=True)
    return out


def write_sequential_code(root):
    """root/sequential: the code of SEQUENTIAL_COMMIT (from git), for the sequential variants: metapeft.py and
    model.py, and the data.py and train.py that go with them (today's train.py imports names they lack)."""
    (root / "sequential").mkdir()
    for name in ("metapeft.py", "model.py", "data.py", "train.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{SEQUENTIAL_COMMIT}:{name}"], capture_output=True,
                              text=True, check=True).stdout
        (root / "sequential" / name).write_text(text)
    (root / "sequential" / "world0").symlink_to(ROOT / "world0")  # the shipped encoder, found beside train.py


def run_rounds(names, args, ckpt):
    """{variant: [figures of each round]}: each variant once per round, order alternating between rounds."""
    results = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(run_variant(name, args, ckpt))
    return results


def median(results, name, key):
    return statistics.median(r[key] for r in results[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"smaller sizes: {SIZES['quick']} (default: {SIZES['full']})")
    for k in SIZES["full"]:
        ap.add_argument(f"--{k}", type=int, help=f"override the {k} of the chosen size")
    ap.add_argument("--no-padding", action="store_true",
                    help="every row --seq tokens (default: --seq / 2 to --seq, padded to the longest row)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once (default: 3)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process after a warm-up (default: 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default: 1; on a CPU shared with other jobs, OpenMP threads stall)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default: cpu)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (default: fp32)")
    ap.add_argument("--tasks", type=int, default=1, help="tasks of the recipe's meta-step (default: 1)")
    ap.add_argument("--sections", default="matmul,parity,encoder,meta,recipe,prime",
                    help="comma-separated subset of matmul,parity,encoder,meta,recipe,prime,profile (default: all but "
                         "profile)")
    ap.add_argument("--out", help="also write the final JSON object to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--testbed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in SIZES["quick" if args.quick else "full"].items():
        setattr(args, k, getattr(args, k) or v)
    if args.child:
        return child(args)

    sections = args.sections.split(",")
    start, load = time.time(), os.getloadavg()[0]
    padding = {"padding_fraction": padding_fraction(make_batches(args, 2, "cpu")),
               "recipe_padding_fraction": padding_fraction([b for t in recipe_tasks(args, "cpu") for b in t])}
    report = {"size": {k: getattr(args, k) for k in SIZES["full"]} | {"tasks": args.tasks, "hidden": 768, "heads": 12}
              | padding,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else
              f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch thread(s)",
              "dtype": args.dtype, "torch": torch.__version__, "repeats": args.repeats, "steps": args.steps,
              "reference_optimizer": "fused", "recipe": RECIPE, "sequential_code": SEQUENTIAL_COMMIT}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(args, Path(tmp))
        write_sequential_code(Path(tmp))
        if "parity" in sections:  # not timed: once
            report |= run_variant("parity", args, tmp)
            report["parity_fp32_ok"] = report["parity_fp32_max_abs_diff"] <= 1e-4
            report["parity_bf16_ok"] = (report["parity_bf16_ours_mean_abs_err"]
                                        <= BF16_TOLERANCE * report["parity_bf16_hf_mean_abs_err"])
        results = run_rounds([name for section in sections for name in SECTIONS.get(section, [])], args, tmp)
        if "profile" in sections:  # not timed for the ratios: once each
            report["profile"] = {VARIANTS[n][1]["of"]: run_variant(n, args, tmp) for n in VARIANTS
                                 if n.startswith("profile_")}
    if "matmul" in sections:
        report["matmul_flop_per_s"] = rate = median(results, "matmul", "flop_per_s")
    for section, comparisons in COMPARISONS.items():
        if section not in sections:
            continue
        for key, ours, other in comparisons:  # "ref": the variant compared to
            t_ours, t_ref = median(results, ours, "step_s"), median(results, other, "step_s")
            m_ours, m_ref = median(results, ours, "peak_mb"), median(results, other, "peak_mb")
            report |= {f"{key}_ours_s": round(t_ours, 4), f"{key}_ref_s": round(t_ref, 4),
                       f"{key}_ours_peak_mb": round(m_ours), f"{key}_ref_peak_mb": round(m_ref)}
            if section == "encoder":
                report["encoder_speedup_vs_hf"] = round(t_ref / t_ours, 3)
            else:
                report[f"{key}_speedup_vs_ref"] = round(t_ref / t_ours, 3)
                report[f"{key}_mem_ratio_vs_ref"] = round(m_ours / m_ref, 3)
                a, b = results[ours][0]["grad_norm_first"], results[other][0]["grad_norm_first"]
                report[f"{key}_grad_norm_rel_diff"] = abs(a - b) / b  # the same gradient: ~1e-7 in fp32
            if "flops" in results[ours][0]:
                flops = results[ours][0]["flops"]
                report[f"{key}_ours_flop_per_s"] = flops / t_ours
                if "matmul" in sections:
                    report[f"{key}_matmul_fraction"] = round(flops / t_ours / rate, 3)
    if "encoder_matmul_fraction" in report:
        report["matmul_fraction"] = report["encoder_matmul_fraction"]
    peak = next((p for gpu, p in PEAK_TFLOPS.items() if gpu in report["device"]), None)
    if peak:
        for key in ("encoder", "metastep1", "metastep2", "recipe"):
            if f"{key}_ours_flop_per_s" in report:
                report[f"{key}_mfu"] = round(report[f"{key}_ours_flop_per_s"] / (peak[args.dtype == "fp32"] * 1e12), 4)
    if "profile" in report and "matmul_flop_per_s" in report:
        for prof in report["profile"].values():
            prof["matmul_fraction"] = {k: round(v / rate, 3) for k, v in prof["flop_per_s"].items() if v}
    # The headline figures last, where a reader of the JSON line's end finds them.
    for key in ("metastep2_speedup_vs_ref", "metastep2_mem_ratio_vs_ref", "recipe_speedup_vs_ref",
                "recipe_mem_ratio_vs_ref", "recipe_vs_sequential_speedup_vs_ref", "prime_speedup_vs_ref"):
        if key in report:
            report[key] = report.pop(key)
    report |= {"load_average_start_end": [round(load, 2), round(os.getloadavg()[0], 2)],
               "wall_s": round(time.time() - start)}
    line = json.dumps(report)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
