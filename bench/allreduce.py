"""The gradient sum of a training step over processes (metapeft.step under `--procs N` or torchrun): one gloo
all_reduce per tensor against metapeft.all_reduce_ (the small tensors in one), on theta's tensors (what priming's
outer step sums) at the testbed encoder's size or xlm-roberta-base's, in N processes of one thread on this
machine's cores, in alternating order over --rounds rounds. Prints one JSON object (seconds per step's sum, the
median over rounds).

    python bench/allreduce.py                      # the first command's encoder (4 layers, width 128), 2 processes
    python bench/allreduce.py --size xlmr --calls 3
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metapeft as mp  # noqa: E402
from model import Config, Model, theta_phi  # noqa: E402

SIZES = {"testbed": Config(vocab_size=3001, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=130), "xlmr": Config()}


def per_tensor(tensors):
    for t in tensors:
        dist.all_reduce(t)


def worker(rank, args, port, shared):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    times = {"per_tensor": [], "small_together": []}
    grads = [torch.randn_like(p) for p in theta_phi(Model(SIZES[args.size], labels=range(7)))[0].values()]
    for _ in range(args.rounds):
        for name, sum_ in (("per_tensor", per_tensor), ("small_together", mp.all_reduce_)):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.calls):
                sum_(grads)
            dist.barrier()
            if rank == 0:
                times[name].append((time.perf_counter() - start) / args.calls)
    if rank == 0:  # a Manager's dict: what the parent reads
        shared.update(times, tensors=len(grads), elements=sum(g.numel() for g in grads))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="testbed", help="whose theta: the testbed's or xlm-r's")
    ap.add_argument("--procs", type=int, default=2, help="processes (default 2, as the first command)")
    ap.add_argument("--calls", type=int, default=50, help="sums timed per round and way")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each timing both ways")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with torch.multiprocessing.Manager() as manager:
        times = manager.dict()
        torch.multiprocessing.spawn(worker, (args, port, times), nprocs=args.procs)
        times = dict(times)
    out = {"size": args.size, "procs": args.procs, "tensors": times["tensors"], "elements": times["elements"],
           "torch": torch.__version__, "cpus": os.cpu_count()}
    for name in ("per_tensor", "small_together"):
        out[f"{name}_s"] = round(statistics.median(times[name]), 5)
    out["speedup"] = round(out["per_tensor_s"] / out["small_together_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
