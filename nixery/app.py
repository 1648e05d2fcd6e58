"""Builds the aiohttp application and wires its parts together.

This is the one module that turns settings into parts: the package source
(and the resolver it supplies the builder), the storage driver, the builder,
and the image declarations. The parts themselves take what they need as
arguments and read no configuration.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from nixery import loop_lag, metrics, scratch
from nixery.builder import ImageBuilder
from nixery.config import ConfigError, Settings
from nixery.http import auth, bodies, health, hosts, proxies, referrers, routes, shutdown
from nixery.http import signatures as http_signatures
from nixery.http.access import access_log
from nixery.http.errors import error_middleware
from nixery.http.web import add_web_routes
from nixery.layers.popularity import Popularity
from nixery.nix.channel import ChannelSource
from nixery.nix.evaluator import Evaluators
from nixery.nix.flake import FlakeSource
from nixery.nix.git import GitSource
from nixery.nix.sources import LocalPathSource, PackageSource
from nixery.shared_builds import SharedBuildLog
from nixery.signatures import Signatures
from nixery.storage import FilesystemStorage, Storage, StorageInaccessible, StorageSettingsInvalid

log = structlog.get_logger(__name__)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        # A malformed Host is refused before any handler makes a link or a pull command of it.
        # The client behind a trusted proxy is found first, for the log and the turns it waits in.
        middlewares=[
            proxies.find_client,
            access_log,
            metrics.metrics_middleware,
            error_middleware,
            hosts.refuse_malformed_host,
        ],
        handler_args={"max_field_size": 16384},
    )
    app[routes.BLOB_REDIRECT] = settings.blob_redirect
    app[routes.BLOB_ACCEL_REDIRECT] = settings.blob_accel_redirect or ""
    app[routes.MANIFESTS] = routes.ManifestCache(settings.record_cache)  # as many as image records
    app[bodies.BODY_TIMEOUT] = settings.header_timeout  # a body has as long as its head had
    bodies.quiet_form_warnings()  # a client's malformed form is its error, not lines on stderr
    app[proxies.TRUSTED_PROXIES] = settings.trusted_proxies
    app[hosts.PUBLIC_HOST] = settings.public_host or ""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        storage = open_storage(settings)
        try:
            # Before any request is answered: a missing bucket or rejected credentials
            # end the process with one line (cli.py), not failed pulls later.
            await storage.check_access()
        except BaseException:
            await storage.close()
            raise
        builder = open_builder(settings, storage)
        builder.images.on_collected(app[routes.MANIFESTS].clear)  # after `nixery gc`, manifests are read again
        app[routes.STORAGE] = storage
        app[routes.BUILDER] = builder
        app[health.READINESS] = health.StorageReadiness(storage)
        if settings.signing_key is not None:  # docs/signing.md
            signatures = Signatures(storage, settings.signing_key, public_host=settings.public_host)
            builder.images.on_collected(signatures.forget)
            app[http_signatures.SIGNATURES] = signatures
        declarations = None
        if settings.images_path is not None or settings.k8s_watch:
            from nixery.declarations import open_declarations

            declarations = await open_declarations(settings, builder)
            if settings.k8s_watch:
                from nixery.k8s import KubeConfigError, start_watch

                try:
                    await start_watch(settings, declarations)
                except KubeConfigError as exc:  # a setting's fault: one line and status 2, not a traceback
                    raise ConfigError(f"NIXERY_K8S_WATCH=true, but {exc}") from None
            app[routes.RESOLVER] = declarations  # NixImage declarations: docs/kubernetes.md
        # What start-up made (modules, the app) lives as long as the process: out of the
        # collector's way, so that no full collection walks it again while requests wait.
        gc.collect()
        gc.freeze()
        log.info("registry.started", source=settings.source_description, storage=storage.name)
        warm_up = asyncio.ensure_future(builder.warm_up())  # in the background: serving starts now
        lag_watch = asyncio.ensure_future(loop_lag.watch())  # /metrics and the log show stalls
        scratch.remove_abandoned_in_background()
        yield
        lag_watch.cancel()
        warm_up.cancel()
        if declarations is not None:
            await declarations.close()
        await builder.close()
        await storage.close()

    app.cleanup_ctx.append(lifecycle)
    shutdown.install(app, settings.shutdown_grace)  # builds stopped in steps, before the lifecycle's end
    referrers.add_routes(app)  # the referrers API; attachment tags (sha256-<hex>) before other tags
    routes.add_routes(app)
    http_signatures.add_routes(app)  # /signing-key.pub
    health.add_routes(app)  # /readyz: whether storage answers (for readiness probes)
    add_web_routes(app)  # landing page, search, build progress, /images, /docs (after the lifecycle: it needs storage)
    metrics.setup(app)  # /metrics
    auth.install(app, settings)  # NIXERY_AUTH: middleware for /v2 and the /token endpoint
    return app


def open_builder(settings: Settings, storage: Storage) -> ImageBuilder:
    """The image builder the settings ask for, over `storage`, with the package source's resolver."""
    evaluators = Evaluators(memory_limit=settings.evaluator_memory_limit, repl=settings.nix_evaluator == "repl")
    return ImageBuilder(
        storage=storage,
        source=open_source(settings).resolver(timeout=settings.nix_timeout, evaluators=evaluators),
        max_layers=settings.max_layers,
        layer_cost_mb=settings.layer_cost_mb,
        max_concurrent_builds=settings.max_concurrent_builds,
        failed_build_ttl=settings.failed_build_ttl,
        layer_compression=settings.layer_compression,
        record_cache=settings.record_cache,
        platforms=settings.platforms,
        popularity=Popularity(settings.popularity_url) if settings.popularity_url else None,
        baseline=settings.baseline,
        nix_annotations=settings.nix_annotations,
        builds=SharedBuildLog(settings.shared_builds_dir) if settings.shared_builds_dir is not None else None,
    )


def open_source(settings: Settings) -> PackageSource:
    """The package source the settings name; the bundled set when none is named."""
    if settings.pkgs_path is not None:
        return LocalPathSource(settings.pkgs_path)
    if settings.pkgs_repo:
        return GitSource(
            settings.pkgs_repo,
            cache_dir=settings.cache_dir,
            ref_ttl=settings.git_ref_ttl,
            fetch_timeout=settings.nix_timeout,
        )
    if settings.channel:
        return ChannelSource(
            settings.channel,
            url_template=settings.channel_url,
            cache_dir=settings.cache_dir,
            timeout=settings.nix_timeout,
            ttl=settings.channel_ttl,
        )
    if settings.flake:
        return FlakeSource(
            settings.flake,
            cache_dir=settings.cache_dir,
            ref_ttl=settings.git_ref_ttl,
            fetch_timeout=settings.nix_timeout,
        )
    bundled = settings.bundled_set
    if bundled.fallback:  # not asked for: say how to get the set `auto` would prefer
        log.info(
            "source.bundled_busybox",
            note="serving the busybox package set, as the Debian set is not generated; "
            "run `make debian-set` for real software (bash, curl, git, python3)",
        )
    return LocalPathSource(bundled.path, description=f"bundled {bundled.name}")


def open_storage(settings: Settings) -> Storage:
    """The storage driver the settings ask for (raises ConfigError if incomplete,
    StorageInaccessible if STORAGE_PATH cannot be used)."""
    try:
        return _open(settings)
    except StorageSettingsInvalid as error:
        raise ConfigError(str(error)) from None
    except OSError as error:  # creating STORAGE_PATH's directories (every backend stages there)
        raise StorageInaccessible(
            settings.storage_backend, f"cannot use STORAGE_PATH={str(settings.storage_path)!r}: {error}"
        ) from error


def _open(settings: Settings) -> Storage:
    backend = settings.storage_backend
    if backend == "filesystem":
        return FilesystemStorage(settings.storage_path, verified_links=settings.verified_blob_links)
    if backend == "s3":
        if settings.s3 is None:
            raise ConfigError("S3_BUCKET must be set when NIXERY_STORAGE_BACKEND=s3")
        from nixery.storage.s3 import S3Storage

        return S3Storage(
            settings.s3,
            staging_root=settings.storage_path / "tmp",
            signed_url_ttl=settings.signed_url_ttl,
        )
    if backend == "gcs":
        if settings.gcs is None:
            raise ConfigError("GCS_BUCKET must be set when NIXERY_STORAGE_BACKEND=gcs")
        from nixery.storage.gcs import GCSStorage

        return GCSStorage(
            settings.gcs,
            staging_root=settings.storage_path / "tmp",
            signed_url_ttl=settings.signed_url_ttl,
        )
    raise ConfigError(f"NIXERY_STORAGE_BACKEND={backend!r} must be one of filesystem, s3, gcs")
