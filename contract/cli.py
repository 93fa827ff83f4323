"""What every command line of the project shares: help that shows each default once."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no ``(default: None)`` / ``(default: False)``
    / ``(default: )`` for options without a real default, and no second default for a help text
    that already names its own (``(default bn; a checkpoint brings its own)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
