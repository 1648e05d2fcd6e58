"""Builds the aiohttp application and wires its parts together."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from nixery.builder import ImageBuilder
from nixery.config import Settings
from nixery.http import routes
from nixery.http.errors import Handler, error_middleware
from nixery.nix.sources import open_source
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
    app = web.Application(middlewares=[access_log, error_middleware], handler_args={"max_field_size": 16384})
    app[routes.BLOB_REDIRECT] = settings.blob_redirect
    app[routes.MANIFESTS] = routes.ManifestCache()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        storage = open_storage(settings)
        builder = ImageBuilder(
            storage=storage,
            source=open_source(settings),
            nix_timeout=settings.nix_timeout,
            max_layers=settings.max_layers,
            max_concurrent_builds=settings.max_concurrent_builds,
        )
        app[routes.STORAGE] = storage
        app[routes.BUILDER] = builder
        log.info("registry.started", source=settings.source_description, storage=storage.name)
        yield
        await builder.close()
        await storage.close()

    app.cleanup_ctx.append(lifecycle)
    routes.add_routes(app)
    return app
