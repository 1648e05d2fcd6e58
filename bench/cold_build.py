"""Cold builds against the hardware limit, incremental builds, compression.

    .venv/bin/python bench/cold_build.py           # 3 runs (about 1.5 minutes)
    .venv/bin/python bench/cold_build.py --quick   # 1 run, no client check

Every image's store paths are built first (`nix-build`), so a cold build is
what the registry does on top of Nix: evaluate the names, ask Nix for the
closure, plan layers, then tar, gzip (isal, level 1) and hash each layer in
one pass, layers in parallel, and store them (fsync'd). The time is from the
first manifest request to its answer, on fresh storage, registry started
beforehand (and its long-running Nix evaluator with it, as on a registry that
has been running; the same builds with one nix-instantiate each are reported
too).

The images: three from bench/data/pkgs (a tiny one, and two of big files),
and, when `make debian-set` has made it, python3 of the Debian set (some
5,000 real files), where the per-file cost shows.

The limit is the same bytes through the native pipeline, on all cores:
`tar -c <closure> | pigz -1 | sha256sum` (it writes nothing to disk and
hashes only one digest, so it is a lower bound on what any registry can do).

Incremental: on the storage of the large image, images that add one package
(10 MiB or 50 MiB of compressible data) to it: only the new layer should be
compressed, so their cost should follow the new layer's size.

Compression: the total of our layers against the same closure's tar stream
through `gzip -6` (pigz -6: same format and level, faster), and `zstd -3`.
The zstd client check pushes an image recompressed with zstd (skopeo) into
docker-registry and pulls it with each client.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import common as c

LARGE = [f"scale-{i}" for i in range(201, 300)]  # 99 leaf packages: ~224 paths, ~426 MB
IMAGES = {
    "small: shell/hello": ["shell", "hello"],
    "medium: shell/scale-2/scale-61": ["shell", "scale-2", "scale-61"],
    "large: 99 scale-* packages": LARGE,
}
# Many small real files (the scale-* packages are few big ones): python3 of the Debian set
# (`make debian-set`), about 5,000 entries in 42 store paths. Skipped when the set is not there.
DEBIAN_PKGS = c.REPO / ".cache" / "debian-set"
REAL_IMAGE = "real files: python3 (Debian set)"
if (DEBIAN_PKGS / "default.nix").exists():
    IMAGES[REAL_IMAGE] = ["python3"]
PACKAGE_SETS = {REAL_IMAGE: DEBIAN_PKGS}  # the others: bench/data/pkgs
REAL_FILES = "real binaries: /usr/bin (sizes only)"
# A new image whose every name was evaluated for earlier images (of the small image's storage).
KNOWN_FIRST = ["figlet"]
KNOWN = ["figlet", "hello", "shell"]
KNOWN_LABEL = "figlet/hello/shell, after shell/hello and figlet"
# Requested all at once on fresh storage, each a new image of one name not evaluated before.
BURST = ["hello", "figlet", "cowsay", "fortune", "greet", "bash", "coreutils", "libwords"]
# Tiny images take tens of milliseconds, where the machine's other load shows most: each
# run builds them (and runs their limit) this many times, alternately.
REPEATS = {"small: shell/hello": 5}
INCREMENTAL = {
    "large + extra10m (10 MiB new)": [*LARGE, "extra10m"],
    "large + extra50m (50 MiB new)": [*LARGE, "extra50m"],
}


def image_name(packages: list[str]) -> str:
    return "/".join(packages)


def package_set(label: str) -> Path:
    return PACKAGE_SETS.get(label, c.BENCH_PKGS)


def closure_of(label: str, packages: list[str]) -> list[str]:
    return c.closure(c.nix_build(packages, package_set(label)))


def pipeline(paths: list[str], command: str) -> tuple[float, str]:
    """Seconds and output of `tar -c paths | command` (paths relative to /)."""
    relative = " ".join(shlex.quote(p.lstrip("/")) for p in sorted(paths))
    script = f"set -o pipefail; tar -cf - -C / {relative} | {command}"
    started = time.perf_counter()
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{command}: {out.stderr[-1000:]}")
    return seconds, out.stdout.strip()


@dataclass
class Build:
    seconds: float  # first manifest request to the answer
    stages: dict[str, float]  # from the registry's log
    layers: int
    created: int
    compressed: int  # bytes of the layers this build compressed
    total: int  # bytes of all the image's layers


STAGES = [("build.evaluating", "build.realising", "evaluate"),
          ("build.realising", "build.layers_planned", "realise, closure, plan"),
          ("build.layers_planned", "build.layers_compressed", "compress"),
          ("build.layers_compressed", "build.done", "store")]


def timed_build(registry: c.RegistryProcess, packages: list[str]) -> Build:
    name = image_name(packages)
    os.sync()  # the previous builds' writes are on disk: their writeback would slow this build's fsyncs
    started = time.perf_counter()
    status, _, body = c.request(registry.host, f"/v2/{name}/manifests/latest", accept=c.MANIFEST_ACCEPT)
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{name}: {status} {body[:500]!r}")
    manifest = json.loads(body)
    events: dict[str, dict] = {}
    display = "/".join(sorted(set(packages)))
    for line in registry.log().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("image") == display and str(entry.get("event", "")).startswith("build."):
                events[entry["event"]] = entry
    at = {k: datetime.fromisoformat(v["timestamp"]).timestamp() for k, v in events.items() if "timestamp" in v}
    stages = {label: at[b] - at[a] for a, b, label in STAGES if a in at and b in at}
    stored = events.get("build.layers_compressed", {})
    return Build(seconds, stages, int(stored.get("layers", 0)), int(stored.get("created", 0)),
                 int(stored.get("bytes", 0)), sum(layer["size"] for layer in manifest["layers"]))


def burst_build(storage: Path, mode: str) -> float:
    """Seconds until every BURST image is answered, by a registry evaluating in `mode`."""
    registry = c.ready_registry(storage, NIXERY_NIX_EVALUATOR=mode, NIXERY_MAX_BUILDS=str(len(BURST)))
    try:
        os.sync()
        started = time.perf_counter()
        with ThreadPoolExecutor(len(BURST)) as pool:
            answers = list(pool.map(lambda name: c.request(registry.host, f"/v2/{name}/manifests/latest",
                                                           accept=c.MANIFEST_ACCEPT), BURST))
        seconds = time.perf_counter() - started
        if any(status != 200 for status, *_ in answers):
            raise RuntimeError(f"burst: {[status for status, *_ in answers]}")
        return seconds
    finally:
        registry.stop()
        shutil.rmtree(storage, ignore_errors=True)


def burst_section(burst: dict[str, list[float]]) -> str:
    repl, process = c.Timing(burst["repl"]), c.Timing(burst["process"])
    return (
        f"\n## A burst of new images\n\n{len(BURST)} images of one name each, not evaluated before "
        f"({', '.join(BURST)}), requested at once on fresh storage (`NIXERY_MAX_BUILDS={len(BURST)}`): seconds until "
        "the last is answered. With the repl, evaluations queue for it while that is expected to be quicker than "
        "a `nix-instantiate` of their own; with `process`, each image starts one.\n\n"
        + c.table(["evaluator", "all answered s", "ratio"],
                  [["repl (default)", f"{repl.median:.3f} ({repl.spread})", f"{repl.median / process.median:.2f}"],
                   ["process", f"{process.median:.3f} ({process.spread})", "1.00"]])
        + "\n\n"
    )


def one_build(storage: Path, label: str, packages: list[str], env: dict[str, str]) -> Build:
    """A cold build on fresh storage, by a registry started for it with `env`."""
    registry = c.ready_registry(storage, pkgs=package_set(label), **env)
    try:
        return timed_build(registry, packages)
    finally:
        registry.stop()
        shutil.rmtree(storage, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run, no zstd client check")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-clients", action="store_true", help="skip the zstd client check")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.no_clients = 1, True
    started = time.time()
    c.need("nix-build", "tar", "pigz", "sha256sum")
    base = c.SCRATCH / "cold"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)

    c.say("building the store paths (nix-build) ...")
    c.nix_build(BURST)
    closures = {label: closure_of(label, pkgs) for label, pkgs in {**IMAGES, **INCREMENTAL}.items()}
    large_closure = set(closures["large: 99 scale-* packages"])
    new_paths = {label: sorted(set(closures[label]) - large_closure) for label in INCREMENTAL}
    raw = {label: c.path_size(paths) for label, paths in closures.items()}
    for paths in closures.values():  # page cache: warm for both sides
        pipeline(paths, "cat > /dev/null")

    ours: dict[str, list[Build]] = {label: [] for label in [*IMAGES, *INCREMENTAL]}
    limit: dict[str, list[float]] = {label: [] for label in [*IMAGES, *INCREMENTAL]}
    ours_zstd: dict[str, list[Build]] = {label: [] for label in IMAGES}  # NIXERY_LAYER_COMPRESSION=zstd
    ours_process: dict[str, list[Build]] = {label: [] for label in IMAGES}  # NIXERY_NIX_EVALUATOR=process
    known: list[Build] = []  # KNOWN, each on the storage of a small image's cold build
    for run in range(args.runs):
        c.say(f"run {run + 1}/{args.runs} (load average {c.load_average()})")
        for label, packages in IMAGES.items():
            storage = base / f"run{run}-{len(ours[label])}-{packages[-1]}"
            registry = c.ready_registry(storage, pkgs=package_set(label))
            try:
                build = timed_build(registry, packages)
                ours[label].append(build)
                c.say(f"  {label:34} {build.seconds:6.2f} s  {build.stages}")
                if label.startswith("small"):
                    timed_build(registry, KNOWN_FIRST)
                    known.append(timed_build(registry, KNOWN))
                    c.say(f"  {KNOWN_LABEL:34} {known[-1].seconds:6.2f} s  {known[-1].stages}")
                if label.startswith("large"):
                    for inc_label, inc_packages in INCREMENTAL.items():
                        inc = timed_build(registry, inc_packages)
                        ours[inc_label].append(inc)
                        c.say(f"  {inc_label:34} {inc.seconds:6.2f} s  created {inc.created} layers, "
                              f"{inc.compressed / c.MB:.1f} MB")
            finally:
                registry.stop()
                shutil.rmtree(storage, ignore_errors=True)
            for variant, env, builds in (("with zstd layers", {"NIXERY_LAYER_COMPRESSION": "zstd"}, ours_zstd),
                                         ("one nix-instantiate per image", {"NIXERY_NIX_EVALUATOR": "process"},
                                          ours_process)):
                storage = base / f"run{run}-{'-'.join(env.values())}-{packages[-1]}"
                build = one_build(storage, label, packages, env)
                builds[label].append(build)
                c.say(f"  {'  ' + variant:34} {build.seconds:6.2f} s, {build.total / c.MB:.1f} MB  {build.stages}")
            seconds, _ = pipeline(closures[label], "pigz -1 | sha256sum")
            limit[label].append(seconds)
            c.say(f"  {'limit':34} {seconds:6.2f} s")
            for again in range(1, REPEATS.get(label, 1)):
                build = one_build(base / f"run{run}-again{again}-{packages[-1]}", label, packages, {})
                ours[label].append(build)
                seconds, _ = pipeline(closures[label], "pigz -1 | sha256sum")
                limit[label].append(seconds)
                c.say(f"  {'  again':34} {build.seconds:6.3f} s, limit {seconds:6.3f} s")
        for inc_label in INCREMENTAL:
            seconds, _ = pipeline(new_paths[inc_label], "pigz -1 | sha256sum")
            limit[inc_label].append(seconds)

    c.say(f"a burst of {len(BURST)} new images at once ...")
    burst = {mode: [burst_build(base / f"burst-{mode}-{run}", mode) for run in range(args.runs)]
             for mode in ("repl", "process")}

    c.say("compressed sizes (gzip -6, zstd -3) ...")
    sizes = {}
    corpora = {label: closures[label] for label in IMAGES}
    corpora[REAL_FILES] = ["/usr/bin"]
    for label, paths in corpora.items():
        entry = {}
        for key, command in (("tar", "wc -c"), ("isal1", f"{shlex.quote(sys.executable)} -m isal.igzip -1 -c | wc -c"),
                             ("pigz1", "pigz -1 | wc -c"), ("gzip6", "pigz -6 | wc -c"),
                             ("zstd3", "zstd -3 -T0 -q -c | wc -c")):
            if key == "zstd3" and not c.have("zstd"):
                continue
            seconds, out = pipeline(paths, command)
            entry[key] = (seconds, int(out))
        sizes[label] = entry

    zstd_clients = "" if args.no_clients else zstd_client_check(base)
    shutil.rmtree(base, ignore_errors=True)
    body = (report(ours, limit, raw, closures, new_paths, sizes, args.runs) + known_names(known, ours)
            + evaluators(ours, ours_process, limit) + burst_section(burst)
            + zstd_builds(ours, ours_zstd, limit)
            + zstd_section(zstd_clients))
    print("\n" + body)
    if not args.no_report:
        c.write_report("cold_build", "Cold builds: nixery vs the native pipeline", body, started=started)
    return 0


def report(ours, limit, raw, closures, new_paths, sizes, runs) -> str:
    repeated = "; ".join(f"the {label.split(':')[0]} image: {runs} × {n} builds and limits, alternately"
                         for label, n in REPEATS.items())
    out = [
        "Store paths built beforehand; page cache warm for both sides. Limit: "
        "`tar -c <closure> | pigz -1 | sha256sum` (all cores, nothing written). nixery: first manifest "
        "request to the answer, on fresh storage: Nix evaluation (in the registry's long-running repl) and "
        "closure, layering, tar + gzip (isal level 1) + both digests in one pass per layer, layers in parallel "
        "on all cores, "
        f"written and fsync'd (after a `sync`, so that earlier builds' writeback does not slow them). "
        f"Median (min-max) of {runs} runs ({repeated}); stage times from the registry's log (\"store\": from the last "
        "layer compressed to the answer: the new layers' blobs and records beside the config and manifests, "
        "then the image record and layering history, each fsync'd).\n",
        "## Cold builds\n",
    ]
    rows = []
    for label in IMAGES:
        builds = ours[label]
        t = c.Timing([b.seconds for b in builds])
        lim = c.Timing(limit[label])
        stage = {k: statistics.median(b.stages.get(k, 0.0) for b in builds) for _, _, k in STAGES}
        compress = stage["compress"]
        r = t.median / lim.median
        rows.append([
            label, len(closures[label]), f"{raw[label] / c.MB:.0f}", f"{t.median:.2f} ({t.spread})",
            f"{stage['evaluate']:.2f}", f"{stage['realise, closure, plan']:.2f}", f"{compress:.2f}",
            f"{stage['store']:.3f}",
            f"{lim.median:.2f} ({lim.spread})", f"{r:.2f} {'✓' if r <= 1.0 else '✗'}",
            f"{compress / lim.median:.2f}", f"{raw[label] / c.MB / compress:.0f}" if compress else "-",
            f"{raw[label] / c.MB / lim.median:.0f}",
        ])
    out.append(c.table(
        ["image", "paths", "MB (files)", "nixery s", "evaluate s", "realise+closure+plan s", "compress s", "store s",
         "limit s", "ratio (target ≤ 1.0)", "compress phase / limit", "nixery MB/s (compress phase)",
         "limit MB/s"], rows))
    out.append("\n## An image that shares all but one layer with a stored one\n")
    out.append("Built on the storage of the large image, right after it. \"limit\" is the native pipeline over the "
               "new store paths only.\n")
    rows = []
    large = statistics.median(b.seconds for b in ours["large: 99 scale-* packages"])
    for label in INCREMENTAL:
        builds = ours[label]
        t = c.Timing([b.seconds for b in builds])
        lim = statistics.median(limit[label])
        b0 = builds[0]
        compress = statistics.median(b.stages.get("compress", 0.0) for b in builds)
        rows.append([
            label, f"{b0.layers}", f"{b0.created}", f"{b0.compressed / c.MB:.1f} of {b0.total / c.MB:.0f}",
            f"{t.median:.2f} ({t.spread})", f"{compress:.2f}", f"{lim:.2f}", f"{t.median / large:.2f}",
        ])
    out.append(c.table(["image", "layers", "layers compressed", "MB compressed (of the image's)", "nixery s",
                        "compress s", "limit (new paths) s", "time / cold build of the large image"], rows))
    out.append("\n## Compressed size\n")
    rows = []
    for label, s in sizes.items():
        tar = s["tar"][1]
        ours_bytes = ours[label][0].total if label in ours else s["isal1"][1]
        row = [label, f"{tar / c.MB:.1f}", f"{ours_bytes / c.MB:.1f} ({ours_bytes / tar:.3f})",
               f"{s['pigz1'][1] / c.MB:.1f} ({s['pigz1'][1] / tar:.3f})",
               f"{s['gzip6'][1] / c.MB:.1f} ({s['gzip6'][1] / tar:.3f})", f"{ours_bytes / s['gzip6'][1]:.3f}"]
        if "zstd3" in s:
            row += [f"{s['zstd3'][1] / c.MB:.1f} ({s['zstd3'][1] / tar:.3f})", f"{tar / c.MB / s['zstd3'][0]:.0f}"]
        row += [f"{tar / c.MB / s['pigz1'][0]:.0f}", f"{tar / c.MB / s['gzip6'][0]:.0f}"]
        rows.append(row)
    header = ["image", "tar MB", "nixery (isal -1) MB (ratio)", "pigz -1 MB (ratio)", "gzip -6 MB (ratio)",
              "nixery / gzip -6"]
    if any("zstd3" in s for s in sizes.values()):
        header += ["zstd -3 MB (ratio)", "zstd -3 -T0 MB/s"]
    header += ["pigz -1 MB/s", "pigz -6 MB/s"]
    out.append(c.table(header, rows))
    out.append(
        "\nMB/s: tar stream bytes per second of the whole pipeline on all cores, `tar | X | wc -c`. nixery: the sum "
        "of the image's layers; for /usr/bin, the same isal level 1 (`python -m isal.igzip -1`) over one stream. "
        "The scale-* packages repeat one 2 MB busybox binary, which zstd's larger window finds and gzip's 32 KB "
        "window cannot: their zstd ratio flatters zstd; /usr/bin (real binaries) is the fairer comparison.\n")
    return "\n".join(out) + "\n"


# ---- zstd -------------------------------------------------------------------------


def zstd_builds(ours: dict[str, list[Build]], ours_zstd: dict[str, list[Build]], limit: dict[str, list[float]]) -> str:
    rows = []
    for label, builds in ours_zstd.items():
        if not builds:
            continue
        gz, zs = c.Timing([b.seconds for b in ours[label]]), c.Timing([b.seconds for b in builds])
        gz_bytes, zs_bytes = ours[label][0].total, builds[0].total
        lim = statistics.median(limit[label])
        rows.append([label, f"{gz.median:.2f} ({gz.spread})", f"{zs.median:.2f} ({zs.spread})",
                     f"{zs.median / lim:.2f}", f"{gz_bytes / c.MB:.1f}", f"{zs_bytes / c.MB:.1f}",
                     f"{zs_bytes / gz_bytes:.3f}"])
    return (
        "## The registry with zstd layers (`NIXERY_LAYER_COMPRESSION=zstd`)\n\n"
        "The same cold builds with zstd level 3 layers (one thread per layer, layers in parallel), against the "
        "default gzip layers and the same limit as above.\n\n"
        + c.table(["image", "gzip layers s", "zstd layers s", "zstd / limit", "gzip layers MB", "zstd layers MB",
                   "zstd / gzip size"], rows) + "\n\n"
    )

def known_names(known: list[Build], ours: dict[str, list[Build]]) -> str:
    """The row of a new image made of names that earlier images evaluated."""
    if not known:
        return ""
    t = c.Timing([b.seconds for b in known])
    small = statistics.median(b.seconds for b in ours["small: shell/hello"])
    evaluate = statistics.median(b.stages.get("evaluate", 0.0) for b in known)
    return (
        "\n## A new image of names evaluated before\n\n"
        "On the storage of the small image's cold build, `figlet` is pulled, then the new image "
        "`figlet/hello/shell`: every name's evaluation is kept (`nixery/evaluations.py`) and every output is "
        "built, so no Nix process runs (the evaluate stage is a storage lookup).\n\n"
        + c.table(["image", "nixery s", "evaluate stage s", "layers compressed", "time / cold build of shell/hello"],
                  [[KNOWN_LABEL, f"{t.median:.3f} ({t.spread})", f"{evaluate:.3f}",
                    f"{known[0].created} of {known[0].layers}", f"{t.median / small:.2f}"]])
        + "\n"
    )


def evaluators(ours: dict[str, list[Build]], ours_process: dict[str, list[Build]],
               limit: dict[str, list[float]]) -> str:
    """The cold builds above against the same builds evaluated by one nix-instantiate each."""
    rows = []
    for label, builds in ours_process.items():
        if not builds:
            continue
        repl, process = c.Timing([b.seconds for b in ours[label]]), c.Timing([b.seconds for b in builds])
        lim = statistics.median(limit[label])
        rows.append([
            label, f"{repl.median:.3f} ({repl.spread})",
            f"{statistics.median(b.stages.get('evaluate', 0.0) for b in ours[label]):.3f}",
            f"{process.median:.3f} ({process.spread})",
            f"{statistics.median(b.stages.get('evaluate', 0.0) for b in builds):.3f}",
            f"{repl.median / lim:.2f}", f"{process.median / lim:.2f}",
        ])
    return (
        "\n## Evaluating in a long-running repl vs one nix-instantiate per image\n\n"
        "The cold builds above evaluate the image's names in the registry's `nix repl`, started (and the package "
        "set imported) when the registry starts (`nixery/nix/evaluator.py`). Here the same builds with "
        "`NIXERY_NIX_EVALUATOR=process`, which starts one `nix-instantiate` per image (Nixery's way: any Nix "
        "command costs some 40 ms to start here, and it imports the package set again each time).\n\n"
        + c.table(["image", "repl: nixery s", "repl: evaluate s", "process: nixery s", "process: evaluate s",
                   "repl / limit", "process / limit"], rows)
        + "\n"
    )


ZSTD_KNOWN = [
    ("skopeo 1.9 (containers/image 5.23)", "yes", "pulls and pushes zstd layers (`--dest-compress-format zstd`)"),
    ("podman 4.3 (containers/image 5.23)", "yes", "same library as skopeo"),
    ("containerd 1.6 / ctr", "yes", "zstd layer decompression since containerd 1.5"),
    ("docker 20.10 (dockerd's own puller)", "no", "gzip, bzip2 and xz only; zstd arrived in Docker Engine 23.0"),
]


def zstd_client_check(base: Path) -> dict[str, str]:
    """Push a zstd-compressed copy of an image into docker-registry and pull it with each client."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serving import Ctr, Docker, Podman, Skopeo  # the same client wrappers

    from tests import daemons

    results: dict[str, str] = {}
    if not (c.have("docker-registry") and c.have("skopeo")):
        return results
    c.say("zstd client check ...")
    storage = base / "zstd-storage"
    registry = c.registry(storage).start()
    peer = c.docker_registry(base / "zstd-peer").start()
    try:
        registry.manifest("shell/hello", accept=c.MANIFEST_ACCEPT)
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "--format", "oci",
             "--dest-compress-format", "zstd", "--dest-compress", f"docker://{registry.host}/shell/hello:latest",
             f"docker://{peer.host}/hello-zstd:latest"],
            check=True, capture_output=True, timeout=300,
        )
        _, _, body = c.request(peer.host, "/v2/hello-zstd/manifests/latest", accept=c.OCI_MANIFEST)
        media = {layer["mediaType"] for layer in json.loads(body)["layers"]}
        results["_media"] = ", ".join(sorted(media))
        reference = f"{peer.host}/hello-zstd:latest"
        with contextlib.ExitStack() as stack:
            clients = [Skopeo(base), Podman(base)]
            if c.have("containerd"):
                clients.append(Ctr(stack.enter_context(daemons.containerd(base / "containerd"))))
            if c.have("dockerd"):
                clients.append(Docker(stack.enter_context(daemons.dockerd(base / "docker"))))
            for client in clients:
                try:
                    client.clear(reference)
                    client.pull(reference)
                    results[client.name] = "pulled"
                except Exception as exc:  # the client's own message is the result
                    message = str(exc).split(": ", 1)[-1]  # the client's stderr
                    results[client.name] = "failed: " + " ".join(message.split())[-200:]
                finally:
                    with contextlib.suppress(Exception):
                        client.clear(reference)
    finally:
        peer.stop()
        registry.stop()
    return results


def zstd_section(measured: dict[str, str]) -> str:
    out = ["## zstd layers: which clients accept them\n",
           c.table(["client", "accepts zstd layers", "note"], ZSTD_KNOWN)]
    if measured:
        media = measured.pop("_media", "")
        out.append(f"\nMeasured here: `shell/hello` recompressed by skopeo to zstd (layers: `{media}`), pushed into "
                   "docker-registry, pulled by each client:\n")
        out.append(c.table(["client", "result"], sorted(measured.items())))
    out.append(
        "\nThe registry serves zstd layers when started with `NIXERY_LAYER_COMPRESSION=zstd` (the default stays"
        " `gzip`). Each layer is then compressed once with `zstandard` at level 3, single-threaded: layers "
        "are already compressed in parallel, and fixed parameters keep the bytes deterministic. Such images "
        "have OCI manifests only (Docker schema 2 has no zstd media type); their config is the same as with "
        "gzip (diff_ids are of the uncompressed tar). The compression is part of the layer and image cache "
        "keys, so a registry switched between the two on one storage builds the other layers anew, and "
        "storage for those layers doubles. No client advertises zstd in its Accept header, so it is a setting"
        " of the server, not a choice per client: a client that accepts only Docker schema 2 manifests, and "
        "Docker Engine before 23.0 (recognised by its User-Agent), get `404 MANIFEST_UNKNOWN` saying why "
        "instead of failing on the layers.\n")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
