"""Sphinx configuration for m3co-loss."""

import os
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS))

from m3co_loss import __version__  # noqa: E402

project = "m3co-loss"
author = "The m3co-loss developers"
copyright = "2026, The m3co-loss developers"
release = __version__
version = __version__

# myst_parser: the changelog page includes CHANGELOG.md
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx_copybutton",
    "myst_parser",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build", "_generated"]
nitpicky = True  # every cross-reference must resolve, except these:
nitpick_ignore_regex = [
    # PyTorch's objects: links through intersphinx when its inventory is at hand (see below),
    # plain text offline; torch._C names have no entry even then
    (r"py:.*", r"torch(\..*)?"),
    # short names of PyTorch types in signatures, and torch's own docstring of Module.forward,
    # inherited by the modules' forward methods
    ("py:class", r"Tensor|Module|ProcessGroup"),
    # private modules and type aliases, not in the API reference
    (r"py:.*", r"m3co_loss(\.\w+)*\._\w+(\.\w+)*"),
    ("py:class", r"LogSumExpFn|SoftTargetSumFn"),
    # the modules' learnable parameters, not documented as attributes
    ("py:attr", r"(multisclip_)?logit_scale"),
    # napoleon reads the docstring of the property M3CoLoss.m3co_steps, "Number of steps spent on
    # M3Co (None: M3Co throughout).", as "type: text"
    ("py:class", r"Number|steps spent on M3Co"),
]

html_theme = "furo"  # follows the reader's light or dark setting, with a toggle
html_title = f"m3co-loss {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# a block with ">>> " / "... " / "$ " prompts copies only its prompt lines, without the prompts
# (the printed output is left out); a block without prompts copies whole
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# MathJax comes from Sphinx's default CDN. M3CO_DOCS_MATHJAX (a URL, e.g. file:///.../tex-mml-chtml.js)
# overrides it so that formulas render in a browser without internet access
# (scripts/screenshot_docs.sh uses it).
if os.environ.get("M3CO_DOCS_MATHJAX"):
    mathjax_path = os.environ["M3CO_DOCS_MATHJAX"]

# ----------------------------------------------------------------------------- intersphinx
# Links to Python and PyTorch objects need those projects' inventories (objects.inv), fetched
# over the network. Offline (CI reaches only package registries) Sphinx would warn that it
# failed to reach them, which -W turns into a failed build, and that warning cannot be
# silenced by type. So the inventories are fetched here, before Sphinx asks: each one that
# downloads within a few seconds is kept under _build/intersphinx/ and handed to Sphinx as a
# local file (a later offline build reuses it); one that cannot be had is left out of the
# mapping, and references to it render as plain text instead of links. Set
# M3CO_DOCS_OFFLINE=1 to skip the attempt.
INTERSPHINX_SOURCES = {
    "python": "https://docs.python.org/3",
    "torch": "https://pytorch.org/docs/stable",
}
INTERSPHINX_CACHE = DOCS / "_build" / "intersphinx"


def _inventory(name: str, url: str):
    cached = INTERSPHINX_CACHE / f"{name}.inv"
    if os.environ.get("M3CO_DOCS_OFFLINE") != "1":
        try:
            with urllib.request.urlopen(f"{url}/objects.inv", timeout=5) as response:
                data = response.read()
            if not data.startswith(b"# Sphinx inventory version"):
                raise ValueError("not an inventory")  # e.g. a proxy's error page
            INTERSPHINX_CACHE.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
        except (OSError, ValueError):
            pass  # unreachable: an earlier download, if any, still serves
    return (url, str(cached)) if cached.is_file() else None


with ThreadPoolExecutor(len(INTERSPHINX_SOURCES)) as _pool:
    _found = dict(zip(INTERSPHINX_SOURCES, _pool.map(_inventory, INTERSPHINX_SOURCES, INTERSPHINX_SOURCES.values())))
intersphinx_mapping = {name: found for name, found in _found.items() if found is not None}
intersphinx_missing = sorted(set(INTERSPHINX_SOURCES) - set(intersphinx_mapping))
intersphinx_timeout = 5


# ----------------------------------------------------------------------------- figures
# The pictures are drawn from the stored result files at every build (docs/figures.py; a figure
# whose sources did not change since it was drawn is kept), so a page can never show a figure
# that disagrees with the results in the tree. They go to _generated/, which git ignores.
FIGURES = DOCS / "_generated" / "figures"


def _draw_figures(app) -> None:
    import figures
    from sphinx.util import logging

    log = logging.getLogger("m3co_loss.docs")
    try:
        drawn = figures.build_all(FIGURES)
    except figures.ResultFileError as err:
        # one line naming the file (and a failed -W build), not Sphinx's extension-crash report
        log.error(f"figures: {err}")
        return
    log.info(f"figures: drew {', '.join(p.name for p in drawn) or 'none (all up to date)'}")
    if intersphinx_missing:
        log.info(f"intersphinx: no inventory for {', '.join(intersphinx_missing)} (offline): those references are plain text")


def _keep_short_cells_on_one_line(app, doctree, docname) -> None:
    # A narrow column of a wide results table breaks "79.8 ± 2.2" over three lines; short body
    # cells get the class "nowrap" (custom.css) instead, and a table too wide for the text
    # column scrolls sideways. Longer cells (prose) still wrap.
    from docutils import nodes

    for entry in doctree.findall(nodes.entry):
        if isinstance(entry.parent.parent, nodes.tbody) and len(entry.astext()) <= 24:
            entry["classes"].append("nowrap")


def setup(app):
    app.connect("builder-inited", _draw_figures)
    app.connect("doctree-resolved", _keep_short_cells_on_one_line)
