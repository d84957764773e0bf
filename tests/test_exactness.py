"""Randomized, seeded exactness: greedy speculative output equals plain decoding.

Each seed draws one case (mlx_lm_dspark_tools/exactness.py: target family,
precision, drafter kind and layout, lookup alone or combined with the
drafter, block, cap, prompt, max_tokens, EOS, early close, KV-cache options,
second turns) whose expected tokens come from
running the plain target with the same options.  A fast slice runs by
default, a long one with ``-m slow``; together they check FAST + LONG
cases.  A failure's message is the case's one-line reproduction.
"""

import contextlib

import pytest

from mlx_lm_dspark_tools.exactness import TAGS, Case, Session, run_case

# Configurations whose cases are left out of the slices (tag -> why); a
# configuration known to diverge goes here only until its fix lands.  None:
# every configuration the generator draws is checked.
PENDING = set()
PENDING_REASON = ""

# Configurations whose cases may be refused instead (tag -> refusal error
# name), where a refusal is the documented answer for them.  None: every
# cache configuration mlx-lm builds for these targets decodes exactly.
EXPECTED_REFUSALS = {}

FAST = 40
LONG = 1960  # CI's share (2,000 cases in all); `python -m mlx_lm_dspark_tools.exactness --seeds 0:N` runs more


def checked_seeds(skip: int, count: int):
    """``count`` seeds, from 0 upwards, of cases not in a PENDING
    configuration, after the first ``skip`` of them."""
    seeds, seed = [], 0
    while len(seeds) < skip + count:
        if not Case.draw(seed).tags() & PENDING:
            seeds.append(seed)
        seed += 1
    return seeds[skip:]


FAST_SEEDS = checked_seeds(0, FAST)
LONG_SEEDS = checked_seeds(FAST, LONG)


@pytest.fixture(scope="module")
def session(tmp_path_factory, request):
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and PENDING:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(f"\nexactness: cases in {', '.join(sorted(PENDING))} are left out ({PENDING_REASON})")
    import mlx_lm.generate  # noqa: F401  (mlx-lm first: it activates mlx-lm-dspark's patches)

    return Session(tmp_path_factory.mktemp("exactness"))


def check(seed, session):
    from conftest import _host_loads

    case = Case.draw(seed)
    if not _host_loads(case.flavour):
        pytest.skip(f"the installed mlx-lm cannot load {case.flavour} checkpoints (plain decoding neither)")
    outcome = run_case(case, session)
    if outcome.status == "refused":
        allowed = {EXPECTED_REFUSALS[t] for t in outcome.case.tags() if t in EXPECTED_REFUSALS}
        assert outcome.detail.split(":")[0] in allowed, outcome.line()
    else:
        assert outcome.status == "exact", outcome.line()


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_fast_slice(seed, session):
    check(seed, session)


@pytest.mark.slow
@pytest.mark.parametrize("seed", LONG_SEEDS)
def test_long_slice(seed, session):
    check(seed, session)


def test_cases_are_drawn_from_their_seed():
    assert Case.draw(1234) == Case.draw(1234)
    assert Case.draw(1234) != Case.draw(1235)
    assert "--seed 1234" in Case.draw(1234).reproduction()
    assert PENDING <= set(TAGS)


def test_slices_cover_every_dimension():
    """The checked cases reach every value the generator has for each
    dimension that is not pending."""
    from mlx_lm_dspark_tools.exactness import dimensions

    cases = [Case.draw(s) for s in FAST_SEEDS + LONG_SEEDS]
    seen = {}
    for case in cases:
        for dim, value in dimensions(case).items():
            seen.setdefault(dim, set()).add(value)
    assert {"qwen3", "gemma4"} <= seen["family"]
    assert {"gemma4", "gemma4_text", "gemma4_unified", "qwen3"} <= seen["flavour"]
    assert {"float32", "mxfp4", "mxfp8"} | {f"affine {b}-bit" for b in (2, 3, 4, 6, 8)} <= seen["precision"]
    assert {"group 32", "group 64", "group 128"} <= seen["group size"]
    assert {"oracle", "dspark", "dflash", "dspark-dflash_config", "zlab"} <= seen["drafter"]
    assert {"0", "auto", "partial", "full block"} <= seen["cap"]
    assert {"1", "2-8", "9-48", "49-200"} <= seen["prompt"]
    assert {"1", "2-10", "11-40", "41-120", "121-300"} <= seen["max_tokens"]
    assert {"yes"} <= seen["eos in run"] and {"yes"} <= seen["closes early"]
    assert {"start inside prefill", "start after prefill"} <= seen["kv quantization"]
    assert {"2", "4", "8"} <= seen["kv_bits"]
    assert {"no wrap", "wraps"} <= seen["rotating prompt cache"] and {"no wrap", "wraps"} <= seen["max_kv_size"]
    assert {"bfloat16", "float16"} <= seen["precision"]
    assert set(TAGS) <= {t for c in cases for t in c.tags()}
    assert {"two (target cache)", "two (combined cache)"} <= seen["turns"]
    assert {"narrower than verify", "at least verify"} <= seen["sliding window"]
    blocks = {c.block for c in cases}
    assert blocks == set(range(2, 17))
    assert max(len(c.prompt) for c in cases) >= 150 and max(c.max_tokens for c in cases) >= 150
    # Lookup, alone and combined, meets every configuration, and every n-gram setting is drawn.
    assert {"-", "alone", "combined"} == seen["lookup"]
    assert {f"n={n},min={m}" for n in range(1, 6) for m in range(1, n + 1)} | {"-"} == seen["lookup n-gram"]
    for mode in ("alone", "combined"):
        these = [c for c in cases if c.lookup == mode]
        values = lambda dim: {dimensions(c)[dim] for c in these}  # noqa: E731
        assert set(TAGS) <= {t for c in these for t in c.tags()}, mode
        assert {"qwen3", "gemma4"} <= values("family") and {"0", "auto", "partial", "full block"} <= values("cap")
        assert {"two (target cache)", "two (combined cache)"} <= values("turns"), mode
        assert {"start inside prefill", "start after prefill"} <= values("kv quantization"), mode
        assert {"narrower than verify", "at least verify"} <= values("sliding window"), mode
        assert any(len(set(c.prompt)) < len(c.prompt) // 2 for c in these), mode  # prompts that repeat
    assert {"oracle", "dspark", "dflash", "dspark-dflash_config", "zlab"} <= {
        c.drafter for c in cases if c.lookup == "combined"}
    assert {"alone", "combined"} <= {Case.draw(s).lookup for s in FAST_SEEDS}


@pytest.mark.parametrize("seed", [202, 292])
def test_lookup_cases_keep_drafts(seed, session):
    """Lookup alone on a tiny random target: cases whose plain run repeats
    itself keep lookup drafts and stay exact (so the dimension checks the
    accept path too, not only rejections)."""
    case = Case.draw(seed)
    assert case.lookup == "alone"
    outcome = run_case(case, session)
    assert outcome.status == "exact" and outcome.accepted > 0, outcome.line()


def test_a_divergence_is_reported_with_its_reproduction():
    """The comparison can fail: a speculative run that differs from plain
    at one token is reported at that token with the plain margin."""
    from mlx_lm_dspark_tools.exactness import Outcome, Plain, _first_divergence

    plain = Plain(tokens=[[5, 6, 7]], margins=[[1.0, 0.5, 2.0]], cache_lengths=[10])
    assert _first_divergence(plain, Plain([[5, 6, 7]], [[]], [10])) is None
    assert _first_divergence(plain, Plain([[5, 9, 7]], [[]], [10]))[:5] == (0, 1, 6, 9, 0.5)
    assert _first_divergence(plain, Plain([[5, 6]], [[]], [9]))[:4] == (0, 2, 7, None)
    assert "cache holds 11" in _first_divergence(plain, Plain([[5, 6, 7]], [[]], [11]))[5]
    line = Outcome(Case.draw(7), "diverged", "", 0, 1, 6, 9, 0.5).line()
    assert "position 1" in line and "--seed 7" in line
