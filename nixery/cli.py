"""The command line: the only place that parses argv and may exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from nixery import __version__

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Coroutine, Iterator

    from nixery.config import Settings
    from nixery.storage import Storage


_Report = TypeVar("_Report")


def _settings() -> Settings:
    from nixery import config

    try:
        return config.load()
    except config.ConfigError as exc:
        print(f"nixery: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from nixery import logs
    from nixery.scratch import own_temporary_directory

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format, process_ids=settings.workers > 1)
    _warn_of_unknown_settings()
    with own_temporary_directory():
        if settings.workers == 1:
            status = _serve_bound(settings)
        else:
            from nixery.workers import blocked_signals

            # Held back from before the directories are made: a SIGTERM while the workers start
            # stops those started, and the directories go.
            with blocked_signals(), _shared_directories(settings) as shared:
                status = _serve_bound(shared)
    if settings.workers == 1 and status == STARTUP_FAILED:
        _finish(status)  # the storage may have been opened: see _finish
    return status


def _warn_of_unknown_settings() -> None:
    import structlog

    from nixery.config import unknown_settings

    for problem in unknown_settings(os.environ):
        structlog.get_logger(__name__).warning("config.unknown_setting", problem=problem)


@contextlib.contextmanager
def _shared_directories(settings: Settings) -> Iterator[Settings]:
    """The settings with the temporary directories the workers share; they are removed when
    the registry ends, however it ends (start-up failures included), in the parent process
    only (the workers leave by os._exit)."""
    made: list[str] = []
    try:
        # Set before prometheus_client is imported (with nixery.http.server): each worker then
        # counts into its own files there, and /metrics answers with the sum of all, whichever
        # worker a scrape reaches (prometheus_client's multiprocess mode; nixery.metrics).
        made.append(tempfile.mkdtemp(prefix="nixery-metrics-"))
        os.environ[MULTIPROCESS_DIR] = made[-1]
        # Each worker writes its builds there and reads the others': any worker answers for
        # any build (nixery.shared_builds).
        made.append(tempfile.mkdtemp(prefix="nixery-builds-"))
        yield dataclasses.replace(settings, shared_builds_dir=Path(made[-1]))
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


def _serve_bound(settings: Settings) -> int:
    from nixery.http import server

    server.raise_open_files_limit()  # before the workers are forked: they inherit it
    # Bound first: a port in use is one line, before anything starts.
    try:
        sockets = server.listen(settings.host, settings.port, copies=settings.workers)
    except server.ListenError as exc:
        # NIXERY_HOST naming no host or address is a configuration error (2); a port in use is not (1).
        print(f"nixery: {'configuration error: ' if exc.setting else ''}{exc}", file=sys.stderr)
        return STARTUP_FAILED if exc.setting else 1
    if settings.workers == 1:
        problem = _serve_one(settings, sockets[0])
        if problem is not None:
            print(problem, file=sys.stderr)
            return STARTUP_FAILED
        return 0
    return _serve_workers(settings, sockets)


#: Where prometheus_client's multiprocess mode keeps each process's metrics.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


#: Exit status when the registry could not start (settings, storage); a worker's too (nixery.workers).
STARTUP_FAILED = 2


def _serve_one(
    settings: Settings, sockets: list[socket.socket], listening: Callable[[], object] = lambda: None,
) -> str | None:
    """Serve until stopped (`listening` is called once the sockets accept); or the one line saying
    why the registry could not start (a setting that only opening the storage checks, storage it
    cannot use)."""
    from nixery.app import create_app
    from nixery.config import ConfigError
    from nixery.http import server
    from nixery.storage import StorageError

    try:
        # SIGTERM: stop accepting, let in-flight responses finish within the grace period.
        server.run(
            create_app(settings),
            sockets,
            shutdown_timeout=settings.shutdown_grace,
            shutdown_delay=settings.shutdown_delay,
            header_timeout=settings.header_timeout,
            send_timeout=settings.send_timeout,
            max_connections=settings.max_connections,
            listening=listening,
        )
    except ConfigError as exc:
        return f"nixery: configuration error: {exc}"
    except StorageError as exc:
        return f"nixery: storage: {exc}"
    return None


def _serve_workers(settings: Settings, sockets: list[list[socket.socket]]) -> int:
    """Several processes accept on one port, each on its own socket (SO_REUSEPORT); the kernel
    spreads connections. They share storage, whose lock keeps one build per image. One that ends
    while serving is replaced; one that cannot start stops the others (nixery.workers)."""
    from nixery import workers

    return workers.supervise(lambda own, listening: _serve_one(settings, own, listening), sockets)


def _finish(status: int) -> NoReturn:
    """End a one-shot storage command without interpreter teardown: the native
    object-store client's runtime threads can abort the process while Python
    shuts down (seen with obstore), after the work is done and reported."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


#: The ages the commands take, as their messages name them.
AGE_FORMS = "an age is a number of seconds, or a number followed by s, m, h or d"


def _parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        age = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        age = math.nan
    if not math.isfinite(age):  # nan would keep every image, as if no age were ever reached
        raise argparse.ArgumentTypeError(f"not an age like 30d, 12h or 3600: {text!r}; {AGE_FORMS}")
    if age < 0:
        raise argparse.ArgumentTypeError(f"an age cannot be negative: {text!r}; {AGE_FORMS}")
    return age


#: gc's options that take an age.
_AGE_OPTIONS = ("--older-than", "--quarantine-older-than")


def _with_ages_joined(argv: list[str]) -> list[str]:
    """`argv` with each age option and the word after it made one (`--older-than=-1d`): argparse
    takes `-1d` for an option, and said only "expected one argument", not that an age cannot be
    negative. The word after an option that takes a value is its value, as getopt reads it."""
    joined: list[str] = []
    words = iter(argv)
    for word in words:
        # argparse's abbreviations too (`--older`): no prefix of one age option is one of another option.
        named = [option for option in _AGE_OPTIONS if len(word) > 2 and option.startswith(word)]
        value = next(words, None) if named else None
        joined.append(word if value is None else f"{word}={value}")
    return joined


#: Exit status of `check` and `gc` on a storage that holds nothing (also `check`'s status for problems).
NOTHING_STORED = 1


async def _maintained_storage(command: str, settings: Settings) -> Storage | None:
    """The storage a maintenance command works on; None, after saying so, when it holds
    nothing. A filesystem storage that is not there is not created."""
    from nixery import maintenance
    from nixery.app import open_storage
    from nixery.storage import FilesystemStorage

    place = _storage_place(settings)
    if settings.storage_backend == "filesystem" and not FilesystemStorage.exists(settings.storage_path):
        print(f"nixery {command}: there is no storage at {place}: nothing to {command}", file=sys.stderr)
        return None
    storage = open_storage(settings)
    if not await maintenance.holds_anything(storage):
        await storage.close()
        print(f"nixery {command}: {place} holds no images and no blobs: nothing to {command}", file=sys.stderr)
        return None
    return storage


#: Exit status of a command whose output cannot be written (nixery.output).
OUTPUT_FAILED = 1

#: Exit status of a command stopped by Ctrl-C (SIGINT), as shells report it.
INTERRUPTED = 128 + signal.SIGINT


def _run_maintenance(command: str, run: Callable[[], Coroutine[None, None, _Report | None]]) -> _Report | int:
    """The report of a maintenance command; or, after one line saying why, its exit status:
    nothing stored, a storage setting only opening the storage checks, a storage that cannot be
    reached, or Ctrl-C (gc removes records before the blobs they name, so stopping it anywhere
    loses nothing a remaining image needs: the next run finishes the work)."""
    from nixery.config import ConfigError
    from nixery.output import OutputError
    from nixery.storage import StorageError

    try:
        report: _Report | None = asyncio.run(run())
    except ConfigError as exc:  # as `nixery serve` says them, with its status
        print(f"nixery: configuration error: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    except StorageError as exc:
        print(f"nixery: storage: {exc}", file=sys.stderr)
        return STARTUP_FAILED
    except (BrokenPipeError, OutputError):  # our output, not the storage: nixery.cli.main says which
        raise
    except OSError as exc:  # a filesystem storage this user may not read or write: a traceback before
        where = f": {exc.filename}" if exc.filename else ""
        print(f"nixery: storage: {exc.strerror or exc}{where}", file=sys.stderr)
        return STARTUP_FAILED
    except KeyboardInterrupt:
        print(f"nixery {command}: interrupted{' (run it again to finish)' if command == 'gc' else ''}",
              file=sys.stderr)
        return INTERRUPTED
    return NOTHING_STORED if report is None else report


def _storage_place(settings: Settings) -> str:
    """Where the storage is, and, for a default STORAGE_PATH, that it is one."""
    if settings.storage_backend == "s3" and settings.s3 is not None:
        return f"the S3 bucket {settings.s3.bucket}"
    if settings.storage_backend == "gcs" and settings.gcs is not None:
        return f"the GCS bucket {settings.gcs.bucket}"
    if os.environ.get("STORAGE_PATH"):
        return f"STORAGE_PATH={settings.storage_path}"
    return (f"{settings.storage_path} (STORAGE_PATH is not set; set it to the directory "
            "`nixery serve` stores in)")


def _check(args: argparse.Namespace) -> int:
    from nixery import maintenance

    settings = _settings()

    async def run() -> maintenance.CheckReport | None:
        storage = await _maintained_storage("check", settings)
        if storage is None:
            return None
        try:
            return await maintenance.check(storage)
        finally:
            await storage.close()

    report = _run_maintenance("check", run)
    if isinstance(report, int):
        return report
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"checked {_count(report.blobs, 'blob')} ({report.bytes / 1e6:.1f} MB) and {_count(report.images, 'image')}: "
          f"{'ok' if report.ok else _count(len(report.problems), 'problem')}")
    if report.set_aside:
        print(f"set aside {_count(report.set_aside, 'damaged blob')} "
              "(STORAGE_PATH/quarantine): registries rebuild the images that use them on their next pull")
    return 0 if report.ok else 1


def _gc(args: argparse.Namespace) -> int:
    from nixery import maintenance

    settings = _settings()

    async def run() -> maintenance.GarbageReport | None:
        storage = await _maintained_storage("gc", settings)
        if storage is None:
            return None
        try:
            return await maintenance.collect_garbage(
                storage, older_than=args.older_than, dry_run=args.dry_run,
                quarantine_older_than=args.quarantine_older_than,
            )
        finally:
            await storage.close()

    report = _run_maintenance("gc", run)
    if isinstance(report, int):
        return report
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {_count(report.images_removed, 'image')} and {_count(report.blobs_removed, 'blob')}, "
          f"{report.bytes_freed / 1e6:.1f} MB freed; kept {_count(report.images_kept, 'image')}; "
          f"{verb} {_count(report.evaluations_removed, 'kept name evaluation')} of package-set revisions no kept "
          "image uses")
    if report.layer_records_removed:
        print(f"{verb} {_count(report.layer_records_removed, 'record')} of layers whose blobs are gone")
    if report.images_ahead or report.blobs_ahead:
        ahead = [_count(n, noun) for n, noun in ((report.images_ahead, "image"), (report.blobs_ahead, "blob")) if n]
        print(f"kept {' and '.join(ahead)} dated up to {_duration(report.most_ahead)} ahead of this machine's "
              "clock, until then: a clock that was ahead wrote the dates, or this machine's is behind")
    if report.orphan_notes_removed:
        print(f"{verb} {_count(report.orphan_notes_removed, 'usage note')} and pointers of images without a record")
    if report.locks_removed:
        print(f"removed {_count(report.locks_removed, 'lock')} that processes which died left behind")
    if report.unreadable_removed:
        print(f"{verb} {_count(report.unreadable_removed, 'image record')} that cannot be read (damaged)")
    if report.quarantined_removed:
        print(f"{verb} {_count(report.quarantined_removed, 'damaged blob')} quarantined more than "
              f"{args.quarantine_older_than / 86400:g} days ago")
    return 0


def _gc_age(text: str) -> float:
    from nixery import maintenance

    age = _parse_age(text)
    try:
        maintenance.check_age(age)
    except ValueError as exc:
        # `30` meant as days is 30 seconds: say how it was read.
        read = f"{text} is {age:g} seconds (write 30d for days, 12h for hours): " if text[-1:].isdigit() else ""
        raise argparse.ArgumentTypeError(f"{read}{exc}") from None
    return age


def _duration(seconds: float) -> str:
    """`12 minutes`, `5.5 hours`, `30 days`."""
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= 2 * size:
            return f"{seconds / size:.3g} {unit}s"
    return f"{seconds / 60:.0f} minutes"


def _count(number: int, noun: str) -> str:
    """`1 blob`, `2 blobs`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


#: The environment each command reads, by group, as in the README's configuration table.
STORAGE_VARIABLES = [
    ("storage", "NIXERY_STORAGE_BACKEND (filesystem, s3, gcs), STORAGE_PATH (default {storage_path}), "
     "S3_BUCKET (or BUCKET), S3_ENDPOINT, S3_REGION (or AWS_REGION, AWS_DEFAULT_REGION), S3_PATH_STYLE, "
     "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GCS_BUCKET (or BUCKET), GCS_SIGNING_KEY, GCS_SIGNING_ACCOUNT, "
     "GOOGLE_APPLICATION_CREDENTIALS, NIXERY_VERIFIED_BLOB_LINKS"),
]
SERVE_VARIABLES = [
    ("serving", "PORT (8080), NIXERY_HOST (127.0.0.1), NIXERY_WORKERS, NIXERY_SHUTDOWN_GRACE, NIXERY_SHUTDOWN_DELAY, "
     "NIXERY_HEADER_TIMEOUT, NIXERY_SEND_TIMEOUT, NIXERY_MAX_CONNECTIONS, NIXERY_TRUSTED_PROXIES, LOG_LEVEL, "
     "LOG_FORMAT"),
    ("packages", "NIXERY_PKGS_PATH, NIXERY_PKGS_REPO, NIXERY_CHANNEL or NIXERY_FLAKE (none of them: the "
     "bundled set, NIXERY_BUNDLED_SET, NIXERY_DEBIAN_SET_DIR), NIXERY_CHANNEL_URL, NIXERY_CHANNEL_TTL, "
     "NIXERY_GIT_REF_TTL, NIXERY_CACHE_DIR, NIXERY_BASELINE"),
    ("building", "NIX_TIMEOUT, NIXERY_MAX_LAYERS, NIXERY_LAYER_COST_MB, NIX_POPULARITY_URL, NIXERY_MAX_BUILDS, "
     "NIXERY_FAILED_BUILD_TTL, NIXERY_RECORD_CACHE, "
     "NIXERY_NIX_EVALUATOR, NIXERY_EVALUATOR_MEMORY_MB, NIXERY_LAYER_COMPRESSION, NIXERY_PLATFORMS, "
     "NIXERY_NIX_ANNOTATIONS"),
    *STORAGE_VARIABLES,
    ("blobs", "NIXERY_BLOB_REDIRECT, NIXERY_SIGNED_URL_TTL, NIXERY_BLOB_ACCEL_REDIRECT"),
    ("access", "NIXERY_AUTH, NIXERY_AUTH_USERS, NIXERY_AUTH_ANONYMOUS_PULL, NIXERY_TOKEN_SECRET, "
     "NIXERY_TOKEN_TTL, NIXERY_TOKEN_REALM"),
    ("declared images", "NIXERY_IMAGES_PATH, NIXERY_IMAGES_POLL, NIXERY_PREBUILD, NIXERY_K8S_WATCH, KUBECONFIG"),
    ("signing", "NIXERY_SIGNING_KEY, NIXERY_SIGNING_KEY_PASSWORD, NIXERY_PUBLIC_HOST"),
]


def _documented(
    commands: argparse._SubParsersAction, name: str, *, help: str, description: str,
    variables: list[tuple[str, str]],
) -> argparse.ArgumentParser:
    """A command whose --help says what it does and lists the environment variables it reads."""
    import textwrap

    from nixery.config import DEFAULT_STORAGE_PATH

    lines = ["environment (README.md, \"Configuration\", says what each means):"]
    for group, names in variables:
        lines += textwrap.wrap(
            names.format(storage_path=DEFAULT_STORAGE_PATH), width=100,
            initial_indent=f"  {group + ':':<17}", subsequent_indent=" " * 19, break_on_hyphens=False,
        )
    return commands.add_parser(
        name, help=help, description=textwrap.fill(description, 79), epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _key_directory(text: str) -> Path:
    """The directory `keys generate` writes in; an empty argument (`"$KEYS"` with KEYS unset) is none:
    it wrote the private key into the working directory, a checkout perhaps, without a word."""
    if not text:
        raise argparse.ArgumentTypeError("the directory is empty: give one (`.` for this one)")
    return Path(text)


def _generate_keys(directory: Path) -> int:
    from nixery.signing import generate_pair

    try:
        private, public = generate_pair(directory)
    except OSError as exc:
        print(f"nixery keys generate: {exc.strerror if exc.strerror else exc}", file=sys.stderr)
        return 1
    print(f"private key: {private} (NIXERY_SIGNING_KEY={private.resolve()})")
    print(f"public key:  {public} (give it to verifiers: docs/signing.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from nixery import output

    output.guard()
    try:
        try:
            return _command(sys.argv[1:] if argv is None else argv)
        finally:  # here, not at exit (after --help too): a reader gone (`| head`) is one more broken pipe
            sys.stdout.flush()
            output.check()
    except output.OutputError as exc:  # a full disk, a closed stdout: one line, not a traceback
        output.discard()
        print(f"nixery: cannot write the output: {exc.strerror}", file=sys.stderr)
        return OUTPUT_FAILED
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it itself: one line, no traceback
        print(f"{_command_name(sys.argv[1:] if argv is None else argv)}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader of the output went away (`nixery build ... | head`): end quietly, with the
        # status of a program that SIGPIPE ended, as other tools in a pipeline do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE


#: The commands named by two words (`nixery layers plan`).
_TWO_WORD_COMMANDS = ("layers", "auth", "keys")


def _command_name(argv: list[str]) -> str:
    """How a message of the command `argv` runs begins, as each command's own do: `nixery
    inspect`, `nixery layers plan`; `nixery` before a command is known."""
    words = ["nixery"]
    for word in argv[:2]:
        if word.startswith("-"):
            break
        words.append(word)
        if word not in _TWO_WORD_COMMANDS:
            break
    return " ".join(words)


def _command(argv: list[str]) -> int:
    if argv[:2] == ["layers", "plan"]:
        from nixery.layers.plan_cli import main as plan_main

        return plan_main(argv[2:])
    if argv[:2] == ["auth", "hash-password"]:
        from nixery.auth import hash_password_main

        return hash_password_main(argv[2:])
    if argv[:1] in (["build"], ["inspect"]):  # client commands: their own options (nixery/client.py)
        from nixery import client

        return client.build_main(argv[1:]) if argv[0] == "build" else client.inspect_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nixery", description="A container registry that builds images with Nix.")
    parser.add_argument("--version", action="version", version=f"nixery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _documented(
        commands, "serve", help="run the registry (settings from the environment)", variables=SERVE_VARIABLES,
        description="Run the registry: answer pulls on PORT, building each new image with Nix on its first "
        "pull, until SIGTERM, SIGINT or SIGHUP (then in-flight requests may finish within NIXERY_SHUTDOWN_GRACE; "
        "those still under way then are cut off).",
    )
    commands.add_parser("build", help="build an image on a registry and show its progress (nixery build -h)")
    commands.add_parser("inspect", help="show an image's layers, sizes and store paths (nixery inspect -h)")
    layers = commands.add_parser("layers", help="layering tools (nixery layers plan -h)")
    layers.add_argument("action", choices=["plan"], help="plan: run the layering on a graph and image list")
    auth = commands.add_parser("auth", help="access control tools")
    auth.add_argument("action", choices=["hash-password"], help="hash-password: make a users-file line (docs/auth.md)")
    keys = commands.add_parser("keys", help="signing keys (docs/signing.md)")
    keys.add_argument("action", choices=["generate"], help="generate: write a key pair for NIXERY_SIGNING_KEY")
    keys.add_argument("directory", nargs="?", default=".", type=_key_directory,
                      help="where to write it (default: here)")
    _documented(
        commands, "check", help="verify every stored blob and image record", variables=STORAGE_VARIABLES,
        description="Verify the storage a registry serves from: every blob's bytes against its digest "
        "(on S3 and GCS, sizes only), and that every image record's blobs are there. A blob that does not "
        "match is set aside (STORAGE_PATH/quarantine), so that registries rebuild the images using it on their "
        "next pull. Prints each problem; "
        "exits 0 when there is none, 1 when there are problems or the storage holds nothing (not there, "
        "or empty: is STORAGE_PATH the one `nixery serve` uses?), 2 for a configuration error or a storage "
        "it cannot reach or use, 130 when interrupted. Safe while registries serve.",
    )
    gc = _documented(
        commands, "gc", help="remove images not used recently and the blobs only they used",
        variables=STORAGE_VARIABLES,
        description="Remove the images no registry served within --older-than, then the blobs no remaining "
        "image uses. Safe while registries serve from the same storage, and to stop (Ctrl-C: exit status "
        "130) at any point: nothing a remaining image needs is removed, and the next run finishes the work. "
        "Exits 1 when the storage holds nothing (not there, or empty: is STORAGE_PATH the one `nixery serve` "
        "uses?), 2 for a configuration error or a storage it cannot reach or use.",
    )
    gc.add_argument("--older-than", type=_gc_age, default=_parse_age("30d"), help="e.g. 30d, 12h (default 30d)")
    gc.add_argument(
        "--quarantine-older-than", type=_parse_age, default=_parse_age("7d"),
        help="remove damaged blobs set aside (STORAGE_PATH/quarantine) longer ago than this (default 7d)",
    )
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed")
    args = parser.parse_args(_with_ages_joined(argv) if argv[:1] == ["gc"] else argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _generate_keys(args.directory)
    return _finish(_check(args) if args.command == "check" else _gc(args))


if __name__ == "__main__":
    sys.exit(main())
