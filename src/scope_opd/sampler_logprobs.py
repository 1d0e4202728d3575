"""Rollout step: the sampled tokens' log-probs, read while transformers' ``generate`` samples them.

vLLM returns the log-prob of every token it samples; transformers' ``generate`` does not, so
TRL's non-vLLM path has none and SCOPE's student-guided weights (eq. 5) need an extra forward
over every rollout (the paper's "old log-prob" phase, Table 8). This module reads them during
the one ``generate`` call instead:

* a forward hook on the model keeps ``log_softmax(logits / T)`` of the position just decoded
  (``[B, V]``, fp32; the model's own output logits, after any soft-capping or scaling its
  forward applies, which is what ``generate`` samples from);
* a forward pre-hook reads the next step's input ids - the token each row sampled - and
  gathers its log-prob; the last step's tokens are gathered from the returned ids.

So only one ``[B, V]`` buffer is held, whatever the completion length. ``T`` must be the
temperature of TRL's own log-probs (``GRPOConfig.temperature``): top-k / top-p / min-p shape
what is sampled, not those log-probs, as with TRL's forward.

What differs from the forward: the numerics of incremental decoding with a KV cache against
one full-sequence pass (measured on the toy student in fp32: 1e-6 per token, see
``tests/test_sampler_logprobs.py``; in bf16, a few 1e-3), and, when ``generate`` runs the model
in another dtype than training (``cast_lm_head_to_fp32``, bf16 generation), that dtype's.

Anything the hooks cannot follow (speculative decoding or any step that feeds more than one
token per row, prefill in chunks, a gathered token that is not the returned one) makes
:meth:`SampledLogprobCapture.per_row` return ``None``; the caller then falls back to the forward.
"""

from __future__ import annotations

import torch

__all__ = ["SampledLogprobCapture"]


class SampledLogprobCapture:
    """Context manager: ``with SampledLogprobCapture(model, T) as capture: ids = generate(...)``.

    Then ``capture.per_row(completion_ids)`` gives, per row, the log-prob of each returned
    completion token (a list of floats as long as the row), or ``None`` when the capture could
    not follow this call. One capture serves one ``generate`` call over ``B`` rows.
    """

    def __init__(self, model: torch.nn.Module, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 to read sampled log-probs, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        self._pending: torch.Tensor | None = None  # [B, V] log-probs of the position just decoded
        self._gathered: list[torch.Tensor] = []  # one [B] per decoding step whose token was fed back
        self._fed: list[torch.Tensor] = []  # the fed-back token ids, [B] per step, for the cross-check
        self._calls = 0
        self.failure: str | None = None
        self._handles: list = []

    # -- hooks

    def _before_forward(self, module, args, kwargs):
        if self.failure is not None:
            return
        self._calls += 1
        if self._calls == 1:
            return  # the prefill: prompt ids, nothing sampled yet
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if self._pending is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] != 1 \
                or input_ids.shape[0] != self._pending.shape[0]:
            self.failure = "a decoding step did not feed exactly one new token per row"
            return
        ids = input_ids[:, 0].to(self._pending.device)
        self._gathered.append(self._pending.gather(1, ids[:, None])[:, 0].cpu())
        self._fed.append(ids.cpu())
        self._pending = None

    def _after_forward(self, module, args, kwargs, output):
        if self.failure is not None:
            return
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if not torch.is_tensor(logits) or logits.dim() != 3:
            self.failure = "the model's forward returned no [B, L, V] logits"
            return
        # The distribution of the next token (what generate samples from, before its logits processors).
        self._pending = torch.log_softmax(logits[:, -1, :].float() / self.temperature, dim=-1)

    # -- context manager

    def __enter__(self) -> "SampledLogprobCapture":
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- result

    def per_row(self, completion_ids: list[list[int]]) -> list[list[float]] | None:
        """Log-probs of each row's returned completion tokens, or ``None`` if they cannot be trusted.

        ``completion_ids``: what ``generate`` returned for each row after the prompt, cut where the
        caller cuts it (TRL keeps everything up to and including the first EOS).
        """
        if self.failure is not None:
            return None
        steps = self._gathered
        if self._pending is not None:  # the last step's tokens were never fed back
            last = [row[len(steps)] if len(row) > len(steps) else 0 for row in completion_ids]
            last_ids = torch.tensor(last, dtype=torch.long)
            steps = [*steps, self._pending.gather(1, last_ids[:, None].to(self._pending.device))[:, 0].cpu()]
            fed = [*self._fed, last_ids]
        else:
            fed = self._fed
        if steps and len(completion_ids) != steps[0].shape[0]:
            self.failure = f"{len(completion_ids)} completions for a generate call over {steps[0].shape[0]} rows"
            return None
        if any(len(row) > len(steps) for row in completion_ids):
            self.failure = "a completion is longer than the decoding steps seen"
            return None
        if not steps:
            return [[] for _ in completion_ids]
        table = torch.stack(steps, dim=1)  # [B, steps]
        fed_ids = torch.stack(fed, dim=1)
        out = []
        for row, ids in enumerate(completion_ids):
            n = len(ids)
            if fed_ids[row, :n].tolist() != list(ids):
                self.failure = f"row {row}: the tokens seen while decoding are not the returned completion"
                return None
            out.append(table[row, :n].tolist())
        return out
