"""`nixery serve` checks its storage before it serves: storage it cannot use ends
the process with one line naming the problem and a non-zero status.

Real `nixery serve` processes against real stores (SeaweedFS checks the bucket,
the keys and each identity's permissions; fake-gcs-server the bucket).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.cli import STARTUP_FAILED
from nixery.registry.digest import Digest
from nixery.storage import BackendUnavailable, FilesystemStorage
from tests.registry import free_port
from tests.storage.conftest import REPO, Backend, SigningKey
from tests.storage.servers import (
    READ_ONLY_ACCESS_KEY,
    READ_ONLY_SECRET_KEY,
    GCSServer,
    S3Server,
    environ_without_cloud,
)


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `nixery serve`, which must not start: its status and output."""
    settings = {"PORT": str(free_port()), "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox"}
    return subprocess.run(
        [sys.executable, "-m", "nixery", "serve"],
        env=environ_without_cloud(PYTHONPATH=str(REPO), LOG_FORMAT="json", **settings | env),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
    )


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The reason the registry gives for not starting; it said nothing else of its own."""
    assert result.returncode == STARTUP_FAILED, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("nixery:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "registry.started" not in result.stderr
    return lines[0]


def s3_env(server: S3Server, **changes: str) -> dict[str, str]:
    env = {
        "NIXERY_STORAGE_BACKEND": "s3",
        "S3_BUCKET": server.bucket,
        "S3_ENDPOINT": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
    }
    return env | changes


def buckets(server: S3Server) -> set[str]:
    return {bucket["Name"] for bucket in server.client().list_buckets()["Buckets"]}


def test_missing_s3_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    missing = f"nixery-missing-{uuid.uuid4().hex[:8]}"
    line = the_one_line(serve(tmp_path, **s3_env(s3_server, S3_BUCKET=missing)))
    assert line == f'nixery: storage: S3 bucket "{missing}" does not exist at {s3_server.endpoint} (NoSuchBucket)'
    assert missing not in buckets(s3_server), "the check must not create the bucket (SeaweedFS would, on a write)"


@pytest.mark.parametrize(
    ("credentials", "code", "variable"),
    [
        ({"AWS_ACCESS_KEY_ID": "nobodysaccesskey"}, "InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret-key-0123456789"}, "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_rejected_s3_credentials(
    s3_server: S3Server, tmp_path: Path, credentials: dict[str, str], code: str, variable: str
) -> None:
    line = the_one_line(serve(tmp_path, **s3_env(s3_server, **credentials)))
    assert line.startswith(f"nixery: storage: S3 at {s3_server.endpoint} ")
    assert f"({code}): check {variable}" in line


def test_s3_credentials_that_may_not_write(s3_server: S3Server, tmp_path: Path) -> None:
    env = s3_env(s3_server, AWS_ACCESS_KEY_ID=READ_ONLY_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=READ_ONLY_SECRET_KEY)
    line = the_one_line(serve(tmp_path, **env))
    assert f'denies the credentials to write an object in bucket "{s3_server.bucket}" (AccessDenied)' in line


def test_unreachable_s3_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"NIXERY_STORAGE_BACKEND": "s3", "S3_BUCKET": "nixery", "S3_ENDPOINT": endpoint,
           "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}  # fmt: skip
    line = the_one_line(serve(tmp_path, **env))
    assert line.startswith(f'nixery: storage: cannot reach S3 bucket "nixery" at {endpoint}: ')
    assert "Connection refused" in line


def test_several_workers_say_it_once(s3_server: S3Server, tmp_path: Path) -> None:
    missing = f"nixery-missing-{uuid.uuid4().hex[:8]}"
    result = serve(tmp_path, NIXERY_WORKERS="2", **s3_env(s3_server, S3_BUCKET=missing))
    assert the_one_line(result).endswith("(NoSuchBucket)")


def test_missing_gcs_bucket(gcs_server: GCSServer, signing_key: SigningKey, tmp_path: Path) -> None:
    missing = f"nixery-missing-{uuid.uuid4().hex[:8]}"
    env = {"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": missing, "STORAGE_EMULATOR_HOST": gcs_server.endpoint,
           "GCS_SIGNING_KEY": str(signing_key.pem_path), "GCS_SIGNING_ACCOUNT": signing_key.account}  # fmt: skip
    line = the_one_line(serve(tmp_path, **env))
    assert line.startswith(f'nixery: storage: GCS bucket "{missing}" does not exist at {gcs_server.endpoint} (404 ')


def test_unusable_storage_path(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    line = the_one_line(serve(tmp_path, STORAGE_PATH=str(taken)))
    assert line.startswith(f"nixery: storage: cannot use STORAGE_PATH='{taken}': ")


async def test_filesystem_check_finds_a_directory_it_cannot_write(make_backend, tmp_path: Path) -> None:
    backend: Backend = make_backend("filesystem")
    store = backend.open()
    await store.check_access()
    meta = backend.storage_path / "meta"
    os.rename(meta, tmp_path / "meta-elsewhere")
    meta.write_text("a file where the directory was")
    with pytest.raises(BackendUnavailable, match=f"cannot write in {meta}: "):
        await store.check_access()
    with pytest.raises(BackendUnavailable, match=f"cannot read {meta}: "):
        await store.check_access(write=False)


async def test_s3_errors_keep_the_store_error_code(s3_server: S3Server, make_backend, tmp_path: Path) -> None:
    """At run time too (the bucket removed under a running registry): the message
    says NoSuchBucket, which S3 puts after a long first line."""
    backend: Backend = make_backend("s3")
    client = s3_server.client()
    bucket = f"nixery-doomed-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    backend.s3 = S3Server(s3_server.endpoint, bucket)
    store = backend.open()
    await store.check_access()
    client.delete_bucket(Bucket=bucket)
    with pytest.raises(BackendUnavailable, match=r"NoSuchBucket \(404 Not Found\): The specified bucket does not"):
        await store.list_meta("images")
    digest = Digest.of(b"gone")
    # Deletes too: obstore raises a bucket's 404 as FileNotFoundError, not as one of its errors.
    # (Not writes: SeaweedFS creates a missing bucket on a write.)
    deletes = {"delete_meta": lambda: store.delete_meta("images/x"), "delete_blob": lambda: store.delete_blob(digest)}
    for name, delete in deletes.items():
        with pytest.raises(BackendUnavailable, match=r"NoSuchBucket"):
            await delete()
            pytest.fail(f"{name} on a removed bucket raised nothing")


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=200", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


async def test_filesystem_check_on_a_full_or_read_only_disk(small_file_system: Path) -> None:
    """A full disk still serves what it holds (new images get 507 STORAGE_FULL):
    the check lets it start. A read-only one cannot work: the check says so."""
    store = FilesystemStorage(small_file_system / "storage")
    with contextlib.suppress(OSError), open(small_file_system / "filler", "wb", buffering=0) as filler:
        while True:
            filler.write(b"\0" * 65536)
    with contextlib.suppress(OSError):
        for number in range(1000):
            (small_file_system / f"inode-{number}").touch()
    await store.check_access()
    await store.check_access(write=False)
    subprocess.run(["mount", "-o", "remount,ro", str(small_file_system)], check=True)
    with pytest.raises(BackendUnavailable, match="cannot write in .*: Read-only file system"):
        await store.check_access()


def test_s3_without_credentials_names_the_keys(s3_server: S3Server, tmp_path: Path) -> None:
    """No keys and no other AWS credentials: the line said the cloud metadata endpoint
    (169.254.169.254) could not be reached, and named no setting. It names the keys now."""
    env = s3_env(s3_server)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    line = the_one_line(serve(tmp_path, **env))
    assert line.startswith(f'nixery: storage: no S3 credentials for bucket "nixery" at {s3_server.endpoint}: '), line
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line, line
    assert "169.254" not in line, line


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_s3_with_one_key_of_the_pair(s3_server: S3Server, tmp_path: Path, variable: str) -> None:
    """One key alone was ignored without a word, and the registry looked for other credentials."""
    env = s3_env(s3_server)
    del env[variable]
    line = the_one_line(serve(tmp_path, **env))
    assert line.startswith("nixery: configuration error: ") and f"but {variable} is not" in line, line


@pytest.mark.parametrize("bucket", ["nixery/..", "nixery/sub", "nix ery", "../nixery"])
def test_an_s3_bucket_that_is_no_bucket_name_writes_nothing(s3_server: S3Server, tmp_path: Path, bucket: str) -> None:
    """S3_BUCKET=nixery/.. passed the start-up check's listing and write: the probe went to
    /nixery/../probes/..., i.e. into a bucket `probes` that SeaweedFS created. The name is
    now checked against S3's naming rules before the store is asked anything."""
    before = buckets(s3_server)
    line = the_one_line(serve(tmp_path, **s3_env(s3_server, S3_BUCKET=bucket)))
    assert line.startswith(f"nixery: configuration error: S3_BUCKET={bucket!r} has "), line
    assert "3-255 characters of letters, digits" in line, line
    assert buckets(s3_server) == before, "the registry wrote outside S3_BUCKET"


def test_a_gcs_bucket_that_is_no_bucket_name(tmp_path: Path) -> None:
    result = serve(tmp_path, NIXERY_STORAGE_BACKEND="gcs", BUCKET="nixery/../other")
    assert the_one_line(result).startswith("nixery: configuration error: BUCKET='nixery/../other' has '/': ")


def test_missing_gcs_bucket_without_a_signer_is_one_line(gcs_server: GCSServer, tmp_path: Path) -> None:
    """With nothing to sign URLs with, a `gcs.no_signer` warning came before the error line:
    it is said once the bucket is found usable, and the error is the only line."""
    missing = f"nixery-missing-{uuid.uuid4().hex[:8]}"
    env = {"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": missing, "STORAGE_EMULATOR_HOST": gcs_server.endpoint}
    result = serve(tmp_path, **env)
    assert the_one_line(result).startswith(f'nixery: storage: GCS bucket "{missing}" does not exist ')
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_nginx_accel_redirect_on_s3_is_refused(tmp_path: Path) -> None:
    """NIXERY_BLOB_ACCEL_REDIRECT is for the filesystem store behind nginx; on S3 it was ignored."""
    result = serve(tmp_path, NIXERY_STORAGE_BACKEND="s3", S3_BUCKET="nixery", NIXERY_BLOB_ACCEL_REDIRECT="/_blobs/")
    line = the_one_line(result)
    assert line.startswith("nixery: configuration error: NIXERY_BLOB_ACCEL_REDIRECT needs NIXERY_STORAGE_BACKEND"), line
