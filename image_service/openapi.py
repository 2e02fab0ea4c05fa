"""The OpenAPI 3 document served at /openapi.json, built from the live configuration."""

from __future__ import annotations

from typing import Any

from . import __version__
from .config import Settings
from .params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_SEED, JPEG_QUALITY, MAX_SEED

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _bool_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name, "in": "query", "description": f"{description} True only for the string `true`.",
        "schema": {"type": "string", "default": "false"},
    }


def _json_get(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {
        "description": "OK", "content": {"application/json": {"schema": schema}}}}}}


def openapi_document(settings: Settings) -> dict[str, Any]:
    models = sorted(settings.models)
    image_get: dict[str, Any] = {
        "summary": "Generate (or serve from cache) a JPEG for the prompt",
        "parameters": [
            {"name": "prompt", "in": "path", "required": True, "schema": {
                "type": "string", "maxLength": settings.server.max_prompt_length},
             "description": "URL-encoded prompt; empty means `random_prompt`."},
            {"name": "model", "in": "query", "schema": {
                "type": "string", "enum": models, "default": settings.generation.default_model}},
            {"name": "width", "in": "query", "schema": {"type": "integer", "minimum": 1},
             "description": "Defaults to the model's default side; the area is clamped to the model's max side squared."},
            {"name": "height", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            {"name": "seed", "in": "query", "schema": {
                "type": "integer", "minimum": -1, "maximum": MAX_SEED, "default": DEFAULT_SEED},
             "description": "-1 picks a random seed."},
            _bool_param("nologo", "No logo on the image."),
            _bool_param("enhance", "Rewrite the prompt with a text model."),
            _bool_param("private", "Keep the prompt out of logs, telemetry and EXIF; implies nofeed."),
            _bool_param("nofeed", "Keep the image out of the public feed."),
            _bool_param("safe", "Refuse mature images (451), and sexual prompts before generation."),
            {"name": "negative_prompt", "in": "query", "schema": {"type": "string", "default": DEFAULT_NEGATIVE_PROMPT}},
            {"name": "quality", "in": "query", "schema": {"type": "string", "enum": list(JPEG_QUALITY), "default": "medium"}},
            {"name": "image", "in": "query", "schema": {"type": "string"},
             "description": "Reference image URLs (http/https), separated by `|`."},
            {"name": "referrer", "in": "query", "schema": {"type": "string"},
             "description": "Referrer domain (else the Referer/Origin header); allow-listed domains get a tier."},
            {"name": "token", "in": "query", "schema": {"type": "string"},
             "description": "Access token; prefer the `Authorization: Bearer` header, which wins when both are sent."},
        ],
        "responses": {
            "200": {
                "description": "The image",
                "headers": {name: {"schema": {"type": "string"}} for name in (
                    "X-Request-Id", "X-Cache", "Cache-Control", "Content-Disposition")},
                "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
            },
            "400": _ERROR, "401": _ERROR, "403": _ERROR,
            "429": {**_ERROR, "description": "The client's queue is full (`queueInfo` in the body) or the client is blocked after repeated refusals; `Retry-After` header",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
            "451": _ERROR, "502": _ERROR, "503": _ERROR, "504": _ERROR,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "image_service", "version": __version__,
                 "description": "Image generation compatible with image.pollinations.ai."},
        "paths": {
            "/prompt/{prompt}": {"get": image_get},
            "/prompt": {"get": {**image_get, "summary": "Same as /prompt/{prompt} with `random_prompt`",
                                "parameters": image_get["parameters"][1:]}},
            "/models": _json_get("Model names", {"type": "array", "items": {"type": "string"}}),
            "/about": _json_get("Models with their limits", {"type": "array", "items": {"type": "object"}}),
            "/health": _json_get("Liveness and component state", {"type": "object"}),
            "/openapi.json": _json_get("This document", {"type": "object"}),
            "/metrics": {"get": {"summary": "Telemetry counters in Prometheus text format", "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/dashboard": {"get": {"summary": "Analytics dashboard (HTML with inline SVG charts of the Tinybird pipes)",
                                   "responses": {"200": {"description": "OK", "content": {"text/html": {"schema": {
                                       "type": "string"}}}}}}},
            "/dashboard/data": {"get": {
                "summary": "Every dashboard pipe's answer ({meta, data, rows, statistics} each), from Tinybird or the local sink",
                "parameters": [{"name": name, "in": "query", "schema": {"type": "string"}} for name in (
                    "start", "end", "bucket", "service_type", "model", "max_error_rate", "max_p95_ms", "factor",
                    "min_requests")],
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"source": {"type": "string"}, "parameters": {"type": "object"},
                                                     "pipes": {"type": "object"}}}}}},
                              "400": _ERROR, "502": _ERROR}}},
            "/register": {
                **_json_get("Registered GPU workers and their load (operators: `Authorization: Bearer <secret>`)",
                            {"type": "array", "items": {"type": "object"}}),
                "post": {
                    "summary": "A GPU worker announces itself or heartbeats (`Authorization: Bearer <secret>`)",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["url", "type"],
                        "properties": {"url": {"type": "string"}, "type": {"type": "string"},
                                       "concurrency": {"type": "integer", "minimum": 1}}}}}},
                    "responses": {"200": {"description": "Registered"}, "400": _ERROR, "401": _ERROR, "403": _ERROR},
                },
            },
            "/feed": {"get": {"summary": "Live feed of public generations (Server-Sent Events)", "responses": {
                "200": {"description": "`data: {json}` events (the recent items first), `:` heartbeat comments",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "503": _ERROR}}},
            "/": {"get": {"summary": "A page to try the service and watch the feed", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {"Error": {
            "type": "object",
            "required": ["error", "message", "requestId", "requestParameters"],
            "properties": {
                "error": {"type": "string"}, "message": {"type": "string"},
                "requestId": {"type": "string"}, "requestParameters": {"type": "object"},
            },
        }}},
    }
