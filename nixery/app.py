"""Builds the aiohttp application and wires its parts together."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from nixery import metrics
from nixery.builder import ImageBuilder
from nixery.config import Settings
from nixery.http import auth, health, routes
from nixery.http.errors import Handler, error_middleware
from nixery.http.web import add_web_routes
from nixery.storage import open_storage

log = structlog.get_logger(__name__)


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    response = await handler(request)
    log.info(
        "http.request",
        method=request.method,
        path=request.path[:300],
        status=response.status,
        ms=round((time.monotonic() - started) * 1000, 1),
    )
    return response


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[access_log, metrics.metrics_middleware, error_middleware], handler_args={"max_field_size": 16384}
    )
    app[routes.BLOB_REDIRECT] = settings.blob_redirect
    app[routes.BLOB_ACCEL_REDIRECT] = settings.blob_accel_redirect or ""
    app[routes.MANIFESTS] = routes.ManifestCache(settings.record_cache)  # as many as image records

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        storage = open_storage(settings)
        try:
            # Before any request is answered: a missing bucket or rejected credentials
            # end the process with one line (cli.py), not failed pulls later.
            await storage.check_access()
        except BaseException:
            await storage.close()
            raise
        builder = ImageBuilder.from_settings(settings, storage)
        builder.on_collected(app[routes.MANIFESTS].clear)  # after `nixery gc`, manifests are read again
        app[routes.STORAGE] = storage
        app[routes.BUILDER] = builder
        app[health.READINESS] = health.StorageReadiness(storage)
        declarations = None
        if settings.images_path is not None or settings.k8s_watch:
            from nixery.declarations import open_declarations

            declarations = await open_declarations(settings, builder)
            if settings.k8s_watch:
                from nixery.k8s import start_watch

                await start_watch(settings, declarations)
            app[routes.RESOLVER] = declarations  # NixImage declarations: docs/kubernetes.md
        # What start-up made (modules, the app) lives as long as the process: out of the
        # collector's way, so that no full collection walks it again while requests wait.
        gc.collect()
        gc.freeze()
        log.info("registry.started", source=settings.source_description, storage=storage.name)
        warm_up = asyncio.ensure_future(builder.warm_up())  # in the background: serving starts now
        yield
        warm_up.cancel()
        if declarations is not None:
            await declarations.close()
        await builder.close()
        await storage.close()

    app.cleanup_ctx.append(lifecycle)
    routes.add_routes(app)
    health.add_routes(app)  # /readyz: whether storage answers (for readiness probes)
    add_web_routes(app)  # landing page, search, build progress, /images, /docs (after the lifecycle: it needs storage)
    metrics.setup(app)  # /metrics, blob bytes served
    auth.install(app, settings)  # NIXERY_AUTH: middleware for /v2 and the /token endpoint
    return app
