"""The aiohttp application: routes, the edge middleware, and start-up/clean-up of each resource.

`create_app` only wires things together. The edge middleware binds the request id, turns domain
errors into JSON, adds CORS and tracing headers, and emits the terminal `request.completed` event.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import structlog
from aiohttp import web

from . import __version__
from .cache import ImageCache, build_store
from .config import Settings
from .errors import ServiceError
from .generation import Backend, Generator, build_backends
from .moderation import ContentPolicy, Moderator, load_moderator
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
        response.headers.update(exc.headers())
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
    outcome = await request.app[PIPELINE].run(params, client=request.remote)
    structlog.contextvars.bind_contextvars(cache_status=outcome.cache_status.value)
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
    store = request.app[CACHE].store
    return json_response(
        {
            "status": "ok",
            "version": __version__,
            "cache": {"backend": request.app[SETTINGS].cache.backend, "usedBytes": getattr(store, "used_bytes", None)},
        },
        headers={"Cache-Control": "no-store"},
    )


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[SETTINGS]))


# With every core busy in the pool, the event loop must still get a core and the GIL within a
# millisecond or two: workers run at a lower OS priority, and the GIL is handed over every 1 ms
# instead of CPython's 5 ms (measured in BENCHMARKS.md, "Moderation").
WORKER_NICE = 10
GIL_SWITCH_INTERVAL = 0.001


def _lower_thread_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)


def cpu_executor(workers: int) -> ThreadPoolExecutor:
    """The CPU pool; on Linux, where nice values are per thread, its threads yield to the event loop."""
    initializer = _lower_thread_priority if sys.platform == "linux" else None
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-cpu", initializer=initializer)


async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
    """One thread pool, sized to the cores, for every piece of CPU work (render, encode, moderate)."""
    workers = app[SETTINGS].server.cpu_workers or os.cpu_count() or 1
    executor = cpu_executor(workers)
    app[EXECUTOR] = executor
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    yield
    executor.shutdown(wait=True, cancel_futures=True)
    sys.setswitchinterval(switch_interval)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    moderator: Moderator | None = None,
) -> web.Application:
    """Wire the service; `backends` and `moderator` replace the configured ones (for embedding and tests)."""
    app = web.Application(middlewares=[edge_middleware])
    app[SETTINGS] = settings

    async def moderator_ctx(app: web.Application) -> AsyncIterator[None]:
        """Load the models once, with a warm-up; a missing model file stops start-up with its name."""
        app[MODERATOR] = moderator if moderator is not None else await load_moderator(settings.moderation, app[EXECUTOR])
        yield
        await app[MODERATOR].close()

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        executor = app[EXECUTOR]
        cache = ImageCache(build_store(settings.cache), settings.cache.ttl)
        generator = Generator(settings, backends if backends is not None else build_backends(settings, executor))
        app[CACHE], app[GENERATOR] = cache, generator
        content_policy = ContentPolicy.from_settings(settings.moderation)
        app[PIPELINE] = Pipeline(cache, generator, app[MODERATOR], executor, content_policy)
        yield
        await generator.close()
        await cache.close()

    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(moderator_ctx)
    app.cleanup_ctx.append(pipeline_ctx)

    app.router.add_get("/prompt", image_handler)
    app.router.add_get("/prompt/{prompt:.*}", image_handler)
    app.router.add_get("/models", models_handler)
    app.router.add_get("/about", about_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    return app
