"""Deprecated module paths that forward to their new homes with a ``DeprecationWarning``.

A deprecated module defines a module-level ``__getattr__`` (PEP 562) from :func:`forwarding_getattr`
for the names that moved, and calls :func:`forward_options` for its former tuning globals
(``kernels.TILE_ROWS``): reading one returns the current option of
:func:`m3co_loss.backends.get_config`, assigning one sets it through
:func:`m3co_loss.backends.set_config` (``monkeypatch.setattr`` included).
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any, Callable, Mapping, Tuple

from .backends import _config

__all__ = ["forwarding_getattr", "forward_options"]

REMOVAL = "and will be removed in the next minor release"

# old name -> (what to use instead, a function returning the new object)
Moved = Mapping[str, Tuple[str, Callable[[], Any]]]


def _warn(old: str, new: str) -> None:
    # stacklevel 3: the user's line, above the forwarding function and this one
    warnings.warn(f"{old} is deprecated {REMOVAL}; use {new}", DeprecationWarning, stacklevel=3)


def forwarding_getattr(module: str, moved: Moved) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for ``module``: each moved name warns and returns the new object."""

    def __getattr__(name: str) -> Any:
        if name in moved:
            new, get = moved[name]
            _warn(f"{module}.{name}", new)
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def _option_property(module: str, name: str, option: str) -> property:
    def read(self: types.ModuleType) -> Any:
        _warn(f"{module}.{name}", f"m3co_loss.backends.get_config().{option}")
        return getattr(_config.get_config(), option)

    def write(self: types.ModuleType, value: Any) -> None:
        _warn(f"setting {module}.{name}", f"m3co_loss.backends.set_config({option}=...)")
        _config._replace({option: value})

    return property(read, write)


def forward_options(module: str, options: Mapping[str, str]) -> None:
    """Make ``module``'s former tuning globals (old name -> option) read and set the backend options."""
    namespace = {name: _option_property(module, name, option) for name, option in options.items()}
    sys.modules[module].__class__ = type(f"_Deprecated_{module.replace('.', '_')}", (types.ModuleType,), namespace)
