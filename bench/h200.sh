#!/usr/bin/env bash
# One measurement on a lent NVIDIA machine, ours and the peer side by side, in one call:
#
#   bash bench/h200.sh STAGE...     (stages: features matmul peerattn attn attnprev peer1b ours1b profile1b peer8b ours8b
#                                    long8b second1b base1b base8b flash1b flash8b compose1b compose8b scalar1b kerneltest losses peergen gen1b gen1bq gen1bnf4 peerlong
#                                    genlong gen8bq profilegen serve1b short1b pack1b)
#
# base1b and base8b are ours1b and ours8b with the adapter's kernels off (LORA_NO_LORA_KERNELS),
# scalar1b with their tensor-core forms off (LORA_NO_LORA_MMA); flash1b and flash8b with the
# tensor-core attention kernels (LORA_FLASH=mma, the default since 2026-12-07), compose1b and
# compose8b with the chunked composition (LORA_FLASH=off). short1b and pack1b train on rows of 50 to 300 tokens, batched by
# length (after one untimed step per padded length: the steady state), then packed into
# sequences of 2048 (`--pack`): trained tokens per second.
# Expects the stripped, xz-compressed release binary at .bin/lora.xz and the Vulkan loader
# packages in .gl/ (see the device README's "Headless rendering"); writes every log and JSON
# into $OUT/results.tar.xz, with summary.txt beside it (OUT is bench/out when unset). A cubecl autotune cache saved by an earlier
# call (.bin/cubecl-cache.tar.xz) is restored first and the current one saved at the end, so
# that tuning happens once across calls.
set -u
FINAL=${OUT:-bench/out}
mkdir -p "$FINAL"
OUT=/tmp/results
mkdir -p "$OUT"
ROOT=$(pwd)
for f in .gl/*.deb; do dpkg -x "$f" / 2>/dev/null; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export PYTHONUNBUFFERED=1
L=/tmp/lora
[ -x $L ] || { xz -dc .bin/lora.xz > $L && chmod +x $L; }
# The cache lives in the user cache directory: runs happen outside any Cargo workspace.
WORK=/tmp/work
mkdir -p $WORK ~/.cache
if [ -f .bin/cubecl-cache.tar.xz ] && [ ! -d ~/.cache/cubecl ]; then tar -C ~/.cache -xJf .bin/cubecl-cache.tar.xz; fi

# Runs "$@" while sampling the device's used memory, SM clock and utilization every 100 ms;
# appends the peak memory (MiB) and the median SM clock over the busy samples (utilization 50%
# or more: the GPU's clocks follow its load, see BENCHMARKS.md) to summary.txt.
sampled() {
    local name=$1; shift
    nvidia-smi --query-gpu=memory.used,clocks.sm,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$OUT/$name.smi" &
    local smi=$!
    ( cd $WORK && "$@" ) > "$OUT/$name.log" 2>&1
    local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    local peak clock
    peak=$(cut -d, -f1 "$OUT/$name.smi" | sort -n | tail -1)
    clock=$(awk -F', *' '$3 >= 50 {print $2}' "$OUT/$name.smi" | sort -n | awk '{v[NR]=$1} END {print NR ? v[int((NR+1)/2)] : "none"}')
    echo "$name rc=$rc peak_used_mib=$peak busy_sm_mhz_median=$clock" | tee -a "$OUT/summary.txt"
    rm -f "$OUT/$name.smi"
    tail -2 "$OUT/$name.log"
}

peer() { python3 "$ROOT/bench/peer_peft.py" "$@"; }

for stage in "$@"; do
    echo "== $stage $(date +%T)" | tee -a "$OUT/summary.txt"
    case $stage in
    features)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
        cat "$OUT/gpu.txt"
        ( cd $WORK && LORA_LOG=cubecl_wgpu=debug $L bench matmul --shapes 256x256x256 --iters 1 --quantized false ) > "$OUT/features.log" 2>&1
        grep -i -E "bfloat|b_float|cooperative|Supported CMMA|spirv|wgpu<" "$OUT/features.log" | head -40
        ;;
    matmul)
        # SHAPES (MxKxN, comma-separated) replaces both sides' default shapes; QUANTIZED=false
        # leaves out our 4-bit products.
        sampled matmul-peer peer matmul ${SHAPES:+--shapes $SHAPES} --json "$OUT/matmul-peer.json"
        sampled matmul-ours $L bench matmul --dtype f16 ${SHAPES:+--shapes $SHAPES} --quantized ${QUANTIZED:-true} \
            --tiles ${TILES:-auto,128x256x32+e,128x256x64+e} --json "$OUT/matmul-ours.json"
        ;;
    cm2)
        # One process per configuration (see `lora bench matmul --help`), so that one the
        # driver refuses does not end the others.
        for t in $(echo "${TILES:-128x256x32,128x256x32+e,128x256x32+e4,128x256x32+p,128x256x64+p,256x128x32+p,128x128x32+p@128}" | tr , ' '); do
            sampled "cm2-$(echo "$t" | tr -c 'a-zA-Z0-9\n' _)" $L bench matmul --dtype f16 --quantized false --iters 10 --tiles "$t"
        done
        ;;
    peerattn) sampled peerattn peer attention --geometry llama-1b --batch-size 8 --seq 512,2048 --json "$OUT/peerattn.json" ;;
    attn) sampled attn $L bench attention --geometry llama-1b --batch-size 8 --seq 512,2048 --dtype f16 --json "$OUT/attn.json" ;;
    attnprev)
        # The same with the binary .bin/lora-prev.xz (an earlier commit's, for a kernel change's
        # before and after in one call).
        [ -x /tmp/lora-prev ] || { xz -dc .bin/lora-prev.xz > /tmp/lora-prev && chmod +x /tmp/lora-prev; }
        sampled attnprev /tmp/lora-prev bench attention --geometry llama-1b --batch-size 8 --seq 512,2048 --dtype f16 --json "$OUT/attnprev.json"
        ;;
    peer1b) sampled peer1b peer train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --json "$OUT/peer1b.json" ;;
    ours1b) sampled ours1b $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --dtype f16 --json "$OUT/ours1b.json" ;;
    scalar1b) sampled scalar1b env LORA_NO_LORA_MMA=1 $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --dtype f16 --json "$OUT/scalar1b.json" ;;
    kerneltest)
        # The kernels' tests (the test binaries of kernels/tests, built here, stripped and packed
        # as .bin/kernel-tests.tar.xz) on this GPU, where the tensor-core paths run.
        mkdir -p /tmp/kernel-tests && tar -xJf .bin/kernel-tests.tar.xz -C /tmp/kernel-tests
        for t in /tmp/kernel-tests/*; do
            ( cd "$ROOT/kernels" && LORA_REQUIRE_WGPU=1 LORA_REQUIRE_MMA=1 "$t" --test-threads 1 ) >> "$OUT/kerneltest.log" 2>&1
            echo "kerneltest $(basename "$t") rc=$?" | tee -a "$OUT/summary.txt"
        done
        grep -E "^test |panicked|differ" "$OUT/kerneltest.log" | head -40
        ;;
    base1b) sampled base1b env LORA_NO_LORA_KERNELS=1 $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --dtype f16 --json "$OUT/base1b.json" ;;
    second1b) sampled second1b $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 3 --warmup 0 --dtype f16 --json "$OUT/second1b.json" ;;
    profile1b)
        printf '[profiling.logger]\nlevel = "medium"\nfile = "%s/profile1b.txt"\nappend = false\n' "$OUT" > $WORK/cubecl.toml
        sampled profile1b $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 1 --warmup 1 --dtype f16
        rm $WORK/cubecl.toml
        xz -9 -f "$OUT/profile1b.txt"
        ;;
    peergen) sampled peergen peer generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128 --json "$OUT/peergen.json" ;;
    gen1b) sampled gen1b $L bench generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128 --dtype f16 --json "$OUT/gen1b.json" ;;
    genprev)
        # gen1b with the binary .bin/lora-prev.xz (an earlier commit's), for a decode change's
        # before and after in one call.
        [ -x /tmp/lora-prev ] || { xz -dc .bin/lora-prev.xz > /tmp/lora-prev && chmod +x /tmp/lora-prev; }
        sampled genprev /tmp/lora-prev bench generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128 --dtype f16 --json "$OUT/genprev.json" ;;
    gen1bq) sampled gen1bq $L bench generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128 --dtype f16 --quantize affine --json "$OUT/gen1bq.json" ;;
    gen1bnf4) sampled gen1bnf4 $L bench generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128 --dtype f16 --quantize nf4 --json "$OUT/gen1bnf4.json" ;;
    peerlong) sampled peerlong peer generate --geometry llama-1b --prompt-tokens 1024 --max-tokens 256 --caches static --json "$OUT/peerlong.json" ;;
    genlong) sampled genlong $L bench generate --geometry llama-1b --prompt-tokens 1024 --max-tokens 256 --dtype f16 --json "$OUT/genlong.json" ;;
    gen8bq) sampled gen8bq $L bench generate --geometry llama-8b --prompt-tokens 16 --max-tokens 128 --dtype f16 --quantize nf4 --json "$OUT/gen8bq.json" ;;
    profilegen)
        printf '[profiling.logger]\nlevel = "medium"\nfile = "%s/profilegen.txt"\nappend = false\n' "$OUT" > $WORK/cubecl.toml
        sampled profilegen $L bench generate --geometry llama-1b --prompt-tokens 16 --max-tokens 32 --runs 1 --dtype f16
        rm $WORK/cubecl.toml
        xz -9 -f "$OUT/profilegen.txt"
        ;;
    peer8b) sampled peer8b peer train --geometry llama-8b --batch-size 4 --seq 512 --steps 6 --grad-checkpoint --json "$OUT/peer8b.json" ;;
    flash1b) sampled flash1b env LORA_FLASH=mma $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --dtype f16 --json "$OUT/flash1b.json" ;;
    flash8b) sampled flash8b env LORA_FLASH=mma $L bench train --geometry llama-8b --batch-size 4 --seq 512 --steps 4 --quantize nf4 --double-quant --grad-checkpoint --dtype f16 --json "$OUT/flash8b.json" ;;
    compose1b) sampled compose1b env LORA_FLASH=off $L bench train --geometry llama-1b --batch-size 8 --seq 512 --steps 8 --dtype f16 --json "$OUT/compose1b.json" ;;
    compose8b) sampled compose8b env LORA_FLASH=off $L bench train --geometry llama-8b --batch-size 4 --seq 512 --steps 4 --quantize nf4 --double-quant --grad-checkpoint --dtype f16 --json "$OUT/compose8b.json" ;;
    short1b) sampled short1b $L bench train --geometry llama-1b --batch-size 8 --seq 2047 --row-lengths 50-300 --steps 8 --dtype f16 --json "$OUT/short1b.json" ;;
    pack1b) sampled pack1b $L bench train --geometry llama-1b --batch-size 8 --seq 2047 --row-lengths 50-300 --pack --steps 8 --dtype f16 --json "$OUT/pack1b.json" ;;
    ours8b) sampled ours8b $L bench train --geometry llama-8b --batch-size 4 --seq 512 --steps 4 --quantize nf4 --double-quant --grad-checkpoint --dtype f16 --json "$OUT/ours8b.json" ;;
    base8b) sampled base8b env LORA_NO_LORA_KERNELS=1 $L bench train --geometry llama-8b --batch-size 4 --seq 512 --steps 4 --quantize nf4 --double-quant --grad-checkpoint --dtype f16 --json "$OUT/base8b.json" ;;
    long8b) sampled long8b $L bench train --geometry llama-8b --batch-size 1 --seq 16384 --steps 2 --warmup 1 --quantize nf4 --double-quant --grad-checkpoint --dtype f16 --json "$OUT/long8b.json" ;;
    losses)
        # The first 10 training losses of the quickstart run on the GPU (f16 and f32) against the CPU (f32).
        for run in "cpu f32" "wgpu f32" "wgpu f16"; do
            set -- $run
            ( cd "$ROOT" && $L train --config configs/quickstart.toml --iters 10 --steps-per-report 1 --steps-per-eval 1000 \
                --device $1 --dtype $2 --adapter-path $WORK/losses-$1-$2 ) > "$OUT/losses-$1-$2.log" 2>&1
            echo "losses $1 $2 rc=$?" | tee -a "$OUT/summary.txt"
            cp $WORK/losses-$1-$2/metrics.jsonl "$OUT/losses-$1-$2.jsonl" 2>/dev/null
        done
        python3 "$ROOT/bench/compare_losses.py" "$OUT"/losses-cpu-f32.jsonl "$OUT"/losses-wgpu-f32.jsonl "$OUT"/losses-wgpu-f16.jsonl | tee -a "$OUT/summary.txt"
        ;;
    serve1b)
        # lora serve on a random 1B-geometry Llama (f16, the llama fixture's tokenizer, so its
        # vocabulary is 400), then bench/serve_load.py: 1 stream (twice: the first warms up),
        # then 8 at once, 128 tokens each.
        python3 - "$WORK/llama1b" "$ROOT/tests/fixtures/llama" <<'PY'
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tok = sys.argv[1], sys.argv[2]
config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=400, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=4096)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.float16)
model.save_pretrained(out, safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
    shutil.copy(f"{tok}/{f}", out)
PY
        ( cd $WORK && exec $L serve --model $WORK/llama1b --port 8091 --dtype f16 ) > "$OUT/serve1b.log" 2>&1 &
        server=$!
        python3 -c "
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen('http://127.0.0.1:8091/health', timeout=2); break
    except Exception: time.sleep(0.5)
"
        python3 "$ROOT/bench/serve_load.py" --url http://127.0.0.1:8091 --concurrency 1,1,8 --max-tokens 128 --json "$OUT/serve1b.json" | tee -a "$OUT/summary.txt"
        kill $server; wait $server 2>/dev/null
        tail -3 "$OUT/serve1b.log"
        ;;
    *) echo "unknown stage $stage" ;;
    esac
done
tar -C ~/.cache -cJf "$FINAL/cubecl-cache.tar.xz" cubecl 2>/dev/null
cp "$OUT/summary.txt" "$FINAL/summary.txt"
tar -C "$OUT" -cJf "$FINAL/results.tar.xz" .
cat "$OUT/summary.txt"
