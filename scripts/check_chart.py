"""Checks the freshness-hub Helm chart without a helm binary or a cluster.

Run through scripts/check-chart.sh, which provides the virtualenv. For every
value set (the defaults, each examples/three-regions/values-*.yaml, and every optional
setting at once, ServiceMonitor included) it:

1. lints the chart with Helm's own linter (strict: warnings fail);
2. renders it with Helm's engine, which also applies values.schema.json;
3. validates every rendered manifest against the Kubernetes OpenAPI schemas
   (strict: unknown fields fail), except custom resources such as
   ServiceMonitor, which are only required to render;
4. checks what the hub needs from the chart: its freshness.toml parses and
   holds only keys the hub knows, native gRPC probes on 50051, the non-root
   read-only security context, the Service ports, and the durable log on the
   data volume (a PersistentVolumeClaim per pod unless persistence is off);
5. checks the monitoring it ships, off by default: the Grafana dashboard
   ConfigMap (its label, its JSON) and the PrometheusRule, whose rules must
   pass `promtool check rules` (scripts/install-promtool.sh installs it);
   every metric the dashboard and the rules name must be one the hub
   defines in server/src/metrics.rs; `promtool test rules` feeds the rules
   series that must fire each alert, and healthy ones that must fire none.
6. with relay.enabled, checks the outbox relay's Deployment (the database URL
   from the Secret, the hub, its own selector, its CA, client certificate
   and token mounted from their Secrets: https:// to a TLS hub without
   insecure) and its PodDisruptionBudget.
7. with jetstream.enabled (hub replicas on NATS JetStream), checks the hubs'
   Deployment instead of the StatefulSet: its replicas, `log = "jetstream"`
   and the stream's R in freshness.toml, the NATS URL (and credentials)
   from the Secret, anti-affinity, no data volume, the TLS and auth files'
   mounts, and the PodDisruptionBudget.

The three-region examples must form a full mesh with one shard count. Last,
a few invalid value sets must be rejected; if one is accepted the check fails.

The freshness-agent chart (helm/freshness-agent, beside the hub's) goes through
the same lint, render and schema validation, and its agent.toml must parse and
hold only keys the agent knows (agent/src/config.rs) and name the CA,
client certificate and token files mounted from the Secrets the values give.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import yaml

RELEASE = "freshness-hub"
NAMESPACE = "freshness"
LINT_KUBE_VERSION = "v1.30.0"
# Custom resources: no schema ships with kubernetes-validate, so they are
# rendered and checked by hand but not schema-validated.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# The alerts the PrometheusRule must carry (runbooks in the chart's README).
ALERTS = {
    "FreshnessSLIBurn",
    "FreshnessPeerLagging",
    "FreshnessPeerDisconnected",
    "FreshnessSlowConsumerResets",
    "FreshnessNodesParked",
    "FreshnessLogUnwritable",
    "FreshnessLogFlushSlow",
    "FreshnessHubNotScraped",
}
# The hub's config keys (deny_unknown_fields): a key the chart renders that
# is not one of them makes the hub exit 64 at start. Read from the hub's
# source when it is there (see hub_keys), else this list.
HUB_KEYS = {
    "listen",
    "metrics_listen",
    "region",
    "hub_id",
    "shards",
    "progress_interval",
    "log_max_events",
    "log_max_bytes",
    "max_in_flight",
    "max_events_per_publish",
    "max_payload_bytes",
    "max_message_bytes",
    "shutdown_grace",
    "peers",
    "log_format",
    "max_nodes",
    "max_ack_waiters",
    "shard_queue",
    "admission_timeout",
}
GRPC_PORT = 50051
METRICS_PORT = 9464
NONROOT_UID = 65532

# Every optional setting at once, so that each optional branch renders.
EVERY_OPTION = {
    "image": {"digest": "sha256:" + "0" * 64},
    "imagePullSecrets": [{"name": "registry"}],
    "hub": {
        "region": "eu",
        "hubId": "hub-eu-1",
        "peers": {"us": "http://hub.us.example.com:50051", "ap": "https://[fd00::1]:50051"},
        "limits": {
            "maxNodes": 1000,
            "maxAckWaiters": 100,
            "shardQueue": 64,
            "admissionTimeout": "100ms",
        },
    },
    "otel": {"endpoint": "http://otel-collector.observability:4317"},
    "tls": {
        "certManager": {
            "enabled": True,
            "issuerRef": {"name": "freshness-ca", "kind": "ClusterIssuer"},
            "dnsNames": ["hub.eu.example.com"],
            "uris": ["spiffe://example.org/hub/eu"],
        },
        "clientAuth": True,
    },
    "auth": {
        "policy": {
            "writer": ["publish:user", "publish:price*"],
            "spiffe://example.org/hub/us": ["replicate"],
            "ops": ["status", "subscribe:*"],
        },
        "tokensSecret": "hub-tokens",
        "jwksSecret": "hub-jwks",
        "audience": "freshness-eu",
    },
    "extraEnv": [{"name": "RUST_LOG", "value": "info"}],
    "service": {
        "type": "LoadBalancer",
        "annotations": {"a": "b"},
        "loadBalancerSourceRanges": ["10.0.0.0/8"],
    },
    "podAnnotations": {"a": "b"},
    "podLabels": {"team": "cache"},
    "podDisruptionBudget": {"minAvailable": 1},
    "persistence": {"storageClassName": "fast-ssd", "size": "10Gi"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "grafanaDashboard": {
        "enabled": True,
        "namespace": "monitoring",
        "annotations": {"grafana_folder": "Freshness"},
    },
    "prometheusRule": {
        "enabled": True,
        "labels": {"release": "prometheus"},
        "alertLabels": {"team": "cache"},
        "sliTarget": 0.995,
    },
    "priorityClassName": "high",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "cache", "effect": "NoSchedule"}
    ],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {
                            "matchLabels": {"app.kubernetes.io/name": "freshness-hub"}
                        },
                    },
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ],
    "relay": {
        "enabled": True,
        "replicas": 3,
        "database": {"secretName": "app-db", "secretKey": "url"},
        "migrate": False,
        "hub": "https://hub.eu.example.com:50051",
        "tls": {"caSecret": "hub-eu-ca", "caKey": "ca.pem", "clientSecret": "relay-tls"},
        "token": {"secretName": "relay-token", "secretKey": "jwt"},
        "batch": 5000,
        "ackLevel": "region",
        "pollInterval": "500ms",
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"},
        "extraEnv": [{"name": "FRESHNESS_LOG", "value": "debug"}],
    },
}

# The outbox relay with its defaults.
RELAY = {"insecure": True, "relay": {"enabled": True, "database": {"secretName": "app-db"}}}
# TLS from a Secret, static tokens and a policy, no client certificates.
TLS_SECRET_TOKENS = {
    "tls": {"secretName": "hub-tls"},
    "auth": {"tokensSecret": "hub-tokens", "policy": {"writer": ["publish:*"]}},
}
# The relay beside a hub serving TLS with tokens: https://, the hub's CA,
# its token from a Secret; no insecure.
RELAY_SECURED = {
    **TLS_SECRET_TOKENS,
    "relay": {
        "enabled": True,
        "database": {"secretName": "app-db"},
        "token": {"secretName": "relay-token"},
    },
}
# The relay to a hub requiring client certificates (cert-manager's Secret):
# its own client certificate, no token.
RELAY_MTLS = {
    "tls": {
        "certManager": {"enabled": True, "issuerRef": {"name": "freshness-ca"}},
        "clientAuth": True,
    },
    "auth": {"policy": {"spiffe://example.org/relay": ["publish:*"]}},
    "relay": {
        "enabled": True,
        "database": {"secretName": "app-db"},
        "tls": {"clientSecret": "relay-tls"},
    },
}
# The hub's files: (config key, volume it must be read from).
SECURITY_FILES = {
    "tls_cert": "tls",
    "tls_key": "tls",
    "tls_client_ca": "tls",
    "peer_ca": "tls",
    "auth_policy": "policy",
    "auth_tokens": "tokens",
    "auth_jwks": "jwks",
}
RELAY_TEMPLATE = "templates/relay.yaml"
RELAY_METRICS_PORT = 9465

# Hub replicas on NATS JetStream, with credentials.
JETSTREAM = {
    "jetstream": {
        "enabled": True,
        "replicas": 3,
        "streamReplicas": 3,
        "secretName": "nats",
        "credsKey": "creds",
        "antiAffinity": "required",
    },
    "podDisruptionBudget": {"minAvailable": 2},
    "insecure": True,
}

# Value sets that must be refused, with what makes them wrong.
INVALID = [
    ("neither TLS and an auth source nor insecure", {}),
    ("TLS without an auth source", {"tls": {"secretName": "hub-tls"}}),
    ("client certificates without TLS", {"insecure": True, "tls": {"clientAuth": True}}),
    ("an https:// peer without TLS", {"insecure": True, "hub": {"peers": {"us": "https://a:50051"}}}),
    (
        "cert-manager without an issuer",
        {"tls": {"certManager": {"enabled": True}, "clientAuth": True}},
    ),
    ("a permission the hub does not know", {"insecure": True, "auth": {"policy": {"w": ["delete:*"]}}}),
    ("jetstream without a Secret", {"insecure": True, "jetstream": {"enabled": True}}),
    (
        "jetstream with one hubId for every replica",
        {
            "insecure": True,
            "jetstream": {"enabled": True, "secretName": "nats"},
            "hub": {"hubId": "hub-eu"},
        },
    ),
    (
        "jetstream R of 7",
        {"insecure": True, "jetstream": {"enabled": True, "secretName": "nats", "streamReplicas": 7}},
    ),
    ("shards 0", {"hub": {"shards": 0}}),
    ("unknown top-level key", {"shard": 64}),
    ("unknown hub key", {"hub": {"maxInFlight": 10}}),
    ("log format xml", {"hub": {"logFormat": "xml"}}),
    ("peer URL without port", {"hub": {"peers": {"us": "http://hub.us"}}}),
    ("peer is its own region", {"hub": {"region": "eu", "peers": {"eu": "http://a:50051"}}}),
    ("log smaller than one event per shard", {"hub": {"log": {"maxBytes": 1048576}}}),
    ("fsync sometimes", {"hub": {"log": {"fsync": "sometimes"}}}),
    (
        "a flush alert at 0 s",
        {"insecure": True, "prometheusRule": {"enabled": True, "logFlushP99Seconds": 0}},
    ),
    ("memory tail smaller than one event per shard", {"hub": {"log": {"memoryMaxBytes": 1048576}}}),
    ("persistence without a size", {"persistence": {"enabled": True, "size": None}}),
    ("relay without a database Secret", {"relay": {"enabled": True}}),
    ("relay batch over 10000", {"relay": {"enabled": True, "batch": 20000}}),
    ("relay ack level all", {"relay": {"enabled": True, "ackLevel": "all"}}),
    (
        "relay to a secured hub without a token or a client certificate",
        {**TLS_SECRET_TOKENS, "relay": {"enabled": True, "database": {"secretName": "app-db"}}},
    ),
    (
        "relay CA for an http:// hub",
        {
            "insecure": True,
            "relay": {
                "enabled": True,
                "database": {"secretName": "app-db"},
                "tls": {"caSecret": "hub-ca"},
            },
        },
    ),
]


class Failures:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.lines.append(f"{where}: {what}")

    def check(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            self.add(where, what)


def hub_keys(config_source: Path) -> set[str]:
    """The fields of the hub's `struct Config`, or HUB_KEYS without the source."""
    if not config_source.is_file():
        return HUB_KEYS
    match = re.search(r"pub struct Config \{(.*?)\n\}", config_source.read_text(), re.DOTALL)
    fields = set(re.findall(r"^\s*pub (\w+):", match.group(1), re.MULTILINE)) if match else set()
    return fields or HUB_KEYS


def load_values(path: Path) -> dict[str, Any]:
    # Helm's own YAML reading, so that numbers and nulls come out as for helm -f.
    return helm.values_from_yaml(path.read_text())


def lint(chart_dir: Path, name: str, values: dict[str, Any], failures: Failures) -> None:
    report = helm.lint(
        chart_dir, values, strict=True, namespace=NAMESPACE, kube_version=LINT_KUBE_VERSION
    )
    # Severity 1 is info (e.g. "icon is recommended"); 2 warning, 3 error.
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for message in problems:
        failures.add(f"{name}: lint {message.get('path')}", message.get("error", "").strip())
    if not problems:
        # Errors the linter raised without a message of their own.
        for error in report.get("errors") or []:
            failures.add(f"{name}: lint", error.strip())


def render(
    chart: helm.Chart, values: dict[str, Any], release: str = RELEASE
) -> list[tuple[str, dict[str, Any]]]:
    rendered = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    manifests = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                manifests.append((template.split("/", 1)[-1], doc))
    return manifests


def by_kind(manifests: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests if doc.get("kind") == kind]


def check_hub_contract(
    name: str,
    values: dict[str, Any],
    known_keys: set[str],
    manifests: list[tuple[str, dict[str, Any]]],
    failures: Failures,
) -> dict[str, Any] | None:
    """Checks what the hub and the operability contract need; returns the
    parsed freshness.toml."""
    sets = by_kind(manifests, "StatefulSet")
    config_maps = [
        cm for cm in by_kind(manifests, "ConfigMap") if "freshness.toml" in cm.get("data", {})
    ]
    services = by_kind(manifests, "Service")
    if len(sets) != 1 or len(config_maps) != 1 or len(services) != 1:
        failures.add(name, "want one StatefulSet, one ConfigMap and one Service")
        return None
    deployment, config_map, service = sets[0], config_maps[0], services[0]

    config_text = config_map.get("data", {}).get("freshness.toml")
    if config_text is None:
        failures.add(name, "ConfigMap has no freshness.toml")
        return None
    try:
        config = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as error:
        failures.add(name, f"freshness.toml is not TOML: {error}")
        return None
    unknown = set(config) - known_keys
    failures.check(not unknown, name, f"freshness.toml has keys the hub rejects: {sorted(unknown)}")
    failures.check(
        config.get("listen") == f"0.0.0.0:{GRPC_PORT}", name, "listen is not 0.0.0.0:50051"
    )
    failures.check(
        config.get("metrics_listen") == f"0.0.0.0:{METRICS_PORT}",
        name,
        "metrics_listen is not 0.0.0.0:9464",
    )
    want_region = values.get("hub", {}).get("region", "local")
    failures.check(config.get("region") == want_region, name, f"region is not {want_region!r}")
    for key in ("shards", "log_max_events", "log_max_bytes", "max_in_flight"):
        failures.check(
            isinstance(config.get(key), int) and config[key] >= 1,
            name,
            f"{key} is not a positive integer: {config.get(key)!r}",
        )
    failures.check(
        config.get("region") not in config.get("peers", {}), name, "a hub peers with itself"
    )

    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("containers", [])
    if len(containers) != 1:
        failures.add(name, "want one container")
        return config
    container = containers[0]
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    failures.check(config_path is not None, name, "hub is not started with --config")
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_mount = next(
        (
            m
            for m in mounts.values()
            if config_path and config_path == m["mountPath"].rstrip("/") + "/freshness.toml"
        ),
        None,
    )
    if config_mount is None:
        failures.add(name, f"--config {config_path} is not in a mounted volume")
    else:
        failures.check(config_mount.get("readOnly") is True, name, "config mount is not read-only")
        source = volumes.get(config_mount["name"], {}).get("configMap", {}).get("name")
        failures.check(
            source == config_map["metadata"]["name"], name, "config volume is not the ConfigMap"
        )

    # The durable log: --data-dir on the data volume, a claim per pod unless
    # persistence is off.
    data_dir = args[args.index("--data-dir") + 1] if "--data-dir" in args[:-1] else None
    failures.check(data_dir is not None, name, "hub is not started with --data-dir")
    data_mount = mounts.get("data")
    failures.check(
        data_mount is not None and data_mount["mountPath"] == data_dir,
        name,
        "--data-dir is not the data volume's mount",
    )
    claims = [
        c["metadata"]["name"] for c in deployment["spec"].get("volumeClaimTemplates", [])
    ]
    if values.get("persistence", {}).get("enabled", True):
        failures.check(claims == ["data"], name, "no PersistentVolumeClaim template `data`")
        failures.check("data" not in volumes, name, "data is both a claim and a volume")
    else:
        failures.check(
            not claims and "emptyDir" in volumes.get("data", {}),
            name,
            "persistence off: data should be an emptyDir",
        )
    failures.check(
        deployment["spec"].get("serviceName") == service["metadata"]["name"],
        name,
        "the StatefulSet's serviceName is not the Service",
    )
    failures.check(
        config.get("fsync") in ("always", "interval", "never"),
        name,
        f"fsync is {config.get('fsync')!r}",
    )

    # With TLS the kubelet cannot speak gRPC to the hub (its gRPC probe is
    # plain text only): the port is probed instead.
    tls = "tls_cert" in config
    for probe in ("livenessProbe", "readinessProbe"):
        kind = "tcpSocket" if tls else "grpc"
        port = container.get(probe, {}).get(kind, {}).get("port")
        failures.check(
            port == GRPC_PORT, name, f"{probe} is not a {kind} probe on {GRPC_PORT}"
        )
    failures.check(
        config.get("insecure") is True or (tls and any(
            k in config for k in ("auth_tokens", "auth_jwks", "tls_client_ca")
        )),
        name,
        "the hub would refuse to start: no TLS and auth source, and not insecure",
    )
    check_security_mounts(name, config, container, pod, failures)
    ports = {p.get("containerPort") for p in container.get("ports", [])}
    failures.check(
        {GRPC_PORT, METRICS_PORT} <= ports, name, "container does not expose 50051 and 9464"
    )
    failures.check(bool(container.get("resources")), name, "container has no resources")

    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})

    def either(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    failures.check(either("runAsNonRoot") is True, name, "runAsNonRoot is not set")
    failures.check(either("runAsUser") == NONROOT_UID, name, f"runAsUser is not {NONROOT_UID}")
    failures.check(
        sc.get("allowPrivilegeEscalation") is False, name, "privilege escalation allowed"
    )
    failures.check(sc.get("readOnlyRootFilesystem") is True, name, "root filesystem is writable")
    failures.check(
        "ALL" in sc.get("capabilities", {}).get("drop", []), name, "capabilities are not dropped"
    )
    failures.check(
        (either("seccompProfile") or {}).get("type") == "RuntimeDefault",
        name,
        "seccomp profile is not RuntimeDefault",
    )

    targets = {p.get("targetPort") for p in service["spec"].get("ports", [])}
    failures.check({"grpc", "metrics"} <= targets, name, "Service does not route grpc and metrics")

    if values.get("podDisruptionBudget", {}).get("enabled", True):
        failures.check(
            len(by_kind(manifests, "PodDisruptionBudget")) == 1, name, "no PodDisruptionBudget"
        )
    for monitor in by_kind(manifests, "ServiceMonitor"):
        endpoints = monitor.get("spec", {}).get("endpoints", [])
        failures.check(
            any(e.get("port") == "metrics" and e.get("path") == "/metrics" for e in endpoints),
            name,
            "ServiceMonitor does not scrape metrics:/metrics",
        )
    return config


def check_security_mounts(
    name: str,
    config: dict[str, Any],
    container: dict[str, Any],
    pod: dict[str, Any],
    failures: Failures,
) -> None:
    """Every TLS and auth file the config names is in a read-only volume of
    the pod; with TLS the probes are TCP ones (the kubelet's gRPC probe is
    plain text only)."""
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for key, volume in SECURITY_FILES.items():
        if key not in config:
            continue
        mount = mounts.get(volume)
        failures.check(
            mount is not None
            and mount.get("readOnly") is True
            and config[key].startswith(mount["mountPath"].rstrip("/") + "/"),
            name,
            f"{key} {config[key]} is not in the read-only {volume} volume",
        )
        failures.check(volume in volumes, name, f"no {volume} volume for {key}")
    tls = "tls_cert" in config
    for probe in ("livenessProbe", "readinessProbe"):
        kind = "tcpSocket" if tls else "grpc"
        port = container.get(probe, {}).get(kind, {}).get("port")
        failures.check(
            port == GRPC_PORT, name, f"{probe} is not a {kind} probe on {GRPC_PORT}"
        )


def check_jetstream(
    name: str,
    values: dict[str, Any],
    known_keys: set[str],
    manifests: list[tuple[str, dict[str, Any]]],
    failures: Failures,
) -> None:
    """Hub replicas on NATS JetStream: a Deployment sharing the region's stream."""
    js = values["jetstream"]
    failures.check(not by_kind(manifests, "StatefulSet"), name, "a StatefulSet with jetstream")
    deployments = by_kind(manifests, "Deployment")
    config_maps = [
        cm for cm in by_kind(manifests, "ConfigMap") if "freshness.toml" in cm.get("data", {})
    ]
    if len(deployments) != 1 or len(config_maps) != 1:
        failures.add(name, "want one Deployment and one ConfigMap")
        return
    deployment = deployments[0]
    failures.check(
        deployment["spec"].get("replicas") == js.get("replicas", 3),
        name,
        "Deployment replicas are not jetstream.replicas",
    )
    config = tomllib.loads(config_maps[0]["data"]["freshness.toml"])
    unknown = set(config) - known_keys
    failures.check(not unknown, name, f"freshness.toml has keys the hub rejects: {sorted(unknown)}")
    failures.check(config.get("log") == "jetstream", name, "log is not jetstream")
    failures.check(
        config.get("jetstream_replicas") == js.get("streamReplicas", 3),
        name,
        "jetstream_replicas is not jetstream.streamReplicas",
    )
    failures.check(
        config.get("peers", {}) == values.get("hub", {}).get("peers", {}),
        name,
        "peers are not hub.peers",
    )
    failures.check("hub_id" not in config, name, "one hub_id for every replica")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get("FRESHNESS_NATS_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    failures.check(
        ref.get("name") == js["secretName"] and ref.get("key") == js.get("urlKey", "url"),
        name,
        "FRESHNESS_NATS_URL is not from the Secret",
    )
    check_security_mounts(name, config, container, pod, failures)
    args = container.get("args", [])
    failures.check("--data-dir" not in args, name, "a data directory with jetstream")
    if js.get("credsKey"):
        creds = args[args.index("--nats-creds") + 1] if "--nats-creds" in args[:-1] else None
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mount = mounts.get("nats-creds", {})
        failures.check(
            creds is not None and creds == mount.get("mountPath", "") + "/creds",
            name,
            "--nats-creds is not the mounted Secret",
        )
        failures.check(
            volumes.get("nats-creds", {}).get("secret", {}).get("secretName") == js["secretName"],
            name,
            "the credentials volume is not the Secret",
        )
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    failures.check(bool(anti), name, "no pod anti-affinity between hub replicas")
    pdbs = by_kind(manifests, "PodDisruptionBudget")
    failures.check(len(pdbs) == 1, name, "no PodDisruptionBudget")
    selector = deployment["spec"]["selector"]["matchLabels"]
    for pdb in pdbs:
        failures.check(
            pdb["spec"]["selector"]["matchLabels"] == selector,
            name,
            "the PodDisruptionBudget does not select the hub replicas",
        )


def hub_metrics(metrics_source: Path) -> set[str]:
    """The metric names the hub defines (string constants in metrics.rs)."""
    if not metrics_source.is_file():
        return set()
    return set(re.findall(r'"(freshness_[a-z0-9_]+)"', metrics_source.read_text()))


def unknown_metrics(text: str, known: set[str]) -> set[str]:
    """Metric names in PromQL `text` that the hub does not define (a
    histogram's _bucket, _sum and _count count as its own)."""
    used = set(re.findall(r"\b(freshness_[a-z0-9_]+)", text))
    suffixes = ("_bucket", "_sum", "_count")
    return {
        m
        for m in used
        if m not in known and not any(m.endswith(x) and m[: -len(x)] in known for x in suffixes)
    }


def check_monitoring(
    name: str,
    values: dict[str, Any],
    manifests: list[tuple[str, dict[str, Any]]],
    metrics: set[str],
    failures: Failures,
) -> int:
    """The dashboard ConfigMap and the PrometheusRule, when enabled (and
    only then); returns how many rule files promtool passed."""
    dashboards = [
        cm for cm in by_kind(manifests, "ConfigMap") if "freshness-hub.json" in cm.get("data", {})
    ]
    rules = by_kind(manifests, "PrometheusRule")
    want_dashboard = values.get("grafanaDashboard", {}).get("enabled", False)
    want_rules = values.get("prometheusRule", {}).get("enabled", False)
    failures.check(
        len(dashboards) == int(want_dashboard), name, f"{len(dashboards)} dashboard ConfigMaps"
    )
    failures.check(len(rules) == int(want_rules), name, f"{len(rules)} PrometheusRules")
    for cm in dashboards:
        labels = cm["metadata"].get("labels", {})
        failures.check(
            labels.get("grafana_dashboard") == "1", name, "dashboard lacks grafana_dashboard: '1'"
        )
        try:
            dashboard = json.loads(cm["data"]["freshness-hub.json"])
        except json.JSONDecodeError as error:
            failures.add(name, f"dashboard is not JSON: {error}")
            continue
        exprs = [
            t.get("expr", "")
            for p in dashboard.get("panels", [])
            for t in p.get("targets", [])
        ]
        failures.check(len(exprs) >= 10, name, f"dashboard has {len(exprs)} queries")
        missing = unknown_metrics("\n".join(exprs), metrics) if metrics else set()
        failures.check(not missing, name, f"dashboard queries unknown metrics {sorted(missing)}")
    passed = 0
    for rule in rules:
        groups = rule.get("spec", {}).get("groups", [])
        alerts = {r.get("alert") for g in groups for r in g.get("rules", [])}
        failures.check(ALERTS <= alerts, name, f"alerts missing: {sorted(ALERTS - alerts)}")
        exprs = "\n".join(r.get("expr", "") for g in groups for r in g.get("rules", []))
        missing = unknown_metrics(exprs, metrics) if metrics else set()
        failures.check(not missing, name, f"rules query unknown metrics {sorted(missing)}")
        promtool = shutil.which("promtool")
        if promtool is None:
            failures.add(name, "promtool is missing: run scripts/install-promtool.sh")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump({"groups": groups}, f)
            f.flush()
            run = subprocess.run(
                [promtool, "check", "rules", f.name], capture_output=True, text=True
            )
        if run.returncode != 0:
            failures.add(name, f"promtool check rules: {(run.stdout + run.stderr).strip()}")
        else:
            passed += 1
    return passed


# `promtool test rules` cases for the rules rendered with the default
# thresholds: series that must fire each alert at 10m, and healthy series
# that must fire none. Labels as a ServiceMonitor scrape gives them.
SERIES = 'job="freshness-hub",namespace="freshness",pod="hub-0"'
WHERE = {"namespace": "freshness", "pod": "hub-0"}
FIRING = [
    (f"freshness_deliveries_acked_total{{{SERIES}}}", "0+1000x20"),
    (f"freshness_deliveries_acked_within_1s_total{{{SERIES}}}", "0+990x20"),
    (f'freshness_peer_lag_seconds{{{SERIES},peer="us"}}', "0.2x3 5x17"),
    (f'freshness_peer_connected{{{SERIES},peer="us"}}', "1x3 0x17"),
    (f'freshness_peer_link_held{{{SERIES},peer="us"}}', "1x20"),
    (f'freshness_resets_total{{{SERIES},reason="RESET_REASON_SLOW_CONSUMER"}}', "0x5 0+5x15"),
    (f"freshness_nodes_parked{{{SERIES}}}", "0x2 3x18"),
    (f"freshness_log_writable{{{SERIES}}}", "1x2 0x18"),
    # A tenth of the flushes above 50 ms.
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.001"}}', "0+80x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.05"}}', "0+90x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.25"}}', "0+100x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="+Inf"}}', "0+100x20"),
    (f"up{{{SERIES}}}", "1x2 0x18"),
]
HEALTHY = [
    (f"freshness_deliveries_acked_total{{{SERIES}}}", "0+1000x20"),
    (f"freshness_deliveries_acked_within_1s_total{{{SERIES}}}", "0+1000x20"),
    (f'freshness_peer_lag_seconds{{{SERIES},peer="us"}}', "0.2x20"),
    (f'freshness_peer_connected{{{SERIES},peer="us"}}', "1x20"),
    (f'freshness_peer_link_held{{{SERIES},peer="us"}}', "1x20"),
    (f'freshness_resets_total{{{SERIES},reason="RESET_REASON_SLOW_CONSUMER"}}', "0+1x20"),
    (f"freshness_nodes_parked{{{SERIES}}}", "0x20"),
    (f"freshness_log_writable{{{SERIES}}}", "1x20"),
    # Every flush under 1 ms.
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.001"}}', "0+100x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.05"}}', "0+100x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="0.25"}}', "0+100x20"),
    (f'freshness_log_flush_seconds_bucket{{{SERIES},le="+Inf"}}', "0+100x20"),
    (f"up{{{SERIES}}}", "1x20"),
]
# A replica whose region's link another replica holds: its own link
# gauges say nothing about the region, and fire nothing.
NOT_HOLDING = [
    (s, "5x20" if "lag" in s else "0x20" if "peer_" in s else v) for s, v in HEALTHY
]
EXPECTED = {
    "FreshnessSLIBurn": {"severity": "critical", **WHERE},
    "FreshnessPeerLagging": {"severity": "warning", "peer": "us", **WHERE},
    "FreshnessPeerDisconnected": {"severity": "warning", "peer": "us", **WHERE},
    "FreshnessSlowConsumerResets": {"severity": "warning", **WHERE},
    "FreshnessNodesParked": {"severity": "warning", **WHERE},
    "FreshnessLogUnwritable": {"severity": "critical", **WHERE},
    "FreshnessLogFlushSlow": {"severity": "warning", **WHERE},
    "FreshnessHubNotScraped": {"severity": "critical", "job": "freshness-hub", **WHERE},
}


def test_rules(chart: helm.Chart, failures: Failures) -> int:
    """Runs promtool's unit tests on the rules rendered with the default
    thresholds; returns how many alert cases passed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        failures.add("rules", "promtool is missing: run scripts/install-promtool.sh")
        return 0
    manifests = render(chart, {"insecure": True, "prometheusRule": {"enabled": True}})
    rules = by_kind(manifests, "PrometheusRule")
    if len(rules) != 1:
        failures.add("rules", "prometheusRule.enabled rendered no PrometheusRule")
        return 0
    groups = rules[0]["spec"]["groups"]
    # promtool compares annotations too; the cases test expressions,
    # durations and labels.
    for group in groups:
        for rule in group.get("rules", []):
            rule.pop("annotations", None)

    def case(series: list[tuple[str, str]], firing: bool) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": alert,
                    "exp_alerts": [{"exp_labels": labels}] if firing else [],
                }
                for alert, labels in EXPECTED.items()
            ],
        }

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        Path(tmp, "test.yaml").write_text(
            yaml.safe_dump(
                {
                    "rule_files": ["rules.yaml"],
                    "evaluation_interval": "1m",
                    "tests": [
                        case(FIRING, True),
                        case(HEALTHY, False),
                        case(NOT_HOLDING, False),
                    ],
                }
            )
        )
        run = subprocess.run(
            [promtool, "test", "rules", "test.yaml"], cwd=tmp, capture_output=True, text=True
        )
    if run.returncode != 0:
        failures.add("rules", f"promtool test rules: {(run.stdout + run.stderr).strip()}")
        return 0
    return 3 * len(EXPECTED)
def check_relay(
    name: str,
    values: dict[str, Any],
    manifests: list[tuple[str, dict[str, Any]]],
    hub_service: str | None,
    failures: Failures,
) -> None:
    """What the outbox relay needs: the database URL from the Secret (never
    inline), the hub, its own pods, a PodDisruptionBudget."""
    relay = values.get("relay", {})
    deployments = by_kind(manifests, "Deployment")
    if len(deployments) != 1:
        failures.add(name, "relay.enabled rendered no relay Deployment")
        return
    deployment = deployments[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    failures.check(
        container.get("command") == ["/usr/local/bin/freshness-relay", "run"],
        name,
        "relay container does not run freshness-relay run",
    )
    env = {e["name"]: e for e in container.get("env", [])}
    url = env.get("FRESHNESS_RELAY_DATABASE_URL", {})
    ref = url.get("valueFrom", {}).get("secretKeyRef", {})
    database = relay.get("database", {})
    failures.check(
        "value" not in url
        and ref.get("name") == database.get("secretName")
        and ref.get("key") == database.get("secretKey", "database-url"),
        name,
        "relay database URL does not come from relay.database's Secret",
    )
    want_hub = relay.get("hub") or hub_service
    failures.check(
        env.get("FRESHNESS_RELAY_HUB", {}).get("value") == want_hub,
        name,
        f"relay does not publish to {want_hub}",
    )
    failures.check(
        env.get("FRESHNESS_RELAY_METRICS_LISTEN", {}).get("value")
        == f"0.0.0.0:{RELAY_METRICS_PORT}",
        name,
        f"relay metrics are not served on 0.0.0.0:{RELAY_METRICS_PORT}",
    )
    failures.check(
        deployment["spec"].get("replicas") == relay.get("replicas", 2),
        name,
        "relay replicas differ from relay.replicas",
    )
    init = [c for c in pod.get("initContainers", []) if c.get("name") == "migrate"]
    failures.check(
        bool(init) == relay.get("migrate", True), name, "migrate init container does not follow relay.migrate"
    )
    selector = deployment["spec"]["selector"]["matchLabels"]
    failures.check(
        selector.get("app.kubernetes.io/name", "").endswith("-relay"),
        name,
        "relay pods could be selected by the hub's Service",
    )
    check_relay_credentials(name, values, pod, container, env, want_hub or "", failures)
    pdbs = by_kind(manifests, "PodDisruptionBudget")
    if relay.get("podDisruptionBudget", {}).get("enabled", True):
        failures.check(
            len(pdbs) == 1 and pdbs[0]["spec"]["selector"]["matchLabels"] == selector,
            name,
            "no PodDisruptionBudget for the relay",
        )


def hub_tls_secret(values: dict[str, Any]) -> str | None:
    """The hub's TLS Secret as the chart names it, or None without TLS."""
    tls = values.get("tls", {})
    if tls.get("secretName"):
        return tls["secretName"]
    if tls.get("certManager", {}).get("enabled"):
        # The release name holds the chart name, so the full name is the
        # release name.
        return f"{RELEASE}-tls"
    return None


def check_relay_credentials(
    name: str,
    values: dict[str, Any],
    pod: dict[str, Any],
    container: dict[str, Any],
    env: dict[str, Any],
    hub: str,
    failures: Failures,
) -> None:
    """Each credential the values give is mounted from its Secret and named
    in the relay's environment: the CA (by default the hub's own TLS
    Secret's ca.crt, for this release's hub), the client certificate, the
    token file."""
    relay = values.get("relay", {})
    volumes = {v["name"]: v.get("secret", {}) for v in pod.get("volumes", [])}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}

    def file_from(var: str, volume: str, secret: str | None, key: str, path: str) -> None:
        source = volumes.get(volume, {})
        items = {i["key"]: i["path"] for i in source.get("items", [])}
        value = env.get(var, {}).get("value", "")
        failures.check(
            source.get("secretName") == secret
            and items.get(key) == path
            and value == f"{mounts.get(volume)}/{path}",
            name,
            f"relay {var} is not {key} of Secret {secret}",
        )

    tls = relay.get("tls", {})
    ca = tls.get("caSecret") or (None if relay.get("hub") else hub_tls_secret(values))
    if ca:
        failures.check(hub.startswith("https://"), name, "relay has a CA but no https:// hub")
        file_from("FRESHNESS_RELAY_CA", "hub-ca", ca, tls.get("caKey", "ca.crt"), "ca.crt")
    else:
        failures.check("FRESHNESS_RELAY_CA" not in env, name, "relay has a CA it was not given")
    if tls.get("clientSecret"):
        file_from("FRESHNESS_RELAY_CERT", "client-tls", tls["clientSecret"], "tls.crt", "tls.crt")
        file_from("FRESHNESS_RELAY_KEY", "client-tls", tls["clientSecret"], "tls.key", "tls.key")
    token = relay.get("token", {})
    if token.get("secretName"):
        file_from(
            "FRESHNESS_RELAY_TOKEN_FILE",
            "token",
            token["secretName"],
            token.get("secretKey", "token"),
            "token",
        )
    failures.check(
        "FRESHNESS_RELAY_TOKEN" not in env, name, "relay token inline instead of from a Secret"
    )


def validate(
    name: str,
    manifests: list[tuple[str, dict[str, Any]]],
    kube_versions: list[str],
    failures: Failures,
) -> tuple[int, int]:
    """Validates against the Kubernetes schemas; returns (validated, custom)."""
    validated = custom = 0
    for template, doc in manifests:
        where = f"{name}: {template} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
            custom += 1
            continue
        ok = True
        for version in kube_versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = "/".join(str(p) for p in error.path)
                failures.add(where, f"Kubernetes {version}: {path}: {error.message}")
                ok = False
            except kubernetes_validate.SchemaNotFoundError as error:
                failures.add(where, error.message)
                ok = False
        validated += ok
    return validated, custom


# The agent chart: every optional setting at once, and value sets it must refuse.
AGENT_RELEASE = "web-cache"
AGENT_METRICS_PORT = 9465
AGENT_EVERY_OPTION = {
    "image": {"digest": "sha256:" + "0" * 64},
    "imagePullSecrets": [{"name": "registry"}],
    "agent": {
        "hub": "https://freshness-hub.freshness:50051",
        "redis": "redis://web-cache-redis:6379/2",
        "nodeId": "web-cache-agent",
        "map": {"user": ["cache:user:{id}", "cache:user:{id}:profile"], "post": ["p:{id}"]},
        "namespaces": ["user", "post", "price"],
        "failClosed": {"price": "2s"},
        "tombstoneTtl": "5s",
    },
    "tls": {"caSecret": "freshness-hub-tls", "clientSecret": "web-cache-agent-tls"},
    "token": {"secretName": "web-cache-agent-token", "secretKey": "jwt"},
    "otel": {"endpoint": "http://otel-collector.observability:4317"},
    "extraEnv": [{"name": "FRESHNESS_AGENT_REDIS", "value": "redis://:pw@r:6379/0"}],
    "podAnnotations": {"a": "b"},
    "podLabels": {"team": "cache"},
    "priorityClassName": "high",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
}
AGENT_INVALID = [
    ("shards 0", {"agent": {"shards": 0}}),
    ("unknown agent key", {"agent": {"tombstone": "1s"}}),
    ("template without {id}", {"agent": {"map": {"user": ["cache:user"]}}}),
    ("namespace with capitals", {"agent": {"map": {"User": ["u:{id}"]}}}),
    ("hub URL without port", {"agent": {"hub": "http://hub"}}),
    ("a CA for an http:// hub", {"tls": {"caSecret": "hub-tls"}}),
    ("a client certificate for an http:// hub", {"tls": {"clientSecret": "agent-tls"}}),
]


def agent_keys(config_source: Path) -> set[str]:
    """The fields of the agent's `struct Config`."""
    match = re.search(r"pub struct Config \{(.*?)\n\}", config_source.read_text(), re.DOTALL)
    return set(re.findall(r"^\s*pub (\w+):", match.group(1), re.MULTILINE)) if match else set()


def check_agent_chart(
    chart_dir: Path, config_source: Path, kube_versions: list[str], failures: Failures
) -> tuple[int, int, int]:
    """Lints, renders and validates the agent chart; returns (value sets,
    manifests validated, invalid value sets rejected)."""
    known = agent_keys(config_source)
    failures.check(bool(known), "agent chart", f"no struct Config in {config_source}")
    value_sets = [("agent defaults", {}), ("agent every option", AGENT_EVERY_OPTION)]
    validated = 0
    with helm.Chart.load(chart_dir) as chart:
        for name, values in value_sets:
            lint(chart_dir, name, values, failures)
            try:
                manifests = render(chart, values, AGENT_RELEASE)
            except helm.HelmError as error:
                failures.add(f"{name}: render", str(error).strip())
                continue
            validated += validate(name, manifests, kube_versions, failures)[0]
            deployments = by_kind(manifests, "Deployment")
            config_maps = by_kind(manifests, "ConfigMap")
            if len(deployments) != 1 or len(config_maps) != 1:
                failures.add(name, "want one Deployment and one ConfigMap")
                continue
            try:
                config = tomllib.loads(config_maps[0].get("data", {}).get("agent.toml", ""))
            except tomllib.TOMLDecodeError as error:
                failures.add(name, f"agent.toml is not TOML: {error}")
                continue
            unknown = set(config) - known
            failures.check(not unknown, name, f"agent.toml has keys the agent rejects: {sorted(unknown)}")
            want_map = values.get("agent", {}).get("map", {})
            failures.check(config.get("map") == want_map, name, f"map is {config.get('map')!r}")
            spec = deployments[0]["spec"]
            failures.check(spec.get("replicas") == 1, name, "the agent must run one replica")
            failures.check(
                spec.get("strategy", {}).get("type") == "Recreate",
                name,
                "two agents with one node id would overlap in a rolling update",
            )
            container = spec["template"]["spec"]["containers"][0]
            ports = {p.get("containerPort") for p in container.get("ports", [])}
            failures.check(AGENT_METRICS_PORT in ports, name, "metrics port 9465 not exposed")
            failures.check(
                config.get("metrics_listen") == f"0.0.0.0:{AGENT_METRICS_PORT}",
                name,
                "metrics_listen is not 0.0.0.0:9465",
            )
            check_agent_credentials(name, values, spec["template"]["spec"], container, config, failures)
            sc = container.get("securityContext", {})
            failures.check(sc.get("readOnlyRootFilesystem") is True, name, "root filesystem is writable")
            failures.check(sc.get("runAsNonRoot") is True, name, "runAsNonRoot is not set")
        for what, values in AGENT_INVALID:
            try:
                chart.render(values, name=AGENT_RELEASE, namespace=NAMESPACE, is_install=True)
            except (helm.HelmValuesError, helm.HelmRenderError):
                continue
            failures.add("agent negative check", f"values with {what} were accepted")
    return len(value_sets), validated, len(AGENT_INVALID)


def check_agent_credentials(
    name: str,
    values: dict[str, Any],
    pod: dict[str, Any],
    container: dict[str, Any],
    config: dict[str, Any],
    failures: Failures,
) -> None:
    """Each credential the values give is mounted from its Secret and named
    in agent.toml; none is named that was not given."""
    volumes = {v["name"]: v.get("secret", {}) for v in pod.get("volumes", [])}
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    tls = values.get("tls", {})
    token = values.get("token", {})
    wanted = {
        "ca": ("hub-ca", tls.get("caSecret"), tls.get("caKey", "ca.crt"), "ca.crt"),
        "cert": ("client-tls", tls.get("clientSecret"), "tls.crt", "tls.crt"),
        "key": ("client-tls", tls.get("clientSecret"), "tls.key", "tls.key"),
        "token_file": ("token", token.get("secretName"), token.get("secretKey", "token"), "token"),
    }
    for setting, (volume, secret, key, path) in wanted.items():
        if not secret:
            failures.check(setting not in config, name, f"agent.toml names {setting} it was not given")
            continue
        source = volumes.get(volume, {})
        items = {i["key"]: i["path"] for i in source.get("items", [])}
        failures.check(
            source.get("secretName") == secret
            and items.get(key) == path
            and config.get(setting) == f"{mounts.get(volume)}/{path}",
            name,
            f"agent {setting} is not {key} of Secret {secret}",
        )


def check_mesh(configs: dict[str, dict[str, Any]], failures: Failures) -> None:
    """The three-region examples: one shard count, every hub peers with all others."""
    regions = {config.get("region") for config in configs.values()}
    shards = {config.get("shards") for config in configs.values()}
    failures.check(len(regions) == len(configs), "examples", "two example files share a region")
    failures.check(len(shards) == 1, "examples", f"shard counts differ between regions: {shards}")
    for name, config in configs.items():
        peers = set(config.get("peers", {}))
        want = regions - {config.get("region")}
        failures.check(peers == want, name, f"peers {sorted(peers)}, want {sorted(want)}")


def check_invalid(chart: helm.Chart, failures: Failures) -> int:
    """Every INVALID value set must be refused by the schema or the templates."""
    for what, values in INVALID:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except (helm.HelmValuesError, helm.HelmRenderError):
            continue
        failures.add("negative check", f"values with {what} were accepted")
    # The schema alone must refuse shards 0, so that `helm install` stops
    # before any template runs.
    try:
        chart.validate_schema(chart.merge_values({"hub": {"shards": 0}}))
        failures.add("negative check", "values.schema.json accepts shards 0")
    except helm.HelmValuesError:
        pass
    return len(INVALID)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chart", type=Path)
    parser.add_argument(
        "--kube-version",
        action="append",
        dest="kube_versions",
        help="Kubernetes version to validate against (repeatable); "
        "default 1.30 and the newest kubernetes-validate ships",
    )
    parser.add_argument(
        "--hub-config",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "server" / "src" / "config.rs",
        help="the hub's config source, to read the keys it accepts from",
    )
    parser.add_argument(
        "--agent-chart",
        type=Path,
        help="the freshness-agent chart [default: freshness-agent beside CHART]",
    )
    parser.add_argument(
        "--agent-config",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "agent" / "src" / "config.rs",
        help="the agent's config source, to read the keys it accepts from",
    )
    args = parser.parse_args()
    chart_dir: Path = args.chart.resolve()
    kube_versions = args.kube_versions or ["1.30.0", kubernetes_validate.utils.latest_version()]

    examples = sorted((chart_dir / "examples" / "three-regions").glob("values-*.yaml"))
    value_sets: list[tuple[str, dict[str, Any]]] = [("defaults, insecure", {"insecure": True})]
    value_sets += [(str(p.relative_to(chart_dir)), load_values(p)) for p in examples]
    value_sets.append(("every option", EVERY_OPTION))
    value_sets.append(
        (
            "no persistence, fsync interval",
            {
                "insecure": True,
                "persistence": {"enabled": False},
                "hub": {"log": {"fsync": "interval", "fsyncInterval": "50ms"}},
            },
        )
    )
    value_sets.append(("relay", RELAY))
    value_sets.append(("relay to a TLS hub with a token", RELAY_SECURED))
    value_sets.append(("relay to an mTLS hub with a client certificate", RELAY_MTLS))
    value_sets.append(("TLS from a Secret, tokens, a policy", TLS_SECRET_TOKENS))
    value_sets.append(("jetstream", JETSTREAM))
    value_sets.append(
        (
            "jetstream over TLS with tokens",
            {**{k: v for k, v in JETSTREAM.items() if k != "insecure"}, **TLS_SECRET_TOKENS},
        )
    )
    value_sets.append(
        ("jetstream defaults", {"insecure": True, "jetstream": {"enabled": True, "secretName": "nats"}})
    )
    value_sets.append(
        (
            "jetstream with peer regions",
            {
                **JETSTREAM,
                "hub": {
                    "region": "eu",
                    "peers": {"us": "http://hub.us:50051", "ap": "http://hub.ap:50051"},
                },
            },
        )
    )
    known_keys = hub_keys(args.hub_config)
    metrics = hub_metrics(args.hub_config.parent / "metrics.rs")

    failures = Failures()
    failures.check(
        len(examples) == 3, "examples", f"want 3 three-region values files, found {len(examples)}"
    )
    validated = custom = rule_files = 0
    example_configs: dict[str, dict[str, Any]] = {}
    with helm.Chart.load(chart_dir) as chart:
        for name, values in value_sets:
            lint(chart_dir, name, values, failures)
            try:
                manifests = render(chart, values)
            except helm.HelmError as error:
                failures.add(f"{name}: render", str(error).strip())
                continue
            relay = [(t, d) for t, d in manifests if t == RELAY_TEMPLATE]
            hub = [(t, d) for t, d in manifests if t != RELAY_TEMPLATE]
            if values.get("jetstream", {}).get("enabled"):
                check_jetstream(name, values, known_keys, hub, failures)
                config = None
            else:
                config = check_hub_contract(name, values, known_keys, hub, failures)
            if values.get("relay", {}).get("enabled"):
                services = by_kind(hub, "Service")
                scheme = "https" if hub_tls_secret(values) else "http"
                hub_service = (
                    f"{scheme}://{services[0]['metadata']['name']}:{GRPC_PORT}"
                    if services
                    else None
                )
                check_relay(name, values, relay, hub_service, failures)
            else:
                failures.check(not relay, name, "relay rendered while relay.enabled is false")
            if config is not None and name.startswith("examples/"):
                example_configs[name] = config
            rule_files += check_monitoring(name, values, manifests, metrics, failures)
            counts = validate(name, manifests, kube_versions, failures)
            validated += counts[0]
            custom += counts[1]
        failures.check(
            custom >= 2, "every option", "no ServiceMonitor and PrometheusRule rendered"
        )
        failures.check(rule_files >= 1, "every option", "no rules passed promtool")
        check_mesh(example_configs, failures)
        rejected = check_invalid(chart, failures)
        alert_cases = test_rules(chart, failures)
    agent_dir = (args.agent_chart or chart_dir.parent / "freshness-agent").resolve()
    agent_sets, agent_valid, agent_rejected = check_agent_chart(
        agent_dir, args.agent_config, kube_versions, failures
    )

    if failures.lines:
        for line in failures.lines:
            print(f"FAIL {line}", file=sys.stderr)
        print(f"chart: {len(failures.lines)} problem(s)", file=sys.stderr)
        return 1
    versions = ", ".join(kubernetes_validate.utils.major_minor(v) for v in kube_versions)
    print(
        f"chart: {len(value_sets)} value sets, {validated} manifests valid "
        f"(Kubernetes {versions}), {custom} custom resource(s) rendered, "
        f"{rule_files} rule file(s) passed promtool, {alert_cases} alert cases passed "
        f"promtool test rules, {rejected} invalid value sets rejected"
    )
    print(
        f"agent chart: {agent_sets} value sets, {agent_valid} manifests valid, "
        f"{agent_rejected} invalid value sets rejected"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
