"""The aiohttp application: routes, the edge middleware, and start-up/clean-up of each resource.

`create_app` only wires things together. The edge middleware binds the request id, turns domain
errors into JSON, adds CORS and tracing headers, and emits the terminal `request.completed` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from . import __version__
from .cache import ImageCache, build_cache
from .config import CONFIG_DIR, Settings, TierSettings
from .enhance import PromptEnhancer, ReferrerTransform
from .errors import AnalyticsUnavailable, BadRequest, ServiceError
from .feed import Feed, feed_item
from .analytics import AnalyticsError, PipeSource, check_params, make_source
from .analytics import dashboard as analytics_dashboard
from .generation import Backend, Generator, WorkerRegistry, build_backends
from .identity import Authenticator, ClientAddress, FileTokenValidator, HttpTokenValidator, Identity, TokenValidator
from .moderation import ContentPolicy, Moderator, load_moderator
from .limits import Limiter as SlotLimiter
from .limits import build_shared_limiter
from .openapi import openapi_document
from .params import SLUG_CHARS, ImageParams, ParamsParser, draws_a_seed, slug
from .pipeline import GENERATED, Pipeline, Prepare
from .priority import background_executor
from .queues import Clock, Limiter, MemoryLimiter, MonotonicClock, require_tier, slot
from .tracking import (
    TELEMETRY, Tracking, bind, configure_logging, flush_logs, is_configured, new_request, parse_traceparent, request_ids,
)
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
PARSER = web.AppKey("parser", ParamsParser)
WORKERS = web.AppKey("workers", WorkerRegistry)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
CLIENT_ADDRESS = web.AppKey("client_address", ClientAddress)
LIMITER = web.AppKey("limiter", Limiter)
ENHANCER = web.AppKey("enhancer", PromptEnhancer)
TRANSFORM = web.AppKey("transform", ReferrerTransform)
FEED = web.AppKey("feed", Feed)
SLOTS = web.AppKey("slots", SlotLimiter)
ANALYTICS = web.AppKey("analytics", PipeSource)
REQUEST_ID = web.RequestKey("request_id", str)
TRACEPARENT = web.RequestKey("traceparent", str)
PARAMS = web.RequestKey("params", ImageParams)

IMMUTABLE = "public, max-age=31536000, immutable"
PRIVATE_IMMUTABLE = "private, max-age=31536000, immutable"
NO_STORE = "no-store"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, traceparent",
    "Access-Control-Expose-Headers": "X-Request-Id, X-Cache, Content-Disposition, Retry-After, traceparent",
}
# A shared start slot outlives the work it brackets — enhancement, the wait for a generation permit
# and the generation, each bounded by its timeout — by this margin for moderation and encoding; a
# crashed instance's slots free themselves after that long.
SLOT_TTL_MARGIN = 60.0
UNMATCHED = "(unmatched)"
# Routes whose requests are telemetry rows: image requests, and paths that matched nothing (often a
# malformed image URL). Health checks, metrics scrapes, the dashboard and the feed are logged only.
TRACKED_ROUTES = frozenset({"/prompt", "/prompt/{prompt}", UNMATCHED})
# Query parameters an error body echoes: the API's own. Any other (`access_token`, `password`...)
# may be a secret, and no list of secret names is ever complete.
ECHOED_PARAMS = (*(field.name for field in dataclasses.fields(ImageParams) if field.name != "prompt"), "transparent")
# What a private request's error body leaves out: its texts say what the prompt says.
PRIVATE_TEXTS = ("negative_prompt", "image")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


ECHO_CHARS = 200


def _request_parameters(request: web.Request) -> dict[str, Any]:
    params: ImageParams | None = request.get(PARAMS)
    if params is not None:
        return params.public_dict()
    # What the parser read: a repeated parameter's first value, cut short (an error body must not
    # grow with whatever a client sends).
    query = request.query
    echoed: dict[str, Any] = {key: query[key][:ECHO_CHARS] for key in ECHOED_PARAMS if key in query}
    if "private" in {key.lower() for key in query}:  # any spelling, any value: it may be meant
        for key in PRIVATE_TEXTS:
            echoed.pop(key, None)
    elif "prompt" in request.match_info:
        echoed["prompt"] = request.match_info["prompt"][:ECHO_CHARS]
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


def _http_error_code(exc: web.HTTPException) -> str:
    """The `error` of aiohttp's own refusals, in the body and the terminal row alike."""
    return {404: "not_found", 405: "method_not_allowed"}.get(exc.status) or exc.reason.lower().replace(" ", "_")


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    code = _http_error_code(exc)
    if exc.status == 404:
        return error_response(request, 404, code, f"no route for {request.path[:200]}", path=request.path[:200])
    if exc.status == 405:
        response = error_response(request, 405, code, f"{request.method} is not allowed here")
        allow = exc.headers.get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    return error_response(request, exc.status, code, exc.reason)


def _crash_fields(request: web.Request, exc: Exception) -> dict[str, str]:
    """What the terminal row says about a crash: for a private request only the exception's type,
    since its message or traceback could quote the prompt."""
    params = request.get(PARAMS)
    if params is not None and params.private:
        return {"exception": type(exc).__name__}
    return {"exception": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20)}


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, trace context, JSON errors, CORS, and the terminal event: one place for every route."""
    start = time.perf_counter()
    request_id = request_ids.next()
    request[REQUEST_ID] = request_id
    parent = parse_traceparent(request.headers.get("traceparent"))
    trace_id = parent[0] if parent else request_id
    span_id = request_id[-16:]
    # The caller's trace flags go on (its sampling decision is not ours to change); a new trace is sampled.
    request[TRACEPARENT] = f"00-{trace_id}-{span_id}-{parent[2] if parent else '01'}"
    tracking = request.app.get(TRACKING)
    if tracking is not None:
        TELEMETRY.route_current_context(tracking.forwarder.queue)
    # The route pattern, not the path: a path can carry a private prompt.
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else UNMATCHED
    new_request(
        request_id=request_id, request_start=time.time(), trace_id=trace_id, span_id=span_id,
        parent_span_id=parent[1] if parent else None, method=request.method, route=route,
    )
    error: str | None = None
    crash: dict[str, str] = {}
    try:
        if request.method == "OPTIONS" and not _not_found(request):
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
    except asyncio.CancelledError:
        # Shutdown gave up waiting for it (server.shutdown_timeout): no response will be sent, but
        # its rows still end with a terminal one, as the server's failure to answer.
        _completed(request.method, route, start, 503, "cancelled", {})
        raise
    except ServiceError as exc:
        error = exc.code
        response = error_response(request, exc.status, exc.code, exc.message, **exc.details)
        response.headers.update(exc.headers())
    except web.HTTPException as exc:
        error = _http_error_code(exc)
        response = _http_error(request, exc)
    except Exception as exc:
        error = "internal_error"
        log.exception("request.crashed")
        crash = _crash_fields(request, exc)
        response = error_response(request, 500, "internal_error", "the server failed; the request id identifies it")
    headers = response.headers
    headers.extend(CORS_HEADERS)
    headers["X-Request-Id"] = request_id
    headers["traceparent"] = request[TRACEPARENT]
    _completed(request.method, route, start, response.status, error, crash)
    return response


def _not_found(request: web.Request) -> bool:
    """No route has this path (a preflight to it is a 404 too; a path with other methods is not)."""
    return isinstance(getattr(request.match_info, "http_exception", None), web.HTTPNotFound)


def _completed(method: str, route: str, start: float, status: int, error: str | None, crash: dict[str, str]) -> None:
    """The terminal event: a row for image requests, a log line only for the others."""
    duration_ms = round((time.perf_counter() - start) * 1000, 3)
    if route in TRACKED_ROUTES and method != "OPTIONS":  # a CORS preflight is not an image request
        log.info("request.completed", stage="response", status=status, error=error, duration_ms=duration_ms, **crash)
    else:
        log.info("request.completed", status=status, error=error, duration_ms=duration_ms)


@asynccontextmanager
async def _generation_slot(
    app: web.Application, key: str, tier: str, limits: TierSettings, params: ImageParams
) -> AsyncIterator[ImageParams]:
    """The production step for one client: a slot in its queue, then the (maybe enhanced) params."""
    async with slot(app[LIMITER], key, tier, limits):
        yield await app[ENHANCER].enhance(params)


def _owner(identity: Identity, client: str) -> str:
    """Who a request counts as: its user with a token, else its address (its queue, its private images)."""
    return f"user:{identity.user}" if identity.user else f"addr:{client}"


def _prepare(request: web.Request, identity: Identity, owner: str) -> Prepare:
    app = request.app
    return partial(_generation_slot, app, owner, identity.tier, app[SETTINGS].tiers.limits(identity.tier))


def _cache_control(params: ImageParams, query: Mapping[str, str], gated: bool) -> str:
    """A random seed's image is one draw: kept by a browser or CDN, `seed=-1` would stop being
    random. A private image, or one of a model above the anonymous tier (`gated`), is for its asker
    only: a shared cache would hand it to anyone who asks for the same URL."""
    if draws_a_seed(query):
        return NO_STORE
    return PRIVATE_IMMUTABLE if params.private or gated else IMMUTABLE


@lru_cache(maxsize=4096)
def _content_disposition(private: bool, prompt_head: str) -> str:
    """Memoised by the prompt's first characters only (all the slug reads): the whole parameters,
    four reference URLs and a long prompt, made 4,096 entries weigh tens of megabytes."""
    filename = "image.jpg" if private else f"{slug(prompt_head)}.jpg"
    return f'inline; filename="{filename}"'


async def image_handler(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    start = time.perf_counter()
    parser = request.app[PARSER]
    try:
        url = request.rel_url
        params, key = parser.parse(request.match_info.get("prompt", ""), request.query, url.raw_path, url.raw_query_string)
    except ServiceError:
        # A request refused for its parameters still counts against its model, user and tier; the
        # parameters' error is the answer even when the token is bad too.
        bind(model=parser.known_model(request.query))
        with contextlib.suppress(ServiceError):
            bind(**(await request.app[AUTHENTICATOR].identify(request)).bindings())
        raise
    request[PARAMS] = params
    bind(
        model=params.model, prompt=params.public_prompt, width=params.width, height=params.height,
        seed=params.seed, private=params.private, nofeed=params.nofeed, nologo=params.nologo,
        enhance=params.enhance, safe=params.safe,
    )
    identity = await request.app[AUTHENTICATOR].identify(request)
    bind(**identity.bindings())
    require_tier(identity.tier, params.model, settings.models[params.model].tier)
    was_transformed = request.app[TRANSFORM].applies(identity.referrer)
    bind(was_transformed=was_transformed)
    if was_transformed:
        params = request.app[TRANSFORM].apply(params)
        key = params.cache_key()
    log.info("request.received", stage="request", duration_ms=round((time.perf_counter() - start) * 1000, 3))
    client = request.app[CLIENT_ADDRESS](request)
    owner = _owner(identity, client)
    if params.private:
        # The entry is the asker's own: shared, a hit would tell anyone who guessed the private
        # prompt that it had been asked for, and serve them the image.
        key = hashlib.blake2b(f"{key}|{owner}".encode(), digest_size=32).hexdigest()
    outcome = await request.app[PIPELINE].run(params, key, _prepare(request, identity, owner), client=client)
    if outcome.cache_status in GENERATED:
        request.app[FEED].publish(feed_item(params, outcome.image.verdict))
    return web.Response(
        body=outcome.image.body,
        headers={
            "Content-Type": outcome.image.content_type,
            "Cache-Control": _cache_control(params, request.query, settings.models[params.model].tier != "anonymous"),
            "Content-Disposition": _content_disposition(params.private, params.prompt[:SLUG_CHARS]),
            "X-Cache": "HIT" if outcome.cache_status == "hit" else "MISS",
        },
    )


async def models_handler(request: web.Request) -> web.Response:
    return json_response(sorted(request.app[SETTINGS].models), headers={"Cache-Control": NO_STORE})


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
                "enhanceAvailable": request.app[ENHANCER].enabled,
                "maxSideLength": spec.max_side,
                "defaultSideLength": spec.default_side,
            }
            for name, spec in sorted(models.items())
        ],
        headers={"Cache-Control": NO_STORE},
    )


async def health_handler(request: web.Request) -> web.Response:
    tracking = request.app.get(TRACKING)
    # "ok" even when Redis is down: the service still answers, without the shared cache.
    return json_response(
        {
            "status": "ok",
            "version": __version__,
            "cache": await request.app[CACHE].health(),
            "telemetry": tracking.forwarder.health() if tracking is not None else {"sink": "disabled"},
            "generation": request.app[GENERATOR].stats(),
        },
        headers={"Cache-Control": NO_STORE},
    )


async def metrics_handler(request: web.Request) -> web.Response:
    tracking = request.app.get(TRACKING)
    body = render_metrics(tracking.registry) if tracking is not None else b""
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": NO_STORE})
async def register_worker_handler(request: web.Request) -> web.Response:
    """GPU workers announce themselves (and heartbeat) here, with the shared secret."""
    registry = request.app[WORKERS]
    registry.authorize(request.headers.get("Authorization"))
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("registration body must be JSON {url, type}") from None
    except web.RequestPayloadError:
        raise BadRequest("registration body could not be read (is it valid for its Content-Encoding?)") from None
    worker = registry.register(body)
    log.info("worker.registered", worker=worker.url, type=worker.type, concurrency=worker.concurrency)
    return json_response({"registered": worker.url, "type": worker.type, "concurrency": worker.concurrency})


async def list_workers_handler(request: web.Request) -> web.Response:
    """Operators only (same secret): every known worker with its load."""
    registry = request.app[WORKERS]
    registry.authorize(request.headers.get("Authorization"))
    return json_response(registry.snapshot(), headers={"Cache-Control": NO_STORE})


async def openapi_handler(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[SETTINGS]))


async def dashboard_handler(request: web.Request) -> web.Response:
    return web.Response(body=analytics_dashboard.page(), content_type="text/html", headers={"Cache-Control": NO_STORE})


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
    return json_response(body, headers={"Cache-Control": NO_STORE})


async def analytics_ctx(app: web.Application) -> AsyncIterator[None]:
    """The dashboard's pipe source; building it costs nothing (chdb loads on the first local query)."""
    app[ANALYTICS] = source = make_source(app[SETTINGS], app[EXECUTOR])
    yield
    await source.close()


async def start_telemetry_helper(app: web.Application) -> None:
    """Once everything else has started: a start-up that fails never leaves a helper half-started."""
    tracking = app.get(TRACKING)
    if tracking is not None:
        tracking.forwarder.start_helper()


async def tracking_ctx(app: web.Application) -> AsyncIterator[None]:
    """Telemetry starts first and stops last, so the final requests' events are shipped or spooled."""
    settings = app[SETTINGS]
    if not is_configured():
        configure_logging(settings.server.log_format, settings.server.log_level)
    tracking = Tracking(settings.tracking) if settings.tracking.enabled else None
    if tracking is not None:
        await tracking.start()
        app[TRACKING] = tracking
    yield
    if tracking is not None:
        await tracking.close()
    flush_logs()


async def feed_handler(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the recent public items, then live ones, with heartbeat comments."""
    feed, settings = request.app[FEED], request.app[SETTINGS].feed
    subscription = feed.subscribe(request.app[CLIENT_ADDRESS](request))
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": NO_STORE, "X-Accel-Buffering": "no",
        "X-Request-Id": request[REQUEST_ID], "traceparent": request[TRACEPARENT], **CORS_HEADERS,
    })
    try:
        await response.prepare(request)
        async for chunk in feed.stream(subscription, lambda: request.transport is None or request.transport.is_closing()):
            async with asyncio.timeout(settings.write_timeout):
                await response.write(chunk)
    except TimeoutError:
        log.info("feed.subscriber_dropped", reason="write_timeout")
        if request.transport is not None:
            request.transport.close()
    except ConnectionError:
        pass
    finally:
        subscription.close()
    if subscription.dropped:
        log.info("feed.subscriber_dropped", reason="too_slow")
        if request.transport is not None:
            request.transport.close()
    return response


@cache
def _page() -> bytes:
    return (Path(__file__).parent / "static" / "index.html").read_bytes()


async def page_handler(request: web.Request) -> web.Response:
    return web.Response(body=_page(), content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})


# With every core busy in the pool, the event loop must still get a core and the GIL within a
# millisecond or two: workers run at a lower OS priority (priority.py), and the GIL is handed over
# every 1 ms instead of CPython's 5 ms (measured in BENCHMARKS.md, "Moderation").
GIL_SWITCH_INTERVAL = 0.001


def cpu_executor(workers: int) -> ThreadPoolExecutor:
    """The CPU pool (render, encode, moderate), below the event loop."""
    return background_executor(workers, "image-cpu")


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


def _token_validator(settings: Settings, clock: Clock) -> TokenValidator:
    access = settings.access
    if access.validator_url:
        return HttpTokenValidator(
            access.validator_url, timeout=access.validator_timeout, ttl=access.validator_cache_ttl,
            max_entries=access.validator_cache_size, clock=clock,
        )
    path = Path(access.tokens_file)
    return FileTokenValidator.from_file(path if path.is_absolute() else CONFIG_DIR / path)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    moderator: Moderator | None = None,
    limiter: Limiter | None = None,
    clock: Clock | None = None,
) -> web.Application:
    """Wire the service; `backends`, `moderator` and `limiter` replace the configured ones (for
    embedding and tests); `clock` drives queue intervals and token memoisation. With the `redis`
    cache backend the queues take their start slots from the shared store, `app[SLOTS]`."""
    app = web.Application(middlewares=[edge_middleware])
    app[SETTINGS] = settings
    app[PARSER] = ParamsParser(settings.models, settings.generation.default_model, settings.server.max_prompt_length)
    app_clock = clock or MonotonicClock()

    async def access_ctx(app: web.Application) -> AsyncIterator[None]:
        app[AUTHENTICATOR] = Authenticator(_token_validator(settings, app_clock), settings.access.referrers)
        app[CLIENT_ADDRESS] = ClientAddress(settings.access.trusted_proxies, settings.access.ipv6_prefix)
        if limiter is not None:
            app[LIMITER] = limiter
        else:
            slot_ttl = 2 * settings.generation.timeout + settings.enhance.timeout + SLOT_TTL_MARGIN
            app[LIMITER] = MemoryLimiter(app_clock, slots=app.get(SLOTS), slot_ttl=slot_ttl)
        app[ENHANCER] = PromptEnhancer(settings.enhance)
        app[TRANSFORM] = ReferrerTransform(settings.enhance)
        app[FEED] = Feed(settings.feed)
        yield
        app[FEED].close()
        await app[ENHANCER].close()
        await app[LIMITER].close()
        await app[AUTHENTICATOR].close()

    async def close_feed(app: web.Application) -> None:
        app[FEED].close()  # open streams would otherwise hold graceful shutdown for its whole timeout

    async def moderator_ctx(app: web.Application) -> AsyncIterator[None]:
        """Load the models once, with a warm-up; a missing model file stops start-up with its name."""
        app[MODERATOR] = moderator if moderator is not None else await load_moderator(settings.moderation, app[EXECUTOR])
        yield
        await app[MODERATOR].close()

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        executor = app[EXECUTOR]
        cache = build_cache(settings.cache)
        app[WORKERS] = registry = WorkerRegistry(settings.workers)
        generator = Generator(
            settings, backends if backends is not None else build_backends(settings, executor, registry)
        )
        app[CACHE], app[GENERATOR] = cache, generator
        slots = build_shared_limiter(settings.cache, cache.link)
        if slots is not None:
            app[SLOTS] = slots  # the queues (app[LIMITER]) take their start slots from it
        content_policy = ContentPolicy.from_settings(settings.moderation)
        app[PIPELINE] = Pipeline(
            cache, generator, app[MODERATOR], executor, content_policy, settings.generation.max_concurrent,
            settings.generation.timeout,
        )
        yield
        await generator.close()
        if slots is not None:
            await slots.close()
        await cache.close()

    app.cleanup_ctx.append(tracking_ctx)
    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(moderator_ctx)
    app.cleanup_ctx.append(pipeline_ctx)
    app.cleanup_ctx.append(access_ctx)
    app.on_shutdown.append(close_feed)
    app.cleanup_ctx.append(analytics_ctx)
    app.on_startup.append(start_telemetry_helper)

    app.router.add_get("/prompt", image_handler)
    app.router.add_get("/prompt/{prompt:.*}", image_handler)
    app.router.add_get("/models", models_handler)
    app.router.add_get("/about", about_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/register", register_worker_handler)
    app.router.add_get("/register", list_workers_handler)
    app.router.add_get("/feed", feed_handler)
    app.router.add_get("/", page_handler)
    app.router.add_get("/dashboard", dashboard_handler)
    app.router.add_get("/dashboard/data", dashboard_data_handler)
    return app
