"""The in-process store alone: time per record put and resident memory as records come.

Puts `--records` prediction records shaped as the demo model's under `adapter auto` (ten
probabilities, the shadow's two arrays, a set, 32-character hex ids) into one `MemoryStore` at the
service's defaults (`store.max_records`, `store.max_bytes`, reserved at start as the service
does), 256 a batch, with a label join of 64 of the previous batch's every 50 batches, and prints
the seconds per record put and the process's resident memory along the way.

    .venv/bin/python -m bench.store
    # another commit's store, measured by this file: copy it into a checkout of that commit
    git worktree add /tmp/before <commit> && cp bench/store.py /tmp/before/bench/
    cd /tmp/before && /work/main/.venv/bin/python -m bench.store  # its store first on sys.path
"""

from __future__ import annotations

import argparse
import inspect
import os
import time

import numpy as np

from store.base import PredictionRecord
from store.memory import MemoryStore

CHECKPOINTS = (10_240, 102_400, 204_800, 512_000, 1_024_000)
PER_BATCH = 256


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch(number: int, suffixes: list[str], outputs: np.ndarray) -> list[PredictionRecord]:
    return [PredictionRecord(id=f"{number}-{i}-{suffix}"[:32], created_at=1.7e9, prediction=3.0,
                             outputs=outputs, model_version="digits-cnn@abcdef012345",
                             extra={"set": [3, 5]},
                             arrays={"source_outputs": outputs, "before_runs": outputs})
            for i, suffix in enumerate(suffixes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_024_000)
    args = parser.parse_args()
    options = {"reserve": True} if "reserve" in inspect.signature(MemoryStore).parameters else {}
    before = rss_mib()
    store = MemoryStore("bench", record_ttl_s=86_400.0, **options)
    start = rss_mib()
    rng = np.random.default_rng(0)
    outputs = rng.random(10).astype(np.float32)
    suffixes = [os.urandom(16).hex() for _ in range(PER_BATCH)]
    put_s, join_s, joins, rss = 0.0, 0.0, 0, {}
    for number in range(args.records // PER_BATCH):
        records = batch(number, suffixes, outputs)
        began = time.perf_counter()
        store.put_predictions(records)
        put_s += time.perf_counter() - began
        if number % 50 == 49:
            labels = [(record.id, 1.0) for record in batch(number - 1, suffixes, outputs)[::4]]
            began = time.perf_counter()
            joined = store.join_labels(labels).joined
            join_s += time.perf_counter() - began
            joins += 1
            assert len(joined) == len(labels), "a label for the previous batch did not join"
        done = (number + 1) * PER_BATCH
        if done in CHECKPOINTS:
            rss[done] = rss_mib()
    first, last = min(rss), max(rss)
    put = args.records // PER_BATCH * PER_BATCH
    print(f"records: {args.records:,}, {PER_BATCH} a batch; options {options or 'none'}")
    print("| before the store | at start | " + " | ".join(f"after {n:,}" for n in rss)
          + f" | growth {first:,} to {last:,} | put, µs a record | join of 64, µs |")
    print("|---" * (len(rss) + 5) + "|")
    print(f"| {before:.0f} | {start:.0f} | " + " | ".join(f"{v:.0f}" for v in rss.values())
          + f" | {100 * (rss[last] / rss[first] - 1):+.1f}% | "
          f"{1e6 * put_s / put:.1f} | "
          f"{1e6 * join_s / max(joins, 1):.0f} |")


if __name__ == "__main__":
    main()
