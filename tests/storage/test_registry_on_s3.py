"""Registry processes on a SeaweedFS of their own (no other test's buckets):
which buckets they write to.

The registry reaches the store as operators set it up for an S3-compatible
store: S3_ENDPOINT, and no S3_PATH_STYLE.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from nixery.registry.digest import Digest
from tests.storage.servers import S3Server, seaweedfs


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs-own")) as server:
        yield server


def s3_env(server: S3Server, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "NIXERY_STORAGE_BACKEND": "s3",
        "NIXERY_BUNDLED_SET": "busybox",
        "S3_BUCKET": server.bucket,
        "S3_ENDPOINT": endpoint or server.endpoint,  # and no S3_PATH_STYLE
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        **extra,
    }


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def all_objects(server: S3Server) -> dict[str, list[str]]:
    """Every object in every bucket of the store, by bucket."""
    client = server.client()
    found: dict[str, list[str]] = {}
    for bucket in client.list_buckets()["Buckets"]:
        keys = found.setdefault(bucket["Name"], [])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            keys += [item["Key"] for item in page.get("Contents", [])]
    return found


def test_every_object_is_in_the_bucket(own_s3: S3Server, start_registry) -> None:
    registry = start_registry(**s3_env(own_s3))
    _, manifest = registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]

    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{layer}", accept=None)
    assert status == 307
    location = urlsplit(headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == own_s3.endpoint
    assert location.path == f"/{own_s3.bucket}/blobs/sha256/{Digest.parse(layer).hex}"
    status, body = fetch(headers["Location"])
    assert status == 200 and str(Digest.of(body)) == layer

    objects = all_objects(own_s3)
    assert set(objects) == {own_s3.bucket}, f"buckets other than S3_BUCKET appeared: {sorted(objects)}"
    prefixes = {key.split("/", 1)[0] for key in objects[own_s3.bucket]}
    assert {"blobs", "meta"} <= prefixes <= {"blobs", "meta", "locks", "touched", "probes"}
