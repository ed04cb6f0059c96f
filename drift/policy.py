"""The drift policy: what to do about an alarm, once per drift, and what it did, as events.

Pure and clock-driven: `DriftPolicy.on_alarm` takes an `Alarm` (from `drift.detectors`) and the
caller's clock ``now``, and returns the actions to apply; `learning_rate(now)` is the adaptation
learning rate the caller should apply at ``now`` (through the adapter's ``set_learning_rate``,
which clamps it to the configured cap). The policy applies nothing itself.

The clock. ``now`` is any non-decreasing counter the caller keeps, and ``cooldown``,
``half_life`` and ``confirm_window`` are in its unit. The service passes the number of samples it
has served, so a label-free alarm (raised while predicting) and a labelled one (raised when a late
label is joined) sit on one time line; without ``now`` the alarm's own ``sample`` is used, which is
right only while one detector feeds the policy.

Actions (`ACTIONS`):

* ``boost_lr``: the learning rate jumps to ``boost`` x base and its excess decays with a half-life,
  ``lr(now) = base * (1 + (boost - 1) * 2 ** (-(now - t_boost) / half_life))``, back to exactly
  base once the excess is below 0.1% of base. Learning rates should rise under shift ("Learning Rate
  Schedules in the Presence of Distribution Shift", Fahrbach et al., ICML 2023). A later boost
  restarts from ``boost`` x base; boosts never compound. What learns from labels takes the
  boost by when the labels' samples were served (`learning_rate_served`), not when the labels
  arrive: a label that comes back after the boost but whose sample was served before it shows
  the concept the boost is moving away from, and learns at base.
* ``reset_adapter``: back to the source weights (not in the defaults: the collapse guard already
  resets an adapter that collapsed, and a drift alone does not mean adaptation failed).
* ``trim_memory``: keep only the newest rows of the AdaNPC and error memories, the part most
  likely to hold the new concept: ``trim_keep`` at most, and for a labelled ADWIN alarm no more
  than its window after the alarm (the labels since the change it found).
* ``reset_calibrator``: restart online conformal calibration (only where configured).

One drift, one action: each action kind has a cool-down; an alarm within ``cooldown`` of the last
time that action was taken does not take it again (other action kinds may still be taken, so a
labelled alarm that follows a label-free boost still trims the memory).

Label-free and labelled alarms disagree often: label-free signals (entropy, confidence, features)
move without labels and early, but also under a benign shift the model handles; labelled signals
are reliable but wait for labels. ``confirmation`` says how they combine:

* ``"independent"`` (default): each alarm takes its own kind's actions, label-free ones
  ``label_free_actions`` (default: the boost only, cheap and self-undoing), labelled ones
  ``labelled_actions`` (default: boost and trim).
* ``"labelled"``: a label-free alarm takes nothing by itself; it waits ``confirm_window``. A
  labelled alarm within that window confirms it and takes both kinds' actions, with the label-free
  alarm's time as the drift's onset; unconfirmed, it expires as an ``unconfirmed`` event. Labelled
  alarms never wait.

Actions that hurt. With a `drift.judge.ActionJudge`, the policy holds back a share of the actions
it would take (``held`` in the alarm's event; a held action starts its cool-down as a taken one
does), and the judge compares the labelled loss after acted and held alarms; an action kind whose
verdict is ``hurts`` is then held at most alarms (see `drift.judge`).

Every alarm gives one event (``kind: drift_alarm``, ``action: None``, ``detail.outcome``: acted,
held, cooldown, pending, no_actions) and every action one more (``kind: drift_action``); an
expired label-free alarm gives ``kind: drift_unconfirmed``, and each judged alarm, once its labels
are in, ``kind: drift_judged``. `take_events` hands over the new ones.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from drift.detectors import Alarm
from drift.judge import ActionJudge

ACTIONS = ("boost_lr", "reset_adapter", "trim_memory", "reset_calibrator")
SETTLED = 1e-3  # the boost's excess below which the rate is exactly base again


@dataclass(frozen=True)
class Action:
    """One action for the caller to apply, and why."""

    name: str
    at: int
    time: float
    detector: str
    signal: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    alarm: Alarm
    at: int


class DriftPolicy:
    """Turns drift alarms into actions, with a cool-down per action and a confirmation rule.

    Parameters
    ----------
    base_learning_rate
        The adapter's learning rate outside a boost.
    boost
        The multiplier at a boost (>= 1).
    half_life
        Clock units over which the boost's excess halves.
    cooldown
        Clock units after an action during which alarms do not take it again.
    label_free_actions, labelled_actions
        What each kind of alarm does (subsets of `ACTIONS`).
    confirmation
        "independent" or "labelled" (see the module docstring).
    confirm_window
        How long a label-free alarm waits for a labelled one, under "labelled".
    trim_keep
        Rows a memory keeps at ``trim_memory``.
    clock
        Wall-clock time for events.
    judge
        Holds back a share of the actions and judges each kind against them (None: every action
        is taken).

    Examples
    --------
    >>> from drift.detectors import Alarm
    >>> policy = DriftPolicy(base_learning_rate=0.001, boost=5.0, half_life=100, cooldown=1000,
    ...                      clock=lambda: 0.0)
    >>> error = Alarm("adwin", "error", True, sample=900, update=900, time=0.0,
    ...               statistic=None, estimate=0.3)
    >>> [action.name for action in policy.on_alarm(error, now=5000)]
    ['boost_lr', 'trim_memory']
    >>> [round(policy.learning_rate(t), 6) for t in (5000, 5100, 5200, 7000)]
    [0.005, 0.003, 0.002, 0.001]
    >>> policy.on_alarm(error, now=5500)  # the same drift again, within the cool-down
    []
    >>> [(e["kind"], e["action"], e["detail"].get("outcome")) for e in policy.take_events()]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('drift_alarm', None, 'acted'), ('drift_action', 'boost_lr', None),
     ('drift_action', 'trim_memory', None), ('drift_alarm', None, 'cooldown')]
    """

    def __init__(
        self,
        base_learning_rate: float,
        boost: float = 5.0,
        half_life: float = 500.0,
        cooldown: int = 2000,
        label_free_actions: Sequence[str] = ("boost_lr",),
        labelled_actions: Sequence[str] = ("boost_lr", "trim_memory"),
        confirmation: Literal["independent", "labelled"] = "independent",
        confirm_window: int = 2000,
        trim_keep: int = 64,
        clock: Callable[[], float] = time.time,
        max_events: int = 1000,
        judge: ActionJudge | None = None,
    ) -> None:
        if base_learning_rate <= 0:
            raise ValueError(f"base_learning_rate must be > 0, got {base_learning_rate}")
        if boost < 1:
            raise ValueError(f"boost multiplies the learning rate and must be >= 1, got {boost}")
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        if cooldown < 0 or confirm_window < 0 or trim_keep < 0:
            raise ValueError("cooldown, confirm_window and trim_keep must be >= 0")
        if confirmation not in ("independent", "labelled"):
            raise ValueError(f"confirmation {confirmation!r}: use 'independent' or 'labelled'")
        for actions in (label_free_actions, labelled_actions):
            unknown = set(actions) - set(ACTIONS)
            if unknown:
                raise ValueError(f"unknown drift actions {sorted(unknown)}: use {list(ACTIONS)}")
        self.base_learning_rate = float(base_learning_rate)
        self.boost = float(boost)
        self.half_life = float(half_life)
        self.cooldown = int(cooldown)
        self.label_free_actions = _ordered(label_free_actions)
        self.labelled_actions = _ordered(labelled_actions)
        self.confirmation = confirmation
        self.confirm_window = int(confirm_window)
        self.trim_keep = int(trim_keep)
        self.clock = clock
        self.judge = judge
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._new: list[dict[str, Any]] = []
        self._boost_at: int | None = None
        # the first sample clock whose labels learn at the last boost (`learning_rate_served`):
        # the boost's own clock for a label-free alarm (its batch raised it), the onset of the
        # drift for a confirmed one, where the alarming labels' samples were served for a
        # labelled one
        self._boost_from: int | None = None
        self._last_taken: dict[str, int] = {}
        self._pending: list[_Pending] = []

    # ---- the learning rate -----------------------------------------------------------------------

    def learning_rate(self, now: int) -> float:
        """The rate to apply at ``now``: base, or a boost decaying back to it."""
        if self._boost_at is None:
            return self.base_learning_rate
        elapsed = max(0, now - self._boost_at)
        excess = (self.boost - 1.0) * 0.5 ** (elapsed / self.half_life)
        if excess < SETTLED:
            return self.base_learning_rate
        return self.base_learning_rate * (1.0 + excess)

    def learning_rate_served(self, served: float) -> float:
        """The rate for learning from a label whose sample was served at clock ``served``: base
        for a sample served before the drift the last boost was taken for (its label shows what
        came before the change; only the last boost counts), else the boost as it stood when
        the sample was served (the whole boost for one served between the drift's onset and the
        boost)."""
        start = self._boost_from if self._boost_from is not None else self._boost_at
        if self._boost_at is None or start is None or not served >= start:  # NaN: base
            return self.base_learning_rate
        return self.learning_rate(max(int(served), self._boost_at))

    # ---- alarms ----------------------------------------------------------------------------------

    def on_alarm(self, alarm: Alarm, now: int | None = None,
                 served_from: float | None = None) -> list[Action]:
        """The actions this alarm calls for at ``now`` (default: the alarm's own sample).
        ``served_from``, for a labelled alarm: the earliest sample clock at which the labels
        that raised it were served (where known), from which a boost reaches what learns from
        labels."""
        now = alarm.sample if now is None else int(now)
        self.advance(now)
        onset = now
        confirms: list[dict[str, Any]] = []
        if not alarm.labelled:
            wanted = self.label_free_actions
            if self.confirmation == "labelled":
                self._pending.append(_Pending(alarm, now))
                self._record(_alarm_event(alarm, "drift_alarm", self.clock(), now, None,
                                          {"outcome": "pending", "wait": self.confirm_window}))
                return []
        else:
            wanted = self.labelled_actions
            if self.confirmation == "labelled" and self._pending:
                onset = min(p.at for p in self._pending)
                confirms = [{"detector": p.alarm.detector, "signal": p.alarm.signal, "at": p.at}
                            for p in self._pending]
                wanted = _ordered([*self.label_free_actions, *wanted])
                self._pending.clear()
        if not wanted:
            self._record(_alarm_event(alarm, "drift_alarm", self.clock(), now, None,
                                      {"outcome": "no_actions"}))
            return []
        cooled = [name for name in wanted if self._cooled(name, now)]
        cooling = [name for name in wanted if name not in cooled]
        held = [] if self.judge is None else [
            name for name in cooled
            if not self.judge.choose(name, now, alarm.detector, alarm.signal)]
        for name in held:  # a control of this drift: its cool-down starts as a taken one's would
            self._last_taken[name] = now
        taken = [name for name in cooled if name not in held]
        extra: dict[str, Any] = {"suppressed": cooling} if cooling else {}
        if held:
            extra["held"] = held
        if confirms:
            extra["confirms"] = confirms
        outcome = "acted" if taken else "held" if held else "cooldown"
        self._record(_alarm_event(alarm, "drift_alarm", self.clock(), now, None,
                                  {"outcome": outcome, "actions": taken, **extra}))
        boost_from = onset
        if alarm.labelled and served_from is not None and served_from == served_from:  # not NaN
            boost_from = min(onset, int(served_from))
        return [self._take(name, alarm, now, onset, boost_from) for name in taken]

    def advance(self, now: int) -> None:
        """Expire label-free alarms that waited longer than ``confirm_window`` by ``now``, and
        record the judge's outcomes of the alarms whose labels are in."""
        if self.judge is not None:
            for result in self.judge.advance(now):
                self._record(_judged_event(result, self.clock()))
        kept = []
        for pending in self._pending:
            if now - pending.at > self.confirm_window:
                self._record(_alarm_event(pending.alarm, "drift_unconfirmed", self.clock(),
                                          pending.at, None,
                                          {"outcome": "unconfirmed", "expired_at": now}))
            else:
                kept.append(pending)
        self._pending = kept

    def _cooled(self, name: str, now: int) -> bool:
        last = self._last_taken.get(name)
        return last is None or now - last >= self.cooldown

    def _take(self, name: str, alarm: Alarm, now: int, onset: int, boost_from: int) -> Action:
        detail: dict[str, Any] = {}
        if name == "boost_lr":
            before = self.learning_rate(now)
            self._boost_at, self._boost_from = now, boost_from
            detail = {"from": before, "to": self.learning_rate(now), "boost": self.boost,
                      "half_life": self.half_life}
        elif name == "trim_memory":
            detail = {"keep": self._rows_to_keep(alarm), "onset": onset}
        self._last_taken[name] = now
        action = Action(name, now, self.clock(), alarm.detector, alarm.signal, detail)
        # the action's own detail only, not the alarm's: that went with the alarm's event
        self._record(_alarm_event(alarm, "drift_action", action.time, now, name, detail,
                                  with_alarm_detail=False))
        return action

    def _rows_to_keep(self, alarm: Alarm) -> int:
        """At most ``trim_keep`` rows, and no more than a labelled ADWIN alarm's window: what is
        left of it after the alarm is the labels since the change it found (one memory row
        each), so the memories keep the new concept and drop the old."""
        width = alarm.detail.get("width")
        if alarm.labelled and isinstance(width, int) and width >= 0:
            return min(self.trim_keep, width)
        return self.trim_keep

    # ---- events and state ------------------------------------------------------------------------

    def _record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._new.append(event)

    def take_events(self) -> list[dict[str, Any]]:
        """The events since the last call, oldest first (for the event log and the store)."""
        new, self._new = self._new, []
        return new

    def state(self) -> dict[str, Any]:
        """A JSON-safe dict of what must outlive a restart: boost, cool-downs, pending alarms."""
        state: dict[str, Any] = {
            "boost_at": self._boost_at, "last_taken": dict(self._last_taken),
            "pending": [{"at": p.at, "alarm": _saved_alarm(p.alarm)} for p in self._pending]}
        if self._boost_from is not None and self._boost_from != self._boost_at:
            state["boost_from"] = self._boost_from
        if self.judge is not None:
            state["judge"] = self.judge.state()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state()`'s dict; ValueError, and nothing changed, if it does not hold."""
        try:
            last_taken = {str(k): int(v) for k, v in state["last_taken"].items()}
            boost_at = None if state["boost_at"] is None else int(state["boost_at"])
            # states saved before stop 38 lack it: the boost's own clock
            boost_from = state.get("boost_from", boost_at)
            boost_from = None if boost_from is None else int(boost_from)
            pending = [_Pending(Alarm.from_json(p["alarm"]), int(p["at"]))
                       for p in state["pending"]]
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a drift policy state: {error!r}") from error
        unknown = set(last_taken) - set(ACTIONS)
        if unknown:
            raise ValueError(f"drift policy state names unknown actions {sorted(unknown)}")
        if self.judge is not None and "judge" in state:  # states saved before the judge lack it
            self.judge.load_state(state["judge"])
        self._boost_at, self._last_taken, self._pending = boost_at, last_taken, pending
        self._boost_from = boost_from

    def describe(self) -> dict[str, Any]:
        return {"base_learning_rate": self.base_learning_rate, "boost": self.boost,
                "half_life": self.half_life, "cooldown": self.cooldown,
                "confirmation": self.confirmation, "confirm_window": self.confirm_window,
                "label_free_actions": list(self.label_free_actions),
                "labelled_actions": list(self.labelled_actions), "trim_keep": self.trim_keep,
                "boost_at": self._boost_at, "boost_from": self._boost_from,
                "pending": len(self._pending),
                "judge": None if self.judge is None else self.judge.describe()}


def _ordered(actions: Sequence[str]) -> tuple[str, ...]:
    return tuple(name for name in ACTIONS if name in set(actions))


def _saved_alarm(alarm: Alarm) -> dict[str, Any]:
    """A pending alarm as the policy state saves it: `Alarm.to_json` less ``kind``, the shape
    earlier versions wrote and read back as ``Alarm(**fields)``, so a rollback still loads it."""
    fields = alarm.to_json()
    del fields["kind"]
    return fields


# the alarm's fields an event carries, as /v1/events has always served them (no ``update``)
_EVENT_FIELDS = ("detector", "signal", "labelled", "statistic", "estimate", "sample")


def _judged_event(result: dict[str, Any], wall: float) -> dict[str, Any]:
    """An alarm's outcome, once its labels are in (`ActionJudge.advance`), as an event."""
    detail = {k: v for k, v in result.items() if k not in ("action", "at", "detector", "signal")}
    return {"time": wall, "kind": "drift_judged", "detector": result["detector"],
            "signal": result["signal"], "labelled": None, "statistic": None, "estimate": None,
            "sample": result["at"], "at": result["at"], "action": result["action"],
            "detail": detail}


def _alarm_event(alarm: Alarm, kind: str, wall: float, at: int, action: str | None,
                 detail: dict[str, Any], with_alarm_detail: bool = True) -> dict[str, Any]:
    """An event about ``alarm``: its fields from `Alarm.to_json` (non-finite numbers as None, as
    served), when (``wall``) and on the policy's clock (``at``), with ``detail`` first and then,
    unless told otherwise, the alarm's own detail."""
    fields = alarm.to_json(nonfinite="null")
    return {"time": wall, "kind": kind, **{key: fields[key] for key in _EVENT_FIELDS},
            "at": at, "action": action,
            "detail": {**detail, **fields["detail"]} if with_alarm_detail else dict(detail)}
