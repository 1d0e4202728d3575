"""Bytes per scored token of a teacher server's answer vs ``prompt_logprobs: K`` (what ``teacher_top_k`` costs on the wire).

Sends one token-id prompt of ``--tokens`` random ids (from the checkpoint's vocabulary) with ``prompt_logprobs`` K
for each K in ``--ks`` and prints the answer's size (uncompressed JSON, as ServerTeacher asks for it) per token.
Against ``--url`` (a running vLLM or ``scope serve-teacher``), or against ``scope serve-teacher`` started here on
``--model`` (its tokenizer fills ``decoded_token``, so the sizes are the real model's).

    python benchmarks/bench_topk_payload.py --model ~/.cache/scope-opd/smollm2-135m-instruct
    python benchmarks/bench_topk_payload.py --url http://127.0.0.1:8000 --vocab 151936

The last line reads ``payload: K=0 X B/token, ..., K=20 Y B/token (+Z B per top-k entry)``.
"""

from __future__ import annotations

import argparse

import requests
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint for a `scope serve-teacher` started here")
    parser.add_argument("--url", help="a running server instead")
    parser.add_argument("--vocab", type=int, help="token ids are drawn below this (default: the model's vocabulary)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--ks", default="0,1,5,20")
    args = parser.parse_args()
    if not (args.model or args.url):
        parser.error("give --model or --url")
    ks = [int(k) for k in args.ks.split(",")]
    server = None
    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
    else:
        from transformers import AutoConfig

        from scope_opd.teachers.serve import start_server

        torch.set_num_threads(1)
        args.vocab = args.vocab or AutoConfig.from_pretrained(args.model).get_text_config().vocab_size
        server, _ = start_server(args.model, "127.0.0.1", 0, dtype="float32", device="cpu", batch_size=1)
        url = server.url
    if not args.vocab:
        parser.error("--vocab is needed with --url")
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    sizes = {}
    try:
        for k in ks:
            response = requests.post(url + "/v1/completions", timeout=600, headers={"Accept-Encoding": "identity"},
                                     json={"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k})
            response.raise_for_status()
            sizes[k] = len(response.content) / args.tokens
            print(f"prompt_logprobs {k:>3}: {len(response.content):,} bytes for {args.tokens} tokens")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    per_entry = (sizes[max(ks)] - sizes[min(ks)]) / max(max(ks) - min(ks), 1)
    print("payload: " + ", ".join(f"K={k} {sizes[k]:,.0f} B/token" for k in ks) + f" (+{per_entry:.0f} B per top-k entry)")


if __name__ == "__main__":
    main()
