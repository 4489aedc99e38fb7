"""The deployment files under deploy/, each checked offline by the validator of its kind.

- deploy/compose.yaml: the Compose spec vendored in check-jsonschema (no download), then what the
  fleet needs: 3 replicas, health checks, secrets as files, mounts that exist.
- deploy/kubernetes/*.yaml: kubernetes-validate, strict (unknown fields fail), against the schemas
  of one Kubernetes release it bundles; then the security properties and the cross-references
  (selectors, Secret keys, config paths).
- deploy/bastion.yaml: loaded with `gateway.config.load`, so it is a config Bastion accepts, and
  every `${VAR}` it needs is given by both compose.yaml and the Deployment.
- deploy/prometheus/: every metric an alert reads is defined in gateway/metrics.py (always);
  `promtool check rules|config` and `promtool test rules` (each alert fires when it should, none
  on a healthy fleet) when promtool is installed (Debian's prometheus package), else skipped.
- deploy/haproxy.cfg: round robin, /readyz checks, streaming timeouts; `haproxy -c` if installed.

The Python validators are dev dependencies (`make test` installs them): missing, the tests fail.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
FLEET_CONFIG = DEPLOY / "bastion.yaml"
HAPROXY = DEPLOY / "haproxy.cfg"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.33.0"
"""The Kubernetes release whose schemas the manifests must match (bundled by kubernetes-validate)."""

SECRET_EXAMPLE = "secret.example.yaml"
NOT_A_RESOURCE = "kustomization.yaml"
POD_LABELS = {"app.kubernetes.io/name": "bastion", "app.kubernetes.io/component": "gateway"}
EXPECTED_ALERTS = {
    "BastionReplicaDown",
    "BastionNoReplicaUp",
    "BastionAuditWriteFailures",
    "BastionAuditBacklog",
    "BastionAuditSinkLag",
    "BastionAuditSinkDown",
    "BastionAuditSinkBacklog",
    "BastionPolicyReloadFailed",
    "BastionPolicyReloadRefused",
    "BastionPolicyVersionSkew",
    "BastionDenialsSurge",
    "BastionBudgetStoreErrors",
    "BastionStageLatencyP99High",
    "BastionAuditStageLatencyP99High",
    "BastionUpstreamCircuitOpen",
}
PROMETHEUS_OWN_METRICS = {"up"}
"""Series Prometheus makes itself, for every target."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(
            f"{module} is not installed: it is a dev dependency (pyproject.toml), "
            "install it with `.venv/bin/pip install -e '.[dev]'` (or `make test`)"
        )


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != NOT_A_RESOURCE)


def _resources() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object by kind (one of each is expected)."""
    found: dict[str, dict[str, Any]] = {}
    for path in _manifests():
        for doc in _docs(path):
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def _pod(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return resources["Deployment"]["spec"]["template"]["spec"]


def _container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = _pod(resources)["containers"]
    return container


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _required_vars(path: Path) -> set[str]:
    """The `${VAR}`s without a default in a Bastion config's values (gateway/config.py's syntax)."""
    found = re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", "\n".join(_strings(_yaml(path))))
    return {m.group(1) for m in found if not m.group(2)}


def _compose_default(value: str) -> str:
    """A compose value with `${VAR:-default}` resolved as compose does when VAR is unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _load_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """deploy/bastion.yaml as Bastion reads it with exactly `env` (for the variables it names)."""
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", FLEET_CONFIG.read_text()):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load(FLEET_CONFIG)


def _key_files(cfg: Any) -> set[Path]:
    return {
        cfg.audit.hmac_key_file,
        cfg.audit.signing_key_file,
        cfg.sessions.secret_file,
        cfg.console.key_file,
        cfg.approvals.form_key_file,
        *(u.bearer_token_file for u in cfg.upstreams.values() if u.bearer_token_file),
    }


# --- deploy/bastion.yaml ---------------------------------------------------------------------

FLEET_ENV = {
    "BASTION_PUBLIC_URL": "https://bastion.example.com",
    "BASTION_OIDC_ISSUER": "https://idp.example.com/realms/agents",
    "BASTION_OIDC_JWKS_URL": "https://idp.example.com/realms/agents/certs",
    "NOTES_UPSTREAM_URL": "https://notes.example.com/mcp",
    "BASTION_DB_HOST": "db.example.internal",
    "BASTION_DB_PASSWORD": "0123abcd",
}


def test_fleet_config_is_a_bastion_config_on_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _load_with(FLEET_ENV, monkeypatch)
    for url in (cfg.audit.url, cfg.state.url):
        assert url == "postgresql+asyncpg://bastion:0123abcd@db.example.internal:5432/bastion?ssl=require"
    assert not cfg.audit.instance, "audit.instance must default to the host name (one chain per replica)"
    assert cfg.listen.host == "0.0.0.0" and cfg.listen.port == 8080
    assert cfg.listen.workers == 1
    assert cfg.listen.base_url == "https://bastion.example.com"
    assert cfg.audit.on_unavailable == "deny"
    assert cfg.policy.watch, "hot reload on: the policy reload alerts watch it"
    assert all(p.parent == Path("/run/secrets") for p in _key_files(cfg)), _key_files(cfg)
    assert cfg.data_dir.is_absolute()


@pytest.mark.parametrize("missing", sorted(FLEET_ENV))
def test_fleet_config_names_each_missing_variable(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    env = {k: v for k, v in FLEET_ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=f"environment variable {missing} is not set"):
        _load_with(env, monkeypatch)


def test_fleet_config_holds_no_secret() -> None:
    text = FLEET_CONFIG.read_text()
    for url in re.findall(r"postgresql\+asyncpg://\S+", text):
        userinfo = url.split("://", 1)[1].split("@", 1)[0]
        assert userinfo == "${BASTION_DB_USER:-bastion}:${BASTION_DB_PASSWORD}", url
    assert not re.search(r"(?im)^\s*(password|token|secret|client_secret)\s*:", text)


# --- deploy/compose.yaml ---------------------------------------------------------------------


def test_compose_matches_the_compose_spec() -> None:
    _require("check_jsonschema")
    run = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, f"check-jsonschema (vendored compose spec):\n{run.stdout}{run.stderr}"


def test_compose_runs_a_fleet() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"postgres", "bastion", "haproxy", "prometheus", "grafana"}

    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"

    bastion = services["bastion"]
    assert bastion["deploy"]["replicas"] == 3
    assert (DEPLOY / bastion["build"]["context"] / bastion["build"]["dockerfile"]).is_file()
    assert "/healthz" in " ".join(bastion["healthcheck"]["test"])
    assert bastion["depends_on"]["postgres"]["condition"] == "service_healthy"
    # one audit chain per replica: nothing may give the replicas one name
    assert "hostname" not in bastion and "container_name" not in bastion
    assert "BASTION_AUDIT_INSTANCE" not in bastion["environment"]
    mounts = {v["target"]: v for v in bastion["volumes"] if isinstance(v, dict)}
    assert (DEPLOY / mounts["/etc/bastion/config.yaml"]["source"]).resolve() == FLEET_CONFIG
    assert bastion["read_only"] is True and bastion["cap_drop"] == ["ALL"]
    assert not bastion.get("ports"), "replicas are reached through haproxy, not published"

    # secrets are compose secrets (files), never values in the environment
    declared = compose["secrets"]
    for service in services.values():
        for name, value in (service.get("environment") or {}).items():
            if re.search(r"(PASSWORD|TOKEN|SECRET|_KEY)(_+FILE)?$", name):
                assert name.endswith("_FILE") and str(value).startswith("/run/secrets/"), name
        for ref in service.get("secrets", []):
            assert (ref if isinstance(ref, str) else ref["source"]) in declared
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/"), secret


def test_compose_gives_bastion_every_variable_and_key_file(monkeypatch: pytest.MonkeyPatch) -> None:
    bastion = _yaml(COMPOSE)["services"]["bastion"]
    env = {k: _compose_default(str(v)) for k, v in bastion["environment"].items()}
    # the password comes from its secret file, read by the entrypoint
    entrypoint = " ".join(bastion["entrypoint"])
    exported = re.search(r'(\w+)="\$\$\(cat /run/secrets/(\w+)\)" && export \1 && ', entrypoint)
    assert exported, entrypoint
    assert exported.group(2) in bastion["secrets"]
    assert entrypoint.endswith("exec bastion serve --config /etc/bastion/config.yaml")
    env[exported.group(1)] = "from-the-secret-file"
    assert _required_vars(FLEET_CONFIG) <= set(env)

    cfg = _load_with(env, monkeypatch)
    assert cfg.audit.url.startswith("postgresql+asyncpg://bastion:from-the-secret-file@postgres:5432/")
    targets = {
        Path("/run/secrets") / (s if isinstance(s, str) else s.get("target", s["source"]))
        for s in bastion["secrets"]
    }
    assert _key_files(cfg) <= targets, "every key file the config names is a secret of the service"


def test_compose_mounts_exist_and_fit_together() -> None:
    compose = _yaml(COMPOSE)
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    services = compose["services"]
    prom_mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"] if isinstance(v, dict)}
    assert (DEPLOY / prom_mounts["/etc/prometheus"]).resolve() == PROMETHEUS.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana = {v["target"]: v["source"] for v in services["grafana"]["volumes"] if isinstance(v, dict)}
    assert (DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    (dashboard_target,) = [t for t, s in grafana.items() if s.endswith("bastion.json")]
    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "bastion.yaml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == str(Path(dashboard_target).parent)
    json.loads((GRAFANA / "bastion.json").read_text())

    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True

    haproxy = {v["target"]: v["source"] for v in services["haproxy"]["volumes"] if isinstance(v, dict)}
    assert (DEPLOY / haproxy["/usr/local/etc/haproxy/haproxy.cfg"]).resolve() == HAPROXY
    assert compose["networks"]["db"]["internal"] is True
    assert services["postgres"]["networks"] == ["db"]


# --- deploy/haproxy.cfg ----------------------------------------------------------------------


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1e-3}[unit]


def test_haproxy_balances_the_replicas_and_checks_readiness() -> None:
    text = HAPROXY.read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    assert "balance roundrobin" in lines
    assert "option httpchk" in lines
    assert any(re.fullmatch(r"http-check send meth GET uri /readyz .*hdr Host localhost", ln) for ln in lines)
    assert "http-check expect status 200" in lines
    (template,) = [ln for ln in lines if ln.startswith("server-template ")]
    _, _, slots, address = template.split()[:4]
    assert address == "bastion:8080"
    assert int(slots) == _yaml(COMPOSE)["services"]["bastion"]["deploy"]["replicas"]
    timeouts = dict(re.findall(r"(?m)^\s*timeout (\S+) (\S+)", text))
    for streaming in ("client", "server", "tunnel"):
        assert _seconds(timeouts[streaming]) >= 600, f"timeout {streaming}: too short for SSE streams"
    assert re.search(r"(?m)^\s*http-request return status 404 if \{ path .*/metrics", text)


def test_haproxy_accepts_the_config() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed: `haproxy -c` not run (the other checks of haproxy.cfg ran)")
    run = subprocess.run([haproxy, "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


# --- deploy/kubernetes/ ----------------------------------------------------------------------


def test_kubernetes_manifests_match_the_schemas_strictly() -> None:
    kv = _require("kubernetes_validate")
    kinds = []
    for path in _manifests():
        for doc in _docs(path):
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message} (Kubernetes {exc.version})")
            except kv.utils.SchemaNotFoundError as exc:
                pytest.fail(f"{path.name}: {exc.message}")
            kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Secret",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
        ]
    )


def test_kubernetes_strict_validation_refuses_an_unknown_field() -> None:
    kv = _require("kubernetes_validate")
    deployment = _resources()["Deployment"]
    _container({"Deployment": deployment})["securityContext"]["readOnlyRootFilesystm"] = True
    with pytest.raises(kv.ValidationError, match="readOnlyRootFilesystm"):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = _yaml(K8S / NOT_A_RESOURCE)
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in _manifests()} - {SECRET_EXAMPLE}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl is not installed: `kubectl kustomize` not run")
        return
    run = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "kind: Secret" not in run.stdout


def test_kubernetes_objects_share_the_namespace_and_labels() -> None:
    resources = _resources()
    namespace = resources["Namespace"]["metadata"]["name"]
    assert resources["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind, doc in resources.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, kind
    deployment = resources["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert deployment["spec"]["template"]["metadata"]["labels"] == POD_LABELS
    for kind in ("Service", "NetworkPolicy"):
        selector = (
            resources[kind]["spec"].get("selector") or resources[kind]["spec"]["podSelector"]["matchLabels"]
        )
        assert selector == POD_LABELS, kind
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == POD_LABELS

    (port,) = resources["Service"]["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] == "http"
    assert _container(resources)["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]

    pdb = resources["PodDisruptionBudget"]["spec"]
    assert pdb.get("minAvailable") == 2 or pdb.get("maxUnavailable") == 1
    hpa = resources["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bastion"}
    assert hpa["spec"]["minReplicas"] >= 3 > pdb.get("minAvailable", 2)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"


def test_deployment_is_locked_down() -> None:
    resources = _resources()
    pod, container = _pod(resources), _container(resources)
    uid = int(re.search(r"--uid (\d+)", (REPO / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] in ("/healthz", "/readyz")
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp must be writable: the root fs is read-only"
    for mount in mounts.values():
        kind = set(volumes[mount["name"]]) - {"name"}
        assert bool(mount.get("readOnly")) is (kind != {"emptyDir"}), mount


def test_deployment_gives_bastion_every_variable_and_key_file(monkeypatch: pytest.MonkeyPatch) -> None:
    resources = _resources()
    pod, container = _pod(resources), _container(resources)
    secret = resources["Secret"]
    secret_keys = set(secret["stringData"])
    env: dict[str, str] = {}
    for var in container["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, var
            env[var["name"]] = "from-the-secret"
        else:
            assert not re.search(r"PASSWORD|TOKEN|SECRET$|_KEY$|_USER$", var["name"]), f"{var['name']} inline"
            env[var["name"]] = var["value"]
    assert "BASTION_AUDIT_INSTANCE" not in env, "each pod's own name (its host name) names its audit chain"
    assert _required_vars(FLEET_CONFIG) <= set(env)

    # the config the pod reads is deploy/bastion.yaml, verbatim
    (config_file,) = [a for a in container["args"] if a.endswith(".yaml")]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert Path(config_file).parent == Path(mounts[config_volume])
    configmap = resources["ConfigMap"]
    assert volumes[config_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert configmap["data"][Path(config_file).name] == FLEET_CONFIG.read_text(), (
        "deploy/kubernetes/configmap.yaml must hold deploy/bastion.yaml verbatim"
    )

    cfg = _load_with(env, monkeypatch)
    assert cfg.audit.url.startswith("postgresql+asyncpg://from-the-secret:from-the-secret@")
    assert cfg.audit.url.endswith("?ssl=require")
    (secret_volume,) = [n for n, v in volumes.items() if "secret" in v]
    files = volumes[secret_volume]["secret"]
    assert files["secretName"] == secret["metadata"]["name"]
    assert files["defaultMode"] == 0o400
    mounted = {Path(mounts[secret_volume]) / item["path"] for item in files["items"]}
    assert all(item["key"] in secret_keys for item in files["items"])
    assert _key_files(cfg) == mounted, "the key files the config names are the Secret's files"
    writable = {Path(mounts[n]) for n, v in volumes.items() if "emptyDir" in v}
    assert any(cfg.data_dir.is_relative_to(w) for w in writable), "data_dir must be on an emptyDir"


def test_no_secret_is_written_in_the_deployment_or_configmap() -> None:
    resources = _resources()
    values = [str(v).strip() for v in resources["Secret"]["stringData"].values()]
    assert all("REPLACE-ME" in v for v in values if v != "bastion"), "the example Secret holds placeholders"
    for kind in ("Deployment", "ConfigMap"):
        text = yaml.safe_dump(resources[kind])
        for value in values:
            if value != "bastion":
                assert value not in text, f"{kind} holds a value of the Secret"
        assert "REPLACE-ME" not in text and "PRIVATE KEY" not in text, kind
    assert "bastion-secrets" not in yaml.safe_dump(resources["ConfigMap"])


def test_network_policy_admits_clients_and_prometheus_on_8080_only() -> None:
    policy = _resources()["NetworkPolicy"]["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    sources = ingress["from"]
    assert all("ipBlock" not in s for s in sources), "ingress only from labelled namespaces and pods"
    assert all(s.get("namespaceSelector") is not None or s.get("podSelector") for s in sources)
    assert any(
        s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        == "monitoring"
        and s.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "prometheus"
        for s in sources
    )
    for source in sources:
        selected = {**source.get("namespaceSelector", {}), **source.get("podSelector", {})}
        assert selected.get("matchLabels"), f"{source}: would admit every pod"

    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 443)}
    cidrs = [t["ipBlock"]["cidr"] for rule in policy["egress"] for t in rule["to"] if "ipBlock" in t]
    assert cidrs == ["192.0.2.0/24"], "the upstreams' range is the documented placeholder (TEST-NET-1)"
    assert "PLACEHOLDER" in (K8S / "networkpolicy.yaml").read_text()


# --- deploy/prometheus/ ----------------------------------------------------------------------

_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
_NOT_METRICS |= {"offset", "bool", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels, keywords or durations)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in _NOT_METRICS:
            continue
        names.add(m.group())
    return names


def exposed_metrics() -> set[str]:
    """Every series name gateway/metrics.py can expose (counters as `_total`, histograms' parts)."""
    from gateway import metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names = set()
    for family in metrics.REGISTRY.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"]]


def test_metric_names_are_found_in_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{stage!~"x.*"}[5m]))) > 1e-3'
    assert metric_names(expr + " and on (instance) b_total offset 5m or absent(up == 1)") == {
        "a_bucket",
        "b_total",
        "up",
    }
    assert {"bastion_decisions_total", "bastion_stage_seconds_bucket", "bastion_audit_backlog"} <= (
        exposed_metrics()
    )
    assert "bastion_decisions" not in exposed_metrics(), "a counter is exposed with _total only"


def test_alerts_read_only_metrics_bastion_exposes() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    known = exposed_metrics() | PROMETHEUS_OWN_METRICS
    for rule in rules:
        read = metric_names(rule["expr"])
        assert read, f"{rule['alert']}: reads no metric"
        assert read <= known, f"{rule['alert']}: no such metric {sorted(read - known)} in gateway/metrics.py"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "bastion_audit_sink_lag_records" in by_name["BastionAuditSinkLag"]
    assert re.search(r"bastion_audit_sink_up\) == 0", by_name["BastionAuditSinkDown"])
    assert "histogram_quantile(0.99" in by_name["BastionStageLatencyP99High"]
    assert "bastion_policy_reload_failures_total" in by_name["BastionPolicyReloadFailed"]
    assert "bastion_audit_write_failures_total" in by_name["BastionAuditWriteFailures"]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus): promtool checks not run")
    return promtool


def _run(*args: str) -> None:
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(args)}:\n{run.stdout}{run.stderr}"


def test_promtool_accepts_the_rules_and_the_config() -> None:
    promtool = _promtool()
    _run(promtool, "check", "rules", str(RULES))
    _run(promtool, "check", "config", str(PROMETHEUS))  # also loads rules.yml, relative to it
    assert _yaml(PROMETHEUS)["rule_files"] == [RULES.name]


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "bastion", "instance": "b1:8080", **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def _histogram(stage: str, bounds: dict[str, str]) -> list[dict[str, str]]:
    return [_series("bastion_stage_seconds_bucket", v, stage=stage, le=le) for le, v in bounds.items()]


HEALTHY = [
    _series("up", "1x30"),
    _series("up", "1x30", instance="b2:8080"),
    _series("bastion_audit_write_failures_total", "0x30"),
    _series("bastion_audit_backlog", "0x30"),
    _series("bastion_audit_sink_lag_records", "50x30", sink="siem"),
    _series("bastion_audit_sink_up", "1x30", sink="siem"),
    _series("bastion_audit_sink_backlog", "0x30", sink="siem"),
    _series("bastion_policy_reload_failures_total", "0x30"),
    _series("bastion_policy_reload_refused", "0x30"),
    _series("bastion_policy_info", "1x30", version="v1"),
    _series("bastion_policy_info", "1x30", version="v1", instance="b2:8080"),
    _series("bastion_decisions_total", "0+60x30", effect="allow", upstream="notes", tool="read"),
    _series("bastion_decisions_total", "0+1x30", effect="deny", upstream="notes", tool="read"),
    *_histogram("budget", {"0.001": "0+60x30", "0.025": "0+60x30", "0.1": "0+60x30", "+Inf": "0+60x30"}),
    *_histogram("audit", {"0.01": "0+60x30", "0.25": "0+60x30", "1": "0+60x30", "+Inf": "0+60x30"}),
    _series("bastion_circuit_state", "0x30", upstream="notes"),
    _series("bastion_budget_store_errors_total", "0x30"),
]
TROUBLE = [
    _series("up", "1 0x30"),
    _series("up", "1 0x30", instance="b2:8080"),
    _series("bastion_audit_write_failures_total", "0+2x30"),
    _series("bastion_audit_backlog", "5000x30"),
    _series("bastion_audit_sink_lag_records", "200000x30", sink="siem"),
    _series("bastion_audit_sink_up", "0x30", sink="siem"),
    _series("bastion_audit_sink_backlog", "1x30", sink="siem"),
    _series("bastion_policy_reload_failures_total", "0+1x30"),
    _series("bastion_policy_reload_refused", "1x30"),
    _series("bastion_policy_info", "1x30", version="v1"),
    _series("bastion_policy_info", "1x30", version="v2", instance="b2:8080"),
    _series("bastion_decisions_total", "0+6x30", effect="allow", upstream="notes", tool="read"),
    _series("bastion_decisions_total", "0+60x30", effect="deny", upstream="notes", tool="read"),
    *_histogram("budget", {"0.001": "0x30", "0.025": "0x30", "0.1": "0+60x30", "+Inf": "0+60x30"}),
    *_histogram("audit", {"0.01": "0x30", "0.25": "0x30", "1": "0+60x30", "+Inf": "0+60x30"}),
    _series("bastion_circuit_state", "2x30", upstream="notes"),
    _series("bastion_budget_store_errors_total", "0+3x30"),
]


def test_promtool_alerts_fire_on_trouble_and_stay_quiet_when_healthy(tmp_path: Path) -> None:
    promtool = _promtool()
    firing = 'count by (alertname) (ALERTS{alertstate="firing"})'
    both_down = {"BastionReplicaDown": 2}
    expected = [
        {"labels": "{alertname=" + json.dumps(name) + "}", "value": both_down.get(name, 1)}
        for name in sorted(EXPECTED_ALERTS)
    ]
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "healthy fleet",
                "interval": "1m",
                "input_series": HEALTHY,
                "promql_expr_test": [{"expr": firing, "eval_time": "25m", "exp_samples": []}],
            },
            {
                "name": "everything wrong",
                "interval": "1m",
                "input_series": TROUBLE,
                "promql_expr_test": [{"expr": firing, "eval_time": "25m", "exp_samples": expected}],
            },
        ],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    _run(promtool, "test", "rules", str(path))
