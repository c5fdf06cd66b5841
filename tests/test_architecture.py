"""The layered layout of STYLE.md, enforced by import-linter's layers contract."""

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_layers_contract_is_kept():
    root = Path(__file__).parent.parent
    r = subprocess.run(["lint-imports"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
