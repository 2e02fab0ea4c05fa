"""Domain errors raised by the stages and turned into JSON responses by one middleware.

    ServiceError                      status, error code, safe message
    ├── BadRequest                    400 input the client can fix
    │   ├── UnknownModel              400 names the valid models
    │   ├── PromptTooLong             400 names the limit
    │   └── ReferenceRejected         400 an `image=` URL refused or not fetchable
    ├── Unauthorized                  401 credentials missing (worker registration)
    ├── Forbidden                     403 credentials wrong or the feature is disabled
    ├── ContentBlocked                451 the moderation policy refused the request
    └── GenerationError               502 the backend failed or answered garbage
        ├── BackendUnavailable        503 no backend can take the request now
        └── GenerationTimeout         504 the backend did not answer in time

Messages are written for the client: they never carry a stack trace, a path or a credential.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class UnknownModel(BadRequest):
    code = "unknown_model"


class PromptTooLong(BadRequest):
    code = "prompt_too_long"


class ContentBlocked(ServiceError):
    status = 451
    code = "content_blocked"


class GenerationError(ServiceError):
    status = 502
    code = "generation_failed"


class BackendUnavailable(GenerationError):
    status = 503
    code = "backend_unavailable"


class GenerationTimeout(GenerationError):
    status = 504
    code = "generation_timeout"


class ReferenceRejected(BadRequest):
    """A reference image URL (`image=`) that is refused or cannot be fetched."""

    code = "reference_rejected"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class AnalyticsUnavailable(ServiceError):
    """The analytics pipes could not be run (Tinybird unreachable or refusing, local engine failing)."""

    status = 502
    code = "analytics_unavailable"
