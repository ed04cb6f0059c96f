"""Robust test-time BatchNorm serves a batch as it would serve its samples one at a time."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn as nn

from adapters.tta.norm import RobustBatchNorm, frozen_statistics, served_statistics
from service.demo import digits_split
from tests.harness import serving


def _layer(bn: nn.Module, momentum: float, spread: bool = True) -> RobustBatchNorm:
    torch.manual_seed(0)
    if spread:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return RobustBatchNorm(bn.eval(), momentum=momentum)


# samples like the average (none is scaled by the bound on a sample's pull, which is taken
# against the average before the batch); 600 samples at a momentum of 0.1 cross the stretches
# `running` sums over (474 samples)
@pytest.mark.parametrize(("shape", "momentum"), [((64, 3, 5, 5), 0.02), ((600, 2, 3, 3), 0.1),
                                                 ((48, 4), 0.02), ((8, 2, 3, 3), 1.0)])
def test_a_batch_is_normalised_as_its_samples_one_at_a_time(shape, momentum):
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    batched, alone = _layer(bn, momentum), _layer(bn, momentum)
    batched.watch = alone.watch = True
    x = torch.randn(*shape) * 0.8 + 0.2
    out = batched(x)
    one_by_one = [alone(x[i:i + 1]) for i in range(len(x))]
    torch.testing.assert_close(out, torch.cat(one_by_one), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.mean, alone.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.square, alone.square, rtol=1e-5, atol=1e-6)
    if len(shape) == 4:  # a layer over positions reports each sample's shift
        assert alone.shift is not None and batched.shift is not None
        assert batched.shift.shape == (len(x),)
        torch.testing.assert_close(batched.shift[-1:], alone.shift, rtol=1e-4, atol=1e-5)


def test_the_first_sample_of_a_batch_is_normalised_almost_by_the_average_alone():
    """Before, a batch of 128 was normalised by 0.92 of its own statistics; now its first sample
    by 0.02 of its own and 0.98 of the average, as a single request."""
    layer = _layer(nn.BatchNorm1d(2), 0.02, spread=False)  # mean 0, variance 1
    x = torch.full((128, 2), 2.0)  # a run of one value, two standard deviations off
    out = layer(x)
    single = _layer(nn.BatchNorm1d(2), 0.02, spread=False)
    torch.testing.assert_close(out[:1], single(x[:1]))
    # served by the average it left, 0.02 of the way: (2 − 0.04) / sqrt(0.98 + 0.02 · 4 − 0.04²)
    torch.testing.assert_close(out[0], torch.full((2,), 1.96 / (1.0584 + 1e-5) ** 0.5))
    # the average moves by 1 − 0.98^128 of the way, as 128 single requests move it
    torch.testing.assert_close(layer.mean, torch.full((2,), 2.0 * (1 - 0.98 ** 128)))


def test_an_adaptation_steps_forward_is_normalised_by_the_blend_and_moves_nothing():
    layer = _layer(nn.BatchNorm1d(2), 0.02)
    mean = layer.mean.clone()
    layer.commit = False
    x = torch.randn(16, 2) * 0.5 + 0.5
    out = layer(x)
    m = 1 - 0.98 ** 16
    blend_mean = (1 - m) * mean + m * x.mean(0)
    blend_square = (1 - m) * layer.square + m * (x * x).mean(0)
    expected = (x - blend_mean) / torch.sqrt(blend_square - blend_mean**2 + layer.eps)
    expected = expected * layer.weight + layer.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.mean, mean)


def test_the_service_serves_the_same_answers_whether_requests_come_alone_or_together():
    """The demo model under the default adapter: 48 digits as three requests of 16, and the same
    digits as 48 requests of one, to two fresh services."""
    _, _, x_test, _ = digits_split()
    x = x_test[:48]

    async def serve(size: int) -> np.ndarray:
        async with serving(batcher={"max_wait_ms": 0}) as (client, _):
            rows = []
            for start in range(0, len(x), size):
                reply = await client.post("/v1/predict",
                                          json={"inputs": x[start:start + size].tolist()})
                assert reply.status_code == 200
                rows += reply.json()["predictions"]
            return np.array([row["probabilities"] for row in rows])

    together, alone = asyncio.run(serve(16)), asyncio.run(serve(1))
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_a_second_pass_over_the_served_batch_is_normalised_as_the_first():
    """SAR's pass at perturbed weights compares losses under the same normalisation."""
    layer = _layer(nn.BatchNorm2d(3), 0.02)
    x = torch.randn(32, 3, 4, 4) * 0.8 + 0.2
    first = layer(x)
    mean = layer.mean.clone()
    with served_statistics(layer):
        again = layer(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.equal(layer.mean, mean)  # nothing moved
    # inside a pass over a buffer (not committing) the second pass is the first's blend
    with frozen_statistics(layer):
        buffered = layer(x)
        with served_statistics(layer):
            torch.testing.assert_close(layer(x), buffered, rtol=0, atol=0)
    # a batch of another size is not the one served: the average, moving nothing
    with served_statistics(layer):
        other = layer(x[:5])
    assert torch.equal(layer.mean, mean) and other.shape == (5, 3, 4, 4)


def test_half_precision_inputs_move_a_float32_average_in_float32():
    batched = _layer(nn.BatchNorm1d(3), 0.02)
    alone = _layer(nn.BatchNorm1d(3), 0.02)
    x = (torch.randn(64, 3) * 0.5 + 0.3).to(torch.bfloat16)
    batched(x)
    for i in range(len(x)):
        alone(x[i:i + 1])
    assert batched.mean.dtype == torch.float32
    torch.testing.assert_close(batched.mean, alone.mean, rtol=1e-3, atol=1e-4)
