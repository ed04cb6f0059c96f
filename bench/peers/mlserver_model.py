"""The MLServer peer: a custom runtime serving a `bench.peers.models` model over the V2 protocol.

MLServer loads it from a model repository that `bench.serve` writes at run time: `settings.json`
(ports, one process pool worker as by default) and `<model>/model-settings.json`, which names
`bench.peers.mlserver_model.TorchClassifier` as the implementation, `parameters.extra.model` as
the model and turns on adaptive batching (`max_batch_size` 64, `max_batch_time` 0.005 s).

A request is the V2 JSON body: one input, FP32, shape `[n, *sample_shape]`, its data flat (MLServer
merges batched requests and splits the answers by the flat data and the first dimension). The
answer has two outputs, `probabilities` (FP32, `[n, classes]`) and `prediction` (INT64, `[n]`).
"""

from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from bench.peers.models import load_model


class TorchClassifier(MLModel):
    """One model of `bench.peers.models`, chosen by the model settings' `parameters.extra.model`."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        self.model = load_model(extra.get("model", "demo"))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = payload.inputs[0]
        inputs = torch.from_numpy(
            np.asarray(request_input.data.root, dtype=np.float32).reshape(request_input.shape))
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(inputs).float(), dim=1)
        predictions = probabilities.argmax(dim=1)
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(name="probabilities", datatype="FP32",
                               shape=list(probabilities.shape),
                               data=probabilities.flatten().tolist()),
                ResponseOutput(name="prediction", datatype="INT64", shape=[len(predictions)],
                               data=predictions.tolist()),
            ],
        )
