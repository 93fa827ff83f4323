"""Load test of ``python -m serve``: throughput, tail latency, dynamic batching and serving overhead.

    python -m bench.serve [--model NAME] [--model-dir DIR] [--server HOST:PORT] [--concurrency 1,4,16,64]
                          [--duration S] [--batching on,off] [--workers 1,2] [--json PATH] [--quick]
                          [--protocol grpc,grpc-infer,http,http-json] [--http-server HOST:PORT]
                          [--peer kserve [--peer-python PATH]]
    python -m bench.serve --first-request N [--model NAME]   # first request with and without warmup

Unless ``--server`` names one, starts its own servers on 127.0.0.1 (``python -m serve --port 0``
with ``--max-batch 16`` for batching on and ``--max-batch 1`` for off, each with every
``--workers`` count; all at once, idle while another is measured) and stops them when done, on
Ctrl-C, SIGTERM or an error (SIGTERM, wait, kill). A server of W workers gets ``--threads``/W
onnxruntime threads per worker (at least 1), so with ``--threads`` a multiple of W every server
has the same threads in all; with a W > 1 in
the run every client opens a connection of its own (the kernel spreads connections, not calls,
over the workers), in every setting of the run alike.

The load comes from closed-loop clients: each is a thread with its own client of the setting's
``--protocol`` (:mod:`~bench.serve.protocols`) that sends its next request when the last one is
answered: ``grpc`` (the default) is :class:`serve.client.Classifier`'s ``Classify``; ``grpc-infer``
is the Open Inference Protocol's ``ModelInfer`` (``raw_input_contents`` in, raw logits out);
``http`` is the same operation over REST (``POST /v2/models/{m}/infer`` with Triton's binary
tensor extension in and out) and ``http-json`` the same with JSON tensors, each HTTP client on a
keep-alive connection of its own (:mod:`http.client`). The servers started get ``--http-port 0``
when an HTTP protocol is asked for; with ``--server``, ``--http-server`` names its HTTP address.
HTTP is compared with ``grpc-infer`` when the run has it (the same request and answer on both
transports: a fair protocol comparison), else with ``grpc`` (Classify answers the top class only,
so its answer is smaller than the logits). The
clients of a setting are spread over several processes (multiprocessing, so no client process's
GIL is the bottleneck), and every call has a deadline, every setting a time and a request bound.

Every answer must match its own input: each client sends its own distinct tensors and checks the
top class of every answer, and its score, against what onnxruntime computed for that input in
the client process before any timing, whatever the protocol (the OIP clients take the softmax of
the logits answered, in float64 as the server does); a wrong answer counts as a ``MISMATCH`` error.

Per setting (batching x workers x protocol x concurrency): QPS, client-observed p50/p95/p99, the
tail ratio p99/p50, errors by status code
(warm-up requests included: every answer is checked), mean batch size (from the responses), the
server's own split of a request's time (batch queue, inference, the rest) and what is left for
gRPC and the client, how busy the model was (these from Classify's answers, which carry the
server's timing and batch size: ``grpc`` only), and the CPU used by the server and by the clients.
Raw onnxruntime ``session.run`` at batch 1 on the same inputs, in this process with the server's
thread count, is measured in the same run: served p50 at one client over raw p50 is the cost of
serving. A bare gRPC echo (:mod:`~bench.serve.echo`: its own process, a generic handler answering
the input tensor's bytes with a fixed 64-byte reply) is driven by one client from the same client
processes: each one-client setting's ``served p50 - (echo p50 + raw p50)`` is what serving costs
beyond transport and inference (target 0.3 ms). HTTP binary and HTTP JSON p50 over gRPC's are
reported at every concurrency (target: HTTP binary within 1.3x at one client). Raw, the echo and
every setting are interleaved in rounds (order rotating), because this
machine's timings drift by up to 1.7x within minutes (docs/benchmarking.md). Nothing is asserted: the
targets are reported, each with what bounds it.

With ``--peer kserve`` KServe's model server (:mod:`~bench.serve.peer`, from an environment of
its own) serves the same model file, and each Open Inference Protocol ``--protocol`` of the run
(``grpc-infer``, ``http``, ``http-json``: it has no Classify) is measured on it too, by the same
clients in the same rounds; each of this tool's one-worker settings is paired with the peer's of
the same protocol and clients, and its QPS, p50 and p99 over the peer's are taken round by round
(the median over the rounds is reported, and every round's). Under load, a ``bound:`` line says
what limits the QPS ratio when the cores do: each side's CPU per answer, the room 1.5x the peer's
QPS leaves for serving beside what serving takes, and, at the run's largest number of clients,
the bare echo's own CPU per call measured there (in the rounds too): the floor of a server on
grpc's Python server.

Exit status: 0 when every request was answered correctly, 1 when any failed or mismatched (the
table is printed either way) or the benchmark could not run (one line), 2 for bad options.
Models are exported once with random weights (``python -m export.onnx`` in a subprocess: torch
is never loaded here) into ``--cache``, or read from ``--model-dir``.

The modules: :mod:`~bench.serve.config` (every default, :class:`Config`, the JSON row),
:mod:`~bench.serve.clients` (the client processes and their inputs), :mod:`~bench.serve.servers`
(the model, the servers started and stopped, a ``--server``'s check), :mod:`~bench.serve.measure`
(raw ``session.run`` and the settings in rounds), :mod:`~bench.serve.protocols` (each protocol's
client and the echo's), :mod:`~bench.serve.echo` (the bare gRPC echo server),
:mod:`~bench.serve.report` (targets, protocol ratios, table, JSON)
and :mod:`~bench.serve.cli` (the options and one run, called by ``__main__``).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.serve ARGV``. Imported on call: ``python -m bench.serve.echo`` imports this
    package first, and a package that imported its submodules would have imported the echo too
    (runpy warns when the module it is about to run is already in ``sys.modules``)."""
    from bench.serve.cli import main as run

    return run(argv)
