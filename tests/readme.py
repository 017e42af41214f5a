"""The README's drop-in snippet, as the tests run it (in this environment and in a clean install).

The snippet is the ```python block between ``<!-- drop-in -->`` and ``<!-- /drop-in -->`` in README.md:
a rewrite of the README keeps the markers, and a change that breaks the snippet breaks the tests."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def drop_in_snippet() -> str:
    """The code of the README's drop-in snippet."""
    match = re.search(r"<!-- drop-in -->\s*```python\n(.*?)```\s*<!-- /drop-in -->", README.read_text(), re.S)
    assert match, "README.md lost its drop-in snippet (a ```python block between <!-- drop-in --> and <!-- /drop-in -->)"
    return match.group(1)
