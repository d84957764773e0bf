"""Batched speculative rounds (``mlx_lm_dspark.batch``): every row's tokens
equal plain greedy decoding of its prompt alone, whatever the acceptance of
each row, the caps, the prompt lengths and when rows join or leave."""

import importlib
import random

import numpy as np

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from mlx_lm_dspark.batch import BatchSpeculative, batch_generate, unbatchable
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.target import UnsupportedCacheError, text_args
from mlx_lm_dspark_tools.tiny import HYBRID_MODEL_TYPES, build_pair
from tests.conftest import _host_loads
from tests.drafters import ContinuationDrafter, TableDrafter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp("batch"), "qwen3")
    model, _ = load(str(target_dir))
    return model, load_drafter(str(drafter_dir))


def plain(model, prompt, max_tokens):
    return [int(y) for y, _ in generate_step(mx.array(prompt, mx.uint32), model, max_tokens=max_tokens)]


def oracle(model, prompts, expected, acceptance, block_size=7, seed=0):
    continuations = [p + e for p, e in zip(prompts, expected)]
    return ContinuationDrafter(continuations, text_args(model), acceptance, block_size=block_size, seed=seed)


HYBRID_FAMILIES = [
    pytest.param(t, marks=pytest.mark.skipif(not _host_loads(t), reason=f"the installed mlx-lm has no {t} model"))
    for t in HYBRID_MODEL_TYPES
]


def random_prompts(rng, n):
    return [[rng.randrange(2, 500) for _ in range(rng.choice([1, 2, 7, 16, 33]))] for _ in range(n)]


def test_random_drafter_rows_equal_plain_decoding(pair):
    model, drafter = pair
    prompts = [[5, 6, 7], [9] * 17, [3], list(range(10, 50))]
    got = batch_generate(model, drafter, prompts, max_tokens=[20, 9, 1, 14], num_draft_tokens=3)
    assert got == [plain(model, p, m) for p, m in zip(prompts, [20, 9, 1, 14])]


@pytest.mark.parametrize("seed", range(12))
def test_rows_of_different_acceptance_equal_plain_decoding(pair, seed):
    """Seeded: 2-5 rows, each its own prompt length and max_tokens, drafts
    right at random (rows reject different tails in the same round), any cap."""
    model, _ = pair
    rng = random.Random(seed)
    prompts = random_prompts(rng, rng.randint(2, 5))
    limits = [rng.choice([1, 5, 13, 30]) for _ in prompts[2:]] + [30, 30]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    acceptance = rng.choice([0.0, 0.5, 0.7, 0.9, 1.0])
    drafter = oracle(model, prompts, expected, acceptance, seed=seed)
    cap = rng.choice([None, 2, 3, 7])
    batch = BatchSpeculative(model, drafter, num_draft_tokens=cap)
    assert batch_generate_with(batch, prompts, limits) == expected
    if 0 < acceptance < 1:  # the per-row rollback ran: one round kept different counts
        assert any(len(set(r)) > 1 for r in batch.accepted_log)


def batch_generate_with(batch, prompts, limits, join_at=None, leave=None):
    """Drive ``batch``: prompt i joins before round ``join_at[i]``; rows in
    ``leave`` (uid -> round) are removed before that round."""
    join_at = join_at or [0] * len(prompts)
    leave = leave or {}
    out, uids, rnd = {}, {}, 0
    batch.accepted_log = []
    while True:
        for i, p in enumerate(prompts):
            if join_at[i] == rnd:
                uids[i] = batch.insert(p, limits[i])
                out[uids[i]] = []
        for i, r in leave.items():
            if r == rnd and i in uids:
                batch.remove(uids[i])
        if not len(batch) and all(j < rnd for j in join_at):
            break
        for emitted in batch.step():
            out[emitted.uid].extend(emitted.tokens)
        batch.accepted_log.append([a for row in batch.rows for a in row.accepted[-1:]])
        rnd += 1
    return [out[uids[i]] for i in range(len(prompts))]


def drain(batch, limit=None) -> list:
    """Every token a one-sequence batch hands out (stopping at ``limit``)."""
    got = []
    while len(batch) and (limit is None or len(got) < limit):
        for emitted in batch.step():
            got.extend(emitted.tokens)
    return got


def check_a_second_turn(model, take_out):
    """A first turn decoded in a batch, its cache taken out by
    ``take_out(batch, uid, held)``; a second turn from that cache, in a new
    batch, equals plain decoding of the whole conversation."""
    first, turn = [5, 9, 11, 4, 4, 17], [23, 8, 8]
    answer = plain(model, first, 20)
    whole = first + answer + turn
    expected = plain(model, whole, 15)
    drafter = oracle(model, [first, whole], [answer, expected], 0.6)
    batch = BatchSpeculative(model, drafter, num_draft_tokens=3)
    uid = batch.insert(first, 20)
    assert drain(batch, 20) == answer
    held = len(first) + len(answer) - 1
    cache = take_out(batch, uid, held)
    second = BatchSpeculative(model, drafter, num_draft_tokens=3)
    second.insert([answer[-1]] + turn, 15, cache, held)
    assert drain(second) == expected


@pytest.mark.parametrize("seed", range(8))
def test_rows_joining_and_leaving_between_rounds(pair, seed):
    model, _ = pair
    rng = random.Random(100 + seed)
    prompts = random_prompts(rng, 4)
    limits = [rng.choice([3, 8, 20]) for _ in prompts]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    drafter = oracle(model, prompts, expected, 0.7, seed=seed)
    batch = BatchSpeculative(model, drafter, num_draft_tokens=rng.choice([2, 5]))
    join_at = [0] + [rng.randint(0, 6) for _ in prompts[1:]]
    left = rng.randrange(len(prompts))
    leave = {left: join_at[left] + 2}
    got = batch_generate_with(batch, prompts, limits, join_at, leave)
    for i, (g, e) in enumerate(zip(got, expected)):
        if i == left:
            assert g == e[: len(g)]  # cut short, never wrong
        else:
            assert g == e


@pytest.mark.parametrize("precision", ["4-bit", "bfloat16"])
def test_quantized_and_half_precision_targets(tmp_path, precision):
    """Rows of a 4-bit and of a bfloat16 target, with different rejected
    tails each round, equal plain decoding of each prompt alone."""
    import mlx.nn as nn

    target_dir, _ = build_pair(tmp_path, "qwen3", bits=4 if precision == "4-bit" else None)
    model, _ = load(str(target_dir))
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert quantized == (precision == "4-bit")
    if precision == "bfloat16":
        model.set_dtype(mx.bfloat16)
    rng = random.Random(7)
    prompts = random_prompts(rng, 4)
    limits = [24, 17, 30, 9]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 0.6, seed=3), num_draft_tokens=4)
    assert batch_generate_with(batch, prompts, limits) == expected
    assert any(len(set(r)) > 1 for r in batch.accepted_log)


def test_logits_processors_per_row(pair):
    """Repetition penalty and logit bias, each row's history its own: rows
    equal plain decoding with the same processors."""
    from mlx_lm.sample_utils import make_logits_processors

    model, _ = pair
    processors = make_logits_processors(logit_bias={7: 2.0}, repetition_penalty=1.6, repetition_context_size=5)
    prompts = [[5, 6, 7], [9] * 11, list(range(20, 33)), [4]]
    limits = [26, 14, 30, 21]
    expected = [[int(y) for y, _ in generate_step(mx.array(p, mx.uint32), model, max_tokens=m,
                                                  logits_processors=processors)] for p, m in zip(prompts, limits)]
    assert expected != [plain(model, p, m) for p, m in zip(prompts, limits)]  # the processors matter
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 0.7, seed=2), num_draft_tokens=4)
    out = {}
    for p, m in zip(prompts, limits):
        out[batch.insert(p, m, logits_processors=processors)] = []
    while len(batch):
        for emitted in batch.step():
            out[emitted.uid].extend(emitted.tokens)
    assert list(out.values()) == expected


def test_each_row_may_have_its_own_cap(pair):
    """Caps 0, 1 and 5 and the batch's 3 side by side: each row drafts at
    most its own, and every row equals plain decoding."""
    model, _ = pair
    prompts = [[4, 5, 6], [8] * 5, list(range(30, 39)), [2, 3]]
    caps = [0, 1, 5, None]
    expected = [plain(model, p, 25) for p in prompts]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 0.9, seed=6), num_draft_tokens=3)
    out = {batch.insert(p, 25, num_draft_tokens=c): [] for p, c in zip(prompts, caps)}
    while len(batch):
        for emitted in batch.step():
            out[emitted.uid].extend(emitted.tokens)
    assert list(out.values()) == expected
    for uid, cap in zip(out, caps):
        assert max(batch.stats_of(uid).proposal_lengths) == (3 if cap is None else cap)


@pytest.mark.parametrize("seed", range(4))
def test_undrafted_rounds_run_one_ahead_and_rows_still_equal_plain_decoding(pair, monkeypatch, seed):
    """With a network drafter, rounds that draft for no row are queued one
    ahead; rows joining, leaving, finishing and drafting again (a row with
    its own cap) between such rounds still equal plain decoding, and a row
    taken out while a round is queued hands back a cache a next turn goes
    on from exactly."""
    model, drafter = pair
    queued = []
    queue = BatchSpeculative._queue_undrafted
    monkeypatch.setattr(BatchSpeculative, "_queue_undrafted", lambda self: queued.append(1) or queue(self))
    rng = random.Random(400 + seed)
    prompts = random_prompts(rng, 4)
    limits = [30, rng.choice([4, 12]), 10, 20]
    caps = [0, 0, rng.choice([0, 3]), 0]
    join_at, leave_at = [0, rng.randint(1, 4), rng.randint(2, 8), 1], rng.randint(4, 9)
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, drafter, num_draft_tokens=0)
    out, uids, handed = {}, {}, None
    for rnd in range(200):
        for i, p in enumerate(prompts):
            if join_at[i] == rnd:
                uids[i] = batch.insert(p, limits[i], num_draft_tokens=caps[i])
                out[uids[i]] = []
        if rnd == leave_at and len(out[uids[3]]) < limits[3]:
            got = list(out[uids[3]])
            handed = got, batch.extract(uids[3], len(prompts[3]) + len(got) - 1)
        if not len(batch) and rnd > max(join_at):
            break
        for emitted in batch.step():
            out[emitted.uid].extend(emitted.tokens)
            if emitted.finished and emitted.uid == uids[1]:  # taken out right after its last round was read
                held = len(prompts[1]) + len(out[uids[1]]) - 1
                assert all(c.offset == held for c in batch.extract(uids[1], held)[: len(model.layers)])
    for i in range(3):
        assert out[uids[i]] == expected[i], f"row {i}"
    assert queued, "no round ran ahead"
    if handed is not None:
        got, cache = handed
        assert got == expected[3][: len(got)] and out[uids[3]] == got  # nothing handed out after it left
        whole = prompts[3] + got
        second = BatchSpeculative(model, drafter, num_draft_tokens=0)
        second.insert(got[-1:] + [7, 7], 8, cache, len(whole) - 1)
        assert drain(second) == plain(model, whole + [7, 7], 8)


def test_the_demo_pair_drafts_every_row_in_one_forward():
    """The trained demo pair (4-bit target and drafter): the network drafts
    for all rows in one forward, many drafts are kept, rows differ in what
    they keep, and every row equals plain decoding."""
    from pathlib import Path

    import mlx_lm_dspark

    root = Path(mlx_lm_dspark.__file__).parent / "demo_pair"
    model, tokenizer = load(str(root / "target"))
    drafter = load_drafter(str(root / "drafter"))
    texts = ["def add(a, b):", "The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    prompts = [tokenizer.encode(t) for t in texts]
    limits = [40, 25, 40, 33]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, drafter, num_draft_tokens=5)
    assert batch.batched_drafter
    assert batch_generate_with(batch, prompts, limits) == expected
    assert sum(map(sum, batch.accepted_log)) > 20
    assert any(len(set(r)) > 1 for r in batch.accepted_log)


def demo_pair():
    from pathlib import Path

    import mlx_lm_dspark

    root = Path(mlx_lm_dspark.__file__).parent / "demo_pair"
    model, tokenizer = load(str(root / "target"))
    return model, tokenizer, load_drafter(str(root / "drafter"))


def test_undrafted_rounds_reach_the_drafter_contexts_as_if_added_each_round(monkeypatch):
    """The positions of undrafted rounds enter the batched drafter contexts
    together, before the next proposal, a row joining or a row taken out:
    rounds then keep the same drafts as when every round adds its own (the
    trained demo pair, rounds drafting about every fourth, rows joining late and
    one taken out), the contexts handed back hold the same keys and values,
    and every row equals plain decoding."""
    from mlx_lm_dspark import batch as batch_module

    model, tokenizer, drafter = demo_pair()
    prompts = [tokenizer.encode(t) for t in ["def add(a, b):", "1, 2, 3, 4,", "Once upon a time", "The sky is"]]
    limits, join_at, out_at = [40, 36, 30, 30], [0, 3, 9, 0], (3, 14)
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]

    def run():
        batch = BatchSpeculative(model, drafter, num_draft_tokens=0)

        def scripted_caps():  # asked again for a round chosen ahead: a function of the rows' state
            drafting = batch.rows[0].position % 4 == 0
            return [max(0, min(3 if drafting else 0, row.remaining() - 1)) for row in batch.rows]

        batch._caps = scripted_caps
        out, uids, kept, handed = {}, {}, [], None
        for rnd in range(300):
            for i, prompt in enumerate(prompts):
                if join_at[i] == rnd:
                    uids[i] = batch.insert(prompt, limits[i])
                    out[uids[i]] = []
            taken, at = out_at
            if rnd == at:
                handed = batch.extract(uids[taken], len(prompts[taken]) + len(out[uids[taken]]) - 1)
            if not len(batch) and rnd > max(join_at):
                break
            for emitted in batch.step():
                out[emitted.uid].extend(emitted.tokens)
            kept.append([(row.uid, row.accepted[-1]) for row in batch.rows if row.accepted])
        return [out[uids[i]] for i in range(len(prompts))], kept, handed[-len(drafter.make_cache()):]

    deferred = run()
    monkeypatch.setattr(batch_module, "CONTEXT_BATCH", 1)  # every undrafted round adds its own positions
    each_round = run()
    taken = out_at[0]
    assert deferred[0][taken] == expected[taken][: len(deferred[0][taken])]
    assert [o for i, o in enumerate(deferred[0]) if i != taken] == [e for i, e in enumerate(expected) if i != taken]
    assert deferred[0] == each_round[0]
    assert deferred[1] == each_round[1]
    assert sum(a for r in deferred[1] for _, a in r) > 10  # the rounds' drafts were kept: the contexts were read
    for a, b in zip(deferred[2], each_round[2]):
        assert a.offset == b.offset
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :], np.float32),
                                   np.array(b.keys[..., : b.offset, :], np.float32), atol=1e-2, rtol=1e-2)


def test_a_perfect_drafter_keeps_whole_blocks(pair):
    model, _ = pair
    prompts = [[4, 5], [7] * 9, list(range(30, 41))]
    expected = [plain(model, p, 22) for p in prompts]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 1.0), num_draft_tokens=7)
    assert batch_generate_with(batch, prompts, [22] * 3) == expected
    assert max(max(r) for r in batch.accepted_log if r) == 7


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """Gemma-4 with sliding windows of 8 (every answer wraps them) and
    KV-shared layers."""
    target_dir, _ = build_pair(tmp_path_factory.mktemp("batch-gemma4"), "gemma4")
    model, _ = load(str(target_dir))
    return model


@pytest.mark.parametrize("seed", range(6))
def test_sliding_window_rows_equal_plain_decoding(gemma4, seed):
    """Verify blocks narrower than, as wide as and (cap 7 + anchor) the
    window itself, prompts shorter and longer than it, rows joining late."""
    model = gemma4
    assert any(type(c).__name__ == "RotatingKVCache" for c in model.make_cache())
    rng = random.Random(200 + seed)
    prompts = random_prompts(rng, rng.randint(2, 4))
    limits = [rng.choice([5, 13, 30]) for _ in prompts[1:]] + [30]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, rng.choice([0.4, 0.7, 0.9]), seed=seed),
                             num_draft_tokens=rng.choice([2, 4, 7]))
    join_at = [0] + [rng.randint(0, 4) for _ in prompts[1:]]
    assert batch_generate_with(batch, prompts, limits, join_at) == expected


@pytest.mark.parametrize("family", ["gpt_oss", "llama", "qwen3_moe"])
def test_other_attention_families(tmp_path, family):
    """gpt-oss (attention sinks, alternating sliding windows, experts),
    Llama and Qwen3-MoE rows equal plain decoding alone."""
    model, _ = load(str(build_pair(tmp_path, family)[0]))
    rng = random.Random(9)
    prompts = random_prompts(rng, 3)
    limits = [26, 12, 30]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 0.6, seed=1), num_draft_tokens=4)
    assert batch_generate_with(batch, prompts, limits, [0, 1, 3]) == expected
    assert any(len(set(r)) > 1 for r in batch.accepted_log)


def test_long_sliding_window_rows_forget_what_no_window_sees(gemma4):
    """Rows long enough that the batch drops entries older than every
    window (in steps of 256) still equal plain decoding."""
    model = gemma4
    prompts, limits = [list(range(3, 43)), [7, 7, 9]], [300, 280]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, 0.8, seed=4), num_draft_tokens=5)
    assert batch_generate_with(batch, prompts, limits) == expected


def test_a_sliding_window_row_hands_back_the_rotating_cache_plain_decoding_holds(gemma4):
    """A finished row's cache is a RotatingKVCache per sliding layer (its
    latest window) and a KVCache per full layer; a second turn from it, in a
    new batch, equals plain decoding of the whole conversation."""
    model = gemma4
    entries = len(model.make_cache())

    def take_out(batch, uid, held):
        cache = batch.extract(uid, held)
        assert {type(c).__name__ for c in cache[:entries]} == {"RotatingKVCache", "KVCache"}
        assert all(c.offset == held for c in cache[:entries])
        return cache

    check_a_second_turn(model, take_out)


@pytest.fixture(scope="module")
def hybrids(tmp_path_factory):
    """Loaded hybrid (recurrent) targets per family, built once."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = load(str(build_pair(tmp_path_factory.mktemp(f"batch-{family}"), family)[0]))[0]
        return built[family]

    return get


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
@pytest.mark.parametrize("seed", range(3))
def test_hybrid_rows_equal_plain_decoding(hybrids, family, seed):
    """Rows of a hybrid target (recurrent state beside attention), each
    rolled back by its own tail, joining late, equal plain decoding alone."""
    model = hybrids(family)
    rng = random.Random(300 + seed)
    prompts = random_prompts(rng, 3)
    limits = [rng.choice([6, 17]), 12, 30]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    batch = BatchSpeculative(model, oracle(model, prompts, expected, rng.choice([0.5, 0.7]), seed=seed),
                             num_draft_tokens=rng.choice([3, 5]))
    assert batch_generate_with(batch, prompts, limits, [0, rng.randint(0, 3), rng.randint(1, 4)]) == expected
    assert any(len(set(r)) > 1 for r in batch.accepted_log)


def test_a_hybrid_row_hands_back_its_cache_and_a_second_turn_goes_on_from_it(hybrids):
    """A finished hybrid row's cache holds exactly its positions (recurrent
    state cannot be cut shorter: asking is refused); a second turn from it,
    in a new batch, equals plain decoding of the whole conversation."""

    def take_out(batch, uid, held):
        assert not batch.trimmable
        with pytest.raises(ValueError, match="recurrent state"):
            batch.extract(uid, held - 1)
        return batch.extract(uid, held)

    check_a_second_turn(hybrids("qwen3_5"), take_out)


@pytest.mark.skipif(not hasattr(importlib.import_module("mlx_lm.generate"), "StopSequences"),
                    reason="mlx-lm 0.31 has no StopSequences (its server serves drafter requests one at a time)")
def test_a_hybrid_server_row_stopped_inside_a_round_hands_back_the_cache_it_holds(hybrids):
    """A stop sequence met inside a round of kept drafts ends a hybrid
    request; its cache cannot be cut back to the stop, so it is handed back
    whole, named by every token it holds, and a next turn from it equals
    plain decoding of those tokens and the turn."""
    from mlx_lm.generate import StopSequences

    from mlx_lm_dspark.batch import ServerBatch

    model = hybrids("qwen3_5")
    prompt = [5, 9, 11, 4, 4, 17]
    answer = plain(model, prompt, 30)
    stop_at = 4  # a kept draft: the perfect drafter's first round keeps 5
    server = ServerBatch(model, oracle(model, [prompt], [answer], 1.0), num_draft_tokens=5)
    (uid,) = server.insert_segments([[prompt]], [30], stop_sequences=[StopSequences([[answer[stop_at]]])])
    emitted, last = [], None
    while last is None:
        for r in server.next()[1]:
            emitted.append(r.token)
            last = r if r.finish_reason else None
    assert last.finish_reason == "stop" and emitted == answer[: emitted.index(answer[stop_at]) + 1]
    held = last.all_tokens
    assert held[: len(prompt) + len(emitted)] == prompt + emitted and len(held) > len(prompt) + len(emitted) - 1
    turn = [23, 8, 8]
    expected = plain(model, held + turn, 12)
    second = BatchSpeculative(model, oracle(model, [held + turn], [expected], 0.6), num_draft_tokens=3)
    second.insert(turn, 12, last.prompt_cache, len(held), before=held)
    assert drain(second) == expected


class FailingProcessor:
    """A logits processor that raises on its ``at``-th call."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, tokens, logits):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("processor failed")
        return logits


def serve(server, uids, failed):
    """Each uid's tokens from ``server.next()`` until every one ended
    (finished, or failed: in ``failed``)."""
    tokens, ended = {uid: [] for uid in uids}, set()
    while not ended >= set(uids):
        for r in server.next()[1]:
            if r.uid in failed:
                ended.add(r.uid)
                assert r.finish_reason is None  # the server drops it as a stopped request
                continue
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                ended.add(r.uid)
    return tokens


@pytest.mark.skipif(not hasattr(importlib.import_module("mlx_lm.generate"), "StopSequences"),
                    reason="mlx-lm 0.31's server serves drafter requests one at a time: no ServerBatch there "
                           "(its GenerationBatch.Response has other fields)")
def test_a_prefill_or_round_that_raises_ends_its_sequences_and_the_batch_goes_on(pair):
    """A sequence whose prefill raises fails alone; a round that raises
    ends every sequence in it (the batch caches are in no known state);
    each is reported to ``failed`` and answered once, ``next`` itself does
    not raise, and sequences inserted afterwards equal plain decoding."""
    from mlx_lm_dspark.batch import ServerBatch

    model, drafter = pair
    server = ServerBatch(model, drafter, num_draft_tokens=3)
    failed = {}
    server.failed = lambda uid, error: failed.setdefault(uid, error)
    prompts = [[5, 9, 11], [7, 7, 3, 12], [21, 4]]
    at_prefill, fine = server.insert_segments([[prompts[0]], [prompts[1]]], [10, 10],
                                              logits_processors=[[FailingProcessor(1)], None])
    got = serve(server, [at_prefill, fine], failed)
    assert set(failed) == {at_prefill} and "processor failed" in str(failed[at_prefill])
    assert got[fine] == plain(model, prompts[1], 10)
    in_round, beside = server.insert_segments([[prompts[2]], [prompts[0]]], [12, 12],
                                              logits_processors=[[FailingProcessor(4)], None])
    serve(server, [in_round, beside], failed)
    assert {in_round, beside} <= set(failed)
    assert not server.requests and not len(server.engine)
    (after,) = server.insert_segments([[prompts[1]]], [10])
    assert serve(server, [after], failed)[after] == plain(model, prompts[1], 10)


def test_caches_batched_rounds_cannot_roll_back_are_refused_with_the_reason(pair):
    from mlx_lm.models.cache import make_prompt_cache

    model, drafter = pair
    batch = BatchSpeculative(model, drafter, num_draft_tokens=2)
    kept = make_prompt_cache(model, max_kv_size=16)  # rotating caches keeping 4 positions
    assert "keeping 4 positions" in unbatchable(kept)
    with pytest.raises(UnsupportedCacheError, match="keeping 4 positions"):
        batch.insert([3, 4], 4, kept + batch.drafter.make_cache(), 0)


def test_a_lookup_proposer_that_finds_fewer_drafts(pair):
    """The n-gram lookup proposes fewer drafts than asked (or none) on some
    rows: the rows still equal plain decoding."""
    from mlx_lm_dspark.loader import load_lookup

    model, _ = pair
    prompts = [[5, 6, 7, 8] * 6, [3], list(range(40, 60)) * 2]
    expected = [plain(model, p, 24) for p in prompts]
    assert batch_generate(model, load_lookup("ngram:n=2,min=1,k=4"), prompts, max_tokens=24) == expected


@pytest.mark.slow  # draws thousands of sampled tokens
def test_sampled_rows_drafted_in_one_network_forward_follow_plain_sampling():
    """The DSpark network samples every row's drafts in one forward (its q
    per row) and a greedy row rides along: the sampled rows follow plain
    sampling's conditionals, the greedy rows equal plain decoding."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.sampling import SamplerSettings
    from tests import test_speculative_sampling as S

    model = S.make_qwen3_target(vocab_size=S.VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=16, intermediate_size=64, seed=3)[0]
    drafter = S.random_dspark_drafter(model)
    greedy = plain(model, S.PROMPT, S.RUN_LENGTH)
    mx.random.seed(41)
    runs, slots, accepted, drafted = [], [], 0, 0
    while sum(map(len, runs)) < S.FEWER:
        batch = BatchSpeculative(model, drafter, num_draft_tokens=drafter.max_drafts)
        assert batch.batched_drafter
        uids = [batch.insert(S.PROMPT, S.RUN_LENGTH, sampler=make_sampler(temp=1.0)) for _ in range(3)]
        greedy_uid = batch.insert(S.PROMPT, S.RUN_LENGTH)
        out = {uid: [] for uid in uids + [greedy_uid]}
        while len(batch):
            for emitted in batch.step():
                out[emitted.uid].extend(emitted.tokens)
        assert out[greedy_uid] == greedy
        for uid in uids:
            stats = batch.stats_of(uid)
            runs.append(out[uid])
            slots += [0] + [k for a in stats.accepted_lengths for k in range(a + 1)]
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    breaks = list(np.cumsum([len(r) for r in runs])[:-1])
    sample = S.Sample(np.concatenate(runs), np.array(slots), breaks, accepted, drafted)
    assert accepted > 0
    S.assert_plain_distribution(S.conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


@pytest.mark.slow  # draws thousands of sampled tokens
@pytest.mark.parametrize("knob", ["temperature", "top_p", "repetition_penalty"])
def test_sampled_rows_are_distributed_like_plain_sampling(knob):
    """Four rows at a time sample through DSpark's p/q rule with a drafter
    whose q overlaps p partly (the target's next-token logits after the
    previous token alone, a bigram table): every row's tokens follow plain
    sampling's conditionals (the goodness-of-fit tests of
    test_speculative_sampling, stratified by slot in the round)."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.sampling import SamplerSettings
    from tests import test_speculative_sampling as S

    sampler_kw, processor_spec = S.KNOBS[knob]
    processors = S._processors(processor_spec)
    model = S.make_qwen3_target(vocab_size=S.VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                head_dim=16, intermediate_size=64, seed=3)[0]
    table = model(mx.arange(S.VOCAB)[:, None])[:, -1]
    drafter = TableDrafter(table, model.args.__dict__, block_size=3)
    mx.random.seed(31)
    runs, slots, accepted, drafted = [], [], 0, 0
    while sum(map(len, runs)) < S.FEWER:
        batch = BatchSpeculative(model, drafter, num_draft_tokens=drafter.max_drafts)
        uids = [batch.insert(S.PROMPT, S.RUN_LENGTH, sampler=make_sampler(**sampler_kw), logits_processors=processors)
                for _ in range(4)]
        out = {uid: [] for uid in uids}
        while len(batch):
            for emitted in batch.step():
                out[emitted.uid].extend(emitted.tokens)
        for uid in uids:
            stats = batch.stats_of(uid)
            assert stats.rule == "p/q"
            runs.append(out[uid])
            slots += [0] + [k for a in stats.accepted_lengths for k in range(a + 1)]
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    breaks = list(np.cumsum([len(r) for r in runs])[:-1])
    sample = S.Sample(np.concatenate(runs), np.array(slots), breaks, accepted, drafted)
    assert 0.1 < accepted / drafted < 0.95  # kept and replaced drafts are both common
    S.assert_plain_distribution(S.conditionals(model, sample, SamplerSettings(**sampler_kw), processors), sample)


def test_the_batch_cap_prices_a_verify_of_every_row():
    """With verifies that cost a step per row and a drafter round of two
    steps, a fresh cap probes one draft, then drafts while drafts are kept;
    more rows make a block dearer."""
    from mlx_lm_dspark.batch import BatchCap
    from mlx_lm_dspark.cost import CostModel

    cost = CostModel(verify_ms=[4.0 + 0.5 * w for w in range(8)], draft_ms=2.0)  # nearly free width
    cap = BatchCap(cost, 7)
    assert cap.choose(1, 0) == 1  # the first undrafted round probes
    for _ in range(20):
        cap.update(4, 4)
    assert cap.choose(1, 0) >= 4
    # width nearly free up to 4 rows, a step per row beyond
    rising = BatchCap(CostModel(verify_ms=[4.0, 4.2, 4.4, 4.6, 8.0, 12.0, 16.0, 20.0], draft_ms=1.0), 7)
    rising.kept, rising.missed = 9.0, 1.0  # nine in ten kept
    assert rising.choose(1, 0) >= 3 and rising.choose(8, 0) == 0


def probes_of(cap, rows, rounds, keeps=lambda probe: False):
    """The rounds (of ``rounds`` undrafted ones) at which ``cap`` probes;
    each probe's rows keep their draft when ``keeps(probe number)``."""
    at = []
    for r in range(rounds):
        if cap.choose(rows, 0):
            for _ in range(rows):
                cap.update(1, int(keeps(len(at))))
            at.append(r)
    return at


def test_the_batch_cap_probes_within_a_budget_and_less_often_while_probes_keep_nothing():
    """A drafter that keeps nothing: the first undrafted round probes; the
    spacing the budget allows (a probe's verify and drafter round under
    PROBE_BUDGET of the undrafted rounds' time) doubles with each probe
    that keeps nothing, up to PROBE_BACKOFF times, and a probe that keeps
    its draft brings back the shortest; where not even a drafter
    always right would pay, no round probes."""
    from mlx_lm_dspark.autocap import PROBE_BACKOFF, PROBE_BUDGET
    from mlx_lm_dspark.batch import BatchCap
    from mlx_lm_dspark.cost import CostModel

    cost = CostModel(verify_ms=[4.0 + 0.5 * w for w in range(8)], draft_ms=2.0)
    never = BatchCap(cost, 7)
    never.kept, never.missed = 0.0, 50.0
    shortest = never.probe_every(cost, 2)
    assert shortest == int(np.ceil((cost.verify_ms[3] + 2 * cost.draft_ms_for(1)) / (PROBE_BUDGET * cost.verify_ms[1])))
    at = probes_of(never, 2, 50 * shortest)
    gaps = np.diff(at).tolist()
    assert at[0] == 0 and gaps == [2 * shortest + 1, 4 * shortest + 1, 8 * shortest + 1, 16 * shortest + 1,
                                    16 * shortest + 1]
    assert PROBE_BACKOFF == 16
    found = BatchCap(cost, 7)
    found.kept, found.missed = 0.0, 1e6  # one kept draft leaves the estimate far too low to draft
    gaps = np.diff(probes_of(found, 2, 12 * shortest, keeps=lambda probe: probe == 2)).tolist()
    assert gaps[:3] == [2 * shortest + 1, 4 * shortest + 1, shortest + 1]
    dear = BatchCap(CostModel(verify_ms=[4.0 * (w + 1) for w in range(8)], draft_ms=8.0), 7)
    assert probes_of(dear, 1, 500) == []


@pytest.fixture(scope="module")
def eagle3_pairs(tmp_path_factory):
    """(target, EAGLE3 drafter) by name: DeepSpec's cycle-bigram pair with
    its planted drafter (many drafts kept) and random tiny Qwen3 / Gemma-4
    (sliding windows) pairs (few kept)."""
    import json
    import shutil

    from mlx_lm_dspark_tools.tiny import build_eagle3_pair
    from tests.conftest import EAGLE3_FIXTURES

    root = tmp_path_factory.mktemp("batch-eagle3")
    target = root / "bigram"
    shutil.copytree(EAGLE3_FIXTURES / "e2e_bigram" / "target", target)
    config = json.loads((target / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]  # for mlx-lm < 0.32
    (target / "config.json").write_text(json.dumps(config))
    dirs = {"bigram": (target, EAGLE3_FIXTURES / "e2e_bigram" / "draft_qwen3")}
    for family, extra in (("qwen3", {}), ("gemma4", {"sliding_window_pattern": 2, "num_kv_shared_layers": 2})):
        dirs[family] = build_eagle3_pair(root / family, family, vocab_size=128, num_layers=4, ttt_length=4,
                                         target_layer_ids=(0, 1, 2), **extra)
    loaded = {}

    def get(name):
        if name not in loaded:
            target_dir, drafter_dir = dirs[name]
            loaded[name] = (load(str(target_dir))[0], load_drafter(str(drafter_dir), bits=None))
        return loaded[name]

    return get


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["bigram", "qwen3", "gemma4"])
def test_eagle3_rows_drafted_together_equal_plain_decoding(eagle3_pairs, name, seed, monkeypatch):
    """An EAGLE3 drafter drafts for every row in one forward per draft (never
    row by row); rows of different prompt lengths, joining late and one
    leaving early, equal plain decoding."""
    model, drafter = eagle3_pairs(name)
    rng = random.Random(300 + seed)
    vocab = 128 if name != "bigram" else 512
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.choice([1, 2, 7, 16]))] for _ in range(4)]
    limits = [rng.choice([3, 9, 20]) for _ in prompts[1:]] + [20]
    expected = [plain(model, p, m) for p, m in zip(prompts, limits)]
    cap, join_at = rng.choice([2, 4]), [0] + [rng.randint(0, 4) for _ in prompts[1:]]
    left = rng.randrange(len(prompts) - 1)
    schedule = (prompts, limits, join_at, {left: join_at[left] + 2})
    alone = BatchSpeculative(model, drafter, num_draft_tokens=cap)
    alone.batched_drafter = False  # the same rounds, each row drafted by propose
    batch_generate_with(alone, *schedule)
    forwards = []
    forward_rows = drafter._forward_rows
    monkeypatch.setattr(drafter, "_forward_rows", lambda h, *a: forwards.append(h.shape[0]) or forward_rows(h, *a))
    monkeypatch.setattr(drafter, "propose", None)  # not drafted row by row
    batch = BatchSpeculative(model, drafter, num_draft_tokens=cap)
    assert batch.batched_drafter
    got = batch_generate_with(batch, *schedule)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e[: len(g)] if i == left else g == e
    assert max(forwards) > 1  # one forward drafted for several rows
    # Each row kept what it kept drafting alone: its drafts were the same.
    assert batch.accepted_log == alone.accepted_log
    if name == "bigram":
        assert sum(map(sum, batch.accepted_log)) > 10
        assert any(len(set(r)) > 1 for r in batch.accepted_log)
