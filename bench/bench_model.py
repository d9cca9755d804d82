"""Forward+backward time of our encoder vs transformers' XLMRobertaModel on the same weights, same process.

    python bench/bench_model.py              # xlm-roberta-base dimensions
    python bench/bench_model.py --layers 2   # quick smoke run
Prints one JSON object; ratio = ours / transformers (below 1 means we are faster).
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import Config, Model, hf_key  # noqa: E402


def timed(fns, repeats):
    """Median seconds of each function, run interleaved (in alternating order) so that machine noise and
    allocator state hit all alike."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        pairs = list(zip(fns, times))
        for fn, ts in pairs if r % 2 else pairs[::-1]:
            t = time.perf_counter()
            fn()
            if r:  # the first round warms up
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = xlm-roberta-base)")
    ap.add_argument("--vocab", type=int, default=250002, help="vocabulary size (250002 = xlm-roberta-base)")
    ap.add_argument("--batch", type=int, default=8, help="sentences per batch")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sentence (a quarter of them padding)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    args = ap.parse_args()
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    cfg = Config(num_hidden_layers=args.layers, vocab_size=args.vocab)
    ref = XLMRobertaModel(XLMRobertaConfig(**{k: getattr(cfg, k) for k in vars(cfg)}), add_pooling_layer=False)
    ours = Model(cfg)
    state = {"roberta." + k: v for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(state[hf_key(name)])
    ids = torch.randint(3, args.vocab, (args.batch, args.seq))
    ids[:, 0], ids[:, -1] = 0, 2
    for i in range(args.batch):  # padding of different lengths
        ids[i, args.seq - i * args.seq // (4 * args.batch) - 1:] = 1
    mask = ids.ne(1).long()
    ref.train(), ours.train()  # dropout on, as in training

    def step(model, run):
        def go():
            model.zero_grad(set_to_none=True)  # as a training step does, so gradients never accumulate
            run().square().mean().backward()
        return go

    with torch.no_grad():
        ref.eval(), ours.eval()
        diff = (ref(ids, attention_mask=mask).last_hidden_state - ours.encoder(ids, mask)).abs().max().item()
        ref.train(), ours.train()
    t_ref, t_ours = timed([step(ref, lambda: ref(ids, attention_mask=mask).last_hidden_state),
                           step(ours, lambda: ours.encoder(ids, mask))], args.repeats)
    print(json.dumps({
        "bench": "encoder forward+backward", "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "layers": args.layers, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
        "max_abs_diff_eval": diff, "transformers_s": round(t_ref, 4), "ours_s": round(t_ours, 4),
        "ratio_ours_over_transformers": round(t_ours / t_ref, 3),
    }))


if __name__ == "__main__":
    main()
