"""verl plugin entry point (``[project.entry-points."verl.plugins"] scope``).

verl imports every ``verl.plugins`` entry point at the end of ``import verl`` - on the driver, in the
TaskRunner and in every Ray worker - and swallows any exception with a debug-level log. So this
module never raises, and it imports nothing heavy: it registers the ``scope`` distillation loss
when verl's ``verl.trainer.distillation.losses`` is imported, and the ``scope`` trainer when
``verl.trainer.ppo.v1.trainer_base`` is (both hold the registries verl looks names up in, so the
entry is there before any lookup). Importing them eagerly here would add about 5 s of CPU to every
``import verl``, in processes (reward workers, rollout servers) that never use them. A part that
cannot be registered is reported at WARNING level; :func:`registered` says what is in place.
Importing this module without verl installed is a no-op.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

# verl module holding the registry -> our module whose register() fills it
HOOKS = {
    "verl.trainer.distillation.losses": "loss",
    "verl.trainer.ppo.v1.trainer_base": "trainer",
}
REGISTERED: dict[str, bool] = {"loss": False, "trainer": False}


def _register_part(part: str) -> None:
    if REGISTERED[part]:
        return
    try:
        importlib.import_module(f"{__package__}.{part}").register()
        REGISTERED[part] = True
    except Exception as exc:  # verl would hide it at debug level; a SCOPE run would then fail late and obscurely
        logger.warning("scope-opd verl plugin: could not register the 'scope' %s: %r", part, exc)


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the real loader, then registers our part into the module it just executed."""

    def __init__(self, loader, part: str):
        self.loader, self.part = loader, part

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_part(self.part)


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        part = HOOKS.get(name)
        if part is None or REGISTERED[part]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterLoad(spec.loader, part)
                return spec
        return None


def register() -> dict[str, bool]:
    """Register now for registries already imported, on import for the others; return :func:`registered`."""
    if importlib.util.find_spec("verl") is None:
        return registered()
    for module, part in HOOKS.items():
        if module in sys.modules:
            _register_part(part)
    if not all(REGISTERED.values()) and not any(isinstance(f, _RegistryImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryImportHook())
    return registered()


def registered() -> dict[str, bool]:
    return dict(REGISTERED)


register()
