"""NVIDIA's own client, `tritonclient.http` as PyPI ships it, unchanged, against `adaptd serve`
(issue 15): the server live and ready, the model's metadata, inference with JSON and with raw
tensors, outputs picked by name, and labels for the returned ids joined through the feedback
extension, as docs/http-api.md shows it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils as utils

from service.demo import digits_split
from tests.harness import running_service

pytestmark = pytest.mark.slow

_, _, X_TEST, Y_TEST = digits_split()
MODEL = "digits-cnn"
DOCS = Path(__file__).parents[1] / "docs" / "http-api.md"
EXAMPLE_MARK = "<!-- tritonclient example"


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """`adaptd serve` with a token, as docs/http-api.md starts it, on a free port."""
    with running_service({"ADAPTD_API_TOKEN": "s3cret"}) as port:
        yield port


@pytest.fixture(scope="module")
def client(port: int) -> Iterator:
    with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as triton:
        yield triton


def auth() -> dict[str, str]:
    # a new dict per call: tritonclient adds Inference-Header-Content-Length to the one it gets
    return {"Authorization": "Bearer s3cret"}


def test_the_server_is_live_and_ready_and_describes_its_model(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "adaptd" and "feedback" in server["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "prediction", "set"]
    version = metadata["versions"][0]
    assert client.get_model_metadata(MODEL, model_version=version) == metadata
    assert client.is_model_ready(MODEL, model_version=version)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_with_json_or_raw_tensors_and_outputs_picked_by_name(client, binary) -> None:
    samples = X_TEST[:8]
    given = httpclient.InferInput("input", list(samples.shape), "FP32")
    given.set_data_from_numpy(samples, binary_data=binary)
    everything = client.infer(MODEL, [given], request_id="req-1", headers=auth())
    assert everything.get_response()["id"] == "req-1"
    assert everything.as_numpy("prediction").tolist() == Y_TEST[:8].tolist()
    probabilities = everything.as_numpy("probabilities")
    assert probabilities.shape == (8, 10) and probabilities.sum(1) == pytest.approx(1.0, abs=1e-5)
    sets = everything.as_numpy("set")
    assert sets.dtype == np.bool_ and sets.shape == (8, 10)
    assert all(sets[i, y] for i, y in enumerate(Y_TEST[:8]))  # confident digits: in their sets

    wanted = [httpclient.InferRequestedOutput("set", binary_data=binary),
              httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]
    picked = client.infer(MODEL, [given], outputs=wanted, headers=auth())
    assert [o["name"] for o in picked.get_response()["outputs"]] == ["set", "probabilities"]
    assert picked.as_numpy("prediction") is None
    assert np.array_equal(picked.as_numpy("set"), sets)
    top = picked.as_numpy("probabilities")
    assert top.shape == (8, 2)
    # tritonclient gives BYTES elements as str when they came in JSON, as bytes when raw
    best = [t.decode() if isinstance(t, bytes) else t for t in top[:, 0]]
    assert [int(t.split(":")[1]) for t in best] == Y_TEST[:8].tolist()


def test_labels_for_the_returned_ids_are_joined_through_the_feedback_extension(client) -> None:
    # what docs/http-api.md shows: predict, read the ids, send their labels to <model>.feedback
    samples = X_TEST[8:12]
    given = httpclient.InferInput("input", list(samples.shape), "FP32")
    given.set_data_from_numpy(samples)
    result = client.infer(MODEL, [given], headers=auth())
    ids = result.get_response()["parameters"]["prediction_ids"].split()
    assert len(ids) == 4

    def send(labels: np.ndarray):
        id_tensor = httpclient.InferInput("id", [len(ids) + 1], "BYTES")
        id_tensor.set_data_from_numpy(np.array([*ids, "never-made"], dtype=object))
        label_tensor = httpclient.InferInput("label", [len(ids) + 1], "INT64")
        label_tensor.set_data_from_numpy(labels)
        return client.infer(f"{MODEL}.feedback", [id_tensor, label_tensor], headers=auth())

    labels = np.array([*Y_TEST[8:12], 0], dtype=np.int64)
    joined = send(labels)
    assert joined.get_response()["parameters"] == {
        "joined": 4, "unknown": 1, "duplicate": 0, "expired": 0, "rejected": 0}
    assert joined.as_numpy("outcome").tolist() == [b"joined"] * 4 + [b"unknown"]
    again = send(labels)
    assert again.get_response()["parameters"]["duplicate"] == 4
    assert again.as_numpy("outcome").tolist() == [b"duplicate"] * 4 + [b"unknown"]


def test_the_tritonclient_example_of_the_http_api_docs_runs_as_written(port, monkeypatch,
                                                                       capsys) -> None:
    text = DOCS.read_text()
    start = text.index("```python\n", text.index(EXAMPLE_MARK)) + len("```python\n")
    example = text[start:text.index("```", start)]
    assert 'InferenceServerClient("localhost:18080")' in example
    monkeypatch.chdir(DOCS.parents[1])  # it reads examples/predict.json from the repository root
    namespace: dict = {}
    exec(compile(example.replace("localhost:18080", f"127.0.0.1:{port}"), str(DOCS), "exec"),
         namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[3]" and printed[1] == "True"
    assert namespace["joined"].get_response()["parameters"] == {
        "joined": 1, "unknown": 0, "duplicate": 0, "expired": 0, "rejected": 0}
    assert printed[3] == "[b'joined']"


def test_errors_reach_the_client_with_the_protocols_status_and_message(client) -> None:
    given = httpclient.InferInput("input", [1, 16, 16], "FP32")
    given.set_data_from_numpy(X_TEST[0])
    with pytest.raises(utils.InferenceServerException) as refused:
        client.infer(MODEL, [given], headers=auth())
    assert refused.value.status() == "400"
    assert "has shape [1, 16, 16]; the model takes [-1, 1, 16, 16]" in refused.value.message()
    with pytest.raises(utils.InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    with pytest.raises(utils.InferenceServerException) as unauthorized:
        client.infer(MODEL, [given])
    assert unauthorized.value.status() == "401"
