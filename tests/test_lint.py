"""The code base passes ruff (line length 120), so style drift fails CI rather than review."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: run `make test`, which installs the dev extras")
    targets = [d for d in ("pipeline", "tests", "benchmarks") if (REPO / d).is_dir()]
    proc = subprocess.run([ruff, "check", *targets], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
