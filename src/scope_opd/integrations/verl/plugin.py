"""verl plugin entry point (``[project.entry-points."verl.plugins"] scope``).

verl imports every ``verl.plugins`` entry point at the end of ``import verl`` - on the driver, in the
TaskRunner and in every Ray worker - and swallows any exception with a debug-level log. So this
module never raises: it registers the ``scope`` distillation loss and the ``scope`` trainer, and if
a part cannot be imported it says so at WARNING level (``registered()`` reports what is in place;
tests assert it). Importing it without verl installed is a no-op.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

REGISTERED: dict[str, bool] = {"loss": False, "trainer": False}


def register() -> dict[str, bool]:
    """Register what can be registered; return ``{"loss": bool, "trainer": bool}``."""
    if importlib.util.find_spec("verl") is None:
        return dict(REGISTERED)
    for part in ("loss", "trainer"):
        if REGISTERED[part]:
            continue
        try:
            module = importlib.import_module(f"{__package__}.{part}")
            module.register()
            REGISTERED[part] = True
        except Exception as exc:  # verl would hide it at debug level; a SCOPE run then fails late and obscurely
            logger.warning("scope-opd verl plugin: could not register the 'scope' %s: %r", part, exc)
    return dict(REGISTERED)


def registered() -> dict[str, bool]:
    return dict(REGISTERED)


register()
