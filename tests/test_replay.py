"""`adaptd replay`: streams through real `adaptd serve` processes, and the report it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.cli import main
from service.replay import Stream, label_positions, rolling_mean
from tests.harness import ADAPTD, running_service
from tests.models import binary, regressor
from tests.redis_server import free_port

REPO = str(Path(__file__).resolve().parents[1])
# the factories below live in tests/, which a served process imports from the repository root
# the replays are scored against the source model's answers: adapter none and no error memory,
# so nothing moves them
# the model as trained (for these tabular models the mixture with River's learner is on by
# default): the replay's scores are checked against its answers
SOURCE = {"ADAPTD_ADAPTER__NAME": "none", "ADAPTD_ERROR_MEMORY__KIND": "off",
          "ADAPTD_MIXTURE__ENABLED": "false"}
BINARY = {"PYTHONPATH": REPO, "ADAPTD_MODEL__FACTORY": "tests.models:binary",
          "ADAPTD_MODEL__NAME": "bin", "ADAPTD_MODEL__INPUT_SHAPE": "[4]",
          "ADAPTD_MODEL__NUM_CLASSES": "2", **SOURCE}
REGRESSOR = {"PYTHONPATH": REPO, "ADAPTD_MODEL__FACTORY": "tests.models:regressor",
             "ADAPTD_MODEL__NAME": "reg", "ADAPTD_MODEL__TASK": "regression",
             "ADAPTD_MODEL__INPUT_SHAPE": "[3]", **SOURCE}
PNG = b"\x89PNG\r\n\x1a\n"


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    """`adaptd replay ARGS` as its own process."""
    return subprocess.run([ADAPTD, "replay", *args, "--quiet"], capture_output=True, text=True,
                          timeout=300)


def joined_labels(port: int) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next(x for x in metrics.splitlines()
                if x.startswith('adaptd_labels_total{outcome="joined"}'))
    return float(line.split()[-1])


def binary_csv(path: Path, rows: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four standard normal features and the class `binary()` should give (0 iff they sum
    above 0), with one label in ten flipped."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (x.sum(1) <= 0).astype(int)
    y[::10] = 1 - y[::10]
    lines = ["f1,f2,label,f3,f4"]  # the label's column need not be the last
    lines += [f"{a!r},{b!r},{label},{c!r},{d!r}"
              for (a, b, c, d), label in zip(x.tolist(), y.tolist(), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return x, y


@pytest.fixture(scope="module")
def demo_port():
    with running_service(SOURCE) as port:
        yield port


def test_requests_never_mix_two_parts_of_a_stream():
    stream = Stream("s", np.zeros((10, 1), np.float32), np.zeros(10), [(0, "a"), (5, "b")])
    assert stream.requests(4) == [(0, 4), (4, 5), (5, 9), (9, 10)]
    assert stream.head(5).parts == [(0, "a")] and len(stream.head(5)) == 5


def test_rolling_means_cover_the_window_before_each_value():
    values = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    assert rolling_mean(values, 3).tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1 / 3, 2 / 3])


@pytest.mark.slow
def test_a_digits_c_replay_to_two_targets_reports_what_the_service_saw(demo_port, tmp_path):
    url = f"http://127.0.0.1:{demo_port}"
    # both names on one service: the demo model without adaptation answers both the same way,
    # so the service's own rolling error is the mean of the two configurations' errors
    main(["replay", "digits-c", "--target", f"a={url}", "--target", f"b={url}",
          "--limit", "300", "--label-delay", "40", "--window", "100", "--out", str(tmp_path),
          "--quiet"])
    assert (tmp_path / "replay.png").read_bytes().startswith(PNG)
    report = json.loads((tmp_path / "replay.json").read_text())
    assert report["stream"]["samples"] == 300 and report["stream"]["labels"] == 300
    a, b = report["configurations"]["a"], report["configurations"]["b"]
    for numbers in (a, b):
        assert numbers["labels_sent"] == 300 and numbers["label_outcomes"]["joined"] == 300
        assert numbers["adapter"] == "none" and numbers["target_coverage"] == 0.9
        assert numbers["worst_window_coverage"] <= numbers["coverage"]
        assert 1.0 <= numbers["mean_set_size"] <= 10.0
        assert numbers["series"]["error"][-1][0] == 299
    assert a["error"] == b["error"]
    state = httpx.get(f"{url}/v1/state").json()
    assert joined_labels(demo_port) == 600 == state["quality"]["labels"]
    assert state["quality"]["rolling_error"] == pytest.approx(a["error"])
    assert state["calibrator"]["coverage"]["1000"] == pytest.approx(
        (a["coverage"] + b["coverage"]) / 2)
    alarms = httpx.get(f"{url}/v1/events", params={"kind": "drift_alarm"}).json()["events"]
    assert a["alarms"] == len(alarms) == len(a["alarm_positions"])


@pytest.mark.slow
def test_a_stream_whose_samples_do_not_fit_the_model_is_refused(demo_port, tmp_path):
    binary_csv(tmp_path / "rows.csv", rows=20)
    done = replay(str(tmp_path / "rows.csv"), "--url", f"http://127.0.0.1:{demo_port}",
                  "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("adaptd replay: the stream's samples have shape [4]; the "
                                  f"service at http://127.0.0.1:{demo_port} (digits-cnn) takes "
                                  "[1, 16, 16]")
    assert not (tmp_path / "replay.json").exists()


@pytest.mark.slow
def test_a_csv_replay_scores_the_models_answers_against_its_labels(tmp_path):
    x, y = binary_csv(tmp_path / "rows.csv")
    with running_service(BINARY) as port:
        main(["replay", str(tmp_path / "rows.csv"), "--url", f"http://127.0.0.1:{port}",
              "--label-delay", "0", "--request-size", "7", "--out", str(tmp_path), "--quiet"])
        assert joined_labels(port) == 200
    numbers = json.loads((tmp_path / "replay.json").read_text())["configurations"]["service"]
    with torch.inference_mode():
        predicted = binary().eval()(torch.from_numpy(x)).argmax(1).numpy()
    assert numbers["error"] == pytest.approx(float((predicted != y).mean()))
    assert numbers["error"] == pytest.approx(0.1)  # the flipped labels
    assert (tmp_path / "replay.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_an_ndjson_replay_to_a_regressor_scores_absolute_errors_and_intervals(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 3)).astype(np.float32)
    with torch.inference_mode():
        values = regressor()(torch.from_numpy(x))[:, 0].numpy().astype(np.float64)
    truth = values + rng.normal(0, 0.3, 150)
    rows = [json.dumps({"inputs": row, "label": label})
            for row, label in zip(x.tolist(), truth.tolist(), strict=True)]
    (tmp_path / "rows.ndjson").write_text("\n".join(rows) + "\n")
    with running_service(REGRESSOR) as port:
        main(["replay", str(tmp_path / "rows.ndjson"), "--url", f"http://127.0.0.1:{port}",
              "--label-fraction", "0.5", "--out", str(tmp_path), "--quiet"])
        state = httpx.get(f"http://127.0.0.1:{port}/v1/state").json()
    numbers = json.loads((tmp_path / "replay.json").read_text())["configurations"]["service"]
    labelled = label_positions(150, 0.5)
    assert numbers["labels_sent"] == 75 == state["quality"]["labels"]
    assert numbers["metric"] == "mean absolute error"
    expected = float(np.abs(values[labelled] - truth[labelled]).mean())
    assert numbers["error"] == pytest.approx(expected, rel=1e-5)
    assert numbers["error"] == pytest.approx(state["quality"]["rolling_error"], rel=1e-5)
    assert numbers["coverage"] == pytest.approx(state["calibrator"]["coverage"]["1000"])
    assert numbers["mean_interval_width"] > 0


def test_a_missing_file_is_named(tmp_path):
    done = replay(str(tmp_path / "nope.csv"), "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == f"adaptd replay: no such file: {tmp_path / 'nope.csv'}\n"


def test_a_column_that_is_not_numeric_is_named_with_its_line(tmp_path):
    (tmp_path / "rows.csv").write_text("f1,f2,label\n0.5,1,0\n0.5,abc,1\n")
    done = replay(str(tmp_path / "rows.csv"), "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == (f"adaptd replay: {tmp_path / 'rows.csv'} line 3: column 'f2' holds "
                           "'abc', not a number; every column must be numeric\n")
    (tmp_path / "rows.csv").write_text("f1,f2,target\n0.5,1,0\n")
    done = replay(str(tmp_path / "rows.csv"), "--out", str(tmp_path))
    assert done.stderr == (f"adaptd replay: {tmp_path / 'rows.csv'} has no 'label' column; "
                           "its header is f1, f2, target\n")


def test_an_unreachable_service_is_named_with_what_to_do(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = replay("digits-c", "--url", url, "--out", str(tmp_path))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"adaptd replay: cannot reach {url} (ConnectError")
    assert "start `adaptd serve` there" in done.stderr


def test_an_unknown_stream_lists_the_streams(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["replay", "mnist", "--out", str(tmp_path)])
    assert str(stopped.value.code).startswith("adaptd replay: unknown stream 'mnist': use "
                                              "digits-c, one of phishing, bananas")


def test_the_replay_command_is_documented_in_its_help():
    done = subprocess.run([sys.executable, "-m", "service.cli", "replay", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0
    assert "adaptd replay phishing --prepare models/phishing" in done.stdout
    assert "--target NAME=URL" in done.stdout
