"""`python -m build` makes a wheel and an sdist that install and import in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools instead of downloading one
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], check=True, capture_output=True)
    return out


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    # Make this environment's torch and numpy visible so that installing the package resolves
    # its dependencies without downloading several GB of torch again.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "host_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


SMOKE = (
    "import m3co_loss, torch, pathlib;"
    "z=[torch.randn(8,4),torch.randn(8,4)];"
    "print(m3co_loss.__version__, float(m3co_loss.M3CoLoss()(z)));"
    "assert (pathlib.Path(m3co_loss.__file__).parent/'py.typed').exists();"
    "assert 'site-packages' in m3co_loss.__file__"
)


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_distribution_installs_in_a_fresh_venv(dist, tmp_path, kind):
    files = list(dist.glob(f"m3co_loss-*.{kind}"))
    assert len(files) == 1, os.listdir(dist)
    python = fresh_venv(tmp_path / "venv")
    # a PYTHONPATH pointing at a checkout would shadow the installed package
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-build-isolation", str(files[0])], check=True, capture_output=True, cwd=tmp_path, env=env)
    result = subprocess.run([str(python), "-c", SMOKE], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.stdout.startswith("0.")
