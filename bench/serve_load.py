#!/usr/bin/env python3
"""Load on a running `lora serve` (or any OpenAI-compatible server): N concurrent streaming
completions of --max-tokens tokens each (ignore_eos, so every one decodes the same count),
timed from the request to [DONE]. Prints per-stream and aggregate tokens/s as JSON.

    python3 bench/serve_load.py --url http://127.0.0.1:8080 --model NAME --concurrency 1,8
Standard library only.
"""
import argparse
import json
import threading
import time
import urllib.request


def stream(url, model, max_tokens, prompt, out):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    out.append({"seconds": time.perf_counter() - start, "first_s": first, "tokens": tokens})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default=None)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    results = []
    for n in [int(c) for c in a.concurrency.split(",")]:
        out = []
        threads = [threading.Thread(target=stream, args=(a.url, a.model, a.max_tokens, f"Story {i}:", out)) for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        total = sum(o["tokens"] for o in out)
        row = {"concurrency": n, "completed": len(out), "tokens": total, "wall_s": wall,
               "aggregate_tokens_per_s": total / wall,
               "per_stream_tokens_per_s": sorted(o["tokens"] / o["seconds"] for o in out)[len(out) // 2]}
        print(json.dumps(row), flush=True)
        results.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
