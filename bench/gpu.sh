#!/usr/bin/env bash
# The CUDA checks in one command (each part capped: under 13 minutes in all on one GPU):
#   bench-fp32   encoder parity with transformers (fp32 within 1e-4; bf16 at most 1.5x as far from transformers'
#                fp32 states as transformers' own bf16 states), matmul rate, encoder, first/second-order
#                meta-steps and the recipe's priming step (20 inner AdamW steps) at xlm-roberta-base size (full
#                vocabulary, 8 x 128, rows padded to the longest) in fp32: time, peak memory, MFU; the reference's
#                optimizers are torch's fused AdamW
#   bench-nopad  the meta-steps and the recipe step again with every row full length (no padding), fp32
#   testbed      builds the synthetic testbed (world + MLM pretraining of its tiny encoder) on the GPU
#   prime-bf16   a 20-step priming run of the testbed with --device cuda --dtype bf16
#   bench-bf16   the matmul rate, encoder, meta-steps and recipe step again under bf16 autocast
#   batched      the task-batched meta-step against the sequential code (bench/run.py's SEQUENTIAL_COMMIT), fp32:
#                the testbed's priming meta-step (4 tasks) and the recipe step at xlm-roberta-base size with 4 tasks
# Everything lands in OUT (default bench/results/gpu): each part's JSON and log, and gpu.json, which gathers them.
#     bash bench/gpu.sh [OUT]
# A dry run on a CPU at a tiny size checks the script itself (not the GPU):
#     DEVICE=cpu THREADS=1 SIZE="--layers 1 --vocab 1000 --batch 2 --seq 16" \
#         TRAIN_ARGS="--pretrain-steps 5 --tiny-layers 1 --inner-steps 2" bash bench/gpu.sh /tmp/gpu-dry
# (LIMIT_SCALE=3 multiplies every part's time limit: a CPU shared with other jobs imports torch slowly.)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}  # CPU threads of the benchmark processes (model initialisation, data)
SIZE=${SIZE:-}  # bench/run.py size flags; empty: xlm-roberta-base size
TRAIN_ARGS=${TRAIN_ARGS:-}
LIMIT_SCALE=${LIMIT_SCALE:-1}
PY=${PYTHON:-python}
"$PY" -c "import torch, transformers, peft; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA'" || {
  echo "bench/gpu.sh: needs $PY with torch (CUDA build, a visible GPU), transformers and peft (requirements-test.txt)"
  exit 2
}
mkdir -p "$OUT"
rm -f "$OUT/parts.jsonl"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$OUT/nvidia-smi.csv" 2>&1

part() {  # name, time limit in seconds, command...: the command's output in OUT/name.log, rc and seconds in parts.jsonl
  local name=$1 limit=$(($2 * LIMIT_SCALE)) start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT/parts.jsonl"
  echo "$name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
}

BENCH=(bench/run.py --device "$DEVICE" --repeats 1 --steps 10 --threads "$THREADS")
TRAIN=(train.py --device "$DEVICE" --testbed "$OUT/testbed" $TRAIN_ARGS)
part bench-fp32 190 "$PY" "${BENCH[@]}" --dtype fp32 $SIZE --out "$OUT/bench-fp32.json"
part bench-nopad 90 "$PY" "${BENCH[@]}" --dtype fp32 --sections meta,recipe --no-padding $SIZE \
  --out "$OUT/bench-nopad.json"
part testbed 120 "$PY" "${TRAIN[@]}" --stage prime --prime-steps 0 --out "$OUT/testbed-prime0"
part prime-bf16 60 "$PY" "${TRAIN[@]}" --stage prime --dtype bf16 --prime-steps 20 --out "$OUT/prime-bf16"
part bench-bf16 150 "$PY" "${BENCH[@]}" --dtype bf16 --sections matmul,encoder,meta,recipe $SIZE \
  --out "$OUT/bench-bf16.json"
part batched 150 "$PY" "${BENCH[@]}" --dtype fp32 --sections prime,recipe --tasks 4 $SIZE --out "$OUT/batched.json"

"$PY" - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda f: json.loads(f.read_text()) if f.exists() else None
metrics = out / "prime-bf16" / "metrics.jsonl"
steps = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
parts = [json.loads(l) for l in (out / "parts.jsonl").read_text().splitlines()]
prime = {"steps": len(steps), "seconds": next(p["seconds"] for p in parts if p["part"] == "prime-bf16"),
         "meta_loss_first_last": [steps[0]["meta_loss"], steps[-1]["meta_loss"]] if steps else None,
         "all_finite": bool(steps) and all(isinstance(v, float) and math.isfinite(v)
                                           for s in steps for k, v in s.items() if k in ("meta_loss", "grad_norm"))}
fp32, bf16, nopad = read(out / "bench-fp32.json"), read(out / "bench-bf16.json"), read(out / "bench-nopad.json")
batched = read(out / "batched.json")
checks = {"parity_fp32": bool(fp32 and fp32.get("parity_fp32_ok")), "parity_bf16": bool(fp32 and fp32.get("parity_bf16_ok")),
          "prime_bf16_20_finite_steps": prime["steps"] == 20 and prime["all_finite"],
          "batched_grad_norms_agree": bool(batched) and all(batched[f"{k}_grad_norm_rel_diff"] < 1e-4
                                                            for k in ("prime", "recipe_vs_sequential")),
          "every_part_exit_0": all(p["rc"] == 0 for p in parts)}
report = {"checks": checks, "parts": parts, "prime_bf16": prime, "bench_fp32": fp32, "bench_bf16": bf16,
          "bench_fp32_no_padding": nopad, "batched_vs_sequential": batched}
(out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({"checks": checks, "prime_bf16": prime}))
EOF
