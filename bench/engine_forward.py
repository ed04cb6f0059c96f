"""The hot path in process: `engine.forward` on the demo model, milliseconds per call.

What the service runs for each batch the micro-batcher hands it, without HTTP or the store: the
adapter (with its robust BatchNorm statistics), the shadow copy of the source, the memories and
the class-run filter, as the settings build them. Each batch is a fresh slice of the digits'
test half (shifted a little each turn, so no input counts as a repeat), `--calls` calls a turn,
`--turns` turns; the table gives the median turn's time per call, per batch size.

    python -m bench.engine_forward                          # the defaults, batches of 1, 16, 64
    python -m bench.engine_forward --set ADAPTD_ADAPTER__NAME=tent --sizes 1,64
    PYTHONPATH=<older checkout> python -m bench.engine_forward   # the same for another version

Compare versions in one sitting, alternating them: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import torch

from bench.digits_c import parse_sets, sections
from service.demo import digits_split
from service.events import EventLog
from service.metrics import Metrics
from service.runtime import build_engine
from service.settings import load_settings


def time_forward(sizes: Sequence[int], calls: int, turns: int,
                 overrides: dict[str, str]) -> dict[int, float]:
    """Milliseconds per `engine.forward`, the median turn's, for each batch size."""
    _, _, inputs, _ = digits_split()
    metrics = Metrics()
    engine = build_engine(load_settings(None, **sections(overrides)), metrics, EventLog(metrics))
    try:
        times = {}
        for size in sizes:
            turns_ms = []
            for turn in range(turns):
                started = time.perf_counter()
                for call in range(calls):
                    start = (call * size) % (len(inputs) - size)
                    engine.forward(inputs[start:start + size] + np.float32(1e-3 * (turn + 1)))
                turns_ms.append(1000 * (time.perf_counter() - started) / calls)
            times[size] = statistics.median(turns_ms)
        return times
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", default="1,16,64", help="comma list of samples per call")
    parser.add_argument("--calls", type=int, default=400, help="calls a turn")
    parser.add_argument("--turns", type=int, default=7, help="turns; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--set", action="append", default=[], metavar="ADAPTD_SECTION__FIELD=V",
                        help="a setting, as its environment variable (repeatable)")
    parser.add_argument("--label", default="", help="a name for this version in the table")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1 or args.calls < 1 or args.turns < 1:
        parser.error("--sizes, --calls and --turns take positive numbers")
    torch.set_num_threads(args.threads)
    times = time_forward(sizes, args.calls, args.turns, parse_sets(args.set))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"engine.forward, demo model{' (' + args.label + ')' if args.label else ''}; "
          f"{platform.machine()}, {args.threads} torch thread(s), {when}; median of "
          f"{args.turns} turns x {args.calls} calls" + (f"; --set {' '.join(args.set)}"
                                                        if args.set else ""))
    print()
    print("| samples a call | ms a call | samples/s |")
    print("|---|---|---|")
    for size, ms in times.items():
        print(f"| {size} | {ms:.3f} | {1000 * size / ms:,.0f} |")


if __name__ == "__main__":
    main()
