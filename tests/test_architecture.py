"""The house of docs/architecture.md: one-way layers, no cycles, no private imports across
modules, small modules, and a CLI that starts without the heavy libraries."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "embedpipe"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def test_layers_contract_is_kept():
    if shutil.which("lint-imports") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("import-linter is not installed (pip install -e '.[test]')")
        pytest.skip("import-linter is not installed")
    r = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_no_module_imports_itself_through_others():
    import grimp

    graph = grimp.build_graph("embedpipe", cache_dir=None)
    modules = sorted(graph.modules)
    cycles = []
    for m in modules:
        for other in graph.find_modules_directly_imported_by(m):
            if other != m and graph.chain_exists(importer=other, imported=m):
                chain = graph.find_shortest_chain(importer=other, imported=m)
                cycles.append(f"{m} -> {' -> '.join(chain)}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("embedpipe")):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    assert not found, "\n".join(found)


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["backbones", "--help"], ["index", "info", "--help"]])
def test_the_cli_starts_without_torch_faiss_or_sklearn(argv):
    code = (
        "import sys\n"
        "from embedpipe.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'faiss', 'sklearn', 'pandas', 'pyarrow', 'matplotlib') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_info_on_a_dataset_imports_neither_torch_nor_faiss(tmp_path):
    import numpy as np
    from conftest import tiny_dataset

    tiny_dataset(tmp_path / "emb", np.ones((1, 4)))
    code = (
        "import sys\n"
        "from embedpipe.cli import main\n"
        f"try:\n    main(['info', {str(tmp_path / 'emb')!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'faiss', 'sklearn') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
