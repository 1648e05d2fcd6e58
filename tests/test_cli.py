"""The command line: `nixery build` and `nixery inspect` against a real registry, under a
pseudo-terminal (a progress bar) and without one (plain lines), and into a pipe that closes;
`check` and `gc` on storage that holds nothing; what each command's --help says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from nixery import config
from nixery.registry.mediatypes import OCI_INDEX
from tests import terminal
from tests.registry import REPOSITORY, DistributionRegistry, RegistryProcess, free_port, slow_package_set
from tests.sets import require_debian_set

pytestmark = pytest.mark.nix

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def nixery(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixery", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY, env={**os.environ, **(env or {})},
    )


def nixery_in_pty(*args: str, timeout: float = 300) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a pseudo-terminal; returns (exit status, everything shown)."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    status, output = terminal.nixery_in_pty(*args, timeout=timeout, env=env)
    return status, output.decode(errors="replace")





def test_build_on_a_terminal_shows_a_progress_bar(start_registry, tmp_path: Path) -> None:
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs")))
    status, raw = nixery_in_pty("build", "shell/slowpoke", "--registry", registry.url)
    shown = ANSI.sub("", raw)
    assert status == 0, shown[-3000:]
    assert "\x1b[" in raw  # drawn with terminal control sequences
    assert "━" in shown  # rich's bar
    for label in ("Evaluating", "Building with Nix", "Compressing layers", "Done"):
        assert label in shown, label
    assert re.search(r"Compressing layers\s.*\d+/\d+ layers", shown)
    digest, _ = registry.manifest("shell/slowpoke")
    assert digest in shown
    assert re.search(r"Digest\s+" + re.escape(digest), shown)
    assert "slowpoke-1.0" in shown  # the layer table


def test_build_without_a_terminal_prints_plain_lines(registry: RegistryProcess) -> None:
    result = nixery("build", "shell/hello", "--registry", registry.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "\x1b[" not in result.stdout and "━" not in result.stdout
    events = [line for line in lines if line.startswith("[")]
    stages = [line.split()[2] for line in events]
    assert stages[0] == "queued" and stages[-1] == "done"
    assert {"evaluating", "building", "layering", "compressing", "uploading"} <= set(stages)
    digest, manifest = registry.manifest("shell/hello")
    assert f"Digest   {digest}" in lines
    assert any(line.startswith("Size") and f"{len(manifest['layers'])} layers" in line for line in lines)
    table = lines[lines.index(next(line for line in lines if line.startswith("#"))) + 1 :]
    assert len([row for row in table if re.match(r"\d+\s+[0-9a-f]{12}\s", row)]) == len(manifest["layers"])

    # Built already: the build answers at once, with the same digest.
    again = nixery("build", "hello/shell:latest", "--registry", registry.url.removeprefix("http://"))
    assert again.returncode == 0, again.stderr
    assert "already built" in again.stdout and f"Digest   {digest}" in again.stdout


def test_build_failures_exit_non_zero_with_the_registry_message(registry: RegistryProcess) -> None:
    missing = nixery("build", "shell/nosuchpackage", "--registry", registry.url)
    assert missing.returncode == 1
    assert "packages not found" in missing.stderr and "nosuchpackage" in missing.stderr
    assert missing.stdout.splitlines()[-1].split()[2] == "failed"
    misspelt = nixery("build", "shell/cowsy", "--registry", registry.url)
    assert misspelt.returncode == 1 and "cowsy (did you mean cowsay?)" in misspelt.stderr
    invalid = nixery("build", "shell/bad!", "--registry", registry.url)
    assert invalid.returncode == 1 and "NAME_INVALID" in invalid.stderr and "invalid package name" in invalid.stderr
    # The registry's kind of error is shown, not the distribution spec's code (NAME_INVALID).
    bad_tag = nixery("build", "shell/hello:a..b", "--registry", registry.url)
    assert bad_tag.returncode == 1 and "TAG_INVALID: invalid tag" in bad_tag.stderr, bad_tag.stderr
    unreachable = nixery("build", "shell/hello", "--registry", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach the registry" in unreachable.stderr
    usage = nixery("build")
    assert usage.returncode == 2


def test_no_image_is_built_under_a_tag_no_client_could_pull(registry: RegistryProcess, tmp_path: Path) -> None:
    """`POST /builds` took `tag=feature/x`, and its progress page then showed
    `docker pull HOST/hello:feature/x`, which no client can pull (an OCI tag has no `/`). Now
    the form, its JSON, the package search whose Build buttons build under the tag, `nixery
    build` and `nixery build --local` refuse it at once, 400 TAG_INVALID, as the API does."""
    for tag in ("feature/x", "a/b/c", "x/"):
        fields = {"image": "hello", "tag": tag}
        for kind, body in [("application/x-www-form-urlencoded", urllib.parse.urlencode(fields)),
                           ("application/json", json.dumps(fields))]:
            request = urllib.request.Request(f"{registry.url}/builds", data=body.encode(), method="POST",
                                             headers={"Content-Type": kind, "Accept": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            error = json.loads(refused.value.read())["errors"][0]
            assert refused.value.code == 400 and error["detail"]["kind"] == "TAG_INVALID", (tag, kind, error)
            assert "cannot contain '/'" in error["message"], error
        status, _, body = registry.request(f"/packages?q=hello&format=json&tag={tag}", accept="application/json")
        assert status == 400 and json.loads(body)["errors"][0]["detail"]["kind"] == "TAG_INVALID", (tag, body)
        remote = nixery("build", "--plain", "--registry", registry.url, "--tag", tag, "hello")
        assert remote.returncode == 1 and "TAG_INVALID" in remote.stderr, remote  # said before any request
    assert not registry.log_events("http.build_started")
    local = nixery("build", "--local", "--plain", "hello:feature/x",
                   env={"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox"})
    assert local.returncode == 1 and "invalid tag 'feature/x': a tag cannot contain '/'" in local.stderr, local
    assert registry.request("/v2/hello/manifests/latest")[0] == 200  # an OCI tag still builds


def test_inspect_shows_layers_and_store_paths(registry: RegistryProcess) -> None:
    digest, manifest = registry.manifest("shell/cowsay")
    result = nixery("inspect", "cowsay/shell", "--registry", registry.url)
    assert result.returncode == 0, result.stderr
    assert f"Digest   {digest}" in result.stdout
    # The name as first asked for, whatever order inspect was given.
    assert "Image    shell/cowsay:latest" in result.stdout
    assert "the same image as cowsay/shell: the order of the names does not matter" in result.stdout
    paths = re.findall(r"^  (/nix/store/\S+)$", result.stdout, re.MULTILINE)
    assert any(p.endswith("-cowsay-3.7.0") for p in paths)
    assert any(p.endswith("-libwords-1.4") for p in paths)
    for layer in manifest["layers"][:-1]:  # every layer but the entry points holds store paths
        assert f"{layer['digest'][7:19]} holds:" in result.stdout
    as_json = nixery("inspect", "cowsay/shell:latest", "--registry", registry.url, "--json")
    assert as_json.returncode == 0 and '"paths": [' in as_json.stdout
    # --no-paths meant nothing with --json: the store paths were printed all the same.
    short = nixery("inspect", "cowsay/shell:latest", "--registry", registry.url, "--json", "--no-paths")
    assert short.returncode == 0, short.stderr
    document = json.loads(short.stdout)
    assert [layer["digest"] for layer in document["layers"]] == [layer["digest"] for layer in manifest["layers"]]
    assert '"paths"' not in short.stdout and "/nix/store/" not in short.stdout
    missing = nixery("inspect", "shell/figlet", "--registry", registry.url)
    assert missing.returncode == 1 and "not built yet" in missing.stderr
    assert f"`nixery build --registry {registry.url} shell/figlet`" in missing.stderr
    assert "POST /builds" not in missing.stderr
    misspelt = nixery("inspect", "shell/figlett", "--registry", registry.url)
    assert misspelt.returncode == 1 and "MANIFEST_UNKNOWN" in misspelt.stderr
    assert "figlett (did you mean figlet?)" in misspelt.stderr


def test_inspect_and_the_image_page_find_a_built_image_under_another_spelling(registry: RegistryProcess) -> None:
    """"Any order or spelling of its names finds it" (docs/web.md): `nixery inspect Cowsay/SHELL`
    and /images/Cowsay/SHELL said a built shell/cowsay was "not built yet" until a pull had
    evaluated that spelling. Now they evaluate the names (nothing is built) and find the image."""
    digest, _ = registry.manifest("shell/cowsay")
    result = nixery("inspect", "Cowsay/SHELL", "--registry", registry.url)
    assert result.returncode == 0, result.stderr
    assert f"Digest   {digest}" in result.stdout and "Image    shell/cowsay:latest" in result.stdout
    status, _, body = registry.request("/images/SHELL/Cowsay.json", accept=None)
    assert (status, json.loads(body)["digest"]) == (200, digest)
    assert len(registry.log_events("build.queued")) == 1  # shell/cowsay's own


def test_build_locally_without_a_server(tmp_path: Path) -> None:
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json",
           "PORT": ""}
    result = nixery("build", "--local", "shell/greet", env=env)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout and re.search(r"Digest\s+sha256:[0-9a-f]{64}", result.stdout)
    assert (tmp_path / "storage").is_dir()
    # The pull command names the registry these settings run (it printed `docker pull /shell/greet`).
    assert re.search(r"^Pull\s+docker pull localhost:8080/shell/greet$", result.stdout, re.M), result.stdout
    result = nixery("build", "--local", "--plain", "shell/greet", env={**env, "PORT": "5000"})
    assert re.search(r"^Pull\s+docker pull localhost:5000/shell/greet$", result.stdout, re.M), result.stdout
    result = nixery("build", "--local", "--plain", "shell/greet", env={**env, "NIXERY_PUBLIC_HOST": "reg.example"})
    assert re.search(r"^Pull\s+docker pull reg.example/shell/greet$", result.stdout, re.M), result.stdout


def test_build_locally_with_port_0_says_the_registry_picks_its_port(tmp_path: Path) -> None:
    """PORT=0 (a free port, picked as the registry starts) printed `docker pull localhost/shell/greet`:
    no port, no registry there."""
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox", "PORT": "0"}
    result = nixery("build", "--local", "--plain", "shell/greet", env=env)
    assert result.returncode == 0, result.stderr
    pull = result.stdout[result.stdout.index("\nPull"):].splitlines()[1:3]
    assert pull[0] == "Pull     docker pull localhost:PORT/shell/greet", result.stdout
    assert pull[1].split() == ("PORT=0: a registry on these settings picks a free port as it starts and logs it "
                               "(registry.listening url=...): use that one, or set NIXERY_PUBLIC_HOST=HOST:PORT "
                               "to have it here").split(), result.stdout
    result = nixery("build", "--local", "--plain", "shell/greet", env={**env, "NIXERY_PUBLIC_HOST": "reg.example:5000"})
    assert re.search(r"^Pull\s+docker pull reg.example:5000/shell/greet$", result.stdout, re.M), result.stdout
    assert "PORT=0" not in result.stdout



def test_a_failed_local_build_says_why_in_one_line_and_leaves_no_staging_directory(tmp_path: Path) -> None:
    """A failed `nixery build --local` printed the builder's JSON `build.failed` log line before
    its own line saying the same, and left its staging directory (STORAGE_PATH/tmp/<host>-<pid>)
    until the next run: now one line, and STORAGE_PATH/tmp is empty."""
    storage = tmp_path / "storage"
    env = {"STORAGE_PATH": str(storage), "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json"}
    result = nixery("build", "--local", "--plain", "shell/no-such-package", env=env)
    assert result.returncode == 1, result
    assert result.stderr.startswith("nixery: build failed: ") and "no-such-package" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert list((storage / "tmp").iterdir()) == []


def test_an_interrupted_local_build_leaves_no_staging_directory(tmp_path: Path) -> None:
    """Ctrl-C during `nixery build --local` left STORAGE_PATH/tmp/<host>-<pid> behind (removed only
    when a later process started): now the build stops and the directory goes with it."""
    storage = tmp_path / "storage"
    env = {"STORAGE_PATH": str(storage), "NIXERY_PKGS_PATH": str(slow_package_set(tmp_path / "pkgs", seconds=30))}
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "build", "--local", "--plain", "shell/slowpoke"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY, env={**os.environ, **env},
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until Nix builds slowpoke, which takes 30 s
            if " building " in line:
                break
        assert [path.name for path in (storage / "tmp").iterdir()] == [f"{os.uname().nodename}-{process.pid}"]
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130
    finally:
        process.kill()
        process.wait()
    assert list((storage / "tmp").iterdir()) == []


def _nix_processes_marked(marker: str) -> list[str]:
    """The command lines of the Nix processes whose environment holds `marker` (NAME=value)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environment = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environment and os.path.basename(command[0]).startswith(b"nix"):
            found.append(b" ".join(command).decode(errors="replace"))
    return found


def test_ctrl_c_while_a_local_build_evaluates_ends_it_at_once_leaving_no_nix_process(
    tmp_path: Path, temporary: Path
) -> None:
    """Ctrl-C while `nixery build --local` evaluated the names hung the command for good about one
    time in five: closing the builder stopped the repl under the running build, which went on to
    start a `nix-instantiate` instead, and asyncio's shutdown then cancelled that process's start
    together with the task connecting its pipes (CPython 3.11 then waits for the process forever).
    Now every run ends at once with status 130, says so in one line (it said nothing at all,
    unlike `gc` and `check`), and leaves no Nix process and no temporary directory (the repl's,
    the storage's staging one, which compressions that went on after the storage closed made
    again). The signal comes at several moments of the evaluation, each twice, and twice in what
    follows it."""
    require_debian_set()
    outcomes = []
    for run, delay in enumerate([0.0, 0.01, 0.02, 0.03, 0.05] * 2 + [0.08, 0.15]):
        storage, run_temporary = tmp_path / f"storage-{run}", temporary / f"tmp-{run}"
        run_temporary.mkdir()
        marker = f"NIXERY_TEST_RUN={tmp_path}-{run}"  # inherited by every process the run starts
        name, value = marker.split("=", 1)
        env = {**os.environ, "STORAGE_PATH": str(storage), "NIXERY_BUNDLED_SET": "debian",
               "TMPDIR": str(run_temporary), name: value}
        process = subprocess.Popen(
            [sys.executable, "-m", "nixery", "build", "--local", "--plain", "shell/curl"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY, env=env,
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            for line in process.stdout:
                if " evaluating " in line:
                    break
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            try:
                status: int | str = process.wait(10)
            except subprocess.TimeoutExpired:
                status = "still running 10 s after Ctrl-C"
            nix_left = _nix_processes_marked(marker)
        finally:
            process.kill()
            process.wait()
        staging = storage / "tmp"
        left = [*(staging.iterdir() if staging.exists() else []), *run_temporary.iterdir()]
        files_left = [path.name for path in left]
        outcomes.append((delay, status, nix_left, files_left, process.stderr.read()[-300:]))
    # One line on stderr: no traceback, no warning that the repl ended under the build.
    failed = [outcome for outcome in outcomes if outcome[1:] != (130, [], [], "nixery build: interrupted\n")]
    assert not failed, f"{len(failed)} of {len(outcomes)} runs (delay, status, Nix, files, stderr): {failed}"


def test_ctrl_c_while_a_local_build_runs_a_builder_leaves_no_build_directory(tmp_path: Path, temporary: Path) -> None:
    """Ctrl-C while Nix ran a builder (a package not built yet, as on a new machine) left Nix's build
    directory (`nix-build-<name>.drv-0`) in TMPDIR: Nix was killed with SIGKILL, which it cannot
    clean up after. Now a Nix that builds is stopped with SIGTERM first, removes what it made, and
    only then is its whole process tree killed."""
    pkgs = slow_package_set(tmp_path / "pkgs", seconds=60)
    marker = f"NIXERY_TEST_RUN={tmp_path}"
    name, value = marker.split("=", 1)
    env = {**os.environ, "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_PKGS_PATH": str(pkgs),
           "TMPDIR": str(temporary), name: value}
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "build", "--local", "--plain", "slowpoke"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(temporary.glob("nixery-run-*/nix-build-slowpoke*")):  # the builder runs
            assert process.poll() is None and time.monotonic() < deadline, "the builder never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        status = process.wait(10)
        nix_left = _nix_processes_marked(marker)
    finally:
        process.kill()
        process.wait()
    assert process.stderr is not None
    assert (status, process.stderr.read()) == (130, "nixery build: interrupted\n")
    assert nix_left == []
    assert [path.name for path in temporary.iterdir()] == [], "Nix's build directory is left in TMPDIR"


@pytest.mark.parametrize("command", [["build", "--plain", "shell"], ["inspect", "shell"]])
def test_ctrl_c_while_a_registry_does_not_answer_says_so_in_one_line(command: list[str]) -> None:
    """Ctrl-C while the registry had not answered yet: `nixery build` ended with status 130 and
    not a word, `nixery inspect` with `nixery: interrupted`, where `gc` and `check` say
    `nixery gc: interrupted`. Now each says it as they do, naming itself."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        silent.settimeout(60)
        process = subprocess.Popen(
            [sys.executable, "-m", "nixery", *command, "--registry", f"http://127.0.0.1:{silent.getsockname()[1]}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY,
        )
        try:
            connection, _ = silent.accept()  # the command waits for the answer
            with connection:
                process.send_signal(signal.SIGINT)
                out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
    assert (process.returncode, out, err) == (130, "", f"nixery {command[0]}: interrupted\n")


def test_ctrl_c_while_following_a_registry_s_build_says_the_build_goes_on(start_registry, tmp_path: Path) -> None:
    """Ctrl-C while `nixery build` followed a registry's build ended it with status 130 and not
    a word, though the build goes on at the registry: now one line says so, with where to follow
    it, and the build goes on."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=30)))
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "build", "--plain", "shell/slowpoke", "--registry", registry.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        for line in process.stdout:  # until Nix builds slowpoke, which takes 30 s
            if " building " in line:
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        err = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    said = re.fullmatch(rf"nixery build: interrupted \(the registry goes on with the build: "
                        rf"{re.escape(registry.url)}(/builds/(\w+)\?image=shell/slowpoke)\)\n", err)
    assert said, err
    [started] = registry.log_events("http.build_started")
    assert started["build"] == said[2]
    with urllib.request.urlopen(f"{registry.url}/builds/{said[2]}.json", timeout=30) as response:
        assert json.load(response)["stage"] == "building"


@pytest.mark.parametrize("ending", ["stopped", "killed"])
def test_a_build_the_registry_stopped_or_lost_as_it_restarted_is_started_again(
    start_registry, tmp_path: Path, ending: str
) -> None:
    """A registry that stopped while `nixery build` followed its build (a restart, a rollout) made
    the command end in a `ClientConnectorError` traceback; later, once it reconnected, in one line
    saying the registry forgot the build. Now the registry's last event says it stopped the build
    as it shut down; one killed (`kill -9`, the OOM killer) says nothing, and the registry back no
    longer knows the build. Either way the command waits for the registry to be back and starts
    the build again, which ends in the image."""
    storage = tmp_path / "storage"
    env = {"NIXERY_PKGS_PATH": str(slow_package_set(tmp_path / "pkgs", seconds=15))}
    registry = start_registry(storage, **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "build", "--plain", "shell/slowpoke", "--registry", registry.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until Nix builds slowpoke, which takes 15 s
            if " building " in line:
                break
        stopping = time.monotonic()
        if ending == "stopped":
            registry.stop()
            # No request waited for the build: it was stopped at once, not at the end of the grace (30 s).
            assert time.monotonic() - stopping < 15
        else:
            registry.process.kill()
            registry.process.wait()
        time.sleep(2)  # down while the command tries to start the build again
        assert process.poll() is None, process.communicate()
        again = RegistryProcess(storage=storage, env=env, port=registry.port, log_path=tmp_path / "again.log").start()
        try:
            out, err = process.communicate(timeout=120)
        finally:
            again.stop()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0 and "Traceback" not in err, err
    said = {"stopped": "the registry stopped the build as it shut down",
            "killed": "the registry restarted and no longer knows the build"}[ending]
    assert err == f"nixery build: {said}; starting it again once it is back\n"
    if ending == "stopped":
        assert "stopped: the registry is shutting down" in out, out  # the first build's last event
        assert len(registry.log_events("build.stopped")) == 1
    assert re.search(r"Digest\s+sha256:[0-9a-f]{64}", out), out
    assert len(again.log_events("build.done")) == 1


def test_build_locally_builds_what_the_registry_serves_on_several_platforms(tmp_path: Path) -> None:
    """With NIXERY_PLATFORMS of two, `--local` builds the image index the registry serves for
    the name (each platform's image): the registry then builds nothing more on its first pull."""
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json",
           "NIXERY_PLATFORMS": "linux/amd64,linux/arm64"}
    result = nixery("build", "--local", "--plain", "shell/greet", env=env)
    assert result.returncode == 0, result.stderr
    built = re.search(r"Digest\s+(sha256:[0-9a-f]{64})", result.stdout)
    assert built is not None and "linux/arm64" in result.stdout, result.stdout
    # The size and the layer table are the default platform's, and say so (they said nothing).
    assert re.search(r"Size\s+\S+ \S+ compressed, \d+ layers \(linux/amd64\)", result.stdout), result.stdout
    registry = RegistryProcess(storage=tmp_path / "storage", env=env, log_path=tmp_path / "registry.log").start()
    try:
        status, headers, _ = registry.request("/v2/shell/greet/manifests/latest", accept=OCI_INDEX)
    finally:
        registry.stop()
    assert status == 200 and headers["Docker-Content-Digest"] == built[1]
    assert registry.log_events("build.queued") == []

# ---- the operator's commands ---------------------------------------------------------


def test_without_storage_path_the_registry_uses_the_checkouts_var_storage() -> None:
    """From a source checkout (as `make run` sets it up), `nixery serve`, `check` and `gc`
    all find the storage `make run` uses (they looked at /var/lib/nixery, `make run` at var/storage)."""
    from nixery import config

    assert config.load({}).storage_path == REPOSITORY / "var" / "storage"
    assert config.load({"STORAGE_PATH": "/srv/x"}).storage_path == Path("/srv/x")


@pytest.mark.parametrize("command", [["check"], ["gc", "--older-than", "3h"], ["gc", "--dry-run"]])
def test_maintenance_on_a_storage_that_holds_nothing_says_so_and_creates_nothing(tmp_path: Path, command) -> None:
    missing, empty_directory = tmp_path / "missing", tmp_path / "empty"
    empty_directory.mkdir()
    for storage in (missing, empty_directory):
        result = nixery(*command, env={"STORAGE_PATH": str(storage)})
        assert result.returncode == 1, result
        assert result.stderr == f"nixery {command[0]}: there is no storage at STORAGE_PATH={storage}: " \
                                f"nothing to {command[0]}\n"
        assert result.stdout == ""
    assert not missing.exists() and list(empty_directory.iterdir()) == []

    from nixery.storage import FilesystemStorage

    asyncio.run(FilesystemStorage(tmp_path / "unused").close())  # a storage no registry stored anything in
    result = nixery(*command, env={"STORAGE_PATH": str(tmp_path / "unused")})
    assert (result.returncode, result.stdout) == (1, "")
    assert "holds no images and no blobs" in result.stderr


def test_serve_check_and_gc_help_says_what_they_do_and_what_they_read() -> None:
    config_source = (REPOSITORY / "nixery" / "config.py").read_text()
    variables = set(re.findall(r'"([A-Z][A-Z0-9]*_[A-Z0-9_]+|PORT|BUCKET|KUBECONFIG)"', config_source))
    variables -= {"KUBERNETES_SERVICE_HOST"}  # how a pod is recognised, not a setting
    variables -= {*config.CLIENT_VARIABLES, *config.NIXERY_GO_ONLY}  # named only to warn that they are none
    assert len(variables) > 40
    serve = nixery("serve", "--help")
    assert serve.returncode == 0
    assert "Run the registry" in serve.stdout
    assert not [name for name in variables if not re.search(rf"\b{name}\b", serve.stdout)]
    storage_variables = {"NIXERY_STORAGE_BACKEND", "STORAGE_PATH", "S3_BUCKET", "S3_ENDPOINT", "GCS_BUCKET",
                         "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS"}
    for command, does in (("check", "Verify the storage"), ("gc", "Remove the images")):
        text = nixery(command, "--help").stdout
        assert does in text
        assert not [name for name in storage_variables if not re.search(rf"\b{name}\b", text)], command
        assert f"STORAGE_PATH (default {REPOSITORY / 'var' / 'storage'})" in " ".join(text.split())


@pytest.mark.parametrize("where", ["registry", "local"])
def test_build_into_a_pipe_that_closes_ends_quietly(start_registry, tmp_path: Path, where: str) -> None:
    """`nixery build ... | head` ended in a BrokenPipeError traceback once head had gone: it
    now stops quietly with the status of a program ended by SIGPIPE, as other tools do."""
    if where == "registry":
        registry = start_registry(NIXERY_BUNDLED_SET="busybox")
        command = f"build --plain --registry {registry.url} shell/figlet/cowsay"
        env = dict(os.environ)
    else:
        command = "build --plain --local shell/figlet/cowsay"
        env = {**os.environ, "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox"}
    result = subprocess.run(
        ["bash", "-c", f'"$0" -m nixery {command} | head -n 1; echo "status ${{PIPESTATUS[0]}}" >&2', sys.executable],
        capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=env,
    )
    assert len(result.stdout.splitlines()) == 1 and "queued" in result.stdout, result.stdout
    assert result.stderr.splitlines()[-1] == "status 141", result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["check"], ["gc", "--older-than", "3h"]])
def test_maintenance_on_storage_it_cannot_use_says_why_in_one_line(command) -> None:
    """`check` and `gc` on a bucket nothing answers at, or without the credentials it needs, ended
    in a traceback (status 1): now one line, and status 2, as `nixery serve` (docs/usage.md)."""
    unreachable = {"NIXERY_STORAGE_BACKEND": "s3", "S3_BUCKET": "images", "S3_ENDPOINT": "http://127.0.0.1:9",
                   "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    no_credentials = {"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "images",
                      "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}
    for env, status, says in ((unreachable, 2, "nixery: storage: "),
                              (no_credentials, 2, "nixery: configuration error: ")):
        result = nixery(*command, env=env, timeout=60)
        assert "Traceback" not in result.stderr, result.stderr
        assert (result.returncode, result.stdout) == (status, ""), result
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(says), result.stderr
        if env is no_credentials:  # the setting that names the missing file, not the file alone
            assert "GOOGLE_APPLICATION_CREDENTIALS='/nonexistent/key.json'" in result.stderr, result.stderr


def test_gc_refuses_an_age_that_is_no_number() -> None:
    """`--older-than nan` was taken, and then no image was ever old enough: gc kept everything."""
    for age in ("nan", "inf"):
        result = nixery("gc", "--older-than", age, "--dry-run")
        assert result.returncode == 2 and f"not an age like 30d, 12h or 3600: '{age}'" in result.stderr, result


def test_gc_says_how_it_read_an_age_without_a_unit() -> None:
    """`--older-than 30`, meant as 30 days, is 30 seconds, and gc answered only that images
    younger than 3 hours are never collected. Now it says how it read the number."""
    result = nixery("gc", "--older-than", "30", "--dry-run")
    assert result.returncode == 2, result
    assert "30 is 30 seconds (write 30d for days, 12h for hours): images younger than 3 hours" in result.stderr
    assert "seconds" not in nixery("gc", "--older-than", "1h", "--dry-run").stderr


@pytest.mark.parametrize("words", [
    ["--older-than", "-1d"], ["--older-than=-1d"], ["--older", "-1d"], ["--older-than", "-5"],
    ["--quarantine-older-than", "-2h"], ["--quarantine-older-than=-2h"],
])
def test_gc_refuses_a_negative_age_saying_what_an_age_is(words: list[str]) -> None:
    """`--older-than -1d` was taken for an option, and argparse said only "expected one argument"."""
    result = nixery("gc", *words, "--dry-run")
    age = words[-1].rpartition("=")[2]
    assert result.returncode == 2, result
    assert (f"an age cannot be negative: '{age}'; an age is a number of seconds, or a number followed by "
            "s, m, h or d") in result.stderr, result.stderr


def test_gc_says_what_an_age_is_for_one_that_is_none() -> None:
    for age in ("-x", "3w"):
        result = nixery("gc", "--older-than", age, "--dry-run")
        assert result.returncode == 2, result
        assert (f"not an age like 30d, 12h or 3600: '{age}'; an age is a number of seconds, or a number followed by "
                "s, m, h or d") in result.stderr, result.stderr


def test_gc_stopped_with_ctrl_c_says_so_and_the_next_run_finishes(tmp_path: Path) -> None:
    """Ctrl-C while gc waited for registries to drop what it removed printed three chained
    tracebacks; now one line, status 130, and a second run finishes: the kept image is whole."""
    from tests.test_gc_live import age_everything

    storage = tmp_path / "storage"
    env = {"STORAGE_PATH": str(storage), "NIXERY_BUNDLED_SET": "busybox"}
    for image in ("shell/figlet", "shell/cowsay"):
        assert nixery("build", "--plain", "--local", image, env=env).returncode == 0
    age_everything(storage)
    (storage / "meta" / "usage").mkdir(parents=True, exist_ok=True)
    kept = next(path for path in (storage / "meta" / "images").iterdir() if b"shell/cowsay" in path.read_bytes())
    (storage / "meta" / "usage" / kept.name).write_text(json.dumps({"last_used": time.time()}))
    marker = storage / "meta" / "gc" / "last"
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "gc", "--older-than", "3h"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=REPOSITORY, env={**os.environ, **env},
    )
    # gc has removed the unused image's record and says so to registries: it is waiting for them.
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out, err) == (130, "", "nixery gc: interrupted (run it again to finish)\n")
    assert len(list((storage / "meta" / "images").iterdir())) == 1
    finished = nixery("gc", "--older-than", "3h", env=env)
    assert finished.returncode == 0 and "blobs" in finished.stdout, finished
    checked = nixery("check", env=env)
    assert checked.returncode == 0 and "and 1 image: ok" in checked.stdout, checked


def test_a_registry_url_that_cannot_be_one_is_a_usage_error() -> None:
    """`--registry http://[::1` (or ftp://..., or a bad NIXERY_REGISTRY) ended in aiohttp's traceback.
    The message names the URL as given, but without its password."""
    for command, env in ((["build", "shell", "--registry", "http://[::1"], {}),
                         (["inspect", "shell", "--registry", "ftp://registry"], {}),
                         (["inspect", "shell"], {"NIXERY_REGISTRY": "http://registry:port"}),
                         (["inspect", "shell"], {"NIXERY_REGISTRY": "http://ci:s3cret@registry:port"})):
        result = nixery(*command, env=env, timeout=60)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr.endswith("is not a registry URL like http://127.0.0.1:8080\n"), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr, "the password of a URL that does not parse was printed"


def test_a_registry_url_without_a_host_is_a_usage_error() -> None:
    """`--registry http://` became the host "http" and reported "cannot reach the registry at
    http://http:" (status 1): now a usage error that says the URL has no host."""
    for command, env, given in ((["build", "shell", "--registry", "http://"], {}, "--registry='http://'"),
                                (["inspect", "shell", "--registry", "https:///"], {}, "--registry='https:///'"),
                                (["inspect", "shell"], {"NIXERY_REGISTRY": "http://:8080"}, "NIXERY_REGISTRY=")):
        result = nixery(*command, env=env, timeout=60)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr.startswith(f"nixery: {given}") and "has no host" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_registry_url_with_more_than_the_registrys_address_is_a_usage_error() -> None:
    """`--registry http://HOST:PORT/v2/` sent `POST /v2/builds` and said "NAME_UNKNOWN: no such endpoint
    or repository"; `HOST:PORT?x=1` said "method POST is not allowed here", `#frag` that the answer was no
    image's document; a host that is not UTF-8 (`http://\\xff`), or a host name with a part over 63
    characters (or an empty one), ended in a traceback (aiohttp's, the resolver's). Now each is a
    usage error naming what is wrong, before any request, and never showing a password."""
    for command, env, says in (
        (["build", "--plain", "shell", "--registry", "http://127.0.0.1:9/v2/"], {}, "has a path (/v2)"),
        (["inspect", "shell", "--registry", "127.0.0.1:9?x=1"], {}, "has a query (?x=1)"),
        (["inspect", "shell", "--registry", "http://127.0.0.1:9#top"], {}, "has a fragment (#top)"),
        # Empty ones: urlsplit drops them, and requests went to `/?/builds` and `/#/builds`.
        (["build", "shell", "--registry", "http://127.0.0.1:9?"], {}, "has a query (?)"),
        (["inspect", "shell", "--registry", "127.0.0.1:9#"], {}, "has a fragment (#)"),
        (["inspect", "shell"], {"NIXERY_REGISTRY": "http://ci:s3cret@127.0.0.1:9/nixery"}, "has a path (/nixery)"),
        (["inspect", "shell", "--registry", "http://\udcff"], {}, "is not a registry URL"),
        (["build", "shell", "--registry", "http://reg\udcffistry:8080"], {}, "is not a registry URL"),
        # A host name the resolver cannot take (a label over 63 characters, an empty one): UnicodeError's traceback.
        (["inspect", "shell", "--registry", f"http://registry.{'a' * 64}.example:8080"], {}, "has no valid host name"),
        (["build", "shell", "--registry", "http://registry..example"], {}, "has no valid host name"),
    ):
        result = nixery(*command, env=env, timeout=60)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert says in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_port_that_does_not_answer_as_a_registry_is_said_in_one_line() -> None:
    """`--registry HOST:22` (a port of another service, answering `SSH-2.0-...`) ended in aiohttp's
    traceback (`Bad status line`), as did an answer cut short (`ClientPayloadError`): now one line that
    says the answer was no registry's and asks whether that is its port, with exit status 1."""
    import threading

    answers = {
        "is not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
        "broke off": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"name\": ",
    }
    for says, answer in answers.items():
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def serve(listener: socket.socket = listener, answer: bytes = answer) -> None:
            with listener:
                while True:
                    try:
                        connection, _ = listener.accept()
                    except OSError:  # closed: the test is over
                        return
                    with connection:
                        connection.recv(65536)
                        connection.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        try:
            for command in (["build", "--plain", "shell"], ["inspect", "shell"], ["inspect", "--sbom", "shell"]):
                result = nixery(*command, "--registry", f"127.0.0.1:{port}", timeout=60)
                assert (result.returncode, result.stdout) == (1, ""), result
                assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
                assert result.stderr.startswith(f"nixery: http://127.0.0.1:{port} did not answer as a registry does: "
                                                f"its answer {says}"), result.stderr
                assert result.stderr.rstrip().endswith("is it a nixery registry, and is that its port?"), result.stderr
        finally:
            listener.close()


def test_https_to_a_plain_http_port_says_to_give_http() -> None:
    """`--registry https://HOST:PORT` for a registry on plain HTTP (as `nixery serve` and `make run`
    serve) said only "[SSL: WRONG_VERSION_NUMBER] wrong version number": now the line also says that
    the port does not answer in TLS and gives the http:// URL to use instead."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:  # a plain HTTP server's answer to the TLS handshake
        with listener:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        for command in (["build", "--plain", "shell"], ["inspect", "shell"]):
            result = nixery(*command, "--registry", f"https://127.0.0.1:{port}", timeout=60)
            assert (result.returncode, result.stdout) == (1, ""), result
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert result.stderr.startswith(f"nixery: cannot reach the registry at https://127.0.0.1:{port}: "), result
            assert result.stderr.endswith("that port does not answer in TLS: if it serves plain HTTP, as `nixery "
                                          f"serve` does, give http://127.0.0.1:{port})\n"), result.stderr
    finally:
        listener.close()


def test_inspect_refuses_sbom_with_json() -> None:
    """`nixery inspect --sbom --json` printed the SBOM and ignored --json: the two ask for different
    documents, so the combination is a usage error, as --help shows."""
    result = nixery("inspect", "shell", "--sbom", "--json", "--registry", "http://127.0.0.1:9", timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert "argument --json: not allowed with argument --sbom" in result.stderr, result.stderr
    assert "[--json | --sbom]" in " ".join(nixery("inspect", "--help").stdout.split())


def test_build_locally_on_storage_it_cannot_use_says_why_in_one_line(tmp_path: Path) -> None:
    """`nixery build --local` with STORAGE_PATH on a file, or a bucket without credentials, ended
    in a traceback: now the registry's one line, and status 2, as `check` and `gc` say a storage
    they cannot use."""
    (tmp_path / "a-file").write_text("")
    for env, says in (({"STORAGE_PATH": str(tmp_path / "a-file")}, f"cannot use STORAGE_PATH='{tmp_path / 'a-file'}'"),
                      ({"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "images",
                        "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"}, "GCS")):
        result = nixery("build", "--plain", "--local", "shell", env={"NIXERY_BUNDLED_SET": "busybox", **env})
        assert (result.returncode, result.stdout) == (2, ""), result
        assert len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr


def test_inspect_into_a_pipe_that_closes_ends_as_build_does(registry: RegistryProcess) -> None:
    """`nixery inspect ... | head -n 1` ended with status 1 (rich's own exit), as if it had failed:
    now with the status of a program that SIGPIPE ended, as `nixery build` and other tools do."""
    registry.manifest("shell/cowsay")

    def inspect_into(reader: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f'"$0" -m nixery inspect --registry {registry.url} shell/cowsay | {reader}; '
                           'echo "status ${PIPESTATUS[0]}" >&2', sys.executable],
            capture_output=True, text=True, timeout=300, cwd=REPOSITORY,
        )

    first_line = inspect_into("head -n 1")
    assert first_line.stdout == "Image    shell/cowsay:latest\n", first_line.stdout
    # `head` may read everything before inspect's last write (the output fits in the pipe), so the
    # status is checked with a reader that closes the pipe before inspect writes anything.
    closed = inspect_into("true")
    assert closed.stderr == "status 141\n", closed.stderr


def test_build_and_inspect_take_the_reference_a_client_pulls(registry: RegistryProcess) -> None:
    """`nixery build HOST/shell/hello:v1`, the reference as pulled (and as inspect's own `Pull`
    line prints it), answered "invalid tag '18350/shell/hello:v1'", where the web form drops the
    registry's host: now the registry's own host (and `docker://`) is dropped, and a reference to
    another registry, or by digest, says what is wrong in one line (a usage error, status 2)."""
    host = registry.url.removeprefix("http://")
    built = nixery("build", "--plain", f"{host}/shell/hello:v1", "--registry", registry.url)
    assert built.returncode == 0, built.stderr
    assert f"docker pull {host}/shell/hello:v1" in built.stdout, built.stdout
    for reference in (f"{host}/shell/hello:v1", f"docker://{host}/shell/hello:v1"):
        shown = nixery("inspect", "--no-paths", reference, "--registry", registry.url)
        assert shown.returncode == 0, shown.stderr
        assert "Image    shell/hello:v1" in shown.stdout, shown.stdout
    other = f"localhost:{registry.port}/shell/hello:v1"
    for command in (["build", "--plain", other], ["inspect", other], ["inspect", "shell/hello@sha256:" + "0" * 64]):
        refused = nixery(*command, "--registry", registry.url)
        assert (refused.returncode, refused.stdout) == (2, ""), refused
        assert len(refused.stderr.splitlines()) == 1 and "invalid tag" not in refused.stderr, refused.stderr
    refused = nixery("inspect", other, "--registry", registry.url)
    assert f"names the registry localhost:{registry.port}, not this one ({host})" in refused.stderr, refused.stderr
    assert (f"give the image name alone (shell/hello:v1), or ask that registry: --registry "
            f"http://localhost:{registry.port}") in refused.stderr, refused.stderr
    # The web form and POST /builds drop the Host header's host; another one is said as such too.
    post = urllib.request.Request(f"{registry.url}/builds", data=json.dumps({"image": other}).encode(), headers={
        "Content-Type": "application/json", "Accept": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refusal:
        urllib.request.urlopen(post, timeout=60)
    body = refusal.value.read()
    error = json.loads(body)["errors"][0]
    assert (refusal.value.code, error["code"]) == (400, "NAME_INVALID"), body
    assert f"names the registry localhost:{registry.port}, not this one ({host})" in error["message"], body


def test_build_and_inspect_against_a_server_that_is_no_nixery_registry_say_so_in_one_line(tmp_path: Path) -> None:
    """`--registry` pointed at another server: a web server's 200 page for `/images/NAME.json`
    ended `nixery inspect` in a Python traceback (JSONDecodeError, KeyError 'name'), and its
    error pages were printed as HTML, many lines; the reference registry's 404 said "HTTP 404:
    404 page not found". Now each is one line naming the URL and asking whether it is a
    nixery registry."""
    site = tmp_path / "site"
    (site / "images" / "shell").mkdir(parents=True)
    (site / "images" / "shell" / "page.json").write_text("<html><title>Welcome</title>hello</html>\n")
    (site / "images" / "shell" / "other.json").write_text('{"name": "shell/other"}\n')
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    distribution = DistributionRegistry(storage=tmp_path / "distribution").start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        web_url = f"http://127.0.0.1:{port}"
        for command, says in (
            (["inspect", "shell/page"], f"{web_url}/images/shell/page.json answered with something that is not an "
                                        "image's document: is it a nixery registry?"),
            (["inspect", "--json", "shell/other"], "/images/shell/other.json answered with something that is not"),
            (["inspect", "--sbom", "shell/page"], "is not an image's document"),
            (["inspect", "shell/missing"], f"HTTP 404 File not found from {web_url}/images/shell/missing.json "
                                           "(Error response): is it a nixery registry?"),
            (["build", "--plain", "shell"], f"HTTP 501 Unsupported method ('POST') from {web_url}/builds"),
        ):
            result = nixery(*command, "--registry", web_url, timeout=60)
            assert (result.returncode, result.stdout) == (1, ""), result
            assert len(result.stderr.splitlines()) == 1 and says in result.stderr, result.stderr
        for command in (["inspect", "shell"], ["build", "--plain", "shell"]):
            result = nixery(*command, "--registry", distribution.url, timeout=60)
            assert (result.returncode, result.stdout) == (1, ""), result
            assert len(result.stderr.splitlines()) == 1, result.stderr
            assert f"HTTP 404 Not Found from {distribution.url}/" in result.stderr, result.stderr
            assert result.stderr.endswith("(404 page not found): is it a nixery registry?\n"), result.stderr
    finally:
        web.terminate()
        web.wait(timeout=10)
        distribution.stop()


def test_build_and_inspect_on_a_registry_with_access_control_never_print_the_password(
    start_registry, tmp_path: Path
) -> None:
    """The commands send the user and password of the registry URL (NIXERY_REGISTRY=http://USER:PW@HOST),
    which the docs did not say: a 401 now says how. With them, `Pull` printed `docker pull
    alice:PASSWORD@HOST/shell` (the password on the terminal, and no reference a client takes), and
    so did "cannot reach the registry at ..." and the command that builds an image not built yet."""
    from nixery import auth

    users = tmp_path / "users"
    users.write_text(f"alice:{auth.hash_password('alice-secret-1', log_n=10)}:pull,build\n")
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_AUTH="basic", NIXERY_AUTH_USERS=str(users))
    host = registry.url.removeprefix("http://")
    with_password = {"NIXERY_REGISTRY": f"http://alice:alice-secret-1@{host}"}
    built = nixery("build", "--plain", "shell", env=with_password)
    assert built.returncode == 0, built.stderr
    assert f"docker pull {host}/shell\n" in built.stdout, built.stdout
    anonymous = nixery("inspect", "shell", env={"NIXERY_REGISTRY": registry.url})
    assert anonymous.returncode == 1, anonymous
    assert "UNAUTHORIZED" in anonymous.stderr and "NIXERY_REGISTRY=http://USER:PASSWORD@HOST" in anonymous.stderr
    not_built = nixery("inspect", "shell/hello", "--registry", with_password["NIXERY_REGISTRY"])
    assert f"nixery build --registry http://alice@{host} shell/hello" in not_built.stderr, not_built.stderr
    down = nixery("inspect", "shell", env={"NIXERY_REGISTRY": f"http://alice:alice-secret-1@127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "cannot reach the registry at http://alice@127.0.0.1:" in down.stderr, down
    for result in (built, not_built, down, nixery("inspect", "shell", env=with_password)):
        assert "alice-secret-1" not in result.stdout + result.stderr, result


def test_inspect_names_what_is_wrong_with_a_name_or_tag() -> None:
    """`nixery inspect 'shell curl'` was told "percent-encoded characters are not allowed" (the
    space it sent, encoded): now what `nixery build` says, before asking any registry."""
    for image, says in (("shell curl", "nixery: invalid package name 'shell curl': use letters"),
                        ("shell:bad tag", "nixery: invalid tag 'bad tag'")):
        result = nixery("inspect", image, "--registry", "http://127.0.0.1:9", timeout=60)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert result.stderr.startswith(says) and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(("variable", "value", "says"), [
    ("NIX_TIMEOUT", "nan", "NIX_TIMEOUT='nan' is not a number of seconds"),
    ("NIXERY_HEADER_TIMEOUT", "1e400", "NIXERY_HEADER_TIMEOUT='1e400' is not a number of seconds"),
    ("NIXERY_HOST", "registry\udcff", "NIXERY_HOST='registry\\udcff' is not UTF-8 text"),
    ("NIXERY_CHANNEL", "nixos\udcff", "NIXERY_CHANNEL='nixos\\udcff' is not UTF-8 text"),
    # Taken, and then every connection logged a TypeError traceback and none had a send timeout:
    # the kernel's TCP_USER_TIMEOUT takes at most 2**31 - 1 milliseconds.
    ("NIXERY_SEND_TIMEOUT", "1e300", "NIXERY_SEND_TIMEOUT='1e300' is over 2147483 seconds: the longest wait the "
     "kernel's TCP_USER_TIMEOUT takes (24 days)"),
    # Named only the path, not the variable that gave it.
    ("NIXERY_DEBIAN_SET_DIR", "/nonexistent/set", "NIXERY_BUNDLED_SET=debian but NIXERY_DEBIAN_SET_DIR="
     "'/nonexistent/set' has no default.nix (run `make debian-set`, which writes the set where "
     "NIXERY_DEBIAN_SET_DIR says)"),
])
def test_serve_refuses_a_setting_that_is_no_number_or_no_text(tmp_path: Path, variable: str, value: str,
                                                              says: str) -> None:
    """NIX_TIMEOUT=nan was taken, and then every build failed at once ("did not finish within
    NIX_TIMEOUT (nan s)"); a timeout of inf, the same. A NIXERY_HOST that is not UTF-8 ended in a
    UnicodeError traceback (status 1), a NIXERY_CHANNEL only at the first build: now `nixery serve`
    stops at start with one line naming the variable, status 2."""
    bundled = "debian" if variable == "NIXERY_DEBIAN_SET_DIR" else "busybox"
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "PORT": "0", "NIXERY_BUNDLED_SET": bundled, variable: value}
    result = nixery("serve", env=env, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == f"nixery: configuration error: {says}\n", result.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_printed_lines_go_out_as_printed_under_pythonunbuffered(unbuffered: str) -> None:
    """Services run with PYTHONUNBUFFERED=1 so that each line reaches the journal or pipe at once;
    the command line's guarded standard output (nixery.output) kept that, and without it buffers."""
    program = "from nixery import output; import time; output.guard(); print('first'); time.sleep(30)"
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, cwd=REPOSITORY, env=env)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10 if unbuffered else 1)
        assert bool(ready) == bool(unbuffered)
        if ready:
            assert process.stdout.readline() == b"first\n"
    finally:
        process.kill()
        process.wait()


def test_output_that_cannot_be_written_is_one_line() -> None:
    """`nixery auth hash-password > /dev/full` (or `layers plan`, or any --help) ended in an OSError
    traceback, and with stdout closed (`>&-`) in an AttributeError one: now one line saying so,
    status 1 (docs/usage.md)."""
    graph = json.dumps({"nodes": {"app": {"size": 10, "refs": []}}})
    for command, says in (
        ("echo secret | nixery auth hash-password --cost 10 >/dev/full", "No space left on device"),
        ("echo secret | nixery auth hash-password --cost 10 >&-", "standard output is closed"),
        (f"nixery layers plan --graph <(echo '{graph}') --images <(echo '[[\"app\"]]') >/dev/full",
         "No space left on device"),
        ("nixery gc --help >/dev/full", "No space left on device"),
    ):
        result = subprocess.run(
            ["bash", "-c", f'nixery() {{ "$0" -m nixery "$@"; }}; {command}', sys.executable],
            capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
        )
        assert (result.returncode, result.stderr) == (1, f"nixery: cannot write the output: {says}\n"), \
            (command, result)


def test_hash_password_refuses_a_closed_stdin_and_a_password_that_is_not_text() -> None:
    """`nixery auth hash-password <&-` ended in an AttributeError traceback, and a password that is
    not UTF-8 in a UnicodeEncodeError one: now one line each, status 2 (docs/auth.md)."""
    for stdin, says in (("<&-", "standard input is closed"), ("< <(printf '\\xff\\n')", "not UTF-8 text")):
        result = subprocess.run(
            ["bash", "-c", f'"$0" -m nixery auth hash-password --cost 10 {stdin}', sys.executable],
            capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
        )
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr.startswith("nixery auth hash-password: ") and says in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_keys_generate_that_fails_leaves_no_part_of_a_pair(tmp_path: Path) -> None:
    """`nixery keys generate` on a full disk left an empty nixery-signing.key behind, so that the next
    try, disk freed, said "nixery-signing.key exists: remove it first"; given a file, it said
    "[Errno 17] File exists". Now one line saying what is wrong, nothing left, and the next try works."""
    keys = tmp_path / "keys"
    # No file may grow past 0 blocks (Python ignores SIGXFSZ: a write fails with EFBIG), as on a full disk.
    full = subprocess.run(["bash", "-c", f'ulimit -f 0; "$0" -m nixery keys generate {keys}', sys.executable],
                          capture_output=True, text=True, timeout=60, cwd=REPOSITORY)
    assert (full.returncode, full.stdout) == (1, ""), full
    assert full.stderr == f"nixery keys generate: cannot write a key pair in {keys}: File too large\n"
    assert list(keys.iterdir()) == []
    again = nixery("keys", "generate", str(keys), timeout=60)
    assert again.returncode == 0, again
    assert sorted(path.name for path in keys.iterdir()) == ["nixery-signing.key", "nixery-signing.pub"]
    (tmp_path / "a-file").write_text("")
    into_a_file = nixery("keys", "generate", str(tmp_path / "a-file"), timeout=60)
    assert (into_a_file.returncode, into_a_file.stderr) == (
        1, f"nixery keys generate: {tmp_path / 'a-file'} is not a directory: give the directory to write the key "
           "pair in\n"), into_a_file
    # An empty argument (`"$KEYS"` with KEYS unset) wrote the private key into the working directory.
    unnamed = subprocess.run([sys.executable, "-m", "nixery", "keys", "generate", ""], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert (unnamed.returncode, unnamed.stdout) == (2, ""), unnamed
    assert unnamed.stderr.endswith("error: argument directory: the directory is empty: give one (`.` for this "
                                   "one)\n"), unnamed.stderr
    assert not (tmp_path / "nixery-signing.key").exists()


def test_ctrl_c_on_a_terminal_stops_serve_without_tracebacks(tmp_path: Path) -> None:
    """Ctrl-C on a terminal signals every process of its process group: each layer-writer process of
    `nixery serve` (and of `build --local`) printed a KeyboardInterrupt traceback as the registry
    stopped. Now they ignore it and the registry, which stops on it, stops them: no traceback."""
    env = {**os.environ, "STORAGE_PATH": str(tmp_path / "storage"), "PORT": "0", "NIXERY_BUNDLED_SET": "busybox",
           "LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=REPOSITORY, env=env, start_new_session=True,  # a process group of its own, as a terminal's job is
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # until the writer processes run
            if "layers.writers_ready" in line:
                break
        time.sleep(1)  # the writers wait for work, as they do most of the time
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest = process.stdout.read()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert "registry.stopped" in rest, rest


def test_layers_plan_refuses_an_infinite_size_and_deep_nesting_in_one_line(tmp_path: Path) -> None:
    """`nixery layers plan` with a graph whose size is 1e400 (infinity) ended in an OverflowError
    traceback, and with JSON nested 100,000 deep in a RecursionError one (status 1): now one line each,
    status 2, as for any other malformed input."""
    (tmp_path / "images.json").write_text('[["a"]]')
    (tmp_path / "infinite.json").write_text('{"nodes": {"a": {"size": 1e400, "refs": []}}}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for graph, says in (("infinite.json", "bad graph: a size is not a whole number of bytes: 'a' has Infinity"),
                        ("deep.json", "JSON nested too deeply to be a graph, popularity or image list")):
        result = nixery("layers", "plan", "--graph", str(tmp_path / graph), "--images", str(tmp_path / "images.json"),
                        timeout=60)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr == f"nixery layers plan: {tmp_path / graph}: {says}\n", result.stderr


def test_layers_plan_refuses_a_node_of_the_wrong_shape_naming_it(tmp_path: Path) -> None:
    """`"refs": "libc"` (a name, not a list of names) was read as the names l, i, b and c ("references
    outside the graph: ['b', 'c', 'i', 'l']"); a size of 1.5 or true was taken as 1 byte, and a node
    that is a number ended in "bad graph: 'int' object is not subscriptable". Now each is refused in
    one line that names the node and shows what it holds, status 2."""
    (tmp_path / "images.json").write_text('[["app"]]')
    for nodes, says in (
        ({"app": {"size": 1, "refs": "libc"}, "libc": {"size": 1, "refs": []}},
         "bad graph: the refs of 'app' are not a list of node names: \"libc\""),
        ({"app": {"size": 1.5, "refs": []}}, "bad graph: a size is not a whole number of bytes: 'app' has 1.5"),
        ({"app": {"size": True, "refs": []}}, "bad graph: a size is not a whole number of bytes: 'app' has true"),
        ({"app": 5}, "bad graph: 'app' is not an object with a size and refs: 5"),
    ):
        (tmp_path / "graph.json").write_text(json.dumps({"nodes": nodes}))
        result = nixery("layers", "plan", "--graph", str(tmp_path / "graph.json"),
                        "--images", str(tmp_path / "images.json"), timeout=60)
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr == f"nixery layers plan: {tmp_path / 'graph.json'}: {says}\n", result.stderr


@pytest.mark.parametrize("command", [["check"], ["gc", "--dry-run", "--older-than", "3h"]])
def test_maintenance_passes_over_files_the_storage_never_wrote(tmp_path: Path, command: list[str]) -> None:
    """A file among the image records that the storage never wrote (NFS's `.nfs...` for a record gc
    deleted while a registry had it open, an editor's swap file, a README) stopped `check` and `gc`
    whatever else the storage held: "nixery: storage: invalid metadata key 'images/.nfs...'", exit
    status 2. They are no documents: both pass over them and do their work."""
    import hashlib

    storage = tmp_path / "storage"
    blob = b"a layer"
    digest = hashlib.sha256(blob).hexdigest()
    (storage / "blobs" / "sha256" / digest[:2]).mkdir(parents=True)
    (storage / "blobs" / "sha256" / digest[:2] / digest).write_bytes(blob)
    (storage / "meta" / "images").mkdir(parents=True)
    for stray in (".nfs000000000123abcd00000001", ".0123abcd.swp", "README"):
        (storage / "meta" / "images" / stray).write_text("not a record")
    result = nixery(*command, env={"STORAGE_PATH": str(storage)}, timeout=60)
    assert "invalid metadata key" not in result.stderr and result.stderr == "", result
    if command[0] == "check":
        assert (result.returncode, result.stdout) == (0, "checked 1 blob (0.0 MB) and 0 images: ok\n"), result
    else:
        assert result.returncode == 0 and result.stdout.startswith("would remove 0 images and "), result
    assert sorted(path.name for path in (storage / "meta" / "images").iterdir()) == [
        ".0123abcd.swp", ".nfs000000000123abcd00000001", "README"]  # not the storage's to remove


def test_check_passes_over_a_blob_name_that_is_no_file(tmp_path: Path) -> None:
    """A FIFO (or any file that is not a regular one) with a blob's name under STORAGE_PATH/blobs made
    `nixery check` hang for ever, reading it to hash it: it is no blob the storage wrote, and is passed
    over."""
    import hashlib

    storage = tmp_path / "storage"
    (storage / "meta" / "images").mkdir(parents=True)
    for blob in (b"a layer", b"not a layer"):
        digest = hashlib.sha256(blob).hexdigest()
        (storage / "blobs" / "sha256" / digest[:2]).mkdir(parents=True, exist_ok=True)
        if blob == b"a layer":
            (storage / "blobs" / "sha256" / digest[:2] / digest).write_bytes(blob)
        else:
            os.mkfifo(storage / "blobs" / "sha256" / digest[:2] / digest)
    result = nixery("check", env={"STORAGE_PATH": str(storage)}, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "checked 1 blob (0.0 MB) and 0 images: ok\n", ""), \
        result


@pytest.mark.parametrize("command", [["check"], ["gc", "--dry-run", "--older-than", "3h"]])
def test_maintenance_on_storage_this_user_may_not_read_says_so_in_one_line(tmp_path: Path, command) -> None:
    """`check` and `gc` on a STORAGE_PATH the user may not read (another user's) ended in a
    PermissionError traceback, status 1: now one line naming what it could not read, status 2, as for
    any storage they cannot use (docs/usage.md)."""
    private = tmp_path / "private"
    storage = private / "storage"
    (storage / "meta").mkdir(parents=True)
    if os.geteuid() == 0:
        # Another user's directory, read by root without the capabilities that let root read everything.
        # (Not as that other user: it could not read this checkout, which CI keeps in a private directory.)
        os.chown(private, 65534, 65534)
        private.chmod(0o700)
        restricted = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    else:
        private.chmod(0)
        restricted = []
    try:
        result = subprocess.run(
            [*restricted, sys.executable, "-m", "nixery", *command], capture_output=True, text=True, timeout=60,
            cwd=REPOSITORY, env={**os.environ, "STORAGE_PATH": str(storage)},
        )
    finally:
        private.chmod(0o700)  # for pytest to remove it
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == f"nixery: storage: Permission denied: {storage / 'meta'}\n", result.stderr


@pytest.mark.parametrize("host", ["registry host", "300.1.1.1"])
def test_serve_on_a_host_that_does_not_resolve_names_the_setting(host: str) -> None:
    """NIXERY_HOST='registry host' said "nixery: cannot listen on registry host: Name or service not
    known": now the line names NIXERY_HOST and what it takes. It is a configuration error: exit
    status 2, as for every other bad setting (it was 1, which a port in use keeps)."""
    result = nixery("serve", env={"NIXERY_HOST": host, "PORT": "0", "NIXERY_BUNDLED_SET": "busybox"}, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith(f"nixery: configuration error: cannot listen on NIXERY_HOST={host!r}: "), result
    assert "give an address such as 127.0.0.1, 0.0.0.0 or ::" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_serve_on_an_address_of_no_interface_here_is_a_configuration_error(tmp_path: Path) -> None:
    """NIXERY_HOST=192.0.2.1 (an address no interface of this machine has) is the setting's fault:
    exit status 2, and the line names NIXERY_HOST."""
    env = {"NIXERY_HOST": "192.0.2.1", "PORT": "0", "NIXERY_BUNDLED_SET": "busybox",
           "STORAGE_PATH": str(tmp_path / "storage")}
    result = nixery("serve", env=env, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.splitlines() == [
        "nixery: configuration error: cannot listen on 192.0.2.1:0: no such address on this machine (NIXERY_HOST)"
    ], result.stderr


def test_build_refuses_two_different_tags() -> None:
    """`nixery build shell:v1 --tag v2` built shell:v2 and said nothing of the :v1 it was given: now
    a usage error that names both (the same tag twice is fine)."""
    result = nixery("build", "shell:v1", "--tag", "v2", "--registry", "http://127.0.0.1:9", timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.splitlines()[-1] == \
        "nixery build: error: the image names the tag 'v1' and --tag says 'v2': give one", result.stderr
    same = nixery("build", "shell:v1", "--tag", "v1", "--registry", "http://127.0.0.1:9", timeout=60)
    assert same.returncode == 1 and "cannot reach the registry" in same.stderr, same


def test_build_says_what_is_wrong_with_a_name_before_sending_it() -> None:
    """A name of 100,000 characters got the registry's "the request line ... is too long": now the
    registry's own words for the name, before any request (nothing listens at port 9)."""
    for image, said in (("shell/" + "a" * 100_000, "package name longer than"),
                        ("shell/curl:" + "v" * 200, "tag")):
        result = nixery("build", image, "--registry", "http://127.0.0.1:9", timeout=60)
        assert (result.returncode, result.stdout) == (1, ""), result
        assert said in result.stderr and "cannot reach" not in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 400, result.stderr
    # A tag with spaces around it is the tag, as the registry reads one: sent, not refused.
    spaced = nixery("build", "shell", "--tag", " v1", "--registry", "http://127.0.0.1:9", timeout=60)
    assert spaced.returncode == 1 and "cannot reach the registry" in spaced.stderr, spaced


@pytest.mark.parametrize(("args", "said"), [
    (("build", "shell", "--tag", ""), "argument --tag: the tag is empty: give one, or leave --tag out for latest"),
    (("inspect", "shell", "--sbom", "--platform", ""), "argument --platform: '' names no platform: give OS/ARCH, "
                                                          "e.g. linux/arm64"),
    (("inspect", "shell", "--sbom", "--platform", "linux/"), "argument --platform: 'linux/' names no platform: "
                                                                "give OS/ARCH, e.g. linux/arm64"),
])
def test_an_empty_tag_or_platform_is_a_usage_error(args: tuple[str, ...], said: str) -> None:
    """`--tag "$UNSET"` built `latest` without a word, and `--platform ""` asked the registry for
    `linux/` ("has no image for linux/"): both name nothing, and are refused before any request."""
    result = nixery(*args, "--registry", "http://127.0.0.1:9", timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.splitlines()[-1].endswith(f"error: {said}"), result.stderr


def test_build_locally_on_a_bucket_without_credentials_leaves_no_staging_directory(tmp_path: Path) -> None:
    """`nixery build --local` (or `serve`, `check`, `gc`) with a GCS bucket and no credentials said so,
    but left its staging directory STORAGE_PATH/tmp/<host>-<pid> behind (one more per try, in the
    checkout's var/storage when STORAGE_PATH was not set): now nothing."""
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox",
           "NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "images", "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent"}
    result = nixery("build", "--plain", "--local", "shell", env=env, timeout=60)
    assert (result.returncode, result.stdout) == (2, ""), result  # a storage it cannot use: as check and gc say it
    assert "GCS" in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    # A setting that is wrong, likewise.
    bad = nixery("build", "--plain", "--local", "shell", env={**env, "NIXERY_SEND_TIMEOUT": "soon"}, timeout=60)
    assert (bad.returncode, bad.stdout) == (2, ""), bad
    assert bad.stderr.splitlines() == ["nixery: NIXERY_SEND_TIMEOUT='soon' is not a number of seconds"], bad.stderr
    assert not (tmp_path / "storage" / "tmp").exists() or list((tmp_path / "storage" / "tmp").iterdir()) == []
