"""``import verl`` loads the plugin (a fresh interpreter, as a Ray worker starts), and both registries hold ``scope``."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

PROBE = """
import json, sys, verl
heavy = sorted(m for m in ("verl.trainer.distillation.losses", "verl.trainer.ppo.v1.trainer_base") if m in sys.modules)
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY, DISTILLATION_SETTINGS_REGISTRY
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
out = {"loss": DISTILLATION_LOSS_REGISTRY.get("scope") is not None and
        DISTILLATION_LOSS_REGISTRY["scope"].__module__,
       "use_estimator": getattr(DISTILLATION_SETTINGS_REGISTRY.get("scope"), "use_estimator", None),
       "trainer": TRAINER_REGISTRY.get("scope") is not None and TRAINER_REGISTRY["scope"].__module__,
       "loaded_by_import_verl": heavy}
print("PROBE" + json.dumps(out))
"""


def probe(**env):
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE"):]), result.stderr


def test_entry_point_is_installed():
    (ep,) = [ep for ep in entry_points(group="verl.plugins") if ep.name == "scope"]
    assert ep.value == "scope_opd.integrations.verl.plugin"


def test_import_verl_registers_scope_loss_and_trainer():
    out, stderr = probe()
    # registered as soon as verl's registries are imported, and `import verl` itself stays light
    assert out == {"loss": "scope_opd.integrations.verl.loss", "use_estimator": True,
                   "trainer": "scope_opd.integrations.verl.trainer", "loaded_by_import_verl": []}, stderr[-2000:]
    assert "could not register" not in stderr


def test_without_plugins_verl_has_no_scope():
    # The same probe with verl's plugin discovery off: what the first test sees comes from the entry point.
    out, _ = probe(VERL_USE_EXTERNAL_PLUGINS="none")
    assert out == {"loss": False, "use_estimator": None, "trainer": False, "loaded_by_import_verl": []}


def test_plugin_imports_and_registers_twice_without_error():
    import verl  # noqa: F401  (loads the plugin)
    import verl.trainer.distillation.losses  # noqa: F401  (the registries: the plugin registers on their import)
    import verl.trainer.ppo.v1.trainer_base  # noqa: F401
    from scope_opd.integrations.verl import plugin

    assert plugin.registered() == {"loss": True, "trainer": True}
    assert plugin.register() == {"loss": True, "trainer": True}
    from scope_opd.integrations.verl import loss, trainer

    loss.register()
    trainer.register()


def test_package_import_pulls_no_verl():
    code = "import sys, scope_opd.integrations.verl, scope_opd.integrations.verl.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'ray')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
