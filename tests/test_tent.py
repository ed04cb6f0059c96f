"""Tent adapts only normalisation affines, predicts before it steps, and resets bit for bit."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.nn as nn

from adapters import Tent, softmax_entropy
from service.demo import digits_cnn, digits_split
from service.model import load_model
from tests.harness import metric, serving, settings_for


def shifted_digits(count: int, seed: int = 0) -> np.ndarray:
    _, _, x_test, _ = digits_split()
    rng = np.random.default_rng(seed)
    noisy = x_test[:count] + rng.normal(0, 0.3, size=x_test[:count].shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def test_tent_returns_the_outputs_of_the_forward_before_its_step():
    torch.manual_seed(0)
    model = digits_cnn()
    x = torch.from_numpy(shifted_digits(32))
    tent = Tent(model, norm="batch")
    with torch.no_grad():
        before = model(x)
    result = tent.adapt(x)
    torch.testing.assert_close(result.outputs, before, rtol=0, atol=0)
    assert result.loss == float(softmax_entropy(before).mean())
    with torch.no_grad():
        after = model(x)
    assert float(softmax_entropy(after).mean()) < result.loss


def test_tent_trains_only_normalisation_affines_with_adam_at_the_reference_defaults():
    model = digits_cnn()
    tent = Tent(model, norm="batch")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
             for p in ("weight", "bias")}
    assert trainable == norms == set(tent.param_names)
    assert isinstance(tent.optimizer, torch.optim.Adam)
    group = tent.optimizer.param_groups[0]
    assert (group["lr"], group["betas"]) == (1e-3, (0.9, 0.999))
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_tent_checkpoint_restores_parameters_and_optimizer_moments():
    source_state = digits_cnn().state_dict()
    tent = Tent(_with_state(source_state))
    for seed in range(3):  # whole adapt batches: nothing waits in the (unsaved) buffer
        tent.adapt(torch.from_numpy(shifted_digits(64, seed)))
    saved = tent.state_dict()
    clone = Tent(_with_state(source_state))
    clone.load_state_dict(saved)
    x = torch.from_numpy(shifted_digits(64, seed=9))
    torch.testing.assert_close(clone.adapt(x).outputs, tent.adapt(x).outputs, rtol=0, atol=0)
    for a, b in zip(clone.params, tent.params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _with_state(state: dict[str, torch.Tensor]) -> nn.Module:
    model = digits_cnn()
    model.load_state_dict(state)
    return model


def test_tent_through_the_service_changes_bn_affines_only_and_reset_restores_the_source():
    settings = settings_for(adapter={"name": "tent", "norm": "batch"}, batcher={"max_wait_ms": 0})
    source = load_model(settings.model).module.state_dict()
    stream = shifted_digits(256)

    async def scenario():
        async with serving(settings) as (client, app):
            first = await client.post("/v1/predict", json={"inputs": stream[:32].tolist()})
            for start in range(32, 256, 32):
                reply = await client.post("/v1/predict",
                                          json={"inputs": stream[start:start + 32].tolist()})
                assert reply.status_code == 200
            adapted = {k: v.clone() for k, v in app.state.runtime.model.module.state_dict().items()}
            state = (await client.get("/v1/state")).json()
            steps = metric(app, "adaptd_adaptation_steps_total")
            reset = await client.post("/v1/admin/reset")
            module = app.state.runtime.model.module
            restored = {k: v.clone() for k, v in module.state_dict().items()}
            again = await client.post("/v1/predict", json={"inputs": stream[:32].tolist()})
            return first.json(), adapted, state, steps, reset.json(), restored, again.json()

    first, adapted, state, steps, reset, restored, again = asyncio.run(scenario())
    assert steps == 8 and state["adapter"]["steps"] == 8 and state["adapter"]["name"] == "tent"
    assert state["adapter"]["backward_samples"] == 256
    changed = {k for k in adapted if not torch.equal(adapted[k], source[k])}
    affines = {k for k in source if k.split(".")[-1] in ("weight", "bias")
               and isinstance(digits_cnn()[int(k.split(".")[0])], nn.BatchNorm2d)}
    assert set(adapted) < set(source), "batch statistics drop the running buffers"
    assert changed == affines, f"changed {sorted(changed)}, expected the BN affines only"
    # the running buffers are gone by design (batch statistics); all else is bit-identical
    for key, value in restored.items():
        assert torch.equal(value, source[key]), key
    assert reset["steps"] == 0
    # after the reset the same batch gives the same outputs as the very first one did
    for row_before, row_after in zip(first["predictions"], again["predictions"], strict=True):
        np.testing.assert_array_equal(row_before["probabilities"], row_after["probabilities"])
    assert again["predictions"][0]["adapter_version"] > first["predictions"][0]["adapter_version"]


def test_single_requests_are_buffered_into_one_step_per_adapt_batch_with_robust_statistics():
    model = digits_cnn()
    tent = Tent(model, adapt_batch_size=16)
    stream = torch.from_numpy(shifted_digits(40))
    stepped = [tent.adapt(stream[i:i + 1]).stepped for i in range(40)]
    assert [i for i, s in enumerate(stepped) if s] == [15, 31]
    assert tent.steps == 2 and tent.backward_samples == 32 and tent.buffered == 8
    # infer neither steps nor moves the statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tent.infer(stream[:4])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_through_the_service_with_robust_statistics_reset_restores_weights_and_statistics():
    settings = settings_for(adapter={"name": "tent"}, batcher={"max_wait_ms": 0})
    stream = shifted_digits(160)

    async def scenario():
        async with serving(settings) as (client, app):
            module = app.state.runtime.model.module
            source = {k: v.clone() for k, v in module.state_dict().items()}
            for i in range(160):
                reply = await client.post("/v1/predict", json={"inputs": stream[i:i + 1].tolist()})
                assert reply.status_code == 200
            adapted = {k: v.clone() for k, v in module.state_dict().items()}
            state = (await client.get("/v1/state")).json()
            await client.post("/v1/admin/reset")
            return source, adapted, state, dict(module.state_dict())

    source, adapted, state, restored = asyncio.run(scenario())
    assert state["adapter"]["steps"] == 2 and state["adapter"]["backward_samples"] == 128
    changed = {k for k in source if not torch.equal(source[k], adapted[k])}
    assert {k.rsplit(".", 1)[1] for k in changed} == {"weight", "bias", "mean", "square"}
    assert all(torch.equal(restored[k], source[k]) for k in source)


def test_the_learning_rate_never_exceeds_its_cap_and_a_reset_restores_the_base_rate():
    tent = Tent(digits_cnn(), learning_rate=1e-3, max_learning_rate=4e-3)
    assert tent.set_learning_rate(3e-3) == 3e-3
    assert tent.set_learning_rate(1.0) == 4e-3
    assert tent.set_learning_rate(-1.0) == 0.0
    tent.reset()
    assert tent.learning_rate == 1e-3
