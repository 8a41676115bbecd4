"""The examples a user would copy must run as shipped.

They start together (one subprocess each, sharing the cores) and each test waits for its own:
most of an example's time is imports and compilation, which overlap well."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))


@pytest.fixture(scope="module")
def running():
    processes = {script: subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", script)], cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for script in SCRIPTS}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, running):
    _, stderr = running[script].communicate(timeout=900)
    assert running[script].returncode == 0, stderr[-3000:]
