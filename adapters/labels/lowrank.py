"""Low-rank adapters beside a model's last linear layers, trained on labels (LoRA-style).

LoRA (Hu et al., ICLR 2022) adds a trainable low-rank update beside a frozen weight:

    h = W x + b + (alpha / r) B A x,     A (r, in) random (kaiming), B (out, r) zero

so the model is unchanged until B moves, and only A and B (r (in + out) numbers per layer) train.
Test-time methods adapt through such adapters too: ViDA (Liu et al., ICLR 2024) pairs low- and
high-rank adapters, PETSA (Medeiros et al., 2025) adapts forecasters through low-rank adapters.
Here they serve the label-driven loop: when true labels come back, `SupervisedStep` takes an Adam
step on the supervised loss over the adapter parameters alone, and `reset` zeroes B, which
restores the source function exactly.

Choices:

* The adapters go beside the LAST ``layers`` plain `nn.Linear` modules in registration order
  (`model.named_modules()`), which for `nn.Sequential` and most hand-written models is the order
  of the forward pass. Subclasses of `nn.Linear` are left alone (`MultiheadAttention`'s
  ``out_proj`` is one, and attention reads its weight directly instead of calling it).
* `LowRankLinear` subclasses `nn.Linear` and keeps the wrapped layer's own `weight` and `bias`
  parameters, so the model's state-dict keys for them do not change (a source checkpoint still
  loads with ``strict=False``) and code that looks for the last `nn.Linear` still finds it. Hooks
  registered on the replaced module do not carry over: inject before attaching feature taps.
* `alpha` defaults to the rank (scale 1), LoRA's advice to set alpha once and leave it.
* `SupervisedStep` trains what `supervised_parameters` picks: the low-rank factors, the
  normalisation affines (the parameters Tent adapts) when asked to prefer them and the model has
  some, or every parameter (``prefer="all"``); the rest of the model stays frozen. It works on
  inputs (it runs the model), takes cross-entropy on logits for classification and MSE or Huber
  for regression, and never steps faster than `max_learning_rate`.

Labels that come back for a tenth of the samples are few, and each batch of them teaches once.
`SupervisedStep.learn` can make them go further, as rehearsal (experience replay) does in
continual learning: it keeps the last ``replay`` labelled samples and, after the step on a new
batch, takes ``replay_steps`` more on batches drawn from them at random. A model that learns
from a stream of corrupted inputs forgets its training distribution; with ``reference_batch``
every step also takes the loss on that many labelled reference samples (the training
distribution), normalised by the source model's statistics (`source_statistics`), so the weights
stay good for both. On B1's digits stream through the service (BENCHMARKS.md), 10% of the labels
100 samples late: every parameter trained with 10 replay steps over the last 2,000 labels and 256
reference samples a step serves 30.3 to 33.4% error over ten runs on two draws (43.3% and 42.7%
with no labels; the affines alone at lr 0.01, 42.1%), and the clean digits after the stream 2.8
to 4.1% (the source 3.1; in process without the reference samples, 5.1 to 8.1%).

Those steps are many, on few samples each, so the weights they leave depend on which kept
samples the last steps happened to draw: in process, the draws alone moved the stream's error by
up to 4 points. With ``average`` the model serves an exponential moving average of the weights
the steps move (Polyak-Ruppert averaging; the mean teacher of Tarvainen & Valpola, NeurIPS 2017,
and CoTTA's and RoTTA's teachers average the same way), updated after every step with that decay:

    θ_served ← d · θ_served + (1 − d) · θ_moved

The moved weights are kept beside the model and swapped in for the steps (two more copies of
what trains), and whatever else moved the served weights between two labelled batches (a
test-time adapter stepping the same affines) moves both copies alike. At d = 0.9, about the
last ten steps, the same B1 runs through the service served 29.3 to 30.8% error where the
moved weights served 29.4 to 32.4 on the same five draws, and clean digits after the stream 2.1
to 3.3% (2.7 to 4.6): BENCHMARKS.md B1, "The supervised step serves the average of its steps".
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.learner import (
    load_optimizer_tensors,
    optimizer_tensors,
    set_capped_learning_rate,
    step_if_finite,
)
from adapters.task import Task, task_named
from adapters.tta.norm import frozen_statistics, normalisation_affines, source_statistics

PREFERENCES = ("lowrank", "norm", "all")


class LowRankLinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: W x + b + (alpha / r) B A x.

    >>> layer = LowRankLinear(nn.Linear(4, 3), rank=2)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # B = 0 at injection
    True
    >>> [name for name, p in layer.named_parameters() if p.requires_grad]
    ['lora_A', 'lora_B']
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        # the wrapped layer's own parameters: its state-dict keys stay the same
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA and nn.Linear do
        self._initial_A = self.lora_A.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    @torch.no_grad()
    def reset(self) -> None:
        """B = 0 (the source function exactly) and A back to its initial draw."""
        self.lora_B.zero_()
        self.lora_A.copy_(self._initial_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def inject_lowrank(model: nn.Module, rank: int = 4, alpha: float | None = None,
                   layers: int = 1, seed: int | None = 0) -> list[LowRankLinear]:
    """Replace the last `layers` plain `nn.Linear` modules by `LowRankLinear`, in place.

    The original weights are frozen and the outputs are unchanged (B = 0). `seed` fixes the draw
    of A (the global generator is left as it was); None draws from the global generator.
    Returns the new layers, last one last.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4); before = model(x)
    >>> [type(m).__name__ for m in inject_lowrank(model, rank=2)]
    ['LowRankLinear']
    >>> torch.equal(model(x), before), list(model.state_dict())[-2:]
    (True, ['2.lora_A', '2.lora_B'])
    """
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    if lowrank_layers(model):
        raise ValueError("the model already has low-rank adapters; use lowrank_layers(model) "
                         "to reach them, or inject into a fresh copy")
    candidates = [(name, module) for name, module in model.named_modules()
                  if type(module) is nn.Linear and name]
    if len(candidates) < layers:
        raise ValueError(f"asked for adapters on the last {layers} nn.Linear layers, but the "
                         f"model has {len(candidates)} (as child modules)")
    injected = []
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name, module in candidates[-layers:]:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            adapter = LowRankLinear(module, rank=rank, alpha=alpha)
            setattr(parent, attribute, adapter)
            injected.append(adapter)
    return injected


def lowrank_layers(model: nn.Module) -> list[LowRankLinear]:
    """The model's `LowRankLinear` layers in registration order."""
    return [m for m in model.modules() if isinstance(m, LowRankLinear)]


def supervised_parameters(model: nn.Module,
                          prefer: str = "lowrank") -> tuple[list[nn.Parameter], list[str]]:
    """The parameters a supervised step trains, with their names.

    ``prefer="lowrank"``: the low-rank factors when the model has adapters, else the
    normalisation affines; ``prefer="norm"``: the affines when it has normalisation layers, else
    the low-rank factors; ``prefer="all"``: every parameter. Raises when the model has neither
    (or, for ``"all"``, no parameter at all).
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"unknown preference {prefer!r}; choose one of: {', '.join(PREFERENCES)}")
    if prefer == "all":
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameter to train")
        return [p for _, p in named], [name for name, _ in named]
    lowrank = [(f"{name}.{p}", getattr(m, p)) for name, m in model.named_modules()
               if isinstance(m, LowRankLinear) for p in ("lora_A", "lora_B")]
    norm_params, norm_names = normalisation_affines(model)
    norm = list(zip(norm_names, norm_params, strict=True))
    chosen = (lowrank or norm) if prefer == "lowrank" else (norm or lowrank)
    if not chosen:
        raise ValueError("the model has neither low-rank adapters nor normalisation affines to "
                         "train: call inject_lowrank(model) first")
    return [p for _, p in chosen], [name for name, _ in chosen]


@contextlib.contextmanager
def _training_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within this block only `params` of `model` require gradients; the flags are restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for param, _ in flags:
        param.requires_grad_(id(param) in chosen)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


class SupervisedStep:
    """Adam on the supervised loss of labelled inputs, over the parameters it trains only.

    Parameters
    ----------
    model
        The model, with adapters injected (or normalisation layers, with ``prefer="norm"``).
    task
        ``"classification"`` (the model returns logits, labels are class indices) or
        ``"regression"``.
    learning_rate
        Adam's step size.
    prefer
        Which parameters train: see `supervised_parameters`.
    loss
        ``"cross_entropy"`` for classification; ``"mse"`` (default) or ``"huber"`` for regression.
    huber_delta
        The Huber loss's threshold.
    max_learning_rate
        The cap on the learning rate, at construction and in `set_learning_rate`.
    replay
        How many of the last labelled samples `learn` keeps to rehearse (0: none).
    replay_steps
        Steps `learn` takes on batches drawn from the kept samples after each new batch.
    reference
        Labelled samples of the training distribution (inputs, labels), for ``reference_batch``.
    reference_batch
        Reference samples drawn into every step, normalised by the source's statistics (0: none).
    seed
        The seed of the draws from the kept and the reference samples.
    input_shape
        One sample's input shape: with it the ring of kept inputs is allocated now (a ring too
        large for memory fails at start), else at the first batch.
    replay_batch
        Samples in each replay step (None: as many as the new batch). The engine passes its
        batch size, so that a burst of labels learnt at once costs one large step, not
        `replay_steps` of them.
    average
        0: the model serves the weights the steps move. In (0, 1): it serves their exponential
        moving average, updated after every step with this decay (the module docstring says
        why); the moved weights are kept beside it, two more copies of what trains.

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> _ = inject_lowrank(model, rank=2)
    >>> step = SupervisedStep(model, task="regression", learning_rate=1e-2)
    >>> x = torch.randn(64, 3); source = model(x).detach()
    >>> first = step.step(x, source + 1.0)
    >>> last = [step.step(x, source + 1.0) for _ in range(100)][-1]
    >>> last < 0.1 * first, step.steps
    (True, 101)
    >>> step.reset(); torch.equal(model(x), source)
    True
    """

    name: ClassVar[str] = "supervised"

    def __init__(
        self,
        model: nn.Module,
        task: str | Task,
        learning_rate: float = 1e-3,
        prefer: str = "lowrank",
        loss: str | None = None,
        huber_delta: float = 1.0,
        max_learning_rate: float = 1e-2,
        replay: int = 0,
        replay_steps: int = 0,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_batch: int = 0,
        seed: int = 0,
        input_shape: tuple[int, ...] | None = None,
        replay_batch: int | None = None,
        average: float = 0.0,
    ) -> None:
        self.task = task_named(task)
        if not 0.0 <= average < 1.0:
            raise ValueError(f"average is a decay per step in [0, 1), not {average}")
        if replay < 0 or replay_steps < 0 or reference_batch < 0:
            raise ValueError("replay, replay_steps and reference_batch cannot be negative")
        if bool(replay_steps) != bool(replay):
            raise ValueError("replay keeps samples that only replay_steps rehearses, and "
                             "replay_steps needs samples to replay: set both above 0, or neither")
        if reference_batch and (reference is None or not len(reference[0])):
            raise ValueError("reference_batch needs labelled reference samples")
        loss = loss or self.task.losses[0]
        if loss not in self.task.losses:
            raise ValueError(f"loss {loss!r} does not fit {self.task}; choose one of: "
                             f"{', '.join(self.task.losses)}")
        if not 0 < learning_rate <= max_learning_rate:
            raise ValueError(f"learning rate {learning_rate} must be positive and at most the cap "
                             f"{max_learning_rate}")
        self.model = model
        self.loss = loss
        self.huber_delta = huber_delta
        self.max_learning_rate = max_learning_rate
        self.params, self.param_names = supervised_parameters(model, prefer)
        # what `prefer` found: the preferred kind falls back to the other when the model lacks it
        self.trains = "all" if prefer == "all" else (
            "lowrank" if any("lora_" in n for n in self.param_names) else "norm")
        model.requires_grad_(False)
        for param in self.params:
            param.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=learning_rate)
        self._source_params = [p.detach().clone() for p in self.params]
        self._source_optimizer = copy.deepcopy(self.optimizer.state_dict())
        self.steps = 0
        self.skipped = 0  # steps not taken: a loss or gradient not finite
        self.replay = replay
        self.replay_steps = replay_steps
        self.replay_batch = replay_batch
        self.reference = reference if reference_batch else None
        self.reference_batch = reference_batch
        self._generator = torch.Generator().manual_seed(seed)
        # the kept labelled samples: a ring of `replay` rows, the inputs' allocated now where
        # `input_shape` is given, the rest at the first batch
        self._kept_inputs: torch.Tensor | None = None
        self._kept_labels: torch.Tensor | None = None
        self._kept = 0  # rows filled
        self._next = 0  # the row the next sample overwrites
        self._input_shape = input_shape
        self._allocate()
        # with `average`: the weights the steps move and their moving average, as they stood
        # when the last step ended (allocated now, as the ring is, so that a model too large for
        # them fails at start); the model serves the average and what else moved it since
        self.average = average
        self._moved: list[torch.Tensor] | None = None
        self._averaged: list[torch.Tensor] | None = None
        if average:
            self._moved = [p.detach().clone() for p in self.params]
            self._averaged = [p.detach().clone() for p in self.params]
        self._stepping = False

    def _allocate(self) -> None:
        """The ring of kept inputs, where the input shape is known (the labels' at the first
        batch: a class index or a regressor's values, a few numbers a sample)."""
        if self.replay and self._input_shape is not None:
            dtype = next(iter(self.model.parameters())).dtype
            self._kept_inputs = torch.empty((self.replay, *self._input_shape), dtype=dtype)

    def learn(self, inputs: torch.Tensor, labels: torch.Tensor, boost: float = 1.0) -> float:
        """A step on a new labelled batch, then (with `replay`) `replay_steps` steps on batches
        of `replay_batch` samples (or as many as the new batch) drawn from the last `replay`
        labelled ones, this batch's included. Returns the new batch's loss before its step.
        `boost` multiplies the learning rate of all these steps, replays included (capped; the
        engine passes the drift boost as it stood when the new batch's samples were served).
        Replays at the base rate, tried because they draw mostly older labels, served worse:
        B1's labels line 30.6 against 29.8 at the median of five draws, and TrumpApproval in
        runs 1.4% of MAE worse than with the drift policy off, against 4.8% better
        (BENCHMARKS.md B6, "The boost by when a label's sample was served")."""
        rate = self.learning_rate
        if boost != 1.0:
            self.set_learning_rate(rate * boost)
        try:
            with self._moved_weights():
                loss = self.step(inputs, labels)
                if self.replay:
                    self._keep(inputs.detach(), torch.as_tensor(labels).detach())
                    draw = self.replay_batch or len(inputs)
                    for _ in range(self.replay_steps):
                        rows = torch.randperm(self._kept, generator=self._generator)[:draw]
                        assert self._kept_inputs is not None and self._kept_labels is not None
                        self.step(self._kept_inputs[rows], self._kept_labels[rows])
        finally:
            self.set_learning_rate(rate)
        return loss

    @contextlib.contextmanager
    def _moved_weights(self) -> Iterator[None]:
        """With `average`: within this block the model holds the weights the steps move, and
        serves their average again after it. Whatever else moved the served weights since the
        last block (another adapter stepping the same affines) moves both copies by as much, so
        no other learner's step is undone. Without `average`, or within a block: nothing."""
        if self._moved is None or self._averaged is None or self._stepping:
            yield
            return
        self._stepping = True
        with torch.no_grad():
            for param, moved, averaged in zip(self.params, self._moved, self._averaged,
                                              strict=True):
                moved.add_(param.detach() - averaged)
                averaged.copy_(param.detach())
                param.copy_(moved)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, moved, averaged in zip(self.params, self._moved, self._averaged,
                                                  strict=True):
                    moved.copy_(param.detach())
                    param.copy_(averaged)
            self._stepping = False

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        """One Adam step on the loss of the model's outputs for `inputs` against `labels` (plus,
        with `reference_batch`, that of as many reference samples under the source's statistics).

        Returns the loss of `inputs` before the step. Only this step's parameters take gradients
        during it, whatever another adapter sharing the model set (the flags are put back
        afterwards), and robust test-time BN statistics are used but not moved by this forward.
        With `average`, the step moves the weights kept beside the served ones, and the served
        average follows it.
        """
        with self._moved_weights(), torch.enable_grad(), frozen_statistics(self.model), \
                _training_only(self.model, self.params):
            outputs = self.model(inputs)
            loss = self._loss(outputs, labels)
            total = loss
            if self.reference is not None:
                reference_inputs, reference_labels = self.reference
                rows = torch.randint(len(reference_inputs), (self.reference_batch,),
                                     generator=self._generator)
                with source_statistics(self.model):
                    reference_outputs = self.model(reference_inputs[rows])
                total = total + self._loss(reference_outputs, reference_labels[rows])
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            # a loss or gradient that is not finite (a label far out of range) teaches nothing:
            # no step, so the weights and Adam's moments stay as they were
            stepped = step_if_finite(self.optimizer, total)
            if stepped and self._averaged is not None and self._stepping:
                with torch.no_grad():
                    for averaged, param in zip(self._averaged, self.params, strict=True):
                        averaged.lerp_(param.detach(), 1.0 - self.average)
        if stepped:
            self.steps += 1
        else:
            self.skipped += 1
        return loss.item()

    def _keep(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a labelled batch to the ring of kept samples, overwriting the oldest."""
        if self._kept_inputs is None:
            self._kept_inputs = inputs.new_empty((self.replay, *inputs.shape[1:]))
        if self._kept_labels is None:
            self._kept_labels = labels.new_empty((self.replay, *labels.shape[1:]))
        inputs, labels = inputs[-self.replay:], labels[-self.replay:]  # a batch longer than it
        rows = (self._next + torch.arange(len(inputs))) % self.replay
        self._kept_inputs[rows] = inputs.to(self._kept_inputs.dtype)
        self._kept_labels[rows] = labels
        self._next = int(rows[-1] + 1) % self.replay if len(rows) else self._next
        self._kept = min(self._kept + len(rows), self.replay)

    @property
    def kept(self) -> int:
        """Labelled samples kept to replay."""
        return self._kept

    @torch.no_grad()
    def reset(self) -> None:
        """The source function exactly: B = 0 (A as drawn) or the source parameters; fresh Adam;
        no kept samples."""
        for param, source in zip(self.params, self._source_params, strict=True):
            param.copy_(source)
        for layer in lowrank_layers(self.model):
            layer.reset()
        self.optimizer.load_state_dict(copy.deepcopy(self._source_optimizer))
        self.steps = 0
        if self._moved is not None and self._averaged is not None:  # both from the source again
            for param, moved, averaged in zip(self.params, self._moved, self._averaged,
                                              strict=True):
                moved.copy_(param.detach())
                averaged.copy_(param.detach())
        # what was learnt from the kept samples has just been undone: learning it again from
        # them would bring back what the reset was for
        self._kept_labels = None
        self._kept = self._next = 0

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_learning_rate(self, learning_rate: float) -> float:
        """Set Adam's step size within [0, max_learning_rate]; returns the rate in force."""
        return set_capped_learning_rate(self.optimizer, learning_rate, self.max_learning_rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors (as served; with `average`, the moved ones too, as
        ``moved.<name>``, with what else moved the served ones since the last step), Adam's
        moments for them, and the step count."""
        state = {f"param.{name}": p.detach().clone()
                 for name, p in zip(self.param_names, self.params, strict=True)}
        if self._moved is not None and self._averaged is not None:
            state.update({f"moved.{name}": m + (p.detach() - a) for name, p, m, a in zip(
                self.param_names, self.params, self._moved, self._averaged, strict=True)})
        state.update(optimizer_tensors(self.optimizer))
        state["steps"] = torch.tensor(self.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {f"param.{name}" for name in self.param_names}
        missing = own - state.keys()
        if missing:
            raise ValueError(f"{self.name} checkpoint lacks {sorted(missing)[:5]}; was it made "
                             "for this model and these adapters?")
        extra = {key for key in state if key.startswith("param.")} - own
        if extra:  # another `train`: the affines are a subset of every parameter, and Adam's
            # moments are stored by position, so loading them would misplace every moment
            raise ValueError(f"{self.name} checkpoint trains {sorted(extra)[:5]} too: it was "
                             f"made for another supervised.train than {self.trains!r}")
        with torch.no_grad():
            for name, param in zip(self.param_names, self.params, strict=True):
                param.copy_(state[f"param.{name}"])
            # with `average`, the moved weights where the checkpoint has them; else (one of a step
            # without `average`) the next step starts from what is served
            if self._moved is not None and self._averaged is not None:
                moved_kept = all(f"moved.{name}" in state for name in self.param_names)
                for name, param, moved, averaged in zip(self.param_names, self.params,
                                                        self._moved, self._averaged, strict=True):
                    averaged.copy_(param.detach())
                    moved.copy_(state[f"moved.{name}"] if moved_kept else param.detach())
        load_optimizer_tensors(self.optimizer, state)
        self.steps = int(state.get("steps", torch.tensor(0)))

    def describe(self) -> dict[str, object]:
        """What trains, at which rate, and how often it has stepped."""
        return {"name": self.name, "trains": self.trains, "parameters": len(self.params),
                "loss": self.loss, "learning_rate": self.learning_rate, "steps": self.steps,
                "replay": self.replay, "replay_steps": self.replay_steps, "kept": self._kept,
                "reference_batch": self.reference_batch, "average": self.average,
                "skipped": self.skipped}

    def _loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels).to(outputs.device)
        return self.task.loss(outputs, labels, self.loss, self.huber_delta)
