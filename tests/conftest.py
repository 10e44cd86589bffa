"""Shared test helpers."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# No test reads or writes the user's tuning cache (bspfuse.tune.cache_path): the tests' own, empty, for the run.
os.environ["BSPFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bspfuse-cache-")


@pytest.fixture
def run_script():
    """Run a Python script in a fresh process without Triton's interpreter (so kernels compile for a real
    target: sm_90 here, no GPU needed); return the JSON its last output line holds. `ROOT` is defined
    for the script."""
    def run(script: str):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BSPFUSE_FAST_LAUNCH")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        done = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + script], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run
