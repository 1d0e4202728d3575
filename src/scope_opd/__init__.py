"""scope_opd: SCOPE (Signal-Calibrated On-Policy Distillation Enhancement) on the Hugging Face stack.

The maths lives in :mod:`scope_opd.algorithms`; everything else calls it. ``SCOPEConfig`` and
``SCOPETrainer`` (which import TRL) are loaded on first access, so ``import scope_opd`` stays light.
"""

from .algorithms import dual_path_weights, opd_weights, scope_loss, sequence_mean_logp
from .version import __version__

__all__ = [
    "SCOPEConfig",
    "SCOPETrainer",
    "dual_path_weights",
    "opd_weights",
    "scope_loss",
    "sequence_mean_logp",
    "__version__",
]


def __getattr__(name):
    if name in ("SCOPEConfig", "SCOPETrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'scope_opd' has no attribute {name!r}")
