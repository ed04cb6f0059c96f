"""The deployment files (deploy/, Dockerfile): they parse, they agree with each other, and every
`adaptd_*` metric they name is one the service really exports.

PyYAML is not a dependency, so YAML files get a structural check (spaces, top-level keys) and
values are read with regular expressions; the dashboard JSON is parsed with `json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from service.settings import load_settings
from tests.harness import serving

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "adaptd.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
K8S = DEPLOY / "k8s"
METRIC_NAME = re.compile(r"\badaptd_[a-z0-9_]+\b")
TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][\w.-]*):", re.MULTILINE)

# the series names Prometheus stores for one metric family of each type (no *_created: disabled)
SERIES_SUFFIXES = {
    "counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")
}


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def yaml_documents(path: Path) -> list[str]:
    """The non-empty documents of a YAML file, comments and blank lines dropped."""
    docs = re.split(r"^---\s*$", path.read_text(), flags=re.MULTILINE)
    kept = []
    for doc in docs:
        lines = [ln for ln in doc.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if lines:
            kept.append("\n".join(lines))
    return kept


def referenced_metrics() -> dict[str, set[str]]:
    """Every `adaptd_*` name in any file under deploy/, with the files that name it."""
    found: dict[str, set[str]] = {}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in METRIC_NAME.findall(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], str]:
    """The series names the app's registry defines, and the text of its GET /metrics."""

    async def scenario() -> tuple[set[str], str]:
        async with serving() as (client, app):
            names: set[str] = set()
            for family in app.state.metrics.registry.collect():
                names.update(family.name + s for s in SERIES_SUFFIXES[family.type])
            reply = await client.get("/metrics")
            assert reply.status_code == 200
            return names, reply.text

    return asyncio.run(scenario())


def test_the_exported_names_are_exactly_the_series_names_on_the_metrics_endpoint(exported):
    names, text = exported
    samples = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
               if ln and not ln.startswith("#")}
    declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    # every sample the endpoint shows is an accepted name; families with no sample yet (store
    # errors, labelled by op, before any failure) are still declared and still accepted
    assert samples <= names
    assert "adaptd_store_errors_total" in declared and "adaptd_store_errors_total" in names
    assert {"adaptd_http_requests_total", "adaptd_batch_size_bucket", "adaptd_store_up"} <= names
    assert "adaptd_http_requests" not in names and "adaptd_batch_size" not in names


def test_every_adaptd_metric_named_under_deploy_is_exported_by_the_service(exported):
    names, _ = exported
    referenced = referenced_metrics()
    unexported = {name: sorted(files) for name, files in referenced.items() if name not in names}
    assert unexported == {}
    # the check saw the dashboard and the alert rules, not an empty directory
    assert len(referenced) >= 15
    assert referenced["adaptd_store_up"] >= {
        "deploy/grafana/dashboards/adaptd.json", "deploy/prometheus/alerts.yml"
    }


def test_the_metric_check_rejects_bare_counter_and_histogram_names_and_invented_suffixes(exported):
    names, _ = exported
    candidates = {"adaptd_http_requests", "adaptd_batch_size", "adaptd_store_up_total",
                  "adaptd_requests_total", "adaptd_queue_depth", "adaptd_label_lag_seconds_sum"}
    assert candidates - names == {"adaptd_http_requests", "adaptd_batch_size",
                                  "adaptd_store_up_total", "adaptd_requests_total"}


def test_every_json_file_under_deploy_parses_and_the_dashboard_uses_the_provisioned_datasource():
    json_files = deploy_files(".json")
    assert DASHBOARD in json_files
    for path in json_files:
        json.loads(path.read_text())

    provisioned = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = re.findall(r"^\s+uid:\s*(\S+)\s*$", provisioned.read_text(), flags=re.MULTILINE)
    assert uids == ["prometheus"]

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            assert METRIC_NAME.search(target["expr"]) or target["expr"].startswith("up{")


def test_the_dashboard_queries_every_signal_operators_watch():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for name in ("adaptd_http_requests_total", "adaptd_http_request_duration_seconds_bucket",
                 "adaptd_batch_size_sum", "adaptd_batch_size_count", "adaptd_queue_depth",
                 "adaptd_predictions_total", "adaptd_labels_total",
                 "adaptd_label_lag_seconds_bucket", "adaptd_rolling_error",
                 "adaptd_adaptation_steps_total", "adaptd_learning_rate", "adaptd_mean_entropy",
                 "adaptd_store_up", "adaptd_store_errors_total",
                 "adaptd_conformal_coverage", "adaptd_conformal_target", "adaptd_conformal_size",
                 "adaptd_drift_alarms_total", "adaptd_drift_actions_total",
                 "adaptd_drift_learning_rate_factor", "adaptd_label_stream_backlog",
                 "adaptd_label_stream_entries_total"):
        assert name in exprs, name
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
    # coverage is drawn for both windows the service measures, against its target
    assert 'window="100"' in exprs and 'window="1000"' in exprs


def test_every_yaml_file_under_deploy_is_space_indented_with_the_expected_top_level_keys():
    expected = {
        "docker-compose.yml": {"services", "volumes"},
        "prometheus/prometheus.yml": {"global", "rule_files", "scrape_configs"},
        "prometheus/alerts.yml": {"groups"},
        "grafana/provisioning/datasources/prometheus.yml": {"apiVersion", "datasources"},
        "grafana/provisioning/dashboards/adaptd.yml": {"apiVersion", "providers"},
    }
    yaml_files = deploy_files(".yml", ".yaml")
    found = {str(p.relative_to(DEPLOY)) for p in yaml_files}
    assert set(expected) <= found
    for path in yaml_files:
        rel = str(path.relative_to(DEPLOY))
        assert "\t" not in path.read_text(), f"{rel}: YAML forbids tab indentation"
        docs = yaml_documents(path)
        assert docs, f"{rel} is empty"
        for doc in docs:
            keys = TOP_LEVEL_KEY.findall(doc)
            assert len(keys) == len(set(keys)), f"{rel}: duplicate top-level key in {keys}"
            if rel in expected:
                assert expected[rel] <= set(keys), rel
            elif rel.startswith("k8s/") and rel != "k8s/kustomization.yaml":
                assert {"apiVersion", "kind", "metadata"} <= set(keys), rel


def test_the_alert_rules_cover_availability_store_quality_coverage_and_the_label_stream():
    text = ALERTS.read_text()
    blocks = re.split(r"^\s+- alert: ", text, flags=re.MULTILINE)[1:]
    rules = {block.split("\n", 1)[0].strip(): block for block in blocks}
    wanted = {
        "AdaptdDown": 'up{job="adaptd"} == 0',
        # the status label is the class of the code (2xx, 4xx, 5xx), never the code itself
        "AdaptdNotReady": 'route="/readyz", status="5xx"',
        "AdaptdHigh5xxRate": 'status="5xx"',
        "AdaptdRequestsShed": "rate(adaptd_requests_shed_total",
        "AdaptdP99LatencyHigh": "histogram_quantile(0.99",
        "AdaptdStoreDown": "adaptd_store_up == 0",
        "AdaptdStoreErrors": "increase(adaptd_store_errors_total",
        "AdaptdRollingErrorHigh": "adaptd_rolling_error >",
        "AdaptdLabelsNotJoining": 'adaptd_labels_total{outcome=~"unknown|expired"}',
        "AdaptdQueueDepthHigh": "adaptd_queue_depth",
        "AdaptdConformalCoverageLow": "(adaptd_conformal_target - 0.05)",
        "AdaptdLabelStreamBacklogGrowing": "deriv(max by (job) (adaptd_label_stream_backlog)",
        "AdaptdLabelStreamDeadLetters": 'adaptd_label_stream_entries_total{outcome="dead"}',
        "AdaptdLabelStreamConsumerCrashing": "increase(adaptd_label_stream_crashes_total",
        "AdaptdLabelsRejected": 'adaptd_labels_total{outcome="rejected"}',
    }
    assert set(wanted) <= set(rules)
    for alert, fragment in wanted.items():
        assert fragment in rules[alert], alert
    for alert, block in rules.items():
        assert re.search(r"^\s+expr:", block, flags=re.MULTILINE), alert
        assert re.search(r"^\s+for: \d+m$", block, flags=re.MULTILINE), alert
        assert re.search(r"^\s+severity: (critical|warning)$", block, flags=re.MULTILINE), alert


def test_the_alert_rules_load_in_prometheus_and_pass_their_unit_tests():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (it ships with Prometheus; Debian: prometheus)")
    assert re.search(r"^rule_files:\n  - alerts.yml$", ALERT_TESTS.read_text(), re.MULTILINE)
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        run = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_scrapes_every_adaptd_replica_of_the_compose_file_and_they_share_redis():
    compose = (DEPLOY / "docker-compose.yml").read_text()
    replicas = set(re.findall(r"^  (adaptd-\d+):$", compose, flags=re.MULTILINE))
    assert replicas == {"adaptd-1", "adaptd-2"}
    # both replicas are the one anchored definition, so they share its store URL and namespace
    assert compose.count("<<: *adaptd") == len(replicas)
    assert re.findall(r"ADAPTD_STORE__URL: (\S+)", compose) == ["redis://redis:6379/0"]
    assert len(re.findall(r"ADAPTD_STORE__NAMESPACE: (\S+)", compose)) == 1
    assert sorted(re.findall(r'"(\d+):8000"', compose)) == ["8001", "8002"]

    prometheus = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    targets = set(re.findall(r"^\s+- (adaptd-\d+):8000$", prometheus, flags=re.MULTILINE))
    assert targets == replicas
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml" in compose
    assert re.search(r"^rule_files:\n  - alerts.yml$", prometheus, flags=re.MULTILINE)


def configmap_toml() -> str:
    """The `adaptd.toml: |` block scalar of the example ConfigMap, dedented."""
    lines = (K8S / "configmap.yaml").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "adaptd.toml: |")
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    block = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= key_indent:
            break
        block.append(line)
    body_indent = min(len(ln) - len(ln.lstrip()) for ln in block if ln.strip())
    return "\n".join(ln[body_indent:] for ln in block) + "\n"


def test_the_k8s_configmap_toml_loads_as_adaptd_settings(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("ADAPTD_")]:
        monkeypatch.delenv(var)
    config = tmp_path / "adaptd.toml"
    config.write_text(configmap_toml())
    assert tomllib.loads(config.read_text())["adapter"]["name"] == "tent"

    settings = load_settings(config)
    assert settings.adapter.name == "tent"
    assert settings.namespace == "digits-cnn"
    assert settings.batcher.max_batch_size == 64
    assert settings.store.url == "memory"  # the Deployment sets it from the Secret


def test_the_k8s_deployment_probes_readyz_and_healthz_and_reads_url_and_token_from_a_secret():
    deployment = (K8S / "adaptd.yaml").read_text()
    assert re.search(r"^  replicas: 2$", deployment, flags=re.MULTILINE)
    assert re.search(r"readinessProbe:\n\s+httpGet:\n\s+path: /readyz\n", deployment)
    assert re.search(r"livenessProbe:\n\s+httpGet:\n\s+path: /healthz\n", deployment)
    assert re.search(r"resources:\n\s+requests:\n\s+cpu: \S+\n\s+memory: \S+\n", deployment)
    assert re.search(r"- name: ADAPTD_CONFIG\n\s+value: /etc/adaptd/adaptd.toml\n", deployment)
    assert re.search(r"mountPath: /etc/adaptd\n", deployment)
    assert re.search(r"configMap:\n\s+name: adaptd-config\n", deployment)

    secret_keys = {}
    for var in ("ADAPTD_STORE__URL", "ADAPTD_API_TOKEN"):
        match = re.search(rf"- name: {var}\n\s+valueFrom:\n\s+secretKeyRef:\n"
                          r"\s+name: (\S+)\n\s+key: (\S+)\n", deployment)
        assert match, var
        secret_keys[var] = match.groups()
    assert secret_keys == {"ADAPTD_STORE__URL": ("adaptd-secrets", "store-url"),
                           "ADAPTD_API_TOKEN": ("adaptd-secrets", "api-token")}
    secret = (K8S / "secret.example.yaml").read_text()
    assert re.search(r"^  name: adaptd-secrets$", secret, flags=re.MULTILINE)
    assert set(re.findall(r"^  (store-url|api-token):", secret, flags=re.MULTILINE)) == {
        "store-url", "api-token"
    }
    # the example Secret's Redis URL points at the Service of redis.yaml
    redis = (K8S / "redis.yaml").read_text()
    host = re.search(r"store-url: redis://([\w-]+):6379/0", secret).group(1)
    assert re.search(rf"kind: Service\nmetadata:\n  name: {host}\n", redis)


def test_the_dockerfile_installs_cpu_torch_first_and_serves_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = dockerfile.splitlines()
    assert [ln for ln in lines if ln.startswith("FROM ")] == [
        "FROM python:3.11-slim AS build", "FROM python:3.11-slim"
    ]
    torch_line = next(i for i, ln in enumerate(lines) if "torch==" in ln and "pip install" in ln)
    package_line = next(i for i, ln in enumerate(lines) if re.search(r"pip install \.(\s|$)", ln))
    assert torch_line < package_line
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    pinned = re.search(r"torch==(\S+)", lines[torch_line]).group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    assert Version(pinned) in SpecifierSet(torch_spec.removeprefix("torch"))

    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["adaptd", "serve", "--host", "0.0.0.0"]'
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK"):]
    assert "CMD python -c" in healthcheck and "/healthz" in healthcheck

    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "tests"} <= ignored
