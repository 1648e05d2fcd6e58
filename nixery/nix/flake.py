"""Package sets from a Nix flake (NIXERY_FLAKE), with image tags as refs.

    tag ──► locked flake reference ──► Revision(id = commit, or narHash)

A name is the flake's `packages.<system>.<name>`, else its
`legacyPackages.<system>.<name>` (so a nixpkgs flake works), dotted names
going into nested sets (flake.nix, the package set every flake is seen
through). Tags select what they select for NIXERY_PKGS_REPO:

    reference                       tag selects                    revision id
    git+file://, git+https://, ...  a tag or branch; 40 hex: that  the commit
                                    commit (git.py's rules, TTLs)
    github:, gitlab:, sourcehut:    the ref or commit of that      the locked commit
                                    name (`github:o/r/<tag>`)
    path:, anything else            nothing                        the locked narHash

A git reference's tag is resolved by git.py (`git ls-remote`, cached for
NIXERY_GIT_REF_TTL and TAG_TTL, as for NIXERY_PKGS_REPO) and the flake is
locked at that commit by `nix flake metadata`, once per commit. Other
references are locked by `nix flake metadata` once per tag per cache time;
a `path:` flake again whenever its files change (the same content walk as
NIXERY_PKGS_PATH). A reference that already names a `rev` is pinned: tags
select nothing. Locking honours the flake's lock file and locks what it
lacks, writing nothing into the flake.

The lock (the root's locked source and the whole lock graph) is written, as
data, into a directory of its own under `<cache_dir>/flakes/`, beside a copy
of flake.nix: the evaluators import it as any package set, and it fetches
every flake of the graph by its locked attributes (`builtins.fetchTree`).
`builtins.getFlake` would be less code, but Nix 2.8's tries to write the lock
file of a flake whose lock file lacks an input, and fails. Every evaluating
command gets the `flakes` experimental feature on its command line
(process.NIX_FEATURES), so nix.conf needs no change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import structlog

from nixery.nix.cachefiles import publish_directory
from nixery.nix.errors import NixError, NixTimeout, RefNotFound, SourceUnavailable
from nixery.nix.git import TAG_TTL, GitSource, check_ref_name
from nixery.nix.process import NIX_FEATURES, Deadline, run_nix
from nixery.nix.sources import FileHashes, PackageSource, Revision, redact_url, tree_fingerprint
from nixery.singleflight import FreshRun, SingleFlight

log = structlog.get_logger(__name__)

FLAKE_NIX = Path(__file__).with_name("flake.nix")
#: Hosted git forges whose references take a ref or commit as their third path part.
_FORGES = ("github:", "gitlab:", "sourcehut:")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")
#: Locked revisions remembered (tags and commits), the least recently locked forgotten first.
_LOCKS_KEPT = 1024
#: Limit for `nix flake metadata` (it may fetch the flake).
_LOCK_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class LockedFlake:
    id: str  # the commit, else the narHash
    #: What flake.nix reads: the root's locked source, the complete lock graph, the subdirectory.
    spec: dict


def split_reference(reference: str) -> tuple[str, dict[str, str]]:
    """A flake reference's part before `?`, and its query parameters (in order)."""
    base, _, query = reference.partition("?")
    return base, dict(parse_qsl(query, keep_blank_values=True))


def join_reference(base: str, params: dict[str, str]) -> str:
    return f"{base}?{urlencode(params, safe='/:')}" if params else base


def parse_metadata(output: bytes, subdirectory: str) -> LockedFlake:
    """The locked flake from `nix flake metadata --json` (Nix 2.8 and later print the same fields)."""
    try:
        data = json.loads(output)
        locked, locks = data["locked"], data["locks"]
        revision = locked.get("rev") or locked["narHash"]
        if not isinstance(revision, str) or not isinstance(locks["nodes"], dict):
            raise TypeError("no revision or lock graph")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NixError(f"unexpected output from nix flake metadata: {exc}") from exc
    return LockedFlake(revision, {"locked": locked, "locks": locks, "dir": subdirectory})


class FlakeSource(PackageSource):
    def __init__(self, reference: str, *, cache_dir: Path, ref_ttl: float, fetch_timeout: float):
        self.reference = reference.strip()
        self.shown = redact_url(self.reference)
        self.description = f"flake {self.shown}"
        self.ref_ttl = ref_ttl
        self.fetch_timeout = fetch_timeout
        self.root = cache_dir / "flakes"
        base, params = split_reference(self.reference)
        self._base = base
        self._params = params
        self._pinned = params.get("rev")
        self._git: GitSource | None = None
        self._branch: str | None = None  # a git reference's own `ref`: what `latest` means
        if base.startswith("git+") and self._pinned is None:
            self._branch = params.pop("ref", None)
            self._git = GitSource(base[4:], cache_dir=cache_dir, ref_ttl=ref_ttl, fetch_timeout=fetch_timeout)
        self._locked: dict[str, tuple[float, LockedFlake]] = {}  # tag (or content walk) -> when, what
        self._locks: SingleFlight[LockedFlake] = SingleFlight()
        self._path_walks: FreshRun[str] | None = None
        if base.startswith("path:") and self._pinned is None:
            hashes, directory = FileHashes(), Path(base[5:])
            self._path_walks = FreshRun(lambda: asyncio.to_thread(tree_fingerprint, directory, hashes))

    async def close(self) -> None:
        await self._locks.cancel_all()
        if self._git is not None:
            await self._git.close()

    async def resolve(self, tag: str) -> Revision:
        check_ref_name(tag)
        if self._git is not None:
            locked = await self._git_locked(tag)
        elif self._path_walks is not None:  # a directory: re-locked when its content changes
            locked = await self._lock_cached(f"tree-{await self._path_walks.run()}", self.reference, None)
        elif self.reference.startswith(_FORGES) and self._pinned is None and tag != "latest":
            ttl = None if _COMMIT.fullmatch(tag) else max(self.ref_ttl, TAG_TTL)
            locked = await self._lock_cached(tag, self._with_forge_ref(tag), ttl)
        else:  # pinned, or a reference whose tags select nothing
            locked = await self._lock_cached("latest", self.reference, None if self._pinned else self.ref_ttl)
        path = await asyncio.to_thread(self._package_set, locked.spec)
        shown = "" if tag == "latest" else f" {tag}"
        return Revision(f"{self.description}{shown} ({locked.id[:19]})", locked.id, path)

    async def _git_locked(self, tag: str) -> LockedFlake:
        """A git flake's tag as git.py resolves it (`git ls-remote`), then locked at that commit
        (by Nix, once per commit: its inputs come from its lock file)."""
        assert self._git is not None
        revision = await self._git.resolve(self._branch if tag == "latest" and self._branch else tag)
        commit = revision.id
        ref = self._git.ref_of(commit)
        # A commit by hash may be on no branch the default fetch brings: Nix then fetches every ref.
        extra = {"ref": ref} if ref else {"allRefs": "1"}
        locked = join_reference(self._base, {**self._params, **extra, "rev": commit})
        return await self._lock_cached(f"commit-{commit}", locked, None)

    def _with_forge_ref(self, tag: str) -> str:
        """`github:owner/repo[/ref]` with `tag` as its ref (or commit)."""
        scheme, _, path = self._base.partition(":")
        owner_repo = "/".join(path.split("/")[:2])
        return join_reference(f"{scheme}:{owner_repo}/{tag}", self._params)

    async def _lock_cached(self, key: str, reference: str, ttl: float | None) -> LockedFlake:
        """`reference` locked by Nix, kept under `key` for `ttl` seconds (None: for ever)."""
        known = self._locked.get(key)
        if known is not None and (ttl is None or time.monotonic() - known[0] < ttl):
            return known[1]
        return await self._locks.run(key, lambda: self._lock(key, reference))

    async def _lock(self, key: str, reference: str) -> LockedFlake:
        try:
            output = await run_nix(
                ["nix", *NIX_FEATURES, "flake", "metadata", "--json", "--no-write-lock-file", "--", reference],
                deadline=Deadline.after(min(self.fetch_timeout, _LOCK_TIMEOUT)),
            )
        except NixError as exc:
            known = self._locked.get(key)
            if known is None:
                raise _lock_error(redact_url(reference), exc) from exc
            log.warning("flake.unreachable_using_last_lock", flake=redact_url(reference), revision=known[1].id,
                        error=exc.log_tail[-500:])
            self._locked[key] = (time.monotonic(), known[1])
            return known[1]
        locked = parse_metadata(output, self._params.get("dir", ""))
        if key.startswith("tree-"):  # one walk's lock is all a path flake needs
            self._locked = {k: v for k, v in self._locked.items() if not k.startswith("tree-")}
        previous = self._locked.pop(key, None)
        self._locked[key] = (time.monotonic(), locked)  # the most recent last, for the trim below
        while len(self._locked) > _LOCKS_KEPT:
            del self._locked[next(iter(self._locked))]
        if previous is None or previous[1] != locked:
            log.info("flake.locked", flake=redact_url(reference), revision=locked.id)
        return locked

    def _package_set(self, spec: dict) -> Path:
        """The directory that imports the locked flake as a package set (made once per lock)."""
        text = json.dumps(spec, sort_keys=True)
        final = self.root / hashlib.sha256(text.encode()).hexdigest()[:24]
        if (final / "default.nix").is_file():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            shutil.copyfile(FLAKE_NIX, staging / "default.nix")
            (staging / "flake.json").write_text(text)
            publish_directory(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


_ERROR = re.compile(r"^error: (.+)$", re.MULTILINE)
_NO_COMMIT = "Cannot find Git revision"
_LOCATION = re.compile(r"^\s*at (/\S+:\d+:\d+):?$", re.MULTILINE)


def _lock_error(shown: str, error: NixError) -> NixError:
    """Why `nix flake metadata` failed: an error in a file of the flake (Nix names the file
    and line) fails the build; anything else (a fetch) is the source being unavailable."""
    said, where = _ERROR.search(error.log_tail), _LOCATION.search(error.log_tail)
    if said is not None and _NO_COMMIT in said[1]:  # a 40-hex tag that is no commit of the repository
        return RefNotFound(f"no such commit in the flake {shown}: {said[1][:300]}")
    if isinstance(error, NixTimeout) or said is None or where is None:
        return SourceUnavailable(f"cannot lock the flake {shown}", error.log_tail)
    return NixError(f"the flake {shown} does not evaluate: {said[1]} at {where[1]}", error.log_tail)
