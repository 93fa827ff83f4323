"""The bidirectional streams' one pipeline: ``ClassifyStream`` and ``ModelStreamInfer`` both read
requests ahead on a thread of their own while answering earlier ones, in request order.

At most ``window`` requests wait between arrival and answer; beyond that the stream is not read,
and gRPC's flow control holds the client back.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterator

import grpc

log = logging.getLogger("serve")


def pipelined(requests: Iterator[Any], context: grpc.ServicerContext, window: int, name: str,
              prepare: Callable[[Any], Any], complete: Callable[[Any], Any],
              fail: Callable[[Exception, Any], Any], abandon: Callable[[Any], None]) -> Iterator[tuple[int, Any, Any]]:
    """``(index, request, answer)`` for each request in order: ``complete(prepare(request))``, or
    ``fail(exception, request)`` (an answer too) when either raises. ``prepare`` runs on the
    reader thread as requests arrive (decoding, submitting to the batcher: the client's pipelining
    reaches the batcher); a prepared job that can no longer be queued because the client left is
    given to ``abandon``."""
    jobs: queue.Queue = queue.Queue(maxsize=window)
    end = object()

    def put(entry: Any) -> bool:
        while context.is_active():
            try:
                jobs.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for index, request in enumerate(requests):
                try:
                    entry = (index, request, prepare(request), None)
                except Exception as e:
                    entry = (index, request, None, fail(e, request))
                if not put(entry):
                    if entry[3] is None:
                        abandon(entry[2])
                    return
        except Exception:  # the client went away mid-stream: nothing left to answer
            log.debug("%s request stream ended", name, exc_info=True)
        finally:
            put(end)

    threading.Thread(target=read, name=f"{name}-reader", daemon=True).start()
    while True:
        try:
            entry = jobs.get(timeout=0.5)
        except queue.Empty:
            if not context.is_active():
                return
            continue
        if entry is end:
            return
        index, request, job, answer = entry
        if answer is None:
            try:
                answer = complete(job)
            except Exception as e:
                answer = fail(e, request)
        yield index, request, answer
