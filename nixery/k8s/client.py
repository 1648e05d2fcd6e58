"""The few Kubernetes API calls the NixImage watch makes, as plain HTTP (aiohttp).

    list   GET   /apis/k8s.nixos.org/v1alpha/niximages?limit=500[&continue=…]
    watch  GET   …/niximages?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T
    status PATCH …/niximages/NAME/status   (application/merge-patch+json)

A failed call raises `ApiError` (`Gone` for 410: list again); a watch event
larger than `MAX_EVENT_BYTES` ends the watch with an `ApiError`. Answers are
read with `read_json`, so an object nested deeper than Python's JSON parser
allows loses only that value (`nixery.k8s.decoding`); a list is read off the
event loop, and watch events are handed over as lines, for the caller to read
off the loop too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from nixery.declarations import GROUP, VERSION
from nixery.k8s.credentials import KubeConfig
from nixery.k8s.decoding import read_json

PLURAL = "niximages"
MAX_EVENT_BYTES = 8 << 20
#: Watch events that arrived together, each a line of JSON (`KubeClient.list` hides the builtin in the class).
EventBatch = list[bytes]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion is too old (or a continue token expired): list again."""


class KubeClient:
    """The few API calls the watch needs."""

    def __init__(self, config: KubeConfig, *, request_timeout: float = 30.0):
        self.config = config
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl if self.config.ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def collection_path() -> str:
        return f"/apis/{GROUP}/{VERSION}/{PLURAL}"

    @staticmethod
    def status_path(name: str, namespace: str | None = None) -> str:
        scope = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
        return f"/apis/{GROUP}/{VERSION}{scope}/{PLURAL}/{quote(name, safe='')}/status"

    @staticmethod
    async def _error(response: aiohttp.ClientResponse) -> ApiError:
        text = await response.text(errors="replace")
        message = text[:500]
        with contextlib.suppress(ValueError, AttributeError, RecursionError):
            message = json.loads(text).get("message") or message
        return (Gone if response.status == 410 else ApiError)(response.status, message)

    async def list(self, *, limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object (following `continue` pages) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"limit": str(limit)}
            if token:
                params["continue"] = token
            async with self._client().get(
                self.config.server + self.collection_path(),
                params=params,
                headers={**self.config.headers(), "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            ) as response:
                if response.status != 200:
                    raise await self._error(response)
                data = await response.read()
            body = await asyncio.to_thread(read_json, data)  # a page of 500 objects: read off the loop
            items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion") or "")

    async def watch(self, resource_version: str, *, timeout_seconds: int) -> AsyncIterator[EventBatch]:
        """The events after `resource_version`, until the server ends the watch or the connection drops,
        in batches: the events that one read of the connection brought (a burst of hundreds of events
        comes in a few), so the caller can act on each batch once. Each event is a line of JSON: the
        caller reads them (`read_json`), off the event loop."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout, sock_read=timeout_seconds + 30)
        async with self._client().get(
            self.config.server + self.collection_path(),
            params=params,
            headers={**self.config.headers(), "Accept": "application/json"},
            timeout=timeout,
        ) as response:
            if response.status != 200:
                raise await self._error(response)
            # The pieces of the line being received, joined once when its newline comes: joining them
            # as they came copied the line so far for each piece (a 7 MiB event in 1.4 KiB pieces,
            # as a network delivers it, was 18 GB copied and 3.8 s of the event loop's time).
            pending: list[bytes] = []
            pending_bytes = 0
            async for chunk in response.content.iter_any():
                *lines, rest = chunk.split(b"\n")
                if lines:
                    lines[0] = b"".join([*pending, lines[0]])
                    pending, pending_bytes = [], 0
                    events = [line for line in lines if line.strip()]
                    if events:
                        yield events
                if rest:
                    pending.append(rest)
                    pending_bytes += len(rest)
                if pending_bytes > MAX_EVENT_BYTES:
                    raise ApiError(0, f"a watch event is larger than {MAX_EVENT_BYTES} bytes")
            last = b"".join(pending)
            if last.strip():
                yield [last]

    async def patch_status(
        self, name: str, namespace: str | None, status: dict[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}  # precondition: 409 if it moved on
        async with self._client().patch(
            self.config.server + self.status_path(name, namespace),
            data=json.dumps(body),
            headers={
                **self.config.headers(),
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
            timeout=aiohttp.ClientTimeout(total=self.request_timeout),
        ) as response:
            if response.status != 200:
                raise await self._error(response)
            answer = await response.read()
        updated: dict[str, Any] = await asyncio.to_thread(read_json, answer)  # the object: may be large
        return updated
