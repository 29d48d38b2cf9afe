"""Entry point of erc_gym's verl plugin (group ``verl.plugins``), imported by ``import verl``.

verl imports every plugin in every process and logs an import error only at DEBUG level, after
which an ERC loss mode fails later as an unexplained "Unsupported loss mode". This module makes a
broken installation loud instead: it logs the error at ERROR level with its traceback, warns, and
registers ``erc_dapo`` / ``erc_gppo`` as stand-ins that raise it (chained) when a run selects them.

With ``ERC_GYM_VERL_ENTROPY=exact`` in the environment it also switches verl's entropy function
to erc_gym's exact one (:func:`erc_gym.integrations.verl.use_exact_entropy`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, NoReturn

_logger = logging.getLogger("erc_gym.integrations.verl")

#: Set when the real plugin failed to import; the stand-in losses re-raise it.
IMPORT_ERROR: BaseException | None = None


def _register_stand_ins(error: BaseException) -> None:
    from verl.trainer.ppo.core_algos import register_policy_loss

    def broken(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "erc_gym's verl plugin failed to import, so its ERC losses are unavailable: "
            f"{type(error).__name__}: {error}"
        ) from error

    for mode in ("erc_dapo", "erc_gppo"):
        register_policy_loss(mode)(broken)


try:
    from erc_gym.integrations import verl as _plugin

    if os.environ.get("ERC_GYM_VERL_ENTROPY", "").strip().lower() == "exact":
        _plugin.use_exact_entropy()
except Exception as exc:  # a plugin must not break `import verl`, but must not fail silently
    IMPORT_ERROR = exc
    _logger.error("erc_gym verl plugin failed to import: %s", exc, exc_info=True)
    warnings.warn(
        f"erc_gym verl plugin failed to import ({type(exc).__name__}: {exc}); the loss modes "
        "erc_dapo / erc_gppo will raise when used",
        RuntimeWarning,
        stacklevel=2,
    )
    try:
        _register_stand_ins(exc)
    except Exception:  # verl itself is unusable; its own import error is the one to read
        _logger.exception("erc_gym verl plugin: could not register the stand-in losses")
