"""How models and versions are named: the rule the repository layout, the server's ``--model``,
its RPCs and the client share. Plain Python (no protobuf), so a client imports it freely."""
from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_model_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def parse_version(text: str) -> int | None:
    """The version a directory name or a ``:VERSION`` suffix names: ASCII digits, > 0; else None
    (``str.isdigit`` alone would take Unicode digits such as ``"٣"``)."""
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    return None


def split_model_ref(ref: str) -> tuple[str, int | None]:
    """``("NAME", VERSION)`` for ``NAME:VERSION``; ``(ref, None)`` when ``ref`` has no valid
    ``:VERSION`` suffix (callers decide whether such a colon is an error or part of a name).
    A version in a name is written canonically: ``:01`` is no version."""
    base, sep, tail = ref.rpartition(":")
    version = parse_version(tail) if sep and base else None
    if version is not None and tail != str(version):
        version = None
    return (base, version) if version is not None else (ref, None)
