"""Run one of the Triton check scripts of tests/ in a subprocess and return its JSON report.

The scripts (``triton_parity.py``, ``triton_compile.py``, ``triton_precision.py``,
``targets_triton.py``) run under Triton's CPU interpreter by default, which must be chosen before
triton is imported, hence the subprocess; ``device="cuda"`` runs the same checks compiled for the
GPU instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_check_script(script: str, *, device: str = "cpu", timeout: float = 900, **extra_env: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), M3CO_TEST_DEVICE=device, **extra_env)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
