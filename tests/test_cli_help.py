"""Every command's --help: each option states its default at most once, and never as None/False/empty."""
from __future__ import annotations

import importlib
import re

import pytest

COMMANDS = ["zoo.train", "zoo.eval", "zoo.experiments", "export.onnx", "serve.__main__", "serve.client", "bench.export",
            "bench.latency", "bench.serve", "bench.demo", "bench.optim"]


def help_text(module: str, capsys) -> str:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> list[str]:
    """One block per option: its line and the indented continuation lines of its help."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"^\s{2}-", line) or re.match(r"^\s{2}\w", line) and not line.startswith("    "):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("module", COMMANDS)
def test_help_shows_each_default_once(module, capsys):
    text = help_text(module, capsys)
    for noise in ("(default: None)", "(default: False)", "(default: )"):
        assert noise not in text, f"{module}: {noise}"
    for block in option_blocks(text):
        words = re.sub(r"--[\w-]+", "", block)  # an option may be named --default-...
        assert len(re.findall(r"\bdefault\b", words, re.IGNORECASE)) <= 1, f"{module}: {block}"
