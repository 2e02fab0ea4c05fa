"""The aiohttp application: routes, the edge middleware, and start-up/clean-up of each resource.

`create_app` only wires things together. The edge middleware binds the request id, turns domain
errors into JSON, adds CORS and tracing headers, and emits the terminal `request.completed` event.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import structlog
from aiohttp import web

from . import __version__
from .cache import ImageCache, build_cache
from .config import Settings
from .errors import ServiceError
from .generation import Backend, Generator, build_backends
from .limits import Limiter, build_limiter
from .moderation import Moderator, PassThroughModerator
from .openapi import openapi_document
from .params import ImageParams, parse_params
from .pipeline import Pipeline

log = structlog.get_logger("image_service.app")

SETTINGS = web.AppKey("settings", Settings)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
CACHE = web.AppKey("cache", ImageCache)
GENERATOR = web.AppKey("generator", Generator)
MODERATOR = web.AppKey("moderator", Moderator)
PIPELINE = web.AppKey("pipeline", Pipeline)
LIMITER = web.AppKey("limiter", Limiter)
REQUEST_ID = web.RequestKey("request_id", str)
PARAMS = web.RequestKey("params", ImageParams)

IMMUTABLE = "public, max-age=31536000, immutable"
PRIVATE_IMMUTABLE = "private, max-age=31536000, immutable"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, traceparent",
    "Access-Control-Expose-Headers": "X-Request-Id, X-Cache, Content-Disposition",
}
# Query parameters never echoed back in an error body.
SECRET_PARAMS = frozenset({"token", "key", "api_key", "apikey"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _request_parameters(request: web.Request) -> dict[str, Any]:
    params: ImageParams | None = request.get(PARAMS)
    if params is not None:
        return params.public_dict()
    echoed = {k: v for k, v in request.query.items() if k.lower() not in SECRET_PARAMS}
    if "prompt" in request.match_info and "private" not in {k.lower() for k in request.query}:
        echoed["prompt"] = request.match_info["prompt"][:200]
    return echoed


def error_response(request: web.Request, status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {
        "error": code,
        "message": message,
        "requestId": request.get(REQUEST_ID),
        "requestParameters": _request_parameters(request),
        **extra,
    }
    return json_response(body, status=status)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return error_response(request, 404, "not_found", f"no route for {request.path[:200]}", path=request.path[:200])
    if exc.status == 405:
        response = error_response(request, 405, "method_not_allowed", f"{request.method} is not allowed here")
        allow = exc.headers.get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    return error_response(request, exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, JSON errors, CORS, and the terminal event: one place for every route."""
    start = time.perf_counter()
    request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    # The route pattern, not the path: a path can carry a private prompt.
    route = request.match_info.route.resource
    structlog.contextvars.bind_contextvars(
        request_id=request_id, method=request.method, route=route.canonical if route is not None else "(unmatched)"
    )
    error: str | None = None
    try:
        if request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
    except ServiceError as exc:
        error = exc.code
        response = error_response(request, exc.status, exc.code, exc.message, **exc.details)
    except web.HTTPException as exc:
        error = "http_error"
        response = _http_error(request, exc)
    except Exception:
        error = "internal_error"
        log.exception("request.crashed")
        response = error_response(request, 500, "internal_error", "the server failed; the request id identifies it")
    response.headers.update(CORS_HEADERS)
    response.headers["X-Request-Id"] = request_id
    log.info(
        "request.completed", stage="response", status=response.status, error=error,
        duration_ms=round((time.perf_counter() - start) * 1000, 3),
    )
    return response


async def image_handler(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    start = time.perf_counter()
    params = parse_params(
        request.match_info.get("prompt", ""),
        request.query,
        settings.models,
        settings.generation.default_model,
        settings.server.max_prompt_length,
    )
    request[PARAMS] = params
    structlog.contextvars.bind_contextvars(
        model=params.model, prompt=params.public_prompt, width=params.width, height=params.height,
        seed=params.seed, private=params.private, nofeed=params.nofeed, nologo=params.nologo,
        enhance=params.enhance, safe=params.safe,
    )
    log.info("request.received", stage="request", duration_ms=round((time.perf_counter() - start) * 1000, 3))
    outcome = await request.app[PIPELINE].run(params)
    filename = "image.jpg" if params.private else f"{params.slug()}.jpg"
    return web.Response(
        body=outcome.image.body,
        headers={
            "Content-Type": outcome.image.content_type,
            "Cache-Control": PRIVATE_IMMUTABLE if params.private else IMMUTABLE,
            "Content-Disposition": f'inline; filename="{filename}"',
            "X-Cache": "HIT" if outcome.cache_status == "hit" else "MISS",
        },
    )


async def models_handler(request: web.Request) -> web.Response:
    return json_response(sorted(request.app[SETTINGS].models), headers={"Cache-Control": "no-store"})


async def about_handler(request: web.Request) -> web.Response:
    models = request.app[SETTINGS].models
    return json_response(
        [
            {
                "name": name,
                "description": spec.description,
                "backend": spec.backend,
                "tier": spec.tier,
                "enhance": spec.enhance,
                "maxSideLength": spec.max_side,
                "defaultSideLength": spec.default_side,
            }
            for name, spec in sorted(models.items())
        ],
        headers={"Cache-Control": "no-store"},
    )


async def health_handler(request: web.Request) -> web.Response:
    # "ok" even when Redis is down: the service still answers, without the shared cache.
    return json_response(
        {"status": "ok", "version": __version__, "cache": await request.app[CACHE].health()},
        headers={"Cache-Control": "no-store"},
    )


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[SETTINGS]))


async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
    """One thread pool, sized to the cores, for every piece of CPU work (render, encode, moderate)."""
    workers = app[SETTINGS].server.cpu_workers or os.cpu_count() or 1
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-cpu")
    app[EXECUTOR] = executor
    yield
    executor.shutdown(wait=True, cancel_futures=True)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    moderator: Moderator | None = None,
) -> web.Application:
    """Wire the service; `backends` and `moderator` replace the configured ones (for embedding and tests)."""
    app = web.Application(middlewares=[edge_middleware])
    app[SETTINGS] = settings

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        executor = app[EXECUTOR]
        cache = build_cache(settings.cache)
        generator = Generator(settings, backends if backends is not None else build_backends(settings, executor))
        app[CACHE], app[GENERATOR] = cache, generator
        app[LIMITER] = build_limiter(settings.cache, cache.link)
        app[MODERATOR] = moderator if moderator is not None else PassThroughModerator()
        app[PIPELINE] = Pipeline(cache, generator, app[MODERATOR], executor)
        yield
        await generator.close()
        await app[MODERATOR].close()
        await app[LIMITER].close()
        await cache.close()

    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(pipeline_ctx)

    app.router.add_get("/prompt", image_handler)
    app.router.add_get("/prompt/{prompt:.*}", image_handler)
    app.router.add_get("/models", models_handler)
    app.router.add_get("/about", about_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    return app
