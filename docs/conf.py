"""Sphinx configuration for m3co-loss."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from m3co_loss import __version__  # noqa: E402

project = "m3co-loss"
author = "The m3co-loss developers"
copyright = "2026, The m3co-loss developers"
release = __version__
version = __version__

# myst_parser: the changelog page includes CHANGELOG.md
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode", "myst_parser"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
nitpicky = False
