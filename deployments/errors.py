"""Errors: the OpenAI error envelope, and the refusals a model-server replica sends back.

    raise APIError(400, "max_tokens must be >= 1", param="max_tokens", code="invalid_value")
    raise overloaded(503, "the model server's queue is full; retry later", retry_after_s=2)
    err.envelope()   # {"error": {"message", "type", "param", "code"}}, what the client gets

A replica raises ServerOverloaded / ServerDraining / InvalidRequest; they travel through Ray to
the ingress, whose backend (deployments/backends.py) turns them into 503 + Retry-After or 400.
No HTTP framework here: the replica process imports this module too.
"""

from __future__ import annotations

import math

from engine import ContextTooLongError, QueueFullError


class APIError(Exception):
    """An HTTP error in the OpenAI envelope: status, message, type, param, code, headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# Retry-After while nothing better is known (limits.retry_after_s); the ingress replaces it with
# the cluster's measured drain time once there is one (OpenAIService.retry_after_s)
DEFAULT_RETRY_AFTER_S = 2


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def overloaded(status: int, message: str, retry_after_s: float) -> APIError:
    """429 (this ingress or the cluster is past its limits) or 503 (the model servers refuse
    work), both with Retry-After."""
    kind = ("rate_limit_error", "rate_limit_exceeded") if status == 429 else \
        ("service_unavailable_error", "service_unavailable")
    return APIError(status, message, type=kind[0], code=kind[1], headers=retry_after(retry_after_s))


def internal_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, type="server_error")


class ServerOverloaded(RuntimeError):
    """The replica's engine queue is full (the client may retry: 503 + Retry-After)."""


class ServerDraining(RuntimeError):
    """The replica is shutting down, or its tensor-parallel group broke (503 + Retry-After)."""


class InvalidRequest(ValueError):
    """The engine refused the request's parameters (400)."""


class ContextTooLong(InvalidRequest):
    """The request can never fit the replica's context or KV pool (413)."""


def replica_refusal(e: Exception) -> Exception:
    """An engine's refusal at submit (ValueError, QueueFullError, EngineClosedError) as the
    exception a replica sends back."""
    if isinstance(e, ContextTooLongError):
        return ContextTooLong(str(e))
    if isinstance(e, ValueError):
        return InvalidRequest(str(e))
    if isinstance(e, QueueFullError):
        return ServerOverloaded(str(e))
    return ServerDraining(str(e) or "the model server is shutting down")


def refusal_status(e: Exception, retry_after_s: float) -> APIError:
    """A replica's refusal as the client's status: 400, or 503 + Retry-After."""
    if isinstance(e, ContextTooLong):
        return APIError(413, str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e))
    if isinstance(e, ServerOverloaded):
        return overloaded(503, "the model server's queue is full; retry later", retry_after_s)
    return overloaded(503, f"{e}; retry", retry_after_s)
