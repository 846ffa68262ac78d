"""The Helm chart in helm/cdc-bridge: lint, render, validate, and the settings it promises.

Everything runs offline: helm-python-sdk binds Helm's Go SDK as a shared library that
ships inside its wheel (no helm binary, no download), and kubernetes-validate ships the
Kubernetes JSON schemas. Each ``ci/*-values.yaml`` is linted and rendered; every rendered
document is validated against the Kubernetes schemas of the oldest version the chart
supports (Chart.yaml's kubeVersion) and the newest kubernetes-validate knows, in strict
mode (unknown fields are errors). ServiceMonitor and PrometheusRule are Prometheus
Operator CRDs that kubernetes-validate has no schema for: they are checked against the
small schemas below (the fields the chart sets, with their types).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml

from cdc_bridge.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "cdc-bridge"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "cdc-bridge"
NAMESPACE = "cdc"
#: Chart.yaml's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

SECRETS_DIR = "/etc/cdc-bridge/secrets"
CONFIG_FILE = "/etc/cdc-bridge/config.yaml"

#: The metric names the alerts use (the Observability section of README.md).
ALERT_METRICS = (
    "cdc_bridge_slot_retained_wal_bytes",
    "cdc_bridge_replication_lag_seconds",
    "cdc_bridge_publish_errors_total",
    "cdc_bridge_source_connected",
    "cdc_bridge_sink_connected",
    "cdc_bridge_slot_wal_status",
)

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
}
_DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}

#: Minimal schemas of the CRDs the chart renders (monitoring.coreos.com/v1).
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {
                            "matchNames": {"type": "array", "items": {"type": "string"}}
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["alert", "expr"],
                                        "properties": {
                                            "alert": {"type": "string", "pattern": "^[A-Za-z]+$"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}

#: Every kind the chart may render; a new one must get a schema check here.
KNOWN_KINDS = {
    "Deployment",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Service",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "CronJob",
    *CRD_SCHEMAS,
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's Kubernetes documents for ``values`` (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict), f"{template}: not a mapping"
                docs.append(doc)
    return docs


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def pod_annotations(docs: list[dict[str, Any]]) -> dict[str, str]:
    annotations: dict[str, str] = only(docs, "Deployment")["spec"]["template"]["metadata"][
        "annotations"
    ]
    return annotations


def with_values(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value``."""
    result = copy.deepcopy(base)
    node = result
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return result


DEFAULT = load_values(CHART / "ci" / "default-values.yaml")
ids = [p.name for p in CI_VALUES]


#: The Deployment strategy per replicaCount. One pod: Recreate (the old pod releases the
#: slot before the new one starts). Two (hot standby): a standby is ready, so a new pod
#: is started and must be ready (standing by) before an old one is stopped; whenever the
#: active pod stops, a ready standby takes the slot.
STRATEGIES = {
    1: {"type": "Recreate"},
    2: {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
}


def test_ci_values_cover_the_setups() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "default-values.yaml",
        "full-values.yaml",
        "existing-secret-values.yaml",
        "standby-values.yaml",
    }


# --------------------------------------------------------------------------- lint, schemas


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_lint_is_clean(values_file: Path) -> None:
    report = helm.lint(
        CHART, load_values(values_file), strict=True, kube_version=f"v{KUBE_VERSIONS[0]}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings, errors
    assert report["errors"] == [], report
    assert problems == [], problems


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_rendered_documents_are_valid(
    chart: helm.Chart, values_file: Path, kube_version: str
) -> None:
    docs = render(chart, load_values(values_file))
    assert kinds(docs) <= KNOWN_KINDS, kinds(docs) - KNOWN_KINDS
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["namespace"] == NAMESPACE, where
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            try:
                kubernetes_validate.validate(doc, kube_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} (Kubernetes {kube_version}): {exc.message}")


def test_full_values_render_every_kind(chart: helm.Chart) -> None:
    docs = render(chart, load_values(CHART / "ci" / "full-values.yaml"))
    assert kinds(docs) == KNOWN_KINDS


# --------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_deployment_promises(chart: helm.Chart, values_file: Path) -> None:
    values = load_values(values_file)
    merged = chart.merge_values(values)
    docs = render(chart, values)
    deployment = only(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(docs)

    replicas = merged["replicaCount"]
    assert deployment["spec"]["replicas"] == replicas
    assert deployment["spec"]["strategy"] == STRATEGIES[replicas]
    # A PodDisruptionBudget exactly for a hot standby (unless turned off).
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    wants_pdb = replicas == 2 and merged["podDisruptionBudget"]["enabled"]
    assert len(pdbs) == (1 if wants_pdb else 0), values_file.name
    # Service links would inject CDC_BRIDGE_SERVICE_HOST & co., which the bridge rejects.
    assert pod["enableServiceLinks"] is False

    assert main["args"] == ["run", "--config", CONFIG_FILE]
    port = merged["config"]["metrics"]["port"]
    assert main["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["resources"] == merged["resources"]

    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = main["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    annotations = pod_annotations(docs)
    assert len(annotations["checksum/config"]) == 64

    # The config file comes from the chart's ConfigMap ...
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"]["mountPath"] == CONFIG_FILE
    assert mounts["config"]["readOnly"] is True
    configmap = only(docs, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert set(configmap["data"]) == {mounts["config"]["subPath"]}

    # ... and the secrets are files in CDC_BRIDGE_SECRETS_DIR.
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["CDC_BRIDGE_SECRETS_DIR"] == SECRETS_DIR
    assert mounts["secrets"]["mountPath"] == SECRETS_DIR
    assert mounts["secrets"]["readOnly"] is True
    secret_name = volumes["secrets"]["secret"]["secretName"]
    if values.get("existingSecret"):
        assert secret_name == values["existingSecret"]
        assert "Secret" not in kinds(docs)
    else:
        assert secret_name == only(docs, "Secret")["metadata"]["name"]

    # A read-only root needs a writable /tmp.
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes["tmp"]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_config_file_is_values_config(chart: helm.Chart, values_file: Path) -> None:
    values = load_values(values_file)
    docs = render(chart, values)
    text = only(docs, "ConfigMap")["data"]["config.yaml"]
    assert yaml.safe_load(text) == chart.merge_values(values)["config"]
    # The checksum is the hash of exactly that file.
    assert (
        pod_annotations(docs)["checksum/config"]
        == hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
    )


def test_secret_holds_the_values_as_files(chart: helm.Chart) -> None:
    values = load_values(CHART / "ci" / "full-values.yaml")
    secret = only(render(chart, values), "Secret")
    assert secret["type"] == "Opaque"
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == values["secrets"]


def test_extra_volumes_are_mounted(chart: helm.Chart) -> None:
    values = load_values(CHART / "ci" / "full-values.yaml")
    docs = render(chart, values)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert values["extraVolumes"][0] in pod["volumes"]
    assert values["extraVolumeMounts"][0] in container(docs)["volumeMounts"]


def test_checksum_changes_with_the_config(chart: helm.Chart) -> None:
    before = pod_annotations(render(chart, DEFAULT))
    changed = pod_annotations(render(chart, with_values(DEFAULT, "config.nats.stream", "other")))
    unrelated = pod_annotations(render(chart, with_values(DEFAULT, "podLabels", {"a": "b"})))
    assert changed["checksum/config"] != before["checksum/config"]
    assert unrelated["checksum/config"] == before["checksum/config"]
    # A changed secret restarts the pod too.
    new_secret = with_values(DEFAULT, "secrets.postgres__password", "rotated")
    assert (
        pod_annotations(render(chart, new_secret))["checksum/secret"] != before["checksum/secret"]
    )


def test_config_port_moves_everything(chart: helm.Chart) -> None:
    docs = render(chart, with_values(DEFAULT, "config.metrics.port", 9300))
    assert container(docs)["ports"][0]["containerPort"] == 9300
    assert only(docs, "Service")["spec"]["ports"][0]["targetPort"] == "metrics"


def test_one_replica_is_recreated_and_not_spread(chart: helm.Chart) -> None:
    deployment = only(render(chart, DEFAULT), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    notes = chart.render(DEFAULT, name=RELEASE, namespace=NAMESPACE)[
        "cdc-bridge/templates/NOTES.txt"
    ]
    assert "standby" not in notes


def test_two_replicas_are_a_hot_standby(chart: helm.Chart) -> None:
    values = with_values(DEFAULT, "replicaCount", 2)
    deployment = only(render(chart, values), "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # The standby is ready: a new pod surges in and stands by before an old one stops,
    # never fewer than two ready pods, so a take-over never waits for a pod start.
    assert deployment["spec"]["strategy"] == STRATEGIES[2]
    # Active and standby preferably on different nodes.
    pod = deployment["spec"]["template"]["spec"]
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    notes = chart.render(values, name=RELEASE, namespace=NAMESPACE)[
        "cdc-bridge/templates/NOTES.txt"
    ]
    assert "hot standby" in notes
    assert "standing by" in notes
    assert "not ready" not in notes


def test_two_replicas_get_a_disruption_budget(chart: helm.Chart) -> None:
    values = with_values(DEFAULT, "replicaCount", 2)
    docs = render(chart, values)
    pdb = only(docs, "PodDisruptionBudget")
    # One eviction at a time: a bridge is always left to take the slot. maxUnavailable
    # (not minAvailable) so a not-ready pod can still be evicted while the other is ready.
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": only(docs, "Deployment")["spec"]["selector"]["matchLabels"]},
    }
    off = with_values(values, "podDisruptionBudget.enabled", False)
    assert "PodDisruptionBudget" not in kinds(render(chart, off))
    # One pod: no budget (maxUnavailable 1 allows everything, minAvailable 1 blocks drains).
    assert "PodDisruptionBudget" not in kinds(render(chart, DEFAULT))


def test_own_affinity_replaces_the_spreading(chart: helm.Chart) -> None:
    own: dict[str, Any] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    values = with_values(with_values(DEFAULT, "replicaCount", 2), "affinity", own)
    pod = only(render(chart, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["affinity"] == own


def test_standby_does_not_trip_the_connection_alerts(chart: helm.Chart) -> None:
    """A standby never has the replication stream open and may keep a stale lag from when
    it streamed: the alerts must not count it."""
    values = with_values(load_values(CHART / "ci" / "full-values.yaml"), "replicaCount", 2)
    rules = [
        r
        for g in only(render(chart, values), "PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
    ]
    alerts = {r["alert"]: r["expr"] for r in rules}
    assert alerts["CdcBridgeSourceDisconnected"].startswith("max(cdc_bridge_source_connected{")
    assert "unless on(instance) cdc_bridge_standby{" in alerts["CdcBridgeSinkDisconnected"]
    assert alerts["CdcBridgeReplicationLagHigh"].startswith("max(cdc_bridge_replication_lag_")
    assert "unless on(instance) cdc_bridge_standby{" in alerts["CdcBridgeReplicationLagHigh"]
    # Fires only when no pod is ready (a ready standby counts as available).
    assert "replicas_available" in alerts["CdcBridgeNotReady"]
    assert alerts["CdcBridgeNotReady"].endswith("< 1")


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_rendered_config_loads_in_the_bridge(
    chart: helm.Chart, values_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap, the Secret's files and the container's env, as the pod sees them."""
    values = load_values(values_file)
    docs = render(chart, values)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(only(docs, "ConfigMap")["data"]["config.yaml"], encoding="utf-8")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    if values.get("existingSecret"):
        files = {"postgres__dsn": "postgresql://cdc@db.example:5432/app"}
    else:
        secret = only(docs, "Secret")
        files = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    for name, content in files.items():
        (secrets / name).write_text(content, encoding="utf-8")
    for name in list(os.environ):
        if name.upper().startswith("CDC_BRIDGE_"):
            monkeypatch.delenv(name)
    for var in container(docs)["env"]:
        value = str(secrets) if var["name"] == "CDC_BRIDGE_SECRETS_DIR" else var["value"]
        monkeypatch.setenv(var["name"], value)
    settings = load_settings(config_file)
    assert settings.tables


# --------------------------------------------------------------------------- monitoring


def test_service_monitor_scrapes_the_service(chart: helm.Chart) -> None:
    docs = render(chart, load_values(CHART / "ci" / "full-values.yaml"))
    service = only(docs, "Service")
    monitor = only(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    # A bridge that is not ready still gets scraped.
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_alerts_cover_the_contract_metrics(chart: helm.Chart) -> None:
    docs = render(chart, load_values(CHART / "ci" / "full-values.yaml"))
    rules = [r for g in only(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == {
        "CdcBridgeSlotLost",
        "CdcBridgeSlotWalUnreserved",
        "CdcBridgeSlotRetainedWalHigh",
        "CdcBridgeReplicationLagHigh",
        "CdcBridgePublishErrors",
        "CdcBridgeSourceDisconnected",
        "CdcBridgeSinkDisconnected",
        "CdcBridgeNotReady",
        "CdcBridgeDown",
    }
    expressions = " ".join(r["expr"] for r in rules)
    for metric in ALERT_METRICS:
        assert metric in expressions, metric
    assert 'status="lost"' in alerts["CdcBridgeSlotLost"]["expr"]
    assert "> 21474836480" in alerts["CdcBridgeSlotRetainedWalHigh"]["expr"]
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["labels"]["team"] == "platform"
        assert 'job="chat-cdc"' in rule["expr"] or 'deployment="chat-cdc"' in rule["expr"]
    # Prometheus' own template syntax survives Helm's.
    summary = alerts["CdcBridgeReplicationLagHigh"]["annotations"]["summary"]
    assert "{{ $value | humanizeDuration }}" in summary
    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for name in alerts:
        assert name in ops, f"{name} is not explained in docs/operations.md"


def test_network_policy_allows_only_postgres_nats_dns_and_metrics(chart: helm.Chart) -> None:
    docs = render(chart, load_values(CHART / "ci" / "full-values.yaml"))
    policy = only(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(5432, "TCP"), (4222, "TCP"), (53, "UDP"), (53, "TCP")}
    assert all("to" in rule for rule in policy["egress"])
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"]


# --------------------------------------------------------------------------- bad values


BAD_VALUES: dict[str, dict[str, Any]] = {
    "replicaCount 0": with_values(DEFAULT, "replicaCount", 0),
    "replicaCount 3": with_values(DEFAULT, "replicaCount", 3),
    "replicaCount as string": with_values(DEFAULT, "replicaCount", "1"),
    "unknown top-level key": with_values(DEFAULT, "replicas", 1),
    "no tables": {"secrets": DEFAULT["secrets"]},
    "no DSN anywhere": {"config": DEFAULT["config"]},
    "table not schema.table": with_values(DEFAULT, "config.tables", {"conversations": {}}),
    "metrics disabled": with_values(DEFAULT, "config.metrics.enabled", False),
    "metrics on loopback": with_values(DEFAULT, "config.metrics.host", "127.0.0.1"),
    "port out of range": with_values(DEFAULT, "config.metrics.port", 70000),
    "slot name": with_values(DEFAULT, "config.postgres.slot", "CDC-Bridge"),
    "secret key name": with_values(DEFAULT, "secrets.Postgres-DSN", "x"),
    "secret value not a string": with_values(DEFAULT, "secrets.postgres__password", 123),
    "pullPolicy": with_values(DEFAULT, "image.pullPolicy", "Sometimes"),
    "unknown image key": with_values(DEFAULT, "image.name", "x"),
    "service port as string": with_values(DEFAULT, "service.port", "metrics"),
    "resources as string": with_values(DEFAULT, "resources", "big"),
    "probe typo": with_values(DEFAULT, "livenessProbe.periodSecond", 5),
    "serviceMonitor interval": with_values(DEFAULT, "serviceMonitor.interval", "often"),
    "networkPolicy typo": with_values(DEFAULT, "networkPolicy.egress", []),
    "verify typo": with_values(DEFAULT, "verify.enable", True),
    "verify enabled as string": with_values(DEFAULT, "verify.enabled", "yes"),
    "verify schedule": with_values(DEFAULT, "verify.schedule", "daily"),
    "verify args as string": with_values(DEFAULT, "verify.args", "--sample 10"),
}


@pytest.mark.parametrize("values", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_grace_period_must_exceed_shutdown_timeout(chart: helm.Chart) -> None:
    values = with_values(DEFAULT, "terminationGracePeriodSeconds", 30)
    with pytest.raises(helm.HelmRenderError, match="shutdown_timeout"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    render(chart, with_values(values, "config.shutdown_timeout", 20))  # fine


def test_chart_defaults_alone_are_rejected(chart: helm.Chart) -> None:
    """No tables and no DSN: the chart refuses to render rather than crash-loop a pod."""
    with pytest.raises(helm.HelmValuesError, match="minProperties"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE)


# --------------------------------------------------------------------------- verify


def test_verify_cronjob_is_off_by_default(chart: helm.Chart) -> None:
    assert "CronJob" not in kinds(render(chart, DEFAULT))


def test_verify_cronjob_runs_verify_like_the_bridge_runs(chart: helm.Chart) -> None:
    values = with_values(DEFAULT, "verify.enabled", True)
    values = with_values(values, "verify.args", ["--sample", "1000", "public.conversations"])
    values = with_values(values, "extraEnv", [{"name": "TZ", "value": "UTC"}])
    docs = render(chart, values)
    cron = only(docs, "CronJob")
    deployment = only(docs, "Deployment")
    assert cron["metadata"]["name"] == "cdc-bridge-verify"
    assert cron["spec"]["schedule"] == "17 3 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # exit 1 is a finding: no retries
    assert job["activeDeadlineSeconds"] == 3600
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (verify,) = pod["containers"]
    assert verify["args"] == [
        "verify",
        "--config",
        CONFIG_FILE,
        "--sample",
        "1000",
        "public.conversations",
    ]
    bridge_pod = deployment["spec"]["template"]["spec"]
    main = container(docs)
    # The same image, config, secrets, environment and security as the bridge.
    for key in ("image", "env", "volumeMounts", "securityContext"):
        assert verify[key] == main[key], key
    for key in ("volumes", "securityContext", "serviceAccountName", "enableServiceLinks"):
        assert pod[key] == bridge_pod[key], key
    # The Deployment's selector (and so its Service, PDB, NetworkPolicy) never
    # matches the verify pods.
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = job["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "verify"
    assert verify["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "2Gi"},
    }


# --------------------------------------------------------------------------- docs


def _value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of values.yaml; objects passed through whole count as one value."""
    whole = {
        "config",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "verify.resources",
    }
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in whole:
            yield from _value_paths(value, f"{path}.")
        else:
            yield path


def test_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    defaults = load_values(CHART / "values.yaml")
    missing = [p for p in _value_paths(defaults) if f"`{p}`" not in readme]
    assert missing == [], f"not in helm/cdc-bridge/README.md: {missing}"


def test_schema_knows_every_value(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert set(schema["properties"]) == set(load_values(CHART / "values.yaml"))
