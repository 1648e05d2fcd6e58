"""The requested packages' trees at `/` (nixery.layers.rootlinks, nixery.layers.entrypoints),
over real directory trees laid out as packages are in the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixery.layers import rootlinks
from nixery.layers.entrypoints import SSL_CERT_FILE, entry_points
from nixery.layers.rootlinks import IMAGE, LinkedPackage, link_packages


def tree(root: Path, files: dict[str, str]) -> str:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return str(root)


def by_name(packages: list[LinkedPackage], closure: list[str] | None = None) -> dict[str, tuple[str, str]]:
    points = entry_points(packages, closure or [])
    return {entry.name: (entry.kind, entry.target) for entry in points.entries}


def test_directories_of_one_package_are_one_link_and_shared_ones_are_merged(tmp_path: Path) -> None:
    curl = tree(tmp_path / "curl", {
        "bin/curl": "", "share/man/man1/curl.1": "", "share/zsh/_curl": "", "lib/libcurl.so": "",
        "nix-support/propagated": "", ".deps": "",
    })
    jq = tree(tmp_path / "jq", {"bin/jq": "", "sbin/jqd": "", "share/man/man1/jq.1": "", "share/doc/jq/README": ""})
    entries = by_name([LinkedPackage("curl", (curl,)), LinkedPackage("jq", (jq,))])
    assert entries["lib"] == ("symlink", f"{curl}/lib")
    assert entries["share"][0] == "dir"
    assert entries["share/man"][0] == "dir"
    assert entries["share/man/man1"][0] == "dir"
    assert entries["share/man/man1/curl.1"] == ("symlink", f"{curl}/share/man/man1/curl.1")
    assert entries["share/man/man1/jq.1"] == ("symlink", f"{jq}/share/man/man1/jq.1")
    assert entries["share/zsh"] == ("symlink", f"{curl}/share/zsh")  # only curl has it: one link
    assert entries["share/doc"] == ("symlink", f"{jq}/share/doc")
    assert "share/doc/jq" not in entries
    # /bin: every program of bin/ and sbin/, as before; /sbin too now
    assert entries["bin/curl"] == ("symlink", f"{curl}/bin/curl")
    assert entries["bin/jqd"] == ("symlink", f"{jq}/sbin/jqd")
    assert entries["sbin"] == ("symlink", f"{jq}/sbin")
    # Nix's bookkeeping and top-level files are not linked
    assert not any(name.startswith(("nix-support", ".deps")) for name in entries)


def test_thousands_of_files_of_one_package_are_one_link(tmp_path: Path) -> None:
    data = tmp_path / "zoneinfo"
    for i in range(40):
        (data / "usr/share/zoneinfo" / f"Area{i}").mkdir(parents=True)
        for j in range(50):
            (data / "usr/share/zoneinfo" / f"Area{i}" / f"City{j}").touch()
    shell = tree(tmp_path / "shell", {"bin/bash": "", "usr/bin/bash": ""})
    points = entry_points([LinkedPackage("shell", (shell,)), LinkedPackage("tzdata", (str(data),))], [])
    names = {entry.name: entry for entry in points.entries}
    # usr/ is the image's own directory (for /usr/bin/env), usr/share is tzdata's alone
    assert names["usr"].kind == "dir"
    assert names["usr/share"].target == f"{data}/usr/share"
    assert len(points.entries) < 30, [entry.name for entry in points.entries]


def test_the_first_package_wins_a_conflict_and_the_loser_is_reported(tmp_path: Path) -> None:
    first = tree(tmp_path / "first", {"bin/tool": "1", "etc/tool.conf": "1", "share/x/data": "1"})
    second = tree(tmp_path / "second", {"bin/tool": "2", "etc/tool.conf/part": "2", "share/x": "a file"})
    points = entry_points([LinkedPackage("first", (first,)), LinkedPackage("second", (second,))], [])
    entries = {entry.name: entry.target for entry in points.entries}
    assert entries["bin/tool"] == f"{first}/bin/tool"
    assert entries["etc/tool.conf"] == f"{first}/etc/tool.conf"
    assert entries["share/x"] == f"{first}/share/x"
    reported = {(c.path, c.kept, c.lost) for c in points.linked.conflicts}
    assert reported == {
        ("/bin/tool", "first", "second"), ("/etc/tool.conf", "first", "second"), ("/share/x", "first", "second"),
    }
    assert points.linked.conflict_count == 3
    # The other order, the other winner
    swapped = entry_points([LinkedPackage("second", (second,)), LinkedPackage("first", (first,))], [])
    assert {e.name: e.target for e in swapped.entries}["bin/tool"] == f"{second}/bin/tool"


def test_the_images_own_files_win_and_the_ca_bundle_is_not_a_conflict(tmp_path: Path) -> None:
    cacert = tree(tmp_path / "cacert", {"etc/ssl/certs/ca-certificates.crt": "CERT", "share/doc/README": ""})
    base = tree(tmp_path / "base", {"etc/passwd": "intruder:x:0:0::/:/bin/sh\n", "etc/services": "ssh 22/tcp\n"})
    points = entry_points([LinkedPackage("base", (base,)), LinkedPackage("cacert", (cacert,))], [cacert, base])
    entries = {entry.name: entry for entry in points.entries}
    assert entries["etc/passwd"].kind == "file" and b"root:x:0:0" in entries["etc/passwd"].content
    assert entries["etc/services"].target == f"{base}/etc/services"
    assert entries[SSL_CERT_FILE.lstrip("/")].target == f"{cacert}/etc/ssl/certs/ca-certificates.crt"
    assert entries["etc/ssl/certs/ca-bundle.crt"].target == f"{cacert}/etc/ssl/certs/ca-certificates.crt"
    assert [(c.path, c.kept, c.lost) for c in points.linked.conflicts] == [("/etc/passwd", IMAGE, "base")]


def test_a_requested_ca_bundle_comes_before_one_found_elsewhere_in_the_closure(tmp_path: Path) -> None:
    """SSL_CERT_FILE names the bundle of the requested (or baseline) packages, not whichever
    store path of the closure sorts first."""
    other = tree(tmp_path / "a-other", {"etc/ssl/certs/ca-certificates.crt": "OTHER"})
    mine = tree(tmp_path / "z-mine", {"etc/ssl/certs/ca-bundle.crt": "MINE"})
    points = entry_points([LinkedPackage("cacert", (mine,))], [other, mine])
    assert points.ca_bundle == f"{mine}/etc/ssl/certs/ca-bundle.crt"


def test_the_same_packages_give_the_same_entries(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"share/a/1": "", "share/b/2": "", "lib/x": ""})
    b = tree(tmp_path / "b", {"share/a/3": "", "lib/y": ""})
    packages = [LinkedPackage("a", (a,)), LinkedPackage("b", (b,))]
    assert entry_points(packages, []) == entry_points(packages, [])


def test_links_past_the_limit_are_left_out_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packages with the same directory of many files: each file is a link, up to MAX_LINKS
    (made small here: the real one needs as many files)."""
    monkeypatch.setattr(rootlinks, "MAX_LINKS", 200)
    for name in ("a", "b"):
        (tmp_path / name / "share" / "many").mkdir(parents=True)
    for i in range(200 + 10):
        (tmp_path / ("a" if i % 2 else "b") / "share" / "many" / f"f{i:06}").touch()
    linked = link_packages(
        [LinkedPackage("a", (str(tmp_path / "a"),)), LinkedPackage("b", (str(tmp_path / "b"),))], []
    )
    assert len(linked.entries) == 200
    assert linked.left_out_count == 12  # share, share/many and 10 files fit no more
    assert linked.left_out is not None and linked.left_out.startswith("/share/many/f")


def test_links_to_directories_at_the_top_of_a_package_are_followed(tmp_path: Path) -> None:
    """A package whose `bin` is a link to a directory (as some are) still has its programs in
    /bin; a top-level link to a directory (`lib64 -> lib`) is linked as it is."""
    package = Path(tree(tmp_path / "linked", {"libexec/tool/bin/tool": "", "lib/libx.so": "", "README": ""}))
    (package / "bin").symlink_to("libexec/tool/bin")
    (package / "lib64").symlink_to("lib")
    entries = by_name([LinkedPackage("linked", (str(package),))])
    assert entries["bin/tool"] == ("symlink", f"{package}/bin/tool")
    assert entries["lib64"] == ("symlink", f"{package}/lib64")
    assert "README" not in entries


def test_below_the_depth_limit_the_first_packages_directory_is_linked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rootlinks, "MAX_DEPTH", 2)
    a = tree(tmp_path / "a", {"share/deep/er/a.txt": ""})
    b = tree(tmp_path / "b", {"share/deep/er/b.txt": ""})
    linked = link_packages([LinkedPackage("a", (a,)), LinkedPackage("b", (b,))], [])
    entries = {entry.name: entry.target for entry in linked.entries}
    assert entries["share/deep/er"] == f"{a}/share/deep/er"
    assert [(c.path, c.kept, c.lost) for c in linked.conflicts] == [("/share/deep/er", "a", "b")]
