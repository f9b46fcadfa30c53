#!/usr/bin/env python3
"""The PyTorch + PEFT side of `lora bench train`, `lora bench matmul`, `lora bench attention` and
`lora bench generate`.

Builds the same random Llama geometry as `lora bench train --geometry NAME` (in bf16 on the
GPU, no download), attaches a PEFT LoRA of the same rank, alpha and target modules, and
runs N timed AdamW steps on random token rows of SEQ targets each. Prints, like ours, the
median tokens/s of the timed steps, the time to the first step, peak memory and effective
TFLOP/s, and writes them as JSON with --json.

    python3 bench/peer_peft.py train --geometry llama-1b --batch-size 8 --seq 512 --steps 8
    python3 bench/peer_peft.py train --geometry llama-8b --batch-size 4 --seq 512 --grad-checkpoint
    python3 bench/peer_peft.py train --device cpu --geometry smollm-135m --batch-size 4 --seq 256 \
        --rank 8 --alpha 16 --keys q_proj,v_proj
    python3 bench/peer_peft.py matmul --shapes 2048x4096x14336,512x4096x14336
    python3 bench/peer_peft.py attention --geometry llama-1b --batch-size 8 --seq 512,2048
    python3 bench/peer_peft.py generate --geometry llama-1b --prompt-tokens 16 --max-tokens 128

Needs torch, transformers and peft (the H200 image has them); `train --device cpu` runs in f32
on every core of the CPU and reports the peak resident set instead of device memory.
"""

import argparse
import json
import statistics
import sys
import time

import torch

# name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied, rope_theta)
# Kept equal to `lora_model::config::Geometry` in the Rust code.
GEOMETRIES = {
    "tiny": (64, 128, 2, 4, 2, 256, True, 10000.0),
    "smollm-135m": (576, 1536, 30, 9, 3, 49152, True, 10000.0),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256, True, 500000.0),
    "llama-3b": (3072, 8192, 28, 24, 8, 128256, True, 500000.0),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256, False, 500000.0),
    "qwen2-0.5b": (896, 4864, 24, 14, 2, 151936, True, 1000000.0),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32768, False, 1000000.0),
}

KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_flops_per_token(g, seq):
    """Matmul FLOPs of one trained token: forward 2·params, backward through the frozen base
    for the input gradient only (another 2·params), attention's two products forward and
    twice that backward (causal: half of the square). LoRA's own products are not counted."""
    hidden, inter, layers, heads, kv, vocab, tied, _ = g
    head_dim = hidden // heads
    per_layer = hidden * (heads * head_dim) * 2 + hidden * (kv * head_dim) * 2 + 3 * hidden * inter
    params = layers * per_layer + vocab * hidden
    attn = layers * 2 * 2 * heads * head_dim * seq / 2  # QK^T and PV per token, causal half
    return 4 * params + 3 * attn


def build(name, dtype, grad_checkpoint, rank, alpha, device="cuda", keys=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    hidden, inter, layers, heads, kv, vocab, tied, theta = GEOMETRIES[name]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_theta=theta,
        max_position_embeddings=131072,
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=keys or KEYS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    # PEFT keeps the adapter in the base dtype; train it in f32 as ours does.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def train(args):
    cpu = args.device == "cpu"
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    keys = args.keys.split(",") if args.keys else None
    g = GEOMETRIES[args.geometry]
    torch.manual_seed(0)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    t0 = time.perf_counter()
    model = build(args.geometry, dtype, args.grad_checkpoint, args.rank, args.alpha, args.device, keys)
    sync()
    loaded = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    vocab = g[5]
    gen = torch.Generator(device=args.device).manual_seed(1)
    times, losses = [], []
    first = None
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq + 1), device=args.device, generator=gen)
        sync()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids[:, :-1], labels=None)
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        if first is None:
            first = elapsed
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(elapsed)
    tokens = args.batch_size * args.seq
    median = statistics.median(times)
    flops = model_flops_per_token(g, args.seq) * tokens / median / 1e12
    result = {
        "side": "pytorch+peft",
        "geometry": args.geometry,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "seq": args.seq,
        "grad_checkpoint": args.grad_checkpoint,
        "rank": args.rank,
        "keys": keys or KEYS,
        "tokens_per_s": tokens / median,
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "load_s": loaded,
        "first_step_s": first,
        "tflops": flops,
        "losses": losses,
        "torch": torch.__version__,
    }
    if cpu:
        import resource

        result["threads"] = torch.get_num_threads()
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = f"peak {result['peak_rss_gib']:.2f} GiB RSS, {result['threads']} threads"
    else:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
        memory = f"peak {result['peak_allocated_gib']:.2f} GiB allocated / {result['peak_reserved_gib']:.2f} GiB reserved"
    print(
        f"pytorch+peft {args.geometry} {args.batch_size}x{args.seq} {args.dtype}"
        f"{' grad-checkpoint' if args.grad_checkpoint else ''}: {result['tokens_per_s']:.0f} tokens/s "
        f"(step {median * 1e3:.1f} ms, min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}), "
        f"first step {first:.2f} s after {loaded:.1f} s of building, {memory}, {flops:.2f} TFLOP/s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def matmul(args):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    rows = []
    for spec in args.shapes.split(","):
        m, k, n = (int(v) for v in spec.split("x"))
        # Several operand sets, so repeated products do not run from the L2.
        sets = [(torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n, k, device="cuda", dtype=dtype)) for _ in range(4)]
        for a, b in sets:
            a @ b.t()
        torch.cuda.synchronize()
        # Half a second of the same products first, as `lora bench matmul` does: the GPU's
        # clocks rise only under sustained load.
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:
            for a, b in sets:
                a @ b.t()
            torch.cuda.synchronize()
        times = []
        for i in range(args.iters):
            a, b = sets[i % len(sets)]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b.t()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        t = statistics.median(times)
        tf = 2 * m * n * k / t / 1e12
        rows.append({"m": m, "k": k, "n": n, "seconds": t, "tflops": tf})
        print(f"torch.matmul {args.dtype} [{m}x{k}]·[{k}x{n}]: {t * 1e3:.3f} ms, {tf:.1f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"side": "torch", "dtype": args.dtype, "rows": rows, "gpu": torch.cuda.get_device_name()}, f, indent=1)


def attention(args):
    """Causal attention at a geometry's shape, as `lora bench attention`: torch's
    scaled_dot_product_attention (flash-attention's kernels on a recent GPU), grouped-query
    heads through enable_gqa, forward and forward with backward (the gradient of the output's
    sum), the median of --iters after half a second of warm-up."""
    import torch.nn.functional as F

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    hidden, _, _, heads, kv, _, _, _ = GEOMETRIES[args.geometry]
    d = hidden // heads
    b = args.batch_size
    rows = []
    for s in (int(v) for v in args.seq.split(",")):
        q = torch.randn(b, heads, s, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(b, kv, s, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(b, kv, s, d, device="cuda", dtype=dtype, requires_grad=True)

        def forward():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def both():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.sum().backward()
            return q.grad

        def timed(f):
            f()
            torch.cuda.synchronize()
            started = time.perf_counter()
            while time.perf_counter() - started < 0.5:
                f()
                torch.cuda.synchronize()
            times = []
            for _ in range(args.iters):
                started = time.perf_counter()
                f()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        tf, tb = timed(forward), timed(both)
        flops = 4 * b * heads * s * s * d / 2
        row = {"batch": b, "heads": heads, "kv_heads": kv, "seq": s, "head_dim": d, "forward_s": tf, "forward_tflops": flops / tf / 1e12,
               "forward_backward_s": tb, "forward_backward_tflops": 2.5 * flops / tb / 1e12}
        rows.append(row)
        print(f"torch sdpa {b}x{heads}/{kv}x{s}x{d} {args.dtype}: forward {tf * 1e3:.3f} ms ({row['forward_tflops']:.1f} TFLOP/s), "
              f"forward and backward {tb * 1e3:.3f} ms ({row['forward_backward_tflops']:.1f} TFLOP/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"side": "torch", "dtype": args.dtype, "rows": rows, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}, f, indent=1)


def generate(args):
    """Batch-1 greedy decoding with transformers' generate, as `lora bench generate`: a random
    prompt, exactly max-tokens new tokens (no end-of-sequence stop), each cache kind timed
    over --runs after --warmup runs. Prompt rate: one forward over the prompt; decode rate:
    the (max-tokens - 1) tokens after the first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    hidden, inter, layers, heads, kv, vocab, tied, theta = GEOMETRIES[args.geometry]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=theta,
        max_position_embeddings=131072,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), device="cuda")
    results = {}
    for cache in args.caches.split(","):
        kwargs = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
        if cache != "dynamic":
            kwargs["cache_implementation"] = cache
        times, first = [], None
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            for run in range(args.warmup + args.runs):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(ids)
                torch.cuda.synchronize()
                prompt_s = time.perf_counter() - start
                start = time.perf_counter()
                out = model.generate(ids, **kwargs)
                torch.cuda.synchronize()
                total = time.perf_counter() - start
                if first is None:
                    first = total
                assert out.shape[1] == args.prompt_tokens + args.max_tokens, out.shape
                if run >= args.warmup:
                    times.append((prompt_s, total))
        prompt_s = statistics.median(t[0] for t in times)
        total = statistics.median(t[1] for t in times)
        # generate's time is the prompt pass plus max_tokens - 1 decode steps.
        decode = (args.max_tokens - 1) / max(total - prompt_s, 1e-9)
        results[cache] = {
            "prompt_tokens_per_s": args.prompt_tokens / prompt_s,
            "decode_tokens_per_s": decode,
            "generate_s": total,
            "first_run_s": first,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        print(f"transformers generate {args.geometry} {args.dtype} cache={cache}: prompt {args.prompt_tokens} tokens at "
              f"{results[cache]['prompt_tokens_per_s']:.1f} tokens/s, decode {decode:.1f} tokens/s, "
              f"first run {first:.2f} s, peak {results[cache]['peak_allocated_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"side": "transformers", "geometry": args.geometry, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
                       "max_tokens": args.max_tokens, "caches": results, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name()}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--geometry", default="llama-1b", choices=sorted(GEOMETRIES))
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq", type=int, default=512, help="targets per row (rows are seq+1 tokens)")
    t.add_argument("--steps", type=int, default=8, help="timed steps")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--dtype", default=None, choices=["bf16", "f16", "f32"], help="bf16 on a GPU, f32 on the CPU by default")
    t.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    t.add_argument("--keys", help="projections to adapt, comma-separated (all seven by default)")
    t.add_argument("--grad-checkpoint", action="store_true")
    t.add_argument("--json")
    m = sub.add_parser("matmul")
    m.add_argument("--shapes", default="2048x4096x14336,512x4096x14336,2048x14336x4096,512x14336x4096")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    m.add_argument("--iters", type=int, default=20)
    m.add_argument("--json")
    a = sub.add_parser("attention")
    a.add_argument("--geometry", default="llama-1b", choices=sorted(GEOMETRIES))
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--seq", default="512", help="positions per row, comma-separated for several")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    a.add_argument("--iters", type=int, default=20)
    a.add_argument("--json")
    g = sub.add_parser("generate")
    g.add_argument("--geometry", default="llama-1b", choices=sorted(GEOMETRIES))
    g.add_argument("--prompt-tokens", type=int, default=16)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--runs", type=int, default=3)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    g.add_argument("--caches", default="static,dynamic", help="comma-separated: static, dynamic")
    g.add_argument("--json")
    args = p.parse_args()
    if args.what == "train" and args.dtype is None:
        args.dtype = "f32" if args.device == "cpu" else "bf16"
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("peer_peft.py needs a CUDA GPU (train takes --device cpu)")
    {"train": train, "matmul": matmul, "attention": attention, "generate": generate}[args.what](args)


if __name__ == "__main__":
    main()
