"""Old module paths kept for one release: they warn once on import and forward every name.

The experiment tooling moved to :mod:`erc_gym.lab`; ``erc_gym.runner``, ``erc_gym.stress``,
``erc_gym.analysis``, ``erc_gym.plots``, ``erc_gym.report`` and ``erc_gym.experiment_config``
are thin modules built with :func:`warn_moved` and :func:`forward`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

__all__ = ["forward", "warn_moved"]


def warn_moved(old: str, new: str) -> None:
    """Warn (DeprecationWarning) that module ``old`` moved to ``new``; call from ``old``'s body.

    The warning names the line that imported ``old`` (``warnings`` skips importlib's frames), so
    Python's default filter, which shows DeprecationWarning for ``__main__`` only, shows it to a
    script that imports an old path.
    """
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import from {new}",
        DeprecationWarning,
        stacklevel=3,
    )


def forward(
    old: str, name: str, *modules: ModuleType, renamed: Mapping[str, str] | None = None
) -> Any:
    """Attribute ``name`` of the old module ``old``: found in ``modules`` (first match), under its
    new name where ``renamed`` maps it. Called from the old module's ``__getattr__``."""
    target = (renamed or {}).get(name, name)
    for module in modules:
        if hasattr(module, target):
            return getattr(module, target)
    raise AttributeError(f"module {old!r} has no attribute {name!r}")
