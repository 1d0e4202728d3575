"""opd_loss on verl (issue 20): the plugin runs the paper's sampled-token OPD path only; a top-k opd_loss (or
teacher_top_k) in the YAML's scope block is refused by name, through verl's real Hydra config tree."""

import copy

import pytest
from omegaconf import OmegaConf

from scope_opd.integrations.verl.config import ScopeOptions, check_verl_config


def with_scope(config, key, value):
    config = copy.deepcopy(config)
    OmegaConf.update(config, f"scope.{key}", value, force_add=True)
    return config


@pytest.mark.parametrize("opd_loss", ["topk_reverse", "topk_forward"])
def test_top_k_opd_loss_is_refused_naming_the_key(paper_config, opd_loss):
    with pytest.raises(ValueError, match=rf"scope.opd_loss='{opd_loss}' is not supported on verl"):
        check_verl_config(with_scope(paper_config, "opd_loss", opd_loss))


def test_teacher_top_k_is_refused_naming_the_key(paper_config):
    with pytest.raises(ValueError, match="scope.teacher_top_k is not supported on verl"):
        check_verl_config(with_scope(paper_config, "teacher_top_k", 20))


def test_sampled_opd_loss_is_what_verl_runs(paper_config):
    assert check_verl_config(with_scope(paper_config, "opd_loss", "sampled")) == ScopeOptions()
