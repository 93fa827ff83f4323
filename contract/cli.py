"""What every command line of the project shares: help that shows each default once, and the
tables they print (terminal text and markdown)."""
from __future__ import annotations

import argparse
from typing import Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no ``(default: None)`` / ``(default: False)``
    / ``(default: )`` for options without a real default, and no second default for a help text
    that already names its own (``(default bn; a checkpoint brings its own)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def text_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns two spaces apart under a dashed rule; the first column left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (cells as given: no escaping of ``|``)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)
