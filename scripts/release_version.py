"""Print the package version, read from m3co_loss/_version.py (its one home), without importing torch.

The release workflow runs it with ``--tag`` and ``--notes`` before it builds anything, and stops on
exit status 1 with a message when the tag is not ``v`` + the version, or when CHANGELOG.md has no
dated section ``## [VERSION] - YYYY-MM-DD`` for it; ``--notes FILE`` writes that section's text
(the release notes) to FILE.

Usage: python scripts/release_version.py [--tag TAG] [--notes FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION_FILE = ROOT / "m3co_loss" / "_version.py"
CHANGELOG = ROOT / "CHANGELOG.md"


class ReleaseError(Exception):
    """The tag, the version or the changelog are not ready for a release."""


def package_version(path: Path = VERSION_FILE) -> str:
    """The ``__version__`` string assigned in ``path``."""
    match = re.search(r'^__version__ = "([^"]+)"$', path.read_text(), re.M)
    if match is None:
        raise ReleaseError(f"{path}: no line __version__ = \"...\"")
    return match.group(1)


def changelog_section(version: str, path: Path = CHANGELOG, *, dated: bool = True) -> str:
    """The text of the ``## [version]`` section of the changelog at ``path``, without its heading.

    Raises:
        ReleaseError: no such section, or (with ``dated``) its heading has no ``- YYYY-MM-DD`` date.
    """
    text = path.read_text()
    heading = re.search(rf"^## \[{re.escape(version)}\](.*)$", text, re.M)
    if heading is None:
        raise ReleaseError(f"{path.name} has no section '## [{version}]'")
    if dated and not re.fullmatch(r" - \d{4}-\d{2}-\d{2}\s*", heading.group(1)):
        raise ReleaseError(f"{path.name}: the heading of [{version}] needs the release date: '## [{version}] - YYYY-MM-DD'")
    following = re.search(r"^## ", text[heading.end():], re.M)
    body = text[heading.end(): heading.end() + following.start()] if following else text[heading.end():]
    return body.strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", help="release tag to check, e.g. v0.2.0")
    parser.add_argument("--notes", type=Path, help="write the version's dated changelog section to this file")
    args = parser.parse_args(argv)
    try:
        version = package_version()
        if args.tag is not None and args.tag != f"v{version}":
            raise ReleaseError(f"tag {args.tag!r} does not match the package version {version!r} (expected 'v{version}')")
        if args.notes is not None:
            args.notes.write_text(changelog_section(version))
    except ReleaseError as error:
        print(f"release_version: {error}", file=sys.stderr)
        return 1
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
