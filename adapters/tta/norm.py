"""Normalisation at test time: the references' batch statistics, and a robust form for a service.

The reference implementations normalise every BatchNorm layer by the statistics of the current
test batch (`use_batch_statistics`). That needs batches of 64 or more; a service answering single
requests would normalise one image by itself. `RobustBatchNorm` keeps an exponential average of
test statistics that starts at the source model's and moves by `momentum` per *sample*, so a batch
of 64 moves it as far as 64 single requests do. It averages the first and second moments, so the
variance it uses includes the spread between samples, which a single sample's own variance lacks.
This follows the robust BN of RoTTA (Yuan et al., CVPR 2023), extended to per-sample momentum.

What the statistics serve does not depend on how requests were batched: each sample of a
served batch is normalised by the average as it stood after that sample (`running`), as if the
samples had come one request at a time, and the average after the batch is the one they would
have left. Until stop 37 a batch was normalised by the average blended with its own statistics
at m = 1 - (1 - momentum)^n: 0.28 of its own at 16 samples, 0.92 at 128, so the batcher's merges
decided how far a batch was normalised by itself. Where classes come in runs a merged batch is
mostly one class, and normalising it by itself is what test-time BN gets wrong there (B1,
Dirichlet(0.1), in process: 29.6% error 16 samples a request against 28.5% one a request;
through the service, whose batcher merged up to eight requests, 32.0% to 32.6% against 29.3%
to 29.5%). What stays per batch: a sample's bound below is taken against the average before the
batch; a batch with a sample that is not finite moves nothing; the forward of an adaptation
step over buffered samples (not served, `commit` off) is normalised by the blend, as the
methods' references normalise a training batch; and a gradient method's weights still move one
step per batch, so what it serves next depends on the batches it stepped on. A second pass over
the batch just served (SAR's, at perturbed weights) replays the statistics it was served with
(`served_statistics`).

One sample's pull on the average is bounded. Its size in a channel is q, the mean over the
channel's positions of (x - mean)^2 / var against the average before it: about 1 for a sample
like the others. Where q passes Q = max(INFLUENCE / momentum, MIN_SPREAD), the sample's
deviation from the mean is scaled by sqrt(Q / q) before it is averaged in, so that one sample
moves a layer's variance by at most momentum x Q of itself (a tenth, or 0.32 at the default
momentum of 0.02, where MIN_SPREAD sets Q), and its mean by at most momentum x sqrt(Q) standard
deviations. Without the bound, one digit image with a single pixel of 1e3 (accepted: finite,
and far below the overflow bound on inputs) threw the demo CNN's error from 2% to 85-93% for the
next 300 single requests. On B1's stream, every switch of corruption included, q's largest
values over 10,000 samples were 15, 29 and 67 in the three layers and its 99.9th percentiles 5
to 11, against Q = 16, 16 and 50 at their graded momenta: fewer than one sample in 1,000 is
scaled, and the errors served did not move (BENCHMARKS.md, B1). An abrupt shift that moves every
sample still moves the average geometrically: each sample may widen the variance by a share of
itself, so the average catches up within tens of samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

MOMENTUM_SCALE = "test_momentum_scale"  # the attribute `grade_momenta` sets on a BatchNorm layer
INFLUENCE = 0.1  # the most of a layer's variance one sample may add to it (at its momentum)
MIN_SPREAD = 16.0  # a sample within 4 standard deviations is never scaled, whatever the momentum


class RobustBatchNorm(nn.Module):
    """BatchNorm that normalises by source statistics blended with an average of test statistics.

    `commit` decides whether a forward pass updates the average (predictions do; the extra forward
    that an adaptation step takes over buffered samples does not, so no sample counts twice). A
    committed batch is normalised sample by sample, each by the average as it stood after it
    (`running`). A batch whose mean or second moment is not finite leaves the average as it was
    and is normalised by it.

    >>> bn = nn.BatchNorm1d(2).eval()
    >>> robust = RobustBatchNorm(bn, momentum=0.5)
    >>> _ = robust(torch.tensor([[4.0, -4.0]]))
    >>> robust.mean.tolist()
    [2.0, -2.0]
    """

    # buffers, registered in __init__
    source_mean: torch.Tensor
    source_square: torch.Tensor
    mean: torch.Tensor
    square: torch.Tensor
    # registered by `keep_class_statistics` only
    class_mean: torch.Tensor
    class_square: torch.Tensor
    class_weight: torch.Tensor

    def __init__(self, bn: _BatchNorm, momentum: float = 0.02) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("robust test-time BN needs the source model's running statistics")
        self.num_features = bn.num_features
        self.eps = bn.eps
        # `grade_momenta` may have set a layer's share of the momentum (1 when it has not)
        self.momentum = momentum * float(getattr(bn, MOMENTUM_SCALE, 1.0))
        self.weight = bn.weight
        self.bias = bn.bias
        self.commit = True
        # None: move by `momentum` per sample of the batch; a number: by exactly that much (0 for
        # a layer whose averages something else moves: `adapters.tta.balanced`, RoTTA's memory)
        self.fixed_momentum: float | None = None
        # True within `source_statistics`: normalise by the source's statistics alone
        self.source_only = False
        # per-sample statistics of the last committed forward, kept for `BalancedStatistics`
        # (which turns this on with `keep_class_statistics`) to file under each sample's class
        self.captured: tuple[torch.Tensor, torch.Tensor] | None = None
        # with `watch`, each sample's shift of the last committed forward over positions: the
        # median over the channels of log q, q its spread about the average against the
        # average's variance (`shifts`); the class-run filter reads it to tell a shift of the
        # inputs from a run of one class
        self.watch = False
        self.shift: torch.Tensor | None = None
        # the statistics each sample of the last committed forward was normalised by, (n, C)
        # each; within `served_statistics` (`replay`) a forward over the same batch uses them
        self.served: tuple[torch.Tensor, torch.Tensor] | None = None
        self.replay = False
        self.classes = 0
        mean = bn.running_mean.detach().clone()
        square = bn.running_var.detach().clone() + mean**2
        self.register_buffer("source_mean", mean.clone())
        self.register_buffer("source_square", square.clone())
        self.register_buffer("mean", mean)
        self.register_buffer("square", square)

    def keep_class_statistics(self, classes: int) -> None:
        """Hold `classes` class-wise averages, starting at the source's, and their mixing weights
        as buffers (so checkpoints carry them); `adapters.tta.balanced` moves them."""
        self.classes = classes
        self.register_buffer("class_mean", self.source_mean.repeat(classes, 1))
        self.register_buffer("class_square", self.source_square.repeat(classes, 1))
        self.register_buffer("class_weight", torch.full((classes,), 1.0 / classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_only:
            return self._normalise(x, self.source_mean, self.source_square)
        if self.replay and self.served is not None and len(self.served[0]) == x.shape[0]:
            # the statistics this batch was served with (`served_statistics`): a second pass
            # over the same samples, as SAR's at perturbed weights, normalised as the first
            return self._normalise(x, *self.served)
        m = (1.0 - (1.0 - self.momentum) ** x.shape[0] if self.fixed_momentum is None
             else self.fixed_momentum)
        capture = bool(self.classes and self.commit and self.captured is None)
        if m == 0.0 and not capture:  # the batch counts for nothing: normalised by the average
            return self._normalise(x, self.mean, self.square)
        spatial = list(range(2, x.dim()))
        first = x.mean(spatial) if spatial else x
        second = (x * x).mean(spatial) if spatial else x * x
        raw = (first.detach(), second.detach())
        # only where the layer averages over positions: its statistics then describe how inputs
        # look (noise, blur, contrast); one value per sample and channel (a BatchNorm1d over
        # features) moves with the class as much (`normalises_over_positions`)
        watched = self.watch and self.commit and math.prod(x.shape[2:]) > 1
        # each sample's first and second moments per channel, as the average counts them
        first, second = self.bounded(first, second)
        if capture:
            self.captured = (first.detach(), second.detach())
        if self.commit and self.fixed_momentum is None and x.shape[0] > 1:
            # served: each sample by the average as it stood after it, as if the samples had
            # come one at a time (`running`), so that how the batcher merged requests changes
            # nothing the statistics serve; a batch with a sample that is not finite neither
            # moves the average nor takes part in the normalisation, as below
            means, squares = self.running(first, second)
            finite = torch.isfinite(means[-1]).all() & torch.isfinite(squares[-1]).all()
            means = torch.where(finite, means, self.mean)
            squares = torch.where(finite, squares, self.square)
            if watched:  # each against the average as it stood before it
                self.shift = self.shifts(
                    *raw, torch.cat([self.mean[None], means[:-1].detach()]),
                    torch.cat([self.square[None], squares[:-1].detach()]))
            self.served = (means.detach(), squares.detach())
            self.mean.copy_(means[-1].detach())
            self.square.copy_(squares[-1].detach())
            return self._normalise(x, means, squares)
        if watched:
            self.shift = self.shifts(*raw)
        batch_mean = first.mean(0)
        batch_square = second.mean(0)
        mean = (1.0 - m) * self.mean + m * batch_mean
        square = (1.0 - m) * self.square + m * batch_square
        # a batch whose statistics are not finite (an overflowing sample) neither moves the
        # average nor takes part in the normalisation: the layer uses its average as it was,
        # so the other samples of the batch are normalised as if it had not come
        finite = torch.isfinite(mean).all() & torch.isfinite(square).all()
        mean = torch.where(finite, mean, self.mean)
        square = torch.where(finite, square, self.square)
        if self.commit:
            self.served = (mean.detach()[None], square.detach()[None])
            self.mean.copy_(mean.detach())
            self.square.copy_(square.detach())
        return self._normalise(x, mean, square)

    def running(self, first: torch.Tensor, second: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The average after each sample of a batch, (n, C) each, as `momentum` per sample
        moves it when the samples come one at a time: after sample k,

            a_k = (1 − μ)^(k+1) · a + Σ_{j ≤ k} μ (1 − μ)^(k−j) · x_j,

        from cumulative sums over stretches short enough that (1 − μ)^−length stays far from
        overflowing (float64; about 2,500 samples at μ = 0.02)."""
        momentum = self.momentum
        n = first.shape[0]
        dtype = torch.result_type(first, self.mean)
        if momentum <= 0.0:
            return self.mean.expand(n, -1).to(dtype), self.square.expand(n, -1).to(dtype)
        if momentum >= 1.0:  # the average is the last sample
            return first.to(dtype), second.to(dtype)
        # in float64 (float32 where a device has none), (1 − μ)^−k up to e^50 (e^15) a stretch
        wide = torch.float32 if first.device.type == "mps" else torch.float64
        stretch = max(1, int((50.0 if wide == torch.float64 else 15.0) / -math.log1p(-momentum)))
        moments = torch.cat([first, second], 1).to(wide)
        state = torch.cat([self.mean, self.square]).to(wide)
        out = []
        for start in range(0, n, stretch):
            part = moments[start:start + stretch]
            steps = torch.arange(1, len(part) + 1, dtype=wide, device=part.device)
            decay = torch.pow(1.0 - momentum, steps)
            sums = torch.cumsum(part * (momentum / decay)[:, None], 0)
            averages = decay[:, None] * (state + sums)
            out.append(averages)
            state = averages[-1]
        averages = torch.cat(out).to(dtype)
        return averages[:, :first.shape[1]], averages[:, first.shape[1]:]

    def bounded(self, first: torch.Tensor, second: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's moments per channel, (n, C) each, as the average counts them: a sample
        whose spread q about the average passes Q has its deviation from the mean scaled down
        to a spread of Q (the module's docstring). From the moments alone, comparing the
        sample's mean squared deviation with Q x var rather than dividing, so that no finite
        input overflows it; a sample whose moments are not finite is left as it is (the
        batch's statistics are then not finite, and `forward` keeps the average). The scale is
        a weight, not learnt through: a gradient step sees the sample as counted. On a GPU no
        branch on the values, which would make it wait for them."""
        mean = self.mean
        squared = mean * mean
        allowed = max(INFLUENCE / max(self.momentum, 1e-12), MIN_SPREAD) * (
            (self.square - squared).clamp_min(0.0) + self.eps)
        deviation = first - mean
        # the mean over the sample's positions of (x − mean)², from its moments
        spreads = (second - 2.0 * mean * first + squared).clamp_min(0.0)
        wide = spreads > allowed  # False where not finite (NaN), so such a sample stays as is
        if first.device.type == "cpu" and not bool(wide.any()):
            return first, second  # the usual case, where asking costs nothing
        scale = torch.sqrt(allowed / torch.where(wide, spreads, allowed)).detach()
        moved = scale * deviation
        return (torch.where(wide, mean + moved, first),
                torch.where(wide, squared + 2.0 * mean * moved + scale * scale * spreads,
                            second))

    def shifts(self, first: torch.Tensor, second: torch.Tensor,
               mean: torch.Tensor | None = None, square: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Each sample's shift against the average before it, (n,): the median over channels of
        log q, q the mean over the sample's positions of (x − mean)² / var (from its moments,
        as `bounded` has it). About 0 for a sample like those the average has seen, whatever its
        class where the layer holds little of the class; far from 0 (either way: a noisier or a
        flatter input) for the first samples after the inputs change, until the average has
        caught up. Not finite where the sample's moments are not. Against the average as it
        stands, or against `mean` and `square`, one row a sample (the average before each)."""
        mean = self.mean if mean is None else mean
        square = self.square if square is None else square
        var = (square - mean * mean).clamp_min_(0.0).add_(self.eps)
        deviation = first - mean
        # the mean of (x − mean)² over the positions: the sample's own variance and its offset
        spreads = (second - first * first).clamp_min_(0.0).addcmul_(deviation, deviation)
        # the median of log q is the log of q's median (the log keeps the order): one log a sample
        return torch.log(spreads.add_(self.eps).div_(var).median(1).values).float()

    def _normalise(self, x: torch.Tensor, mean: torch.Tensor, square: torch.Tensor
                   ) -> torch.Tensor:
        """x by one average (C,) or one per sample (n, C)."""
        var = (square - mean * mean).clamp_min(0.0)
        trailing = (1,) * (x.dim() - 2)
        shape = (1 if mean.dim() == 1 else x.shape[0], -1) + trailing
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            weights = (1, -1) + trailing
            out = out * self.weight.view(weights) + self.bias.view(weights)
        return out

    def reset_statistics(self) -> None:
        self.mean.copy_(self.source_mean)
        self.square.copy_(self.source_square)
        self.captured = None
        self.served = None
        if self.classes:
            self.class_mean.copy_(self.source_mean.expand_as(self.class_mean))
            self.class_square.copy_(self.source_square.expand_as(self.class_square))
            self.class_weight.fill_(1.0 / self.classes)


def use_robust_statistics(model: nn.Module, momentum: float = 0.02) -> nn.Module:
    """Replace every BatchNorm layer that has running statistics by a `RobustBatchNorm` that
    shares its affine parameters (one without them, `track_running_stats=False`, normalises by
    its batch as it did in the model, and stays as it is)."""
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm) and child.running_mean is not None \
                and child.running_var is not None:
            setattr(model, name, RobustBatchNorm(child, momentum))
        else:
            use_robust_statistics(child, momentum)
    return model


@torch.no_grad()
def class_run_scales(model: nn.Module, inputs: torch.Tensor, classes: torch.Tensor | None = None,
                     batch: int = 256) -> list[float]:
    """Each BatchNorm layer's momentum scale, so that a run of one class drags every layer's
    test statistics about equally far.

    On in-distribution inputs (the reference data) with their classes (the labels, or the
    model's own predictions), a layer's class sensitivity is how far the statistics of one
    class sit from the layer's running statistics, in its own standard deviations:

        s_l = mean over classes k and channels c of (mu_lkc - mu_lc)^2 / var_lc

    (mu_lkc: the mean over class k's samples of their per-channel means). A run of L samples
    of one class moves an average with momentum m by about (m L)^2 s_l in those units, so with

        m_l = m · sqrt(min_j s_j / s_l)

    every layer drifts as far as the least class-bound one: the first layers, which carry the
    corruption and little of the class, keep the full momentum; the last, whose statistics
    are mostly the class, move slowly. On the demo CNN the scales are 1, 0.44 and 0.10.
    Returns one scale per BatchNorm layer with running statistics, in module order (all 1
    when fewer than two classes have samples; 1 for a layer that the forward does not reach
    exactly once per sample, which cannot be measured).
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None
              and m.running_var is not None]
    if not layers or len(inputs) == 0:
        return [1.0] * len(layers)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def keep(index: int):  # noqa: ANN202 - a forward pre-hook
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            spatial = list(range(2, x.dim()))
            captured[index].append((x.mean(spatial) if spatial else x).float())
        return hook

    handles = [layer.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        outputs = torch.cat([model(inputs[i:i + batch]).float().reshape(
            len(inputs[i:i + batch]), -1) for i in range(0, len(inputs), batch)])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    labels = (outputs.argmax(1) if classes is None else classes.long()).reshape(-1)
    present = [k for k in labels.unique().tolist() if int((labels == k).sum()) >= 2]
    if len(present) < 2:
        return [1.0] * len(layers)
    sensitivity = []
    for index, layer in enumerate(layers):
        rows = sum(len(c) for c in captured[index])
        if rows != len(labels):  # never reached, or reached twice per sample
            sensitivity.append(0.0)
            continue
        means = torch.cat(captured[index])
        assert layer.running_mean is not None and layer.running_var is not None
        var = layer.running_var.float() + layer.eps
        centre = layer.running_mean.float()
        per_class = torch.stack([means[labels == k].mean(0) for k in present])
        sensitivity.append(float(((per_class - centre) ** 2 / var).mean()))
    floor = min(s for s in sensitivity if s > 0) if any(s > 0 for s in sensitivity) else 0.0
    return [1.0 if s <= 0 else math.sqrt(floor / s) for s in sensitivity]


def normalises_over_positions(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether a BatchNorm layer of `model` (with running statistics) normalises over positions:
    each sample brings it more than one value per channel (a BatchNorm2d or 3d after a
    convolution, or a BatchNorm1d over a sequence), so its statistics average every pixel or step
    of a sample. One forward pass of zeros in eval mode tells (no statistic moves, and every
    module's mode is put back). Layers already wrapped for test time (`RobustBatchNorm`) are not
    BatchNorm layers here: ask before wrapping.

    Those statistics describe how inputs look (noise, blur, contrast: the covariate shifts that
    test-time BatchNorm corrects); a BatchNorm1d over features, as in a tabular MLP, or a
    BatchNorm2d on a 1x1 map, averages one value per sample and channel, which moves with the
    class mix and the concept as much as with the inputs' look.

    >>> conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> mlp = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    >>> normalises_over_positions(conv, (1, 5, 5)), normalises_over_positions(mlp, (4,))
    (True, False)
    """
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return False
    per_channel: list[int] = []

    def record(_: nn.Module, __: object, output: torch.Tensor) -> None:
        per_channel.append(output[0, 0].numel() if output.dim() > 2 else 1)

    hooks = [m.register_forward_hook(record) for m in layers]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    return any(count > 1 for count in per_channel)


def grade_momenta(model: nn.Module, scales: list[float] | None) -> None:
    """Mark each BatchNorm layer with its momentum scale (`class_run_scales`); the robust
    layers that replace them, and every copy made of them, move by momentum x scale. None
    takes the marks off (a module built before, by another engine, keeps none)."""
    layers = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if scales is None:
        for layer in layers:
            if hasattr(layer, MOMENTUM_SCALE):
                delattr(layer, MOMENTUM_SCALE)
        return
    if len(layers) != len(scales):
        raise ValueError(f"{len(scales)} momentum scales for {len(layers)} BatchNorm layers")
    for layer, scale in zip(layers, scales, strict=True):
        setattr(layer, MOMENTUM_SCALE, scale)


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """The references' choice: normalise by the current batch only, running buffers dropped."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.train()
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return model


NORMS = ("robust", "balanced", "batch", "source")
# the buffers that hold test-time statistics (what a checkpoint of the statistics carries)
STATISTICS_BUFFERS = (".mean", ".square", ".class_mean", ".class_square", ".class_weight")


def configure_norm(model: nn.Module, norm: str, momentum: float = 0.02) -> nn.Module:
    """Evaluation mode everywhere (no dropout noise), then the chosen test-time statistics:
    `balanced` is robust BN whose forward never moves its averages (`adapters.tta.balanced.
    BalancedStatistics` moves them, class by class, after each prediction)."""
    model.eval()
    if norm == "robust":
        return use_robust_statistics(model, momentum)
    if norm == "balanced":
        use_robust_statistics(model, momentum)
        for layer in model.modules():
            if isinstance(layer, RobustBatchNorm):
                layer.fixed_momentum = 0.0  # a commit moves nothing; it keeps per-sample stats
        return model
    if norm == "batch":
        return use_batch_statistics(model)
    if norm == "source":
        return model
    raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")


class frozen_statistics:
    """Within this block, robust BN layers use but do not update their averages. With
    `own_batch=False` they also leave the batch's own statistics out of its normalisation: what
    an adapter's `infer` serves (rows that teach nothing, such as repeats) is normalised by the
    averages as the stream left them, so a batch of one image sent 16 times is not normalised
    by that image."""

    def __init__(self, model: nn.Module, own_batch: bool = True) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]
        self.own_batch = own_batch
        self.kept: list[tuple[bool, float | None]] = []

    def __enter__(self) -> None:
        self.kept = [(layer.commit, layer.fixed_momentum) for layer in self.layers]
        for layer in self.layers:
            layer.commit = False
            if not self.own_batch:
                layer.fixed_momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for layer, (commit, fixed) in zip(self.layers, self.kept, strict=True):
            layer.commit, layer.fixed_momentum = commit, fixed


class served_statistics:
    """Within this block, a forward over the batch that robust BN layers last served normalises
    each sample by the statistics it was served with, and moves nothing: a second pass over the
    same samples, as SAR's at perturbed weights, sees them normalised as the first did. Layers
    that were not committing (inside `frozen_statistics`: the pass over a buffer) stay as they
    are, whose first pass was normalised as the second will be."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]
        self.kept: list[tuple[bool, bool]] = []

    def __enter__(self) -> None:
        self.kept = [(layer.commit, layer.replay) for layer in self.layers]
        for layer in self.layers:
            layer.replay = layer.commit
            layer.commit = False

    def __exit__(self, *exc: object) -> None:
        for layer, (commit, replay) in zip(self.layers, self.kept, strict=True):
            layer.commit, layer.replay = commit, replay


class source_statistics:
    """Within this block, robust BN layers normalise by the source model's statistics alone and
    move nothing: samples from the training distribution (the reference data) are normalised as
    the source model normalised them, whatever the stream has moved the averages to. Other layers
    are left as they are: a plain BatchNorm in eval mode already uses the source's, one in train
    mode (`use_batch_statistics`, adapter.norm = "batch") normalises each batch by itself.

    >>> robust = RobustBatchNorm(nn.BatchNorm1d(2).eval(), momentum=0.5)
    >>> _ = robust(torch.tensor([[4.0, -4.0]]))  # the average moves to [2, -2]
    >>> with source_statistics(robust):
    ...     robust(torch.tensor([[0.0, 0.0]])).tolist(), robust.mean.tolist()
    ([[0.0, 0.0]], [2.0, -2.0])
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, RobustBatchNorm)]

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.source_only = True

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.source_only = False


NORM_LAYERS = (_BatchNorm, RobustBatchNorm, nn.LayerNorm, nn.GroupNorm)


def normalisation_affines(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The affine weight and bias of every normalisation layer, with their qualified names."""
    params, names = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for param_name in ("weight", "bias"):
                param = getattr(module, param_name, None)
                if isinstance(param, nn.Parameter):
                    params.append(param)
                    names.append(f"{module_name}.{param_name}")
    return params, names
