"""Teacher scoring overlapped with generation: a rollout goes to the teacher while the rest of the batch generates.

TRL's GRPOTrainer generates a whole generation batch in one call, then verifies it, and only then
can SCOPE ask the teacher about the incorrect rollouts: the teacher's time adds to the step. With
``teacher_overlap`` the trainer verifies each rollout as soon as it is complete and hands the rows
the teacher will need to :class:`TeacherPrefetch`, which scores them on one background thread:

* transformers ``generate`` (:func:`generate_streaming`): a forward hook on the student's input
  embeddings sees each sampled token as it is fed back, so a row is verified and sent the moment
  it emits EOS (verl's "each rollout as soon as it finishes"). Generation itself is TRL's one call,
  untouched: same tokens, same RNG stream.
* vLLM (which returns the batch at once) or any engine, with ``rollout_chunk_groups = k``
  (:func:`generate_in_chunks`): the batch is generated ``k`` prompt groups at a time and each chunk
  is verified and sent when it is done. Chunks sample other tokens than one call (RNG stream,
  padding) and decode in smaller batches, which costs generation throughput.

The trainer then waits only for what is still in flight after generation (the old-log-prob
forward runs meanwhile too).

Exactness: the prefetch is only a cache. When the trainer asks for a row's teacher log-probs, a
prefetched result is used only if it was computed for exactly the same prompt and completion token
ids; any other row (a verdict rule that changed, a truncated completion that TRL masked) is scored
then and there, synchronously. So for a teacher that scores each row independently of the others
(a server scoring one row per request: ``ServerTeacher``'s default) the weights and the loss are
the same as on the synchronous path; an in-process teacher that batches rows differently may
differ by float rounding. The verifier's results are kept and handed to TRL's own reward pass when
it verifies the same completions, so the verifier runs once per rollout, as before.

Bounds: one background thread (so an in-process teacher's model is never used by two threads),
whose next ``teacher.score`` call takes every row queued meanwhile (a server sees as many rows as it
can batch, up to the client's ``max_concurrency`` requests in flight); rows queued are at most one
generation batch's (or ``max_pending_rows``). A teacher error (a server killed for good, too slow,
malformed) is raised in the training step as on the synchronous path, as soon as it is known: at the
next submission, or when the trainer waits.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch

__all__ = ["EarlyVerifier", "TeacherPrefetch", "cached_rewards", "generate_in_chunks", "generate_streaming"]


class TeacherPrefetch:
    """Scores submitted rows on one background thread; :meth:`scores` returns them keyed by row.

    Submissions queued while the thread is busy are scored together in its next ``teacher.score``
    call, so a server sees as many concurrent rows as it can batch.

    Args:
        teacher: any :class:`~scope_opd.teachers.TeacherScorer`.
        max_pending_rows: rows submitted and not yet scored before :meth:`submit` waits for the
            teacher; 0: no limit (the rows of one generation batch, whose ids the trainer holds anyway).
    """

    def __init__(self, teacher, *, max_pending_rows: int = 0) -> None:
        if max_pending_rows < 0:
            raise ValueError(f"max_pending_rows must be >= 0, got {max_pending_rows}")
        self.teacher = teacher
        self.max_pending_rows = max_pending_rows
        self._cond = threading.Condition()
        self._queue: list[tuple[list[int], list[list[int]], list[list[int]], Future]] = []
        self._pending_rows = 0
        self._closed = False
        self._submitted: list[tuple[list[int], list[list[int]], list[list[int]], Future]] = []
        self._names: dict[int, str] = {}  # row -> its teacher (key routing over several teachers)
        from .routing import TeacherPool

        self._count_on_use = isinstance(teacher, TeacherPool)
        self.busy_seconds = 0.0  # time the background thread spent scoring
        self.prefetched_rows = 0
        self.missed_rows = 0
        self._thread = threading.Thread(target=self._run, name="teacher-overlap", daemon=True)
        self._thread.start()

    def submit(self, rows: list[int], prompt_ids: list[list[int]], completion_ids: list[list[int]],
               teacher_names: list[str] | None = None) -> None:
        """Queue ``rows`` (batch row numbers) for scoring; raises a failure of an earlier submission first.

        ``teacher_names``: each row's teacher under key routing (a :class:`~scope_opd.teachers.routing.TeacherPool`),
        passed on to ``teacher.score`` and part of what a cached result must match.
        """
        self.raise_if_failed()
        if not rows:
            return
        if teacher_names is not None:
            self._names.update(zip(rows, teacher_names))
        future: Future = Future()
        with self._cond:
            while self.max_pending_rows and self._pending_rows and self._pending_rows + len(rows) > self.max_pending_rows:
                self._cond.wait(timeout=1.0)
                if self._closed:
                    raise RuntimeError("teacher prefetch is closed")
            self._queue.append((rows, prompt_ids, completion_ids, future))
            self._pending_rows += len(rows)
            self._cond.notify_all()
        self._submitted.append((rows, prompt_ids, completion_ids, future))

    def _run(self) -> None:
        _use_teacher_device(self.teacher)
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            prompts = [p for _, ps, _, _ in batch for p in ps]
            completions = [c for _, _, cs, _ in batch for c in cs]
            routed = {"teacher_names": [self._names[r] for rows, *_ in batch for r in rows]} if self._names else {}
            start = time.perf_counter()
            try:
                if self._count_on_use:  # a TeacherPool: its per-teacher row counters count the rows the step uses
                    scored, taught = self.teacher.score_uncounted(prompts, completions, **routed)
                else:
                    scored = self.teacher.score(prompts, completions, **routed)
                    taught = [None] * len(scored)
                if len(scored) != len(prompts):
                    raise RuntimeError(f"teacher returned {len(scored)} rows for {len(prompts)} requested")
            except BaseException as exc:  # handed to the trainer, which raises it in the training step
                for *_, future in batch:
                    future.set_exception(exc)
            else:
                offset = 0
                for rows, *_, future in batch:
                    future.set_result(list(zip(scored[offset : offset + len(rows)], taught[offset : offset + len(rows)])))
                    offset += len(rows)
            finally:
                self.busy_seconds += time.perf_counter() - start
                with self._cond:
                    self._pending_rows -= sum(len(rows) for rows, *_ in batch)
                    self._cond.notify_all()

    def raise_if_failed(self) -> None:
        """Re-raise the error of a submission that already failed (the teacher's own exception, unchanged)."""
        for *_, future in self._submitted:
            if future.done() and not future.cancelled() and future.exception() is not None:
                self.close()
                raise future.exception()

    def scores(self, rows: list[int], prompt_ids: list[list[int]], completion_ids: list[list[int]],
               teacher_names: list[str] | None = None) -> list[torch.Tensor]:
        """Teacher log-probs of ``rows``, as ``teacher.score`` would return them for these ids (and teachers).

        Waits for every submitted chunk (re-raising the first failure), takes each row's result if
        it was scored for the same token ids, and scores the other rows now, in one call.
        """
        prefetched: dict[int, tuple[list[int], list[int], torch.Tensor, object]] = {}
        for submitted_rows, prompts, completions, future in self._submitted:
            try:
                scored = future.result()  # a queued submission whose call has not started is waited for too
            except BaseException:
                self.close()
                raise
            for row, prompt, completion, (values, taught) in zip(submitted_rows, prompts, completions, scored):
                prefetched[row] = (prompt, completion, values, taught)
        out: list[torch.Tensor | None] = [None] * len(rows)
        missing, used = [], []
        for position, (row, prompt, completion) in enumerate(zip(rows, prompt_ids, completion_ids)):
            hit = prefetched.get(row)
            if len(completion) == 0:  # nothing to score (never sent): what teacher.score returns for it
                out[position] = torch.empty(0, dtype=torch.float32)
            elif (hit is not None and hit[0] == list(prompt) and hit[1] == list(completion)
                  and (teacher_names is None or self._names.get(row) == teacher_names[position])):
                out[position] = hit[2]
                used.append(hit[3])
            else:
                missing.append(position)
        if self._count_on_use:  # only the prefetched rows the step takes (the late ones count in teacher.score)
            self.teacher.count_taught(used)
        self.prefetched_rows += sum(1 for c in completion_ids if len(c)) - len(missing)
        self.missed_rows += len(missing)
        if missing:
            routed = {} if teacher_names is None else {"teacher_names": [teacher_names[p] for p in missing]}
            late = self.teacher.score([prompt_ids[p] for p in missing], [completion_ids[p] for p in missing], **routed)
            if len(late) != len(missing):
                raise RuntimeError(f"teacher returned {len(late)} rows for {len(missing)} requested")
            for position, values in zip(missing, late):
                out[position] = values
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Drop what is queued and wait for the call in progress (bounded by the teacher's own timeouts)."""
        with self._cond:
            self._closed = True
            dropped, self._queue = self._queue, []
            self._cond.notify_all()
        for *_, future in dropped:
            future.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _use_teacher_device(teacher) -> None:
    """Make the teacher's accelerator this thread's current device.

    The current CUDA (XPU, ...) device is per-thread state and a new thread starts on device 0, so on rank
    r >= 1 the teacher's kernels launched from here would go to GPU 0: TRL's fused head launches its Triton
    kernel on the current device ("Pointer argument cannot be accessed from Triton"), and anything allocated
    without an explicit device would open a stray context on GPU 0.
    """
    device = getattr(teacher, "device", None)
    if device is None:
        return  # a server teacher: no device of its own
    device = torch.device(device)
    if device.type in ("cpu", "meta", "mps") or device.index is None:
        return
    torch.get_device_module(device.type).set_device(device)


def _decode_like_trl(trainer, prompts, completion_ids):
    """The completions TRL's ``_generate`` hands to the reward functions, or ``None`` where it parses responses."""
    from trl.data_utils import is_conversational

    if is_conversational({"prompt": prompts[0]}):
        tokenizer = trainer._tokenizer
        if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None) is not None:
            return None  # tool-call parsing: leave verification to TRL's own pass
        contents = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        return [[{"role": "assistant", "content": content}] for content in contents]
    return trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)


def _local_verdicts(trainer, rewards_per_func: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool correct/incorrect of rows on this process, by the trainer's verdict rule."""
    index = getattr(trainer, "verdict_reward_index", None)
    if index is not None:
        scores = rewards_per_func[:, index]
        unscorable = torch.isnan(scores)
    else:
        scores = (rewards_per_func * trainer.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return (torch.nan_to_num(scores.float(), nan=float("-inf")) >= trainer.args.correct_threshold - 1e-6) & ~unscorable


def early_verification_supported(trainer) -> bool:
    """Plain synchronous reward callables only: reward models and async rewards stay with TRL's own pass."""
    from trl.trainer.utils import is_async_callable

    return all(not isinstance(f, torch.nn.Module) and not is_async_callable(f) for f in trainer.reward_funcs)


class EarlyVerifier:
    """Verifies rows of a generation batch as soon as they are complete and sends the teacher the rows it will need.

    Keeps each row's rewards (this process's rows, ``[F]`` per row, as TRL's reward pass would
    compute them) so that pass can reuse them (:func:`cached_rewards`).
    """

    def __init__(self, trainer, rows, prompt_ids, prefetch: TeacherPrefetch | None):
        self.trainer, self.rows, self.prompt_ids, self.prefetch = trainer, rows, prompt_ids, prefetch
        self.results: dict[int, tuple[list[int], object, torch.Tensor]] = {}
        self.eos_and_pad = [*trainer.eos_token_ids, trainer._tokenizer.pad_token_id]
        self.enabled = True

    def dispatch(self, row_numbers: list[int], completion_ids: list[list[int]]) -> None:
        """Verify these finished rows (batch row numbers) and submit the teacher rows among them."""
        if not self.enabled or not row_numbers:
            return
        trainer = self.trainer
        start = time.perf_counter()
        inputs = [self.rows[r] for r in row_numbers]
        prompts = [row["prompt"] for row in inputs]
        completions = _decode_like_trl(trainer, prompts, completion_ids)
        if completions is None:
            self.enabled = False
            return
        rewards = self._rewards(inputs, prompts, completions, completion_ids)
        for r, ids, completion, reward in zip(row_numbers, completion_ids, completions, rewards):
            self.results[r] = (list(ids), completion, reward)
        correct = _local_verdicts(trainer, rewards).tolist()
        wanted = [
            j for j, ids in enumerate(completion_ids)
            if len(ids) and (trainer.args.algorithm == "opd" or not correct[j])
            and not (trainer.mask_truncated_completions and ids[-1] not in self.eos_and_pad)
        ]
        # Verification belongs to the "reward" phase, not to "generation" (which times the whole call).
        seconds = time.perf_counter() - start
        trainer._phase_seconds["reward"] += seconds
        trainer._phase_seconds["generation"] -= seconds
        if self.prefetch is not None:
            from .routing import routing_kwargs

            sent = [row_numbers[j] for j in wanted]
            self.prefetch.submit(sent, [list(self.prompt_ids[r]) for r in sent], [list(completion_ids[j]) for j in wanted],
                                 **routing_kwargs(trainer, self.rows, sent))

    def _rewards(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        """``[n, F]`` rewards of these rows on this process: TRL's call convention, without its gather."""
        trainer = self.trainer
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        kwargs = {key: [row[key] for row in inputs] for key in keys}
        kwargs.update(trainer_state=trainer.state, log_extra=trainer._log_completion_extra, log_metric=trainer._log_metric)
        out = torch.zeros(len(inputs), len(trainer.reward_funcs))
        for i, (func, name) in enumerate(zip(trainer.reward_funcs, trainer.reward_func_names)):
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            values = [torch.nan if v is None else v for v in values]
            if len(values) != len(prompts):
                raise ValueError(f"The reward function '{name}' returned {len(values)} rewards, but {len(prompts)} were "
                                 "expected (one per prompt-completion pair)")
            out[:, i] = torch.tensor(values, dtype=torch.float32)
        return out


class _FinishedRows:
    """Forward hook on the student's input embeddings during ``generate``: reports rows as they emit EOS.

    ``generate`` feeds the token sampled at step ``t`` back as the input of step ``t + 1`` (one per
    row; finished rows are fed padding), so the embeddings see every completion token but the
    last step's. Rows finishing at the last step, or never, are left to :meth:`EarlyVerifier.dispatch`
    after the call. Anything other than one new token per row (speculative decoding) switches the hook off.
    """

    def __init__(self, n_rows: int, eos_token_ids, on_finished):
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.done = [False] * n_rows
        self.eos = set(eos_token_ids)
        self.on_finished = on_finished
        self.calls = 0
        self.active = True

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == 1 or not self.active:
            return  # the prefill: the prompts
        input_ids = args[0] if args else None
        if not (torch.is_tensor(input_ids) and input_ids.dim() == 2 and input_ids.shape == (len(self.done), 1)):
            self.active = False
            return
        finished = []
        for row, token in enumerate(input_ids[:, 0].tolist()):
            if self.done[row]:
                continue
            self.tokens[row].append(token)
            if token in self.eos:
                self.done[row] = True
                finished.append(row)
        if finished:
            self.on_finished(finished, [self.tokens[row] for row in finished])


def _start(trainer, rows, prompt_ids) -> EarlyVerifier:
    args = trainer.args
    prefetch = TeacherPrefetch(trainer.teacher, max_pending_rows=args.teacher_overlap_max_pending_rows) if args.teacher_overlap else None
    return EarlyVerifier(trainer, rows, prompt_ids, prefetch)


def _finish(trainer, verifier: EarlyVerifier, completion_ids) -> None:
    """Verify the rows not verified yet, and leave the prefetch and the rewards to the steps after generation."""
    remaining = [r for r in range(len(completion_ids)) if r not in verifier.results]
    verifier.dispatch(remaining, [list(completion_ids[r]) for r in remaining])
    trainer._teacher_prefetch = verifier.prefetch
    trainer._early_rewards = verifier if verifier.enabled else None


def generate_in_chunks(trainer, generate, prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows):
    """TRL's ``_generate_single_turn`` over chunks of ``rollout_chunk_groups`` prompt groups, verified one by one.

    Returns ``(completion_ids, logprobs)`` as one call would: per-row lists, concatenated in order.
    """
    chunk_rows = trainer.args.rollout_chunk_groups * num_generations
    completion_ids: list = []
    logprobs: list | None = []
    verifier = _start(trainer, rows, prompt_ids)
    try:
        for start in range(0, len(prompt_ids), chunk_rows):
            end = min(start + chunk_rows, len(prompt_ids))
            ids, lps = generate(prompt_ids[start:end], images, multimodal_fields, num_generations, has_tool_images)
            completion_ids.extend(ids)
            logprobs = None if lps is None or logprobs is None else logprobs + list(lps)
            if trainer.args.teacher_overlap:
                verifier.dispatch(list(range(start, end)), [list(x) for x in ids])
        _finish(trainer, verifier, completion_ids)
    except BaseException:
        if verifier.prefetch is not None:
            verifier.prefetch.close()
        raise
    return completion_ids, logprobs


def generate_streaming(trainer, generate, prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows):
    """TRL's one ``_generate_single_turn`` call, with each row verified and sent to the teacher once it emits EOS.

    The sampled tokens are those of the plain call (nothing about generation changes), so the
    synchronous baseline is TRL's own path.
    """
    verifier = _start(trainer, rows, prompt_ids)
    watcher = _FinishedRows(len(prompt_ids), trainer.eos_token_ids, verifier.dispatch)
    embeddings = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_input_embeddings()
    handle = embeddings.register_forward_hook(watcher)
    try:
        completion_ids, logprobs = generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        handle.remove()
        # A row reported early must be what TRL kept for it; otherwise forget the early result.
        for row, (ids, _, _) in list(verifier.results.items()):
            if ids != list(completion_ids[row]):
                del verifier.results[row]
        _finish(trainer, verifier, completion_ids)
    except BaseException:
        handle.remove()
        if verifier.prefetch is not None:
            verifier.prefetch.close()
        raise
    return completion_ids, logprobs


def cached_rewards(trainer, completions, completion_ids_list) -> torch.Tensor | None:
    """The gathered ``[world x B, F]`` rewards the early verification produced, if it verified these completions.

    Every process must agree (one of them may have decoded differently), hence the gathered flag.
    """
    verifier, trainer._early_rewards = trainer._early_rewards, None
    local = None
    if verifier is not None and len(verifier.results) == len(completions):
        rows = [verifier.results.get(r) for r in range(len(completions))]
        if all(
            hit is not None and hit[0] == list(ids) and hit[1] == completion
            for hit, ids, completion in zip(rows, completion_ids_list, completions)
        ):
            local = torch.stack([hit[2] for hit in rows])
    device = trainer.accelerator.device
    flags = trainer.accelerator.gather(torch.tensor([local is not None], device=device))
    if not bool(flags.all()):
        return None
    return trainer.accelerator.gather(local.to(device))
