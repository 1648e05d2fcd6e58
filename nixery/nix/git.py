"""Package sets from a git repository, with image tags as git refs.

    tag ──► ref ──► commit ──► checkout directory ──► Revision(id=commit)

* `latest` is the head of the repository's default branch (its HEAD), a
  40-hex tag is that commit, any other tag is the tag or branch of that name
  (a tag wins over a branch, as in git itself).
* Resolving a name asks the remote (`git ls-remote`), at most once per cache
  time: NIXERY_GIT_REF_TTL seconds for branches and `latest`, TAG_TTL (or the
  branch time, when that is longer) for tags, forever for commits. A moved tag
  is therefore picked up within TAG_TTL; tags are meant not to move, and
  re-checking them rarely keeps pulls of released versions fast.
* The commit, never the ref, keys the image cache: a branch that moves gives a
  new image, and a tag keeps its image.

Everything lives under `<cache_dir>/git/<hash of the URL>/`:

    mirror.git/           bare repository; fetched refs keep their names
    checkouts/<commit>/   the tree of one commit (`git archive`), made once
    refs.json             the last commit seen for each tag

A checkout is extracted into a temporary directory and renamed into place
when complete, so a directory under `checkouts/` is always whole, also when
several processes share the cache. Within a process, one coroutine makes a
checkout and the others wait for it; fetches into the mirror take turns.

When the repository cannot be reached, a tag that was resolved before (in
this process or, through refs.json, an earlier one) keeps its last commit, so
the registry keeps serving what it has; a tag never seen answers
SOURCE_UNAVAILABLE. Git runs without a terminal (no password prompts, the
machine's ssh keys and credential helpers are used) and with a timeout; tags
and URLs reach it as argv entries, never through a shell.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from nixery.nix.cachefiles import publish_directory, read_json, remove_abandoned, write_json
from nixery.nix.errors import NixError, RefInvalid, RefNotFound, SourceUnavailable
from nixery.nix.process import start_child
from nixery.nix.sources import PackageSource, Revision, redact_url
from nixery.singleflight import SingleFlight

log = structlog.get_logger(__name__)

#: How long a tag's commit is trusted before the remote is asked again.
TAG_TTL = 600.0
#: Limit for asking the remote about refs (ls-remote); fetches get the build timeout.
LS_REMOTE_TIMEOUT = 60.0

_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
_SCP_LIKE = re.compile(r"^[^/]*:")  # user@host:path, as git reads it


# ---- running git -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GitResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def tail(self) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-10:])


def git_environment() -> dict[str, str]:
    """The caller's environment (ssh agent, credential helpers) minus any prompting."""
    env = dict(os.environ)
    env.update(
        GIT_TERMINAL_PROMPT="0",  # no username/password prompts
        GCM_INTERACTIVE="never",  # Git Credential Manager
        LC_ALL="C",  # stable messages in logs
    )
    # A credential prompt through a GUI helper would hang a server.
    env.pop("GIT_ASKPASS", None)
    env.pop("SSH_ASKPASS", None)
    return env


async def run_git(args: list[str], *, timeout: float, git_dir: Path | None = None) -> GitResult:
    """Run git; never raises for a non-zero exit, only for a timeout.

    The process gets its own session: no controlling terminal, so ssh cannot
    ask for a passphrase, and a timeout kills git together with ssh.
    """
    argv = ["git", *(["--git-dir", str(git_dir)] if git_dir else []), *args]
    log.debug("git.run", argv=[redact_url(arg) for arg in argv])
    # Like Nix, git (and the ssh it may start) gets SIGTERM when the server dies.
    process = await start_child(
        argv,
        builds=True,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except BaseException:  # timeout or cancellation: take the whole group down
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await process.wait()
        raise
    assert process.returncode is not None
    return GitResult(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


def normalize_url(url: str) -> str:
    """A relative local path becomes absolute: git runs with another directory."""
    if "://" in url or _SCP_LIKE.match(url) or os.path.isabs(url):
        return url
    return os.path.abspath(url)


def check_ref_name(tag: str) -> None:
    """The rules of `git check-ref-format` for one branch or tag name.

    The HTTP layer has already applied the registry's tag rules; this keeps
    the source safe on its own (a name can never be read as an option).
    """
    parts = tag.split("/")
    if (
        not tag
        or tag.startswith(("-", "/"))
        or tag == "@"
        or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
        or tag.endswith(".")
        or ".." in tag
        or "@{" in tag
        or any(c in tag for c in " ~^:?*[\\\x7f")
        or any(ord(c) < 32 for c in tag)
    ):
        raise RefInvalid(f"invalid tag {tag[:128]!r}: not a valid git ref name", ref=tag[:128])


# ---- the source ------------------------------------------------------------


@dataclass(slots=True)
class _Known:
    commit: str
    kind: str  # "head" (latest), "branch", "tag"
    ref: str  # full ref name on the remote, e.g. refs/tags/v1 ("" when unknown)
    checked: float  # time.monotonic() of the last answer from the remote


class GitSource(PackageSource):
    def __init__(self, url: str, *, cache_dir: Path, ref_ttl: float, fetch_timeout: float):
        self.url = normalize_url(url)
        self.shown_url = redact_url(url)
        self.description = f"git {self.shown_url}"
        self.ref_ttl = ref_ttl
        self.tag_ttl = max(ref_ttl, TAG_TTL)
        self.fetch_timeout = fetch_timeout
        self.root = cache_dir / "git" / hashlib.sha256(self.url.encode()).hexdigest()[:24]
        self.mirror = self.root / "mirror.git"
        self.checkouts = self.root / "checkouts"
        self._refs_file = self.root / "refs.json"
        self._known: dict[str, _Known] = {}
        self._ref_of_commit: dict[str, str | None] = {}  # which ref led to a commit, to fetch it cheaply
        self._lookups: SingleFlight[_Known] = SingleFlight()
        self._checkouts: SingleFlight[Path] = SingleFlight()
        self._mirror_lock = asyncio.Lock()
        self._known_version = 0  # bumped on every save; a write older than the last one written is dropped
        self._written_version = 0
        self._write_lock = threading.Lock()
        self._load_known()

    async def close(self) -> None:
        await self._lookups.cancel_all()
        await self._checkouts.cancel_all()

    # ---- tag to commit -------------------------------------------------

    async def resolve(self, tag: str) -> Revision:
        check_ref_name(tag)
        if _COMMIT.fullmatch(tag):
            commit = tag.lower()
            return Revision(f"{self.description} commit {commit[:12]}", commit, None)
        known = self._known.get(tag)
        if known is None or time.monotonic() - known.checked >= self._ttl(known):
            known = await self._lookups.run(tag, lambda: self._lookup(tag))
        self._ref_of_commit[known.commit] = known.ref or None
        return Revision(f"{self.description} {tag} ({known.commit[:12]})", known.commit, None)

    def ref_of(self, commit: str) -> str | None:
        """The full ref (refs/tags/v1) that last resolved to `commit`; None when named by its hash."""
        return self._ref_of_commit.get(commit)

    async def checkout(self, revision: Revision) -> Path:
        """Fetched only on a build: an image already in storage needs no checkout."""
        return await self._checkout(revision.id, ref=self._ref_of_commit.get(revision.id))

    def _ttl(self, known: _Known) -> float:
        return self.tag_ttl if known.kind == "tag" else self.ref_ttl

    async def _lookup(self, tag: str) -> _Known:
        """Ask the remote which commit `tag` names now."""
        if tag == "latest":
            args = ["ls-remote", "--symref", "--", self.url, "HEAD"]
        else:
            patterns = [f"refs/tags/{tag}", f"refs/tags/{tag}^{{}}", f"refs/heads/{tag}"]
            args = ["ls-remote", "--", self.url, *patterns]
        try:
            result = await run_git(args, timeout=LS_REMOTE_TIMEOUT)
        except TimeoutError:
            result = GitResult(-1, "", f"no answer within {LS_REMOTE_TIMEOUT:g} s")
        if result.returncode != 0:
            return await self._unreachable(tag, result)
        found = _pick_ref(tag, result.stdout)
        if found is None:
            if self._known.pop(tag, None) is not None:
                await self._save_known()
            what = "the repository has no default branch (HEAD)" if tag == "latest" else f"no branch or tag {tag!r}"
            raise RefNotFound(f"{what} in {self.description}")
        kind, ref, commit = found
        previous = self._known.get(tag)
        known = self._known[tag] = _Known(commit, kind, ref, time.monotonic())
        if previous is None or previous.commit != commit:
            log.info("git.ref_resolved", repository=self.shown_url, tag=tag, ref=ref, commit=commit)
            await self._save_known()
        return known

    async def _unreachable(self, tag: str, result: GitResult) -> _Known:
        known = self._known.get(tag)
        if known is None:
            raise SourceUnavailable(
                f"cannot reach the git repository {self.shown_url} to resolve {tag!r}", result.tail
            )
        # Serve the last known commit, and ask again only after another cache period.
        known.checked = time.monotonic()
        log.warning(
            "git.unreachable_using_last_commit",
            repository=self.shown_url, tag=tag, commit=known.commit, error=result.tail[-500:],
        )
        return known

    # ---- commit to directory -------------------------------------------

    async def _checkout(self, commit: str, *, ref: str | None) -> Path:
        path = self.checkouts / commit
        if not await asyncio.to_thread(path.is_dir):
            path = await self._checkouts.run(commit, lambda: self._make_checkout(commit, ref))
        if not await asyncio.to_thread((path / "default.nix").is_file):
            raise NixError(f"commit {commit[:12]} of {self.description} has no default.nix at the repository root")
        return path

    async def _make_checkout(self, commit: str, ref: str | None) -> Path:
        final = self.checkouts / commit
        if await asyncio.to_thread(final.is_dir):  # made by another process meanwhile
            return final
        await self._fetch(commit, ref)
        await asyncio.to_thread(self.checkouts.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(remove_abandoned, self.checkouts)
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f".tmp-{commit[:12]}-", dir=self.checkouts))
        try:
            archive = staging / "tree.tar"
            result = await run_git(
                ["archive", "--format=tar", f"--output={archive}", commit],
                git_dir=self.mirror,
                timeout=self.fetch_timeout,
            )
            if result.returncode != 0:
                raise NixError(f"cannot export commit {commit[:12]} of {self.description}", result.tail)
            await asyncio.to_thread(_extract, archive, staging / "tree")
            await asyncio.to_thread(publish_directory, staging / "tree", final)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        log.info("git.checked_out", repository=self.shown_url, commit=commit, path=str(final))
        return final

    async def _fetch(self, commit: str, ref: str | None) -> None:
        """Make sure the mirror holds `commit`, fetching as little as it can.

        Fetches are shallow where they can be: a package set needs the tree of
        one commit, not the history that led to it.
        """
        async with self._mirror_lock:
            await self._init_mirror()
            if await self._has_commit(commit):
                return
            started = time.monotonic()
            # By the ref that named the commit (every server allows that), else by
            # hash (most do: the ref may have moved on meanwhile), else, for a
            # commit named by its hash, the whole history of every branch and tag.
            by_hash = ("--depth=1", [f"+{commit}:refs/nixery/commits/{commit}"])
            if ref is not None:
                attempts = [("--depth=1", [f"+{ref}:{ref}"]), by_hash]
            else:
                everything = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
                attempts = [by_hash, ("--depth=2147483647", everything)]  # that depth: unshallow
            for depth, refspecs in attempts:
                try:
                    result = await run_git(
                        ["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", depth, "--", self.url, *refspecs],
                        git_dir=self.mirror,
                        timeout=self.fetch_timeout,
                    )
                except TimeoutError:
                    raise SourceUnavailable(
                        f"fetching from the git repository {self.shown_url} took longer than {self.fetch_timeout:g} s"
                    ) from None
                if await self._has_commit(commit):
                    log.info(
                        "git.fetched", repository=self.shown_url, commit=commit,
                        seconds=round(time.monotonic() - started, 3),
                    )
                    return
            if ref is None and result.returncode == 0:
                raise RefNotFound(f"no commit {commit} in {self.description}")
            what = f"{ref} ({commit[:12]})" if ref else f"commit {commit[:12]}"
            raise SourceUnavailable(f"cannot fetch {what} from the git repository {self.shown_url}", result.tail)

    async def _init_mirror(self) -> None:
        if await asyncio.to_thread((self.mirror / "HEAD").is_file):
            return
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".tmp-mirror-", dir=self.root))
        try:
            result = await run_git(["init", "--quiet", "--bare", str(staging)], timeout=60)
            if result.returncode != 0:
                raise NixError(f"cannot create a git mirror under {self.root}", result.tail)
            # A mirror never needs garbage collection in the middle of a request.
            await run_git(["config", "gc.auto", "0"], git_dir=staging, timeout=60)
            await asyncio.to_thread(publish_directory, staging, self.mirror)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)

    async def _has_commit(self, commit: str) -> bool:
        result = await run_git(["cat-file", "-e", f"{commit}^{{commit}}"], git_dir=self.mirror, timeout=60)
        return result.returncode == 0

    # ---- the last known commit of each tag, across restarts ---------------

    def _load_known(self) -> None:
        """Read at start-up (a small file), so a restart still knows every tag's last commit."""
        for tag, entry in read_json(self._refs_file).items():
            try:
                self._known[tag] = _Known(str(entry["commit"]), str(entry["kind"]), str(entry["ref"]), float("-inf"))
            except (KeyError, TypeError):
                continue

    async def _save_known(self) -> None:
        self._known_version += 1
        entries = {tag: {"commit": k.commit, "kind": k.kind, "ref": k.ref} for tag, k in self._known.items()}
        await asyncio.to_thread(self._write_known, self._known_version, entries)

    def _write_known(self, version: int, entries: dict) -> None:
        # Writes run in threads and may finish in any order, also after their caller was
        # cancelled: a list older than the one on disk is not written over it.
        with self._write_lock:
            if version > self._written_version:
                write_json(self._refs_file, entries)
                self._written_version = version


def _pick_ref(tag: str, listing: str) -> tuple[str, str, str] | None:
    """(kind, full ref, commit) from `git ls-remote` output, or None."""
    refs: dict[str, str] = {}
    symref = None
    for line in listing.splitlines():
        if line.startswith("ref: "):  # `--symref`: "ref: refs/heads/main<TAB>HEAD"
            target, _, name = line[5:].partition("\t")
            if name == "HEAD":
                symref = target
            continue
        sha, _, name = line.partition("\t")
        if _COMMIT.fullmatch(sha):
            refs[name] = sha.lower()
    if tag == "latest":
        # Without the symref (old servers), the commit is fetched by hash instead of by ref.
        return ("head", symref or "", refs["HEAD"]) if "HEAD" in refs else None
    tag_ref, branch_ref = f"refs/tags/{tag}", f"refs/heads/{tag}"
    if tag_ref in refs:  # annotated tags also list the commit they point at, as <ref>^{}
        return "tag", tag_ref, refs.get(tag_ref + "^{}", refs[tag_ref])
    if branch_ref in refs:
        return "branch", branch_ref, refs[branch_ref]
    return None


def _extract(archive: Path, destination: Path) -> None:
    destination.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="tar")  # nothing outside `destination`
