"""The contract sits at the bottom: it imports neither torch nor zoo, export or serve."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import contract

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch: a server holds only onnxruntime; the packages: they import the contract, not the other
# way round; onnx: a reader of metadata through onnxruntime alone never pays for it.
FORBIDDEN = ("torch", "zoo", "export", "serve", "bench", "onnx")
PUBLIC = ("contract.metadata", "contract.preprocess", "contract.repository")


def test_every_module_imports_with_torch_blocked():
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        "import contract\n"
        "names = [m.name for m in pkgutil.walk_packages(contract.__path__, 'contract.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} and sys.modules[m] is not None)\n"
        "print(' '.join(names))\n"
        "print(' '.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported, bad = (result.stdout.split("\n") + [""])[:2]
    assert set(PUBLIC) <= set(imported.split()), imported  # the walk really found the modules
    assert bad == "", f"importing contract imported {bad}"


def _imported_packages(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):  # function-level imports too: a lazy import is still a dependency
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_source_file_imports_the_packages_above():
    root = os.path.dirname(contract.__file__)
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py")]
    assert len(files) >= 4
    forbidden = set(FORBIDDEN) - {"onnx"}  # read_metadata imports onnx when called, on purpose
    for path in files:
        bad = _imported_packages(path) & forbidden
        assert not bad, f"{os.path.relpath(path, REPO_ROOT)} imports {', '.join(sorted(bad))}"
