"""B6's online mixture replayed offline: what it served against what its candidates could have.

The service's mixture (`adapters/mixture.py`) learns from each joined label the candidates'
outputs its record kept: the newest label, River's learners, the model. `collect` runs B6
streams through the service in process (`bench.real_streams`, the defaults, every label back
`delay` samples after its prediction, 16 samples a request) and saves, in the order the labels
arrived, exactly what the mixture learnt from, with how it was built and what the service
served. `replay` serves the same candidates again through a `FixedShareMixture` built the same
way, or with settings changed (`--variant`), on the same schedule: the weights that serve
sample i are those learnt from the labels back before its request. Under the defaults no
candidate learns from what the mixture serves (River's learners, the newest label and the
model learn from labels; with the error memory or the supervised step on, stages learn from
labels as the drift policy lets them, which a replay cannot redo), so a change to the mixture
is measured on B6's 56 runs in seconds,
and the replay of the service's own settings serves what the service served (BENCHMARKS.md
B6, stop 37: the same class on every sample of the 36 classifier runs, values within 8e-6 on
the 20 regressor runs;
stop 38, with the regressors' `recent_residual` candidate: within 1.6e-5).

Scores are over the labelled samples only (with labels `delay` late the stream's last `delay`
samples never teach the mixture and are left out): accuracy, or mean absolute error.

    python -m bench.mixture_replay collect --dir mixture-runs                 # B6, ~1 min
    python -m bench.mixture_replay collect --dir mixture-runs --runs 400      # in runs, ~1 min
    python -m bench.mixture_replay replay --dir mixture-runs \\
        --variant "first_share=0.5" --variant "eta=1,0.05 share=0.01"

A variant names numeric `FixedShareMixture` arguments (`eta`, `share`, `first_share`,
`meta_scale`); a list is comma-separated; `probation=off` serves the newest label freely.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.mixture import FixedShareMixture
from adapters.task import Task, task_named
from service.engine import LEARNER

REQUEST = 16


@dataclass
class Recorded:
    """One stream through the service: what its mixture learnt from, in the order the labels
    arrived (label k is sample k's: every label back, each `delay` samples late), and what was
    served for those samples."""

    stream: str
    task: str
    delay: int
    built: dict[str, Any]  # FixedShareMixture's arguments as the service built it
    candidates: dict[str, np.ndarray]  # name: (labels, width)
    labels: np.ndarray  # (labels,)
    served: np.ndarray  # what the service served for those samples, (labels,)

    @property
    def name(self) -> str:
        return f"{self.stream}-{self.delay}"

    def save(self, folder: Path) -> Path:
        path = folder / f"{self.name}.npz"
        meta = {"stream": self.stream, "task": self.task, "delay": self.delay,
                "built": self.built, "names": list(self.candidates)}
        arrays: dict[str, Any] = {"labels": self.labels, "served": self.served,
                                  "meta": np.array(json.dumps(meta))}
        arrays |= {f"candidate:{name}": values for name, values in self.candidates.items()}
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> Recorded:
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(meta["stream"], meta["task"], meta["delay"], meta["built"],
                       {name: saved[f"candidate:{name}"] for name in meta["names"]},
                       saved["labels"], saved["served"])


@contextmanager
def recording() -> Iterator[dict[str, Any]]:
    """While inside, every `FixedShareMixture` built notes its arguments (`built`) and every
    call to `losses` the candidates and labels it was given (`learnt`)."""
    noted: dict[str, Any] = {"built": None, "learnt": []}
    init, losses = FixedShareMixture.__init__, FixedShareMixture.losses

    def noting_init(self: FixedShareMixture, names: list[str], **kwargs: Any) -> None:
        noted["built"] = {"names": list(names)} | {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in kwargs.items()}
        init(self, names, **kwargs)

    def noting_losses(self: FixedShareMixture, task: Task, candidates: dict[str, np.ndarray],
                      labels: np.ndarray) -> np.ndarray:
        noted["learnt"].append(({name: np.array(value) for name, value in candidates.items()},
                                np.array(labels)))
        return losses(self, task, candidates, labels)

    FixedShareMixture.__init__ = noting_init  # type: ignore[method-assign,assignment]
    FixedShareMixture.losses = noting_losses  # type: ignore[method-assign]
    try:
        yield noted
    finally:
        FixedShareMixture.__init__ = init  # type: ignore[method-assign]
        FixedShareMixture.losses = losses  # type: ignore[method-assign]


def collect(stream: str, runs: int | None, delay: int, max_rows: int | None = None
            ) -> Recorded:
    """`stream` (B6's name, a real one cut at `max_rows`) through the service with the
    defaults, its mixture recorded."""
    import asyncio

    from bench.drift_streams import serve_prequential
    from bench.real_streams import CONFIGS, factory_name, in_runs, load_stream, trained
    from service.settings import load_settings

    data = load_stream(stream) if max_rows is None else load_stream(stream, max_rows)
    if runs is not None:
        data = in_runs(data, runs)
    with trained(data) as (weights, reference), recording() as noted:
        model = {"factory": factory_name(data.x.shape[1], data.outputs),
                 "weights": str(weights), "task": data.task,
                 "input_shape": [data.x.shape[1]], "name": f"{data.name}-mlp",
                 "num_classes": data.classes, "reference_data": str(reference)}
        settings = load_settings(None, model=model, batcher={"max_wait_ms": 0},
                                 log_level="error", **CONFIGS["defaults"].settings(data))
        run = asyncio.run(serve_prequential(settings, data.x, data.y, delay, REQUEST))
    if noted["built"] is None:
        raise RuntimeError(f"{stream}: the service built no mixture")
    names = noted["built"].pop("names")
    candidates = {name: np.concatenate([c[name] for c, _ in noted["learnt"]])
                  for name in names}
    labels = np.concatenate([y for _, y in noted["learnt"]]).reshape(-1)
    count = len(labels)
    # with every label back and a fixed delay, label k is sample k's; anything else (a label
    # refused or not joined, rows dropped as not finite) would misalign the replay's schedule,
    # and equal values (a class in runs) would not show it
    expected = max(0, len(data.y) - delay)
    if run.unjoined or count != expected or not np.allclose(
            labels, np.asarray(data.y[:count], dtype=np.float64), atol=1e-4):
        raise RuntimeError(f"{stream}: the mixture learnt {count} labels ({run.unjoined} not "
                           f"joined), not the stream's first {expected} in order")
    return Recorded(data.name, data.task, delay, noted["built"], candidates, labels,
                    run.predictions[:count])


def build(recorded: Recorded, variant: dict[str, Any]) -> FixedShareMixture:
    """The mixture as the service built it for `recorded`, with `variant`'s arguments changed."""
    arguments = dict(recorded.built)
    if variant.get("probation") == "off":
        arguments["probation"] = ()
    arguments |= {key: value for key, value in variant.items() if key != "probation"}
    for key in ("start_low", "start_untried", "probation"):
        arguments[key] = tuple(arguments.get(key, ()))
    return FixedShareMixture(list(recorded.candidates), **arguments)


def replay(recorded: Recorded, variant: dict[str, Any], request: int = REQUEST) -> np.ndarray:
    """What the mixture with `variant` serves for the recorded candidates, (labels, width),
    on the service's schedule: a request of `request` samples is served with the weights
    learnt from the labels back before it (those of samples below its start − `delay`); a
    request before the first label is served the last stage, as the service serves it."""
    mixture = build(recorded, variant)
    task = task_named(recorded.task)
    candidates = recorded.candidates
    count = len(recorded.labels)
    served = np.zeros_like(candidates[mixture.names[0]], dtype=np.float64)
    rates = np.zeros((count, len(mixture.etas), served.shape[1]))
    learnt = 0
    for start in range(0, count, request):
        due = min(max(0, start - recorded.delay), count)
        if due > learnt:  # one label at a time, as the service learns each feedback batch
            for k in range(learnt, due):
                one = slice(k, k + 1)
                mixture.learn(mixture.losses(task, {n: v[one] for n, v in candidates.items()},
                                             recorded.labels[one]))
                mixture.learn_served(mixture.served_losses(task, rates[one],
                                                           recorded.labels[one]))
            learnt = due
        rows = slice(start, min(start + request, count))
        # until the first label River's learners sleep: each repeats the last stage (what
        # their records hold for these rows is their guesses made later by their sleeping
        # copies, for the mixture to learn from); the newest label's and the recent residual's
        # records hold what they served (the last stage, or the reference data's last label)
        last = torch.as_tensor(candidates[mixture.names[-1]][rows])
        outputs = mixture.outputs({n: last if not learnt and _sleeps(n) else
                                   torch.as_tensor(v[rows]) for n, v in candidates.items()})
        rates[rows] = outputs.permute(1, 0, 2).numpy()
        served[rows] = mixture.serve(outputs).double().numpy()
    return served


def _sleeps(name: str) -> bool:
    """Whether candidate `name` serves something else than its records hold before the first
    label: River's learners, asleep."""
    return name.startswith(f"{LEARNER}.")


def score(recorded: Recorded, outputs: np.ndarray) -> float:
    """Accuracy of outputs (labels, width), or their mean absolute error."""
    if recorded.task == "classification":
        return float((outputs.argmax(1) == recorded.labels).mean())
    return float(np.abs(outputs[:, 0] - recorded.labels).mean())


def served_score(recorded: Recorded) -> float:
    if recorded.task == "classification":
        return float((recorded.served == recorded.labels).mean())
    return float(np.abs(recorded.served - recorded.labels).mean())


def parse_variant(text: str) -> dict[str, Any]:
    """Pairs `key=value` joined by spaces as `FixedShareMixture` arguments; a value with
    commas is a list.

    >>> parse_variant("first_share=0.5 eta=0.5,0.025")
    {'first_share': 0.5, 'eta': [0.5, 0.025]}
    >>> parse_variant("probation=off")
    {'probation': 'off'}
    """
    variant: dict[str, Any] = {}
    for pair in text.split():
        key, _, value = pair.partition("=")
        if key == "probation":
            variant[key] = value
            continue
        numbers = [float(v) for v in value.split(",")]
        variant[key] = numbers if len(numbers) > 1 else numbers[0]
    return variant


def _gap(recorded: Recorded, value: float, best: float) -> float:
    """How far `value` is behind `best`: points of accuracy, or % of MAE."""
    if recorded.task == "classification":
        return 100 * (best - value)
    return 100 * (value / best - 1)


def table(runs: list[Recorded], variants: list[str]) -> str:
    """Each run: served, its replay, each variant replayed, and the best candidate; a variant's
    cell carries its change against the replay (points, or % of MAE; + is better)."""
    head = ["run", "served", "replayed", *variants, "best candidate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    better = [0] * len(variants)
    worse = [0] * len(variants)
    behind = [0] * (len(variants) + 1)
    for recorded in runs:
        cell = (lambda v: f"{100 * v:.2f}") if recorded.task == "classification" else (
            lambda v: f"{v:.4f}")
        scores = {name: score(recorded, values[:, None] if values.ndim == 1 else values)
                  for name, values in recorded.candidates.items()}
        pick = max if recorded.task == "classification" else min
        best = pick(scores, key=scores.__getitem__)
        replayed = score(recorded, replay(recorded, {}))
        row = [recorded.name, cell(served_score(recorded)), cell(replayed)]
        behind[0] += _gap(recorded, replayed, scores[best]) > 0.5
        for k, text in enumerate(variants):
            value = score(recorded, replay(recorded, parse_variant(text)))
            lead = round(-_gap(recorded, value, replayed), 2) + 0.0  # no "-0.00"
            better[k] += lead > 0.05
            worse[k] += lead < -0.05
            behind[k + 1] += _gap(recorded, value, scores[best]) > 0.5
            row.append(f"{cell(value)} ({lead:+.2f})")
        row.append(f"{best} {cell(scores[best])}")
        lines.append("| " + " | ".join(row) + " |")
    summary = [f"behind the best candidate by more than 0.5 (point or % of MAE): replayed "
               f"{behind[0]} of {len(runs)}"]
    summary += [f"{text}: better on {better[k]}, worse on {worse[k]} (by 0.05), behind the "
                f"best by more than 0.5 on {behind[k + 1]}" for k, text in enumerate(variants)]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary)


def main() -> None:
    from bench.real_streams import STREAM_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("collect", "replay"))
    parser.add_argument("--dir", type=Path, required=True, help="where the runs are saved")
    parser.add_argument("--streams", default=",".join(STREAM_NAMES))
    parser.add_argument("--runs", type=int, metavar="BLOCK", help="classes in runs (B6's)")
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--variant", action="append", default=[],
                        help="FixedShareMixture arguments, e.g. 'first_share=0.5 eta=1,0.05'")
    parser.add_argument("--only", default="", help="replay the saved runs whose name has this")
    args = parser.parse_args()
    if args.action == "collect":
        torch.set_num_threads(1)
        args.dir.mkdir(parents=True, exist_ok=True)
        for stream in args.streams.split(","):
            for delay in args.delays:
                recorded = collect(stream, args.runs, delay)
                path = recorded.save(args.dir)
                print(f"{path}: {len(recorded.labels)} labels, served "
                      f"{served_score(recorded):.4f}", flush=True)
        return
    paths = sorted(p for p in args.dir.glob("*.npz") if args.only in p.stem)
    if not paths:
        parser.error(f"no saved runs in {args.dir}")
    runs = [Recorded.load(path) for path in paths]
    print(table(runs, args.variant))


if __name__ == "__main__":
    main()
