"""One table from what can go wrong while answering a request to the status the client gets.

Every protocol answers through :func:`status_of`: a client mistake or a full server keeps its
own code and message; anything else is the server's own failure and leaves as INTERNAL with a
fixed message and a request id, while its traceback goes to the server log under that id
(KServe's ``protocol/grpc/interceptors.py`` has the same shape). A message built from an
unexpected exception could carry paths, model internals or data of another request.
"""
from __future__ import annotations

import logging
import uuid

import grpc

from serve.batching import DeadlineExceeded, QueueFull, ShuttingDown
from serve.preprocess import InputError

log = logging.getLogger("serve")

INTERNAL_MESSAGE = "internal error"


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


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def status_of(error: BaseException, what: str, client_request_id: str = "") -> RequestError:
    """The answer for ``error`` raised while serving ``what`` (e.g. ``"Classify"``).

    An error outside the table is logged with its traceback under a new request id (and the
    client's own id, if it sent one); the client gets only INTERNAL, the fixed message and the id.
    """
    if isinstance(error, RequestError):
        return error
    for kind, (code, form) in STATUS_TABLE.items():
        if isinstance(error, kind):
            return RequestError(code, form.format(error))
    request_id = new_request_id()
    log.error("%s failed (request id %s, client request id %r)", what, request_id, client_request_id[:200],
              exc_info=error)
    return RequestError(grpc.StatusCode.INTERNAL,
                        f"{INTERNAL_MESSAGE} (request id {request_id}; the server log has the details)")
