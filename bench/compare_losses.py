"""Compares the training losses of metrics.jsonl files (lora train) against the first one.

    python3 bench/compare_losses.py REFERENCE.jsonl OTHER.jsonl...

Prints each file's losses per step and the largest absolute and relative difference from
the reference's.
"""
import json
import sys


def losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "train_loss" in row:
                out[row["step"]] = row["train_loss"]
    return out


reference = losses(sys.argv[1])
print(sys.argv[1], " ".join(f"{reference[s]:.5f}" for s in sorted(reference)))
for path in sys.argv[2:]:
    other = losses(path)
    steps = sorted(set(reference) & set(other))
    if not steps:
        print(path, "no common steps")
        continue
    absolute = max(abs(other[s] - reference[s]) for s in steps)
    relative = max(abs(other[s] - reference[s]) / abs(reference[s]) for s in steps)
    print(path, " ".join(f"{other[s]:.5f}" for s in steps), f"max abs {absolute:.2e} max rel {relative:.2e} over {len(steps)} steps")
