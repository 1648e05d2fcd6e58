"""Every image the README and docs/*.md show being pulled is pulled here, from a real
registry on the package set `make run` serves (the Debian-derived set), so a doc
example that cannot work is a failing test. The landing page's examples too.

What counts as an example (in code blocks, and in inline code elsewhere):
* a reference with a registry host: `HOST/shell/curl`, `127.0.0.1:8080/shell/jq:latest`,
  `docker://...`, and any host in a `podman`, `docker`, `ctr` or `skopeo` command
  (for `skopeo copy`, only the source);
* `nixery build [--options] NAME` and `nixery inspect NAME`;
* `/v2/NAME/manifests/REF` (curl examples) and `"image": "NAME"` (POST /builds);
* in prose and tables, a name of several packages that starts with `shell` (`shell/tzdata`,
  `arm64/shell/curl`): `shell` is a package of every bundled set, so such a name is an
  image; one followed by a quoted answer (`shell/curll`: "did you mean curl?") is an
  example of a name the registry refuses with an error that says those words;
* the first column of a table headed `| name |` (the README's image names);
* the contents of each NixImage (in a YAML block, and in deploy/examples/, which the
  docs apply): the image its names make, for each of its platforms (`arm64/...`); its
  config (user, entry point, ...) is tested with declared images.
Names in upper case only (`NAME`, `IMAGE`) are placeholders and not examples.

An example that is about another package set says so with a marker, a Markdown
comment (a link reference definition, invisible on GitHub and on /docs) on its own
line before the block it applies to (the next lines up to a blank line, or a whole
fenced block):

    [//]: # "examples: busybox set"                 pulled from the busybox set instead
    [//]: # "examples not pulled: REASON"           not pulled (say why)
    [//]: # "examples not pulled (a/b, c): REASON"  only those names not pulled

Keep the markers few, and each true.

Commands are also run as written, with the registry's address for HOST and 127.0.0.1:8080:
the README's `podman run ... && echo ok'` commands and its bash session, the docs' `nixery`
commands (but `serve` and `layers plan`), their `skopeo copy`, the `docker run`, `podman run`
and `ctr image pull` commands that name HOST, docs/sbom.md's curl script and
package-sources.md's nix-build. Left out: those of another registry (registry.example.com:
a login, a cluster), the self image's (its own make target), `make run` and `make test`
themselves.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nixery.config import debian_set
from tests import daemons
from tests.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    PODMAN_RUN_FLAGS,
    REPOSITORY,
    RegistryProcess,
    error_of,
    have,
    podman_run,
    run,
)

DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
#: NixImage files the docs tell readers to apply (docs/kubernetes.md).
DECLARATION_EXAMPLES = sorted((REPOSITORY / "deploy" / "examples").glob("*.yaml"))

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_HOST = r"HOST|localhost:\d+|\d+\.\d+\.\d+\.\d+(?::\d+)?|[a-z0-9-]+(?:\.[a-z0-9-]+)+(?::\d+)?"
#: A registry reference: HOST/NAME[:TAG], not part of a URL other than docker://.
_REFERENCE = re.compile(rf"(?<![\w/.:-])(?:docker://)?(?:{_HOST})/(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?")
_CLIENT_COMMAND = re.compile(r"\b(?:podman|docker|ctr|skopeo)\s")
_EXPLICIT_HOST = re.compile(rf"(?<![\w/.:-])(?:docker://)?(?:HOST|127\.0\.0\.1:\d+|localhost:\d+)/{_NAME}")
_NIXERY_COMMAND = re.compile(rf"\bnixery (?:build|inspect)(?: --?[a-z-]+(?: (?!--)\S+)?)*? (?P<name>{_NAME})"
                             rf"(?::(?P<tag>{_TAG}))?")
_MANIFEST_PATH = re.compile(rf"/v2/(?P<name>{_NAME})/manifests/(?P<tag>{_TAG})")
_IMAGE_FIELD = re.compile(rf'"image":\s*"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?"')
#: An image name in prose: `shell/...` or `arm64/shell[/...]`; with the answer the docs quote
#: for it, when they quote one.
_PROSE_NAME = re.compile(
    rf'`(?P<name>arm64/shell(?:/{_NAME})?|shell/{_NAME})(?::(?P<tag>{_TAG}))?`(?:: "(?P<answer>[^"]+)")?'
)
_MARKER = re.compile(
    r'^\[//\]: # "examples(?P<what>: busybox set| not pulled(?: \((?P<names>[^)]*)\))?: (?P<why>.+))"$'
)


@dataclass(frozen=True)
class Example:
    document: str
    line: int
    name: str
    tag: str
    package_set: str | None  # "debian", "busybox", or None: not pulled
    #: Words the docs quote from the error the registry answers (a misspelt name), else None: it pulls.
    answer: str | None = None

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.name}:{self.tag}"


def references(text: str) -> Iterator[tuple[str, str]]:
    """(name, tag) of every image a piece of Markdown text shows being pulled."""
    found: list[tuple[int, str, str | None]] = []
    if _CLIENT_COMMAND.search(text) or _EXPLICIT_HOST.search(text):
        matches = list(_REFERENCE.finditer(text))
        if "skopeo copy" in text:
            matches = matches[:1]  # the destination is not pulled
        found += [(m.start(), m["name"], m["tag"]) for m in matches if m["name"].split("/")[0] != "v2"]
    for pattern in (_NIXERY_COMMAND, _MANIFEST_PATH, _IMAGE_FIELD):
        found += [(m.start(), m["name"], m["tag"]) for m in pattern.finditer(text)]
    for _, name, tag in sorted(found):
        name = name.rstrip(".")
        if not _placeholder(name):
            yield name, tag or "latest"


def _placeholder(name: str) -> bool:
    """NAME, IMAGE, shell/NAME: upper case only, in every part but a package's."""
    return name.removeprefix("arm64/").removeprefix("shell/").replace("/", "").replace("_", "").isupper()


def declared(text: str) -> Iterator[tuple[str, str]]:
    """(name, tag) of the image each NixImage in a YAML text is built from: its contents
    as an image name, per platform."""
    for document in yaml.safe_load_all(text):
        if isinstance(document, dict) and document.get("kind") == "NixImage":
            data = document["data"]
            arches = data.get("arch", "amd64")
            for arch in [arches] if isinstance(arches, str) else arches:
                yield ("arm64/" if arch == "arm64" else "") + "/".join(data["contents"]), str(data["tag"])


def _inline_code(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _blocks(lines: list[str]) -> Iterator[list[tuple[int, str]]]:
    """The blocks of a Markdown text, as numbered lines: runs of non-blank lines, and
    each fenced code block whole (blank lines included)."""
    block: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```") or fenced:
            if not fenced and block:
                yield block
                block = []
            block.append((number, line))
            if fenced and stripped.startswith("```"):
                yield block
                block = []
            fenced = fenced != stripped.startswith("```")
            continue
        if stripped:
            block.append((number, line))
        elif block:
            yield block
            block = []
    if block:
        yield block


def _prose_examples(text: str) -> Iterator[tuple[str, str, str | None]]:
    """(name, tag, answer) of each example in a line of prose or in table cells."""
    found = [(m.start(), m["name"], m["tag"] or "latest", m["answer"])
             for m in _PROSE_NAME.finditer(text) if not _placeholder(m["name"])]
    for code in re.finditer(r"`([^`]+)`", text):
        found += [(code.start(), name, tag, None) for name, tag in references(code.group(1))]
    yield from (example for _, *example in sorted(found))


def _block_examples(block: list[tuple[int, str]]) -> Iterator[tuple[int, str, str, str | None]]:
    """(line, name, tag, answer) of each example in one block."""
    first = block[0][1].strip()
    if first.startswith("```") or all(line.startswith("    ") for _, line in block):  # code
        lines = block[1:-1] if first.startswith("```") else block
        if any(line.strip() == "kind: NixImage" for _, line in lines):
            text = "\n".join(line for _, line in lines)
            yield from ((block[0][0], name, tag, None) for name, tag in declared(text))
            return
        joined = ""
        for number, line in lines:
            if line.rstrip().endswith("\\"):  # a command continued on the next line
                joined += line.rstrip()[:-1] + " "
                continue
            yield from ((number, name, tag, None) for name, tag in references(joined + line))
            joined = ""
    elif first.startswith("|"):  # a table; the first column of one headed `name` holds image names
        names_column = [c.strip() for c in first.strip("|").split("|")][0] == "name"
        for number, line in block[2:]:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if names_column:
                yield from ((number, name, "latest", None) for name in _inline_code(cells[0]))
                cells = cells[1:]
            yield from ((number, *example) for example in _prose_examples(" | ".join(cells)))
    else:
        for number, line in block:
            yield from ((number, *example) for example in _prose_examples(line))


def examples(path: Path, document: str | None = None) -> Iterator[Example]:
    """The examples of one document, each with the package set it is about."""
    document = document or str(path.relative_to(REPOSITORY))
    marker: re.Match[str] | None = None
    for block in _blocks(path.read_text().splitlines()):
        if len(block) == 1 and (found := _MARKER.match(block[0][1])) is not None:
            assert marker is None, f"{document}:{block[0][0]}: two markers in a row"
            marker = found
            continue
        governed = list(_block_examples(block))
        if marker is not None:
            named = [n.strip() for n in (marker["names"] or "").split(",") if n.strip()]
            unknown = set(named) - {name for _, name, _, _ in governed}
            assert governed and not unknown, f"{document}: {marker.group(0)} governs no such example {unknown or ''}"
        for number, name, tag, answer in governed:
            package_set: str | None = "debian"
            if marker is not None and marker["what"] == ": busybox set":
                package_set = "busybox"
            elif marker is not None and (not named or name in named):
                package_set = None
            yield Example(document, number, name, tag, package_set, answer)
        marker = None


ALL = [example for path in DOCUMENTS for example in examples(path)] + [
    Example(str(path.relative_to(REPOSITORY)), 1, name, tag, "debian")
    for path in DECLARATION_EXAMPLES for name, tag in declared(path.read_text())
]


def test_the_docs_have_examples_and_few_are_left_out() -> None:
    """The extraction finds the examples it should (a broken pattern would pass every pull
    test vacuously), and what the markers leave out stays a short list."""
    found = {(e.document, e.name) for e in ALL}
    for expected in [("README.md", "shell/curl"), ("README.md", "shell/jq"), ("docs/usage.md", "shell/git/jq"),
                     ("docs/web.md", "shell/curl"), ("docs/auth.md", "shell/curl"),
                     ("docs/kubernetes.md", "curl/jq/bash"), ("deploy/examples/niximages.yaml", "curl/jq/bash"),
                     ("docs/usage.md", "shell/tzdata"), ("docs/package-sources.md", "arm64/shell/python3")]:
        assert expected in found, expected
    assert ("README.md", "shell/curll", "curll (did you mean curl?)") in {(e.document, e.name, e.answer) for e in ALL}
    left_out = [str(e) for e in ALL if e.package_set is None]
    assert len(left_out) <= 10, left_out  # 10: a digit name, sets and repositories of one's own, the self image


def test_examples_and_markers_are_recognised(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Pull `HOST/shell/curl`; `curl/jq` alone is no pull.\n\n"
        '[//]: # "examples: busybox set"\n\n'
        "    podman run --rm 127.0.0.1:8080/shell/hello\n"
        "    skopeo copy docker://127.0.0.1:8080/shell/hello:v1 \\\n"
        "      docker://registry.example.com/x/y:1\n\n"
        '[//]: # "examples not pulled (tools.linter): the set above"\n\n'
        "`HOST/tools.linter` and `HOST/curl/jq`; `nixery build --local shell/jq`,\n"
        "`nixery build NAME`, `/v2/{name}/manifests/{reference}`, `curl http://HOST/v2/jq/manifests/latest`.\n\n"
        '`shell/tzdata` has zoneinfo, `arm64/shell` and `shell/NAME` are names, `shell` and `bin/sh` are not;\n'
        '`shell/curll`: "did you mean curl?".\n\n'
        "| name | image |\n|---|---|\n| `Curl` | any case |\n\n"
        "```yaml\nkind: NixImage\nmetadata: {name: tools}\n"
        "data: {tag: v2, contents: [shell, jq], arch: [amd64, arm64]}\n```\n"
    )
    assert [(e.line, e.name, e.tag, e.package_set) for e in examples(doc, "doc.md")] == [
        (1, "shell/curl", "latest", "debian"),
        (5, "shell/hello", "latest", "busybox"),
        (7, "shell/hello", "v1", "busybox"),
        (11, "tools.linter", "latest", None),
        (11, "curl/jq", "latest", "debian"),
        (11, "shell/jq", "latest", "debian"),
        (12, "jq", "latest", "debian"),
        (14, "shell/tzdata", "latest", "debian"),
        (14, "arm64/shell", "latest", "debian"),
        (15, "shell/curll", "latest", "debian"),
        (19, "Curl", "latest", "debian"),
        (21, "shell/jq", "v2", "debian"),
        (21, "arm64/shell/jq", "v2", "debian"),
    ]
    assert [e.answer for e in examples(doc, "doc.md") if e.name == "shell/curll"] == ["did you mean curl?"]
    doc.write_text('[//]: # "examples not pulled (x): stale"\n\nNo example here.\n')
    with pytest.raises(AssertionError, match="governs no such example"):
        list(examples(doc, "doc.md"))


def test_the_kubectl_output_kubernetes_md_shows_has_the_crds_columns_and_the_examples() -> None:
    """docs/kubernetes.md's `kubectl get niximages` output: its header is NAME and the CRD's
    printer columns kubectl shows by default (priority 0), its rows the NixImages of
    deploy/examples/niximages.yaml, which the block above it applies."""
    text = (REPOSITORY / "docs" / "kubernetes.md").read_text()
    shown = text.split("kubectl get niximages\n```\n\n```\n", 1)[1].split("```", 1)[0].splitlines()
    (crd,) = yaml.safe_load_all((REPOSITORY / "deploy" / "base" / "crd.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    columns = ["NAME"] + [c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown[0].split() == columns, (shown[0], columns)
    applied = yaml.safe_load_all((REPOSITORY / "deploy" / "examples" / "niximages.yaml").read_text())
    declared_images = [d for d in applied if isinstance(d, dict) and d.get("kind") == "NixImage"]
    rows = [row.split() for row in shown[1:]]
    assert [row[:2] for row in rows] == sorted([d["metadata"]["name"], str(d["data"]["tag"])] for d in declared_images)


# ---- pulling them ------------------------------------------------------------------

if not (debian_set().path / "default.nix").is_file():
    if os.environ.get("NIXERY_REQUIRE_DEBIAN_SET"):  # CI: its set-up must have worked
        raise RuntimeError(f"the Debian set is not generated ({debian_set().path}/default.nix missing)")
    needs_debian_set = pytest.mark.skip(reason="the Debian set is not generated: run scripts/debian-set/setup.sh")
else:
    needs_debian_set = pytest.mark.nix


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RegistryProcess]]:
    base = tmp_path_factory.mktemp("doc-examples")
    started = {}
    try:
        for name in ("debian", "busybox"):
            started[name] = RegistryProcess(
                storage=base / name, env={"NIXERY_BUNDLED_SET": name}, log_path=base / f"{name}.log"
            ).start()
        yield started
    finally:
        for registry in started.values():
            registry.stop()
        if have("podman"):  # podman keeps what it pulled: drop this module's images
            images = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).stdout.split()
            mine = [i for i in images if any(i.startswith(r.host + "/") for r in started.values())]
            if mine:
                run(["podman", "rmi", "--force", *mine], check=False)


def _pull(registry: RegistryProcess, name: str, tag: str) -> str | None:
    """None when the manifest is served, else what the registry said."""
    status, _, body = registry.request(f"/v2/{name}/manifests/{tag}")
    return None if status == 200 else f"{status} {body[:300].decode(errors='replace')}"


def _unlike_the_answer(registry: RegistryProcess, name: str, tag: str, answer: str) -> str | None:
    """None when the registry refuses the name with an error message that has the words
    the docs quote, else what it said."""
    status, _, body = registry.request(f"/v2/{name}/manifests/{tag}")
    if status != 200:
        messages = [error.get("message", "") for error in json.loads(body).get("errors", [])]
        if any(answer in message for message in messages):
            return None
    return f"not an error saying {answer!r}: {status} {body[:300].decode(errors='replace')}"


@needs_debian_set
def test_every_doc_example_pulls_from_the_set_it_is_about(registries: dict[str, RegistryProcess]) -> None:
    """An example with an answer (a misspelt name) gets an error that says what the docs quote."""
    failures = []
    pulled: dict[tuple[str, str, str, str | None], str | None] = {}
    for example in ALL:
        if example.package_set is None:
            continue
        key = (example.package_set, example.name, example.tag, example.answer)
        if key not in pulled:
            registry = registries[example.package_set]
            pulled[key] = (_pull(registry, example.name, example.tag) if example.answer is None
                           else _unlike_the_answer(registry, example.name, example.tag, example.answer))
        if pulled[key] is not None:
            failures.append(f"{example} ({example.package_set} set): {pulled[key]}")
    assert not failures, "doc examples that do not work:\n" + "\n".join(failures)


class _PageExamples(html.parser.HTMLParser):
    """Image names a page offers: the build form's placeholder, the search's "e.g. NAME",
    and the pull commands in <code>."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[tuple[str, str]] = []
        self._code = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        placeholder = attributes.get("placeholder") or ""
        if tag == "input" and attributes.get("name") in ("image", "q") and placeholder:
            self.names.append((placeholder.removeprefix("e.g. "), "latest"))
        self._code += tag == "code"

    def handle_endtag(self, tag: str) -> None:
        self._code -= tag == "code"

    def handle_data(self, data: str) -> None:
        if self._code:
            self.names += list(references(data))


@needs_debian_set
def test_the_pages_examples_pull_from_the_debian_set(registries: dict[str, RegistryProcess]) -> None:
    registry = registries["debian"]
    parser = _PageExamples()
    for path in ("/", "/packages"):
        status, _, body = registry.request(path, accept="text/html")
        assert status == 200
        parser.feed(body.decode())
    # A form with an invalid name answers with the form again, its default placeholder included.
    status, _, body = registry.request("/builds?image=..", method="POST", accept="text/html",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    parser.feed(body.decode())
    assert ("shell/curl", "latest") in parser.names and ("curl", "latest") in parser.names, parser.names
    failures = [f"{name}:{tag}: {answer}" for name, tag in dict.fromkeys(parser.names)
                if (answer := _pull(registry, name, tag)) is not None]
    assert not failures, failures


def _readme_podman_checks() -> Iterator[tuple[list[int], str]]:
    """(lines, command) of each `podman run` of the README that says whether it worked: its
    command ends `&& echo ok'`. A command continued with `\\` is joined."""
    for block in _blocks((REPOSITORY / "README.md").read_text().splitlines()):
        joined, numbers = "", []
        for number, line in block:
            joined, numbers = joined + line.strip().removesuffix("\\"), [*numbers, number]
            if line.rstrip().endswith("\\"):
                joined += " "
                continue
            if joined.startswith("podman run ") and joined.endswith("&& echo ok'"):
                yield numbers, joined
            joined, numbers = "", []


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_the_readme_podman_commands_run_as_written(registries: dict[str, RegistryProcess]) -> None:
    """Each `podman run ... && echo ok'` of the README (the first lines', "The two commands'"
    and the busybox set's), against the registry of the set it is about, with the flags the
    README says our development machines need (--runtime runc --network none, --ulimit ...)
    added where the command lacks them."""
    commands = list(_readme_podman_checks())
    assert len(commands) >= 3, commands
    for numbers, command in commands:
        number = numbers[0]
        package_sets = {e.package_set for e in ALL if e.document == "README.md" and e.line in numbers}
        assert len(package_sets) == 1 and None not in package_sets, (number, package_sets)
        host = registries[str(package_sets.pop())].host
        argv = shlex.split(command.replace("127.0.0.1:8080", host))
        assert argv[:2] == ["podman", "run"] and host in " ".join(argv), argv
        needed = PODMAN_RUN_FLAGS if "--runtime" not in argv else PODMAN_RUN_FLAGS[PODMAN_RUN_FLAGS.index("--ulimit"):]
        result = run([*argv[:2], *needed, *argv[2:]], stdin=subprocess.DEVNULL)  # -t without a terminal
        lines = result.stdout.replace("\r", "").splitlines()
        assert lines and lines[-1] == "ok", f"README.md:{number}: {command}\n{result.stdout}"


def _readme_bash_sessions() -> Iterator[tuple[int, str, str, list[str]]]:
    """(line, command, prompt, typed) of each `podman run ... bash` of the README shown with
    what is typed at its prompt on the lines below (`bash-5.2# curl --version`)."""
    for block in _blocks((REPOSITORY / "README.md").read_text().splitlines()):
        for index, (number, line) in enumerate(block):
            command = line.strip()
            typed = [re.match(r"(bash-[\d.]+# )(.*)", rest.strip()) for _, rest in block[index + 1:]]
            if command.startswith("podman run ") and command.endswith(" bash") and typed and typed[0]:
                typed = typed[:next((i for i, t in enumerate(typed) if t is None), len(typed))]
                yield number, command, typed[0][1], [t[2] for t in typed if t is not None]


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_the_readme_bash_session_runs_as_shown(registries: dict[str, RegistryProcess]) -> None:
    """The shell the README shows (`bash-5.2#`) is the image's, and what it shows typed there works;
    the commands are given on standard input (`-i` instead of `-ti`: there is no terminal)."""
    sessions = list(_readme_bash_sessions())
    assert sessions, "the README shows no bash session"
    for number, command, prompt, typed in sessions:
        argv = shlex.split(command.replace("127.0.0.1:8080", registries["debian"].host).replace(" -ti ", " -i "))
        script = 'echo "bash-${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}# "\n' + "\n".join(typed) + "\n"
        result = run([*argv[:2], *PODMAN_RUN_FLAGS, *argv[2:]], input=script)
        lines = result.stdout.splitlines()
        assert lines and lines[0].strip() == prompt.strip(), f"README.md:{number}: {prompt!r}, the image's: {lines[:1]}"
        assert len(lines) > 1, f"README.md:{number}: {typed} printed nothing"  # and exited 0: run() checks


def _code_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line, command) of each command of a document's code blocks: a command continued with
    `\\` joined, a `# comment` left out."""
    for block in _blocks(path.read_text().splitlines()):
        if not (block[0][1].strip().startswith("```") or all(line.startswith("    ") for _, line in block)):
            continue
        joined, first = "", 0
        for number, line in block:
            joined, first = joined + line.strip().removesuffix("\\"), first or number
            if line.rstrip().endswith("\\"):
                joined += " "
                continue
            yield first, joined.split(" #", 1)[0].strip()
            joined, first = "", 0


def _pulled_commands(prefix: str) -> list[tuple[str, str]]:
    """(where, command) of each command that starts with `prefix` and shows an image pulled
    from the Debian set (not one the markers leave out, nor one of another registry)."""
    debian_lines = {(e.document, e.line) for e in ALL if e.package_set == "debian"}
    return [(f"{document}:{number}", command) for path in DOCUMENTS
            for document in [str(path.relative_to(REPOSITORY))]
            for number, command in _code_commands(path)
            if command.startswith(prefix) and (document, number) in debian_lines]


def _nixery_commands_shown() -> list[tuple[str, str]]:
    """(where, command) of each `nixery ...` command of the docs' code blocks that a test can
    run as it is: not `serve` (the registries here are served), nor `layers plan` (its files
    are placeholders), nor one of a block about another package set. After a pipe, the
    command the pipe feeds."""
    elsewhere = {(e.document, e.line) for e in ALL if e.package_set != "debian"}
    shown = []
    for path in DOCUMENTS:
        document = str(path.relative_to(REPOSITORY))
        for number, command in _code_commands(path):
            command = command.rsplit(" | ", 1)[-1]
            if (command.startswith("nixery ") and command.split()[1] not in ("serve", "layers")
                    and (document, number) not in elsewhere):
                shown.append((f"{document}:{number}", command))
    return shown


@needs_debian_set
def test_the_nixery_commands_of_the_docs_run(registries: dict[str, RegistryProcess], tmp_path: Path) -> None:
    """Each `nixery build`, `inspect`, `check`, `gc`, `auth` and `keys` command of the docs' code
    blocks, with and without its `[optional parts]`, exits 0: TAG is `latest`, 127.0.0.1:8080 and
    URL are the Debian set's registry (whose storage `check`, `gc` and `build --local` use), a
    directory (DIR, /etc/nixery) is one of this test's, a redirection is left out, and a password
    comes on standard input. `--sbom` prints the SPDX JSON."""
    registry = registries["debian"]
    commands = _nixery_commands_shown()
    assert {"build", "inspect", "check", "gc", "auth", "keys"} <= {command.split()[1] for _, command in commands}
    # The docs inspect an image after pulling or building it; check and gc want a storage with one.
    assert _pull(registry, "shell/curl", "latest") is None
    for index, (where, command) in enumerate(commands):
        command = re.split(r" >>? ", command, maxsplit=1)[0].replace("127.0.0.1:8080", registry.host)
        directory = tmp_path / str(index)
        command = re.sub(r"\bDIR\b|/etc/nixery", str(directory), command.replace("URL", registry.url))
        command = command.replace("TAG", "latest")
        for variant in dict.fromkeys([re.sub(r"\[([^\]]*)\]", r"\1", command), re.sub(r" ?\[[^\]]*\]", "", command)]):
            argv = shlex.split(variant)
            result = run([sys.executable, "-m", *argv], check=False, timeout=600, input="a password\n", env_extra={
                "NIXERY_REGISTRY": registry.url, "STORAGE_PATH": str(registry.storage), "NIXERY_BUNDLED_SET": "debian",
            })
            said = result.stdout[-2000:] + result.stderr[-2000:]
            assert result.returncode == 0, f"{where}: {variant}: exit {result.returncode}\n{said}"
            if "--sbom" in argv:
                assert json.loads(result.stdout)["spdxVersion"] == "SPDX-2.3", where


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_the_skopeo_copies_of_the_docs_run(registries: dict[str, RegistryProcess], tmp_path: Path) -> None:
    """Each `skopeo copy ... docker://HOST/NAME oci:DIR:TAG` of the docs, into a directory of this test's."""
    commands = _pulled_commands("skopeo copy ")
    assert {"README.md", "docs/usage.md"} <= {where.split(":")[0] for where, _ in commands}, commands
    for index, (where, command) in enumerate(commands):
        argv = shlex.split(re.sub(r"docker://(?:HOST|127\.0\.0\.1:8080)/", f"docker://{registries['debian'].host}/",
                                  command))
        destination = argv[-1]
        assert destination.startswith("oci:"), (where, destination)
        argv[-1] = f"oci:{tmp_path / str(index)}:{destination.rsplit(':', 1)[1]}"
        run(argv)
        assert (tmp_path / str(index) / "index.json").is_file(), where


@needs_debian_set
@pytest.mark.skipif(not have("curl"), reason="needs curl")
def test_the_curl_scripts_of_the_docs_run(registries: dict[str, RegistryProcess]) -> None:
    """Each code block of curl commands against `http://127.0.0.1:8080` (docs/sbom.md's referrers
    query) runs in bash with this registry's address, and its last command prints JSON: what it
    shows (a referrers index that lists the SPDX SBOM)."""
    scripts = []
    for path in DOCUMENTS:
        for block in _blocks(path.read_text().splitlines()):
            text = "\n".join(line for _, line in block)
            if "http://127.0.0.1:8080/" in text and re.search(r"^\s*(?:\S+=\$\()?curl ", text, re.M):
                scripts.append((f"{path.relative_to(REPOSITORY)}:{block[0][0]}", text))
    assert [where for where, _ in scripts if where.startswith("docs/sbom.md")], scripts
    for where, script in scripts:
        result = run(["bash", "-euo", "pipefail", "-c", script.replace("127.0.0.1:8080", registries["debian"].host)])
        answer = json.loads(result.stdout)
        if "referrers" in script:
            listed = [m["artifactType"] for m in answer.get("manifests", [])]
            assert listed == ["application/spdx+json"], (where, answer)


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not all(have(tool) for tool in ("podman", "dockerd", "containerd", "ctr")),
                    reason="needs podman, docker.io, containerd")
def test_the_client_commands_of_the_docs_that_name_host_run(
    registries: dict[str, RegistryProcess], tmp_path: Path
) -> None:
    """Each `docker run`, `podman run` and `ctr image pull` of the docs' code blocks whose registry
    is HOST (the README's first lines, usage.md's "Pulling"), with HOST the Debian set's registry:
    a `run ... bash` gets `echo ok` on standard input (`-i` for `-ti`: there is no terminal
    here); podman gets the flags our machines need, docker `--network none` (its daemon has
    no bridge); docker and ctr talk to daemons of this test's own."""
    host = registries["debian"].host
    commands = [(where, command) for prefix in ("docker run ", "podman run ", "ctr image pull ")
                for where, command in _pulled_commands(prefix) if "HOST/" in command]
    assert {"docker", "podman", "ctr"} == {command.split()[0] for _, command in commands}, commands
    # A short base: dockerd's own containerd sockets under its exec root must fit a socket address
    # (108 bytes); under this test's tmp_path dockerd failed to start its containerd.
    base = Path(tempfile.mkdtemp(prefix="docs-", dir="/tmp"))
    try:
        with daemons.dockerd(base / "docker") as docker, daemons.containerd(base / "ctr") as containerd:
            for where, command in commands:
                argv = shlex.split(command.replace("HOST/", f"{host}/").replace(" -ti ", " -i "))
                client, flags = {
                    "podman": (["podman"], PODMAN_RUN_FLAGS),
                    "docker": (["docker", "-H", f"unix://{docker}"], ["--network", "none"]),
                    "ctr": (["ctr", "--address", str(containerd)], []),
                }[argv[0]]
                if argv[1] == "run":
                    assert argv[-1] == "bash", (where, command)
                    result = run([*client, "run", *flags, *argv[2:]], input="echo ok\n", timeout=600)
                    assert result.stdout.splitlines()[-1:] == ["ok"], (where, result.stdout[-1000:])
                else:
                    run([*client, *argv[1:]], timeout=600)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _listed_debian_packages() -> list[str]:
    """The names of "The Debian set holds a, b (note), c/d and e (`x`) (`packages.txt`)" in the README."""
    text = " ".join((REPOSITORY / "README.md").read_text().split())
    listed = text.split("The Debian set holds ", 1)[1].split(" (`scripts/debian-set/packages.txt`)", 1)[0]
    listed = re.sub(r"\([^)]*\)", "", listed).replace(" and ", ", ")
    return [name.strip() for item in listed.split(",") for name in item.split("/")]


@needs_debian_set
def test_every_package_the_readme_lists_for_the_debian_set_is_a_name_it_has() -> None:
    """What a reader takes from the README's list of the Debian set's packages is an image name."""
    listed = _listed_debian_packages()
    assert {"bash", "zip", "unzip", "python3", "netbase"} <= set(listed) and len(listed) > 40, listed
    names = json.loads(run(["nix-instantiate", "--eval", "--json", "-E",
                            f"builtins.attrNames (import {debian_set().path} {{ }})"]).stdout)
    assert not [name for name in listed if name not in names], "listed in the README, not in the Debian set"


def _readme_text() -> str:
    """The README with its lines joined by single spaces, as a reader takes a sentence."""
    return " ".join((REPOSITORY / "README.md").read_text().split())


@needs_debian_set
def test_the_names_the_readme_calls_one_image_have_the_same_digests(registries: dict[str, RegistryProcess]) -> None:
    """"`shell/jq`, `jq/shell` and `JQ/Shell` are one image (the same digests, one build)"."""
    names = _inline_code(_readme_text().split(" are one image (the same digests", 1)[0].rsplit(": ", 1)[1])
    assert len(names) >= 3, names
    registry = registries["debian"]
    for accept in (DOCKER_MANIFEST, OCI_MANIFEST):
        digests = {name: registry.manifest(name, accept=accept)[0] for name in names}
        assert len(set(digests.values())) == 1, digests


@needs_debian_set
def test_the_package_names_the_readme_offers_for_the_debian_set_are_images(
    registries: dict[str, RegistryProcess],
) -> None:
    """"Use the usual Nix names (`python3`, ...) or Debian's, as the package search shows them
    (`openssh-client`, `python3.11`: ...; `+` and `.` also become `x` and `_`: `libstdcxx6`, `python3_11`)"."""
    sentence = _readme_text().split("Use the usual Nix names", 1)[1].split("`shell` is bash", 1)[0]
    names = [code for code in _inline_code(sentence) if len(code) > 1]  # not the characters `+`, `x`
    assert {"python3", "openssh-client", "python3.11", "libstdcxx6", "python3_11"} <= set(names), names
    failures = {name: answer for name in names if (answer := _pull(registries["debian"], name, "latest"))}
    assert not failures, failures


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_the_debian_names_of_python_the_readme_offers_are_python(registries: dict[str, RegistryProcess]) -> None:
    """`python3.11` and `python3_11` gave images with no Python in them but in /nix/store: Debian's
    package of that name holds pydoc3.11 alone, its interpreter is in python3.11-minimal, which
    was not linked. Now both names are Python, as `python3` is: the program runs by name, and is
    the image's command."""
    registry = registries["debian"]
    result = podman_run(f"{registry.host}/shell/python3.11", "python3.11", "-c", "print(6 * 7)")
    assert result.stdout.strip() == "42", result.stdout
    _, manifest = registry.manifest("python3_11")
    _, _, body = registry.request(f"/v2/python3_11/blobs/{manifest['config']['digest']}", accept=None)
    assert json.loads(body)["config"]["Cmd"] == ["/bin/python3"]


@needs_debian_set
@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_the_pod_of_kubernetes_md_runs_its_command_in_the_declared_image(start_registry, tmp_path: Path) -> None:
    """docs/kubernetes.md's pod ran `head` and `sleep` in `curl-and-jq:v1`, which deploy/examples
    declares with curl, jq and bash alone: the pod would have crash-looped. Its command, run as
    written in that image (declared from the example file, as the page says), now ends well:
    with no network here, curl reports response code 0 and jq prints it."""
    text = (REPOSITORY / "docs" / "kubernetes.md").read_text()
    documents = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)]
    (pod,) = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Pod"]
    (container,) = pod["spec"]["containers"]
    reference = container["image"].removeprefix("nixery.example.com/")
    name = reference.split(":")[0]
    examples = yaml.safe_load_all((REPOSITORY / "deploy" / "examples" / "niximages.yaml").read_text())
    (declared,) = [e for e in examples if isinstance(e, dict) and e["metadata"]["name"] == name]
    images = tmp_path / "images"
    images.mkdir()
    (images / "example.yaml").write_text(yaml.safe_dump(declared))
    registry = start_registry(NIXERY_BUNDLED_SET="debian", NIXERY_IMAGES_PATH=str(images))
    result = podman_run(f"{registry.host}/{reference}", *container["command"])
    assert result.stdout.strip() == "0", result.stdout


@needs_debian_set
def test_the_platform_prefixes_the_readme_says_are_packages_are_refused_saying_so(
    registries: dict[str, RegistryProcess],
) -> None:
    """"`amd64/shell` or `riscv64/shell` asks for a package called `amd64` or `riscv64`, and when
    the set has none the answer says so"."""
    row = _readme_text().split("It is the only platform prefix: ", 1)[1].split(" asks for a package called", 1)[0]
    names = _inline_code(row)
    assert names == ["amd64/shell", "riscv64/shell"], names
    for name in names:
        status, _, body = registries["debian"].request(f"/v2/{name}/manifests/latest")
        assert status == 404 and error_of(body)["code"] == "MANIFEST_UNKNOWN", (status, body)
        prefix = name.split("/")[0]
        assert f"packages not found in bundled debian: {prefix}" in error_of(body)["message"], body


@needs_debian_set
def test_the_arm64_package_count_and_the_amd64_only_ones_package_sources_md_gives_are_the_sets() -> None:
    """"the same package list for arm64 (N packages: htop's A and strace's B are amd64-only
    dependencies)": N is what the generated set has for arm64, A and B what it lacks there."""
    text = " ".join((REPOSITORY / "docs" / "package-sources.md").read_text().split())
    found = re.search(r"for arm64 \((\d+) packages: (.*?) are amd64-only dependencies\)", text)
    assert found is not None

    def listed(name: str) -> set[str]:
        return {line.split()[0] for line in (debian_set().path / name).read_text().splitlines() if line.strip()}

    arm64, amd64 = listed("packages-arm64.txt"), listed("packages.txt")
    assert int(found[1]) == len(arm64), f"docs/package-sources.md says {found[1]}; the set has {len(arm64)}"
    assert set(re.findall(r"'s (\S+)", found[2])) == amd64 - arm64


@pytest.mark.nix
def test_every_package_the_readme_names_for_the_busybox_set_is_a_name_it_has() -> None:
    """"the busybox set, which has `hello`, `figlet`, ..." and the bundled sets' list ("`busybox`
    (`pkgs/busybox/`): ... `shell`, `hello`, ... `scale-0` … `scale-299` ... for benchmarks")."""
    text = _readme_text()
    said = text.split("`make run` serves the busybox set, which has ", 1)[1].split(" instead", 1)[0]
    listed = text.split("* `busybox` (`pkgs/busybox/`): ", 1)[1].split(" for benchmarks", 1)[0]
    names = _inline_code(said) + _inline_code(listed)
    assert {"hello", "figlet", "greet", "libwords", "cacert", "bigdata", "scale-299"} <= set(names), names
    have_names = json.loads(run(["nix-instantiate", "--eval", "--json", "-E",
                                 f"builtins.attrNames (import {REPOSITORY / 'pkgs' / 'busybox'} {{ }})"]).stdout)
    assert [name for name in names if name not in have_names] == [], "named in the README, not in the busybox set"


@pytest.mark.nix
def test_the_nix_build_commands_of_the_docs_run() -> None:
    """docs/package-sources.md's `nix-build ... -E '(import ./pkgs/busybox { system = "aarch64-linux"; }).hello'`,
    from the checkout, as written: an aarch64 package of the bundled busybox set builds on this machine."""
    commands = [(f"{path.relative_to(REPOSITORY)}:{number}", command) for path in DOCUMENTS
                for number, command in _code_commands(path) if command.startswith("nix-build ")]
    assert commands, "the docs show no nix-build command"
    for where, command in commands:
        outputs = run(shlex.split(command), timeout=600).stdout.split()
        assert outputs and all(Path(output).exists() for output in outputs), (where, outputs)


@needs_debian_set
def test_the_build_event_web_md_shows_is_what_the_stream_sends(registries: dict[str, RegistryProcess]) -> None:
    """docs/web.md's event (`id:`, `event: compressing`, `data:` a "compressed layer ..." event):
    a build's stream sends an event with the same lines and fields, its message in that form."""
    text = (REPOSITORY / "docs" / "web.md").read_text().split("### Events\n", 1)[1]
    shown = next(block for block in _blocks(text.splitlines()) if block[0][1].strip().startswith("id: "))
    lines = [line.strip() for _, line in shown]
    assert [line.split(":", 1)[0] for line in lines[:3]] == ["id", "event", "data"], lines
    event = lines[1].split(": ", 1)[1]
    data = json.loads(" ".join(lines[2:]).split(": ", 1)[1])
    # The message's form: a layer's short digest and sizes stand for any, in any unit; its rate
    # (a size a second) is left out for a layer compressed too fast to time, as a small one is.
    size = r"\d+(?:\.\d+)? (?:B|kB|MB|GB)"
    forms = {r"[0-9a-f]{12}": r"[0-9a-f]{12}", rf", {size}/s": rf"(?:, {size}/s)?", size: size}
    message = "".join(next((form for shown, form in forms.items() if re.fullmatch(shown, part)), re.escape(part))
                      for part in re.split(rf"(\b[0-9a-f]{{12}}\b|, {size}/s|{size})", data["message"]))
    registry = registries["debian"]
    # A new image: its entry-point layer at least is compressed now.
    post = urllib.request.Request(f"{registry.url}/builds", data=json.dumps({"image": "shell/bc/tree/file"}).encode(),
                                  headers={"Content-Type": "application/json", "Accept": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as answer:
        assert answer.status == 202
        events = json.load(answer)["events"]
    status, _, stream = registry.request(events, accept="text/event-stream")  # until the build is done
    sent = [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            for block in stream.decode().split("\n\n")]
    matching = [s for s in sent if s.get("event") == event and re.fullmatch(message, json.loads(s["data"])["message"])]
    assert matching, f"no event like {data['message']!r} in {[s.get('data', '')[:120] for s in sent]}"
    assert int(matching[0]["id"]) == json.loads(matching[0]["data"])["index"]
    assert set(json.loads(matching[0]["data"])) == set(data), (sorted(json.loads(matching[0]["data"])), sorted(data))
