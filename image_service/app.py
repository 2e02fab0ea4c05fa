"""The aiohttp application: routes, the edge middleware, and start-up/clean-up of each resource.

`create_app` only wires things together. The edge middleware binds the request id, turns domain
errors into JSON, adds CORS and tracing headers, and emits the terminal `request.completed` event.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import structlog
from aiohttp import web

from . import __version__
from .cache import ImageCache, build_store
from .config import Settings
from .analytics import AnalyticsError, PipeSource, check_params, make_source
from .analytics import dashboard as analytics_dashboard
from .errors import AnalyticsUnavailable, BadRequest, ServiceError
from .generation import Backend, Generator, WorkerRegistry, build_backends
from .moderation import Moderator, PassThroughModerator
from .openapi import openapi_document
from .params import ImageParams, parse_params
from .pipeline import Pipeline
from .tracking import TELEMETRY, Tracking, bind, configure_logging, is_configured, new_request, parse_traceparent, request_ids
from .tracking.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .tracking.metrics import render as render_metrics

log = structlog.get_logger("image_service.app")

SETTINGS = web.AppKey("settings", Settings)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
CACHE = web.AppKey("cache", ImageCache)
GENERATOR = web.AppKey("generator", Generator)
MODERATOR = web.AppKey("moderator", Moderator)
PIPELINE = web.AppKey("pipeline", Pipeline)
TRACKING = web.AppKey("tracking", Tracking)
WORKERS = web.AppKey("workers", WorkerRegistry)
ANALYTICS = web.AppKey("analytics", PipeSource)
REQUEST_ID = web.RequestKey("request_id", str)
PARAMS = web.RequestKey("params", ImageParams)

IMMUTABLE = "public, max-age=31536000, immutable"
PRIVATE_IMMUTABLE = "private, max-age=31536000, immutable"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, traceparent",
    "Access-Control-Expose-Headers": "X-Request-Id, X-Cache, Content-Disposition, traceparent",
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
    """Request id, trace context, JSON errors, CORS, and the terminal event: one place for every route."""
    start = time.perf_counter()
    request_id = request_ids.next()
    request[REQUEST_ID] = request_id
    parent = parse_traceparent(request.headers.get("traceparent"))
    trace_id = parent[0] if parent else request_id
    span_id = request_id[-16:]
    tracking = request.app.get(TRACKING)
    if tracking is not None:
        TELEMETRY.route_current_context(tracking.forwarder.queue)
    # The route pattern, not the path: a path can carry a private prompt.
    route = request.match_info.route.resource
    new_request(
        request_id=request_id, request_start=time.time(), trace_id=trace_id, span_id=span_id,
        parent_span_id=parent[1] if parent else None, method=request.method,
        route=route.canonical if route is not None else "(unmatched)",
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
    except Exception as exc:
        error = "internal_error"
        log.exception("request.crashed")
        bind(exception=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20))
        response = error_response(request, 500, "internal_error", "the server failed; the request id identifies it")
    headers = response.headers
    headers.extend(CORS_HEADERS)
    headers["X-Request-Id"] = request_id
    headers["traceparent"] = f"00-{trace_id}-{span_id}-01"
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
    bind(
        model=params.model, prompt=params.public_prompt, width=params.width, height=params.height,
        seed=params.seed, private=params.private, nofeed=params.nofeed, nologo=params.nologo,
        enhance=params.enhance, safe=params.safe,
    )
    log.info("request.received", stage="request", duration_ms=round((time.perf_counter() - start) * 1000, 3))
    outcome = await request.app[PIPELINE].run(params)
    bind(cache_status=outcome.cache_status.value)
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
    tracking = request.app.get(TRACKING)
    return json_response(
        {
            "status": "ok",
            "version": __version__,
            "cache": {"backend": request.app[SETTINGS].cache.backend, "usedBytes": getattr(store, "used_bytes", None)},
            "telemetry": tracking.forwarder.health() if tracking is not None else {"sink": "disabled"},
            "generation": request.app[GENERATOR].stats(),
        },
        headers={"Cache-Control": "no-store"},
    )


async def metrics_handler(request: web.Request) -> web.Response:
    tracking = request.app.get(TRACKING)
    body = render_metrics(tracking.registry) if tracking is not None else b""
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": "no-store"})
async def register_worker_handler(request: web.Request) -> web.Response:
    """GPU workers announce themselves (and heartbeat) here, with the shared secret."""
    registry = request.app[WORKERS]
    registry.authorize(request.headers.get("Authorization"))
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("registration body must be JSON {url, type}") from None
    worker = registry.register(body)
    log.info("worker.registered", worker=worker.url, type=worker.type, concurrency=worker.concurrency)
    return json_response({"registered": worker.url, "type": worker.type, "concurrency": worker.concurrency})


async def list_workers_handler(request: web.Request) -> web.Response:
    """Operators only (same secret): every known worker with its load."""
    registry = request.app[WORKERS]
    registry.authorize(request.headers.get("Authorization"))
    return json_response(registry.snapshot(), headers={"Cache-Control": "no-store"})


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[SETTINGS]))


async def dashboard_handler(request: web.Request) -> web.Response:
    return web.Response(body=analytics_dashboard.page(), content_type="text/html", headers={"Cache-Control": "no-store"})


async def dashboard_data_handler(request: web.Request) -> web.Response:
    """The dashboard's pipes, from Tinybird or from the local sink (chdb runs in the executor)."""
    try:
        params = check_params(request.query)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    try:
        body = await analytics_dashboard.data(request.app[ANALYTICS], params)
    except AnalyticsError as exc:
        raise AnalyticsUnavailable(str(exc)) from None
    return json_response(body, headers={"Cache-Control": "no-store"})


async def analytics_ctx(app: web.Application) -> AsyncIterator[None]:
    """The dashboard's pipe source; building it costs nothing (chdb loads on the first local query)."""
    app[ANALYTICS] = source = make_source(app[SETTINGS], app[EXECUTOR])
    yield
    await source.close()


async def tracking_ctx(app: web.Application) -> AsyncIterator[None]:
    """Telemetry starts first and stops last, so the final requests' events are shipped or spooled."""
    settings = app[SETTINGS]
    if not is_configured():
        configure_logging(settings.server.log_format, settings.server.log_level)
    if not settings.tracking.enabled:
        yield
        return
    tracking = Tracking(settings.tracking)
    await tracking.start()
    app[TRACKING] = tracking
    yield
    await tracking.close()


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
        cache = ImageCache(build_store(settings.cache), settings.cache.ttl)
        app[WORKERS] = registry = WorkerRegistry(settings.workers)
        generator = Generator(
            settings, backends if backends is not None else build_backends(settings, executor, registry)
        )
        app[CACHE], app[GENERATOR] = cache, generator
        app[MODERATOR] = moderator if moderator is not None else PassThroughModerator()
        app[PIPELINE] = Pipeline(cache, generator, app[MODERATOR], executor)
        yield
        await generator.close()
        await app[MODERATOR].close()
        await cache.close()

    app.cleanup_ctx.append(tracking_ctx)
    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(pipeline_ctx)
    app.cleanup_ctx.append(analytics_ctx)

    app.router.add_get("/prompt", image_handler)
    app.router.add_get("/prompt/{prompt:.*}", image_handler)
    app.router.add_get("/models", models_handler)
    app.router.add_get("/about", about_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/register", register_worker_handler)
    app.router.add_get("/register", list_workers_handler)
    app.router.add_get("/dashboard", dashboard_handler)
    app.router.add_get("/dashboard/data", dashboard_data_handler)
    return app
