"""The image config a declared image sets and an image name cannot carry: the user it
runs as, its working directory, environment, entry point, command, exposed ports and
labels (a NixImage's `data`, checked by `nixery.declarations`).

Guarantees: a `RunConfig` is a value (frozen, hashable, compared by its fields), so
two declarations that set the same config ask for the same image, and `to_json` is
its canonical form for the image key. An image without one (every image named by a
path) is assembled exactly as before this module existed.

The user gets an account in the image (`account`): `/etc/passwd` and
`/etc/group` name it, with `USER_ID` as uid and gid, and the config's `User` is
numeric (`1000:1000`), so that Kubernetes' `runAsNonRoot` can check it without
reading the image, while `id -un` in the container still prints the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The uid and gid of a declared user (the usual first non-system id).
USER_ID = 1000
#: Accounts every image has already (nixery.layers.entrypoints): a user of these names
#: runs under their id and gets no account of its own.
BUILT_IN_IDS = {"nobody": 65534}


@dataclass(frozen=True, slots=True)
class RunConfig:
    user: str | None = None
    working_dir: str | None = None
    env: tuple[str, ...] = ()  # KEY=VALUE, in the order declared
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    exposed_ports: tuple[str, ...] = ()  # "8080/tcp", sorted and unique
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key

    @property
    def user_id(self) -> int | None:
        return None if self.user is None else BUILT_IN_IDS.get(self.user, USER_ID)

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, canonical: part of the image's key."""
        fields: dict[str, Any] = {
            "user": self.user,
            "workingDir": self.working_dir,
            "env": list(self.env) or None,
            "entrypoint": None if self.entrypoint is None else list(self.entrypoint),
            "cmd": None if self.cmd is None else list(self.cmd),
            "exposedPorts": list(self.exposed_ports) or None,
            "labels": dict(self.labels) or None,
        }
        return {name: value for name, value in fields.items() if value is not None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunConfig:
        """The config `to_json` gave (raises KeyError, TypeError, ValueError on other shapes)."""

        def strings(name: str) -> tuple[str, ...] | None:
            value = doc.get(name)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise TypeError(f"{name} must be a list of strings")
            return tuple(value)

        labels = doc.get("labels") or {}
        if not isinstance(labels, dict):
            raise TypeError("labels must be an object")
        return cls(
            user=doc.get("user"), working_dir=doc.get("workingDir"), env=strings("env") or (),
            entrypoint=strings("entrypoint"), cmd=strings("cmd"), exposed_ports=strings("exposedPorts") or (),
            labels=tuple(sorted((str(key), str(value)) for key, value in labels.items())),
        )

    def apply(self, container_config: Mapping[str, Any]) -> dict[str, Any]:
        """An image config's `config` object with these settings over the registry's own.

        Env: the registry's entries, less those declared again (PATH, SSL_CERT_FILE), then
        the declared ones; labels are added; an entry point without a command of its own
        drops the registry's command, as Docker does for an ENTRYPOINT."""
        merged = dict(container_config)
        if self.env:
            declared = dict(entry.split("=", 1) for entry in self.env)
            kept = [entry for entry in merged.get("Env", []) if entry.split("=", 1)[0] not in declared]
            merged["Env"] = kept + list(self.env)
        if self.labels:
            merged["Labels"] = {**merged.get("Labels", {}), **dict(self.labels)}
        if self.entrypoint is not None:
            merged["Entrypoint"] = list(self.entrypoint)
            merged.pop("Cmd", None)
        if self.cmd is not None:
            merged["Cmd"] = list(self.cmd)
        if self.user_id is not None:
            merged["User"] = f"{self.user_id}:{self.user_id}"
        if self.working_dir is not None:
            merged["WorkingDir"] = self.working_dir
        if self.exposed_ports:
            merged["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        return merged


@dataclass(frozen=True, slots=True)
class Account:
    passwd: bytes  # its /etc/passwd line
    group: bytes  # its /etc/group line
    home: str  # its home directory, without the leading slash


def account(config: RunConfig | None) -> Account | None:
    """The account of the config's user, when it needs one of its own."""
    if config is None or config.user is None or config.user in BUILT_IN_IDS:
        return None
    name, uid = config.user, USER_ID
    return Account(
        f"{name}:x:{uid}:{uid}:{name}:/home/{name}:/bin/sh\n".encode(), f"{name}:x:{uid}:\n".encode(), f"home/{name}"
    )
