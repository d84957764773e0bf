"""Speculative decoding equals plain decoding: the checks the target-family
test files (test_families, test_recurrent) run on each family's tiny pair.

Each takes a loaded target (and its drafter) and asserts the tokens are the
plain target's, token for token; expected tokens come from running it.
"""

import json
import threading

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from conftest import plain_tokens
from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import cache_length, text_args
from mlx_lm_dspark_tools.oracle import OracleDrafter

PROMPT_LONG = [(7 * i + 3) % 300 + 5 for i in range(21)]
PROMPT_SHORT = [42]
MAX = 40
BLOCK = 7


def oracle(model, prompt, right=lambda pos: True, block=BLOCK):
    sequence = list(prompt) + plain_tokens(model, prompt, 3 * MAX)
    return OracleDrafter(text_args(model), sequence, block_size=block, right=right)


def speculative(model, drafter, prompt, max_tokens, **kw):
    kw.setdefault("num_draft_tokens", drafter.max_drafts)
    return [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens, **kw)]


def check_random_drafter(model, drafter_dir, prompt):
    drafter = load_drafter(drafter_dir, bits=None)
    assert speculative(model, drafter, prompt, MAX) == plain_tokens(model, prompt, MAX)
    stats = last_stats(drafter)
    assert stats.rounds > 0 and stats.accepted + stats.rounds + 1 == MAX


def check_oracle_pattern(model, pattern):
    """An oracle right everywhere ("perfect") or at 4 positions of 5."""
    right = (lambda pos: True) if pattern == "perfect" else (lambda pos: pos % 5 != 0)
    for prompt in (PROMPT_SHORT, PROMPT_LONG):
        drafter = oracle(model, prompt, right)
        assert speculative(model, drafter, prompt, MAX) == plain_tokens(model, prompt, MAX)
        stats = last_stats(drafter)
        if pattern == "perfect":
            assert stats.accepted == stats.drafted and stats.rounds == -(-(MAX - 1) // (BLOCK + 1))
        else:
            assert 0 < stats.accepted < stats.drafted


def check_caps_and_max_tokens(model, caps, lengths):
    for cap in caps:
        for max_tokens in lengths:
            drafter = oracle(model, PROMPT_LONG, lambda pos: pos % 4 != 1)
            got = speculative(model, drafter, PROMPT_LONG, max_tokens, num_draft_tokens=cap)
            assert got == plain_tokens(model, PROMPT_LONG, max_tokens), (cap, max_tokens)
            assert all(n <= cap for n in last_stats(drafter).proposal_lengths)


def check_closed_generator_and_next_turn(model, stop):
    """Closing after ``stop`` tokens (mid-round too) leaves prompt + yielded
    tokens in the cache, and the next turn continues like plain decoding."""
    first, second = PROMPT_LONG, [17, 99, 23]
    plain_cache = make_prompt_cache(model)
    expected_first = [t for t, _ in generate_step(mx.array(first), model, max_tokens=stop, prompt_cache=plain_cache)]
    expected_second = [t for t, _ in generate_step(mx.array(second), model, max_tokens=20, prompt_cache=plain_cache)]
    cache = make_prompt_cache(model)
    gen = speculative_generate_step(mx.array(first), model, oracle(model, first, lambda pos: pos % 3 != 0),
                                    max_tokens=MAX, num_draft_tokens=BLOCK, prompt_cache=cache)
    got = [next(gen)[0] for _ in range(stop)]
    gen.close()
    assert got == expected_first
    assert cache_length(cache) == len(first) + stop
    sequence = [0] * (len(first) + stop) + second + expected_second
    second_drafter = OracleDrafter(text_args(model), sequence, right=lambda pos: pos % 4 != 0, block_size=BLOCK)
    assert speculative(model, second_drafter, second, 20, prompt_cache=cache) == expected_second
    assert last_stats(second_drafter).accepted > 0


def check_stream_generate_with_the_automatic_cap(model, drafter_dir, tokenizer):
    """mlx-lm's own stream_generate with a drafter and no fixed cap."""
    drafter = load_drafter(drafter_dir, bits=None)
    out = [r.token for r in mlx_lm.stream_generate(model, tokenizer, mx.array(PROMPT_LONG), max_tokens=24,
                                                     draft_model=drafter)]
    assert out == plain_tokens(model, PROMPT_LONG, 24)
    assert last_stats(drafter).cap is None


def check_trained_drafter(model, output, family):
    """mlx_lm_dspark.train for two steps: a drafter of ``family``'s variant
    that reloads and decodes exactly."""
    from mlx_lm_dspark import train as T

    corpus = np.random.default_rng(0).integers(3, 500, (12, 16)).tolist()
    args = T.TrainingArgs(markov_rank=8, num_layers=1, target_layer_ids=None, block_size=4, iters=2,
                          batch_size=2, anchors_per_seq=4, seq_length=32, learning_rate=3e-3, eval_every=2,
                          eval_sequences=2, eval_tokens=6, save_every=0, progress=False)
    out = T.train(model, corpus, args, output=output)
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    assert all(np.isfinite(h.get("loss", h.get("val_loss"))) for h in history)
    drafter = load_drafter(out, bits=None)
    assert drafter.args.family == family
    assert speculative(model, drafter, PROMPT_LONG, 12) == plain_tokens(model, PROMPT_LONG, 12)


def check_server_conversation(target, drafter):
    """mlx_lm.server with the drafter: a repeated request (from the prompt
    cache) and a continued conversation equal a server without drafter."""
    from test_server import converse, server_pair, with_chat_template

    with_chat_template(target)
    common = ["--model", str(target), "--max-tokens", "16", "--temp", "0.0"]

    def drafted(turn, got):
        assert got["usage"]["speculative"]["rounds"] > 0

    with server_pair(common, ["--draft-model", str(drafter), "--draft-bits", "none"]) as (spec, plain):
        converse(spec, plain, "the river runs past the old mill", 2, 16, "what next", repeat=True, check=drafted)


def check_concurrent_clients(target, drafter, clients=4):
    """``clients`` clients sending different greedy requests at once (half
    streamed) to mlx_lm.server with the drafter: each answer equals a server
    without drafter's answer to the same request, sent alone."""
    from test_server import TEXT, server_pair, text_of

    common = ["--model", str(target), "--max-tokens", "16", "--temp", "0.0"]
    bodies = [{"prompt": f"client {i} asks about the weather in town {3 * i + 1}", "max_tokens": 10 + i,
               "temperature": 0.0, "stream": i % 2 == 1} for i in range(clients)]
    results, errors = {}, []
    with server_pair(common, ["--draft-model", str(drafter), "--draft-bits", "none"]) as (spec, plain):
        want = [text_of(TEXT, b, plain.post(TEXT, b)[1]) for b in bodies]
        start = threading.Barrier(clients)

        def client(i):
            try:
                start.wait(timeout=60)
                results[i] = spec.post(TEXT, bodies[i])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == list(range(clients))
    for i, (status, got) in results.items():
        assert status == 200 and text_of(TEXT, bodies[i], got) == want[i], f"client {i}"
        if not bodies[i]["stream"]:
            assert got["usage"]["speculative"]["rounds"] > 0, f"client {i} drafted nothing"
