"""SCOPEConfig and SCOPETrainer: SCOPE, OPD and GRPO on top of TRL's GRPOTrainer.

One training step, top to bottom (paper section 2; shared/SCOPE_METHOD.md):

1. rollout   - TRL samples G completions per prompt (transformers or vLLM).
2. verify    - TRL calls the reward functions (our verifiers); reward >= threshold is "correct".
3. old logp  - student log-probs of the sampled tokens under the sampling policy.
               (``student_logprob_source='sampler'``: vLLM's, for the weights only.)
4. teacher   - teacher log-probs of those tokens (incorrect rows for SCOPE, all rows for OPD).
5. weights   - :func:`scope_opd.algorithms.dual_path_weights` over whole prompt groups,
               gathered across processes, *before* TRL shuffles and splits the batch.
6. loss      - :func:`scope_opd.algorithms.scope_loss` on each micro-batch.
7. update    - TRL / transformers optimiser step (accelerate, DeepSpeed, FSDP, PEFT as usual).

``algorithm="grpo"`` leaves steps 3-6 to TRL's own GRPO loss, so the three algorithms share
data, seeds and generation. The trainer only gathers tensors; all maths is in ``algorithms.py``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .algorithms import (
    AGGREGATIONS,
    NORMALIZATIONS,
    OPD_ADVANTAGES,
    OPD_LOSSES,
    STUDENT_WEIGHTINGS,
    TEACHER_WEIGHTINGS,
    loss_denominators,
    scope_loss,
    student_tail_log_mass,
    topk_opd_token_loss,
)
from .batch import needs_student_logp, path_weights, row_statistics, teacher_rows, verdicts, weight_metrics
from .checkpointing import AtomicCheckpointMixin

ALGORITHMS = ("scope", "opd", "grpo", "kd")
OFF_POLICY_CLIPS = ("none", "ppo", "authors")
STUDENT_LOGPROB_SOURCES = ("forward", "sampler")
# vLLM sampling parameters after which its processed log-probs are not the tempered model's
SAMPLER_RESHAPING_KWARGS = ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                            "frequency_penalty", "logit_bias", "allowed_token_ids", "bad_words")
AGGREGATION_HELP = (
    "How each path's summed token losses are normalised (counts over the whole generation batch, all processes): "
    "'authors' (default; the authors' verl code): MLE path / masked tokens of correct rows + OPD path / all masked "
    "tokens; 'path-token-mean': each path / its own path's masked tokens; 'token-mean': both paths / all masked "
    "tokens; 'sum': plain token sums of what the optimiser step trains on (paper's equations); "
    "'seq-mean-token-sum' / 'seq-mean-token-mean': per-row sums / means, averaged over non-empty rows."
)


@dataclass
class SCOPEConfig(GRPOConfig):
    r"""Configuration for :class:`SCOPETrainer`: every ``GRPOConfig`` field plus SCOPE's.

    Defaults follow the paper's Table 3 where it gives one (lr 5e-5 constant, weight decay 0.01,
    rollout temperature 0.6, G = 8, tau = 1.0); everything else is TRL's default.

    ``algorithm``:
      * ``"scope"``: dual-path adaptive weighting (paper eqs. 4-7).
      * ``"opd"``: plain on-policy distillation - every rollout on the teacher path with weight 1,
        the verifier is only logged. The paper's OPD run samples **one** rollout per prompt; TRL's
        GRPO needs at least two, so for ``opd`` this config also accepts ``num_generations=1``
        (set it, with the same number of sampled sequences per step, to match the paper; with
        G > 1 OPD sees G samples of each prompt per step, which is what the demo uses so that all
        methods consume the same rollouts).
      * ``"grpo"``: TRL's own GRPO loss, untouched (paper baseline: clip 0.2, KL coefficient 1e-4).
      * ``"kd"``: offline KD baseline (teacher samples -> SFT), run by ``scope_opd.kd``, not by this trainer.
    """

    algorithm: str = field(default="scope", metadata={"help": f"One of {ALGORITHMS}."})
    tau: float = field(default=1.0, metadata={"help": "DPAW weight temperature tau (paper default 1.0; C.2 sweeps 0.5/1/2)."})
    weight_normalization: str = field(
        default="mean",
        metadata={
            "help": "'mean': a path's weights in a group sum to its size (authors' code, lone row gets 1); "
            "'sum': they sum to 1 (paper's equations)."
        },
    )
    student_weighting: str = field(
        default="perplexity",
        metadata={
            "help": "Correct path: 'perplexity' (paper eq. 4, high student PPL weighs more), 'inverse' "
            "(authors' released script), 'uniform' (ablation w/o student-guided weight)."
        },
    )
    teacher_weighting: str = field(
        default="inverse_perplexity",
        metadata={
            "help": "Incorrect path: 'inverse_perplexity' (paper eq. 5, low teacher PPL weighs more), "
            "'perplexity' (reversed ablation), 'uniform' (ablation w/o teacher-guided weight)."
        },
    )
    loss_aggregation: str = field(default="authors", metadata={"help": AGGREGATION_HELP})
    correct_threshold: float = field(
        default=1.0, metadata={"help": "A rollout is correct when its verdict reward (see verdict_reward) is >= this."}
    )
    verdict_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name (among the trainer's reward_func_names) of the reward that decides correct/incorrect for "
            "scope and opd; the other rewards are only logged (GRPO still sums them all, as TRL does). Default: the "
            "only reward function (the built-in verifier when reward_funcs is not given); required with several."
        },
    )
    off_policy_clip: str = field(
        default="none",
        metadata={
            "help": "Ratio clipping for scope/opd when rollouts are reused (num_iterations > 1 or steps_per_generation "
            "> gradient_accumulation_steps): 'none' (paper's surrogate, rho unclipped), 'ppo' (TRL's epsilon / "
            "epsilon_high PPO clip on both paths), 'authors' (the authors' code: PPO clip epsilon with dual clip "
            "`dual_clip` on the OPD path, MLE path -w*logp without ratio, and opd_advantage 'old' unless set)."
        },
    )
    dual_clip: float = field(default=3.0, metadata={"help": "Dual-clip constant (> 1) of off_policy_clip='authors'."})
    opd_advantage: str | None = field(
        default=None,
        metadata={
            "help": "The OPD path's per-token advantage -w_tea * (student - teacher log-prob), with the student's log-prob "
            "taken at the 'current' parameters (the paper's surrogate) or fixed from the sampling policy, 'old' (the "
            "authors' code). They differ only on reused rollouts. None (default): 'old' with off_policy_clip='authors', "
            "else 'current'. An explicit value is honoured with any off_policy_clip."
        },
    )
    student_logprob_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Temperature of the student's log-probs in the student-guided weights, the importance ratio and "
            "the OPD log-ratio (scope/opd). None (default, as the authors' code and verl): the rollout temperature "
            "(TRL's tempered logits). 1.0: the student's own distribution, like the teacher's (temperature 1)."
        },
    )
    # ---- top-k OPD losses (issue 20; docs/top-k.md)
    opd_loss: str = field(
        default="sampled",
        metadata={
            "help": "The OPD (incorrect) path's per-token loss: 'sampled' (default, the paper: the sampled token's "
            "log-ratio), 'topk_reverse' (the authors' release option: reverse KL from the student to the teacher, both "
            "renormalised on the teacher's top-k tokens), 'topk_forward' (forward KL over the teacher's top-k plus one "
            "tail bucket). Each row's loss is weighted by SCOPE's teacher weight (eq. 5, from the sampled tokens). The "
            "top-k options need off_policy_clip='none' and opd_advantage unset or 'current'.",
            "choices": OPD_LOSSES,
        },
    )
    teacher_top_k: int = field(
        default=20, metadata={"help": "Teacher tokens per position for opd_loss='topk_*' (K; at most the vocabulary size, and >= 2 for topk_reverse)."}
    )
    # ---- end top-k OPD losses
    # Teacher
    teacher_model: str | None = field(default=None, metadata={"help": "Teacher hub id or local path (in-process)."})
    teacher_dtype: str = field(default="auto", metadata={"help": "Teacher dtype: auto, bfloat16, float16, float32."})
    teacher_batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward (in-process)."})
    teacher_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature applied to the teacher's logits (in-process only). 1.0 = the teacher's own "
            "distribution, which is what an OpenAI-compatible server's prompt_logprobs return."
        },
    )
    teacher_server_url: str | None = field(
        default=None, metadata={"help": "Base URL of an OpenAI-compatible server with prompt_logprobs (vLLM)."}
    )
    teacher_server_model: str | None = field(default=None, metadata={"help": "Model name sent to the server."})
    teacher_api_key_env: str = field(
        default="SCOPE_TEACHER_API_KEY", metadata={"help": "Environment variable holding the server API key."}
    )
    teacher_timeout: float = field(default=120.0, metadata={"help": "Seconds per teacher server request."})
    teacher_max_retries: int = field(default=4, metadata={"help": "Retries per failed teacher request."})
    teacher_max_concurrency: int = field(default=8, metadata={"help": "Concurrent teacher server requests."})
    teacher_allow_special_token_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Accept different bos/eos ids between student and teacher tokenizers (e.g. a base student "
            "ending with <|endoftext|> and a chat teacher with <|im_end|>): the teacher scores the student's ids, except that a "
            "completion's final stop token is scored as the teacher's own stop token (when the teacher's tokenizer is known)."
        },
    )
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to check against the student's (defaults to teacher_model / teacher_server_model)."},
    )
    # Several teachers (scope_opd/teachers/routing.py; docs/multi-teacher.md)
    teachers: dict | str | None = field(
        default=None,
        metadata={
            "help": "Several teachers: a mapping name -> one teacher's fields, each as the single-teacher teacher_* "
            "field of that name allows (model, server_url, server_model, tokenizer, dtype, temperature, api_key_env, "
            "timeout, max_retries, max_concurrency, batch_size, allow_special_token_mismatch); unset fields take the "
            "teacher_* values. In YAML a mapping; on the command line a JSON (or YAML flow) string. Not together "
            "with teacher_model / teacher_server_url."
        },
    )
    teacher_routing: str = field(
        default="key",
        metadata={
            "help": "With teachers: 'key': each prompt's dataset column teacher_key names its teacher, which alone "
            "scores that prompt's rollouts; 'min_perplexity': every teacher scores each teacher-path rollout and it is "
            "distilled toward the one with the lowest perplexity on it (ties: the first in the teachers mapping)."
        },
    )
    teacher_key: str = field(
        default="teacher", metadata={"help": "Dataset column naming each prompt's teacher (teacher_routing='key')."}
    )
    # Verifier (used when no reward_funcs are passed to the trainer)
    verifier: str = field(default="math", metadata={"help": "math, exact, code, or package.module:function."})
    answer_field: str = field(default="answer", metadata={"help": "Dataset column with the gold answer."})
    verifier_timeout: float = field(default=10.0, metadata={"help": "Seconds before a verification scores 0."})
    # KD baseline (algorithm='kd', see scope_opd.kd)
    kd_samples_per_prompt: int = field(default=4, metadata={"help": "KD: teacher samples per training prompt."})
    kd_keep_only_correct: bool = field(default=True, metadata={"help": "KD: keep only verified-correct samples."})

    # Paper Table 3 defaults (override GRPOConfig's).
    learning_rate: float = field(default=5e-5, metadata={"help": "Paper Table 3: 5e-5 constant."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Paper Table 3: constant."})
    weight_decay: float = field(default=0.01, metadata={"help": "Paper Table 3: 0.01."})
    temperature: float = field(default=0.6, metadata={"help": "Rollout temperature (paper: 0.6)."})
    num_generations: int | None = field(default=8, metadata={"help": "Rollouts per prompt G (paper: 8)."})
    beta: float | None = field(
        default=None,
        metadata={"help": "Reference KL coefficient; default 1e-4 for grpo (paper), must be 0 for scope/opd."},
    )
    # ---- overlap / rollout log-probs (scope_opd/teachers/overlap.py; checked at the first step)
    rollout_chunk_groups: int = field(
        default=0,
        metadata={
            "help": "Generate each generation batch in chunks of this many prompt groups (0: one call, TRL's way). "
            "Chunks sample other tokens than one call (another RNG stream and padding) and generate in smaller batches."
        },
    )
    teacher_overlap: bool = field(
        default=False,
        metadata={
            "help": "scope/opd: verify each rollout as soon as it is complete (transformers generate: when it emits EOS; "
            "with rollout_chunk_groups: when its chunk is done) and score the teacher's rows in the background while the "
            "rest of the batch generates. Same weights and loss as without it. Off by default: it needs plain reward "
            "callables, and an in-process teacher on the student's device competes with generation."
        },
    )
    teacher_overlap_max_pending_rows: int = field(
        default=0,
        metadata={"help": "Rows sent to the overlapped teacher and not yet scored before generation waits (0: no limit "
                          "beyond the generation batch)."},
    )
    student_logprob_source: str = field(
        default="forward",
        metadata={
            "help": "Where the student-guided weights (scope, non-uniform student_weighting) get the sampled tokens' "
            "log-probs: 'forward' (default): the trainer's own no-grad forward of the student (TRL's old log-probs "
            "when it computes them, else one extra forward); 'sampler': the rollout engine's log-probs, saving that "
            "forward when TRL does not run it anyway: vLLM's (TRL's sampling_per_token_logps; with "
            "vllm_importance_sampling_correction=False and aligned steps), or, with transformers' generate, "
            "log_softmax(logits / temperature) read during the generate call itself (scope_opd.sampler_logprobs; "
            "not with continuous batching). The loss's old log-probs never come from the sampler. Not the default: "
            "the sampler's numerics (vLLM's kernels; KV-cache decoding; bf16) differ from the trainer's forward, and "
            "so do the weights (measured: README, Performance). A non-finite or missing sampler log-prob on a "
            "correct row falls back to the forward for that batch (scope/sampler_logp_fallback_rows)."
        },
    )
    # ---- end overlap / rollout log-probs

    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing and keeps the old name as a
    # deprecated alias that applies only when the new one is unset. TRL 1.16 still defaults the *old* name to
    # True, so every config warned "will be removed in v6"; here both default to unset and TRL's default (on)
    # goes to the new name. A config that sets both to different values is refused: the new name would win
    # silently (a preset's `activation_checkpointing: true` with `--gradient_checkpointing false`).
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (transformers' name). Unset: "
                  "on (TRL's default), unless the deprecated gradient_checkpointing is set."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5.x; removed in v6). Setting it "
                  "to a value other than activation_checkpointing's is an error."},
    )

    def _resolve_activation_checkpointing(self):
        new, old = self.activation_checkpointing, self.gradient_checkpointing
        if new is not None and old is not None and bool(new) != bool(old):
            raise ValueError(
                f"activation_checkpointing={new} and gradient_checkpointing={old}: gradient_checkpointing is "
                "transformers' deprecated alias of activation_checkpointing, which would win silently; set only "
                "activation_checkpointing (e.g. --activation_checkpointing false)"
            )
        if new is None and old is None:
            self.activation_checkpointing = True  # TRL's default, under the new name (no deprecation warning)

    def __post_init__(self):
        self._resolve_activation_checkpointing()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        for name, value, allowed in (
            ("weight_normalization", self.weight_normalization, NORMALIZATIONS),
            ("student_weighting", self.student_weighting, STUDENT_WEIGHTINGS),
            ("teacher_weighting", self.teacher_weighting, TEACHER_WEIGHTINGS),
            ("loss_aggregation", self.loss_aggregation, AGGREGATIONS),
            ("off_policy_clip", self.off_policy_clip, OFF_POLICY_CLIPS),
            ("opd_advantage", self.opd_advantage, (None, *OPD_ADVANTAGES)),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be positive and finite, got {self.tau}")
        if self.beta is None:
            self.beta = 1e-4 if self.algorithm == "grpo" else 0.0
        if self.algorithm in ("scope", "opd") and self.beta != 0.0:
            raise ValueError(f"beta (reference-model KL) is only used by algorithm='grpo'; got beta={self.beta} for {self.algorithm!r}")
        if self.teacher_model and self.teacher_server_url:
            raise ValueError("set either teacher_model (in-process) or teacher_server_url, not both")
        from .teachers.routing import check_teacher_routing, parse_teachers

        self.teachers = parse_teachers(self.teachers, self)
        check_teacher_routing(self)
        if self.teacher_server_url and self.teacher_temperature != 1.0:
            raise ValueError("teacher_temperature != 1 is only supported in-process; server prompt_logprobs are at temperature 1")
        self._check_opd_loss()
        if self.opd_advantage is None:  # off_policy_clip='authors' is the authors' whole loss, advantage included
            self.opd_advantage = "old" if self.off_policy_clip == "authors" else "current"
        if not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.student_logprob_temperature is not None and not (
            self.student_logprob_temperature > 0 and math.isfinite(self.student_logprob_temperature)
        ):
            raise ValueError(f"student_logprob_temperature must be positive and finite, got {self.student_logprob_temperature}")
        # The paper's OPD uses one rollout per prompt; TRL's GRPOConfig refuses G < 2 because GRPO
        # advantages need a group. OPD never looks at the group, so allow G = 1 for it - and check the
        # batch divisibility TRL checks with G = 1, not with a stand-in value.
        single_rollout_opd = self.algorithm == "opd" and self.num_generations == 1
        if single_rollout_opd:
            # Run TRL's checks with G = 2 on doubled batch sizes: "2x divisible by 2" is exactly "x divisible
            # by 1", so every batch size valid for G = 1 passes and TRL's derived sizes halve back exactly.
            doubled = ["per_device_train_batch_size", "per_device_eval_batch_size"]
            if self.generation_batch_size is not None:
                doubled.append("generation_batch_size")
            eval_generations = self.num_generations_eval
            self.num_generations, self.num_generations_eval = 2, (None if eval_generations in (None, 1) else eval_generations)
            for name in doubled:
                setattr(self, name, getattr(self, name) * 2)
            try:
                super().__post_init__()
            finally:
                for name in doubled:
                    setattr(self, name, getattr(self, name) // 2)
                if "generation_batch_size" not in doubled and self.generation_batch_size is not None:
                    self.generation_batch_size //= 2  # derived by TRL from the doubled batch size
                self.num_generations, self.num_generations_eval = 1, eval_generations
        else:
            super().__post_init__()
        if self.algorithm in ("scope", "opd"):
            off_policy = self.num_iterations > 1 or self.steps_per_generation > self.gradient_accumulation_steps
            if off_policy and self.off_policy_clip == "none":
                warnings.warn(
                    f"algorithm={self.algorithm!r} reuses rollouts (num_iterations={self.num_iterations}, "
                    f"steps_per_generation={self.steps_per_generation} > gradient_accumulation_steps="
                    f"{self.gradient_accumulation_steps} counts as reuse too) with off_policy_clip='none': the importance "
                    "ratio is unclipped (the paper's surrogate) and TRL's epsilon is not used; set off_policy_clip='ppo' "
                    "or 'authors' to clip it",
                    stacklevel=2,
                )
            if (
                self.student_logprob_temperature is not None
                and self.student_logprob_temperature != self.temperature
                and self.use_vllm
                and self.vllm_importance_sampling_correction
            ):
                raise ValueError(
                    "student_logprob_temperature differs from the rollout temperature, but TRL's vLLM importance-sampling "
                    "correction compares the sampler's tempered log-probs with the trainer's: set "
                    "vllm_importance_sampling_correction=False or leave student_logprob_temperature unset"
                )
        self._check_student_logprob_source()  # after TRL's __post_init__: it derives steps_per_generation
        self._check_rollout_chunks()

    def _check_opd_loss(self):
        """``opd_loss`` / ``teacher_top_k``: known values, and the top-k options only with what they can mean."""
        if self.algorithm in ("scope", "opd") and self.top_entropy_quantile != 1.0:
            # TRL's GRPO loss masks low-entropy tokens with it; SCOPE's loss (scope_loss) has no such mask.
            raise ValueError(f"top_entropy_quantile={self.top_entropy_quantile!r} with algorithm={self.algorithm!r}: "
                             "SCOPE's loss trains on every response token and has no entropy mask, so the value "
                             "would be ignored; leave top_entropy_quantile at 1.0")
        if self.opd_loss not in OPD_LOSSES:
            raise ValueError(f"opd_loss must be one of {OPD_LOSSES}, got {self.opd_loss!r}")
        if isinstance(self.teacher_top_k, bool) or not isinstance(self.teacher_top_k, int) or self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be an integer >= 1, got {self.teacher_top_k!r}")
        if self.opd_loss == "sampled":
            return
        if self.opd_loss == "topk_reverse" and self.teacher_top_k == 1:
            # Renormalised on one token, both sides are probability 1: the divergence is identically 0.
            raise ValueError("opd_loss='topk_reverse' with teacher_top_k=1: renormalised on a single token both "
                             "distributions are 1, so the loss is 0 and trains nothing on the wrong rows; use "
                             "teacher_top_k >= 2, or opd_loss='topk_forward' (its tail bucket keeps K = 1 meaningful)")
        if self.algorithm not in ("scope", "opd"):
            raise ValueError(f"opd_loss={self.opd_loss!r} is an option of the scope/opd teacher path; "
                             f"algorithm={self.algorithm!r} has none (leave opd_loss='sampled')")
        # A top-k divergence is computed in full at the current parameters at every position: it has no
        # importance ratio for PPO / dual clipping to bound, and no sampled-token advantage to freeze.
        if self.off_policy_clip != "none":
            raise ValueError(f"opd_loss={self.opd_loss!r} with off_policy_clip={self.off_policy_clip!r}: the top-k "
                             "losses are divergences over the teacher's top-k at each position, with no importance "
                             "ratio to clip; set off_policy_clip='none' (the MLE path then uses the paper's ratio)")
        if self.opd_advantage == "old":
            raise ValueError(f"opd_loss={self.opd_loss!r} with opd_advantage='old': that option freezes the sampled "
                             "token's log-ratio, which the top-k losses do not use; leave opd_advantage unset")
        if self.teachers:
            raise ValueError(f"opd_loss={self.opd_loss!r} with several teachers (teachers: {list(self.teachers)}): "
                             "routing the top-k of several teachers is not supported yet (min_perplexity would "
                             "compare teachers by their sampled-token scores while distilling their top-k); use "
                             "opd_loss='sampled' with teachers:, or one teacher with the top-k loss")
        if self.teacher_overlap:
            raise ValueError(f"opd_loss={self.opd_loss!r} with teacher_overlap=True: the overlapped teacher scores "
                             "sampled tokens only, not the top-k; set teacher_overlap=False")

    def _check_rollout_chunks(self):
        """``rollout_chunk_groups`` with TRL's vLLM server mode: refused where a chunk could split a prompt group.

        TRL's server path gathers each chunk's prompts from every process and keeps one row in every
        ``num_generations`` (``all_prompts[::G]``), sending each to the server with ``n = G``. A process
        whose share of the generation batch is not whole groups has a group straddling it and its
        neighbour; cut into chunks, that group's rows land in different gathers, and rows are paired with
        another prompt's completions. Making chunks whole groups across processes needs equal per-process
        chunk sizes (TRL slices the server's answer by ``process_index * len(prompts)``), which a
        straddling group rules out, so the setting is refused. One chunk covering the whole share is TRL's
        own call and is fine.
        """
        if self.rollout_chunk_groups < 0:
            raise ValueError(f"rollout_chunk_groups must be >= 0, got {self.rollout_chunk_groups}")
        if not (self.rollout_chunk_groups > 0 and self.use_vllm and self.vllm_mode == "server"):
            return
        rows_per_process = self.generation_batch_size // self.world_size
        groups = self.num_generations
        if rows_per_process % groups != 0 and self.rollout_chunk_groups * groups < rows_per_process:
            raise ValueError(
                f"rollout_chunk_groups={self.rollout_chunk_groups} with vllm_mode='server': each process generates "
                f"{rows_per_process} rows per generation batch (per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x steps_per_generation {self.steps_per_generation}), which is not a "
                f"multiple of num_generations {groups}, so a prompt group straddles two processes and TRL's server path "
                "would pair rows of a chunk with another prompt's completions. Make the rows per process a multiple of "
                f"{groups}, or set rollout_chunk_groups to 0 (or >= {math.ceil(rows_per_process / groups)}: one chunk)"
            )

    @property
    def needs_student_logp(self) -> bool:
        """Whether the weights read the student's log-probs (:func:`scope_opd.batch.needs_student_logp`)."""
        return needs_student_logp(self.algorithm, self.student_weighting)

    def _check_student_logprob_source(self):
        """``student_logprob_source``: a known value, and 'sampler' only where the sampler's log-probs mean the same."""
        source = self.student_logprob_source
        if source not in STUDENT_LOGPROB_SOURCES:
            raise ValueError(f"student_logprob_source must be one of {STUDENT_LOGPROB_SOURCES}, got {source!r}")
        if source != "sampler":
            return
        if not self.use_vllm and (self.use_transformers_continuous_batching or self.use_transformers_paged):
            raise ValueError("student_logprob_source='sampler' needs vLLM or transformers' generate: transformers' "
                             "continuous batching (use_transformers_continuous_batching / use_transformers_paged) "
                             "returns no log-probs of the sampled tokens and cannot be read while it samples")
        if not self.needs_student_logp:
            warnings.warn(f"student_logprob_source='sampler' has no effect with algorithm={self.algorithm!r}, "
                          f"student_weighting={self.student_weighting!r}: only scope's student-guided weights read the "
                          "student's log-probs", stacklevel=3)
            return
        if self.student_logprob_temperature is not None and self.student_logprob_temperature != self.temperature:
            raise ValueError(f"student_logprob_source='sampler' gives log-probs at the rollout temperature "
                             f"{self.temperature}, but student_logprob_temperature={self.student_logprob_temperature}: "
                             "use student_logprob_source='forward' or leave student_logprob_temperature unset")
        if self.use_vllm:
            # vLLM's processed log-probs are those of the distribution it samples from: after top-k/top-p/min-p
            # and penalties. The trainer's log-probs (and the paper's weights) are of the tempered model alone.
            # (With transformers' generate they are read from the model's own logits, before its logits
            # processors, as the forward computes them: any sampling options are fine.)
            reshaped = {"top_p": (self.top_p, 1.0), "top_k": (self.top_k, 0), "min_p": (self.min_p, 0.0),
                        "repetition_penalty": (self.repetition_penalty, 1.0)}
            reshaped.update({key: (value, None) for key, value in (self.generation_kwargs or {}).items()
                             if key in SAMPLER_RESHAPING_KWARGS})
            changed = [f"{key}={value!r}" for key, (value, neutral) in reshaped.items()
                       if value is not None and value != neutral and not (key == "top_k" and value == -1)]
            if changed:
                raise ValueError(f"student_logprob_source='sampler' with {', '.join(changed)}: vLLM's log-probs are "
                                 "then those of the truncated / penalised sampling distribution, not the student's; "
                                 "use student_logprob_source='forward'")
        reused = self.num_iterations > 1 or self.gradient_accumulation_steps % (self.steps_per_generation *
                                                                              self.num_iterations) != 0
        importance_sampling = self.use_vllm and self.vllm_importance_sampling_correction
        if reused or importance_sampling:
            why = "vllm_importance_sampling_correction=True" if importance_sampling else "reused rollouts"
            warnings.warn(f"student_logprob_source='sampler' saves no forward here: TRL computes the old log-probs "
                          f"anyway ({why}); the student-guided weights still use the sampler's log-probs, as asked",
                          stacklevel=3)


class _OptimizerStepTiming(TrainerCallback):
    """Closes each optimiser step's phase timings once ``optimizer.step()`` has run (see ``_log_phase_timings``)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._log_phase_timings()


class SCOPETrainer(AtomicCheckpointMixin, GRPOTrainer):
    """GRPOTrainer whose loss is SCOPE's (or OPD's), with a teacher scoring the student's rollouts.

    Args (beyond ``GRPOTrainer``'s):
        reward_funcs: optional; by default a verifier built from ``args.verifier`` / ``args.answer_field``.
        teacher_model: a loaded ``PreTrainedModel`` (overrides ``args.teacher_model``).
        teacher: any object with ``score(prompt_ids, completion_ids) -> list[Tensor]`` (see
            ``scope_opd.teachers.TeacherScorer``), overriding both of the above.
    """

    _tag_names = ["trl", "scope"]
    _name = "SCOPE"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: SCOPEConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        teacher_model: PreTrainedModel | str | None = None,
        teacher=None,
        **kwargs,
    ):
        if args is None:
            args = SCOPEConfig("scope-output")
        if not isinstance(args, SCOPEConfig):
            raise TypeError(f"args must be a SCOPEConfig, got {type(args).__name__}")
        if args.algorithm == "kd":
            raise ValueError("algorithm='kd' is the offline baseline: use scope_opd.kd.train_kd (or `scope train`)")
        if reward_funcs is None:
            from .verifiers import RewardFunction, get_verifier

            reward_funcs = [RewardFunction(
                get_verifier(args.verifier), answer_field=args.answer_field, timeout_s=args.verifier_timeout
            )]
        # --- prompt-length rule (scope_opd.data.drop_overlong_prompts, owned by data.py) ---
        from .data import drop_overlong_prompts
        train_dataset = drop_overlong_prompts(train_dataset, model=model, processing_class=processing_class, args=args)
        # --- end prompt-length rule ---
        # Checked after the length rule, which may drop prompts. TRL's RepeatSampler drops a generation batch
        # that is not full: with fewer prompts than one generation batch needs, training would run zero steps
        # and still report success.
        prompts_per_batch = args.generation_batch_size // args.num_generations
        if hasattr(train_dataset, "__len__") and len(train_dataset) < prompts_per_batch:
            raise ValueError(
                f"train_dataset has {len(train_dataset)} prompts, but one generation batch takes {prompts_per_batch} "
                f"distinct prompts (generation_batch_size {args.generation_batch_size} / num_generations "
                f"{args.num_generations}), so no training step could run; add prompts or lower "
                "per_device_train_batch_size / steps_per_generation"
            )
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self._phase_seconds: dict[str, float] = defaultdict(float)
        self._warn_without_fp32_master_weights()
        self.add_callback(_OptimizerStepTiming(self))
        self._last_rewards_per_func: torch.Tensor | None = None
        self.teacher = None
        self.verdict_reward_index = self._resolve_verdict_reward()
        if args.algorithm in ("scope", "opd"):
            self._set_student_logprob_temperature()
            self.teacher = self._build_teacher(teacher_model, teacher)
            self._check_topk_teacher()

    def _warn_without_fp32_master_weights(self):
        """Warn when the optimiser would update bf16/fp16 parameters in place (no fp32 master copy).

        transformers' Trainer keeps the parameters' own dtype under plain DDP / single device: with a bf16
        model, parameters and Adam states are bf16 and most updates at lr 5e-5 round away (|update| < half
        a bf16 ulp of the weight). DeepSpeed (bf16/fp16 with fp32 masters) and FSDP mixed precision keep
        fp32 copies; a model loaded in float32 with ``bf16=True`` trains fp32 weights under bf16 autocast.
        """
        if self.is_deepspeed_enabled:
            return  # DeepSpeed's bf16/fp16 optimisers keep fp32 master weights
        low = sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()
                      if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
        if low:
            warnings.warn(
                f"the trainable parameters are {'/'.join(low)} and no fp32 master copy exists (no DeepSpeed, and "
                "FSDP / Trainer update parameters in their own dtype): the optimiser updates them and its Adam "
                "states in that dtype, so most updates at small learning rates (5e-5) round away. Load the model "
                "in float32 (`dtype: float32`; from_pretrained(..., dtype=torch.float32)) and keep `bf16: true` "
                "for bf16 compute, or train under DeepSpeed with bf16",
                stacklevel=3,
            )

    def _resolve_verdict_reward(self) -> int | None:
        """Index of the reward that decides correct/incorrect (``args.verdict_reward``), for scope and opd.

        A weighted sum of several rewards is no verdict: an accuracy reward plus a format reward would put
        a wrong but well-formatted answer on the MLE path. So with several reward functions one must be named.
        """
        names = list(self.reward_func_names)
        wanted = self.args.verdict_reward
        if wanted is not None:
            if wanted not in names:
                raise ValueError(f"verdict_reward={wanted!r} is not one of the trainer's reward functions {names}")
            return names.index(wanted)
        if self.args.algorithm not in ("scope", "opd"):
            return None  # GRPO uses TRL's weighted sum of all rewards
        if len(names) > 1:
            raise ValueError(
                f"algorithm={self.args.algorithm!r} has {len(names)} reward functions {names}: set verdict_reward to "
                "the one that decides correct/incorrect (the others are logged only)"
            )
        return 0

    def _set_student_logprob_temperature(self):
        """Re-patch TRL's fused LM head (log-probs without full logits) at ``student_logprob_temperature``.

        TRL bakes ``args.temperature`` into the fused head at construction (``add_fused_lm_head``); the
        rollouts keep sampling at the rollout temperature, since generation never uses the fused path.
        """
        temperature = self.args.student_logprob_temperature
        if temperature is None or temperature == self.temperature:
            return
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import add_fused_lm_head

        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        target = self.accelerator.unwrap_model(target)
        if "forward" not in vars(target):
            raise RuntimeError("TRL's fused LM head is not installed on the student (TRL internals changed?)")
        del target.forward  # back to the class's forward, then the same head at the new temperature
        add_fused_lm_head(target, temperature=temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                          outputs=("log_probs", "entropy"))

    # ------------------------------------------------------------------ teacher set-up

    def _build_teacher(self, teacher_model, teacher):
        """The teacher (``args.teacher_model`` / ``teacher_server_url``), or a TeacherPool of ``args.teachers``.

        Each teacher is built by :func:`scope_opd.teachers.routing.build_teacher`: tokenizer check against the
        student, stop-token map, server context-length check. With ``args.teachers``, ``teacher`` may be a
        mapping name -> scorer standing in for those teachers.
        """
        from .teachers.routing import build_teacher, build_teacher_pool, check_dataset_routes

        args = self.args
        if args.teachers is not None:
            if teacher_model is not None or (teacher is not None and not isinstance(teacher, dict)):
                raise ValueError("with args.teachers, pass teacher= as a mapping name -> scorer (or nothing), "
                                 "not teacher_model= or one teacher")
            pool = build_teacher_pool(self, teacher)
            if args.teacher_routing == "key":
                check_dataset_routes(self.train_dataset, args.teacher_key, pool.names)
                if self.eval_dataset is not None:  # evaluation scores with the teachers too: fail now, not mid-run
                    check_dataset_routes(self.eval_dataset, args.teacher_key, pool.names, "evaluation dataset")
            return pool
        if teacher is not None:
            return teacher
        return build_teacher(self, args, teacher_model)

    def _teacher_parameters_sharded(self) -> bool:
        """Whether the teacher's parameters are split across ranks once wrapped like TRL's reference model.

        ZeRO-3 and FSDP (any strategy but NO_SHARD) shard them; TRL's ``prepare_deepspeed`` runs ZeRO-1/2
        reference models at stage 0, whole on every rank, so their forwards are no collectives.
        """
        if self.is_deepspeed_enabled:
            return self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.is_fsdp_enabled:
            strategy = getattr(self.accelerator.state.fsdp_plugin, "sharding_strategy", None)
            return getattr(strategy, "name", None) != "NO_SHARD"
        return False

    # ---- overlap / rollout log-probs: chunked generation with teacher scoring overlapped (teachers/overlap.py)

    _rollout_rows = None  # the dataset rows of the generation batch being generated (gold answers)
    _teacher_prefetch = None  # TeacherPrefetch of the current generation batch
    _early_rewards = None  # EarlyVerifier of the current batch, for TRL's reward pass to reuse

    def _prepare_inputs(self, generation_batch):
        self._rollout_rows = generation_batch if isinstance(generation_batch, list) else None
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            self._rollout_rows = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        rows, self._rollout_rows = self._rollout_rows, None  # a batch's first turn only (not tool follow-ups)
        args = self.args
        first_turn = (
            self.model.training and rows is not None and len(rows) == len(prompt_ids) and images is None
            and not multimodal_fields and not self.tools and self.rollout_func is None
        )
        generate = super()._generate_single_turn
        if self._reads_sampled_logprobs():
            generate = self._with_sampled_logprobs(generate)
        if not first_turn or not (args.rollout_chunk_groups > 0 or args.teacher_overlap):
            return generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        self._check_overlap_config()
        from .teachers.overlap import early_verification_supported, generate_in_chunks, generate_streaming

        if self._teacher_prefetch is not None:  # a batch whose teacher pass never ran (it raised, or had no rows)
            self._teacher_prefetch.close()
            self._teacher_prefetch = None
        if args.teacher_overlap and not early_verification_supported(self):
            warnings.warn("teacher_overlap: reward models and async reward functions are verified by TRL's own pass, "
                          "after generation; the teacher is not overlapped", stacklevel=2)
        elif args.rollout_chunk_groups > 0:
            return generate_in_chunks(self, generate, prompt_ids, images, multimodal_fields,
                                      num_generations, has_tool_images, rows)
        elif not (self.use_vllm or self.use_transformers_continuous_batching):
            # transformers' generate: each row goes to the verifier and the teacher as soon as it emits EOS.
            return generate_streaming(self, generate, prompt_ids, images, multimodal_fields,
                                      num_generations, has_tool_images, rows)
        else:
            warnings.warn("teacher_overlap with vLLM or continuous batching returns the batch at once: set "
                          "rollout_chunk_groups to overlap the teacher with later chunks", stacklevel=2)
        return generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _reads_sampled_logprobs(self) -> bool:
        """Whether this generate call reads the sampled tokens' log-probs itself (transformers' generate path)."""
        args = self.args
        return (args.student_logprob_source == "sampler" and args.needs_student_logp and not self.use_vllm
                and not (self.use_transformers_continuous_batching or args.use_transformers_paged))

    def _with_sampled_logprobs(self, generate):
        """TRL's transformers ``generate`` call, returning the sampled tokens' log-probs as vLLM's path does.

        TRL turns them into ``sampling_per_token_logps``, which ``_student_token_logps`` reads; when the
        capture cannot follow a call it returns ``None`` and that batch falls back to the forward.
        """
        from accelerate.utils import is_peft_model

        from .sampler_logprobs import SampledLogprobCapture

        def generate_reading_logprobs(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            model = self.accelerator.unwrap_model(self.model_wrapped)
            if is_peft_model(model):
                model = model.get_base_model()  # PeftModel.generate calls the base model's forward
            with SampledLogprobCapture(model, self.temperature) as capture:
                completion_ids, logprobs = generate(prompt_ids, images, multimodal_fields, num_generations,
                                                    has_tool_images)
            if logprobs is None:
                logprobs = capture.per_row([list(ids) for ids in completion_ids])
                if logprobs is None and not self._warned_capture_failed:
                    self._warned_capture_failed = True  # the batch falls back to the forward (counted per batch)
                    warnings.warn(f"student_logprob_source='sampler': could not read the sampled log-probs during "
                                  f"generate ({capture.failure}); such batches use the forward", stacklevel=2)
            return completion_ids, logprobs

        return generate_reading_logprobs

    def _check_overlap_config(self):
        args = self.args
        if args.rollout_chunk_groups < 0 or args.teacher_overlap_max_pending_rows < 0:
            raise ValueError(f"rollout_chunk_groups and teacher_overlap_max_pending_rows must be >= 0, got "
                             f"{args.rollout_chunk_groups}, {args.teacher_overlap_max_pending_rows}")
        if args.teacher_overlap and self.teacher is None:
            raise ValueError(f"teacher_overlap needs a teacher (algorithm 'scope' or 'opd'), got algorithm={args.algorithm!r}")
        if args.teacher_overlap and getattr(self.teacher, "synced_ranks", False):
            # Its forwards are collectives; run from a background thread they would interleave with the student's.
            raise ValueError("teacher_overlap is not supported with a teacher sharded across ranks (ZeRO-3 / FSDP)")

    def _rewards_from_chunks_or(self, calculate):
        """TRL's reward pass, or the chunks' verification when it verified these same completions."""
        if self._early_rewards is None:
            return calculate

        def reuse(inputs, prompts, completions, completion_ids_list):
            from .teachers.overlap import cached_rewards

            cached = cached_rewards(self, completions, completion_ids_list)
            return cached if cached is not None else calculate(inputs, prompts, completions, completion_ids_list)

        return reuse

    def _teacher_scores(self, row_index, prompt_ids, completions):
        """``teacher.score`` of these rows, from the overlapped prefetch where it scored the same ids."""
        prefetch, self._teacher_prefetch = self._teacher_prefetch, None
        from .teachers.routing import routing_kwargs

        routed = routing_kwargs(self, self._score_rows, row_index)
        if prefetch is None:
            return self.teacher.score(prompt_ids, completions, **routed)
        try:
            return prefetch.scores(row_index, prompt_ids, completions, **routed)
        finally:
            prefetch.close()
            metrics = self._metrics["train"]
            metrics["timing/teacher_overlapped"].append(prefetch.busy_seconds)
            metrics["scope/teacher_prefetched_rows"].append(float(prefetch.prefetched_rows))
            metrics["scope/teacher_prefetch_missed_rows"].append(float(prefetch.missed_rows))

    # ---- end overlap / rollout log-probs

    # ------------------------------------------------------------------ phase timings (paper Table 8)

    def _sync_device(self):
        """Wait for the work queued on this process's accelerator (nothing to wait for on CPU)."""
        device = self.accelerator.device
        if device.type != "cpu":
            torch.get_device_module(device.type).synchronize()

    def _clock(self) -> float:
        """``perf_counter`` once the device's queued work is done.

        Kernels run asynchronously: without the wait, a phase would be charged for the work of the phase before
        it (whichever first waits for a result), and the backward pass and the optimiser step, which nothing
        waits for, for none at all.
        """
        self._sync_device()
        return time.perf_counter()

    def _timed(self, phase: str, fn, *a, **kw):
        start = self._clock()
        try:
            return fn(*a, **kw)
        finally:
            self._phase_seconds[phase] += self._clock() - start

    def _generate(self, prompts):
        return self._timed("generation", super()._generate, prompts)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = self._timed("reward", self._rewards_from_chunks_or(super()._calculate_rewards), inputs, prompts,
                              completions, completion_ids_list)
        # All processes' rewards, in global row order; SCOPE needs the raw verdicts, not GRPO advantages.
        self._last_rewards_per_func = rewards
        self._log_reward_counters()
        return rewards

    def _log_reward_counters(self):
        """Failure counters (errors, timeouts, bad golds) of every reward function that keeps them - our
        RewardFunction, built from ``args.verifier`` or passed in ``reward_funcs`` - summed over processes,
        for every algorithm: ``verifier/<key>``, or ``verifier/<name>/<key>`` when several keep counters."""
        mode = "train" if self.model.training else "eval"
        counted = [(name, func) for name, func in zip(self.reward_func_names, self.reward_funcs)
                   if callable(getattr(func, "stats_delta", None))]
        for name, func in counted:
            delta = func.stats_delta()
            local = torch.tensor([list(delta.values())], dtype=torch.float32, device=self.accelerator.device)
            totals = self.accelerator.gather(local).sum(dim=0).tolist()
            prefix = "verifier" if len(counted) == 1 else f"verifier/{name}"
            for key, value in zip(delta, totals):
                self._metrics[mode][f"{prefix}/{key}"].append(value)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if torch.is_grad_enabled():  # the update's forward: part of "update"
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        # A no-grad forward of the policy (TRL's or ours) is the paper's "old log-prob" phase.
        phase = "old_logprob" if model is self.model else "ref_logprob"
        return self._timed(phase, super()._get_per_token_logps_and_entropies, model, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        start = self._clock()
        before = sum(self._phase_seconds.values())
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Whatever this call spent outside rollout/verify/teacher phases is forward+backward.
        self._training_step_ended = self._clock()
        self._phase_seconds["update"] += (self._training_step_ended - start) - (sum(self._phase_seconds.values()) - before)
        return loss

    _training_step_ended = None

    def _log_phase_timings(self):
        """At the optimiser step (``_OptimizerStepTiming``): add gradient clipping and ``optimizer.step()``, which
        transformers runs after the window's last ``training_step``, to "update", and log the step's phases."""
        if self._training_step_ended is not None:
            self._phase_seconds["update"] += self._clock() - self._training_step_ended
            self._training_step_ended = None
        for phase in ("generation", "old_logprob", "ref_logprob", "reward", "teacher", "update"):
            self._metrics["train"][f"timing/{phase}"].append(self._phase_seconds.pop(phase, 0.0))

    # ------------------------------------------------------------------ steps 2-5: verdicts, teacher, weights

    _score_rows = None  # this process's dataset rows of the generation batch (teacher_routing='key')

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.algorithm == "grpo":
            return output
        self._score_rows = inputs if isinstance(inputs, list) else None
        if "pixel_values" in output or "tool_mask" in output:
            raise NotImplementedError("SCOPE/OPD support text-only, single-turn rollouts")
        output.update(self._scope_inputs(output))
        return output

    def _old_per_token_logps(self, output) -> torch.Tensor:
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        # TRL skips this forward when steps are aligned (it uses logp.detach() in the loss), but the
        # student-guided weights need the sampling policy's log-probs of *every* row of a group before
        # the first micro-batch is updated: compute them once here (the paper's "old log-prob" phase).
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1),
                output["completion_ids"].size(1),
                batch_size=batch_size,
            )
        return logps

    _warned_sampler_logps_missing = False
    _warned_capture_failed = False

    def _student_token_logps(self, output, correct: torch.Tensor, mode: str) -> torch.Tensor:
        """``[B, T]`` log-probs of the sampled tokens for the student-guided weights (``student_logprob_source``).

        'sampler' reads TRL's ``sampling_per_token_logps``. If any process has a correct row (the rows the
        student-guided weights read) with a non-finite sampler log-prob on a response token, or got no sampler
        log-probs at all, every process falls back to the forward for this batch: one source per batch, and the
        forward is a collective under ZeRO-3 / FSDP. Logged: ``scope/student_logp_from_sampler`` (1 or 0) and
        ``scope/sampler_logp_fallback_rows``.
        """
        metrics = self._metrics[mode]
        if self.args.student_logprob_source == "forward":
            metrics["scope/student_logp_from_sampler"].append(0.0)
            return self._old_per_token_logps(output)
        sampled = output.get("sampling_per_token_logps")
        mask = output["completion_mask"].bool()
        used = correct & mask.any(dim=1)
        if sampled is None:  # e.g. a rollout_func that returns no log-probs
            bad = used
        else:
            bad = used & ~torch.isfinite(torch.where(mask, sampled.float(), 0.0)).all(dim=1)
        local = torch.tensor([[float(bad.sum()), float(sampled is None)]], device=self.accelerator.device)
        fallback_rows, missing = self.accelerator.gather(local).sum(dim=0).tolist()
        metrics["scope/sampler_logp_fallback_rows"].append(fallback_rows)
        use_sampler = fallback_rows == 0 and missing == 0
        metrics["scope/student_logp_from_sampler"].append(float(use_sampler))
        if missing and not self._warned_sampler_logps_missing:
            self._warned_sampler_logps_missing = True
            warnings.warn("student_logprob_source='sampler', but the rollout engine returned no log-probs: the "
                          "student-guided weights use the forward instead", stacklevel=2)
        return sampled.float() if use_sampler else self._old_per_token_logps(output)

    def _timed_teacher_call(self, output, row_index: list[int], lengths: list, score) -> list:
        """``score(row_index, prompt_ids, completion_ids)`` on the generation batch's ``row_index`` rows (prompts
        without padding, completions cut to ``lengths``), timed into the teacher phase, one answer per row."""
        prompt_ids = [output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist() for i in row_index]
        completions = [output["completion_ids"][i, : int(lengths[i])].tolist() for i in row_index]
        start = self._clock()
        scored = score(row_index, prompt_ids, completions)
        self._phase_seconds["teacher"] += self._clock() - start
        if len(scored) != len(row_index):
            raise RuntimeError(f"teacher returned {len(scored)} rows for {len(row_index)} requested")
        return scored

    def _score_teacher(self, output, rows: torch.Tensor) -> torch.Tensor:
        """Teacher log-probs ``[B, T]`` of the sampled tokens on ``rows`` (NaN elsewhere)."""
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        teacher_logps = torch.full(completion_ids.shape, float("nan"), device=completion_ids.device)
        row_index = rows.nonzero().flatten().tolist()
        if not row_index and not getattr(self.teacher, "synced_ranks", False):
            if self._teacher_prefetch is not None:  # an overlapped batch with nothing to score: stop its thread now
                self._teacher_prefetch.close()
                self._teacher_prefetch = None
            return teacher_logps
        lengths = completion_mask.sum(dim=1).tolist()
        scored = self._timed_teacher_call(output, row_index, lengths, self._teacher_scores)
        for i, values in zip(row_index, scored):
            n = int(lengths[i])
            if values.shape[0] != n:
                raise RuntimeError(
                    f"teacher returned {values.shape[0]} log-probs for row {i} of the generation batch, whose "
                    f"completion has {n} tokens ({type(self.teacher).__name__}.score must return one per token)"
                )
            teacher_logps[i, :n] = values.to(teacher_logps.device, torch.float32)
        return teacher_logps

    # ---- top-k OPD losses (opd_loss='topk_*', issue 20)

    _topk_teacher = None  # what _score_teacher_topk asks (teachers.chunked_scorer.memory_lean of the teacher)

    def _check_topk_teacher(self):
        """A top-k ``opd_loss`` needs a teacher with ``score_topk`` that scores the student's own ids."""
        if self.args.opd_loss == "sampled" or self.teacher is None:
            return
        from .teachers.scorer import StopTokenMappedTeacher

        if isinstance(self.teacher, StopTokenMappedTeacher):
            raise ValueError(f"opd_loss={self.args.opd_loss!r} with different student/teacher stop tokens "
                             f"{self.teacher.stop_token_map}: the teacher's top-k would list its own stop token, which "
                             "is another id for the student; use opd_loss='sampled' with this pair")
        if not callable(getattr(self.teacher, "score_topk", None)):
            raise ValueError(f"opd_loss={self.args.opd_loss!r} needs a teacher with score_topk(prompt_ids, "
                             f"completion_ids, k); {type(self.teacher).__name__} has none")
        vocab = self.model.config.get_text_config().vocab_size
        if self.args.teacher_top_k > vocab:
            raise ValueError(f"teacher_top_k={self.args.teacher_top_k} is more than the student's vocabulary of {vocab} "
                             f"tokens; set teacher_top_k to {vocab} or less ({vocab} is the full-vocabulary KL)")
        check = getattr(self.teacher, "check_top_k", None)
        if callable(check):  # a server: its --max-logprobs must allow teacher_top_k (fails now, naming both)
            check(self.args.teacher_top_k)
        from .teachers.chunked_scorer import memory_lean

        # In-process: the top-k come from the tiled scorer over the same model (no [tokens, V] logits).
        self._topk_teacher = memory_lean(self.teacher)

    def _score_teacher_topk(self, output, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``_score_teacher`` for the top-k losses: the sampled tokens' log-probs ``[B, T]`` (NaN off ``rows``,
        for the weights of eq. 5) and ``{"teacher_topk_ids", "teacher_topk_logps"}`` ``[B, T, K]`` (0 off ``rows``)."""
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        device = completion_ids.device
        k = self.args.teacher_top_k
        teacher_logps = torch.full(completion_ids.shape, float("nan"), device=device)
        row_index = rows.nonzero().flatten().tolist()
        lengths = completion_mask.sum(dim=1).tolist()
        scored = []
        if row_index or getattr(self.teacher, "synced_ranks", False):
            def score_topk(_, prompts, completions):
                return self._topk_teacher.score_topk(prompts, completions, k)

            scored = self._timed_teacher_call(output, row_index, lengths, score_topk)
        # K is capped by the teacher's vocabulary: take the width it returned (every row the same).
        widths = {int(s.top_ids.shape[1]) for s in scored if s.top_ids is not None and s.top_ids.dim() == 2}
        if len(widths) > 1 or (widths and not 1 <= min(widths) <= k):
            raise RuntimeError(f"teacher returned top-k widths {sorted(widths)} for teacher_top_k={k}")
        width = widths.pop() if widths else k
        topk_ids = torch.zeros(*completion_ids.shape, width, dtype=torch.long, device=device)
        topk_logps = torch.zeros(*completion_ids.shape, width, dtype=torch.float32, device=device)
        vocab = self.model.config.get_text_config().vocab_size
        for i, values in zip(row_index, scored):
            n = int(lengths[i])
            shapes = (tuple(values.logprobs.shape), None if values.top_ids is None else tuple(values.top_ids.shape),
                      None if values.top_logprobs is None else tuple(values.top_logprobs.shape))
            if shapes != ((n,), (n, width), (n, width)):
                raise RuntimeError(
                    f"teacher returned shapes (logprobs, top_ids, top_logprobs) {shapes} for row {i} of the generation "
                    f"batch, whose completion has {n} tokens; expected {((n,), (n, width), (n, width))}"
                )
            if n and not (0 <= int(values.top_ids.min()) and int(values.top_ids.max()) < vocab):
                raise RuntimeError(f"teacher's top-k ids for row {i} fall outside the student's vocabulary [0, {vocab})")
            teacher_logps[i, :n] = values.logprobs.to(device, torch.float32)
            top_logprobs = values.top_logprobs.to(device, torch.float32)
            if not torch.isfinite(top_logprobs).all():
                # A NaN, or a -inf (vLLM's -9999: the teacher gives fewer than K tokens any probability), in the
                # top-k has no usable divergence (0 * inf, or an infinite reverse KL): the row is a non-finite
                # teacher row, dropped and counted in scope/teacher_nonfinite_rows like a NaN sampled log-prob.
                teacher_logps[i, :n] = float("nan")
                continue
            if n and width > 1 and (values.top_ids.sort(dim=-1).values.diff(dim=-1) == 0).any():
                raise RuntimeError(f"teacher's top-k ids for row {i} repeat a token id at one position (a token's mass "
                                   "counted twice): the teacher's answer is malformed")
            topk_ids[i, :n] = values.top_ids.to(device, torch.long)
            topk_logps[i, :n] = top_logprobs
        return teacher_logps, {"teacher_topk_ids": topk_ids, "teacher_topk_logps": topk_logps}

    def _student_topk_forward(self, model, inputs) -> tuple[torch.Tensor, ...]:
        """The loss forward for the top-k losses: ``(per_token_logps [B, T], entropies [B, T],
        student_topk_logits [B, T, K], student_logsumexp [B, T], student_tail_logp [B, T] or None)``, all with
        gradient; ``student_tail_logp`` (``topk_forward`` only) is the log of the student's probability outside the
        teacher's top-k, from the full logits (:func:`~scope_opd.algorithms.student_tail_log_mass`: exact however small).

        TRL's fused head returns only the sampled token's log-prob; the top-k losses need the student's
        logits at the teacher's top-k ids and (``topk_forward``) the full logsumexp. So the model's own forward
        projects the completion positions only (``logits_to_keep``: ``[B, T, V]``, the memory of a plain
        causal-LM loss), at the same temperature as TRL's head (``student_logprob_temperature``).
        """
        completion_ids = inputs["completion_ids"]
        length = completion_ids.size(1)
        temperature = self.args.student_logprob_temperature or self.temperature
        with self.accelerator.autocast():
            logits = model(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                logits_to_keep=length + 1,
                use_cache=False,
            ).logits
        # Position p predicts token p + 1: the last kept position predicts nothing.
        logits = logits[:, -(length + 1) : -1].float() / temperature
        logsumexp = torch.logsumexp(logits, dim=-1)
        per_token_logps = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - logsumexp
        topk_logits = logits.gather(-1, inputs["teacher_topk_ids"])
        tail_logp = None
        if self.args.opd_loss == "topk_forward":
            tail_logp = student_tail_log_mass(logits, inputs["teacher_topk_ids"])
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropies = logsumexp - (probs * logits).sum(dim=-1)
        return per_token_logps, entropies, topk_logits, logsumexp, tail_logp

    def _topk_token_loss(self, inputs: dict, student_topk) -> torch.Tensor | None:
        """``[B, T]`` top-k divergence on the incorrect rows' tokens (None for ``opd_loss='sampled'``)."""
        if self.args.opd_loss == "sampled":
            return None
        if student_topk is None:
            raise ValueError(f"opd_loss={self.args.opd_loss!r} needs the student's logits at the teacher's top-k ids "
                             "(scope_loss_from_inputs(..., student_topk=(topk_logits, logsumexp, tail_logp)))")
        topk_logits, logsumexp, tail_logp = (*student_topk, None)[:3]
        incorrect = inputs["scope_loss_mask"].bool() & ~inputs["scope_correct"].bool()[:, None]
        return topk_opd_token_loss(self.args.opd_loss, topk_logits, logsumexp, inputs["teacher_topk_logps"], incorrect,
                                   teacher_topk_ids=inputs["teacher_topk_ids"], student_tail_logp=tail_logp)

    # ---- end top-k OPD losses

    def _scope_inputs(self, output) -> dict[str, Any]:
        args = self.args
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        completion_mask = output["completion_mask"].bool()
        local_batch = completion_mask.shape[0]
        process_slice = slice(self.accelerator.process_index * local_batch, (self.accelerator.process_index + 1) * local_batch)

        # Verdicts of all processes (global row order), from the verdict reward TRL just computed
        # (args.verdict_reward; the other rewards are only logged).
        verdict_scores = self._last_rewards_per_func[:, self.verdict_reward_index]
        unscorable = torch.isnan(verdict_scores)
        verdict = verdicts(verdict_scores, args.correct_threshold, unscorable).to(device)
        self._metrics[mode]["scope/unscorable_rows"].append(unscorable.float().sum().item())
        local_verdict = verdict[process_slice]

        # Only student-guided weights need the sampling policy's log-probs before the update; OPD and
        # the uniform-student ablation skip that extra forward unless TRL computed it anyway.
        needs_student_weights = args.needs_student_logp
        student_logps = self._student_token_logps(output, local_verdict, mode) if needs_student_weights else None
        # The loss's old log-probs: the forward's, never the sampler's (with them the on-policy ratio would be
        # exp(logp - sampler logp) instead of 1).
        from_forward = needs_student_weights and args.student_logprob_source == "forward"
        old_logps = student_logps if from_forward else output.get("old_per_token_logps")
        output_old = {} if old_logps is None else {"old_per_token_logps": old_logps}

        on_teacher_path = teacher_rows(local_verdict, args.algorithm)
        if args.opd_loss == "sampled":
            teacher_logps, teacher_topk = self._score_teacher(output, on_teacher_path), {}
        else:
            teacher_logps, teacher_topk = self._score_teacher_topk(output, on_teacher_path)
        rows = row_statistics(completion_mask, student_logps, teacher_logps, on_teacher_path)
        valid = rows["valid"]

        gather = self.accelerator.gather
        all_valid = gather(valid)
        all_student_mean, all_teacher_mean = gather(rows["student_mean_logp"]), gather(rows["teacher_mean_logp"])
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(verdict.shape[0], device=device) // num_generations
        path_correct, student_weights, teacher_weights = path_weights(
            group_ids, verdict, all_student_mean, all_teacher_mean, all_valid,
            algorithm=args.algorithm, tau=args.tau, normalization=args.weight_normalization,
            student_weighting=args.student_weighting, teacher_weighting=args.teacher_weighting,
        )

        loss_mask = rows["loss_mask"]
        # The aggregation's (mle, opd) denominators over the whole generation batch, all processes.
        num_items = gather(loss_denominators(loss_mask, path_correct[process_slice], args.loss_aggregation)[None]).sum(dim=0)
        metrics = weight_metrics(group_ids, verdict, all_valid, all_student_mean, all_teacher_mean,
                                 student_weights, teacher_weights, gather(rows["teacher_nonfinite"]))
        for key, value in metrics.items():
            self._metrics[mode][f"scope/{key}"].append(value)
        self._log_teacher_counters(mode)
        return {
            **output_old,
            "scope_correct": path_correct[process_slice],
            "scope_student_weights": student_weights[process_slice],
            "scope_teacher_weights": teacher_weights[process_slice],
            # Unused entries (correct rows, dropped rows) are zero, never NaN, so the loss sees clean inputs.
            "teacher_per_token_logps": torch.where(loss_mask & on_teacher_path[:, None], teacher_logps, 0.0),
            "scope_loss_mask": loss_mask.long(),
            **teacher_topk,
            # 0-dim tensors: TRL shuffles and splits every tensor with a batch dimension.
            "scope_num_items_mle": num_items[0].float(),
            "scope_num_items_opd": num_items[1].float(),
        }

    def _log_teacher_counters(self, mode):
        """``teacher/*`` counters (requests, retries, failures, ...) summed over processes, like ``verifier/*``."""
        counters = getattr(self.teacher, "stats_delta", None)
        if not callable(counters):
            return
        delta = counters()
        # Every process must join the reduction with the same keys, even one whose teacher did nothing.
        keys = sorted(delta)
        local = torch.tensor([[float(delta[k]) for k in keys]], dtype=torch.float32, device=self.accelerator.device)
        totals = dict(zip(keys, self.accelerator.gather(local).sum(dim=0).tolist() if keys else []))
        summarize = getattr(self.teacher, "summarize_counters", None)  # TeacherPool: per-teacher fractions and means
        for key, value in (summarize(totals) if callable(summarize) else totals).items():
            self._metrics[mode][f"teacher/{key}"].append(value)

    # ------------------------------------------------------------------ step 6: the loss

    def _compute_loss(self, model, inputs):
        if self.args.algorithm == "grpo":
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        if self.args.opd_loss == "sampled":
            per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
                compute_entropy=True,
            )
            student_topk = None
        else:
            per_token_logps, entropies, *student_topk = self._student_topk_forward(model, inputs)
        loss, loss_metrics = self.scope_loss_from_inputs(per_token_logps, inputs, mode, student_topk=student_topk)

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        for key, value in loss_metrics.items():
            if key in ("loss/mle", "loss/opd"):
                # Micro-batch shares of the batch loss: scaled so the logged mean over an
                # accumulation window equals the window's total, like TRL's "loss".
                value = value * accumulation
            if key not in ("num_tokens", "frac_correct"):  # the verdicts are logged per generation batch
                self._metrics[mode][f"scope/{key}"].append(value)
        mask = inputs["scope_loss_mask"].bool()
        totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]), reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return loss

    def scope_loss_from_inputs(self, per_token_logps: torch.Tensor, inputs: dict, mode: str = "train", *,
                               student_topk: tuple[torch.Tensor, ...] | None = None):
        """The exact call the trainer optimises: :func:`scope_loss` on one micro-batch.

        The denominators are the whole generation batch's per-path counts across processes
        (:func:`~scope_opd.algorithms.loss_denominators`), rescaled to one accumulation window, so that
        summing micro-batch losses (gradient accumulation) and averaging over processes (DDP) gives the
        loss of the whole batch. ``"sum"`` returns this micro-batch's plain token sum, times the number of
        processes so that DDP's gradient average leaves the sum over processes: an optimiser step then
        sees exactly the token sum of what it trains on.

        With a top-k ``opd_loss``, ``student_topk`` is ``(student_topk_logits [B, T, K], student_logsumexp [B, T],
        student_tail_logp [B, T] or None)`` at the teacher's top-k ids (``_student_topk_forward``), and the OPD path's token loss is
        :func:`~scope_opd.algorithms.topk_opd_token_loss` on the incorrect rows.
        """
        args = self.args
        aggregation = args.loss_aggregation
        num_processes = self.accelerator.num_processes
        # TRL splits one generation batch over steps_per_generation micro-steps, gradient_accumulation_steps
        # of which make an optimiser step: each step gets its share of the batch's denominators (as TRL's DAPO).
        window = self.current_gradient_accumulation_steps / args.steps_per_generation if mode == "train" else 1.0
        num_items = torch.stack([inputs["scope_num_items_mle"], inputs["scope_num_items_opd"]]) / num_processes * window
        old = inputs.get("old_per_token_logps")
        token_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction and "importance_sampling_ratio" in inputs:
            # TRL's correction for the sampler/trainer mismatch, applied as GRPO applies it.
            token_weights = inputs["importance_sampling_ratio"].expand_as(per_token_logps)
        clip = {"none": {}, "ppo": {"clip_epsilon": args.epsilon, "clip_epsilon_high": args.epsilon_high},
                "authors": {"clip_epsilon": args.epsilon, "dual_clip": args.dual_clip, "mle_surrogate": "logp"}}
        loss, metrics = scope_loss(
            per_token_logps,
            per_token_logps.detach() if old is None else old,
            inputs["teacher_per_token_logps"],
            inputs["scope_loss_mask"],
            inputs["scope_correct"],
            inputs["scope_student_weights"],
            inputs["scope_teacher_weights"],
            aggregation=aggregation,
            num_items=None if aggregation == "sum" else num_items,
            token_weights=token_weights,
            opd_advantage=args.opd_advantage,
            opd_token_loss=self._topk_token_loss(inputs, student_topk),
            **clip[args.off_policy_clip],
        )
        if aggregation == "sum":
            loss = loss * num_processes
        return loss, metrics

    # ---- resume: epoch-aware sampler and buffered generation
    # (scope_opd.checkpointing saves these hooks' files inside each atomic checkpoint, under its manifest.)
    # TRL's RepeatSampler seeds its generator once per process, so a run resumed in epoch e replayed
    # epoch 0's prompt order; and TRL keeps one generation batch's scored completions in memory
    # (`_buffered_inputs`, one slice per step for `steps_per_generation` steps, picked by `_step`), so a
    # run resumed between those steps regenerated them from already-updated weights.

    GENERATION_STATE_PREFIX = "scope_generation_state"

    def _get_train_sampler(self, dataset=None):
        from .checkpointing import epoch_seeded

        return epoch_seeded(super()._get_train_sampler(dataset))

    def _generation_state_path(self, checkpoint_dir: str) -> str:
        from pathlib import Path

        return str(Path(checkpoint_dir) / f"{self.GENERATION_STATE_PREFIX}_{self.accelerator.process_index}.pt")

    def _save_resume_state(self, checkpoint_dir: str) -> None:
        generate_every = self.args.steps_per_generation * self.num_iterations
        mid_generation_batch = self._step % generate_every != 0 and self._buffered_inputs is not None
        # At a generation boundary the next step samples afresh, so only the step counter is needed.
        state = {"step": self._step, "buffered_inputs": self._buffered_inputs if mid_generation_batch else None}
        torch.save(state, self._generation_state_path(checkpoint_dir))

    def _load_resume_state(self, checkpoint_dir: str, allow_incomplete: bool = False) -> None:
        from pathlib import Path

        from .checkpointing import CheckpointError, checkpoint_global_step

        path = self._generation_state_path(checkpoint_dir)
        if not Path(path).is_file():
            global_step = checkpoint_global_step(checkpoint_dir)
            micro_steps = global_step * self.args.gradient_accumulation_steps
            if micro_steps % (self.args.steps_per_generation * self.num_iterations) == 0 or allow_incomplete:
                return  # TRL regenerates at this step anyway (or the user accepted a fresh batch)
            raise CheckpointError(
                f"cannot resume exactly from {checkpoint_dir}: it was saved in the middle of a generation batch "
                f"(step {global_step}, steps_per_generation {self.args.steps_per_generation}) without {path}, so "
                "that batch's completions would be resampled from the updated weights. Pass "
                "--resume_allow_incomplete true (Python: train(..., allow_incomplete_checkpoint=True)) to accept that."
            )
        try:
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            step, buffered = state["step"], state["buffered_inputs"]
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same error for the user
            raise CheckpointError(f"cannot resume from {checkpoint_dir}: {path} is unreadable ({err})") from err
        self._step, self._buffered_inputs = step, buffered
