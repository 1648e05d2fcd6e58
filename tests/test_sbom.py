"""SBOMs and provenance statements of built images, served through the OCI 1.1
referrers API and the referrers tag schema: real registry processes, real Nix
(the busybox set, and the Debian set for `shell/curl`), and the SBOM checked by a
real SPDX validator (spdx-tools).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import quote, unquote

import jsonschema
import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from nixery.sbom import spdx_license
from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, RegistryProcess, run
from tests.sets import require_debian_set
from tests.test_gc_live import age_everything, blob_file, collect

pytestmark = pytest.mark.nix

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SPDX = "application/spdx+json"
CYCLONEDX = "application/vnd.cyclonedx+json"
IN_TOTO = "application/vnd.in-toto+json"
UNRELATED = "sha256:" + "ab" * 32

MEDIA_TYPE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"  # RFC 6838
#: An OCI image index as image-spec 1.1 (image-index.md, descriptor.md) defines it; the
#: referrers API answers one whose entries carry their artifactType.
INDEX_SCHEMA = {
    "type": "object",
    "required": ["schemaVersion", "mediaType", "manifests"],
    "properties": {
        "schemaVersion": {"const": 2},
        "mediaType": {"const": OCI_INDEX},
        "manifests": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["mediaType", "digest", "size", "artifactType"],
                "properties": {
                    "mediaType": {"type": "string", "pattern": MEDIA_TYPE},
                    "digest": {"type": "string", "pattern": r"^sha256:[a-f0-9]{64}$"},
                    "size": {"type": "integer", "minimum": 0},
                    "artifactType": {"type": "string"},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    process = RegistryProcess(tmp_path_factory.mktemp("sbom") / "storage", env={"NIXERY_BUNDLED_SET": "busybox"})
    process.start()
    yield process
    process.stop()


def referrers(registry: RegistryProcess, name: str, digest: str, query: str = "") -> tuple[dict, dict]:
    status, headers, body = registry.request(f"/v2/{name}/referrers/{digest}{query}", accept=OCI_INDEX)
    assert status == 200, (status, body[:500])
    assert headers["Content-Type"] == OCI_INDEX
    index = json.loads(body)
    jsonschema.validate(index, INDEX_SCHEMA)
    return index, headers


def blob(registry: RegistryProcess, name: str, digest: str) -> bytes:
    status, _, body = registry.request(f"/v2/{name}/blobs/{digest}", accept=None)
    assert status == 200, (digest, status)
    return body


def attached_document(registry: RegistryProcess, name: str, subject: str, artifact_type: str) -> tuple[dict, bytes]:
    """The artifact manifest of `artifact_type` about `subject`, and the document it carries."""
    index, _ = referrers(registry, name, subject)
    entry = next(e for e in index["manifests"] if e["artifactType"] == artifact_type)
    digest, manifest = registry.manifest(name, entry["digest"], accept=OCI_MANIFEST)
    assert digest == entry["digest"]
    assert manifest["artifactType"] == artifact_type
    assert manifest["subject"]["digest"] == subject
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert blob(registry, name, manifest["config"]["digest"]) == b"{}"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == artifact_type
    return manifest, blob(registry, name, layer["digest"])


def image_store_paths(registry: RegistryProcess, name: str, manifest: dict) -> set[str]:
    """Every store path in the image's layers (read from the tarballs, not from the registry's record)."""
    paths = set()
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob(registry, name, layer["digest"])))) as tar:
            for member in tar.getnames():
                if match := re.match(r"^/?(nix/store/[^/]+)", member):
                    paths.add("/" + match[1])
    return paths


def validated_spdx(document: bytes, directory: Path) -> dict:
    path = directory / "sbom.spdx.json"
    path.write_bytes(document)
    problems = validate_full_spdx_document(parse_file(str(path)))
    assert problems == [], [problem.validation_message for problem in problems]
    return json.loads(document)


def validated_cyclonedx(document: bytes) -> dict:
    problem = JsonStrictValidator(SchemaVersion.V1_5).validate_str(document.decode())
    assert problem is None, problem
    return json.loads(document)


def test_the_sbom_of_each_manifest_validates_and_lists_every_store_path(registry, tmp_path: Path) -> None:
    name = "shell/hello"
    docker_digest, manifest = registry.manifest(name)
    oci_digest, _ = registry.manifest(name, accept=OCI_MANIFEST)
    assert docker_digest != oci_digest
    sboms = {}
    for subject in (docker_digest, oci_digest):
        index, _ = referrers(registry, name, subject)
        assert sorted(entry["artifactType"] for entry in index["manifests"]) == sorted([SPDX, CYCLONEDX, IN_TOTO])
        artifact, sboms[subject] = attached_document(registry, name, subject, SPDX)
        assert artifact["subject"]["mediaType"] == (DOCKER_MANIFEST if subject == docker_digest else OCI_MANIFEST)
    assert sboms[docker_digest] == sboms[oci_digest], "one SBOM, shared by both formats' artifact manifests"

    sbom = validated_spdx(sboms[docker_digest], tmp_path)
    packages = {p["packageFileName"]: p for p in sbom["packages"] if "packageFileName" in p}
    assert set(packages) == image_store_paths(registry, name, manifest)
    hello = next(p for path, p in packages.items() if re.search(r"-hello-[0-9]", path))
    assert (hello["name"], hello["versionInfo"]) == ("hello", re.search(r"-hello-(.*)$", hello["packageFileName"])[1])
    # DEPENDS_ON follows the store references: `nix-store -q --references` of each path.
    ids = {p["SPDXID"]: p.get("packageFileName") for p in sbom["packages"]}
    depends = {
        (ids[r["spdxElementId"]], ids[r["relatedSpdxElement"]])
        for r in sbom["relationships"] if r["relationshipType"] == "DEPENDS_ON"
    }
    expected = set()
    for path in packages:
        refs = subprocess.run(["nix-store", "-q", "--references", path], capture_output=True, text=True, check=True)
        expected |= {(path, ref) for ref in refs.stdout.split() if ref != path}
    assert depends == expected
    assert "busybox" in sbom["creationInfo"]["comment"] and "revision" in sbom["creationInfo"]["comment"]

    # The same facts as CycloneDX 1.5, valid by its JSON schema.
    _, cyclonedx_bytes = attached_document(registry, name, oci_digest, CYCLONEDX)
    cyclonedx = validated_cyclonedx(cyclonedx_bytes)
    components = {c["bom-ref"]: c for c in cyclonedx["components"]}
    assert set(components) == set(packages)
    assert all((components[p]["name"], components[p].get("version")) == (packages[p]["name"],
               packages[p].get("versionInfo")) for p in packages)
    assert {(d["ref"], ref) for d in cyclonedx["dependencies"] for ref in d["dependsOn"] if d["ref"] != "image"} \
        == expected


def test_the_provenance_names_the_package_set_the_names_and_the_derivations(registry) -> None:
    name = "figlet/hello"
    docker_digest, _ = registry.manifest(name)
    oci_digest, _ = registry.manifest(name, accept=OCI_MANIFEST)
    _, document = attached_document(registry, name, oci_digest, IN_TOTO)
    statement = json.loads(document)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects == {d.split(":")[1] for d in (docker_digest, oci_digest)}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["packages"] == ["figlet", "hello"]
    assert "busybox" in definition["internalParameters"]["packageSet"]["source"]
    assert definition["internalParameters"]["packageSet"]["revision"]
    for dependency in definition["resolvedDependencies"]:
        assert dependency["uri"].startswith("file:///nix/store/") and dependency["uri"].endswith(".drv")
    assert statement["predicate"]["runDetails"]["builder"]["version"]["nixery-py"]


def test_referrers_of_an_unrelated_digest_are_an_empty_index_and_a_bad_digest_is_refused(registry) -> None:
    index, _ = referrers(registry, "shell", UNRELATED)
    assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    status, _, body = registry.request("/v2/shell/referrers/sha256:nothex", accept=None)
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"


def test_artifact_type_filtering(registry) -> None:
    digest, _ = registry.manifest("hello")
    everything, headers = referrers(registry, "hello", digest)
    assert "OCI-Filters-Applied" not in headers
    for artifact_type in (SPDX, CYCLONEDX, IN_TOTO):
        filtered, headers = referrers(registry, "hello", digest, f"?artifactType={quote(artifact_type, safe='')}")
        assert headers["OCI-Filters-Applied"] == "artifactType"
        assert filtered["manifests"] == [e for e in everything["manifests"] if e["artifactType"] == artifact_type]
        assert len(filtered["manifests"]) == 1
        # As curl users write it: the `+` unencoded.
        assert referrers(registry, "hello", digest, f"?artifactType={artifact_type}")[0] == filtered
    none, _ = referrers(registry, "hello", digest, "?artifactType=application/vnd.example")
    assert none["manifests"] == []


def test_a_repeated_artifact_type_keeps_each_and_an_empty_one_filters_nothing(registry) -> None:
    """`?artifactType=SPDX&artifactType=IN_TOTO` answered the SPDX entry alone (the first value only),
    saying the filter was applied; `?artifactType=` (a script's unset variable) answered no entries
    at all. Now a repeat keeps the entries of each type, and an empty value is no filter."""
    digest, _ = registry.manifest("hello")
    everything, _ = referrers(registry, "hello", digest)
    both = f"?artifactType={quote(SPDX, safe='')}&artifactType={quote(IN_TOTO, safe='')}"
    filtered, headers = referrers(registry, "hello", digest, both)
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert filtered["manifests"] == [e for e in everything["manifests"] if e["artifactType"] in (SPDX, IN_TOTO)]
    assert len(filtered["manifests"]) == 2
    for empty in ("?artifactType=", "?artifactType=&artifactType="):
        unfiltered, headers = referrers(registry, "hello", digest, empty)
        assert unfiltered == everything and "OCI-Filters-Applied" not in headers, empty
    # an empty value beside a real one: the real one filters
    spdx_only, _ = referrers(registry, "hello", digest, f"?artifactType=&artifactType={quote(SPDX, safe='')}")
    assert [e["artifactType"] for e in spdx_only["manifests"]] == [SPDX]


def test_the_referrers_tag_schema_serves_the_same_index(registry) -> None:
    digest, _ = registry.manifest("hello")
    index, _ = referrers(registry, "hello", digest)
    tag = digest.replace(":", "-")
    for method in ("GET", "HEAD"):
        status, headers, body = registry.request(f"/v2/hello/manifests/{tag}", method=method, accept=OCI_INDEX)
        assert status == 200 and headers["Content-Type"] == OCI_INDEX
        if method == "GET":
            assert json.loads(body) == index
            assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    status, _, body = registry.request(f"/v2/hello/manifests/{UNRELATED.replace(':', '-')}", accept=OCI_INDEX)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_the_referrers_index_served_under_its_tag_is_served_by_its_digest_too(registry) -> None:
    """The referrers tag's index came with a Docker-Content-Digest that named nothing: a client that
    resolves a tag and then fetches the manifest by the digest it was given (containerd, oras)
    got 404 MANIFEST_UNKNOWN for the document it had just been shown."""
    digest, _ = registry.manifest("hello", accept=OCI_MANIFEST)
    tag = digest.replace(":", "-")
    status, headers, _ = registry.request(f"/v2/hello/manifests/{tag}", method="HEAD", accept=OCI_INDEX)
    assert status == 200, headers
    resolved = headers["Docker-Content-Digest"]
    for name in ("hello", "shell/hello"):
        for method in ("GET", "HEAD"):
            path = f"/v2/{name}/manifests/{resolved}"
            status, headers, body = registry.request(path, method=method, accept=OCI_INDEX)
            assert status == 200, (name, method, body[:300])
            assert headers["Content-Type"] == OCI_INDEX and headers["Docker-Content-Digest"] == resolved
            if method == "GET":
                assert "sha256:" + hashlib.sha256(body).hexdigest() == resolved
                assert json.loads(body) == referrers(registry, "hello", digest)[0]
    # Stored once, not on every request for the tag: a touch (a write, on S3 three requests) per
    # answer would make a read that clients repeat on each pull cost storage writes.
    stored = registry.storage / "blobs" / "sha256" / resolved[7:9] / resolved[7:]
    os.utime(stored, (1_000_000_000, 1_000_000_000))
    assert registry.request(f"/v2/hello/manifests/{tag}", accept=OCI_INDEX)[0] == 200
    assert stored.stat().st_mtime == 1_000_000_000


def test_a_malformed_referrers_or_signature_tag_is_no_manifest_not_the_image(registry) -> None:
    """`sha256-<hex>` with a digit too few or too many, in upper case, `.sig.sig`, or `sha256-` alone
    fell through to an ordinary tag, and the bundled set answers any tag with the image: a client
    asking for a referrers index or a signature got the image's manifest (200). Now 404 MANIFEST_UNKNOWN,
    saying what such a tag is, as for a well-formed one that names nothing."""
    digest, _ = registry.manifest("hello")
    hex_digits = digest.removeprefix("sha256:")
    for tag in (f"sha256-{hex_digits[:-1]}", f"sha256-{hex_digits}0", f"sha256-{hex_digits.upper()}",
                f"SHA256-{hex_digits}", f"sha256-{hex_digits}.sig.sig", f"sha256-{hex_digits[:10]}.sig", "sha256-"):
        for accept in (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST):
            for method in ("HEAD", "GET"):  # the GET's body is read below
                status, _, body = registry.request(f"/v2/hello/manifests/{tag}", method=method, accept=accept)
                assert status == 404, (tag, accept, method, status, body[:300])
            error = json.loads(body)["errors"][0]
            assert error["code"] == "MANIFEST_UNKNOWN" and "64 lower-case hex digits" in error["message"], error
    # a tag that only looks alike is still a tag of the package set
    assert registry.request("/v2/hello/manifests/sha512-v1", accept=DOCKER_MANIFEST)[0] == 200


def test_the_image_page_and_inspect_answer_an_attachment_tag_as_the_api_does(registry) -> None:
    """`/images/hello?tag=sha256-bad` (and `.json`, and `nixery inspect hello:sha256-bad`) showed the
    image as if the tag named it, while the API answers that tag 404 MANIFEST_UNKNOWN. Now the page and
    its JSON are 404 with the API's message, and inspect says it; so for a well-formed attachment tag,
    which names an image's documents, not an image."""
    digest, _ = registry.manifest("hello")
    hex_digits = digest.removeprefix("sha256:")
    assert registry.request("/images/hello?tag=latest", accept="text/html")[0] == 200
    for tag in ("sha256-bad", f"SHA256-{hex_digits}", f"sha256-{hex_digits}.sig.sig", "sha256-" + "0" * 200):
        _, _, body = registry.request(f"/v2/hello/manifests/{tag}", accept=OCI_MANIFEST)
        said = json.loads(body)["errors"][0]
        assert said["code"] == "MANIFEST_UNKNOWN", said
        status, _, body = registry.request(f"/images/hello.json?tag={tag}", accept="application/json")
        assert status == 404 and json.loads(body)["errors"][0] == said, (tag, status, body[:300])
        status, _, page = registry.request(f"/images/hello?tag={tag}", accept="text/html")
        assert status == 404 and b"64 lower-case hex digits" in page and b"Digest</dt>" not in page, (tag, status)
        shown = run([sys.executable, "-m", "nixery", "inspect", "--registry", "http://127.0.0.1:9", f"hello:{tag}"],
                    check=False)
        assert (shown.returncode, shown.stdout) == (1, "") and shown.stderr == f"nixery: {said['message']}\n", shown
    # A well-formed one names the documents attached to a manifest: 404 too, saying which manifest.
    for tag in (f"sha256-{hex_digits}", f"sha256-{hex_digits}.sig"):
        status, _, body = registry.request(f"/images/hello.json?tag={tag}", accept="application/json")
        error = json.loads(body)["errors"][0]
        assert status == 404 and error["code"] == "MANIFEST_UNKNOWN" and digest in error["message"], (tag, body)
        assert registry.request(f"/images/hello?tag={tag}", accept="text/html")[0] == 404


def test_no_image_is_built_under_an_attachment_tag(registry, tmp_path: Path) -> None:
    """`POST /builds` (and `nixery build`, and `--local`) with the tag `sha256-bad` built the image
    under a tag the registry then answers 404 for (pull, page): a build no one could use. Now it is
    refused at once, 400 TAG_INVALID, saying why; a declared image's tag likewise (test_declarations).
    The package search under such a tag, whose Build buttons build under it, is refused alike: it
    answered 200 with buttons that could only fail."""
    for tag in ("sha256-bad", "sha256-" + "a" * 64, "SHA256-x.sig"):
        status, _, body = registry.request(f"/packages?q=hello&format=json&tag={tag}", accept="application/json")
        error = json.loads(body)["errors"][0]
        assert status == 400 and error["detail"]["kind"] == "TAG_INVALID", (tag, status, error)
        assert registry.request(f"/packages?q=hello&tag={tag}", accept="text/html")[0] == 400, tag
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
        try:
            connection.request("POST", "/builds", body=json.dumps({"image": "hello", "tag": tag}),
                               headers={"Content-Type": "application/json", "Accept": "application/json"})
            response = connection.getresponse()
            status, error = response.status, json.loads(response.read())["errors"][0]
        finally:
            connection.close()
        assert status == 400 and error["detail"]["kind"] == "TAG_INVALID", (tag, status, error)
        assert "names the documents attached to a manifest" in error["message"], error
        remote = run([sys.executable, "-m", "nixery", "build", "--registry", registry.url, "--tag", tag, "hello"],
                     check=False)
        assert remote.returncode == 1 and "cannot build under the tag" in remote.stderr, remote
    local = run([sys.executable, "-m", "nixery", "build", "--local", "hello:sha256-bad"], check=False, env_extra={
        "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox"})
    assert local.returncode == 1 and "cannot build under the tag 'sha256-bad'" in local.stderr, local


def test_two_registries_make_the_same_sbom(tmp_path: Path) -> None:
    """Two fresh registries (the same history: none) make the same image and the same documents."""
    one, other = (RegistryProcess(tmp_path / name, env={"NIXERY_BUNDLED_SET": "busybox"}) for name in "ab")
    try:
        digest, _ = one.start().manifest("figlet")
        assert other.start().manifest("figlet")[0] == digest
        assert referrers(other, "figlet", digest)[0] == referrers(one, "figlet", digest)[0]
    finally:
        one.stop()
        other.stop()


def test_an_sbom_pulled_by_digest_after_its_document_was_lost_is_made_again(tmp_path: Path) -> None:
    """An SBOM is fetched by its manifest's digest (from the referrers index). When the document's
    blob was lost, that was 404 until the image was pulled by tag; now the image and its documents
    are built again (the same bytes) and the SBOM is served."""
    storage = tmp_path / "storage"
    registry = RegistryProcess(storage, env={"NIXERY_BUNDLED_SET": "busybox"}).start()
    try:
        digest, _ = registry.manifest("fortune")
        sbom, document = attached_document(registry, "fortune", digest, SPDX)
        index, _ = referrers(registry, "fortune", digest)
        sbom_digest = next(entry["digest"] for entry in index["manifests"] if entry["artifactType"] == SPDX)
        registry.stop()
        blob_file(storage, sbom["layers"][0]["digest"]).unlink()
        registry.start()
        assert registry.manifest("fortune", sbom_digest, accept=OCI_MANIFEST)[1] == sbom
        assert blob(registry, "fortune", sbom["layers"][0]["digest"]) == document
    finally:
        registry.stop()


def test_gc_keeps_the_sbom_with_its_image_and_removes_it_with_it(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    registry = RegistryProcess(storage, env={"NIXERY_BUNDLED_SET": "busybox"}).start()
    try:
        digest, _ = registry.manifest("fortune")
        index, _ = referrers(registry, "fortune", digest)
        sbom, _ = attached_document(registry, "fortune", digest, SPDX)
        kept = [entry["digest"] for entry in index["manifests"]] + [sbom["layers"][0]["digest"]]
        assert "removed 0 images" in collect(storage)  # the image is in use: so are its documents
        assert all(blob_file(storage, d).exists() for d in kept)
        assert referrers(registry, "fortune", digest)[0] == index

        age_everything(storage)
        assert "removed 1 image and" in collect(storage)
        assert not any(blob_file(storage, d).exists() for d in kept)
        assert not list((storage / "meta").glob("referrers/*/*")), "no key leads to the collected image"
        assert not list((storage / "meta").glob("manifests/*/*")), "no manifest digest leads to it either"
        for _ in range(100):  # the registry reads gc's note within a poll
            if referrers(registry, "fortune", digest)[0]["manifests"] == []:
                break
            time.sleep(0.1)
        assert referrers(registry, "fortune", digest)[0]["manifests"] == []
    finally:
        registry.stop()


def test_the_debian_sbom_names_curl_with_its_debian_version_and_license(tmp_path: Path) -> None:
    """curl, and iproute2 for its libbpf1 (a package whose version has an epoch its changelog lacks)."""
    image = "shell/curl/iproute2"
    debian = require_debian_set()
    registry = RegistryProcess(tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "debian"}).start()
    try:
        digest, manifest = registry.manifest(image)
        _, document = attached_document(registry, image, digest, SPDX)
        _, cyclonedx = attached_document(registry, image, digest, CYCLONEDX)
        store_paths = image_store_paths(registry, image, manifest)
    finally:
        registry.stop()
    sbom = validated_spdx(document, tmp_path)
    # Versions as Debian's own control files say them, from the .deb files the set was made from.
    nix_file = (debian / "x86_64-linux.nix").read_text()
    debs = Path(re.search(r'debDir = "([^"]+)"', nix_file)[1])
    imported = r'^\s*"?([^"\s]+)"? = lib\.importDeb \{ path = /\. \+ "\$\{debDir\}/([^"]+)"'
    deb_files = dict(re.findall(imported, nix_file, re.MULTILINE))

    def control(package: str, field: str = "Version") -> str:
        found = subprocess.run(["dpkg-deb", "-f", str(debs / deb_files[package]), field],
                               capture_output=True, text=True, check=True)
        return found.stdout.strip()

    (curl,) = [p for p in sbom["packages"] if p["name"] == "curl" and "packageFileName" in p]
    assert curl["versionInfo"] == control("curl")
    assert curl["licenseDeclared"] == "curl"
    # "License: Sleepycat and BSD-3-clause": names SPDX has that are not Debian's own short names.
    (libdb,) = [p for p in sbom["packages"] if p["name"] == "libdb5.3"]
    assert libdb["licenseDeclared"] == "Sleepycat AND BSD-3-Clause" and "licenseComments" not in libdb
    (curl_component,) = [c for c in validated_cyclonedx(cyclonedx)["components"] if c["name"] == "curl"]
    assert curl_component["version"] == curl["versionInfo"]
    assert curl_component["licenses"] == [{"expression": "curl"}]
    # Every Debian package of the image, as its control file says it: epochs (zlib1g 1:1.2.13...,
    # and libbpf1, whose changelog leaves its epoch out), `~` (libssl3 ...~deb12u2), and the
    # architecture: `all` for ca-certificates (every image's CA bundle) and the like.
    purls = [ref["referenceLocator"] for p in sbom["packages"] for ref in p.get("externalRefs", ())]
    assert len(purls) >= 30 and any("~" in purl for purl in purls)
    for purl in purls:
        name, version, arch = re.fullmatch(r"pkg:deb/debian/([^@]+)@([^?]+)\?arch=([a-z0-9]+)", purl).groups()
        assert (unquote(version), arch) == (control(name), control(name, "Architecture")), purl
    by_name = {purl.split("@")[0].removeprefix("pkg:deb/debian/"): purl for purl in purls}
    assert re.fullmatch(r"pkg:deb/debian/libbpf1@1:[^:?]+\?arch=amd64", by_name["libbpf1"])  # the epoch, unencoded
    assert by_name["ca-certificates"].endswith("?arch=all")
    (libbpf,) = [p for p in sbom["packages"] if p["name"] == "libbpf1"]
    assert libbpf["versionInfo"] == control("libbpf1") and libbpf["versionInfo"].startswith("1:")
    assert {p["packageFileName"] for p in sbom["packages"] if "packageFileName" in p} == store_paths


def test_the_arm64_debian_sbom_gives_each_package_its_own_architecture(tmp_path: Path) -> None:
    """The arm64 set is built by the same build-deb.sh (its loader and multiarch directory swapped),
    so it records each .deb's control file too: ca-certificates is `arch=all` in an arm64 image as in
    an amd64 one, and the packages built for arm64 say arm64, with the epoch their control file has."""
    debian = require_debian_set("aarch64-linux.nix")
    image = "arm64/shell/curl"
    registry = RegistryProcess(tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "debian"}).start()
    try:
        digest, _ = registry.manifest(image)
        _, document = attached_document(registry, image, digest, SPDX)
    finally:
        registry.stop()
    nix_file = (debian / "aarch64-linux.nix").read_text()
    imported = r'^\s*"?([^"\s]+)"? = lib\.importDeb \{ path = /\. \+ "\$\{debDir\}/([^"]+)"'
    deb_architectures = {  # the set's .deb files (its amd64 ones only run the build: patchelf)
        name: arch for name, file in re.findall(imported, nix_file, re.MULTILINE)
        if (arch := file.rsplit("_", 1)[1].removesuffix(".deb")) != "amd64"
    }
    purls = [ref["referenceLocator"] for p in validated_spdx(document, tmp_path)["packages"]
             for ref in p.get("externalRefs", ())]
    by_name = {purl.split("@")[0].removeprefix("pkg:deb/debian/"): purl for purl in purls}
    assert len(by_name) >= 20 and by_name["ca-certificates"].endswith("?arch=all")
    assert by_name["curl"].endswith("?arch=arm64") and re.search(r"/zlib1g@1:", by_name["zlib1g"])
    for name, purl in by_name.items():
        assert purl.endswith(f"?arch={deb_architectures[name]}"), purl


@pytest.mark.parametrize(("debian", "spdx"), [
    ("GPL-2+ or Artistic", "GPL-2.0-or-later OR Artistic-1.0-Perl"),  # Debian's short names
    ("Expat", "MIT"),
    ("LGPL-2.1", "LGPL-2.1-only"),
    ("GFDL-NIV-1.3+", "GFDL-1.3-no-invariants-or-later"),
    ("BSD-3-clause", "BSD-3-Clause"),  # SPDX's names, in any case
    ("Sleepycat and BSD-3-clause", "Sleepycat AND BSD-3-Clause"),
    ("Unlicense or MIT", "Unlicense OR MIT"),
    ("BSL-1.0", "BSL-1.0"),
    ("GPL-2.0+", "GPL-2.0-or-later"),  # a deprecated SPDX identifier, as SPDX writes it now
    ("(GPL-2+ or Artistic) and MIT", "(GPL-2.0-or-later OR Artistic-1.0-Perl) AND MIT"),  # grouping kept
    ("MIT/X11", None),  # no SPDX identifier: NOASSERTION
    ("GPL-3+ or Less", None),
    ("GPL-2+ with OpenSSL exception", None),
    ("GPL-2+ or Artistic, and MIT", None),  # DEP-5's comma grouping is not translated
    ("GPL-2+ or", None),
    ("Net-SNMP", None),  # license-expression maps it to a LicenseRef the document would not define
    ("LicenseRef-scancode-3com-microcode", None),
    ("( )", None),  # malformed: NOASSERTION, not a failed build
    ("( \t OR DocumentRef-a:LicenseRef-b", None),
])
def test_debian_licenses_in_spdx_terms(debian: str, spdx: str | None) -> None:
    assert spdx_license(debian) == spdx


def test_nixery_inspect_sbom_and_the_image_page_give_the_sbom(registry, tmp_path: Path) -> None:
    digest, _ = registry.manifest("shell/hello")
    _, expected = attached_document(registry, "shell/hello", digest, SPDX)
    printed = run([sys.executable, "-m", "nixery", "inspect", "--registry", registry.url, "--sbom", "shell/hello"])
    assert printed.stdout.encode() == expected
    validated_spdx(printed.stdout.encode(), tmp_path)

    status, _, body = registry.request("/images/shell/hello.json", accept="application/json")
    assert status == 200
    attached = {one["artifactType"]: one for one in json.loads(body)["attached"]}
    assert set(attached) == {SPDX, CYCLONEDX, IN_TOTO}
    status, _, page = registry.request("/images/shell/hello", accept="text/html")
    assert status == 200
    sbom_link = f'href="/v2/shell/hello/blobs/{attached[SPDX]["document"]}"'
    assert sbom_link.encode() in page and f'href="/v2/shell/hello/referrers/{digest}"'.encode() in page
    assert blob(registry, "shell/hello", attached[SPDX]["document"]) == expected


@pytest.fixture(scope="module")
def two_platforms(tmp_path_factory: pytest.TempPathFactory):
    process = RegistryProcess(
        tmp_path_factory.mktemp("platforms") / "storage",
        env={"NIXERY_BUNDLED_SET": "busybox", "NIXERY_PLATFORMS": "linux/amd64,linux/arm64"},
    )
    process.start()
    yield process
    process.stop()


def test_each_platform_manifest_of_an_index_has_its_own_sbom(two_platforms: RegistryProcess) -> None:
    registry = two_platforms
    index_digest, index = registry.manifest("hello", accept=OCI_INDEX)
    sboms = {}
    for entry in index["manifests"]:
        _, document = attached_document(registry, "hello", entry["digest"], SPDX)
        sboms[entry["platform"]["architecture"]] = json.loads(document)
    assert referrers(registry, "hello", index_digest)[0]["manifests"] == []  # the index itself has none
    # The image page linked the referrers of the index (an empty list): now those of the manifest
    # its documents are attached to, the default platform's, which the JSON names.
    status, _, body = registry.request("/images/hello.json", accept="application/json")
    image = json.loads(body)
    assert status == 200 and image["digest"] == index_digest and image["attached_to"] != index_digest
    listed, _ = referrers(registry, "hello", image["attached_to"])
    assert {e["digest"] for e in listed["manifests"]} == {one["manifest"] for one in image["attached"]} != set()
    page = registry.request("/images/hello", accept="text/html")[2].decode()
    assert f'href="/v2/hello/referrers/{image["attached_to"]}"' in page
    assert f'/referrers/{index_digest}"' not in page
    assert set(sboms) == {"amd64", "arm64"}
    for arch, sbom in sboms.items():
        assert sbom["name"] in (f"hello ({arch})", f"{arch}/hello ({arch})")  # as the platform's record is named
    paths = {
        arch: {p["packageFileName"] for p in sbom["packages"] if "packageFileName" in p} for arch, sbom in sboms.items()
    }
    assert paths["amd64"] and paths["arm64"] and not paths["amd64"] & paths["arm64"]


def test_nixery_inspect_sbom_says_which_platform_and_takes_one(two_platforms: RegistryProcess) -> None:
    """`nixery inspect --sbom NAME` of an image of several platforms printed the default platform's
    SBOM without a word of which platform it is for, and there was no way to ask for another's.
    Now stderr names the platform (stdout is the SBOM alone, for a tool it is piped into), and
    `--platform linux/arm64` (or `arm64`) prints that platform's."""
    registry = two_platforms
    _, index = registry.manifest("cowsay", accept=OCI_INDEX)
    expected = {entry["platform"]["architecture"]: attached_document(registry, "cowsay", entry["digest"], SPDX)[1]
                for entry in index["manifests"]}

    # The image's JSON lists each platform's documents, as the referrers API does.
    image = json.loads(registry.request("/images/cowsay.json", accept="application/json")[2])
    for one in image["platforms"]:
        listed, _ = referrers(registry, "cowsay", one["attached_to"])
        assert {e["digest"] for e in listed["manifests"]} == {doc["manifest"] for doc in one["attached"]} != set()

    def inspect(*args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "nixery", "inspect", "--registry", registry.url, *args], check=False)

    default = inspect("--sbom", "cowsay")
    assert default.returncode == 0 and default.stdout.encode() == expected["amd64"], default.stderr
    assert default.stderr == ("nixery: the SBOM of linux/amd64, the default platform; "
                              "the image is also for linux/arm64 (--platform linux/arm64)\n")
    for platform in ("linux/arm64", "arm64", "linux/amd64"):
        chosen = inspect("--sbom", "--platform", platform, "cowsay")
        arch = platform.removeprefix("linux/")
        assert (chosen.returncode, chosen.stderr) == (0, "") and chosen.stdout.encode() == expected[arch], chosen
        assert json.loads(chosen.stdout)["name"].endswith(f"cowsay ({arch})")
    missing = inspect("--sbom", "--platform", "linux/riscv64", "cowsay")
    assert (missing.returncode, missing.stdout) == (1, ""), missing
    assert missing.stderr == "nixery: cowsay has no image for linux/riscv64: it is for linux/amd64, linux/arm64\n"
    # An image of one platform: nothing to say, and no other platform to choose.
    arm64_only = inspect("--sbom", "arm64/cowsay")
    assert arm64_only.returncode == 0 and arm64_only.stderr == "", arm64_only
    assert json.loads(arm64_only.stdout)["name"].endswith("(arm64)")
    assert inspect("--sbom", "--platform", "linux/amd64", "arm64/cowsay").returncode == 1
    # The option only chooses an SBOM: the layers (and --json) show every platform already.
    alone = inspect("--platform", "linux/arm64", "cowsay")
    assert alone.returncode == 2 and "--platform chooses whose SBOM --sbom prints" in alone.stderr, alone
    assert "--platform OS/ARCH" in " ".join(inspect("--help").stdout.split())


def test_a_path_the_image_holds_outside_its_closure_is_listed_as_such(tmp_path: Path) -> None:
    """A stored layer the image reuses whole may hold paths of another image's closure
    (`CostModel.takes_stored_layer`): they are in the image, so the SBOM lists them, said to be
    outside the closure and with no dependencies claimed."""
    from nixery.closure import ClosureGraph
    from nixery.sbom import ImageFacts, cyclonedx_document, read_store_paths, spdx_document

    curl, libc = "/nix/store/" + "a" * 32 + "-curl-7.88.1", "/nix/store/" + "b" * 32 + "-libc-2.36"
    other = "/nix/store/" + "c" * 32 + "-libcurl-gnutls-7.88.1"
    graph = ClosureGraph.from_mapping({curl: {"size": 1, "refs": [libc]}, libc: {"size": 1, "refs": []}})
    facts = ImageFacts("shell/curl", "amd64", "path /srv/pkgs", "r1", "sha256:" + "0" * 64, ["curl"])
    store = read_store_paths(graph.nodes, [other])
    assert read_store_paths(graph.nodes, [other, other]) == store  # brought by two reused layers: listed once
    spdx = validated_spdx(spdx_document(facts, graph, store), tmp_path)
    packages = {p["packageFileName"]: p for p in spdx["packages"] if "packageFileName" in p}
    assert set(packages) == {curl, libc, other}
    assert "not in its closure" in packages[other]["comment"] and "comment" not in packages[curl]
    contains = {r["relatedSpdxElement"] for r in spdx["relationships"] if r["relationshipType"] == "CONTAINS"}
    assert packages[other]["SPDXID"] in contains
    depends = [r for r in spdx["relationships"] if r["relationshipType"] == "DEPENDS_ON"]
    assert [(r["spdxElementId"], r["relatedSpdxElement"]) for r in depends] == [
        (packages[curl]["SPDXID"], packages[libc]["SPDXID"])
    ]
    cyclonedx = validated_cyclonedx(cyclonedx_document(facts, graph, store))
    (component,) = [c for c in cyclonedx["components"] if c["bom-ref"] == other]
    assert {"name": "nixery:outside-closure"}.items() <= component["properties"][-1].items()
    assert other in next(d["dependsOn"] for d in cyclonedx["dependencies"] if d["ref"] == "image")
