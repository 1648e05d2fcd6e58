"""Cluster credentials for the NixImage watch: the pod's service account or a kubeconfig.

In a pod, the service account (its token re-read on every request, so rotated
tokens work); elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config: its
current context's server, CA, token, token file, client certificate, or user
name and password). exec and auth-provider plugins are refused with a
`KubeConfigError` that says what to use instead.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(Exception):
    """No usable cluster credentials; the message says what is missing."""


@dataclass
class KubeConfig:
    server: str  # https://host:port, no trailing slash
    ssl: ssl.SSLContext | bool | None = None  # None: default verification; False: none (http or insecure)
    token: str | None = None
    token_file: Path | None = None
    basic_auth: tuple[str, str] | None = None
    description: str = ""

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            token = self.token_file.read_text().strip()
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self.basic_auth is not None:
            raw = f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}


def in_cluster_available(env: Mapping[str, str] | None = None, root: Path = SERVICE_ACCOUNT_DIR) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (root / "token").is_file()


def in_cluster_config(env: Mapping[str, str] | None = None, root: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (root / "token").is_file():
        raise KubeConfigError("not in a pod: KUBERNETES_SERVICE_HOST or the service account token is missing")
    if ":" in host:
        host = f"[{host}]"
    context = ssl.create_default_context(cafile=str(root / "ca.crt")) if (root / "ca.crt").is_file() else None
    return KubeConfig(
        server=f"https://{host}:{port}",
        ssl=context,
        token_file=root / "token",
        description="in-cluster service account",
    )


def _named(entries: Any, name: str, what: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            return dict(entry.get(what) or {})
    raise KubeConfigError(f"kubeconfig has no {what} named {name!r}")


def kubeconfig_config(path: Path, context_name: str | None = None) -> KubeConfig:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None
    if not isinstance(config, Mapping):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping")
    context_name = context_name or config.get("current-context")
    if not context_name:
        raise KubeConfigError(f"kubeconfig {path} has no current-context")
    context = _named(config.get("contexts"), context_name, "context")
    cluster = _named(config.get("clusters"), context.get("cluster", ""), "cluster")
    user = _named(config.get("users"), context.get("user", ""), "user") if context.get("user") else {}
    base = path.parent

    def file(value: str) -> Path:
        return Path(value) if os.path.isabs(value) else base / value

    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise KubeConfigError(f"kubeconfig cluster {context.get('cluster')!r} has no server")
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(
            "kubeconfig user uses an exec or auth-provider plugin, which nixery does not run: "
            "use a token (e.g. a service account's), a token file or a client certificate"
        )
    tls: ssl.SSLContext | bool | None = None
    if server.startswith("https://"):
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl = ssl.create_default_context()
            context_ssl.check_hostname = False
            context_ssl.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
            context_ssl = ssl.create_default_context(cadata=pem)
        elif cluster.get("certificate-authority"):
            context_ssl = ssl.create_default_context(cafile=str(file(cluster["certificate-authority"])))
        else:
            context_ssl = ssl.create_default_context()
        if cluster.get("tls-server-name"):
            context_ssl.check_hostname = False  # the name differs from the address; the CA still verifies
        _load_client_certificate(context_ssl, user, file)
        tls = context_ssl
    token_file = file(user["tokenFile"]) if user.get("tokenFile") else None
    basic = (str(user["username"]), str(user.get("password", ""))) if user.get("username") else None
    return KubeConfig(
        server=server,
        ssl=tls,
        token=user.get("token"),
        token_file=token_file,
        basic_auth=basic,
        description=f"kubeconfig {path} context {context_name}",
    )


def _load_client_certificate(context: ssl.SSLContext, user: Mapping[str, Any], file: Any) -> None:
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # ssl loads certificates from files only: write them to a private directory for the moment.
        with tempfile.TemporaryDirectory(prefix="nixery-kube-") as directory:
            cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            for target, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(base64.b64decode(data))
            context.load_cert_chain(str(cert_path), str(key_path))
    elif user.get("client-certificate") and user.get("client-key"):
        context.load_cert_chain(str(file(user["client-certificate"])), str(file(user["client-key"])))


def load_kube_config(kubeconfig: Path | None = None, env: Mapping[str, str] | None = None) -> KubeConfig:
    """An explicit kubeconfig, else the pod's service account, else ~/.kube/config."""
    env = os.environ if env is None else env
    if kubeconfig is not None:
        return kubeconfig_config(kubeconfig)
    if in_cluster_available(env):
        return in_cluster_config(env)
    default = Path(env.get("HOME") or Path.home()) / ".kube" / "config"
    if default.is_file():
        return kubeconfig_config(default)
    raise KubeConfigError("no cluster credentials: not in a pod, KUBECONFIG is not set and ~/.kube/config is missing")

