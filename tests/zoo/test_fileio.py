"""zoo.fileio.atomic_write, the one atomic write of the tree, and the import layering it is part of."""
from __future__ import annotations

import ast
import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from zoo.fileio import TMP_PREFIX, atomic_write, file_sha256

ZOO = Path(__file__).resolve().parents[2] / "zoo"


def _leftovers(folder: Path) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith(TMP_PREFIX)]


def test_writes_bytes_and_text_into_a_new_folder_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write(path, "é\n")
    assert path.read_bytes() == "é\n".encode()
    atomic_write(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert not _leftovers(path.parent)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write(path, "old")

    def disk_full(*_):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert not _leftovers(tmp_path)


def test_new_files_get_the_mode_open_would_give(tmp_path):
    """0o666 less the umask (readable by a server running as another user), not mkstemp's 0o600."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "labels.txt", "cat\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "labels.txt").stat().st_mode) == 0o644


def test_concurrent_writers_of_one_path_each_write_whole_files(tmp_path):
    """Each writer has a temporary of its own: with one shared name, a writer renames away (or
    truncates) another's half-written file."""
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * (1 << 18) for i in range(6)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(15):
                atomic_write(path, data)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert path.read_bytes() in payloads
    assert not _leftovers(tmp_path)


def test_file_sha256_covers_every_block_of_a_file_larger_than_one_read(tmp_path):
    # 2.5 reads' worth, so a digest of the first block only (or of the last) differs.
    data = os.urandom((1 << 20) * 2 + 12345)
    path = tmp_path / "teacher.pt"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_sha256(path) != hashlib.sha256(data).hexdigest()


def test_fileio_imports_without_torch_so_torch_free_tools_can_use_it():
    code = "import sys, zoo.fileio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ZOO.parent).returncode == 0


def _zoo_imports() -> dict[str, set[str]]:
    """Every zoo module and the zoo modules it imports, at any depth of its code."""
    modules = {}
    for path in ZOO.rglob("*.py"):
        name = ".".join(path.relative_to(ZOO.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def test_zoo_has_no_import_circle():
    graph = _zoo_imports()
    assert graph["zoo.fileio"] == set()  # a leaf
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    edges = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(edges[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
