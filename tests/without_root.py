"""Run a command as if it were not root, for the read-only faults of issue 13.

Root ignores file permissions (CAP_DAC_OVERRIDE), so a folder without write permission stops
nothing in a test run as root. The command runs under ``setpriv`` with those capabilities out
of its bounding set: still uid 0 (so it can read the root-owned virtual environment and test
folders), but a file mode without write permission now applies to it. As another user the
command simply runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DROP = "-dac_override,-dac_read_search,-fowner"


def run_without_root_permissions(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` (this interpreter, this checkout on PYTHONPATH) without root's permission
    override; skips the test where that cannot be arranged."""
    command = [sys.executable, *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file permissions cannot be tested")
        command = ["setpriv", f"--bounding-set={DROP}", *command]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def read_only(folder: Path) -> Path:
    """``folder`` made (if needed) and left without write permission; undo with ``writable``."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    return folder


def writable(folder: Path) -> None:
    folder.chmod(0o755)
