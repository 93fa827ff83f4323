"""The ready line of ``python -m serve``: what the server prints is what scripts parse."""
from __future__ import annotations

import pytest

from serve.ready import ReadyLine, http_part, parse_ready_line, ready_line, workers_ready_line


@pytest.mark.parametrize("host, port", [("127.0.0.1", 50051), ("0.0.0.0", 1), ("::1", 8001), ("localhost", 65535)])
def test_written_lines_parse_back(host, port):
    one = parse_ready_line(ready_line(host, port, "(plaintext); models a:1 fp32 (default); provider CPU") + "\n")
    shown = f"[{host}]" if ":" in host else host
    assert one == ReadyLine(host=shown, port=port, workers=1)
    assert one.address == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    many = parse_ready_line(workers_ready_line(3, host, port, "(pids 11, 12, 13; connections spread by SO_REUSEPORT)"))
    assert many == ReadyLine(host=shown, port=port, workers=3, pids=(11, 12, 13))


def test_a_forwarded_worker_line_parses_and_other_lines_do_not():
    assert parse_ready_line("[worker 1 pid 42] " + ready_line("127.0.0.1", 7, "(TLS)")).port == 7
    for line in ("python -m serve: warning: listening on 0.0.0.0 without TLS and a token: anyone who reaches it",
                 "python -m serve: draining: health NOT_SERVING, serving 1 s more",
                 "python -m serve: error: cannot listen on 127.0.0.1:80: the port is taken",
                 "listening on 127.0.0.1:50051 (plaintext)", ""):
        assert parse_ready_line(line) is None, line


@pytest.mark.parametrize("tls", [False, True])
def test_the_http_address_parses_back_and_older_lines_have_none(tls):
    details = "(plaintext); models http:1 fp32 (default); provider CPU; metrics http://127.0.0.1:9100/metrics"
    line = parse_ready_line(ready_line("::1", 50051, details) + http_part("::1", 8000, tls))
    assert (line.port, line.http_port) == (50051, 8000)
    assert line.http_url == ("https" if tls else "http") + "://[::1]:8000"
    workers = parse_ready_line("[worker 0 pid 9] " + workers_ready_line(2, "0.0.0.0", 7, "(pids 1, 2; x)")
                               + http_part("0.0.0.0", 8001, tls))
    assert (workers.workers, workers.http_port) == (2, 8001)
    older = parse_ready_line(ready_line("127.0.0.1", 50051, details))  # metrics' URL is not the HTTP port
    assert older.http_port is None and older.http_url is None
