"""Time and peak memory of one priming meta-step: metapeft (model.py + metapeft.py) against the same algorithm
on transformers' XLMRobertaForTokenClassification + peft LoRA, driven by torch.func.functional_call over the
same parameter dicts, from the same weights. Prints one JSON object.

Each variant (ours / reference x first / second order) runs in a fresh subprocess so that its RSS high-water
mark (ru_maxrss) is its own. Both use dropout 0, so their losses must agree.

    python bench/bench_prime.py            # xlm-roberta-base dimensions, vocab cut to 30k (a few minutes on 2 cores)
    python bench/bench_prime.py --quick    # 2 layers, a smoke run
"""
import argparse
import json
import os
import resource
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metapeft as mp  # noqa: E402
from model import Config, Model, PeftConfig, hf_key, load_peft, load_pretrained  # noqa: E402

LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
PEFT = PeftConfig(method="lora", lora_r=8, lora_alpha=16.0, lora_targets=("query", "value"))
VARIANTS = ("ours_first_order", "ours_second_order", "reference_first_order", "reference_second_order")


def is_phi(name):
    """LoRA or head, under our names and under peft's (base_model.model.classifier.weight, ...lora_A.default...)."""
    return "lora_" in name or "classifier." in name


def make_tasks(args):
    """tasks x (support, query) batches of random tokens; rows of varying length so attention masks matter."""
    gen = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
        lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=gen)
        pad = torch.arange(args.seq) >= lengths[:, None]
        ids[:, 0] = 0
        ids[torch.arange(args.batch), lengths - 1] = 2
        ids[pad] = 1
        labels = torch.randint(len(LABELS), ids.shape, generator=gen).masked_fill(ids <= 2, -100)
        return {"input_ids": ids, "attention_mask": (~pad).long(), "labels": labels}
    return [(batch(), batch()) for _ in range(args.tasks)]


def ours(ckpt, cfg):
    """Our model and meta-loss: metapeft.meta_loss with phi0 = the checkpoint's LoRA and head."""
    model = load_peft(load_pretrained(ckpt, labels=LABELS, peft=PEFT), ckpt)
    return model, lambda tasks: mp.meta_loss(model, tasks, cfg)


def reference(ckpt, cfg):
    """The same algorithm as a user would write it on transformers + peft (sdpa attention, math backend for the
    second-order support passes: the same remedy as ours, since fused kernels have no double backward)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    hf = AutoModelForTokenClassification.from_pretrained(ckpt, attn_implementation="sdpa")
    model = get_peft_model(hf, LoraConfig(r=PEFT.lora_r, lora_alpha=PEFT.lora_alpha, lora_dropout=0.0,
                                          target_modules=list(PEFT.lora_targets)))
    lora = {f"base_model.model.{hf_key(n)}.default.weight": t for n, t in load_file(ckpt / "peft.safetensors").items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in lora.items():
            params[n].copy_(t)
    for p in params.values():
        p.requires_grad_(True)  # peft froze the base and the head; priming trains theta and adapts the head
    phi = [n for n in params if is_phi(n)]
    assert len(phi) == len(lora) + 2

    def loss(p, batch):
        logits = functional_call(model, p, (), {"input_ids": batch["input_ids"],
                                                "attention_mask": batch["attention_mask"]}).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def meta_loss(tasks):
        losses = []
        for support, query in tasks:
            p = dict(params)
            with nullcontext() if cfg.first_order else sdpa_kernel([SDPBackend.MATH]):
                for _ in range(cfg.inner_steps):
                    grads = torch.autograd.grad(loss(p, support), [p[n] for n in phi], create_graph=not cfg.first_order)
                    p.update({n: p[n] - cfg.inner_lr * g for n, g in zip(phi, grads)})
            losses.append(loss(p, query))
        return sum(losses) / len(losses)
    return model, meta_loss


def run_variant(args):
    """In a fresh process: build one variant, take 1 warm-up + args.repeat timed meta-steps, report time and RSS."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = mp.PrimeConfig(inner_steps=1, first_order=args.child.endswith("first_order"), phi_start="meta")
    model, meta_loss = (ours if args.child.startswith("ours") else reference)(Path(args.ckpt), cfg)
    model.train()
    theta = {n: p for n, p in model.named_parameters() if not is_phi(n)}
    opt = mp.make_optimizer(theta, cfg.lr, cfg.weight_decay)
    sched = mp.make_scheduler(opt, 0, 100)
    tasks = make_tasks(args)
    # Current RSS (not the high-water mark, which loading may have set with since-unmapped checkpoint pages).
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    times, losses = [], []
    for _ in range(1 + args.repeat):
        start = time.perf_counter()
        loss = meta_loss(tasks)
        mp.step(loss, theta, opt, sched, cfg.clip)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"step_s": round(min(times[1:]), 3), "step_s_all": [round(t, 3) for t in times],
                      "first_loss": losses[0], "peak_rss_mb": round(peak), "rss_before_step_mb": round(rss_before),
                      "step_peak_increase_mb": round(peak - rss_before)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="timed meta-steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a CPU shared with other jobs, OpenMP threads stall")
    ap.add_argument("--quick", action="store_true", help="2 layers, a smoke run")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.layers = 2
    if args.child:
        return run_variant(args)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = Config(vocab_size=args.vocab, num_hidden_layers=args.layers, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
        model = Model(cfg, LABELS, PEFT)
        with torch.no_grad():  # a trained-looking LoRA, so both stacks must really apply it
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.02)
        model.save_pretrained(tmp)
        del model
        flags = [f"--{k}={getattr(args, k)}" for k in ("layers", "vocab", "batch", "seq", "tasks", "repeat", "threads")]
        results = {}
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, *flags, f"--child={variant}", f"--ckpt={tmp}"],
                                 capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])

    ratios = {f"{kind}_{order}": round(results[f"ours_{order}"][kind] / results[f"reference_{order}"][kind], 3)
              for order in ("first_order", "second_order")
              for kind in ("step_s", "peak_rss_mb", "step_peak_increase_mb")}
    print(json.dumps({
        "model": f"xlm-roberta-base dimensions (hidden 768, {args.layers} layers, 12 heads, intermediate 3072), "
                 f"vocab reduced to {args.vocab}, dropout 0",
        "meta_step": f"K=1 inner SGD step on LoRA r=8 (query, value) + head, {args.tasks} tasks of support/query "
                     f"batches {args.batch} x {args.seq} (padded rows), AdamW on theta",
        "reference": "transformers XLMRobertaForTokenClassification + peft get_peft_model(LoRA), "
                     "torch.func.functional_call over the same parameter dicts, same weights",
        "reference_attention": "sdpa; the second-order support passes under sdpa_kernel([SDPBackend.MATH]), "
                               "as in metapeft (the CPU flash kernel has no double backward)",
        "step_s": "min over the timed steps after one warm-up step; peak_rss_mb: ru_maxrss of a fresh process per "
                  "variant; step_peak_increase_mb: that peak minus the RSS just before the first meta-step",
        "machine": f"{os.cpu_count()}-core CPU, torch {torch.__version__}, {args.threads} torch thread(s), "
                   f"load average at start {os.getloadavg()[0]:.2f}",
        "results": results, "ratios_ours_over_reference": ratios}, indent=2))


if __name__ == "__main__":
    main()
