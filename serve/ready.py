"""The line ``python -m serve`` prints once it listens, written and read in one place.

Scripts and tests wait for it and take the port from it::

    python -m serve: listening on 127.0.0.1:50051 (plaintext); models resnext_mini:3 fp16 (default); ...
    python -m serve: 2 workers listening on 127.0.0.1:50051 (pids 11, 12; connections spread by SO_REUSEPORT)

With HTTP on (``--http-port``), the line ends with ``; http http://127.0.0.1:8000/`` (``https``
under TLS): the REST API and the page. Older lines, without it, still parse.

Imports nothing of the server: a script that only starts one and reads its output stays light.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PROG = "python -m serve"
# Host: a bracketed IPv6 address or anything without blanks and colons; then the port.
_READY_RE = re.compile(r"^(?:\[worker \d+ pid \d+\] )?" + re.escape(PROG)
                       + r": (?:(\d+) workers )?listening on (\[[^\]]+\]|[^\s:\[\]]+):(\d+)\b"
                       r"(?: \(pids ([\d, ]+);)?")
# Last on the line, so a model or path named "http" earlier on it cannot be taken for it.
_HTTP_RE = re.compile(r"; http (https?)://(\[[^\]]+\]|[^\s:\[\]/]+):(\d+)/$")


@dataclass(frozen=True)
class ReadyLine:
    host: str  # as printed: an IPv6 address keeps its brackets
    port: int
    workers: int  # 1 for a single server
    pids: tuple[int, ...] = ()  # the workers' process ids (a --workers line only)
    http_port: int | None = None  # the HTTP/REST port, None when HTTP is off
    http_scheme: str = "http"

    @property
    def http_url(self) -> str | None:
        """``http://HOST:PORT`` of the REST API and the page, or None."""
        return None if self.http_port is None else f"{self.http_scheme}://{self.host}:{self.http_port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def ready_line(host: str, port: int, details: str) -> str:
    return f"{PROG}: listening on {address(host, port)} {details}"


def workers_ready_line(workers: int, host: str, port: int, details: str) -> str:
    return f"{PROG}: {workers} workers listening on {address(host, port)} {details}"


def http_part(host: str, port: int, tls: bool = False) -> str:
    """What a ready line ends with when HTTP is on."""
    return f"; http {'https' if tls else 'http'}://{address(host, port)}/"


def parse_ready_line(line: str) -> ReadyLine | None:
    """The address in a ready line of ``python -m serve`` (a worker's forwarded one too), or None
    for any other line."""
    match = _READY_RE.match(line.strip())
    if match is None:
        return None
    workers, host, port, pids = match.groups()
    http = _HTTP_RE.search(line.strip())
    return ReadyLine(host=host, port=int(port), workers=int(workers or 1),
                     pids=tuple(int(p) for p in pids.split(", ")) if pids else (),
                     http_port=int(http.group(3)) if http else None, http_scheme=http.group(1) if http else "http")
