"""A NixImage's image config fields (`data.user`, `workingDir`, `env`, `entrypoint`, `cmd`,
`exposedPorts`, `labels`), checked into a `RunConfig` (`nixery.registry.runconfig`).

Every field is optional; a declaration that sets none has no config, so its image is
the one its contents give as a path. Each problem names the field (`data.env[2]`) and
quotes at most a few dozen characters of the value. The rules:

* `user`: a POSIX-style user name (lower case letter or `_`, then lower case letters,
  digits, `_` or `-`; at most 32), not `root` (the default, when `user` is left out).
* `workingDir`: an absolute path.
* `env`: a list of `KEY=VALUE` strings, KEY a shell variable name; a later entry of a
  KEY replaces an earlier one (and the registry's own PATH or SSL_CERT_FILE).
* `entrypoint`, `cmd`: non-empty lists of strings (the exec form: no shell runs them).
* `exposedPorts`: a list of ports, `8080`, `"8080"`, `"53/udp"` (tcp, udp or sctp).
* `labels`: a mapping of strings to strings; `org.nixos.nixery.*` is the registry's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from nixery.declarations.problems import InvalidDeclaration, _cut, _short
from nixery.registry.runconfig import RunConfig

MAX_ITEMS = 100  # entries of a list or mapping
MAX_STRING = 4096  # characters of one entry
MAX_USER_NAME = 32
RESERVED_LABELS = "org.nixos.nixery."

_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PORT = re.compile(r"([1-9][0-9]{0,4})(?:/(tcp|udp|sctp))?")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        hint = f' (quote it: "{_cut(str(value))}")' if isinstance(value, int | float) else ""
        raise InvalidDeclaration(f"{where} must be a string, not {type(value).__name__}{hint}")
    if len(value) > MAX_STRING:
        raise InvalidDeclaration(f"{where} is longer than {MAX_STRING} characters")
    if "\0" in value:
        raise InvalidDeclaration(f"{where} {_short(value)} holds a NUL character")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidDeclaration(f"{where} must be a list, not {type(value).__name__}")
    if not value:
        raise InvalidDeclaration(f"{where} is empty: leave it out instead")
    if len(value) > MAX_ITEMS:
        raise InvalidDeclaration(f"{where} has {len(value)} entries; at most {MAX_ITEMS} are allowed")
    return value


def _user(value: Any) -> str:
    name = _string(value, "data.user")
    if len(name) > MAX_USER_NAME or not _USER_NAME.fullmatch(name):
        raise InvalidDeclaration(
            f"data.user {_short(name)} is not a user name: a lower case letter or '_', then lower case "
            f"letters, digits, '_' or '-', at most {MAX_USER_NAME} characters"
        )
    if name == "root":
        raise InvalidDeclaration("data.user 'root' is the default: leave user out to run as root")
    return name


def _working_dir(value: Any) -> str:
    path = _string(value, "data.workingDir")
    if not path.startswith("/"):
        raise InvalidDeclaration(f"data.workingDir {_short(path)} must be an absolute path (start with '/')")
    return path


def _env(value: Any) -> tuple[str, ...]:
    entries: dict[str, str] = {}  # a later KEY replaces an earlier one, in the earlier one's place
    for index, entry in enumerate(_list(value, "data.env")):
        where = f"data.env[{index}]"
        text = _string(entry, where)
        key, equals, _ = text.partition("=")
        if not equals or not _ENV_KEY.fullmatch(key):
            raise InvalidDeclaration(
                f"{where} {_short(text)} is not KEY=VALUE with KEY of letters, digits and '_' (not first a digit)"
            )
        entries[key] = text
    return tuple(entries.values())


def _command(field: str) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        where = f"data.{field}"
        if isinstance(value, str):
            raise InvalidDeclaration(f"{where} must be a list of strings (the program, then its arguments)")
        return tuple(_string(item, f"{where}[{index}]") for index, item in enumerate(_list(value, where)))

    return check


def _port(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidDeclaration(f"{where} must be a port number or 'PORT/PROTOCOL', not {type(value).__name__}")
    match = _PORT.fullmatch(str(value))
    if match is None or not 1 <= int(match[1]) <= 65535:
        raise InvalidDeclaration(
            f"{where} {_short(value)} is not a port: a number from 1 to 65535, optionally /tcp, /udp or /sctp"
        )
    return f"{int(match[1])}/{match[2] or 'tcp'}"


def _exposed_ports(value: Any) -> tuple[str, ...]:
    ports = {_port(item, f"data.exposedPorts[{index}]") for index, item in enumerate(_list(value, "data.exposedPorts"))}
    return tuple(sorted(ports, key=lambda port: (int(port.split("/")[0]), port)))


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise InvalidDeclaration(f"data.labels must be a mapping of names to strings, not {type(value).__name__}")
    if not value:
        raise InvalidDeclaration("data.labels is empty: leave it out instead")
    if len(value) > MAX_ITEMS:
        raise InvalidDeclaration(f"data.labels has {len(value)} entries; at most {MAX_ITEMS} are allowed")
    labels = {}
    for key, label in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidDeclaration(f"data.labels: the name {_short(key)} must be a non-empty string")
        if key.startswith(RESERVED_LABELS):
            raise InvalidDeclaration(f"data.labels: {_short(key)} is the registry's own ({RESERVED_LABELS}*)")
        labels[_string(key, "data.labels")] = _string(label, f"data.labels[{_short(key)}]")
    return tuple(sorted(labels.items()))


#: Each field: the `RunConfig` attribute it sets, and its check.
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "user": ("user", _user),
    "workingDir": ("working_dir", _working_dir),
    "env": ("env", _env),
    "entrypoint": ("entrypoint", _command("entrypoint")),
    "cmd": ("cmd", _command("cmd")),
    "exposedPorts": ("exposed_ports", _exposed_ports),
    "labels": ("labels", _labels),
}
FIELDS = tuple(_FIELDS)


def parse_run_config(data: Mapping[str, Any]) -> RunConfig | None:
    """The image config a NixImage's `data` sets, None when it sets none; `InvalidDeclaration`
    names the field that is wrong."""
    values = {
        attribute: check(data[field]) for field, (attribute, check) in _FIELDS.items() if data.get(field) is not None
    }
    return RunConfig(**values) if values else None
