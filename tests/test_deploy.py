"""deploy/ against the code it deploys: every option, setting, environment variable, metric
and endpoint the deployment files name must exist in sdns_monitor. The names are taken from
the real CLI, settings loader, metrics registry and HTTP server, never from a list kept here,
so a rename on either side fails a test. No broker, no network."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from typer.testing import CliRunner

import sdns_monitor.settings as settings_module
from sdns_monitor.cli import app
from sdns_monitor.errors import ConfigError
from sdns_monitor.settings import RunSettings, load_settings
from sdns_monitor.stream.prometheus import Metrics
from sdns_monitor.stream.server import HealthServer
from tests.settings_probe import env_read_by_the_loader

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
UNIT = DEPLOY / "systemd" / "sdns-monitor.service"
ENV_FILE = DEPLOY / "systemd" / "sdns-monitor.env"
CONFIG_EXAMPLE = DEPLOY / "config.example.toml"
DASHBOARD = DEPLOY / "grafana" / "sdns-monitor.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
# Where the systemd unit's README install puts the example config.
SYSTEMD_FILES = {"/etc/sdns-monitor/config.toml": CONFIG_EXAMPLE}


# ---------------------------------------------------------------------------- reading deploy/
def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _k8s_manifests() -> dict[Path, list[dict[str, Any]]]:
    return {p: _yaml_docs(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _k8s(kind: str) -> dict[str, Any]:
    (doc,) = [d for docs in _k8s_manifests().values() for d in docs if d["kind"] == kind]
    return doc


def _kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return doc


def _container() -> dict[str, Any]:
    (container,) = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    steps = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in _containerfile():
        if op == "ENV":
            env.update(tok.split("=", 1) for tok in shlex.split(args))  # type: ignore[misc]
    return env


def _image_argv() -> list[str]:
    steps = dict(_containerfile())
    argv: list[str] = json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"])
    return argv


def _unit() -> dict[str, list[str]]:
    """The unit's directives (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _env_file(path: Path) -> dict[str, str]:
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if re.match(r"\w+=", ln))
    return {k: v for k, v in pairs}


def _run_args(argv: list[str]) -> list[str]:
    """The arguments after `sdns-monitor run` in a command line."""
    for i, token in enumerate(argv[:-1]):
        if Path(token).name == "sdns-monitor" and argv[i + 1] == "run":
            return argv[i + 2 :]
    raise AssertionError(f"no `sdns-monitor run` in {argv}")


def _invocations() -> dict[str, list[str]]:
    """Every `sdns-monitor run` of deploy/, by where it is."""
    container = _container()
    monitor = _compose()["services"]["monitor"]
    entrypoint = json.loads(dict(_containerfile())["ENTRYPOINT"])
    (exec_start,) = _unit()["ExecStart"]
    return {
        "kubernetes/deployment.yaml": _run_args(container["command"] + container["args"]),
        "systemd/sdns-monitor.service": _run_args(shlex.split(exec_start)),
        "Containerfile": _run_args(_image_argv()),
        "compose.yaml": _run_args(entrypoint + monitor["command"]),
    }


def _promql(text: str) -> set[str]:
    return set(re.findall(r"\bsdns_[a-zA-Z0-9_:]+", text))


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard["panels"]):
        for target in p.get("targets", []):
            yield target["expr"]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            yield query["query"] if isinstance(query, dict) else query


# ---------------------------------------------------------------------------- the real code
def _cli_options() -> set[str]:
    command = typer.main.get_command(app)
    run = command.commands["run"]  # type: ignore[attr-defined]
    return {opt for param in run.params for opt in [*param.opts, *param.secondary_opts]}


_SERIES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _metric_names() -> set[str]:
    """Every series name a real Metrics registry exposes (labelled families with no child yet
    have no samples, so the names come from each family's type)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _SERIES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


class _Parsed(Exception):
    def __init__(self, cli: dict[str, Any], config: Path | None) -> None:
        self.cli, self.config = cli, config


def _settings(
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: Mapping[str, str],
    files: Mapping[str, Path],
) -> RunSettings:
    """The settings `sdns-monitor run ARGS` would start with: the real command parses ARGS
    (stopped before it loads a model), then the real loader merges them with `env` and the
    config file, read from the deploy/ file that `files` says is mounted at its path."""

    def parsed(cli: dict[str, Any], _env: Any, config: Path | None = None) -> RunSettings:
        raise _Parsed(dict(cli), config)

    with monkeypatch.context() as patch:
        patch.setattr(settings_module, "load_settings", parsed)
        result = CliRunner().invoke(app, ["run", *args])
    assert isinstance(result.exception, _Parsed), f"`run {shlex.join(args)}`: {result.output}"
    config = result.exception.config
    assert config is None or str(config) in files, f"--config {config} is not mounted"
    return load_settings(result.exception.cli, env, files[str(config)] if config else None)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A real metrics server, alive but not ready; yields its base URL."""
    health = HealthServer(Metrics(), lambda: None, lambda: "not ready: test", port=0).start()
    yield f"http://127.0.0.1:{health.port}"
    health.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------------------- Kubernetes
def test_every_kubernetes_manifest_validates_strictly_against_the_newest_kubernetes() -> None:
    version = kubernetes_validate.utils.latest_version()
    manifests = _k8s_manifests()
    assert {d["kind"] for docs in manifests.values() for d in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "PersistentVolumeClaim",
        "NetworkPolicy",
    }
    for path, docs in manifests.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")


def test_kustomization_lists_every_manifest_and_its_files_exist() -> None:
    kustomization = _kustomization()
    listed = set(kustomization["resources"])
    manifests = {p.name for p in _k8s_manifests() if not p.name.endswith(".example.yaml")}
    assert listed == manifests
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (K8S / file.split("=")[-1]).is_file(), file
    (image,) = kustomization["images"]
    assert image["name"] == _container()["image"]


def _deployment_settings(monkeypatch: pytest.MonkeyPatch) -> RunSettings:
    """The settings the Deployment's container starts with."""
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    container = _container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The config file comes from the ConfigMap that kustomize generates from config.toml.
    files: dict[str, Path] = {}
    for generator in _kustomization()["configMapGenerator"]:
        for mount in mounts.values():
            source = volumes[mount["name"]].get("configMap", {})
            if source.get("name") == generator["name"]:
                for file in generator["files"]:
                    key, _, local = file.rpartition("=")
                    files[f"{mount['mountPath']}/{key or local}"] = K8S / local
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for source in container.get("envFrom", []):  # the example Secret stands in for the real one
        env.update(_k8s("Secret")["stringData"])
        assert source["secretRef"]["name"] == _k8s("Secret")["metadata"]["name"]
    return _settings(monkeypatch, _run_args(container["command"] + container["args"]), env, files)


def test_deployment_settings_fit_its_volumes_probes_and_security(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    container = _container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    s = _deployment_settings(monkeypatch)

    def mount_of(path: Path) -> dict[str, Any]:
        (mount,) = [m for p, m in mounts.items() if path.is_relative_to(p)]
        return mount

    # The model is read from the read-only models volume; caches go to a writable emptyDir,
    # since the root filesystem is read-only.
    assert mount_of(s.model)["readOnly"] is True
    assert "persistentVolumeClaim" in volumes[mount_of(s.model)["name"]]
    assert s.cache_dir is not None and not mount_of(s.cache_dir).get("readOnly", False)
    assert "emptyDir" in volumes[mount_of(s.cache_dir)["name"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Probes, Service and scrape annotations reach the port the monitor really serves on.
    assert s.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == s.metrics_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == s.metrics_port, probe
    service_port = _k8s("Service")["spec"]["ports"][0]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == s.metrics_port
    template = _k8s("Deployment")["spec"]["template"]["metadata"]
    assert int(template["annotations"]["prometheus.io/port"]) == s.metrics_port
    assert template["labels"].items() >= _k8s("Service")["spec"]["selector"].items()


def test_probe_paths_are_the_servers_health_and_readiness_endpoints(server: str) -> None:
    """Liveness must be /healthz (a broker outage makes /readyz fail, and a restart would
    not cure it); the server under test is alive but not ready."""
    container = _container()
    for probe, expected in (("startupProbe", 200), ("livenessProbe", 200), ("readinessProbe", 503)):
        path = container[probe]["httpGet"]["path"]
        assert _status(server + path) == expected, f"{probe} {path}"
    path = _k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert _status(server + path) == 200
    assert _status(server + "/no-such-endpoint") == 404  # so a wrong path cannot pass


def test_network_policy_lets_in_only_the_metrics_port_and_out_only_kafka_and_dns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = _k8s("NetworkPolicy")["spec"]
    s = _deployment_settings(monkeypatch)
    assert policy["podSelector"]["matchLabels"].items() <= (
        _k8s("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    named = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    for rule in policy["ingress"]:
        assert rule["from"], "an empty `from` admits everyone"
        assert [named.get(p["port"], p["port"]) for p in rule["ports"]] == [s.metrics_port]
    egress = policy["egress"]
    assert all(rule.get("ports") for rule in egress), "a rule without ports opens every port"

    def admits(host_port: str, protocol: str = "TCP") -> bool:
        host, port = host_port.rsplit(":", 1)
        # An in-cluster Service, <name>.<namespace>.svc[...]: its namespace must be let through.
        labels = host.split(".")
        namespace = labels[1] if len(labels) > 2 and labels[2] == "svc" else None
        for rule in egress:
            if {"port": int(port), "protocol": protocol} not in rule["ports"]:
                continue
            selectors = [peer.get("namespaceSelector", {}) for peer in rule.get("to", [])]
            names = {
                sel.get("matchLabels", {}).get("kubernetes.io/metadata.name") for sel in selectors
            }
            if namespace is None or not rule.get("to") or namespace in names:
                return True
        return False

    for broker in s.bootstrap_servers.split(","):
        assert admits(broker.strip()), f"egress does not reach the broker {broker}"
    assert admits("kube-dns.kube-system.svc:53", "UDP") and admits("kube-dns.kube-system.svc:53")
    assert not admits("elsewhere.example.com:443")


def test_hpa_scales_the_deployment_on_a_metric_the_monitor_exports() -> None:
    hpa = _k8s("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == _k8s("Deployment")["metadata"]["name"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    external = [m["external"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "External"]
    assert external and set(external) <= _metric_names()
    pdb = _k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= _k8s("Deployment")["spec"]["template"]["metadata"]["labels"].items()


# ---------------------------------------------------------------------------- every deploy file
def test_every_option_passed_to_run_exists_in_the_cli() -> None:
    options = _cli_options()
    assert "--metrics-port" in options  # the introspection itself works
    for where, args in _invocations().items():
        assert args, where
        for token in args:
            if token.startswith("--"):
                assert token.split("=", 1)[0] in options, f"{where}: {token} is not a run option"


def test_every_config_key_is_accepted_by_the_settings_loader(tmp_path: Path) -> None:
    """Active keys load as `run --config` loads them; a commented-out key, uncommented alone,
    may break a rule (mutually exclusive, file missing) but must not be unknown."""
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"topic": ["t"], "model": "m", "definitely_not_a_setting": 1}))
    with pytest.raises(ConfigError) as bogus:
        load_settings({}, {}, unknown)
    assert "extra inputs" in str(bogus.value).lower()  # how the loader says "unknown key"
    for path in (CONFIG_EXAMPLE, K8S / "config.toml"):
        load_settings({}, {}, path)
        active = tomllib.loads(path.read_text())
        commented = re.findall(r"^#\s?([a-z][a-z0-9_-]* = .*)$", path.read_text(), re.MULTILINE)
        for line in commented:
            one = tmp_path / "one.json"
            one.write_text(json.dumps({**active, **tomllib.loads(line)}))
            try:
                load_settings({}, {}, one)
            except ConfigError as exc:
                assert "extra inputs" not in str(exc).lower(), f"{path.name}: {line}: {exc}"
        if path == CONFIG_EXAMPLE:
            assert len(commented) >= 5, "the example's commented-out settings were not found"


def test_every_sdns_environment_variable_named_in_deploy_is_a_setting() -> None:
    known = env_read_by_the_loader()
    named: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in re.findall(r"\bSDNS_[A-Z0-9_]+", path.read_text()):
                named.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    assert "SDNS_SASL_PLAIN_PASSWORD" in named  # the Secret and the env file were read
    assert {n: w for n, w in named.items() if n not in known} == {}


def test_every_metric_in_the_dashboard_exists_and_panels_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set().union(*map(_promql, _dashboard_queries(dashboard)))
    names = _metric_names()
    assert {"sdns_batch_latency_seconds_bucket", "sdns_consumer_lag"} <= queried
    assert queried - names == set()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_metric_named_anywhere_in_deploy_exists() -> None:
    """Prose may name a family (`sdns_batch_latency_seconds`), queries only series."""
    names = _metric_names() | {family.name for family in Metrics().registry.collect()}
    named: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in re.findall(r"\bsdns_(?!monitor\b)[a-z0-9_]+", path.read_text()):
                named.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    assert "README.md" in named["sdns_consumer_lag"]
    assert {n: w for n, w in named.items() if n not in names} == {}


# ---------------------------------------------------------------------------- containers, systemd
def test_image_exposes_and_checks_the_real_metrics_port_and_health_endpoint(server: str) -> None:
    steps = _containerfile()
    default_port = RunSettings.model_fields["metrics_port"].default
    (expose,) = [args for op, args in steps if op == "EXPOSE"]
    assert int(expose) == default_port
    (check,) = [args for op, args in steps if op == "HEALTHCHECK"]
    url = re.search(r"'http://127\.0\.0\.1:'.*?'(\d+)'\) \+ '(/[a-z]+)'", check)
    assert url is not None, check
    assert int(url.group(1)) == default_port
    assert "SDNS_METRICS_PORT" in check and "SDNS_METRICS_PORT" in env_read_by_the_loader()
    assert _status(server + url.group(2)) == 200
    (user,) = [args for op, args in steps if op == "USER"]
    pod = _k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"  # non-root, and the pod's uid
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["sdns-monitor"]


def test_compose_runs_the_image_against_its_kafka_with_the_topics_it_creates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    kafka, monitor = services["kafka"]["environment"], services["monitor"]
    build = monitor["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
    assert monitor["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert monitor["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    mounts = dict(v.split(":")[1::-1] for v in monitor["volumes"] if v.startswith("."))
    files = {container: (COMPOSE.parent / local).resolve() for container, local in mounts.items()}
    env = {**_image_env(), **monitor["environment"]}
    s = _settings(monkeypatch, _invocations()["compose.yaml"], env, files)
    # The monitor reaches Kafka through an advertised listener that is really there.
    listeners = dict(re.findall(r"(\w+)://([^,]*)", kafka["KAFKA_ADVERTISED_LISTENERS"]))
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    bound = dict(re.findall(r"(\w+)://([^,]*)", kafka["KAFKA_LISTENERS"]))
    assert s.bootstrap_servers in listeners.values()
    assert set(listeners) | set(bound) <= set(protocols)
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] in bound
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    # Every topic it reads and writes exists: auto-creation is off.
    created = set(re.findall(r"--topic (\S+)", services["topics"]["command"][0]))
    assert {*s.topic, s.alert_topic, s.dlq_topic} <= created
    assert str(kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]).lower() == "false"
    # Its metrics are published, and Prometheus scrapes the port they are on.
    assert s.metrics_host == "0.0.0.0"
    assert all(p.endswith(f":{s.metrics_port}") for p in monitor["ports"])
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["port"] == s.metrics_port and discovery["names"] == ["monitor"]
    for volume in (v for service in services.values() for v in service.get("volumes", [])):
        if volume.startswith("./"):
            assert (COMPOSE.parent / volume.split(":")[0]).exists(), volume


def test_prometheus_scrapes_the_path_the_server_serves(server: str) -> None:
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert _status(server + job.get("metrics_path", "/metrics")) == 200


def test_systemd_unit_can_write_the_cache_and_reloads_with_sighup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unit = _unit()
    (exec_start,) = unit["ExecStart"]
    env = _env_file(ENV_FILE)
    assert env, "no active line in the env file"
    assert unit["EnvironmentFile"] == ["-/etc/sdns-monitor/" + ENV_FILE.name]
    s = _settings(monkeypatch, _run_args(shlex.split(exec_start)), env, SYSTEMD_FILES)
    # ProtectSystem=strict: the cache must be under a path the unit makes writable.
    writable = [Path("/var/cache", d) for d in unit.get("CacheDirectory", [])]
    writable += [Path(p) for ps in unit.get("ReadWritePaths", []) for p in ps.split()]
    assert unit["ProtectSystem"] == ["strict"]
    assert s.cache_dir is not None and any(s.cache_dir.is_relative_to(w) for w in writable)
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["NoNewPrivileges"] == ["yes"]
