#!/usr/bin/env bash
# CPU training, ours and PyTorch + PEFT side by side on this machine, in one invocation
# (issue 18's workload: SmolLM-135M's geometry, LoRA r8 alpha 16 on q_proj and v_proj, AdamW,
# batch 4 x 256 targets, f32, every core):
#
#   bash bench/cpu.sh [LORA_BINARY]      (default target/release/lora; needs torch, transformers, peft)
#
# Each side runs twice, alternating, so that a drift of the machine's speed shows; every run
# prints its median step and peak memory (ours: the process's peak RSS as the OS counts it,
# the peer's from getrusage), and the JSON files land in bench/out/cpu-*.json.
set -eu
L=${1:-target/release/lora}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
STEPS=${STEPS:-5}
WORKLOAD="--geometry smollm-135m --batch-size 4 --seq 256 --rank 8 --alpha 16 --keys q_proj,v_proj --steps $STEPS --warmup 1"
for run in 1 2; do
    /usr/bin/time -f "ours run $run: peak RSS %M KiB, %e s wall, %U s user" "$L" bench train --device cpu $WORKLOAD --json "$OUT/cpu-ours-$run.json" 2>&1 | grep -E "^lora|peak RSS"
    python3 bench/peer_peft.py train --device cpu $WORKLOAD --json "$OUT/cpu-peer-$run.json" 2>&1 | grep -E "^pytorch"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for run in (1, 2):
    ours = json.load(open(f"{out}/cpu-ours-{run}.json"))["tokens_per_s"]
    peer = json.load(open(f"{out}/cpu-peer-{run}.json"))["tokens_per_s"]
    print(f"run {run}: ours {ours:.1f} tokens/s, peer {peer:.1f} tokens/s, ratio {ours / peer:.2f}x")
PY
