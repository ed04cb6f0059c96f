"""A hand-written FastAPI endpoint, no batching: the floor a serving framework is measured from.

`POST /v1/predict` takes adaptd's body (`{"inputs": [sample, ...]}`, each sample nested to the
model's input shape) and answers `{"predictions": [{"prediction": k, "probabilities": [...]}]}`:
the body parsed with orjson, one forward pass per request on the event loop, nothing else (no ids,
no sets, no store, no metrics). Run from adaptd's virtual environment, so that it has the same
FastAPI, uvicorn and torch as adaptd:

    python -m bench.peers.fastapi_app --model demo --port 8001
"""

from __future__ import annotations

import argparse

import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from bench.peers.models import classify, load_model


def create_app(model_name: str) -> FastAPI:
    model = load_model(model_name)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        inputs = torch.tensor(orjson.loads(await request.body())["inputs"], dtype=torch.float32)
        probabilities, predictions = classify(model, inputs)
        answer = {"predictions": [{"prediction": k, "probabilities": p}
                                  for k, p in zip(predictions, probabilities, strict=True)]}
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
