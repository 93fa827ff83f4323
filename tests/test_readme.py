"""The README's examples, as a new user runs them.

1. Every ``python -m ...`` command in the README's bash blocks parses with its CLI's own parser:
   a renamed or removed flag fails here, whatever the example needs (files, GPUs, Docker).
2. The digits path is walked in README order, each command taken from the README's text, in a
   fresh folder: train, resume, train a second model, export fp32, int8 and a Triton repository,
   serve a pinned version, classify with the client CLI, the Python snippet and the stock
   Triton client snippet. Only what makes it quick changes: fewer epochs, port 0 and the
   address the server printed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.ready import parse_ready_line

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[list[str]]:
    """Each ``python -m`` / ``torchrun -m`` command of the README as argv without comments: the
    lines of its bash blocks, ``$ `` lines of its other blocks and inline `` `python -m ...` ``
    (those with a ``...`` placeholder left out)."""
    lines = []
    for block in blocks("bash"):
        lines += block.replace("\\\n", " ").splitlines()
    for block in blocks(""):
        lines += [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    # Inline mentions name a command; those with arguments are commands too.
    lines += [c for c in re.findall(r"`(python -m [^`]+)`", README.read_text()) if "..." not in c and c.count(" ") > 2]
    found = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        if "-m" in argv and argv[0] in ("python", "torchrun") and argv not in found:
            found.append(argv)
    return found


def readme_command(prefix: str, exact: bool = False) -> list[str]:
    """The one README command whose text starts with (or is) ``prefix``; fails if none or several."""
    matches = [argv for argv in commands()
               if (shlex.join(argv) == prefix if exact else shlex.join(argv).startswith(prefix))]
    assert len(matches) == 1, f"README commands starting with {prefix!r}: {matches}"
    return matches[0]


class _Parsed(Exception):
    pass


def _main_module(name: str):
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"python -m {name}: no such module"
    module = importlib.import_module(name)
    if spec.submodule_search_locations and not hasattr(module, "main"):
        module = importlib.import_module(name + ".__main__")  # guarded by __name__ == "__main__"
    return module


COMMANDS = commands()


@pytest.mark.parametrize("module", sorted(set(re.findall(r"`python -m ([\w.]+)", README.read_text()))))
def test_every_module_the_readme_names_has_a_cli(module):
    assert callable(getattr(_main_module(module), "main", None)), module


def test_the_readme_has_commands():
    modules = {argv[argv.index("-m") + 1] for argv in COMMANDS}
    assert {"zoo", "zoo.train", "export.onnx", "serve", "serve.client"} <= modules, modules


@pytest.mark.parametrize("argv", COMMANDS, ids=[shlex.join(a)[:90] for a in COMMANDS])
def test_every_readme_command_parses(argv, monkeypatch, capsys):
    i = argv.index("-m")
    module, args = argv[i + 1], argv[i + 2:]
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed):
        try:
            _main_module(module).main(args)
        except SystemExit as e:
            pytest.fail(f"{shlex.join(argv)}: exit {e.code}: {capsys.readouterr().err.strip()}")


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    assert argv[0] == "python"
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{shlex.join(argv)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with ``flag value`` (replacing the README's value when it gives one)."""
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digit_image(label: int, path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = digits.images[np.flatnonzero(digits.target == label)[0]]
    pixels = (img / 16.0 * 255).astype(np.uint8)
    Image.fromarray(pixels).convert("RGB").resize((64, 64), Image.NEAREST).save(path)


@pytest.mark.timeout(1800)
def test_readme_digits_path_in_order(tmp_path):
    cwd = tmp_path
    assert "resnext_mini" in _run(readme_command("python -m zoo list", exact=True), cwd)

    # Training: fewer epochs, otherwise as written (each run its own --out).
    _run(_with(readme_command("python -m zoo.train --out runs/digits"), "--epochs", "3"), cwd)
    _run(_with(readme_command("python -m zoo.train --resume runs/digits/last.pt"), "--epochs", "4"), cwd)
    _run(_with(readme_command("python -m zoo.train --model densenet_mini"), "--epochs", "1"), cwd)
    for out in ("runs/digits", "runs/densenet-gn"):
        assert (cwd / out / "best.pt").is_file(), out

    # Export: version 1 fp32, version 2 int8, then the Triton repository, exactly as written.
    _run(readme_command("python -m export.onnx --checkpoint runs/digits/best.pt --out models", exact=True), cwd)
    assert sorted(os.listdir(cwd / "models" / "resnext_mini")) == ["1", "labels.txt"]
    _run(readme_command("python -m export.onnx --checkpoint runs/digits/best.pt --out models --precision int8"), cwd)
    assert sorted(os.listdir(cwd / "models" / "resnext_mini")) == ["1", "2", "labels.txt"]
    _run(readme_command("python -m export.onnx --checkpoint runs/digits/best.pt --out triton-models"), cwd)
    assert (cwd / "triton-models" / "resnext_mini" / "config.pbtxt").is_file()

    # Serve version 1 pinned; port 0 and a free metrics port instead of the fixed ones.
    serve_argv = readme_command("python -m serve --model-dir models --model resnext_mini:1")
    serve_argv = _with(_with(serve_argv, "--port", "0"), "--metrics-port", str(_free_port()))
    server = subprocess.Popen([sys.executable, *serve_argv[1:]], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    try:
        ready = None
        for line in server.stdout:
            lines.append(line)
            ready = parse_ready_line(line)
            if ready is not None:
                break
        assert ready is not None, "".join(lines)
        assert "resnext_mini:1 fp32" in lines[-1], lines[-1]
        threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
        address = ready.address

        for name, label in (("cat.jpg", 3), ("dog.png", 7), ("a.jpg", 0), ("b.png", 1)):
            _digit_image(label, cwd / name)
        out = _run(_with(readme_command("python -m serve.client cat.jpg dog.png"), "--server", address), cwd)
        assert "cat.jpg" in out and "dog.png" in out, out
        out = _run(readme_command("python -m serve.client cat.jpg --model resnext_mini:1")
                   + ["--server", address], cwd)
        assert "resnext_mini" in out, out

        # The Python snippets, each in a process of its own (the client's and tritonclient's stubs
        # cannot share one), with the server's address.
        snippets = [b for b in blocks("python") if "serve.client import Classifier" in b or "tritonclient" in b]
        assert len(snippets) == 2, snippets
        for snippet in snippets:
            code = snippet.replace("127.0.0.1:50051", address)
            proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, f"{snippet}\n{proc.stdout}\n{proc.stderr}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0, "".join(lines)
