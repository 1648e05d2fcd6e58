"""`nixery build` and `nixery inspect`: the registry's progress and images from a terminal.

    nixery build shell/curl [--registry URL] [--tag TAG] [--plain] [--local]
        POST /builds, then follows /builds/{id}/events (server-sent events):
        a progress bar through the build's stages on a terminal, one plain
        line per event otherwise; at the end the digest, size and layers.
        --local builds in this process with the registry's settings from the
        environment (same storage, same package source), without a server.

    nixery inspect shell/curl[:TAG] [--registry URL] [--json]
        GET /images/{name}.json: layers, sizes and the store paths each holds.

    nixery inspect shell/curl[:TAG] [--registry URL] --sbom [--platform linux/arm64]
        the image's SPDX SBOM on stdout, nothing else; of several platforms, the default
        platform's (named on stderr) or --platform's.

Exit status 0 on success, 1 when the registry refuses or the build fails (its
error message is printed), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from yarl import URL

from nixery.output import OutputError
from nixery.progress import FINAL
from nixery.registry.references import UnusableReference, image_of, registry_host
from nixery.terminal import BarProgress, OutputConsole, PlainProgress, size
from nixery.views import image_json, image_reference, other_order

if TYPE_CHECKING:
    from nixery.config import Settings
    from nixery.registry.names import ImageRequest

DEFAULT_REGISTRY = "http://127.0.0.1:8080"
_RECONNECTS = 5
_RESTARTS = 3  # builds a registry stopped as it shut down, started again
_RESTART_POLLS = 60  # how many times a restarting registry is asked to start the build again
_RESTART_POLL_SECONDS = 1.0


class ClientError(Exception):
    """A failure to report in one line (the registry's own message where it gave one)."""

    def __init__(self, message: str, kind: str | None = None, detail: Any = None):
        super().__init__(message)
        self.kind = kind  # the registry's kind of error (docs/errors.md), when it answered with one
        self.detail = detail


class SettingsProblem(ClientError):
    """`build --local`: the registry's settings, or the storage they name, cannot be used. Exit
    status 2, as `serve`, `check` and `gc` say it."""


def shown(url: str) -> str:
    """`url` as messages show it: without the password of a registry URL (`http://USER:PASSWORD@HOST`,
    the credentials the commands send), which would end up on a terminal, in CI logs."""
    return str(URL(url).with_password(None))


def _masked(given: str) -> str:
    """`given`, a URL that does not parse, without its credentials (`shown` cannot read them out
    of it): the host's user information; with an `@` only after a `/`, all before the last `@`,
    as a password may hold a `/`."""
    scheme, slashes, rest = given.rpartition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        return f"{scheme}{slashes}***@{authority.rpartition('@')[2]}{slash}{path}"
    if "@" in path:
        return f"{scheme}{slashes}***@{rest.rpartition('@')[2]}"
    return given


def _registry_url(value: str | None) -> str:
    given = value or os.environ.get("NIXERY_REGISTRY") or DEFAULT_REGISTRY
    source = "--registry" if value else "NIXERY_REGISTRY"
    # The scheme is looked for before the slashes go: "http://" is a URL without a host, not the host "http".
    url = (given if "://" in given else "http://" + given).rstrip("/")
    # aiohttp looks up the zone of a link-local address as the URL writes it (RFC 6874's `%25eth0`, as the
    # registry's links do), and finds no such host; it connects with the zone itself (`%eth0`).
    zoned = _URL_ZONE.sub(r"\1%", url, count=1)
    extra = ""
    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 (raises ValueError for a port that is no number)
        usable = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        no_host = parsed.scheme in ("http", "https") and not parsed.hostname
        if usable:
            URL(zoned)  # as aiohttp reads it: a host that has no IDNA form (bytes not UTF-8) raises ValueError
            # As the resolver reads it: a label over 63 characters, or an empty one (`a..b`), was a traceback.
            try:
                (parsed.hostname or "").encode("idna")
            except UnicodeError:
                raise ClientError(f"{source}={_masked(given)!r} has no valid host name: each part between dots is "
                                  f"1 to 63 characters; give one like {DEFAULT_REGISTRY}") from None
            # The registry's API and pages are at the root of its host: anything after it was sent to paths
            # that are not (`/v2/builds` answered "no such endpoint", `?x=1/builds` "method POST is not allowed").
            extra = next((f"{what} ({part})" for what, part in (
                # An empty `?` or `#` too (`http://host?`): urlsplit drops it, requests went to `/?/builds`.
                ("a path", parsed.path), ("a query", "?" in url and f"?{parsed.query}"),
                ("a fragment", "#" in url and f"#{parsed.fragment}")) if part), "")
    except ValueError:
        usable = no_host = False
    if no_host:
        raise ClientError(f"{source}={_masked(given)!r} has no host: give one, like {DEFAULT_REGISTRY}")
    if not usable:
        raise ClientError(f"{source}={_masked(given)!r} is not a registry URL like {DEFAULT_REGISTRY}")
    if extra:
        raise ClientError(f"{source}={_masked(given)!r} has {extra}: give the registry's scheme, host and "
                          f"port alone, like {DEFAULT_REGISTRY}")
    return zoned


#: The `%25` that opens the zone of an IPv6 address in a URL (`http://[fe80::1%25eth0]:8080`).
_URL_ZONE = re.compile(r"(\[[0-9A-Fa-f:.]+)%25(?=[^\]/]+\])")


#: Statuses with which a server that is no nixery registry answers its routes (an nginx, another registry).
_NO_SUCH_ROUTE = frozenset({404, 405, 501})


async def _registry_error(response: aiohttp.ClientResponse) -> ClientError:
    text = await response.text(errors="replace")
    try:
        error = json.loads(text)["errors"][0]
        detail = error.get("detail")
        # `detail.kind` says which error it is; the code is the distribution spec's (and all older registries sent).
        kind = detail.get("kind") if isinstance(detail, dict) else None
        kind = kind if isinstance(kind, str) else error["code"]
        message = f"{kind}: {error['message']}"
        if response.status == 401 and "Authorization" not in response.request_info.headers:
            # No credentials were sent: say how to send them.
            message += (" (the commands send the user and password of the registry URL: "
                        "NIXERY_REGISTRY=http://USER:PASSWORD@HOST)")
        return ClientError(message, kind, detail)
    except (ValueError, KeyError, IndexError, TypeError):
        # Not the registry's JSON error (a proxy's or another server's page): one line, not its HTML.
        said = _gist(text)
        guess = ": is it a nixery registry?" if response.status in _NO_SUCH_ROUTE else ""
        return ClientError(
            f"HTTP {response.status} {response.reason or ''}".rstrip()
            + f" from {response.url.with_query(None)}{f' ({said})' if said else ''}{guess}"
        )


def _gist(text: str) -> str:
    """What a page that is no registry's error says, in one short line: its title, else its first words."""
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    words = " ".join((title.group(1) if title else re.sub(r"<[^>]*>", " ", text)).split())
    return words if len(words) <= 120 else words[:119] + "…"


def _unreachable(registry: str, exc: aiohttp.ClientConnectionError) -> ClientError:
    """`cannot reach the registry at URL: ...`; for TLS spoken to a port that answers plain HTTP (the
    registry's own, `make run`'s), what to give instead: aiohttp says only `WRONG_VERSION_NUMBER`."""
    hint = ""
    if isinstance(exc, aiohttp.ClientSSLError) and "WRONG_VERSION_NUMBER" in str(exc):
        plain = shown(registry).replace("https://", "http://", 1)
        hint = f" (that port does not answer in TLS: if it serves plain HTTP, as `nixery serve` does, give {plain})"
    return ClientError(f"cannot reach the registry at {shown(registry)}: {exc}{hint}")


def _broken_answer(exc: aiohttp.ClientError | TimeoutError, registry: str) -> ClientError:
    """One line for an answer that is no HTTP a registry gives, or that broke off: a port of another
    service (`--registry host:22` answers `SSH-2.0-...`), a response cut short. They were tracebacks."""
    if isinstance(exc, aiohttp.ClientConnectionError):  # refused, reset, unresolvable: as the requests say it
        return _unreachable(registry, exc)
    if isinstance(exc, TimeoutError):
        return ClientError(f"the registry at {shown(registry)} stopped answering (no data for a long time)")
    if isinstance(exc, aiohttp.ClientPayloadError):
        said = "its answer broke off"
    elif isinstance(exc, aiohttp.ClientResponseError):
        said = f"its answer is not HTTP ({' '.join(str(exc.message).split()).removesuffix(' ^')[:120]})"
    else:
        said = f"its answer cannot be used ({' '.join(str(exc).split())[:120] or type(exc).__name__})"
    return ClientError(f"{shown(registry)} did not answer as a registry does: {said}: "
                       "is it a nixery registry, and is that its port?")


async def _document(response: aiohttp.ClientResponse, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object a registry answered with, which has `keys`; one line, not a traceback, for
    an answer that is not one (a server that is no nixery registry answers 200 with its own page)."""
    try:
        document = await response.json(content_type=None)
    except ValueError:  # not JSON (aiohttp's ContentTypeError is one too)
        document = None
    if not isinstance(document, dict) or not all(key in document for key in keys):
        raise ClientError(
            f"{response.url.with_query(None)} answered with something that is not {what}: is it a nixery registry?"
        )
    return document


# ---- server-sent events ------------------------------------------------------------


async def read_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    """(id, data) of each message in a `text/event-stream` response; comments are skipped."""
    event_id: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield event_id, json.loads("\n".join(data))
            data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


async def follow_events(session: aiohttp.ClientSession, url: str) -> AsyncIterator[dict[str, Any]]:
    """A build's events until done or failed, reconnecting (with Last-Event-ID) if the stream breaks."""
    last: str | None = None
    attempts = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = last
        try:
            async with session.get(url, headers=headers) as response:
                if response.status == 204:
                    raise ClientError("the build's event stream ended without a result")
                if response.status != 200:
                    raise await _registry_error(response)
                async for event_id, event in read_sse(response):
                    last = event_id if event_id is not None else last
                    attempts = 0
                    yield event
                    if event.get("stage") in FINAL:
                        return
        # A registry that stops ends the stream; one restarting refuses connections for a while,
        # then says whether it knows the build (a restart forgets it).
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            attempts += 1
            if attempts > _RECONNECTS:
                raise ClientError(f"lost the event stream: {exc}") from exc
            await asyncio.sleep(min(2.0 * attempts, 10.0))
            continue
        attempts += 1  # the stream ended without a final event
        if attempts > _RECONNECTS:
            raise ClientError("the event stream ended before the build did")
        await asyncio.sleep(1.0)


# ---- showing progress ----------------------------------------------------------------


def _layer_table(image: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("Digest", no_wrap=True)
    table.add_column("Size", justify="right", no_wrap=True)
    table.add_column("Paths", justify="right")
    table.add_column("Holds", overflow="fold")
    for number, layer in enumerate(image["layers"], 1):
        held = layer.get("paths") or []
        digest = layer["digest"].removeprefix("sha256:")[:12]
        table.add_row(str(number), digest, size(layer["size"]), str(len(held)), escape(layer["description"]))
    return table


def _without_paths(image: dict[str, Any]) -> dict[str, Any]:
    """The registry's document with no store paths in its layers, nor in each platform's."""
    def layers(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{key: value for key, value in layer.items() if key != "paths"} for layer in listed]

    shorter = {**image, "layers": layers(image["layers"])}
    if "platforms" in image:
        shorter["platforms"] = [{**one, "layers": layers(one["layers"])} for one in image["platforms"]]
    return shorter


def _print_image(
    console: Console, image: dict[str, Any], pull_host: str, *, paths: bool, pull_note: str = ""
) -> None:
    """The image, with the command that pulls it from `pull_host` (`pull_note` under it, when given)."""
    ref = f"{pull_host}/{image_reference(image['name'], image.get('tag', 'latest'))}"
    # Of several platforms, the size and the layers below are the default platform's: say whose.
    whose = f" (linux/{image['architecture']})" if image.get("platforms") and "architecture" in image else ""
    lines = [
        ("Image", f"{image['name']}:{image.get('tag', 'latest')}"),
        ("Digest", image["digest"]),
        ("Size", f"{size(image['size'])} compressed, {len(image['layers'])} layers{whose}"),
        ("Source", f"{image.get('source', '')} {image.get('revision', '')}"),
        ("Pull", f"docker pull {ref}"),
    ]
    for platform in image.get("platforms", ()):  # an image of several platforms: the digest above is its index's
        summary = f"{platform['oci_digest']}  {size(platform['size'])}, {len(platform['layers'])} layers"
        lines.insert(-2, (platform["platform"], summary))
    if pull_note:
        lines.append(("", pull_note))
    other = other_order(image["name"])
    if other is not None and other != image["name"]:
        lines.insert(1, ("", f"the same image as {other}: the order of the names does not matter"))
    for label, value in lines:
        console.print(f"[bold]{label:<8}[/] {escape(value)}", highlight=False, soft_wrap=True)
    console.print()
    console.print(_layer_table(image))
    if not paths:
        return
    if not image.get("paths_recorded", True):
        console.print("\n[dim]This image was built before store paths were recorded per layer.[/]")
        return
    for number, layer in enumerate(image["layers"], 1):
        held = layer.get("paths") or []
        if held:
            digest = layer["digest"].removeprefix("sha256:")[:12]
            console.print(f"\n[bold]Layer {number}[/] {digest} holds:", highlight=False)
            for path in held:  # one per line, never wrapped: easy to grep
                console.print(f"  {escape(path)}", highlight=False, soft_wrap=True)


# ---- nixery build ------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nixery build", description="Build an image and watch its progress.")
    parser.add_argument("image", help="image name, e.g. shell/curl (optionally NAME:TAG; the registry's own "
                        "HOST/ in front is dropped)")
    parser.add_argument("--registry", help=f"registry URL (default $NIXERY_REGISTRY or {DEFAULT_REGISTRY})")
    parser.add_argument("--tag", type=_tag_option, help="tag (default: latest, or the :TAG in the name)")
    parser.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    parser.add_argument(
        "--local", action="store_true",
        help="build in this process, not on a server, with the registry's settings: the environment variables "
        "`nixery serve --help` lists",
    )
    return parser


def _other_registry(error: Exception) -> str:
    """For a reference to another registry than --registry's: how to ask that one."""
    if isinstance(error, UnusableReference) and error.host is not None:
        return f", or ask that registry: --registry http://{error.host} (or NIXERY_REGISTRY)"
    return ""


def _split(image: str, tag: str | None) -> tuple[str, str]:
    name, _, given = image.partition(":")
    return name.strip("/"), (tag or given or "latest").strip()  # as the registry reads a tag: `--tag ' v1'` is v1


def build_main(argv: list[str]) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    try:
        # A URL that cannot be one is a usage error, before anything starts; so is a reference
        # pasted as pulled that names another registry (this one's host is dropped).
        args.image = image_of(args.image, None if args.local else _registry_url(args.registry))
    except (ClientError, UnusableReference) as exc:
        err.print(f"nixery: {exc}{_other_registry(exc)}", markup=False, soft_wrap=True)
        return 2
    named = args.image.partition(":")[2]
    if named and args.tag is not None and args.tag != named:  # one was ignored without a word
        parser.error(f"the image names the tag {named!r} and --tag says {args.tag!r}: give one")
    console = OutputConsole(highlight=False)
    interactive = console.is_terminal and not args.plain
    progress: list[str] = []  # the progress page of the build a registry started, once it has
    try:
        try:
            return asyncio.run(_build(args, console, interactive, progress))
        except (aiohttp.ClientError, TimeoutError) as exc:  # those `_build_remotely` does not say itself
            if args.local:  # no registry was asked: not one that "did not answer as a registry does"
                raise ClientError(f"the build stopped: {str(exc) or type(exc).__name__}") from exc
            raise _broken_answer(exc, _registry_url(args.registry)) from exc
    except ClientError as exc:
        err.print(f"nixery: {exc}", markup=False, soft_wrap=True)
        return 2 if isinstance(exc, SettingsProblem) else 1
    except KeyboardInterrupt:  # one line, as every command says it (`nixery gc: interrupted`)
        # A registry's build does not depend on this command: it goes on (a local one has stopped).
        going_on = f" (the registry goes on with the build: {progress[0]})" if progress else ""
        err.print(f"nixery build: interrupted{going_on}", markup=False, soft_wrap=True)
        return 130


def _check_name(name: str, tag: str) -> None:
    """ClientError for a name or tag the registry would refuse, said as it says it, before a request
    (a name of 100,000 characters got only "the request line is too long")."""
    from nixery.errors import RegistryError
    from nixery.registry.names import check_build_tag, parse_image_name

    try:
        parse_image_name(name)
        check_build_tag(tag)
    except RegistryError as exc:  # as `_registry_error` says the registry's answer
        raise ClientError(f"{exc.kind}: {exc.message}", exc.kind, exc.detail) from exc


async def _build(args: argparse.Namespace, console: Console, interactive: bool, progress: list[str]) -> int:
    name, tag = _split(args.image, args.tag)
    display = BarProgress(console) if interactive else PlainProgress(sys.stdout)
    pull_note = ""
    if args.local:
        final, image, (pull_host, pull_note) = await _build_locally(name, tag, display)
    else:
        _check_name(name, tag)
        registry = _registry_url(args.registry)
        pull_host = registry_host(registry)
        final, image = await _build_remotely(registry, name, tag, display, progress)
    if final.get("stage") != "done":
        message = final.get("message") or "the build failed"
        if final.get("log"):
            message += "\n" + "\n".join(str(final["log"]).splitlines()[-10:])
        raise ClientError(f"build failed: {message}")
    console.print()
    if image is None:
        console.print(f"Digest   {final.get('digest')}")
        console.print(f"Size     {size(final.get('size'))} in {final.get('layers')} layers")
    else:
        _print_image(console, image, pull_host, paths=False, pull_note=pull_note)
    return 0


def _session() -> aiohttp.ClientSession:
    # No overall limit: a first build can take many minutes; the server sends a
    # keep-alive comment every few seconds, so a silent connection is a dead one.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120))


async def _build_remotely(
    registry: str, name: str, tag: str, display: PlainProgress | BarProgress, progress: list[str]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The build's last event and the image; `progress` gets the build's progress page once
    the registry has started it. A build the registry stopped as it shut down (a restart, a
    rollout), or lost as it ended without a word (killed, out of memory), is started again
    once the registry is back."""
    async with _session() as session:
        for restart in range(_RESTARTS + 1):
            started = await _start_build(session, registry, name, tag, wait_for_registry=restart > 0)
            progress[:] = [f"{shown(registry)}{started.get('progress') or '/builds/' + started['id']}"]
            final: dict[str, Any] = {}
            with display:
                try:
                    async for event in follow_events(session, f"{registry}{started['events']}"):
                        display.update(event)
                        final = event
                except ClientError as exc:
                    # The stream broke, and the registry that answered again no longer knows the build.
                    if exc.kind != "NAME_UNKNOWN" or not final or restart == _RESTARTS:
                        raise
                    lost = "the registry restarted and no longer knows the build"
            if final.get("stage") in FINAL:
                if final.get("error") != "stopped" or restart == _RESTARTS:
                    break
                lost = "the registry stopped the build as it shut down"
            print(f"nixery build: {lost}; starting it again once it is back", file=sys.stderr, flush=True)
        image = None
        if final.get("stage") == "done":
            image = await _fetch_image(session, registry, started["image"], tag, missing_ok=True)
        return final, image


async def _start_build(
    session: aiohttp.ClientSession, registry: str, name: str, tag: str, *, wait_for_registry: bool
) -> dict[str, Any]:
    """`POST /builds`; with `wait_for_registry`, a registry that is restarting (refusing
    connections, or still answering 503 as it shuts down) is asked again for a minute."""
    for attempt in range(_RESTART_POLLS + 1):
        try:
            async with session.post(
                f"{registry}/builds", json={"image": name, "tag": tag}, headers={"Accept": "application/json"}
            ) as response:
                if response.status == 202:
                    return await _document(response, "a build", ("id", "events"))
                error = await _registry_error(response)
                if not (wait_for_registry and response.status == 503 and attempt < _RESTART_POLLS):
                    raise error
        except aiohttp.ClientConnectionError as exc:
            if not wait_for_registry or attempt == _RESTART_POLLS:
                raise _unreachable(registry, exc) from exc
        await asyncio.sleep(_RESTART_POLL_SECONDS)
    raise AssertionError("not reached")


#: What `nixery inspect` and `nixery build` show of an image's document (nixery.views.image_json).
_IMAGE_KEYS = ("name", "digest", "size", "layers", "architecture")


async def _fetch_image(
    session: aiohttp.ClientSession, registry: str, name: str, tag: str, *, missing_ok: bool = False
) -> dict[str, Any] | None:
    url = f"{registry}/images/{quote(name, safe='/')}.json"
    try:
        async with session.get(url, params={"tag": tag}, headers={"Accept": "application/json"}) as response:
            if response.status == 200:
                return await _document(response, "an image's document", _IMAGE_KEYS)
            if missing_ok and response.status == 404:
                return None
            raise await _registry_error(response)
    except aiohttp.ClientConnectionError as exc:
        raise _unreachable(registry, exc) from exc


async def _build_locally(
    name: str, tag: str, display: PlainProgress | BarProgress
) -> tuple[dict[str, Any], dict[str, Any] | None, tuple[str, str]]:
    """The build's last event, its image, and the host of the registry the settings describe, which
    serves the image from the same storage, with a note to show under it (`_local_pull_host`)."""
    from nixery import config, logs
    from nixery.errors import RegistryError
    from nixery.platforms import every_platform
    from nixery.registry.names import check_build_tag, parse_image_name
    from nixery.scratch import own_temporary_directory, remove_abandoned_in_background

    try:
        settings = config.load()
        # As the registry reads the name: with several NIXERY_PLATFORMS, an image of each and an index.
        request = every_platform(parse_image_name(name), settings.platforms)
        check_build_tag(tag)
    except config.ConfigError as exc:
        raise SettingsProblem(str(exc)) from exc
    except RegistryError as exc:
        raise ClientError(str(exc)) from exc
    # build.failed: the command prints the failure itself, in one line.
    logs.configure("warning", settings.log_format, leave_out=frozenset({"build.failed"}))
    with own_temporary_directory():  # what a `kill -9` of this command leaves, the next one removes
        remove_abandoned_in_background()  # and what killed ones left
        final, image = await _build_here(settings, request, tag, display)
    return final, image, _local_pull_host(settings)


def _local_pull_host(settings: Settings) -> tuple[str, str]:
    """The host clients pull from the registry these settings run by (NIXERY_PUBLIC_HOST, else
    `localhost:PORT`), and a note for when this command cannot know it: with PORT=0 the registry
    picks a free port as it starts, and only its log says which (a port-less `localhost` was wrong)."""
    if settings.public_host:
        return settings.public_host, ""
    if settings.port:
        return f"localhost:{settings.port}", ""
    return "localhost:PORT", ("PORT=0: a registry on these settings picks a free port as it starts and logs it "
                              "(registry.listening url=...): use that one, or set NIXERY_PUBLIC_HOST=HOST:PORT to "
                              "have it here")


async def _build_here(
    settings: Settings, request: ImageRequest, tag: str, display: PlainProgress | BarProgress
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from nixery import config
    from nixery.app import open_builder, open_storage
    from nixery.storage import StorageError

    try:  # settings only opening the storage checks, a storage it cannot use: one line, as the registry says it
        storage = open_storage(settings)
    except (config.ConfigError, StorageError) as exc:
        raise SettingsProblem(str(exc)) from exc
    try:
        builder = open_builder(settings, storage)
    except config.ConfigError as exc:
        await storage.close()
        raise SettingsProblem(str(exc)) from exc
    try:
        build = await builder.start(request, tag)
        final: dict[str, Any] = {}
        with display:
            async for event in build.follow():
                final = event.to_json()
                display.update(final)
        record = await builder.built(request, tag) if final.get("stage") == "done" else None
        return final, image_json(record, tag) if record is not None else None
    except (BrokenPipeError, OutputError):  # our output failed, not the build: nixery.cli.main says which
        raise
    except StorageError as exc:  # a bucket that does not answer or refuses the credentials: as check and gc say it
        raise SettingsProblem(f"storage: {exc}") from exc
    except Exception as exc:
        raise ClientError(str(exc) or type(exc).__name__) from exc
    finally:
        await builder.close()
        await storage.close()


# ---- nixery inspect ----------------------------------------------------------------


def _not_built(error: ClientError, registry: str | None) -> str | None:
    """For an image that is not built yet: the command that builds it."""
    detail = error.detail if isinstance(error.detail, dict) else {}
    if error.kind != "MANIFEST_UNKNOWN" or not isinstance(detail.get("name"), str):
        return None
    if "failed_at" in detail:  # its last build failed, and pulls get that failure: the registry's words say so
        return None
    tag = detail.get("tag") or "latest"
    reference = image_reference(detail["name"], tag)
    option = f" --registry {shown(registry)}" if registry else ""
    return f"{reference} is not built yet: build it with `nixery build{option} {reference}` (or pull it)"


def _platform_documents(image: dict[str, Any], platform: str | None) -> tuple[dict[str, Any], str | None]:
    """The part of the image's document that lists the documents of `platform` (None: the default
    platform's, the one a client that takes no index gets), and that platform's name when the image
    has several, to say whose SBOM is printed."""
    platforms = image.get("platforms") or []
    default = f"linux/{image['architecture']}"
    listed = [one["platform"] for one in platforms] or [default]
    if platform is None:
        return image, default if platforms else None
    if platform not in listed:
        raise ClientError(f"{image['name']} has no image for {platform}: it is for {', '.join(listed)}")
    chosen = next((one for one in platforms if one["platform"] == platform), image)
    if "attached" not in chosen:
        raise ClientError(f"the registry does not list the documents of each platform: update it to fetch {platform}'s")
    return chosen, platform


async def _fetch_sbom(
    session: aiohttp.ClientSession, registry: str, image: dict[str, Any], listing: dict[str, Any]
) -> str:
    """The SBOM of a manifest (docs/sbom.md), as the registry stores it: `listing` is the part of
    the image's document that lists the manifest's documents (the image's, or one platform's)."""
    found = [one for one in listing.get("attached", ()) if one["artifactType"] == "application/spdx+json"]
    if not found:
        raise ClientError(f"{image['name']} has no SBOM: it was built before the registry attached SBOMs")
    url = f"{registry}/v2/{quote(image['name'], safe='/')}/blobs/{found[0]['document']}"
    async with session.get(url) as response:
        if response.status != 200:
            raise await _registry_error(response)
        return await response.text()


def _platform_option(value: str) -> str:
    """`linux/arm64`, or `arm64` as Docker's --platform also takes it."""
    value = value.strip().lower()
    if not value or value.endswith("/") or value.startswith("/"):  # `--platform "$UNSET"`: no platform named
        raise argparse.ArgumentTypeError(f"{value!r} names no platform: give OS/ARCH, e.g. linux/arm64")
    return value if "/" in value else f"linux/{value}"


def _tag_option(value: str) -> str:
    """A --tag that is given names a tag: `--tag "$UNSET"` built `latest` without a word."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the tag is empty: give one, or leave --tag out for latest")
    return value


def inspect_main(argv: list[str]) -> int:
    from nixery.errors import RegistryError
    from nixery.registry.names import check_image_tag, parse_image_name

    parser = argparse.ArgumentParser(prog="nixery inspect", description="Show an image's layers and store paths.")
    parser.add_argument("image", help="image name, e.g. shell/curl or shell/curl:TAG (the registry's own HOST/ "
                        "in front is dropped)")
    parser.add_argument("--registry", help=f"registry URL (default $NIXERY_REGISTRY or {DEFAULT_REGISTRY})")
    document = parser.add_mutually_exclusive_group()  # one document or the other: --sbom --json is refused
    document.add_argument("--json", action="store_true", help="print the registry's JSON document")
    document.add_argument("--sbom", action="store_true",
                          help="print the image's SBOM (SPDX 2.3 JSON, not with --json) instead")
    parser.add_argument("--platform", type=_platform_option, metavar="OS/ARCH",
                        help="with --sbom, for an image of several platforms: the SBOM of this one, e.g. "
                             "linux/arm64 (default: the default platform's, named on stderr)")
    parser.add_argument("--no-paths", action="store_true",
                        help="leave out the store paths of each layer (with --json too)")
    args = parser.parse_args(argv)
    if args.platform is not None and not args.sbom:  # the layers and --json show every platform already
        parser.error("--platform chooses whose SBOM --sbom prints: give it with --sbom")
    console = OutputConsole(highlight=False)
    try:
        registry = _registry_url(args.registry)
        # Pasted as pulled (`HOST/shell/curl:TAG`): this registry's host is dropped, another's named.
        given = image_of(args.image, registry)
    except (ClientError, UnusableReference) as exc:
        Console(stderr=True).print(f"nixery: {exc}{_other_registry(exc)}", markup=False, highlight=False,
                                   soft_wrap=True)
        return 2
    name, tag = _split(given, None)
    try:  # as the registry reads them; sent as they are, a space would come back as a "percent-encoded" name
        parse_image_name(name)
        check_image_tag(tag)  # an attachment's tag (sha256-...) names no image: said as the registry says it
    except RegistryError as exc:
        Console(stderr=True).print(f"nixery: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1

    async def fetch() -> dict[str, Any] | None:
        async with _session() as session:
            image = await _fetch_image(session, registry, name, tag)
            if args.sbom and image is not None:
                listing, platform = _platform_documents(image, args.platform)
                sbom = await _fetch_sbom(session, registry, image, listing)
                if platform is not None and args.platform is None:
                    # On stderr: stdout is the SBOM alone, for a tool it is piped into.
                    others = [one["platform"] for one in image["platforms"] if one["platform"] != platform]
                    Console(stderr=True).print(
                        f"nixery: the SBOM of {platform}, the default platform; "
                        f"the image is also for {', '.join(others)} (--platform {others[0]})",
                        markup=False, highlight=False, soft_wrap=True,
                    )
                sys.stdout.write(sbom)
            return image

    try:
        try:
            image = asyncio.run(fetch())
        except (aiohttp.ClientError, TimeoutError) as exc:  # those `_fetch_image` does not say itself
            raise _broken_answer(exc, registry) from exc
    except ClientError as exc:
        message = _not_built(exc, args.registry) or str(exc)
        Console(stderr=True).print(f"nixery: {message}", markup=False, highlight=False, soft_wrap=True)
        return 1
    assert image is not None
    if args.sbom:  # printed already
        return 0
    if args.json:
        print(json.dumps(_without_paths(image) if args.no_paths else image, indent=2))
    else:
        _print_image(console, image, registry_host(registry), paths=not args.no_paths)
    return 0
