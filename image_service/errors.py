"""Domain errors raised by the stages and turned into JSON responses by one middleware.

    ServiceError                      status, error code, safe message
    ├── BadRequest                    400 input the client can fix
    │   ├── UnknownModel              400 names the valid models
    │   ├── PromptTooLong             400 names the limit
    │   └── ReferenceRejected         400 an `image=` URL refused or not fetchable
    ├── Unauthorized                  401 credentials missing (worker registration)
    │   └── InvalidToken              401 a token was given and is not valid
    ├── Forbidden                     403 credentials wrong, feature disabled, or tier too low
    │   └── TierRequired              403 the model needs a higher tier
    ├── TooManyRequests               429 the caller's queue is full; carries Retry-After
    ├── ClientBlocked                 429 too many refusals from this client; Retry-After says when
    ├── ContentBlocked                451 the moderation policy refused the request (body names the reason)
    └── GenerationError               502 the backend failed or answered garbage
        ├── BackendUnavailable        503 no backend can take the request now
        │   ├── AuthUnavailable       503 the token service did not answer
        │   └── FeedFull              503 the live feed has no room for another subscriber
        ├── GenerationTimeout         504 the backend did not answer in time
        └── SharedGenerationError     the status of another instance's failed generation we waited for

Messages are written for the client: they never carry a stack trace, a path or a credential.
"""

from __future__ import annotations

import math
from typing import Any


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    # True when the error belongs to the caller (its queue, its limits), not to the image: a request
    # that shared someone else's generation must not receive it.
    caller_specific = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str]:
        """Extra response headers the edge middleware adds to the JSON error."""
        return {}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class UnknownModel(BadRequest):
    code = "unknown_model"


class PromptTooLong(BadRequest):
    code = "prompt_too_long"


class ReferenceRejected(BadRequest):
    """A reference image URL (`image=`) that is refused or cannot be fetched."""

    code = "reference_rejected"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class InvalidToken(Unauthorized):
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class TierRequired(Forbidden):
    code = "tier_required"


class TooManyRequests(ServiceError):
    status = 429
    code = "too_many_requests"
    caller_specific = True

    def __init__(self, message: str, retry_after: float, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ContentBlocked(ServiceError):
    status = 451
    code = "content_blocked"


class ClientBlocked(ServiceError):
    status = 429
    code = "client_blocked"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, retryAfter=retry_after)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class GenerationError(ServiceError):
    status = 502
    code = "generation_failed"


class BackendUnavailable(GenerationError):
    status = 503
    code = "backend_unavailable"


class GenerationTimeout(GenerationError):
    status = 504
    code = "generation_timeout"


class AuthUnavailable(BackendUnavailable):
    code = "auth_unavailable"


class FeedFull(BackendUnavailable):
    code = "feed_full"


class SharedGenerationError(GenerationError):
    """Another instance generated this image for us and failed: its status, code and message, replayed."""

    def __init__(self, message: str, *, status: int, code: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.status = status
        self.code = code


class AnalyticsUnavailable(ServiceError):
    """The analytics pipes could not be run (Tinybird unreachable or refusing, local engine failing)."""

    status = 502
    code = "analytics_unavailable"
