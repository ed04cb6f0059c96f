"""bench.serve's pure parts: reading hey's output, the request bodies, the tables. No server is
started and neither hey nor the peers' environment is needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import serve
from bench.peers.models import MODELS
from bench.resnet_cifar import INPUT_SHAPE, resnet8, sample_images

# hey 0.1.4 (Debian bookworm), `hey -z 3s -c 8 -m POST ...` against adaptd serve, shortened
HEY_OK = """
Summary:
  Total:\t3.0163 secs
  Slowest:\t0.1806 secs
  Fastest:\t0.0235 secs
  Average:\t0.0731 secs
  Requests/sec:\t108.7430

  Total data:\t130216 bytes
  Size/request:\t397 bytes

Response time histogram:
  0.024 [1]\t|■
  0.039 [43]\t|■■■■■■■■■■■■■■■■■■■■■■■■

Latency distribution:
  10% in 0.0353 secs
  25% in 0.0477 secs
  50% in 0.0662 secs
  75% in 0.0891 secs
  90% in 0.1167 secs
  95% in 0.1412 secs
  99% in 0.1717 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0000 secs, 0.0235 secs, 0.1806 secs
  resp wait:\t0.0722 secs, 0.0234 secs, 0.1804 secs

Status code distribution:
  [200]\t328 responses


"""

# the same against a port nothing listens on: no status at all, every request an error
HEY_REFUSED = """
Summary:
  Total:\t0.0063 secs
  Slowest:\t0.0000 secs
  Fastest:\t0.0000 secs
  Average:\t NaN secs
  Requests/sec:\t1584.8800


Response time histogram:


Latency distribution:

Status code distribution:

Error distribution:
  [10]\tGet "http://127.0.0.1:18999/x": dial tcp 127.0.0.1:18999: connect: connection refused

"""


def test_hey_summary_gives_rate_percentiles_and_statuses():
    result = serve.parse_hey(HEY_OK)
    assert result.requests_per_s == pytest.approx(108.743)
    assert (result.p50_s, result.p99_s) == (0.0662, 0.1717)
    assert result.statuses == {200: 328}
    assert result.failures == 0
    assert result.ok_per_s == pytest.approx(108.743)


def test_hey_errors_and_other_statuses_count_as_failures_and_not_as_throughput():
    refused = serve.parse_hey(HEY_REFUSED)
    assert refused.failures == 10
    assert refused.ok_per_s == 0.0
    assert list(refused.errors.values()) == [10]
    shed = serve.parse_hey(HEY_OK.replace("[200]\t328 responses",
                                          "[200]\t300 responses\n  [503]\t100 responses"))
    assert shed.failures == 100
    assert shed.ok_per_s == pytest.approx(108.743 * 300 / 400)


def test_hey_output_without_a_rate_is_refused():
    with pytest.raises(ValueError, match="Requests/sec"):
        serve.parse_hey("Usage: hey [options...] <url>")


def test_v1_body_nests_each_sample_to_the_model_input_shape():
    inputs = serve.model_inputs("demo", 3)
    body = json.loads(serve.v1_body(inputs, ["a", "b", "c"]))
    assert np.asarray(body["inputs"]).shape == (3, *MODELS["demo"][2])
    assert body["ids"] == ["a", "b", "c"]
    np.testing.assert_allclose(np.asarray(body["inputs"], dtype=np.float32), inputs)


def test_v2_body_is_one_fp32_input_with_flat_data_of_the_batch_shape():
    inputs = serve.model_inputs("resnet", 2)
    (tensor,) = json.loads(serve.v2_body(inputs))["inputs"]
    assert tensor["name"] == "input" and tensor["datatype"] == "FP32"
    assert tensor["shape"] == [2, *INPUT_SHAPE]
    assert len(tensor["data"]) == 2 * int(np.prod(INPUT_SHAPE))
    data = np.asarray(tensor["data"], dtype=np.float32)
    np.testing.assert_allclose(data.reshape(2, *INPUT_SHAPE), inputs)


def test_v2_binary_body_is_read_back_by_the_service_as_the_same_float32_batch():
    from service.oip import TensorSpec, read_request

    inputs = serve.model_inputs("resnet", 3)
    body, headers = serve.request_body("v2bin", inputs)
    assert headers["Content-Type"] == "application/octet-stream"
    spec = TensorSpec("input", [-1, *INPUT_SHAPE], max_batch=64)
    parsed = read_request(body, headers["Inference-Header-Content-Length"], [spec],
                          ["prediction"], max_elements=10**7)
    assert parsed.inputs["input"].datatype == "FP32"
    np.testing.assert_array_equal(parsed.inputs["input"].values, inputs)
    assert len(body) == int(headers["Inference-Header-Content-Length"]) + inputs.nbytes
    assert serve.request_body("v1", inputs)[1] == {"Content-Type": "application/json"}


def test_both_protocols_answers_give_the_predicted_classes():
    assert serve.predicted_classes("v1", {"predictions": [{"prediction": 7}]}) == [7]
    v2 = {"outputs": [{"name": "probabilities", "data": [0.1, 0.9]},
                      {"name": "prediction", "data": [1]}]}
    assert serve.predicted_classes("v2", v2) == [1]


def test_every_column_of_the_issue_is_there_with_its_load():
    assert [(c.title, c.samples, c.in_flight) for c in serve.COLUMNS.values()] == [
        ("1 in flight", 1, 1), ("8", 1, 8), ("64", 1, 64),
        ("64-image requests, 4 in flight", 64, 4)]


def test_every_adaptd_row_is_a_server_whose_settings_load_and_differ_from_the_default(
        monkeypatch):
    from service.settings import load_settings

    for row in serve.ROWS.values():
        assert row.server in serve.ADAPTD_SERVERS or not row.server.startswith("adaptd")
    default = load_settings(None)
    for name, (adapter, environment) in serve.ADAPTD_SERVERS.items():
        with monkeypatch.context() as patch:
            for variable, value in environment.items():
                patch.setenv(variable, value)
            settings = load_settings(None, adapter={"name": adapter})
        assert (settings.model_dump(exclude={"adapter"}) != default.model_dump(exclude={"adapter"})
                ) == bool(environment), name
    # the issue's table is the default run; the side-by-side rows are named on purpose
    assert {"adaptd-none-h11", "adaptd-eata-noshadow"}.isdisjoint(serve.DEFAULT_ROWS)


def test_samples_table_has_a_row_per_server_and_marks_cells_with_failures():
    columns = [serve.COLUMNS["c1"], serve.COLUMNS["b64x4"]]
    results = {
        "adaptd-none": {"c1": {"samples_per_s": 812.4, "failures": 0},
                        "b64x4": {"samples_per_s": 3120.0, "failures": 2}},
        "mlserver": {"error": "mlserver exited"},
    }
    table = serve.samples_table(results, ["adaptd-none", "mlserver", "fastapi"], columns)
    assert table.splitlines() == [
        "| server | 1 in flight | 64-image requests, 4 in flight |",
        "|---|---|---|",
        "| adaptd `none` defaults | 812 | 3,120 ! |",
        "| MLServer 1.7.1, adaptive batching 64 / 5 ms | failed | failed |",
        "| hand-written FastAPI endpoint, no batching | - | - |",
    ]


def test_ratio_table_compares_the_64_image_column_with_its_in_process_figure():
    results = {"adaptd-eata": {"b64x4": {"samples_per_s": 500.0, "failures": 0}},
               "fastapi": {"b64x4": {"samples_per_s": 900.0, "failures": 0}}}
    in_process = {"forward": 1000.0, "eata": 800.0, "engine-none": 950.0, "engine-eata": 625.0}
    rows = serve.ratio_table(results, in_process, ["adaptd-eata", "fastapi"]).splitlines()[2:]
    assert rows == ["| adaptd `eata` | 500 | 800 | 0.62 | 625 | 0.80 |",
                    "| hand-written FastAPI endpoint, no batching | 900 | 1,000 | 0.90 | - | - |"]


def test_resnet_inputs_fit_the_compute_bound_model():
    inputs = serve.model_inputs("resnet", 4)
    assert inputs.dtype == np.float32 and inputs.shape == (4, *INPUT_SHAPE)
    assert np.array_equal(inputs, sample_images(4).numpy())
    assert resnet8()(sample_images(2)).shape == (2, 10)
