"""Classes that come in runs: a filter over the stream that learns how long they last.

Real traffic is not shuffled: a camera sees one kind of object for minutes, a fraud model sees
bursts of one pattern, a user sends the same image again and again. A classifier answers each
request alone, so on such a stream it throws away the best evidence it has, the answers just
before. Test-time BatchNorm does worse than nothing with it: a run of one class drags the
statistics towards that class (`adapters.tta.balanced`). This filter uses the runs instead.

It is the forward pass of a hidden Markov model over the class of consecutive samples, in the
order the engine serves them: the class stays the same with probability rho, or is drawn afresh
from the model's recent class mix m. Each sample's evidence is the model's probabilities p
divided by m. This is a choice, not a derivation: the model's posterior holds its training
prior, not m, but dividing by the mix the model has lately been answering with makes rho = 0
serve p unchanged, so that only agreement between neighbours beyond that mix counts as a run.
For each rho of a grid, with a_rho the filtered posterior of the previous sample:

    prior_rho = rho · a_rho + (1 − rho) · m
    a_rho     ∝ prior_rho ⊙ p / m                  (normalised; L_rho the normaliser)
    served    = Σ_rho w_rho · a_rho

and rho is not set but learnt: the weights w are exponential weights on each rho's predictive
likelihood L_rho (Bayesian model averaging with optional forgetting), with a fixed share so that
a rho that lost for a while can take over again within a few samples (Herbster & Warmuth 1998,
as in `adapters.mixture`). After each sample (its answer was served with the weights before it,
as the mixture serves with the weights of the labels before):

    w ← normalise(w^(1 − forget) ⊙ L),   w ← (1 − share) · w + share / |grid|
    m ← (1 − f) · m̄ + f / C,   m̄ ← (1 − 1/window) · m̄ + (1/window) · p   (before the sample)

(serving with the weights after the sample instead changed B1's errors by 0.2 point at most.)

The floor f keeps every class in the mix: without it, after one image repeated 1,000 times the
mix held the other classes at 0.07%, every later sample looked a thousand times likelier than
the mix expected, and the sticky rhos took over the shuffled traffic that followed (B1's
`repeat` order: clean error 6.5% against the source's 3.1%; with f = 0.2, 3.3%).

On shuffled traffic rho = 0 wins, and rho = 0 serves p unchanged (its prior is m, which p / m
cancels): the filter then serves the model's own answers. In a run, a large rho wins and the
run's class holds until the evidence against it outweighs ρ / ((1 − ρ) m); a single request
repeated keeps the model's answer for it. Nothing is learnt into the model: the filter is
label-free, changes no parameter, and its state is a few hundred numbers per process (not
checkpointed: it re-learns rho within a few hundred samples).

Measured on B1's traffic axis (BENCHMARKS.md): the filter turns classes in runs from a loss into
a gain, at a cost where the model's own class mix changes abruptly on shuffled traffic (a new
corruption that makes the model favour one class): until m has caught up, that class looks
likelier than m expects sample after sample, which is what a run looks like, and a sticky rho
takes over for a few hundred samples. This is online label-shift tracking
in the sense of Wu et al. ("Online Adaptation to Label Distribution Shift", NeurIPS 2021) with
the shift given the temporal form of a sticky Markov chain.

Labels, where they come back, settle what the model's answers cannot: whether the classes
themselves come in runs. Each served row is placed (`filter_and_place`: a token of its
sequence and the row's position in it, kept with the prediction record); a joined label of a
placed row is paired with the nearest labelled row before it that the filter knows, L rows
before, and under each rho the chain gives the pair's likelihood

    P(y | y_prev, L, rho) = rho^L · [y = y_prev] + (1 − rho^L) · q_y

with q the labels' own class mix (averaged over `window` labels, floored as m is). These weigh
a second set of weights v over the same grid, from labels alone, with their own fixed share
`label_share`. Labels only veto: what serves is w with each rho's weight multiplied by

    min(1, [v(≥ rho) / v(< rho)] / [n(≥ rho) / n(< rho)])

(normalised), the labels' Bayes factor for a stickiness of at least rho against one below it,
v(≥ rho) the weight of v on the grid's values of at least rho and n(≥ rho) their count (the
uniform prior's odds); 1 for the grid's smallest rho, and for every rho until labels have
moved v. So labels that show shuffled classes take away the sticky rhos the model's answers
raised (the lag of m after an abrupt change of the model's class mix, the cost above), and
labels in runs leave w as it is (the model's answers find runs without
help, and a verdict of runs must not outlast them: after a stream in runs, shuffled traffic
without labels would stay sticky). v's share is small, 1e-5 against w's 2e-3, so that the veto
outweighs w's evidence when they disagree; once no label has taught for `window` rows, v fades
towards uniform by `label_forget` a row (v ← v^(1 − label_forget)), so that a label stream that
stops does not veto runs that start later. Until the first pair, w serves alone, exactly as
without labels. Only the last `remembered` labelled rows are kept to pair with (a label of a
row served before all of them pairs with none), and a label pairs with the one before it only,
not also with the one after it when it arrives out of order.

Measured on B1 with 10% of the labels back 100 samples late (BENCHMARKS.md, "Labels tell the
class-run filter whether classes run"): the rows a change of corruption made the model favour
are no longer served as a run.

Runs belong to a source (a camera, a device, a user), and a service with many sources sees their
requests interleaved: in the order served, one camera's run is broken by the others' rows, and a
sticky rho carries one camera's class into the next camera's request. Rows whose request named a
`group` are therefore followed as a sequence of their own (`sequence`): each sequence keeps its
own posterior a_rho, its own positions and the labelled rows its labels pair with; the class mix
m and the weights w and v are every sequence's (m is the model's, and how sticky classes are is
learnt from all the sources at once, so a new group starts from what the others taught; a
sequence's first row, with no row before it, has the mix m as its prior, the chain's stationary
distribution, and is served as the model answers it). Rows of
no group are one sequence, as before; beyond `groups` sequences the one served least recently
is forgotten, and labels of its rows teach nothing. On B1's stream dealt to 8 callers, one
sample a request, classes in runs (BENCHMARKS.md, "Callers that name their group"): 46.0% error
without groups, 20.2% with them; a per-sequence mix m instead of the shared one gave 25.3%,
since each sequence's own m soon follows its own run and cancels it.

A row the engine has seen lately (the same request again: `learn` False) is served by the filter
as it stands and moves nothing: the same request a thousand times is one sample, not a run.

After the inputs shift, the model's own answers come in runs for a while: test-time statistics
catch up over about 1 / momentum samples in their fastest layer (longer in the slower ones), and
until they have, the class the model favours drifts, so consecutive answers agree more than its
class mix expects whatever the classes do. On B1's contrast domain with a long tail of shuffled
classes, 48% of the model's answers agreed with the one before, against 27% for the same answers
shuffled, and the filter took that for a run: it was most of its cost on shuffled traffic, and
where shifts come every few hundred samples (a long tail of classes shortens each domain) it
served worse than the source. The engine therefore tells the filter each row's shift at the
model's robust BatchNorm layers that average over positions (`RobustBatchNorm.shifts`: the
median over channels of log q, q the sample's spread about the layer's average against its
variance, mean over the layers; about 0 for a sample like those before it: a run of one class
moves the early layers' little, a new corruption far, either way). Each row's shift is taken
against the level of the rows before (from 0, a sample like those the statistics hold, so that
a stream that starts shifted or one after a reset is seen; then an average over SHIFT_LEVEL_SPAN
rows: samples that vary, a camera's exposure, sit below 0, as a mean of logs does, and are no
shift once the level has followed them) and counts for at most SHIFT_CLIP bounds (a lone spike
does not pass it). Where the deviation, averaged over about `settle_span` rows, passes the bound,
`settle_shift` or SHIFT_Z standard deviations of that average, whichever is larger (the rows'
spread learnt while the filter was not standing aside), the filter stands aside for the next
`settle_rows` rows: it serves the model's
answers, a repeated row's too, and learns no stickiness from them (its posteriors and class mix
go on, so it resumes where those rows left it). The statistics are every group's, so a shift
seen in any group's rows sets every group aside. An adapter whose served forward moves no
statistics (RoTTA's teacher: its memory moves them) reports no shift and never settles; a level
that moves for good (a new stream whose samples sit at -0.7) is followed within a few hundred
rows, the filter aside meanwhile. Measured on B1 (BENCHMARKS.md, "A long tail of
classes and mixed shifts"), one sample a request: shuffled 44.4% -> 42.0% error, a long tail of
classes (100 to 1) 65.5% -> 57.2%, and classes in runs 0.6 to 2.0 points worse than without
(the first rows of a run that begins with a shift are served as the model answers). Models
without such layers (a tabular MLP: one value per sample and feature, which moves with the
class) send no shifts, and the filter is as before.
"""

from __future__ import annotations

import bisect
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

STICKINESS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
# a row's place: the sequence's token and the row's position, both below 2**24 so that a float32
# array in the prediction record holds them exactly; the token moves on every 2**24 rows
PLACES = 2**24
NOWHERE = -1.0  # the place of a row that moved no sequence (its label teaches nothing)
SHIFT_CLIP = 3.0  # a row's deviation counts for at most this many times the bound
SHIFT_LEVEL_SPAN = 300  # rows over which the level the shifts are measured from is averaged
SHIFT_Z = 4.0  # the bound is at least this many standard deviations of the rows' average
SHIFT_PRIOR_SPREAD = 0.25**2  # the rows' spread about their level before any is learnt


@dataclass
class _Sequence:
    """One sequence of rows the filter follows: the rows of one group (or of none), in the
    order served: its own filtered posterior; the class mix and the weights over rho are
    every sequence's."""

    token: int
    # a_rho after its last row; None before its first, when the chain's prior is the class mix
    # (its stationary distribution), so that a sequence's first row is served as the model
    # answers it, whatever rho the other sequences taught
    posterior: np.ndarray | None
    remembered: int  # its labelled rows kept for pairing
    filtered: int = 0  # its rows filtered: the next row's position
    labelled: list[tuple[int, int]] = field(default_factory=list)  # (position, class), ordered
    live: bool = True  # False once forgotten: its rows' labels teach nothing

    def tokens(self) -> tuple[int, ...]:
        """The tokens its rows carry now: this stretch's and the one before."""
        era = self.filtered // PLACES
        return tuple((self.token + stretch) % PLACES for stretch in range(max(0, era - 1), era + 1))



class ClassRunFilter:
    """The class of consecutive samples as a sticky Markov chain, filtered sample by sample.

    Parameters: `num_classes`; `stickiness`, the grid of rho (it must hold 0, so that shuffled
    traffic is served unchanged); `forget`, how fast old evidence about rho fades (per sample);
    `share`, the fixed share that keeps every rho within reach; `window`, the samples over which
    the model's class mix m is averaged (and the labels over which theirs is); `floor`, the
    share of the uniform mix blended into m; `label_share`, the fixed share of the weights that
    labels learn (`learn_labels`); `remembered`, the labelled positions kept for pairing (a
    group's sequence keeps a sixteenth as many); `groups`, the groups' sequences followed apart
    (`sequence`).

    >>> runs = ClassRunFilter(num_classes=3)
    >>> _ = runs.filter(torch.tensor([[0.8, 0.1, 0.1]] * 30))  # a run of class 0
    >>> runs.filter(torch.tensor([[0.3, 0.5, 0.2]])).argmax(1).item()  # one weak vote against
    0
    >>> runs.stickiness() > 0.8
    True
    """

    def __init__(self, num_classes: int, stickiness: tuple[float, ...] = STICKINESS,
                 forget: float = 0.0, share: float = 0.002, window: int = 200,
                 floor: float = 0.2, label_share: float = 1e-5, label_forget: float = 0.02,
                 remembered: int = 1024, groups: int = 1024, settle_rows: int = 100,
                 settle_shift: float = 0.25, settle_span: int = 10) -> None:
        if num_classes < 2:
            raise ValueError("the class-run filter needs a classifier with two or more classes")
        if 0.0 not in stickiness or not all(0.0 <= rho < 1.0 for rho in stickiness):
            raise ValueError("the stickiness grid must hold 0 and values in [0, 1)")
        if not 0.0 <= forget < 1.0 or not 0.0 <= share < 1.0 or not 0.0 <= floor <= 1.0 \
                or not 0.0 <= label_share < 1.0 or not 0.0 <= label_forget < 1.0 \
                or window < 1 or remembered < 1 or groups < 1 or settle_rows < 0 \
                or not settle_shift > 0.0 or settle_span < 1:
            raise ValueError("forget, share, label_share and label_forget must lie in [0, 1), "
                             "floor in [0, 1], window, remembered, groups and settle_span must "
                             "be >= 1, settle_rows >= 0 and settle_shift > 0")
        self.num_classes = num_classes
        self.rho = np.asarray(stickiness, dtype=np.float64)[:, None]
        # row i marks the rhos of the grid at least rho_i; the prior odds of "at least rho_i"
        self._at_least = (self.rho[:, 0][None, :] >= self.rho).astype(np.float64)
        counted = self._at_least.sum(1)
        self._prior_odds = counted / np.maximum(len(self.rho) - counted, 1.0)
        self.forget = forget
        self.share = share
        self.rate = 1.0 / window
        self.floor = floor
        self.label_share = label_share
        self.label_forget = label_forget
        self.remembered = remembered
        self.groups = groups
        self.settle_rows = settle_rows
        self.settle_shift = settle_shift
        self.settle_rate = 2.0 / (settle_span + 1)
        self.settle_level_rate = 2.0 / (SHIFT_LEVEL_SPAN + 1)
        self.reset()

    def reset(self) -> None:
        """Forget the runs: uniform class mix, every rho equally likely, nothing filtered, no
        label learnt, no group's sequence, and a new sequence for the rows of no group (labels
        of rows placed before count for nothing)."""
        grid, classes = len(self.rho), self.num_classes
        self.filtered = 0  # rows filtered, every sequence's
        self.mix = np.full(classes, 1.0 / classes)  # the model's class mix m, every sequence's
        self.belief = np.full(grid, 1.0 / grid)  # the weights w over the grid of rho
        self.pairs = 0  # labelled pairs learnt
        self._labels_at = 0  # rows filtered when labels last taught
        self.label_belief = np.full(grid, 1.0 / grid)  # the weights v, from labels alone
        self.label_mix = np.full(classes, 1.0 / classes)
        # the rows' shifts: their level, averaged over the last SHIFT_LEVEL_SPAN rows or so
        # (from 0), and their deviation from it over the last `settle_span`
        self.shift_level = 0.0
        self.shift = 0.0
        self.shift_spread = SHIFT_PRIOR_SPREAD  # the rows' mean squared deviation from it
        self.settling_until = -1  # the filter stands aside up to this row (rows filtered)
        self.settled = 0  # rows served as the model answered while settling
        # token -> the sequence whose rows carry it, and the stretch of 2**24 positions it names
        self._places: dict[int, tuple[_Sequence, int]] = {}
        self._groups: OrderedDict[str, _Sequence] = OrderedDict()  # least recently served first
        self._ungrouped = self._new_sequence(self.remembered)

    def _new_sequence(self, remembered: int) -> _Sequence:
        token = secrets.randbelow(PLACES)
        while token in self._places:  # one token a live sequence: labels find their own
            token = secrets.randbelow(PLACES)
        sequence = self._scratch(remembered)
        sequence.token = token
        self._places[token] = (sequence, 0)
        return sequence

    def _scratch(self, remembered: int = 1) -> _Sequence:
        """A sequence that starts afresh and is not kept: no token, nothing placed."""
        return _Sequence(-1, None, remembered)

    def sequence(self, group: str | None = None) -> _Sequence:
        """The sequence of the rows of `group` (None: the rows that name none), made at its
        first row, and now the most recently served. Beyond `groups` of them, the batch that
        made one forgets the least recently served when it is done (`_trim`)."""
        if group is None:
            return self._ungrouped
        sequence = self._groups.get(group)
        if sequence is None:
            # a group's labels come with its own rows, a few at a time: fewer kept for pairing
            sequence = self._groups[group] = self._new_sequence(max(1, self.remembered // 16))
        self._groups.move_to_end(group)
        return sequence

    def _forget(self, group: str) -> None:
        forgotten = self._groups.pop(group)
        forgotten.live = False
        for token in forgotten.tokens():
            if self._places.get(token, (None, 0))[0] is forgotten:
                del self._places[token]

    def _trim(self) -> None:
        while len(self._groups) > self.groups:
            self._forget(next(iter(self._groups)))  # the least recently served

    def _moved_on(self, sequence: _Sequence, rows: int) -> None:
        """`rows` more of the sequence filtered: past a boundary of 2**24 positions its rows
        carry the next token (unless another sequence holds it: then the labels of that
        stretch teach nothing), and labels of the stretch before still find it."""
        era = sequence.filtered // PLACES
        sequence.filtered += rows
        if not sequence.live:
            return
        for stretch in range(era + 1, sequence.filtered // PLACES + 1):
            token = (sequence.token + stretch) % PLACES
            if self._places.get(token, (sequence, 0))[0] is sequence:
                self._places[token] = (sequence, stretch)
            stale = (sequence.token + stretch - 2) % PLACES
            if stretch >= 2 and self._places.get(stale, (None, 0))[0] is sequence:
                del self._places[stale]

    def weights(self) -> np.ndarray:
        """The weights over the grid that serve: w, each rho's vetoed as far as labels have
        found a stickiness of at least rho less likely than one below it."""
        if not self.pairs:
            return self.belief
        weights = self.belief * self.veto()
        return weights / weights.sum()

    def veto(self) -> np.ndarray:
        """Per rho of the grid, min(1, the labels' Bayes factor for a stickiness of at least
        rho against one below it): 1 for the smallest rho, and for every rho while v is still
        its uniform prior."""
        at_least = self._at_least @ self.label_belief
        below = 1.0 - at_least
        factor = at_least / np.maximum(below, 1e-300) / self._prior_odds
        return np.where(below > 0.0, np.minimum(1.0, factor), 1.0)

    def stickiness(self) -> float:
        """The expected rho under the current weights: the chance that the next sample keeps
        the class (0 on shuffled traffic)."""
        return float(self.weights() @ self.rho[:, 0])

    def learn_labels(self, placed: np.ndarray, labels: np.ndarray) -> int:
        """Learn from joined labels whether the classes come in runs (the module's docstring):
        `placed` the rows' places as `filter_and_place` gave them, `labels` their class
        indices. Rows placed by another sequence (another process, a forgotten group, or before
        a reset), or whose place or class is not one, teach nothing. Returns the pairs learnt."""
        placed = np.asarray(placed, dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        ok = np.isfinite(placed).all(1) & np.isfinite(labels)
        ok &= (labels >= 0) & (labels < self.num_classes) & (labels == np.round(labels))
        ok &= (placed >= 0).all(1) & (placed < PLACES).all(1) & (placed == np.round(placed)).all(1)
        found: dict[int, tuple[_Sequence, list[tuple[int, int]]]] = {}
        for row in np.flatnonzero(ok):
            owner = self._places.get(int(placed[row, 0]))
            if owner is None:
                continue
            sequence, stretch = owner
            # positions from the sequence's start, among the rows filtered so far
            at = stretch * PLACES + int(placed[row, 1])
            if at < sequence.filtered:
                found.setdefault(id(sequence), (sequence, []))[1].append((at, int(labels[row])))
        learnt = 0
        for sequence, rows in found.values():
            for position, label in sorted(rows):
                learnt += self._learn_label(sequence, position, label)
        self.pairs += learnt
        if learnt:
            self._labels_at = self.filtered
        return learnt

    def _learn_label(self, sequence: _Sequence, position: int, label: int) -> int:
        labelled = sequence.labelled
        at = bisect.bisect_left(labelled, (position, -1))
        if at < len(labelled) and labelled[at][0] == position:
            return 0  # that row's label again: it says nothing new
        mix = (1.0 - self.floor) * self.label_mix + self.floor / self.num_classes
        learnt = 0
        if at > 0:
            before, before_label = labelled[at - 1]
            keep = self.rho[:, 0] ** (position - before)
            likelihood = keep * (label == before_label) + (1.0 - keep) * mix[label]
            belief = self.label_belief * np.maximum(likelihood, 1e-300)
            belief = belief / belief.sum()
            self.label_belief = (1.0 - self.label_share) * belief \
                + self.label_share / len(self.rho)
            learnt = 1
        self.label_mix = (1.0 - self.rate) * self.label_mix
        self.label_mix[label] += self.rate
        labelled.insert(at, (position, label))
        if len(labelled) > sequence.remembered:
            del labelled[0]  # the earliest served: labels come about in the order served
        return learnt

    def filter(self, probabilities: torch.Tensor, commit: bool = True,
               groups: Sequence[str | None] | None = None,
               learn: np.ndarray | None = None, shifts: np.ndarray | None = None
               ) -> torch.Tensor:
        """The filtered probabilities of a batch's rows, taken in order as consecutive samples
        of their sequences: `groups` names each row's (None: every row is of the sequence of
        no group). Rows outside `learn` (None: all in) are served from the filter as it
        stands and move nothing: a request sent again is not a run. Without `commit` the filter
        ends as it began (the rows are filtered, not remembered; a group not seen before is
        followed for the batch and not kept, and no group becomes the most recently served);
        so does a batch that raises. `shifts`: each row's shift at the model's normalisation
        layers (`RobustBatchNorm.shifts`, averaged over the layers; None or NaN: not known),
        which tells the filter to stand aside while the statistics settle (the module's
        docstring)."""
        return self._filter(probabilities, commit, groups, learn, shifts)[0]

    def filter_and_place(self, probabilities: torch.Tensor,
                         groups: Sequence[str | None] | None = None,
                         learn: np.ndarray | None = None, shifts: np.ndarray | None = None
                         ) -> tuple[torch.Tensor, np.ndarray]:
        """`filter` with `commit`, and where each row fell for the prediction records, from the
        same walk over the rows: (n, 2) float32 rows of its sequence's token and its position
        in that sequence, both below 2**24 (the token moves on every 2**24 rows); NOWHERE (-1)
        for a row outside `learn`, which moved no sequence."""
        return self._filter(probabilities, True, groups, learn, shifts)

    def _filter(self, probabilities: torch.Tensor, commit: bool,
                groups: Sequence[str | None] | None, learn: np.ndarray | None,
                shifts: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        p = probabilities.detach().double().cpu().numpy().reshape(len(probabilities), -1)
        if groups is not None and len(groups) != len(p):
            raise ValueError(f"{len(groups)} groups for {len(p)} rows")
        if shifts is not None and len(shifts) != len(p):
            raise ValueError(f"{len(shifts)} shifts for {len(p)} rows")
        places = np.full((len(p), 2), NOWHERE, dtype=np.float32)
        kept = (self.mix, self.belief, self.label_belief)
        settling = (self.shift_level, self.shift, self.shift_spread, self.settling_until,
                    self.settled)
        touched: dict[int, tuple[_Sequence, np.ndarray | None]] = {}  # each one's state before
        rows: dict[int, int] = {}  # the rows of each sequence that moved it
        made: list[str] = []  # groups first seen in this batch
        scratch: dict[str | None, _Sequence] = {}  # groups not kept: without commit, unseen
        served = np.empty_like(p)
        moved = 0  # rows that moved the filter
        done = False
        try:
            for row, probs in enumerate(p):
                group = None if groups is None else groups[row]
                moves = learn is None or bool(learn[row])
                sequence = self._lookup(group, commit and moves, made, scratch)
                if not moves:  # served as the filter stands
                    if self.filtered + moved <= self.settling_until:  # as the model answers
                        served[row] = self._normalised(probs)
                        continue
                    state = (self.mix, self.belief, self.label_belief, sequence.posterior)
                    served[row] = self._step(sequence, probs, self.filtered + moved)
                    self.mix, self.belief, self.label_belief, sequence.posterior = state
                    continue
                touched.setdefault(id(sequence), (sequence, sequence.posterior))
                at = sequence.filtered + rows.get(id(sequence), 0)
                rows[id(sequence)] = rows.get(id(sequence), 0) + 1
                places[row] = ((sequence.token + at // PLACES) % PLACES, at % PLACES)
                position = self.filtered + moved
                if self._settles(None if shifts is None else float(shifts[row]), position):
                    # the statistics are settling after a shift: the rows' agreement now is the
                    # model's, not the classes'; served as the model answers, ρ's weights kept
                    belief = self.belief
                    self._step(sequence, probs, position)
                    self.belief = belief
                    served[row] = self._normalised(probs)
                    self.settled += 1
                else:
                    served[row] = self._step(sequence, probs, position)
                moved += 1
            done = commit
        finally:
            if done:
                self.filtered += moved
                for key, (sequence, _) in touched.items():
                    self._moved_on(sequence, rows[key])
                self._trim()
            else:  # every step rebinds the state, so the arrays kept are as they were
                self.mix, self.belief, self.label_belief = kept
                (self.shift_level, self.shift, self.shift_spread, self.settling_until,
                 self.settled) = settling
                for sequence, posterior in touched.values():
                    sequence.posterior = posterior
                for group in made:
                    self._forget(group)
        return torch.from_numpy(served).to(probabilities.dtype), places

    def _lookup(self, group: str | None, keep: bool, made: list[str],
                scratch: dict[str | None, _Sequence]) -> _Sequence:
        """The sequence a row of `group` moves: with `keep`, its own (made if new, and now the
        most recently served); without, its own as it stands, or one not kept if it has none."""
        if group is None:
            return self._ungrouped
        if keep:
            if group not in self._groups:
                made.append(group)
            return self.sequence(group)
        known = self._groups.get(group)
        if known is not None:
            return known
        if group not in scratch:
            scratch[group] = self._scratch()
        return scratch[group]

    def _settles(self, shift: float | None, row: int) -> bool:
        """Whether the filter stands aside at `row`: within `settle_rows` of a row where the
        rows' deviation from their level, averaged over about `settle_span` rows, passed the
        bound (`settle_shift`, or SHIFT_Z standard deviations of that average for noisier
        rows) either way."""
        if not self.settle_rows:
            return False
        if shift is not None and math.isfinite(shift):
            # the bound: rows as noisy as these pass `settle_shift` by chance, so it is at
            # least SHIFT_Z standard deviations of their average, from the rows' spread learnt
            # where the filter did not stand aside (a shift's own rows would widen it)
            noise = math.sqrt(self.shift_spread * self.settle_rate / (2.0 - self.settle_rate))
            bound = max(self.settle_shift, SHIFT_Z * noise)
            # a row's shift against the level of the rows before, which starts at 0, a sample
            # like those the statistics hold (so a stream that starts shifted, or one after a
            # reset put the source's statistics back, is seen); a stream whose samples vary
            # sits below 0, as a mean of logs does, and the level follows it over about
            # SHIFT_LEVEL_SPAN rows. Each row counts for at most SHIFT_CLIP bounds, so that a
            # lone odd sample (a spike) passes no bound: it takes a few shifted rows in a row
            clip = SHIFT_CLIP * bound
            deviation = min(max(shift - self.shift_level, -clip), clip)
            self.shift_level += self.settle_level_rate * deviation
            self.shift += self.settle_rate * (deviation - self.shift)
            if row > self.settling_until:
                self.shift_spread += self.settle_level_rate * (deviation**2 - self.shift_spread)
            if abs(self.shift) > bound:
                self.settling_until = row + self.settle_rows
        return row <= self.settling_until

    @staticmethod
    def _normalised(p: np.ndarray) -> np.ndarray:
        """The model's answer as a distribution: clipped at 0 and normalised (a row that is
        not finite, or has no mass, as it came)."""
        if not np.isfinite(p).all():
            return p
        p = np.clip(p, 0.0, None)
        total = p.sum()
        return p / total if total > 0.0 else p

    def _step(self, sequence: _Sequence, p: np.ndarray, row: int) -> np.ndarray:
        p = self._normalised(p)
        if not np.isfinite(p).all() or not p.sum() > 0.0:
            return p  # no usable evidence: the row is served as it came and teaches nothing
        self.mix = (1.0 - self.rate) * self.mix + self.rate * p
        mix = (1.0 - self.floor) * self.mix + self.floor / self.num_classes
        before = mix if sequence.posterior is None else sequence.posterior
        joint = (self.rho * before + (1.0 - self.rho) * mix) * (p / np.maximum(mix, 1e-12))
        likelihood = np.maximum(joint.sum(1), 1e-300)
        sequence.posterior = joint / likelihood[:, None]
        served = self.weights() @ sequence.posterior
        if self.pairs and self.label_forget and row - self._labels_at >= 1 / self.rate:
            # what labels said fades once none have come for `window` rows
            faded = self.label_belief ** (1.0 - self.label_forget)
            self.label_belief = faded / faded.sum()
        belief = self.belief ** (1.0 - self.forget) if self.forget else self.belief
        belief = belief * likelihood
        belief = np.maximum(belief / belief.sum(), 1e-300)
        self.belief = (1.0 - self.share) * belief + self.share / len(self.rho) if self.share \
            else belief
        return served

    def describe(self) -> dict[str, object]:
        said: dict[str, object] = {"filtered": self.filtered,
                                   "stickiness": round(self.stickiness(), 3),
                                   "labelled_pairs": self.pairs,
                                   "settling": self.filtered <= self.settling_until,
                                   "settled_rows": self.settled}
        if self._groups:
            said["groups"] = len(self._groups)
        if self.pairs:  # what the labels alone say: the chance the next label keeps the class
            said["labelled_stickiness"] = round(float(self.label_belief @ self.rho[:, 0]), 3)
        return said
