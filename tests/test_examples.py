"""The examples a user would copy must run as shipped.

They run two at a time (one subprocess each, one torch thread each, so the two share the
cores without oversubscribing them), all started by the first test; each test waits for its own."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
SLOWEST = ("multi_adapter_serving.py", "qlora.py")  # inductor compiles: started first, side by side


def _run(script: str, cache: str) -> subprocess.CompletedProcess:
    # each its own inductor cache, so that no example loads kernels another process compiled (see .ci/run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with ThreadPoolExecutor(max_workers=2) as pool:
        order = sorted(SCRIPTS, key=lambda script: script not in SLOWEST)
        yield {script: pool.submit(_run, script, str(tmp_path_factory.mktemp("inductor"))) for script in order}


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, running):
    finished = running[script].result()
    assert finished.returncode == 0, finished.stderr[-3000:]
