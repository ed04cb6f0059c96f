"""Split conformal over a sliding window of scores: exact coverage on exchangeable streams."""

from __future__ import annotations

from typing import Any

from adapters.conformal.base import Calibrator, ScoreWindow, _ceil, _check_window


class SplitConformal(Calibrator):
    """Split conformal on a sliding window: q = the ⌈(n+1)(1−α)⌉-th smallest of the last n ≤
    `window` scores, or the largest of them while that rank exceeds n (n < (1 − α)/α).

    Parameters: `alpha` target miscoverage; `window` how many recent scores (None: all).

    >>> split = SplitConformal(alpha=0.2, window=100)
    >>> for score in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
    ...     split.update(score)
    >>> round(split.threshold, 6)  # the ⌈10 · 0.8⌉ = 8th smallest of 9 (kept as float32)
    0.8
    >>> SplitConformal.from_state(split.state()).threshold == split.threshold
    True
    """

    name = "split"
    resizable = ("window",)

    def __init__(self, alpha: float = 0.1, window: int | None = 1000) -> None:
        super().__init__(alpha)
        self.window = _check_window(window)
        self.scores = ScoreWindow(self.window)

    @property
    def threshold(self) -> float:
        n = len(self.scores)
        return self.scores.largest(n + 1 - _ceil((n + 1) * (1.0 - self.alpha)))

    def _learn(self, score: float) -> None:
        self.scores.add(score)

    def reset(self) -> None:
        super().reset()
        self.scores.clear()

    def _dynamic_state(self) -> dict[str, Any]:
        return {"scores": self.scores.encoded()}

    def _load_dynamic_state(self, state: dict[str, Any]) -> None:
        self.scores.load(state["scores"])
