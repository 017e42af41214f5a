"""The distributions: `python -m build` makes a wheel and an sdist without deprecation warnings, `twine
check` accepts them, they hold the package and nothing else, and they install and run in fresh venvs:
the wheel next to nothing but torch and its requirements, running the README's drop-in snippet."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from readme import drop_in_snippet

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The build's output folder and what the build printed."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools instead of downloading one
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def dist(built):
    return built[0]


def only(folder: Path, pattern: str) -> Path:
    files = list(folder.glob(pattern))
    assert len(files) == 1, os.listdir(folder)
    return files[0]


def test_build_prints_no_deprecation_warning(built):
    _, output = built
    # File names such as m3co_loss/_deprecation.py appear in the copy log; the warnings do not name files.
    warnings = [line for line in output.splitlines() if "deprecat" in line.lower() and "_deprecation.py" not in line]
    assert not warnings, output


def test_twine_check_accepts_both_distributions(dist):
    files = [str(only(dist, "m3co_loss-*.whl")), str(only(dist, "m3co_loss-*.tar.gz"))]
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_distributions_hold_the_package_and_nothing_else(dist):
    wheel = zipfile.ZipFile(only(dist, "m3co_loss-*.whl")).namelist()
    assert "m3co_loss/py.typed" in wheel and "m3co_loss/__init__.py" in wheel
    tops = {name.split("/")[0] for name in wheel}
    assert tops == {"m3co_loss", f"m3co_loss-{metadata.version('m3co-loss')}.dist-info"}, tops
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel)

    with tarfile.open(only(dist, "m3co_loss-*.tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "m3co_loss/py.typed"} <= names
    leaked = sorted(n for n in names if n.split("/")[0] in {"tests", "examples", "benchmarks", "docs", "scripts", ".github"})
    assert not leaked, leaked


def test_metadata_has_the_spdx_licence_and_the_readme(dist):
    with zipfile.ZipFile(only(dist, "m3co_loss-*.whl")) as wheel:
        meta = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    headers, _, body = meta.partition("\n\n")
    assert "License-Expression: MIT" in headers and "License-File: LICENSE" in headers
    assert "Classifier: License ::" not in headers
    assert "Description-Content-Type: text/markdown" in headers
    assert body.strip() == (ROOT / "README.md").read_text().strip()


def requirement_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions of ``names`` and of everything they require (markers evaluated)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist = metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def fresh_venv(path: Path) -> tuple[Path, Path]:
    """A venv without pip or setuptools of its own (this environment's pip installs into it)."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    return python, Path(site)


def venv_with_only_torch(path: Path) -> Path:
    """A venv whose site-packages holds links to this environment's torch and what it requires, and
    nothing else: the package's requirements are met without downloading torch again, and an import
    of anything it does not declare fails."""
    python, site = fresh_venv(path)
    for dist in requirement_closure(["torch"]):
        for top in {file.parts[0] for file in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return python


CLEAN_INSTALL_RUN = f"""
import importlib.util, pathlib, torch, m3co_loss
assert importlib.util.find_spec("pytest") is None, "the venv should hold torch and its requirements only"
assert importlib.util.find_spec("numpy") is None, "the package must not need numpy (torch does not require it)"
assert "site-packages" in m3co_loss.__file__, m3co_loss.__file__
assert (pathlib.Path(m3co_loss.__file__).parent / "py.typed").exists()
{drop_in_snippet()}
assert criterion.phase() == "multisclip" and torch.isfinite(loss)
print(m3co_loss.__version__, float(loss))
"""


def pip(python: Path, *args: str) -> None:
    """``pip`` on the venv of ``python``, run by this environment's pip."""
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr


def clean_env() -> dict[str, str]:
    # a PYTHONPATH pointing at a checkout would shadow the installed package
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_wheel_installs_next_to_torch_alone_and_runs_the_readme_snippet(dist, tmp_path):
    python = venv_with_only_torch(tmp_path / "venv")
    # --no-deps, then `pip check`: the wheel's requirements must be met by the torch that is there.
    # pip never resolves here: under a pip constraint file that excludes this torch, resolving would
    # uninstall it, and the venv's torch is this environment's own, linked.
    pip(python, "install", "-q", "--no-index", "--no-deps", str(only(dist, "m3co_loss-*.whl")))
    pip(python, "check")
    result = subprocess.run([str(python), "-c", CLEAN_INSTALL_RUN], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(metadata.version("m3co-loss") + " ")


def test_sdist_builds_and_installs_in_a_fresh_venv(dist, tmp_path):
    python, site = fresh_venv(tmp_path / "venv")
    # This environment's packages (torch, setuptools) made visible: the sdist builds without
    # downloading a build backend, and installs without downloading torch again.
    Path(site, "host_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --no-deps: this environment's torch stays as it is (see the wheel's test)
    pip(python, "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", str(only(dist, "m3co_loss-*.tar.gz")))
    smoke = "import m3co_loss, torch; assert 'site-packages' in m3co_loss.__file__; print(float(m3co_loss.M3CoLoss()([torch.randn(8, 4), torch.randn(8, 4)])))"
    result = subprocess.run([str(python), "-c", smoke], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr


def test_readme_links_are_absolute_and_use_the_declared_urls():
    """PyPI renders README.md without the repository: a relative link or image would break there."""
    import re

    block = (ROOT / "pyproject.toml").read_text().split("[project.urls]\n", 1)[1].split("\n\n", 1)[0]
    urls = dict(re.findall(r'^(\w+) = "([^"]+)"$', block, flags=re.M))
    repo, docs = urls["Repository"], urls["Documentation"]
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/")
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets, "README.md has no links"
    for target in targets:
        assert target.startswith("https://"), f"README.md links to {target!r}: not absolute"
        if "m3co-loss" in target:
            assert target.startswith((repo, raw, docs.rstrip("/"))), f"{target!r} does not use the URLs in pyproject.toml"
    for target in targets:
        if target.startswith((f"{repo}/blob/main/", f"{raw}/main/")):
            path = target.split("/main/", 1)[1]
            assert (ROOT / path).exists(), f"README.md links to {path}, which is not in the repository"
    assert len(README_LINES := readme.splitlines()) <= 160, f"README.md has {len(README_LINES)} lines"
