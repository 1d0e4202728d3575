"""The private TRL internals SCOPETrainer relies on. If TRL changes them, these fail loudly.

SCOPETrainer overrides GRPOTrainer methods and reads the dict that
``_generate_and_score_completions`` returns. TRL is pinned exactly in pyproject.toml;
before bumping the pin, run this file against the new version and adapt trainer.py.
"""

from __future__ import annotations

import inspect

import trl
from trl import GRPOConfig, GRPOTrainer

PINNED_TRL = "1.16.0"


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_trl_version_is_the_pinned_one():
    assert trl.__version__ == PINNED_TRL, (
        f"TRL {trl.__version__} installed but scope_opd is pinned to {PINNED_TRL}; "
        "re-check tests/test_trl_internals.py and trainer.py before changing the pin"
    )


def test_overridden_method_signatures():
    assert params(GRPOTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert params(GRPOTrainer._calculate_rewards) == ["self", "inputs", "prompts", "completions", "completion_ids_list"]
    assert params(GRPOTrainer._generate) == ["self", "prompts"]
    assert params(GRPOTrainer.training_step) == ["self", "model", "inputs", "num_items_in_batch"]
    logp_params = params(GRPOTrainer._get_per_token_logps_and_entropies)
    assert logp_params[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"]
    assert "batch_size" in logp_params and "compute_entropy" in logp_params


def test_loss_is_scaled_for_gradient_accumulation_by_the_trainer():
    # SCOPETrainer divides by the generation batch's token count itself; the parent must not rescale.
    assert GRPOTrainer.loss_is_scaled_for_ga is True


def test_generation_batch_is_shuffled_then_split_after_scoring():
    # Our weights are computed inside _generate_and_score_completions, i.e. before this shuffle/split.
    source = inspect.getsource(GRPOTrainer._prepare_inputs)
    scored = source.index("_generate_and_score_completions(")
    assert scored < source.index("shuffle_sequence_dict(") < source.index("split_tensor_dict(")


def test_generate_and_score_returns_the_keys_we_read():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"):
        assert f'"{key}"' in source, key
    assert 'output["old_per_token_logps"]' in source
    # Rewards are gathered across processes before slicing to the local rows.
    assert "rewards_per_func = self._calculate_rewards(" in source
    assert "process_slice = slice(" in source


def test_config_fields_we_use_exist():
    fields = GRPOConfig.__dataclass_fields__
    for name in ("num_generations", "steps_per_generation", "generation_batch_size", "temperature", "beta",
                 "max_completion_length", "mask_truncated_completions", "top_p", "top_k", "use_vllm"):
        assert name in fields, name


def test_helpers_we_import_exist():
    from trl.models import prepare_deepspeed, prepare_fsdp  # noqa: F401
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict  # noqa: F401


def test_fused_lm_head_is_an_instance_forward_with_the_temperature_baked_in():
    # student_logprob_temperature deletes the instance `forward` TRL installs and re-adds the head.
    from trl.trainer.utils import add_fused_lm_head

    assert params(add_fused_lm_head)[:4] == ["model", "temperature", "cast_lm_head_to_fp32", "outputs"]
    source = inspect.getsource(add_fused_lm_head)
    assert "model.forward = types.MethodType(" in source
    init = inspect.getsource(GRPOTrainer.__init__)
    assert "add_fused_lm_head(" in init and "temperature=self.temperature" in init


def test_tensors_with_a_batch_dimension_are_shuffled_and_split():
    # So SCOPETrainer passes its global denominators as 0-dim tensors (scope_num_items_mle / _opd).
    import torch
    from trl.trainer.utils import shuffle_sequence_dict

    out = shuffle_sequence_dict({"x": torch.arange(4), "n": torch.tensor(7.0)})
    assert out["n"].item() == 7.0 and sorted(out["x"].tolist()) == [0, 1, 2, 3]


def test_vllm_importance_sampling_ratio_is_what_grpo_multiplies_its_token_loss_by():
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'per_token_loss * inputs["importance_sampling_ratio"]' in source
    assert "vllm_importance_sampling_correction" in GRPOConfig.__dataclass_fields__
    assert "epsilon" in GRPOConfig.__dataclass_fields__ and "epsilon_high" in GRPOConfig.__dataclass_fields__


def test_resume_internals_scope_saves_and_restores():
    # scope_opd.checkpointing.epoch_seeded rebuilds TRL's train sampler from these attributes and
    # reseeds its generator per epoch; SCOPETrainer saves `_step` and `_buffered_inputs` with each
    # checkpoint because _prepare_inputs picks the buffered slice by `_step` (see trainer.py, resume block).
    from trl.trainer.utils import RepeatSampler

    sampler = RepeatSampler(list(range(4)), mini_repeat_count=2, batch_size=2, repeat_count=1, seed=0)
    for name in ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed", "generator"):
        assert hasattr(sampler, name), name
    assert "RepeatSampler(" in inspect.getsource(GRPOTrainer._get_train_sampler)
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "self._step % generate_every == 0 or self._buffered_inputs is None" in prepare
    assert "self._buffered_inputs[self._step % self.args.steps_per_generation]" in prepare
    assert "self._step += 1" in inspect.getsource(GRPOTrainer.training_step)
    # transformers calls set_epoch on the sampler under accelerate's batch sampler every epoch.
    from transformers import Trainer

    assert "underlying_sampler.set_epoch(epoch)" in inspect.getsource(Trainer._run_epoch)
