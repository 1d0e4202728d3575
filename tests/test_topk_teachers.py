"""Where opd_loss='topk_*' gets the teacher's top-k (issue 20): the in-process teacher (through the memory-lean
chunked scorer) and ServerTeacher against `scope serve-teacher` (vLLM's prompt_logprobs: K format), both against
the teacher model's own full logits; the client's parsing of ties, of a scored token outside the top-k, of
malformed answers; K above the server's max_logprobs; a training step through the server."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from scope_opd.teachers import InProcessTeacher, ServerTeacher, TeacherServerError, load_teacher_model
from scope_opd.teachers.chunked_scorer import ChunkedTeacherScorer, memory_lean
from scope_opd.teachers.serve_api import MAX_PROMPT_LOGPROBS
from scope_opd.trainer import SCOPETrainer

from test_teachers import scripted, teacher_server  # noqa: F401 (fixtures)
from test_trainer import dataset, has_digit_reward, load_student, make_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 4


@pytest.fixture(scope="module")
def teacher_model(tiny_pair_dir):
    return load_teacher_model(tiny_pair_dir["teacher"], dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def rows(char_tokenizer):
    generator = torch.Generator().manual_seed(3)
    draw = lambda n: torch.randint(3, len(char_tokenizer), (n,), generator=generator).tolist()  # noqa: E731
    return [draw(n) for n in (3, 7, 2, 5)], [draw(n) for n in (6, 1, 9, 0)]


def full_logits_topk(model, prompts, completions, k):
    """The definition: one unpadded forward per row, full log_softmax, torch.topk; and the scored tokens' log-probs."""
    out = []
    for prompt, completion in zip(prompts, completions):
        if not completion:
            out.append((torch.empty(0), torch.empty(0, k, dtype=torch.long), torch.empty(0, k)))
            continue
        ids = torch.tensor([prompt + completion[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 :].float(), -1)
        values, top_ids = logp.topk(k, dim=-1)
        out.append((logp.gather(-1, torch.tensor(completion)[:, None])[:, 0], top_ids, values))
    return out


def assert_topk_matches(scored, expected, atol):
    for got, (logprobs, top_ids, top_logprobs) in zip(scored, expected):
        torch.testing.assert_close(got.logprobs, logprobs, atol=atol, rtol=0)
        torch.testing.assert_close(got.top_logprobs, top_logprobs, atol=atol, rtol=0)
        assert torch.equal(got.top_ids, top_ids)


def test_in_process_top_k_goes_through_the_chunked_scorer_and_equals_full_logits(teacher_model, rows):
    teacher = memory_lean(InProcessTeacher(teacher_model))
    assert isinstance(teacher, ChunkedTeacherScorer)
    assert_topk_matches(teacher.score_topk(*rows, K), full_logits_topk(teacher_model, *rows, K), atol=1e-5)
    # The logits path gives the same (what a teacher the tiles cannot serve falls back to).
    assert_topk_matches(InProcessTeacher(teacher_model, fused=False).score_topk(*rows, K),
                        full_logits_topk(teacher_model, *rows, K), atol=1e-5)


def test_server_top_k_from_scope_serve_teacher_equals_full_logits(teacher_server, teacher_model, rows):
    client = ServerTeacher(teacher_server.url + "/v1", rows_per_request=2)
    prompts, completions = rows
    # One more row whose first token is the teacher's 2nd choice: inside the top-k (random tokens rarely are).
    second = full_logits_topk(teacher_model, prompts[:1], [[0]], K)[0][1][0, 1].item()
    rows = (prompts + [prompts[0]], completions + [[second, 7]])
    expected = full_logits_topk(teacher_model, *rows, K)
    scored = client.score_topk(*rows, K)
    assert_topk_matches(scored, expected, atol=1e-4)
    # Both of vLLM's entry shapes were parsed: the scored token inside the top-k (K entries) and outside (K + 1).
    inside = [t in ids for (_, ids, _), completion in zip(expected, rows[1]) for t, ids in zip(completion, ids.tolist())]
    assert any(inside) and not all(inside)
    # The sampled-token path is unchanged by asking for the top-k.
    for got, plain in zip(scored, client.score(*rows)):
        torch.testing.assert_close(got.logprobs, plain)


def test_server_refuses_k_above_its_max_logprobs_naming_both(teacher_server):
    client = ServerTeacher(teacher_server.url, max_retries=0)
    client.check_top_k(MAX_PROMPT_LOGPROBS)
    with pytest.raises(TeacherServerError, match=rf"teacher_top_k={MAX_PROMPT_LOGPROBS + 1} is more than the "
                                                 rf"server's max_logprobs {MAX_PROMPT_LOGPROBS}"):
        client.check_top_k(MAX_PROMPT_LOGPROBS + 1)


def test_serve_teacher_max_logprobs_raises_the_cap(tiny_pair_dir, teacher_model, rows):
    """`scope serve-teacher --max-logprobs N` (default 20, vLLM's): K up to N is served and equals the full logits."""
    import argparse

    from scope_opd.teachers.serve import configure_parser, start_server

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["--model", "m"]).max_logprobs == MAX_PROMPT_LOGPROBS
    assert parser.parse_args(["--model", "m", "--max-logprobs", "30"]).max_logprobs == 30
    with pytest.raises(ValueError, match="--max-logprobs must be an integer >= 0, got -2"):
        start_server(tiny_pair_dir["teacher"], "127.0.0.1", 0, device="cpu", max_logprobs=-2)
    server, thread = start_server(tiny_pair_dir["teacher"], "127.0.0.1", 0, dtype="float32", device="cpu", max_logprobs=30)
    try:
        client = ServerTeacher(server.url + "/v1", max_retries=0)
        client.check_top_k(30)
        with pytest.raises(TeacherServerError, match="teacher_top_k=31 is more than the server's max_logprobs 30"):
            client.check_top_k(31)
        prompts, completions = rows
        assert_topk_matches(client.score_topk(prompts, completions, 25), full_logits_topk(teacher_model, prompts, completions, 25),
                            atol=1e-4)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def reply(entries_per_position):
    """A vLLM completions answer for one token-id prompt, with the given prompt_logprobs entries after position 0."""
    entries = [None] + [{str(t): {"logprob": v, "rank": r, "decoded_token": "x"} for t, v, r in position}
                        for position in entries_per_position]
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "text": "!", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}]}


def test_parsing_of_ties_and_of_a_scored_token_outside_the_top_k(scripted):
    # Sequence [5, 6, 7]: position 1 scores 6 (inside the top-2, tied with 9), position 2 scores 7 (outside: 3 entries).
    server = scripted((200, reply([[(6, -0.7, 1), (9, -0.7, 2)], [(7, -3.0, 12), (8, -0.2, 1), (4, -1.9, 2)]])))
    (scores,) = ServerTeacher(server.url).score_topk([[5]], [[6, 7]], 2)
    assert server.received[0][2]["prompt_logprobs"] == 2
    assert scores.logprobs.tolist() == pytest.approx([-0.7, -3.0])
    assert scores.top_ids.tolist() == [[6, 9], [8, 4]]  # ties by id; the outside token dropped
    torch.testing.assert_close(scores.top_logprobs, torch.tensor([[-0.7, -0.7], [-0.2, -1.9]]))


@pytest.mark.parametrize("entries, reason", [
    ([[(6, -0.7, 1)]], "has 1 entries for prompt_logprobs 2"),  # too few
    ([[(6, -0.7, 1), (9, -0.8, 2), (3, -0.9, 3), (4, -1.0, 4)]], "has 4 entries for prompt_logprobs 2"),  # oversized
    ([[(6, -0.7, 5), (9, -0.1, 1)]] , None),  # fine: shows the parametrisation's baseline parses
])
def test_malformed_top_k_answers_are_a_clear_error(scripted, entries, reason):
    server = scripted((200, reply(entries)))
    client = ServerTeacher(server.url, max_retries=0)
    if reason is None:
        assert client.score_topk([[5]], [[6]], 2)[0].top_ids.tolist() == [[9, 6]]
        return
    with pytest.raises(TeacherServerError, match=rf"failed for rows \[0\].*{reason}"):
        client.score_topk([[5]], [[6]], 2)


def raw_reply(entry: dict):
    """A vLLM answer for prompt [5] and completion [6] whose one scored entry is ``entry`` as given (keys unchecked)."""
    answer = reply([])
    answer["choices"][0]["prompt_logprobs"] = [None, entry]
    return answer


def item(logprob, rank=None):
    return {"logprob": logprob, "decoded_token": "x", **({} if rank is None else {"rank": rank})}


@pytest.mark.parametrize("entry, reason", [
    # K + 1 entries, but the scored token 6 is really the top-1: dropping it would lose the true top-1.
    ({"6": item(-0.1, 3), "9": item(-0.5, 1), "3": item(-1.0, 2)}, "scored token 6's log-prob -0.1 is above the lowest"),
    ({"6": item(-0.1), "9": item(-0.5), "3": item(-1.0)}, "scored token 6's log-prob -0.1 is above the lowest"),
    # its log-prob is lowest but its rank says it is inside the top-2
    ({"6": item(-2.0, 1), "9": item(-0.5, 2), "3": item(-1.0, 3)}, r"scored token 6 has rank 1 \(outside the top-2, below 2"),
    ({"6": item(-2.0, 2), "9": item(-0.5, 1), "3": item(-1.0, 3)}, r"scored token 6 has rank 2 \(outside the top-2, below 2"),
    # token ids in another spelling than str(id): '05' beside '5' would be the same id twice
    ({"6": item(-0.7, 1), "05": item(-0.2, 1), "5": item(-0.9, 2)}, "token id '05', not written as '5'"),
    ({"6": item(-0.7, 1), " 9": item(-0.9, 2)}, "token id ' 9', not written as '9'"),
    ({"6": item(-0.7, 1), "+9": item(-0.9, 2)}, r"token id '\+9', not written as '9'"),
    ({"6": item(-0.7, 1), "1_0": item(-0.9, 2)}, "token id '1_0', not written as '10'"),
    ({"6": item(-0.7, 1), str(10**30): item(-0.9, 2)}, r"outside \[0, 2\*\*63\)"),
])
def test_a_top_k_entry_that_contradicts_itself_is_malformed(scripted, entry, reason):
    server = scripted((200, raw_reply(entry)))
    with pytest.raises(TeacherServerError, match=rf"failed for rows \[0\].*{reason}"):
        ServerTeacher(server.url, max_retries=0).score_topk([[5]], [[6]], 2)


@pytest.mark.parametrize("entry, top_ids, top_logprobs", [
    # the scored token outside the top-2, tied with its lowest entry (allowed), with and without a rank
    ({"6": item(-1.0, 3), "9": item(-0.5, 1), "3": item(-1.0, 2)}, [9, 3], [-0.5, -1.0]),
    ({"6": item(-1.0), "9": item(-0.5), "3": item(-1.0)}, [9, 3], [-0.5, -1.0]),
    # tied with the lowest entry, a rank counting only the tokens strictly above it (2) is consistent
    ({"6": item(-1.0, 2), "9": item(-0.5, 1), "3": item(-1.0, 2)}, [9, 3], [-0.5, -1.0]),
    # vLLM's -9999 (a masked token, -inf) as the scored token outside the top-2
    ({"6": item(-9999.0, 7), "9": item(-0.5, 1), "3": item(-1.0, 2)}, [9, 3], [-0.5, -1.0]),
])
def test_a_scored_token_below_the_top_k_is_dropped(scripted, entry, top_ids, top_logprobs):
    server = scripted((200, raw_reply(entry)))
    (scores,) = ServerTeacher(server.url, max_retries=0).score_topk([[5]], [[6]], 2)
    assert scores.top_ids.tolist() == [top_ids]
    assert scores.top_logprobs.tolist() == [top_logprobs]


def test_scope_step_with_a_top_k_loss_through_scope_serve_teacher(tmp_path, tiny_pair_dir, teacher_server):
    args = make_args(tmp_path, "scope", teacher_server_url=teacher_server.url, teacher_tokenizer=tiny_pair_dir["teacher"],
                     opd_loss="topk_reverse", teacher_top_k=K)
    trainer = SCOPETrainer(load_student(tiny_pair_dir["student"]), reward_funcs=[has_digit_reward], args=args,
                           train_dataset=dataset(), processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["student"]))
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["teacher/failures"] == 0 and logs["teacher/requests"] > 0 and logs["scope/loss/opd"] > 0


# -- the sampled-token path on CPU (issue 20: "use it for the sampled-token path too, wherever it beats TRL's kernel")


@pytest.mark.parametrize(("vocab", "tiled"), [(32_768, True), (4_096, False)])
def test_the_sampled_path_takes_the_tiles_on_cpu_for_a_real_vocabulary_and_scores_as_full_logits(vocab, tiled):
    """On CPU, a teacher whose vocabulary is a real LLM's (>= 32,768) scores sampled tokens through the tiles
    (completion positions only; 144 vs 2,093 MiB for TRL's fused head at V = 151,936); a small vocabulary keeps
    the fused head. Either way the log-probs are log_softmax of the model's own full logits, written here."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_opd.teachers.chunked_scorer import sampled_path_scorer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    teacher = InProcessTeacher(model, device="cpu")
    chosen = sampled_path_scorer(teacher)
    assert isinstance(chosen, ChunkedTeacherScorer) is tiled and (chosen is teacher) is not tiled
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (5, 3)]
    completions = [torch.randint(vocab, (n,), generator=generator).tolist() for n in (4, 6)]
    for prompt, completion, got in zip(prompts, completions, chosen.score(prompts, completions)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].double()
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
        want = torch.log_softmax(logits[positions], dim=-1)[torch.arange(len(completion)), torch.tensor(completion)]
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
