"""The one exception family of the hub.

Every refusal the API makes is a `HubError` subclass carrying its HTTP status and a short machine-readable
code; the application turns it into `{"error": code, "error_description": message}` (the OAuth 2.0 shape,
used for every endpoint so a client parses one form). A refused request has changed nothing.
`HubSetupError` is for the hub directory itself (init, config), which the CLI reports as one line.
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub raises on purpose."""

    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        if code:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class HubSetupError(HubError):
    """The hub directory is missing, incomplete, already initialised, or its settings are wrong."""

    code = "hub_setup"


class InvalidRequestError(HubError):
    """The body, a parameter or a header is malformed or out of range."""


class UnauthorizedError(HubError):
    """No credential, or one that is invalid, expired, used or revoked."""

    status = 401
    code = "unauthorized"


class ForbiddenError(HubError):
    """A valid caller asks for what is not theirs (another agent's task), or a signed URL is bad."""

    status = 403
    code = "forbidden"


class NotFoundError(HubError):
    status = 404
    code = "not_found"


class ConflictError(HubError):
    """The request contradicts the current state: a duplicate name, an illegal task transition."""

    status = 409
    code = "conflict"


class PreconditionFailedError(HubError):
    """`If-Match` names an eTag that is no longer current (someone else changed the resource)."""

    status = 412
    code = "precondition_failed"


class PayloadTooLargeError(HubError):
    status = 413
    code = "payload_too_large"


class LimitReachedError(HubError):
    """A configured limit is reached, e.g. `max_agents`."""

    status = 409
    code = "limit_reached"


class TooManyRequestsError(HubError):
    """The same agent is already registering: the platform answers 429 and the client retries."""

    status = 429
    code = "too_many_requests"


class InsufficientStorageError(HubError):
    """The hub's disk is full: nothing was stored, and the same request can succeed once space is freed."""

    status = 507
    code = "insufficient_storage"


class ReleaseRejectedError(HubError):
    """An uploaded image failed verification against the hub's release trust keys."""

    status = 422
    code = "release_rejected"
