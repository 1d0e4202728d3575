"""Teacher scoring overlapped with generation: a group's teacher requests leave while later groups generate.

TRL's GRPOTrainer generates a whole generation batch in one call, then verifies it, and only then
can SCOPE ask the teacher about the incorrect rollouts: the teacher's time adds to the step. With
``rollout_chunk_groups = k`` the trainer generates the batch ``k`` prompt groups at a time
(:func:`generate_in_chunks`); with ``teacher_overlap`` it verifies each chunk as soon as it is
generated and hands the rows the teacher will need to :class:`TeacherPrefetch`, which scores them
on one background thread while the next chunks generate. The trainer then waits only for what is
still in flight after the last chunk (and the old-log-prob forward runs meanwhile too).

Exactness: the prefetch is only a cache. When the trainer asks for a row's teacher log-probs, a
prefetched result is used only if it was computed for exactly the same prompt and completion token
ids; any other row (a verdict rule that changed, a truncated completion that TRL masked) is scored
then and there, synchronously. So for a teacher that scores each row independently of the others
(a server scoring one row per request: ``ServerTeacher``'s default) the weights and the loss are
the same as on the synchronous path over the same chunked generation; an in-process teacher that
batches rows differently may differ by float rounding. The verifier's results for each chunk are
kept and handed to TRL's own reward pass when the completions it verifies are the same, so the
verifier runs once per rollout, as before.

Bounds: one background thread (so an in-process teacher's model is never used by two threads),
at most ``max_pending`` chunks submitted and not yet scored (generation waits for a slot: memory
is at most that many chunks' token ids plus the results the synchronous path would hold too), and
a server teacher's own ``max_concurrency`` requests in flight. A teacher error (a server killed
for good, too slow, malformed) is raised in the training step as on the synchronous path, as soon
as it is known: at the next chunk, or when the trainer waits.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["TeacherPrefetch", "cached_rewards", "generate_in_chunks"]


class TeacherPrefetch:
    """Scores submitted rows on one background thread; :meth:`scores` returns them keyed by row.

    Args:
        teacher: any :class:`~scope_opd.teachers.TeacherScorer`.
        max_pending: chunks submitted but not yet scored; :meth:`submit` blocks while that many are.
    """

    def __init__(self, teacher, *, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.teacher = teacher
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-overlap")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._submitted: list[tuple[list[int], list[list[int]], list[list[int]], Future]] = []
        self._busy_lock = threading.Lock()
        self.busy_seconds = 0.0  # time the background thread spent scoring
        self.prefetched_rows = 0
        self.missed_rows = 0

    def submit(self, rows: list[int], prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> None:
        """Queue ``rows`` (batch row numbers) for scoring; raises a failure of an earlier chunk first."""
        self.raise_if_failed()
        if not rows:
            return
        self._slots.acquire()
        try:
            future = self._pool.submit(self._score, prompt_ids, completion_ids)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._submitted.append((rows, prompt_ids, completion_ids, future))

    def _score(self, prompt_ids, completion_ids) -> list[torch.Tensor]:
        start = time.perf_counter()
        try:
            scored = self.teacher.score(prompt_ids, completion_ids)
        finally:
            with self._busy_lock:
                self.busy_seconds += time.perf_counter() - start
        if len(scored) != len(prompt_ids):
            raise RuntimeError(f"teacher returned {len(scored)} rows for {len(prompt_ids)} requested")
        return scored

    def raise_if_failed(self) -> None:
        """Re-raise the error of a chunk that already failed (the teacher's own exception, unchanged)."""
        for *_, future in self._submitted:
            if future.done() and not future.cancelled() and future.exception() is not None:
                self.close()
                raise future.exception()

    def scores(self, rows: list[int], prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Teacher log-probs of ``rows``, as ``teacher.score`` would return them for these ids.

        Waits for every submitted chunk (re-raising the first failure), takes each row's result if
        it was scored for the same token ids, and scores the other rows now, in one call.
        """
        prefetched: dict[int, tuple[list[int], list[int], torch.Tensor]] = {}
        for submitted_rows, prompts, completions, future in self._submitted:
            try:
                scored = future.result()
            except BaseException:
                self.close()
                raise
            for row, prompt, completion, values in zip(submitted_rows, prompts, completions, scored):
                prefetched[row] = (prompt, completion, values)
        out: list[torch.Tensor | None] = [None] * len(rows)
        missing = []
        for position, (row, prompt, completion) in enumerate(zip(rows, prompt_ids, completion_ids)):
            hit = prefetched.get(row)
            if len(completion) == 0:  # nothing to score (never sent): what teacher.score returns for it
                out[position] = torch.empty(0, dtype=torch.float32)
            elif hit is not None and hit[0] == list(prompt) and hit[1] == list(completion):
                out[position] = hit[2]
            else:
                missing.append(position)
        self.prefetched_rows += sum(1 for c in completion_ids if len(c)) - len(missing)
        self.missed_rows += len(missing)
        if missing:
            late = self.teacher.score([prompt_ids[p] for p in missing], [completion_ids[p] for p in missing])
            if len(late) != len(missing):
                raise RuntimeError(f"teacher returned {len(late)} rows for {len(missing)} requested")
            for position, values in zip(missing, late):
                out[position] = values
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Drop queued chunks and wait for the one being scored (bounded by the teacher's own timeouts)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


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
    """``[n]`` bool correct/incorrect of a chunk's local rows, by the trainer's verdict rule."""
    index = getattr(trainer, "verdict_reward_index", None)
    if index is not None:
        scores = rewards_per_func[:, index]
        unscorable = torch.isnan(scores)
    else:
        scores = (rewards_per_func * trainer.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
    return (torch.nan_to_num(scores.float(), nan=float("-inf")) >= trainer.args.correct_threshold - 1e-6) & ~unscorable


def generate_in_chunks(trainer, generate, prompt_ids, images, multimodal_fields, num_generations, has_tool_images, rows):
    """TRL's ``_generate_single_turn`` over chunks of whole prompt groups, verifying and prefetching each.

    Args:
        trainer: the :class:`~scope_opd.trainer.SCOPETrainer`.
        generate: TRL's ``_generate_single_turn`` (bound), called once per chunk.
        rows: the generation batch's dataset rows (gold answers for the verifier), one per prompt.

    Returns ``(completion_ids, logprobs)`` as one call would: per-row lists, concatenated in order.
    Sets ``trainer._teacher_prefetch`` (a :class:`TeacherPrefetch`, or ``None``) and
    ``trainer._chunk_rewards`` (what each chunk's verification returned) for the steps after.
    """
    from trl import GRPOTrainer

    args = trainer.args
    chunk_rows = args.rollout_chunk_groups * num_generations
    completion_ids: list = []
    logprobs: list | None = []
    chunk_rewards = []
    prefetch = TeacherPrefetch(trainer.teacher, max_pending=args.teacher_overlap_max_pending) if args.teacher_overlap else None
    eos_and_pad = [*trainer.eos_token_ids, trainer._tokenizer.pad_token_id]
    try:
        for start in range(0, len(prompt_ids), chunk_rows):
            end = min(start + chunk_rows, len(prompt_ids))
            ids, lps = generate(prompt_ids[start:end], images, multimodal_fields, num_generations, has_tool_images)
            completion_ids.extend(ids)
            logprobs = None if lps is None or logprobs is None else logprobs + list(lps)
            if prefetch is None:
                continue
            verify_start = time.perf_counter()
            chunk_inputs = rows[start:end]
            prompts = [row["prompt"] for row in chunk_inputs]
            completions = _decode_like_trl(trainer, prompts, ids)
            if completions is None:
                prefetch.close()
                prefetch, chunk_rewards = None, []
                continue
            # TRL's own reward pass on this chunk (it gathers over processes: every process runs the same chunks).
            gathered = GRPOTrainer._calculate_rewards(trainer, chunk_inputs, prompts, completions, ids)
            n = end - start
            local = gathered[trainer.accelerator.process_index * n : (trainer.accelerator.process_index + 1) * n]
            chunk_rewards.append((completions, [list(x) for x in ids], gathered))
            correct = _local_verdicts(trainer, local).tolist()
            wanted = [
                j for j in range(n)
                if len(ids[j]) and (args.algorithm == "opd" or not correct[j])
                and not (trainer.mask_truncated_completions and ids[j][-1] not in eos_and_pad)
            ]
            # Verification belongs to the "reward" phase, not to "generation" (which times this whole call).
            seconds = time.perf_counter() - verify_start
            trainer._phase_seconds["reward"] += seconds
            trainer._phase_seconds["generation"] -= seconds
            prefetch.submit([start + j for j in wanted], [list(prompt_ids[start + j]) for j in wanted], [list(ids[j]) for j in wanted])
    except BaseException:
        if prefetch is not None:
            prefetch.close()
        raise
    trainer._teacher_prefetch = prefetch
    trainer._chunk_rewards = chunk_rewards or None
    return completion_ids, logprobs


def cached_rewards(trainer, completions, completion_ids_list) -> torch.Tensor | None:
    """The gathered ``[world x B, F]`` rewards the chunks' verification produced, if they verified these completions.

    Every process must agree (one of them may have decoded differently), hence the gathered flag.
    """
    chunks, trainer._chunk_rewards = trainer._chunk_rewards, None
    ours_completions = [c for chunk in (chunks or []) for c in chunk[0]]
    ours_ids = [ids for chunk in (chunks or []) for ids in chunk[1]]
    same = bool(chunks) and ours_completions == list(completions) and ours_ids == [list(x) for x in completion_ids_list]
    flags = trainer.accelerator.gather(torch.tensor([same], device=trainer.accelerator.device))
    if not bool(flags.all()):
        return None
    per_process = []
    for process in range(trainer.accelerator.num_processes):
        parts = []
        for chunk_completions, _, gathered in chunks:
            n = len(chunk_completions)
            parts.append(gathered[process * n : (process + 1) * n])
        per_process.append(torch.cat(parts))
    return torch.cat(per_process)
