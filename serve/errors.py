"""One table from what can go wrong while answering a request to the status the client gets.

Every protocol answers through :func:`status_of`: a client mistake or a full server keeps its
own code and message; anything else is the server's own failure and leaves as INTERNAL with a
fixed message and a request id, while its traceback goes to the server log under that id, once
(KServe's ``protocol/grpc/interceptors.py`` has the same shape). A failed model call was logged
by its batcher, with the ids of all the requests of its batch; this table only answers it. A
message built from an unexpected exception could carry paths, model internals or data of
another request.
"""
from __future__ import annotations

import logging

import grpc

from serve.batching import BatchFailed, DeadlineExceeded, QueueFull, ShuttingDown, new_request_id
from serve.preprocess import InputError

log = logging.getLogger("serve")

INTERNAL_MESSAGE = "internal error"


def shown(name: str, limit: int = 80) -> str:
    """A client-supplied name, quoted and bounded, for messages."""
    return repr(name if len(name) <= limit else name[:limit] + "...")


def unknown_model(name: str) -> str:
    """Triton's words for a model it does not serve (clients and their tests match them)."""
    return f"Request for unknown model: {shown(name)} is not found"


class RequestError(Exception):
    """A request that cannot be answered: its gRPC code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# Expected exceptions -> (code, how the message reads). The batcher's and the decoder's messages
# are written for the client; QueueFull's needs the advice to retry.
STATUS_TABLE: dict[type[Exception], tuple[grpc.StatusCode, str]] = {
    InputError: (grpc.StatusCode.INVALID_ARGUMENT, "{}"),
    QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: {}; retry later"),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, "{}"),
    ShuttingDown: (grpc.StatusCode.UNAVAILABLE, "{}"),
}

# The HTTP port's status for each code a request can end with (Triton's REST API answers the
# same cases so). Keyed by code, not by exception: most errors are raised as RequestError with
# their code directly. A code missing here answers 500.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_of(error: BaseException, what: str, client_request_id: str = "") -> RequestError:
    """The answer for ``error`` raised while serving ``what`` (e.g. ``"Classify"``).

    An error outside the table is logged with its traceback under a new request id (and the
    client's own id, if it sent one); the client gets only INTERNAL, the fixed message and the id.
    A :class:`~serve.batching.BatchFailed` is answered the same way under the id its batcher
    logged it with, and not logged again.
    """
    if isinstance(error, RequestError):
        return error
    for kind, (code, form) in STATUS_TABLE.items():
        if isinstance(error, kind):
            return RequestError(code, form.format(error))
    if isinstance(error, BatchFailed):
        request_id = error.request_id
    else:
        request_id = new_request_id()
        log.error("%s failed (request id %s, client request id %r)", what, request_id, client_request_id[:200],
                  exc_info=error)
    return RequestError(grpc.StatusCode.INTERNAL,
                        f"{INTERNAL_MESSAGE} (request id {request_id}; the server log has the details)")
