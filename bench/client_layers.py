"""What a layer costs a real client: the same files pulled as 1 to 100 layers.

    .venv/bin/python bench/client_layers.py            # every client, N in 1..100, 5 repetitions (~1 hour)
    .venv/bin/python bench/client_layers.py --quick    # a few minutes: podman, N in 1, 10, 50, 2 repetitions
    .venv/bin/python bench/client_layers.py --clients podman --no-cold --ns 10,50 --ks ''   # warm rows only

The files are those of the Debian set's `shell/curl` as this registry serves
it today: its layers are read back, merged (upper layers win) and packed again,
in the same order, into N layers of about equal size for each N (gzip, isal
level 1 as the registry uses; each layer carries its files' parent
directories). Every packing is pushed with skopeo into a `docker-registry`
peer (CNCF distribution 2.8). To tell bandwidth from per-layer cost, the same
files are also packed at half and at twice the bytes (the first half of the
files; the files twice, the second copy under `copy/`).

Cold: each pull starts from an empty client store (`rmi`, `image rm --sync`,
a fresh OCI directory for skopeo). The images are pulled in turn, in another
order every repetition (shuffled, the same in every run: a pull ran slower
right after some others), and each figure is the median of the repetitions.
The same loop also pulls `shell/curl` from this registry (its layers as served
today) and the same layers copied into docker-registry: the issue's headline
comparison, in the same run.

Warm: the client holds an older version of the image and pulls the new one.
For each N, the old and new versions share the N layers of the files and
differ in one small layer (so the bytes downloaded are the same for every N):
on top of the shared ones (the slope is the cost of a layer the client
already holds), or below them (N = 10 and 50: every shared layer then sits on
another parent, so its chain ID differs from the one the client holds); and
the real pair, `shell/git` then `shell/curl`, from this registry and from
docker-registry, and from a second registry that plans by bytes alone
(`NIXERY_LAYER_COST_MB=0`: the plans before issue 23), in the same run (the
issue asks that such a pull be no slower than it was then). That registry's
`shell/curl` is pulled cold too. The registries build `shell/curl` first, then
`shell/git`; `--git-first` builds them the other way, so that `shell/curl` is
planned against the layers `shell/git` stored.

Store size (podman only): K small unrelated images (one layer each) are
pulled first, for K in 0, 50, 200, then the 50-layer and the 1-layer packings
are timed: does a layer cost more when the store already holds many?

Fit, per client, over the medians of the cold pulls:
`time ≈ a + bytes / bandwidth + N × per-layer cost`, by least squares; the
per-layer cost is printed in ms and in MB at the fitted bandwidth (the
"MB equivalent" that NIXERY_LAYER_COST_MB stands for).

Clients run under `flock /tmp/clients.lock` (taken by the script), as the
tests that start clients do.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import common as c
from isal import igzip
from serving import Client, Podman, clients

from nixery.config import debian_set

CLIENTS_LOCK = Path("/tmp/clients.lock")
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
FULL_NS = (1, 5, 10, 25, 50, 100)
QUICK_NS = (1, 10, 50)
STORE_KS = (0, 50, 200)

Entries = list[tuple[tarfile.TarInfo, bytes]]


# ---- the files, packed into N layers -------------------------------------------------------


def files_of(registry: c.RegistryProcess, image: str) -> tuple[Entries, dict]:
    """Every tar entry of the image as the registry serves it, upper layers winning, in the
    order of their first appearance; and its manifest."""
    _, manifest = registry.manifest(image, accept=c.MANIFEST_ACCEPT)
    merged: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    for layer in manifest["layers"]:
        status, _, blob = registry.request(f"/v2/{image}/blobs/{layer['digest']}", accept=None)
        assert status == 200, (status, layer)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            for member in tar:
                data = tar.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
                merged[member.name.removeprefix("./").rstrip("/")] = (member, data)
    return [(info, data) for info, data in merged.values()], manifest


@dataclass(frozen=True)
class GitThenCurl:
    """`shell/curl` as one registry serves it, next to the `shell/git` a client already holds."""

    curl_layers: int
    curl_bytes: int  # its layers and config
    shared: frozenset[str]  # digests of its layers that shell/git has too
    curl_only: int  # bytes of its other layers and config: what a client holding shell/git downloads
    prefix: int  # how many of its first layers are shell/git's first, in the same order

    @classmethod
    def of(cls, registry: c.RegistryProcess) -> GitThenCurl:
        _, curl = registry.manifest("shell/curl", accept=c.MANIFEST_ACCEPT)
        _, git = registry.manifest("shell/git", accept=c.MANIFEST_ACCEPT)
        shared = frozenset({x["digest"] for x in git["layers"]} & {x["digest"] for x in curl["layers"]})
        prefix = next((i for i, (a, b) in enumerate(zip(curl["layers"], git["layers"], strict=False))
                       if a["digest"] != b["digest"]), min(len(curl["layers"]), len(git["layers"])))
        config = curl["config"]["size"]
        return cls(len(curl["layers"]), sum(x["size"] for x in curl["layers"]) + config, shared,
                   sum(x["size"] for x in curl["layers"] if x["digest"] not in shared) + config, prefix)


def entry_bytes(entries: Entries) -> int:
    return sum(len(data) for _, data in entries)


def split(entries: Entries, n: int) -> list[Entries]:
    """N consecutive groups of about equal bytes, none empty."""
    groups: list[Entries] = []
    rest, left = entry_bytes(entries), n
    current: Entries = []
    size = 0
    for index, (info, data) in enumerate(entries):
        current.append((info, data))
        size += len(data)
        remaining_entries = len(entries) - index - 1
        if left > 1 and (size >= rest / left or remaining_entries < left):
            groups.append(current)
            rest, left, current, size = rest - size, left - 1, [], 0
    groups.append(current)
    assert len(groups) == n and all(groups), (n, [len(g) for g in groups])
    return groups


def with_parents(group: Entries, directories: dict[str, tarfile.TarInfo]) -> Entries:
    """The group, each entry preceded by its parent directories (once): each layer stands alone."""
    out: Entries = []
    seen: set[str] = set()
    for info, data in group:
        name = info.name.removeprefix("./").rstrip("/")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                found = directories.get(parent)
                if found is None:
                    found = tarfile.TarInfo(parent)
                    found.type, found.mode = tarfile.DIRTYPE, 0o755
                out.append((found, b""))
        if name not in seen:
            seen.add(name)
            out.append((info, data))
    return out


@dataclass(frozen=True)
class Blob:
    digest: str
    data: bytes
    diff_id: str = ""


def tar_layer(entries: Entries) -> Blob:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    plain = raw.getvalue()
    compressed = igzip.compress(plain, compresslevel=1, mtime=0)
    return Blob(_digest(compressed), compressed, _digest(plain))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def small_file(name: str, text: str) -> Entries:
    info = tarfile.TarInfo(name)
    data = text.encode()
    info.size, info.mode = len(data), 0o644
    return [(info, data)]


@dataclass
class Packing:
    """One image to push: its layers in order."""

    name: str  # repository on the peer
    layers: list[Blob]

    @property
    def bytes(self) -> int:
        return sum(len(layer.data) for layer in self.layers)


def pack(name: str, entries: Entries, n: int, *, extra: Entries | None = None, below: bool = False) -> Packing:
    """The entries as N layers; `extra` as one more layer on top of them, or below them."""
    directories = {info.name.removeprefix("./").rstrip("/"): info for info, _ in entries if info.isdir()}
    groups = [with_parents(group, directories) for group in split(entries, n)]
    if extra is not None:
        groups.insert(0 if below else len(groups), with_parents(extra, directories))
    return Packing(name, [tar_layer(group) for group in groups])


def copied(entries: Entries) -> Entries:
    """The entries and a second copy of them under `copy/` (twice the bytes)."""
    out = list(entries)
    for info, data in entries:
        twin = tarfile.TarInfo("copy/" + info.name.removeprefix("./"))
        for field in ("size", "mtime", "mode", "type", "linkname", "uid", "gid", "uname", "gname"):
            setattr(twin, field, getattr(info, field))
        if info.islnk():  # a hard link names its target: the copy's target is in the copy
            twin.linkname = "copy/" + info.linkname.removeprefix("./")
        out.append((twin, data))
    return out


def first_half(entries: Entries) -> Entries:
    half, size, total = [], 0, entry_bytes(entries) / 2
    for info, data in entries:
        if size >= total:
            break
        half.append((info, data))
        size += len(data)
    return half


class OciLayout:
    """An OCI image layout on disk that skopeo copies from (`oci:DIR:name`)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: list[dict] = []

    def blob(self, digest: str, data: bytes) -> None:
        path = self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(data)

    def add(self, packing: Packing) -> None:
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in packing.layers]},
        }).encode()
        for layer in packing.layers:
            self.blob(layer.digest, layer.data)
        self.blob(_digest(config), config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": c.OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest, "size": len(layer.data)}
                       for layer in packing.layers],
        }).encode()
        self.blob(_digest(manifest), manifest)
        self.index.append({"mediaType": c.OCI_MANIFEST, "digest": _digest(manifest), "size": len(manifest),
                           "annotations": {"org.opencontainers.image.ref.name": packing.name.replace("/", "-")}})
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.index}))


def skopeo_copy(source: str, destination: str) -> None:
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", source, destination],
                   check=True, capture_output=True, timeout=600)


def push_all(layout: OciLayout, packings: Sequence[Packing], peer: c.Daemon) -> None:
    for packing in packings:
        layout.add(packing)
    def push(packing: Packing) -> None:
        skopeo_copy(f"oci:{layout.root}:{packing.name.replace('/', '-')}", f"docker://{peer.host}/{packing.name}:latest")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(push, packings))


# ---- timing pulls ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    reference: str
    layers: int
    bytes: int
    size: str = "full"  # half / full / double: which files
    fit: bool = True  # a point of the per-layer fit


@dataclass(frozen=True)
class WarmTarget:
    label: str
    old: str
    new: str
    held: int  # layers of the new image the client already holds
    bytes: int  # what it downloads: the new image's other layers and its config
    where: str  # the new layer: "top", "below" the held ones, or "real" (shell/git then shell/curl)


def timed_pull(client: Client, reference: str) -> float:
    os.sync()  # nothing that earlier pulls wrote is left to reach the disk while this one runs
    started = time.perf_counter()
    client.pull(reference)
    return time.perf_counter() - started


def alternate(rounds: int, items: Sequence) -> Iterator:  # type: ignore[type-arg]
    """The items `rounds` times, each round in another order (shuffled, the same in every run), so
    that slow drifts and what the pull before left to do hit all alike. In a fixed order they did
    not: reversed every other round, the first pulls after the largest one ran slower, and only some
    items were ever there; rotated, each item kept the same one before it."""
    for round_number in range(rounds):
        order = list(items)
        random.Random(round_number).shuffle(order)
        yield from order


def cold(client: Client, targets: Sequence[Target], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {t.label: [] for t in targets}
    if targets:  # a first pull, untimed: the client's daemon warms up
        client.clear(targets[0].reference)
        client.pull(targets[0].reference)
        client.clear(targets[0].reference)
    for target in alternate(runs, targets):
        times[target.label].append(timed_pull(client, target.reference))
        client.clear(target.reference)
        c.say(f"    {client.name}: {target.label} {times[target.label][-1]:.2f} s")
    return times


def warm(client: Client, targets: Sequence[WarmTarget], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {t.label: [] for t in targets}
    for target in alternate(runs, targets):
        client.clear(target.new)
        client.clear(target.old)
        client.pull(target.old)
        times[target.label].append(timed_pull(client, target.new))
        client.clear(target.new)
        client.clear(target.old)
        c.say(f"    {client.name}: warm {target.label} {times[target.label][-1]:.2f} s")
    return times


def store_growth(podman: Podman, small: Sequence[str], full: Target, one: Target, ks: Sequence[int],
                 runs: int) -> dict[int, dict[str, list[float]]]:
    """Pull times of the many-layer and the one-layer packing with K small images in the store."""
    times: dict[int, dict[str, list[float]]] = {k: {full.label: [], one.label: []} for k in ks}
    for _ in range(runs):
        podman.clear("")
        held = 0
        for k in ks:
            for start in range(held, k, 50):
                _podman(podman, "pull", "-q", "--tls-verify=false", *small[start:min(k, start + 50)])
            held = k
            for target in (full, one):
                times[k][target.label].append(timed_pull(podman, target.reference))
                _podman(podman, "rmi", "-f", target.reference)
            c.say(f"    podman, {k} small images held: {full.label} {times[k][full.label][-1]:.2f} s, "
                  f"{one.label} {times[k][one.label][-1]:.2f} s")
    podman.clear("")
    return times


def _podman(podman: Podman, *argv: str) -> None:
    subprocess.run([*podman.argv, *argv], check=True, capture_output=True, timeout=900)


@contextlib.contextmanager
def clients_lock() -> Iterator[None]:
    with open(CLIENTS_LOCK, "a") as lock:
        c.say(f"waiting for {CLIENTS_LOCK} ...")
        fcntl.flock(lock, fcntl.LOCK_EX)
        c.say(f"holding {CLIENTS_LOCK} (load average {c.load_average()})")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---- the fit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    fixed_s: float
    seconds_per_mb: float
    per_layer_s: float

    @property
    def bandwidth(self) -> float | None:  # MB/s
        return 1 / self.seconds_per_mb if self.seconds_per_mb > 0 else None

    @property
    def layer_mb(self) -> float | None:
        return self.per_layer_s * self.bandwidth if self.bandwidth else None


def fit(points: Sequence[tuple[float, float, float]]) -> Fit | None:
    """Least squares of t = a + b·MB + c·N over (MB, N, t) points (normal equations, Cramer);
    None when the points cannot tell them apart (one layer count or one size only: `--ns 1`)."""
    if len({n for _, n, _ in points}) < 2 or len({mb for mb, _, _ in points}) < 2:
        return None
    rows = [(1.0, mb, n) for mb, n, _ in points]
    ts = [t for _, _, t in points]
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    atb = [sum(r[i] * t for r, t in zip(rows, ts, strict=True)) for i in range(3)]

    def det(m: list[list[float]]) -> float:
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))

    whole = det(ata)
    solved = []
    for column in range(3):
        m = [row[:] for row in ata]
        for i in range(3):
            m[i][column] = atb[i]
        solved.append(det(m) / whole)
    return Fit(*solved)


# ---- the run ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="podman only, N in 1, 10, 50, 2 repetitions, K ≤ 50")
    parser.add_argument("--runs", type=int, default=5, help="repetitions of every cold and warm pull")
    parser.add_argument("--clients", default="podman,docker,ctr,skopeo", help="clients, in the order they run")
    parser.add_argument("--ns", default=",".join(map(str, FULL_NS)), help="layer counts")
    parser.add_argument("--ks", default=",".join(map(str, STORE_KS)), help="small images held (podman; '' for none)")
    parser.add_argument("--store-runs", type=int, default=3, help="repetitions of the store-size rows")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm pulls")
    parser.add_argument("--warm-where", default="top,below",
                        help="where the old and new versions' differing layer sits: on top of the held ones, "
                             "below them (the held layers' chain then differs), or both")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold pulls (and the fit)")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks alone")
    parser.add_argument("--git-first", action="store_true",
                        help="the registries build shell/git before shell/curl (their layering history then "
                             "starts from shell/git's layers; by default shell/curl comes first)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.store_runs, args.clients = 2, 1, "podman"
        args.ns, args.ks = ",".join(map(str, QUICK_NS)), "0,50"
    ns = [int(x) for x in args.ns.split(",") if x]
    ks = [int(x) for x in args.ks.split(",") if x]
    wanted = [x for x in args.clients.split(",") if x]
    started = time.time()

    def write(body: str) -> str:
        """The report so far (rewritten after each client: a long run that is stopped keeps its figures)."""
        if not args.no_report:
            c.write_report("client-layers", "What a layer costs a real client", body, started=started)
        return body
    c.need("docker-registry", "skopeo", "nix-build")
    pkgs = debian_set().path
    if not (pkgs / "default.nix").is_file():
        sys.exit(f"the Debian set is needed ({pkgs}): make debian-set")
    c.say("building shell, curl and git of the Debian set ...")
    c.nix_build(["shell", "curl", "git"], pkgs=pkgs)

    base = c.SCRATCH / "client-layers"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        ours = c.ready_registry(base / "storage", pkgs=pkgs)
        stack.callback(ours.stop)
        bytes_only = c.ready_registry(base / "storage-bytes-only", pkgs=pkgs, NIXERY_LAYER_COST_MB="0")
        stack.callback(bytes_only.stop)
        peer = stack.enter_context(c.docker_registry(base / "docker-registry"))
        c.say(f"nixery {ours.url}, docker-registry {peer.url}")

        if args.git_first:  # the first image planned decides which layers the second can reuse
            for registry in (ours, bytes_only):
                registry.manifest("shell/git", accept=c.MANIFEST_ACCEPT)
        entries, served = files_of(ours, "shell/curl")
        served_layers = len(served["layers"])
        served_bytes = sum(layer["size"] for layer in served["layers"]) + served["config"]["size"]
        git_then_curl = {label: GitThenCurl.of(registry) for label, registry in
                         (("nixery", ours), ("nixery, bytes only (NIXERY_LAYER_COST_MB=0)", bytes_only))}
        shared = git_then_curl["nixery"].shared
        for image in ("shell/curl", "shell/git"):  # the same layers, byte for byte, in the peer
            skopeo_copy(f"docker://{ours.host}/{image}:latest", f"docker://{peer.host}/{image}:latest")
        c.say(f"shell/curl served today: {served_layers} layers, {served_bytes / c.MB:.1f} MB; "
              f"{len(entries)} entries, {entry_bytes(entries) / c.MB:.1f} MB of files; "
              f"shell/git shares {len(shared)} of its layers")

        c.say("packing ...")
        layout = OciLayout(base / "oci")
        packings: dict[tuple[str, int], Packing] = {}
        sizes = {"half": first_half(entries), "full": entries, "double": copied(entries)}
        for n in [] if args.no_cold else ns:
            packings["full", n] = pack(f"curl-full/n{n}", entries, n)
        for size in [] if args.no_cold else ["half", "double"]:
            for n in sorted({ns[0], 50 if 50 in ns and not args.quick else ns[0]}):
                packings[size, n] = pack(f"curl-{size}/n{n}", sizes[size], n)
        warm_pairs: dict[tuple[int, str], tuple[Packing, Packing]] = {}
        for where in [] if args.no_warm else [x for x in args.warm_where.split(",") if x]:
            for n in ns if where == "top" else [n for n in ns if n in (10, 50)] or ns[-1:]:
                old, new = (pack(f"curl-warm/{where}-n{n}-{version}", entries, n, below=where == "below",
                                 extra=small_file("etc/app-version", f"{version}\n")) for version in ("old", "new"))
                warm_pairs[n, where] = (old, new)
        small_images = [Packing(f"small/k{k}", [tar_layer(small_file(f"small/{k}", f"{k}\n" * 64))])
                        for k in range(max(ks, default=0))]
        everything = [*packings.values(), *[p for pair in warm_pairs.values() for p in pair], *small_images]
        c.say(f"pushing {len(everything)} images to docker-registry ...")
        push_all(layout, everything, peer)

        def ref(name: str, registry: c.Daemon | c.RegistryProcess = peer) -> str:
            return f"{registry.host}/{name}:latest"

        targets = [Target(f"{size} files, {n} layers", ref(p.name), n, p.bytes, size)
                   for (size, n), p in sorted(packings.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
        before = git_then_curl["nixery, bytes only (NIXERY_LAYER_COST_MB=0)"]
        targets += [
            Target(f"shell/curl from nixery ({served_layers} layers, as served today)", ref("shell/curl", ours),
                   served_layers, served_bytes, fit=False),
            Target(f"shell/curl from nixery, bytes only ({before.curl_layers} layers, NIXERY_LAYER_COST_MB=0)",
                   ref("shell/curl", bytes_only), before.curl_layers, before.curl_bytes, fit=False),
            Target(f"shell/curl from docker-registry (the same {served_layers} layers)", ref("shell/curl"),
                   served_layers, served_bytes, fit=False),
        ]
        warm_targets = [WarmTarget(f"{n} layers held, 1 small new layer {'on top' if where == 'top' else 'below'}",
                                   ref(old.name), ref(new.name), n, len(new.layers[-1 if where == "top" else 0].data),
                                   where)
                        for (n, where), (old, new) in warm_pairs.items()]
        if not args.no_warm:
            pairs = [(label, pair, registry) for (label, pair), registry in
                     zip(git_then_curl.items(), (ours, bytes_only), strict=True)]
            pairs.insert(1, ("docker-registry", git_then_curl["nixery"], peer))  # ours, copied
            warm_targets += [
                WarmTarget(f"{label}: shell/git held, pull shell/curl ({pair.curl_layers} layers; the first "
                           f"{pair.prefix} are shell/git's first, in the same order)", ref("shell/git", registry),
                           ref("shell/curl", registry), len(pair.shared), pair.curl_only, "real")
                for label, pair, registry in pairs
            ]

        results: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]] = {}
        growth: dict[int, dict[str, list[float]]] = {}
        loads = [c.load_average()]
        # podman refuses a run root path over 50 characters: the clients' stores go under /tmp
        client_base = Path(tempfile.mkdtemp(prefix="client-layers-", dir="/tmp"))
        stack.callback(shutil.rmtree, client_base, ignore_errors=True)
        with clients_lock(), clients(client_base, wanted) as found:
            for client in found:
                c.say(f"\n{client.name} (load average {c.load_average()})")
                cold_times = {} if args.no_cold else cold(client, targets, args.runs)
                warm_times = warm(client, warm_targets, args.runs) if warm_targets else {}
                results[client.name] = (cold_times, warm_times)
                loads.append(c.load_average())
                write(report(args, targets, warm_targets, results, growth, loads, served_layers, served_bytes))
                if isinstance(client, Podman) and ks and ("full", 50) in packings:
                    c.say(f"\npodman: store size (load average {c.load_average()})")
                    many = next(t for t in targets if t.size == "full" and t.layers == 50)
                    one = next(t for t in targets if t.size == "full" and t.layers == 1)
                    growth = store_growth(client, [ref(p.name) for p in small_images], many, one, ks,
                                          args.store_runs)
                    loads.append(c.load_average())
                    write(report(args, targets, warm_targets, results, growth, loads, served_layers, served_bytes))

    shutil.rmtree(base, ignore_errors=True)
    print("\n" + write(report(args, targets, warm_targets, results, growth, loads, served_layers, served_bytes)))
    return 0


def _median(times: Sequence[float]) -> str:
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def cold_sections(names: Sequence[str], targets: Sequence[Target], results: dict[str, dict[str, list[float]]]
                  ) -> list[str]:
    """The cold table, the fit per client, and the headline: today's shell/curl against one layer."""
    out = [
        "## Cold pulls (empty client store)\n",
        c.table(["image", "layers", "MB", *names],
                [[t.label, t.layers, f"{t.bytes / c.MB:.1f}", *[_median(results[n][t.label]) for n in names]]
                 for t in targets]),
    ]
    fit_rows = []
    for name in names:
        median = {t.label: statistics.median(results[name][t.label]) for t in targets}
        f = fit([(t.bytes / c.MB, t.layers, median[t.label]) for t in targets if t.fit])
        if f is None:
            continue
        full = sorted((t.layers, median[t.label]) for t in targets if t.fit and t.size == "full")
        slope = statistics.linear_regression([n for n, _ in full], [s for _, s in full]).slope if len(full) > 1 else 0
        bandwidth = f.bandwidth
        fit_rows.append([
            name, f"{f.fixed_s:.2f}", f"{bandwidth:.0f}" if bandwidth else "-", f"{f.per_layer_s * 1000:.0f}",
            f"{f.layer_mb:.1f}" if f.layer_mb is not None else "-", f"{slope * 1000:.0f}",
        ])
    out += [
        "\n\n## Fit: time ≈ a + MB / bandwidth + N × per-layer cost\n",
        "Least squares over the cold medians of the packed images (half, full and double files). "
        "\"slope, full files only\" is the plain regression of time on N for the same files, a check on the fit.\n",
        c.table(["client", "a (s)", "bandwidth (MB/s)", "per-layer cost (ms)", "per-layer cost (MB equivalent)",
                 "slope, full files only (ms per layer)"], fit_rows),
    ]
    one = next((t for t in targets if t.size == "full" and t.layers == 1), None)
    for name in names if one is not None else []:
        median = {t.label: statistics.median(results[name][t.label]) for t in targets}
        alone = median[one.label] if one is not None else 0.0
        out.append(f"\n\n{name}: " + "; ".join(
            f"{t.label} {median[t.label]:.2f} s = {median[t.label] / alone:.2f}x the same files as "
            "one layer from docker-registry" for t in targets if not t.fit))
    return out


def report(args: argparse.Namespace, targets: Sequence[Target], warm_targets: Sequence[WarmTarget],
           results: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]],
           growth: dict[int, dict[str, list[float]]], loads: Sequence[str], served_layers: int,
           served_bytes: int) -> str:
    names = list(results)
    out = [
        f"Median seconds (min-max) of {args.runs} pulls each, in turn (in another order every repetition, "
        f"shuffled). Load averages at the start and after each client: {' → '.join(loads)}.\n",
    ]
    if any(cold_times for cold_times, _ in results.values()):
        out += cold_sections(names, targets, {name: cold_times for name, (cold_times, _) in results.items()})
    if warm_targets:
        out += [
            "\n\n## Warm pulls (the client holds the older version)\n",
            "Rows \"N layers held\": the old and new versions share N layers of the files and differ in one small "
            "layer, so each pull downloads the same few bytes. On top: the held layers are the bottom of both "
            "stacks (their chain IDs are the same), the slope is what a held layer costs. Below: the differing "
            "layer is at the bottom, so every held layer sits on another parent than in the old version.\n",
            c.table(["pull", "layers held", "MB in layers not held", *names],
                    [[w.label, w.held, f"{w.bytes / c.MB:.2f}", *[_median(results[n][1][w.label]) for n in names]]
                     for w in warm_targets]),
        ]
        held_rows = []
        for name in names:
            row = [name]
            for where in ("top", "below"):
                points = [(w.held, statistics.median(results[name][1][w.label]))
                          for w in warm_targets if w.where == where]
                slope = statistics.linear_regression(*zip(*points, strict=True)).slope if len(points) > 1 else None
                row.append(f"{slope * 1000:.1f}" if slope is not None else "-")
            held_rows.append(row)
        out += ["\n\n", c.table(["client", "cost of a held layer, new layer on top (ms, slope)",
                                   "the same, new layer below (ms, slope)"], held_rows)]
    if growth:
        rows = []
        for k, times in growth.items():
            many, one = (statistics.median(v) for v in times.values())
            labels = list(times)
            n_many = int(labels[0].split(" files, ")[1].split()[0])
            rows.append([k, _median(times[labels[0]]), _median(times[labels[1]]),
                         f"{(many - one) / (n_many - 1) * 1000:.0f}"])
        out += [
            "\n\n## podman: does a layer cost more when the store holds more?\n",
            f"K small unrelated images (one layer each) pulled first; then the same files as 50 layers and as one "
            f"layer, each removed after its pull. Median (min-max) of {args.store_runs} repetitions.\n",
            c.table(["K images held", "50 layers (s)", "1 layer (s)", "per-layer cost (ms) = (50 − 1 layer) / 49"],
                    rows),
        ]
    out.append("\n\nRaw times (seconds): " + json.dumps({
        "cold": {n: r[0] for n, r in results.items()}, "warm": {n: r[1] for n, r in results.items()},
        "store": {str(k): v for k, v in growth.items()},
        "served_today": {"layers": served_layers, "bytes": served_bytes},
    }) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
