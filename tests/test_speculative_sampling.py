"""Sampled generation through the round loop is distributed like plain sampling.

Samplers from mlx-lm's ``make_sampler`` run DSpark's p/q rule; any other
sampler runs sample-and-match.  Each test generates long runs (many rounds,
so rollback and the drafter context are exercised across round boundaries),
recomputes p_t, the distribution plain mlx-lm samples token t from given the
tokens before it (same processors, same sampler filters), and checks the
tokens against it with the statistics in ``goodness.py``: per-token counts,
the probability-integral transform (both overall and per slot in the round),
consecutive pairs, and that no token plain decoding could not produce ever
appears.

Power (``test_the_tests_catch_a_three_percent_distortion``): with
``TOKENS`` tokens per test and a per-test level of ``ALPHA`` (Bonferroni over
the statistics), a distortion of total variation 0.03 at every position is
caught with probability >= 0.9 whether it sharpens the distribution
(a wrong temperature or residual) or favours one token (a processor applied
wrongly).  The seeds are fixed, so the suite is deterministic.
"""

import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from goodness import chi2_sf, pair_test, pit, pit_mean_test, pit_test, token_test
from mlx_lm_dspark import last_stats
from mlx_lm_dspark.drafter import Drafter, ModelArgs
from mlx_lm_dspark.sampling import SamplerSettings, distribution
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import text_args
from mlx_lm_dspark_tools.tiny import make_qwen3_target
from drafters import ModelDrafter, TableDrafter

pytestmark = pytest.mark.slow  # every test here draws thousands of sampled tokens

VOCAB = 12
PROMPT = [3, 7, 5, 9]
BLOCK = 3  # drafts per round: slots 0..3 in a round
RUN_LENGTH = 250  # tokens per run; several runs per test, each from PROMPT
TOKENS = 10_000  # tokens per p/q knob and fallback test (see the power test)
FEWER = 5000  # perfect / wrong / network drafters, CLI: 0.9 power at total variation 0.04
ALPHA = 1e-3  # per test, split over its statistics


@pytest.fixture(scope="module")
def model():
    # One layer: attention still makes p_t depend on the whole history, at
    # half the cost per forward of two.
    return make_qwen3_target(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, intermediate_size=64, seed=3)[0]


@dataclass
class Sample:
    tokens: np.ndarray  # all runs, concatenated
    slots: np.ndarray  # each token's index within its round (the first token: 0)
    breaks: list  # where each run after the first starts
    accepted: int
    drafted: int
    rounds: int = 0

    @property
    def tau(self) -> float:
        """Mean tokens per round (accepted drafts + 1)."""
        return (self.accepted + self.rounds) / self.rounds


def generate(model, drafter, sampler, processors=None, tokens=TOKENS, seed=0) -> Sample:
    mx.random.seed(seed)
    out, slots, breaks, accepted, drafted, rounds = [], [], [], 0, 0, 0
    while sum(map(len, out)) < tokens:
        if hasattr(drafter, "reset"):
            drafter.reset(PROMPT)
        run = [t for t, _, _ in speculative_generate_step(
            mx.array(PROMPT), model, drafter, max_tokens=RUN_LENGTH, sampler=sampler,
            logits_processors=processors, num_draft_tokens=drafter.max_drafts)]
        stats = last_stats(drafter)
        run_slots = [0] + [k for a in stats.accepted_lengths for k in range(a + 1)]
        assert len(run_slots) == len(run) == RUN_LENGTH
        breaks.append(sum(map(len, out)))
        out.append(run)
        slots += run_slots
        accepted, drafted, rounds = accepted + stats.accepted, drafted + stats.drafted, rounds + stats.rounds
    return Sample(np.concatenate(out), np.array(slots), breaks[1:], accepted, drafted, rounds)


def conditionals(model, sample: Sample, settings: SamplerSettings, processors=None, prompt=PROMPT) -> np.ndarray:
    """p_t for every sampled token: the plain target over the finished run,
    the processors with the history plain decoding has at t, then the
    sampler's filters and temperature."""
    rows = []
    for run in np.split(sample.tokens, sample.breaks):
        sequence = mx.array(list(prompt) + run.tolist())
        logits = model(sequence[None])[0, len(prompt) - 1 : -1].astype(mx.float32)
        if processors:
            processed = []
            for t in range(len(run)):
                row = logits[t : t + 1]
                for processor in processors:
                    row = processor(sequence[: len(prompt) + t], row)
                processed.append(row)
            logits = mx.concatenate(processed)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        rows.append(np.exp(np.array(distribution(logprobs, settings), dtype=np.float64)))
    probs = np.concatenate(rows)
    return probs / probs.sum(axis=1, keepdims=True)


def p_values(probs, tokens, slots, breaks, seed=0, per_token=True) -> dict:
    """p-values of every statistic (``per_token=False`` drops the per-token
    counts, whose chi-square approximation needs a small vocabulary)."""
    u = pit(probs, tokens, np.random.default_rng(seed))
    tests = {
        "tokens": token_test(probs, tokens),
        "tokens by slot": token_test(probs, tokens, slots),
    } if per_token else {}
    tests |= {
        "pit mean": pit_mean_test(u),
        "pit": pit_test(u),
        "pit by slot": pit_test(u, strata=slots),
        "pairs": pair_test(u, breaks=breaks),
    }
    return {name: chi2_sf(stat, df) for name, (stat, df) in tests.items()}


def assert_plain_distribution(probs, sample: Sample, per_token=True):
    impossible = probs[np.arange(len(sample.tokens)), sample.tokens] == 0
    assert not impossible.any(), f"{impossible.sum()} tokens plain decoding never samples"
    p = p_values(probs, sample.tokens, sample.slots, sample.breaks, per_token=per_token)
    if os.environ.get("MLX_LM_DSPARK_SHOW_P"):  # for the report: pytest -s
        rate = sample.accepted / sample.drafted if sample.drafted else float("nan")
        print(f"\n{len(sample.tokens)} tokens, {rate:.1%} of drafts kept, p-values:",
              {k: round(v, 4) for k, v in p.items()})
    assert min(p.values()) > ALPHA / len(p), p
    return p


def distorted_drafter(model, scale=1.2, seed=5, block=BLOCK):
    """Drafts from the target's logits plus a fixed random bias: right often,
    not always (about half the drafts are kept)."""
    mx.random.seed(seed)
    bias = scale * mx.random.normal((VOCAB,))
    return ModelDrafter(model, text_args(model), block_size=block, distort=lambda row: row + bias)


def _penalise_last_token(tokens, logits):
    """A user's own history-dependent processor."""
    return logits.at[:, tokens[-1]].add(-1.5)


KNOBS = {
    "temperature": (dict(temp=0.8), None),
    "top_p": (dict(temp=1.0, top_p=0.8), None),
    "top_k": (dict(temp=1.0, top_k=4), None),
    "min_p": (dict(temp=1.0, min_p=0.1), None),
    "repetition_penalty": (dict(temp=1.0), dict(repetition_penalty=1.5, repetition_context_size=6)),
    "logit_bias": (dict(temp=1.0), dict(logit_bias={4: 1.5, 6: -1.0})),
    "user_processor": (dict(temp=1.0), "user"),
}


def _processors(spec):
    if spec == "user":
        return [_penalise_last_token]
    return make_logits_processors(**spec) if spec else None


@pytest.fixture(scope="module")
def pq_run(model):
    """p/q runs with the half-right drafter, one per knob, generated once
    (the power test reuses the temperature run's conditionals)."""
    done = {}

    def run(knob):
        if knob not in done:
            sampler_kw, processor_spec = KNOBS[knob]
            processors = _processors(processor_spec)
            drafter = distorted_drafter(model)
            sample = generate(model, drafter, make_sampler(**sampler_kw), processors, seed=21)
            assert last_stats(drafter).rule == "p/q"
            probs = conditionals(model, sample, SamplerSettings(**sampler_kw), processors)
            done[knob] = sample, probs, processors
        return done[knob]

    return run


@pytest.mark.parametrize("knob", list(KNOBS))
def test_pq_rule_is_distributed_like_plain_sampling(model, pq_run, knob):
    sample, probs, processors = pq_run(knob)
    assert 0.2 < sample.accepted / sample.drafted < 0.9  # kept and replaced drafts are both common
    assert_plain_distribution(probs, sample)
    if processors:
        # Teeth: the same tokens checked against the unprocessed target fail.
        unprocessed = conditionals(model, sample, SamplerSettings(**KNOBS[knob][0]))
        p = p_values(unprocessed, sample.tokens, sample.slots, sample.breaks)
        assert min(p.values()) < 1e-6, p


@pytest.mark.parametrize("knob", ["temperature", "repetition_penalty"])
def test_a_perfect_drafter_keeps_every_draft(model, knob):
    """q = p (the drafter is the target, processed the same way): p/q = 1,
    so every draft is kept and the output is still exact."""
    sampler_kw, processor_spec = KNOBS[knob]
    processors = _processors(processor_spec)
    drafter = ModelDrafter(model, text_args(model), block_size=BLOCK)
    sample = generate(model, drafter, make_sampler(**sampler_kw), processors, tokens=FEWER, seed=22)
    assert sample.accepted / sample.drafted > 0.999
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(**sampler_kw), processors), sample)


def test_a_wrong_drafter_is_still_exact(model):
    """q favours what p disfavours: almost every draft is replaced by a
    residual sample, which must still make the output exact."""
    contexts = mx.array([PROMPT + [token] for token in range(VOCAB)])
    table = -2 * model(contexts)[:, -1]  # a bigram guess, inverted
    drafter = TableDrafter(table, text_args(model), block_size=BLOCK)
    sample = generate(model, drafter, make_sampler(temp=1.0), tokens=FEWER, seed=23)
    assert sample.accepted / sample.drafted < 0.1
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


def test_sample_and_match_is_distributed_like_the_target(model):
    """An opaque sampler (not from make_sampler) runs sample-and-match."""
    drafter = distorted_drafter(model, scale=0.6)
    opaque = lambda logprobs: mx.random.categorical(logprobs * (1 / 0.9))  # noqa: E731
    sample = generate(model, drafter, opaque, seed=24)
    assert last_stats(drafter).rule == "sample-and-match"
    assert sample.accepted / sample.drafted > 0.2
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=0.9)), sample)


def test_pq_rule_keeps_more_drafts_than_sample_and_match(model):
    """Same drafter, same target distribution: p/q accepts a draft with
    probability sum min(p, q), sample-and-match only when an independent
    draw from p happens to equal it."""
    taus = {}
    for rule, sampler in [("p/q", make_sampler(temp=1.0)),
                          ("sample-and-match", lambda logprobs: mx.random.categorical(logprobs))]:
        drafter = distorted_drafter(model)
        taus[rule] = generate(model, drafter, sampler, tokens=8 * RUN_LENGTH, seed=28).tau
        assert last_stats(drafter).rule == rule
    if os.environ.get("MLX_LM_DSPARK_SHOW_P"):
        print("\nτ:", taus)
    assert taus["p/q"] > taus["sample-and-match"], taus


def random_dspark_drafter(model):
    """A DSpark drafter for the tiny target: random layers, the target's
    embedding and head, so its q overlaps p only partly."""
    args = dict(family="qwen3", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                vocab_size=VOCAB, block_size=4, target_layer_ids=[0], num_target_layers=1,
                mask_token_id=VOCAB - 1, markov_rank=4, enable_confidence_head=True,
                confidence_head_with_markov=True)
    drafter = Drafter(ModelArgs.from_dict(args))
    mx.random.seed(0)
    params = [(k, mx.ones(v.shape) if "norm" in k else 0.3 * mx.random.normal(v.shape))
              for k, v in tree_flatten(drafter.parameters())]
    drafter.update(tree_unflatten(params))
    drafter.embed_tokens.weight = model.model.embed_tokens.weight
    drafter.lm_head.weight = model.lm_head.weight
    drafter.kind = "dspark"
    return drafter


def test_pq_rule_with_a_dspark_network_drafter(model):
    """The drafter network's own sampling path (Markov chain over sampled
    drafts), with a random drafter whose q overlaps p only partly."""
    drafter = random_dspark_drafter(model)
    sample = generate(model, drafter, make_sampler(temp=1.0), tokens=FEWER, seed=25)
    assert last_stats(drafter).rule == "p/q" and sample.accepted > 0
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


def random_eagle3_drafter(model, keep=None):
    """An EAGLE3 drafter for the tiny target: random layer, the target's
    embedding and head; ``keep`` (sorted target ids) reduces its draft
    vocabulary to those (speculators' d2t), so q is zero elsewhere."""
    from mlx_lm_dspark.eagle3 import Eagle3Drafter, ModelArgs as Eagle3Args

    args = dict(family="qwen3", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, vocab_size=VOCAB,
                target_layer_ids=[0], ttt_length=BLOCK, num_target_layers=1,
                draft_vocab_size=len(keep) if keep else None)
    drafter = Eagle3Drafter(Eagle3Args.from_dict(args))
    mx.random.seed(1)
    params = [(k, mx.ones(v.shape) if "norm" in k else 0.3 * mx.random.normal(v.shape))
              for k, v in tree_flatten(drafter.parameters()) if not k.startswith("vocab.")]
    drafter.update(tree_unflatten(params))
    drafter.embed_tokens.weight = model.model.embed_tokens.weight
    head = model.lm_head.weight
    if keep:
        rows = mx.array(keep)
        drafter.lm_head.weight = head[rows]
        drafter.vocab.d2t = (rows - mx.arange(len(keep))).astype(mx.int64)
        drafter.vocab.t2d = mx.zeros((VOCAB,), mx.int32).at[rows].add(1).astype(mx.bool_)
    else:
        drafter.lm_head.weight = head
    drafter.kind = "eagle3"
    return drafter


@pytest.mark.parametrize("keep", [None, [0, 2, 3, 5, 7, 8, 9, 11]], ids=["full", "reduced-vocabulary"])
def test_pq_rule_with_an_eagle3_network_drafter(model, keep):
    """EAGLE3's sequential sampling (each draft feeds the next forward), and
    with a reduced draft vocabulary q is zero outside it: exact either way."""
    drafter = random_eagle3_drafter(model, keep)
    sample = generate(model, drafter, make_sampler(temp=1.0), tokens=FEWER, seed=26)
    assert last_stats(drafter).rule == "p/q" and sample.accepted > 0
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


@pytest.fixture(scope="module")
def gemma4_model():
    """A Gemma-4 target (softcapped logits, a sliding window of 8 that every
    run wraps, global layers with their own head dim)."""
    from mlx_lm_dspark_tools.tiny import make_gemma4_target

    return make_gemma4_target(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                              head_dim=16, global_head_dim=16, intermediate_size=64, sliding_window=8,
                              sliding_window_pattern=2, num_kv_shared_layers=0, seed=3)


def test_pq_rule_with_an_eagle3_drafter_on_gemma4(gemma4_model):
    """The Gemma-4 EAGLE3 flavour (scaled embedding, sandwich norms,
    softcapped draft logits) sampling through the loop on a Gemma-4 target:
    exact.  The drafter is the trainer's untrained one."""
    from mlx_lm_dspark import train as T

    model, config = gemma4_model
    args = T.TrainingArgs(algorithm="eagle3", block_size=BLOCK, target_layer_ids=[0, 1])
    drafter = T.build_drafter(T.drafter_config(config, "gemma4", 2, args, None), model, seed=1)
    assert drafter.kind == "eagle3" and drafter.args.family == "gemma4"
    sample = generate(model, drafter, make_sampler(temp=1.0), tokens=FEWER, seed=29)
    assert last_stats(drafter).rule == "p/q" and sample.accepted > 0
    assert_plain_distribution(conditionals(model, sample, SamplerSettings(temp=1.0)), sample)


def test_a_classic_bug_is_caught(model, monkeypatch):
    """Teeth on the real loop: drawing the replacement token from p instead
    of the residual max(0, p - q) (a common speculative-sampling bug) fails
    these checks."""
    import mlx_lm_dspark.speculative as speculative

    def residual_from_p(p, q, drafts):
        n = drafts.size
        if n == 0:
            return mx.array(0), mx.random.categorical(p[:1]).astype(mx.uint32)
        rows = mx.arange(n)
        kept = mx.log(mx.random.uniform(shape=(n,))) < p[rows, drafts] - q[rows, drafts]
        accepted = mx.cumprod(kept.astype(mx.int32)).sum()
        return accepted, mx.random.categorical(mx.take(p, accepted[None], axis=0)).astype(mx.uint32)

    monkeypatch.setattr(speculative, "accept_pq", residual_from_p)
    sample = generate(model, distorted_drafter(model), make_sampler(temp=1.0), tokens=3000, seed=27)
    probs = conditionals(model, sample, SamplerSettings(temp=1.0))
    p = p_values(probs, sample.tokens, sample.slots, sample.breaks)
    assert min(p.values()) < ALPHA / len(p), p


# -- power ------------------------------------------------------------------


def _mean_tv(distort, probs, tv):
    """distort(probs, t) with t raised until the mean total variation is
    ``tv`` (rows that cannot move t of mass move what they can)."""
    lo, hi = tv, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        moved = np.abs(distort(probs, mid) - probs).sum(1).mean() / 2
        lo, hi = (mid, hi) if moved < tv else (lo, mid)
    return distort(probs, hi)


def sharpen(probs, tv):
    """Move ``tv`` of mass (per row, at most what it has) from the less
    likely half of each row to the more likely half, proportionally: like a
    wrong temperature, and hard for these statistics."""
    def move(probs, t):
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1)
        top = np.cumsum(ranked, axis=1) - ranked < 0.5
        mass_top = (ranked * top).sum(1, keepdims=True)
        shift = np.minimum(t, 1 - mass_top)
        rest = np.maximum(1 - mass_top, 1e-12)
        ranked = np.where(top, ranked * (1 + shift / mass_top), ranked * (1 - shift / rest))
        out = np.empty_like(probs)
        np.put_along_axis(out, order, ranked, axis=1)
        return out

    return _mean_tv(move, probs, tv)


def favour(probs, tv, token):
    """Move ``tv`` of mass onto one token, in the rows where it is allowed
    at all (like a logit bias applied where it should not be)."""
    def move(probs, t):
        allowed = probs[:, token] > 0
        weight = np.where(allowed, np.minimum(t / np.maximum(1 - probs[:, token], 1e-12), 1), 0)[:, None]
        target = np.zeros_like(probs)
        target[:, token] = 1
        return (1 - weight) * probs + weight * target

    return _mean_tv(move, probs, tv)


def rejection_rate(probs, distorted, slots, breaks, reps, rng):
    cumulative = np.cumsum(distorted, axis=1)
    rejected = 0
    for _ in range(reps):
        draws = (rng.uniform(size=(len(probs), 1)) > cumulative).sum(1).clip(0, VOCAB - 1)
        p = p_values(probs, draws, slots, breaks, seed=int(rng.integers(1 << 30)))
        rejected += min(p.values()) <= ALPHA / len(p)
    return rejected / reps


def test_the_tests_catch_a_three_percent_distortion(pq_run):
    """Power of ``assert_plain_distribution`` at TOKENS tokens, on the real
    conditionals of a p/q run: tokens drawn from p_t distorted by total
    variation 0.03 are rejected >= 90% of the time; undistorted ones rarely.
    (Measured, 100 repetitions each: at total variation 0.03 sharpened 1.0,
    favoured 1.0; at 0.02: 0.67 and 1.0; undistorted 0.005 of 200.  At FEWER
    tokens (temperature 1): 0.73 / 1.0 at 0.03, 0.98 / 1.0 at 0.04.)"""
    sample, probs, _ = pq_run("temperature")
    rng = np.random.default_rng(0)
    middling = int(np.argsort(probs.mean(0))[VOCAB // 2])
    sharp = sharpen(probs, 0.03)
    tilted = favour(probs, 0.03, middling)
    assert abs(np.abs(sharp - probs).sum(1).mean() / 2 - 0.03) < 1e-4
    assert abs(np.abs(tilted - probs).sum(1).mean() / 2 - 0.03) < 1e-4
    assert rejection_rate(probs, sharp, sample.slots, sample.breaks, 100, rng) >= 0.9
    assert rejection_rate(probs, tilted, sample.slots, sample.breaks, 40, rng) >= 0.9
    assert rejection_rate(probs, probs, sample.slots, sample.breaks, 100, rng) <= 0.02


# -- the CLI ----------------------------------------------------------------

CLI_SPY = """
import importlib, json, os, sys

host = importlib.import_module("mlx_lm.generate")  # the module (mlx_lm.generate is the function)
from mlx_lm_dspark import last_stats

runs = []
dispatch = host.speculative_generate_step  # mlx-lm-dspark's dispatcher


def spy(prompt, model, draft_model, *args, **kwargs):
    run = {"prompt": prompt.tolist(), "tokens": []}
    runs.append(run)
    try:
        for item in dispatch(prompt, model, draft_model, *args, **kwargs):
            run["tokens"].append(int(item[0]))
            yield item
    finally:  # the CLI stops iterating at EOS
        run["rule"] = last_stats(draft_model).rule
        run["accepted_lengths"] = list(last_stats(draft_model).accepted_lengths)


host.speculative_generate_step = spy
flags = sys.argv[1:]
seed = 0
while sum(len(r["tokens"]) for r in runs) < int(os.environ["SPY_TOKENS"]):
    sys.argv = ["mlx_lm.generate"] + flags + ["--seed", str(seed)]
    host.main()
    seed += 1
with open(os.environ["SPY_OUT"], "w") as f:
    json.dump(runs, f)
"""


def test_cli_sampling_flags_are_distributed_like_plain_sampling(tmp_path):
    """``mlx_lm.generate``'s own main() with --temp/--top-p/--top-k/--min-p/
    --seed and --draft-model (tokens recorded by a spy around the dispatch
    the CLI calls) samples from what plain decoding samples from.  The
    tokenizer's 128-token vocabulary makes per-token counts too sparse, so
    the PIT statistics and the impossible-token check are used (FEWER
    tokens: 0.9 power at total variation ~0.042)."""
    import json
    import subprocess
    import sys

    from mlx_lm.utils import load
    from mlx_lm_dspark_tools.tiny import build_pair

    target_dir, drafter_dir = build_pair(tmp_path, "qwen3", vocab_size=128, num_layers=2, hidden_size=32,
                                         head_dim=16, intermediate_size=64, target_layer_ids=(0, 1),
                                         num_drafter_layers=1, block_size=4)
    spy, out = tmp_path / "spy.py", tmp_path / "runs.json"
    spy.write_text(CLI_SPY)
    flags = dict(temp=0.8, top_p=0.9, top_k=40, min_p=0.02)
    argv = [sys.executable, str(spy), "--model", str(target_dir), "--draft-model", str(drafter_dir),
            "--prompt", "the quick brown fox", "--max-tokens", "500", "--verbose", "False"]
    argv += [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "SPY_OUT": str(out), "SPY_TOKENS": str(FEWER)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(out.read_text())
    assert {r["rule"] for r in runs} == {"p/q"}

    model, _ = load(str(target_dir))
    prompts = {tuple(r["prompt"]) for r in runs}
    assert len(prompts) == 1
    tokens = [np.array(r["tokens"]) for r in runs]
    slots = [[0] + [k for a in r["accepted_lengths"] for k in range(a + 1)] for r in runs]
    assert [len(s) for s in slots] == [len(t) for t in tokens]
    breaks = list(np.cumsum([len(t) for t in tokens])[:-1])
    sample = Sample(np.concatenate(tokens), np.concatenate(slots), breaks, 0, 0)
    probs = conditionals(model, sample, SamplerSettings(**flags), prompt=list(prompts.pop()))
    assert_plain_distribution(probs, sample, per_token=False)
