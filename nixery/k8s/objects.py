"""The NixImage objects as the watch knows them, and how they are read: in a thread.

`read_objects` (a list's items) and `read_events` (a batch of watch events, as
lines of JSON) do all the work per object: reading its JSON (`read_json`),
checking it (`parse_declaration`) and its fingerprint, which tells whether
what it declares changed. They touch no state, so the watch runs them off the
event loop and then files their results (`Seen`, `WatchEvent`) in order.
Whatever one object holds, it fails alone: `read_object` makes it `Invalid`
(`WatchedObject.problem`) and the others are read as usual.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from nixery.declarations import KUBERNETES, Declaration, InvalidDeclaration, parse_declaration
from nixery.declarations.parsing import _SOURCE_RANK
from nixery.k8s.client import ApiError, EventBatch, Gone
from nixery.k8s.decoding import read_json, too_deep_fields

log = structlog.get_logger(__name__)


@dataclass
class WatchedObject:
    """A NixImage object as the watch knows it: what it declares (or its problem), and its status."""

    key: str
    name: str
    namespace: str | None
    resource_version: str
    generation: int | None
    status: dict[str, Any]
    fingerprint: str  # what the declaration depends on: name, data, generation
    declaration: Declaration | None
    problem: str | None
    result: dict[str, Any] | None = None  # the last build's status fields, for `fingerprint`


@dataclass
class Seen:
    """An object as a list or an ADDED/MODIFIED event shows it, read off the event loop (`read_object`)."""

    key: str
    resource_version: str
    status: dict[str, Any]
    fresh: WatchedObject | None  # read anew: what it declares may have changed; None: only its status or metadata did


@dataclass
class WatchEvent:
    """A watch event, read off the event loop (`read_events`)."""

    kind: str
    key: str
    resource_version: str | None
    seen: Seen | None = None  # ADDED and MODIFIED


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def object_key(obj: Mapping[str, Any]) -> str:
    metadata = _metadata(obj)
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata.get('name')}" if namespace else str(metadata.get("name"))


def object_origin(key: str) -> str:
    return f"niximage/{key}"


# ---- reading objects and events (in a thread: they touch no state) ------


def read_objects(items: Iterable[Mapping[str, Any]], known: Mapping[str, WatchedObject]) -> list[Seen]:
    """A list's objects; `known`, the objects as we knew them, spares reading anew those unchanged."""
    seen = []
    for item in items:
        previous = known.get(object_key(item))
        seen.append(read_object(item, previous.fingerprint if previous is not None else None))
    return seen


def read_events(batch: EventBatch, known: Mapping[str, WatchedObject]) -> tuple[list[WatchEvent], Exception | None]:
    """A batch's events, in order, up to the first that cannot be read or is an ERROR, returned as the
    exception to raise once the events before it are applied (they count: their changes are kept)."""
    read: list[WatchEvent] = []
    fingerprints: dict[str, str | None] = {}  # this batch's objects so far, over `known`
    try:
        for line in batch:
            event = read_json(line)
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                status = int(obj.get("code") or 0)
                message = str(obj.get("message") or obj.get("reason") or "watch error")
                raise (Gone if status == 410 else ApiError)(status, message)
            version = _metadata(obj).get("resourceVersion")
            key = object_key(obj)
            seen = None
            if kind in ("ADDED", "MODIFIED"):
                if key in fingerprints:
                    fingerprint = fingerprints[key]
                else:
                    previous = known.get(key)
                    fingerprint = previous.fingerprint if previous is not None else None
                seen = read_object(obj, fingerprint)
                fingerprints[key] = seen.fresh.fingerprint if seen.fresh is not None else fingerprint
            elif kind == "DELETED":
                fingerprints[key] = None
            read.append(WatchEvent(str(kind), key, str(version) if version else None, seen))
    except Exception as exc:  # the run loop sorts it out, as any failure of the watch
        return read, exc
    return read, None


def read_object(obj: Mapping[str, Any], fingerprint: str | None) -> Seen:
    """What `obj` says; its declaration is read anew (`Seen.fresh`) unless its `fingerprint` is
    the one given. Whatever an object holds, it fails alone: the others are served."""
    metadata = _metadata(obj)
    key = object_key(obj)
    generation = metadata.get("generation")
    resource_version = str(metadata.get("resourceVersion") or "")
    status = obj.get("status")
    status = dict(status) if isinstance(status, Mapping) else {}
    what = [metadata.get("uid"), generation, metadata.get("name"), obj.get("data"), obj.get("kind"),
            obj.get("apiVersion")]
    try:
        new_fingerprint = json.dumps(what, sort_keys=True, default=str)
    except RecursionError:  # `data` nests nearly as deep as json reads: its generation tells a change
        new_fingerprint = json.dumps([*what[:3], "nested too deep", *what[4:]], sort_keys=True, default=str)
    if new_fingerprint == fingerprint:
        return Seen(key, resource_version, status, None)
    rank = (_SOURCE_RANK[KUBERNETES], str(metadata.get("creationTimestamp") or ""), key)
    declaration, problem = None, None
    try:
        too_deep = too_deep_fields(obj.get("data"), "data")
        if too_deep:
            fields = dict.fromkeys(path.split("[", 1)[0] for path in too_deep)  # data.arch, not data.arch[0][0]
            raise InvalidDeclaration(f"{', '.join(list(fields)[:3])}: nested too deep to read")
        declaration = parse_declaration(obj, origin=object_origin(key), source=KUBERNETES, rank=rank, key=key)
    except RecursionError:
        problem = "data: nested too deep to read"
    except InvalidDeclaration as exc:
        problem = str(exc)
    if problem is not None:
        log.warning("declarations.invalid", object=object_origin(key), name=metadata.get("name"), problem=problem)
    fresh = WatchedObject(
        key=key,
        name=str(metadata.get("name")),
        namespace=metadata.get("namespace"),
        resource_version=resource_version,
        generation=generation if isinstance(generation, int) else None,
        status=status,
        fingerprint=new_fingerprint,
        declaration=declaration,
        problem=problem,
    )
    return Seen(key, resource_version, status, fresh)
