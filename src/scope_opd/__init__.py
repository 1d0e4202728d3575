"""scope_opd: SCOPE (Signal-Calibrated On-Policy Distillation Enhancement) on the Hugging Face stack.

The maths lives in :mod:`scope_opd.algorithms`; everything else calls it.
"""

from .algorithms import dual_path_weights, opd_weights, scope_loss, sequence_mean_logp

__version__ = "0.1.0"

__all__ = ["dual_path_weights", "opd_weights", "scope_loss", "sequence_mean_logp", "__version__"]
