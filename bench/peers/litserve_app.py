"""The LitServe peer: a `LitAPI` with LitServe's batching (64 requests, 5 ms) over a
`bench.peers.models` model.

`POST /predict` takes adaptd's body (`{"inputs": [sample, ...]}`) and answers like adaptd's
`POST /v1/predict`: `{"predictions": [{"prediction": k, "probabilities": [...]}]}`. LitServe
batches requests, not samples, so `batch` concatenates the requests' samples (a request may carry
several) and remembers how many each had; `unbatch` splits the answer back. Run from the peers'
virtual environment with the repository root on PYTHONPATH:

    .bench-peers/bin/python -m bench.peers.litserve_app --model demo --port 8002
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch

from bench.peers.models import classify, load_model


class Classifier(ls.LitAPI):
    def __init__(self, model_name: str, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model_name = model_name

    def setup(self, device: str) -> None:
        self.model = load_model(self.model_name)

    def decode_request(self, request: dict) -> torch.Tensor:
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def batch(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        return torch.cat(inputs), [len(x) for x in inputs]

    def predict(self, batch: tuple[torch.Tensor, list[int]]
                ) -> tuple[list[list[float]], list[int], list[int]]:
        inputs, sizes = batch
        probabilities, predictions = classify(self.model, inputs)
        return probabilities, predictions, sizes

    def unbatch(self, output: tuple[list[list[float]], list[int], list[int]]
                ) -> list[list[dict]]:
        probabilities, predictions, sizes = output
        answers, start = [], 0
        for size in sizes:
            answers.append([{"prediction": k, "probabilities": p} for k, p in
                            zip(predictions[start:start + size],
                                probabilities[start:start + size], strict=True)])
            start += size
        return answers

    def encode_response(self, output: list[dict]) -> dict:
        return {"predictions": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    api = Classifier(args.model, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
