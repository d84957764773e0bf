"""The automatic draft length: caps chosen from the cost model and the
acceptance estimates, exact output whatever the caps."""

import mlx.core as mx
import mlx_lm
import pytest

from mlx_lm_dspark import last_stats, load_drafter
from mlx_lm_dspark.autocap import (
    AGREED_ROUNDS,
    AT_STEP,
    CALIBRATION_ROUNDS,
    DECLINES,
    PRIOR_FADED,
    PROBE_BUDGET,
    PROBE_EVERY,
    DraftLength,
)
from mlx_lm_dspark.cost import CostModel
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.target import text_args
from mlx_lm_dspark_tools.tiny import build_pair
from conftest import plain_tokens
from mlx_lm_dspark_tools.oracle import OracleDrafter

GPU_LIKE = CostModel(verify_ms=[10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5], draft_ms=2.0)
CPU_LIKE = CostModel(verify_ms=[10.0 * w for w in range(1, 9)], draft_ms=2.0)


def test_best_cap_follows_costs_and_acceptance():
    assert GPU_LIKE.best_cap([0.9] * 7) == 7  # verifying more is nearly free
    assert CPU_LIKE.best_cap([0.9] * 7) == 0  # each token costs a full forward: never pays
    cheap_second = CostModel(verify_ms=[10.0, 11.0] + [10.0 * w for w in range(3, 9)], draft_ms=1.0)
    assert cheap_second.best_cap([0.9] * 7) == 1
    assert GPU_LIKE.best_cap([0.0] * 7) == 0  # a drafter that is never right
    assert GPU_LIKE.best_cap([0.95, 0.95, 0.05, 0.9, 0.9, 0.9, 0.9]) == 2  # nothing survives slot 3
    # Expected tokens and rate as defined in the docs.
    assert GPU_LIKE.expected_tokens([0.5, 0.5], 2) == 1 + 0.5 + 0.25
    assert GPU_LIKE.tokens_per_ms([0.5, 0.5], 2) == pytest.approx(1.75 / (11.0 + 2.0))


def test_confidence_sets_the_cap_of_each_round():
    lengths = DraftLength(GPU_LIKE, 7)
    assert lengths.choose(7, [0.2] * 7) == 7  # calibration: whole proposals are verified ...
    for _ in range(CALIBRATION_ROUNDS):
        lengths.update(7, 7, [0.95] * 7)
    assert lengths.calibrated  # ... until CALIBRATION_ROUNDS were
    assert lengths.choose(7, [0.95] * 7) == 7
    assert lengths.choose(7, [0.95, 0.9, 0.02, 0.9, 0.9, 0.9, 0.9]) == 2
    assert lengths.choose(3, [0.95] * 7) == 3  # never more than proposed


def test_the_cap_falls_as_the_context_grows():
    # Verifying costs more per token with every cached position (attention):
    # a cap that pays early stops paying late.
    growing = CostModel(verify_ms=[10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5], draft_ms=2.0, context=0,
                        verify_ms_per_position=[0.001 * w for w in range(1, 9)], draft_ms_per_position=0.0)
    lengths = DraftLength(growing, 7)
    lengths.calibrated = True
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    accept = lengths.acceptance(confidence)
    lengths.at(10)
    early = lengths.choose(7, confidence)
    lengths.at(8000)
    late = lengths.choose(7, confidence)
    assert early == growing.at(10).best_cap(accept) and late == growing.at(8000).best_cap(accept)
    assert 0 < late < early


def test_costs_follow_the_context_within_a_few_positions():
    growing = CostModel(verify_ms=[10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5], draft_ms=2.0, context=0,
                        verify_ms_per_position=[0.001 * w for w in range(1, 9)], draft_ms_per_position=0.001)
    lengths = DraftLength(growing, 7)
    recomputed = set()
    for context in range(5, 300, 3):  # rounds keeping 3 tokens each
        lengths.at(context)
        assert 0 <= context - lengths.now.context < AT_STEP
        assert lengths.now.verify_ms == pytest.approx(growing.at(lengths.now.context).verify_ms)
        recomputed.add(lengths.now.context)
    assert 20 < len(recomputed) < 60  # neither every round nor never
    lengths.start()
    lengths.at(7)
    assert lengths.now.context == 7  # a new generation starts from its own context


def test_running_estimates_learn_acceptance_and_skip_drafting_that_does_not_pay():
    lengths = DraftLength(GPU_LIKE, 7)
    for _ in range(40):  # slot 1 always right, slot 2 never
        lengths.update(7, 1)
    rates = lengths.acceptance()
    assert rates[0] > 0.9 and rates[1] < 0.1
    assert lengths.choose(7) == 1
    # A drafter that is never right: drafting stops, with probes (verifying a
    # whole proposal) coming less often while they find nothing.
    lengths = DraftLength(GPU_LIKE, 7)
    for _ in range(40):
        lengths.update(7, 0)
    every = lengths.min_probe_every
    assert every >= PROBE_EVERY
    # Probes cost at most PROBE_BUDGET of the time of plain decoding meanwhile.
    probe_extra = GPU_LIKE.round_ms(7) + GPU_LIKE.verify_ms[0]
    assert probe_extra / (every * GPU_LIKE.verify_ms[0]) <= PROBE_BUDGET
    verified = []
    for _ in range(every * (1 + 2 + 4 + 8) + 4):
        cap = lengths.choose(7) if lengths.should_draft() else 0
        verified.append(cap)
        if cap:
            lengths.update(cap, 0)
    probes = [i for i, cap in enumerate(verified) if cap]
    assert all(verified[i] == 7 for i in probes)
    assert [b - a for a, b in zip(probes, probes[1:])] == [2 * every + 1, 4 * every + 1, 8 * every + 1]
    assert probes[0] == every
    # The calibration corrects a confidence head that is twice too hopeful.
    lengths = DraftLength(GPU_LIKE, 7)
    for _ in range(60):
        lengths.update(1, 0, [0.8])  # confident, but only right when ...
        lengths.update(1, 1, [0.8])  # ... half of the time
    assert lengths.acceptance([0.8] * 7)[0] == pytest.approx(0.5, abs=0.08)


def test_measured_round_times_enter_the_choice():
    """Rounds slower than the cost model says (host work, a machine slower
    than when it was measured) are learned from observed rounds, per kind of
    round, and make marginal drafting stop paying."""
    lengths = DraftLength(GPU_LIKE, 7)
    lengths.calibrated = True
    marginal = [0.3] * 7  # 1.43 tokens for 12.5 ms vs 1 for 10 ms: drafting 1 pays, barely
    assert lengths.choose(7, marginal) > 0
    for _ in range(60):
        lengths.observe(0, GPU_LIKE.round_ms(0) * 1.02)  # plain steps: nearly as measured
    for _ in range(60):
        lengths.observe(3, GPU_LIKE.round_ms(3) * 1.3)  # drafted rounds: 30 % more
    assert lengths.time_scale[0] == pytest.approx(1.02, abs=0.01)
    assert lengths.time_scale[1] == pytest.approx(1.3, abs=0.01)
    assert lengths.choose(7, marginal) == 0
    assert lengths.choose(7, [0.95] * 7) == 7  # a good proposal still pays


def test_after_many_rounds_each_kind_keeps_its_own_scale():
    lengths = DraftLength(GPU_LIKE, 7)
    for _ in range(PRIOR_FADED // 10 + 5):  # runs of 10 rounds of each kind (a run's first is a switch)
        for _ in range(11):
            lengths.observe(0, GPU_LIKE.round_ms(0) * 0.8)
        for _ in range(11):
            lengths.observe(5, GPU_LIKE.round_ms(5) * 1.6)
    assert lengths.time_scale == pytest.approx([0.8, 1.6])
    for _ in range(60):  # a slow phase for drafted rounds only
        lengths.observe(5, GPU_LIKE.round_ms(5) * 2.4)
    assert lengths.time_scale == pytest.approx([0.8, 2.4], rel=0.01)


def test_a_machine_slower_than_measured_keeps_the_choice():
    """A uniform slow-down (a shared machine's slow phase, or a cost model
    measured in one) scales every round alike and changes no cap."""
    lengths = DraftLength(GPU_LIKE, 7)
    accept = [0.7] * 7
    before = [GPU_LIKE.best_cap(accept[:k], scale=lengths.time_scale) for k in range(8)]
    for n in (0, 0, 0, 3, 7, 5, 3) * 10:
        lengths.observe(n, GPU_LIKE.round_ms(n) * 2.5)
    assert lengths.time_scale == pytest.approx([2.5, 2.5])
    assert [GPU_LIKE.best_cap(accept[:k], scale=lengths.time_scale) for k in range(8)] == before
    assert len(set(before)) > 2  # the caps compared are not all alike


def test_undrafted_rounds_set_where_drafted_ones_start():
    """Before any drafted round is timed, its scale follows the one seen so
    far: a cost model measured during a slow phase must not make drafting
    look 3x too dear next to plain steps that already run fast."""
    lengths = DraftLength(GPU_LIKE, 7)
    for _ in range(20):
        lengths.observe(0, GPU_LIKE.round_ms(0) / 3)
    assert lengths.time_scale[1] == pytest.approx(1 / 3, rel=0.01)


def test_declined_proposals_and_switches_move_neither_scale():
    """A round whose proposal was declined ran the drafter and an unpipelined
    step, and a round after one of the other kind is not pipelined like its
    kind: timed as plain steps they made plain steps seem dear and drafting
    cheap (a drafter that is never right kept drafting 1 token a round);
    timed as drafted rounds they made drafting seem dear while rounds mostly
    skipped it (a drafter right 80 % of the time stayed idle for whole
    generations)."""
    lengths = DraftLength(GPU_LIKE, 7)
    declined_ms = GPU_LIKE.verify_ms[0] + GPU_LIKE.draft_ms
    for _ in range(30):
        lengths.observe(0, 2 * GPU_LIKE.round_ms(0))  # after a lone drafted round: a switch
        lengths.observe(0, GPU_LIKE.round_ms(0))  # plain steps, as measured
        lengths.observe(0, 3 * declined_ms, proposed=True)
        lengths.observe(0, 2 * GPU_LIKE.round_ms(0))  # after a declined proposal: a switch
        lengths.observe(0, GPU_LIKE.round_ms(0))
        lengths.observe(5, 3 * GPU_LIKE.round_ms(5))  # a lone drafted round (a probe)
    assert lengths.time_scale == pytest.approx([1.0, 1.0], rel=0.02)
    assert lengths.timed[1] == 0
    for _ in range(20):
        lengths.observe(5, 2 * GPU_LIKE.round_ms(5))  # a run of drafted rounds is timed
    assert lengths.time_scale[1] > 1.5


def test_the_loop_times_declined_proposals_as_drafter_rounds(models, monkeypatch):
    model, drafter_dir = models["qwen3"]
    drafter = load_drafter(drafter_dir, bits=None)
    seen = []
    monkeypatch.setattr(DraftLength, "choose", lambda self, proposed, confidence=None: 0)  # decline all
    monkeypatch.setattr(DraftLength, "should_draft", lambda self: True)
    monkeypatch.setattr(DraftLength, "observe", lambda self, drafts, ms, proposed=None: seen.append((drafts, proposed)))
    list(speculative_generate_step(mx.array([5, 6, 7]), model, drafter, max_tokens=12))
    assert last_stats(drafter).proposal_lengths[:-1] == [0] * (len(last_stats(drafter).proposal_lengths) - 1)
    assert seen and set(seen) == {(0, True)}  # every round proposed, none verified a draft
    # ... and the statistics say so (the last round, one token from the end, drafts nothing)
    assert last_stats(drafter).declined == list(range(last_stats(drafter).rounds - 1))


def test_a_stalled_or_free_round_moves_the_scale_only_so_far():
    lengths = DraftLength(GPU_LIKE, 7)
    lengths.observe(3, 0.0)  # its work overlapped the caller
    assert lengths.time_scale[1] >= 0.25
    lengths = DraftLength(GPU_LIKE, 7)
    lengths.observe(3, 1e6)  # a one-off stall
    assert lengths.time_scale[1] <= 4.0


def test_declined_proposals_stop_proposing_until_a_probe():
    # The running rates say drafting pays (GPU-like costs, no evidence yet), but
    # the confidence head says this drafter is hopeless: after DECLINES
    # proposals verified none, rounds stop paying for proposals.
    lengths = DraftLength(GPU_LIKE, 7)
    lengths.calibrated = True  # past the whole proposals of calibration
    proposed, caps = [], []
    for _ in range(40):
        drafting = lengths.should_draft()
        proposed.append(drafting)
        if drafting:
            caps.append(lengths.choose(7, [0.01] * 7))
            lengths.update(caps[-1], 0, [0.01] * caps[-1])
    assert caps == [0] * DECLINES
    assert proposed[:DECLINES] == [True] * DECLINES and not any(proposed[DECLINES:])


def test_a_proposal_worth_verifying_is_followed_by_another():
    """After a round that verified drafts the next proposal is made without
    consulting the running rates (the drafter's confidence judges it), even
    when those rates alone would say drafting does not pay."""
    dear = CostModel(verify_ms=[10.0 + 6.0 * k for k in range(8)], draft_ms=2.0)
    lengths = DraftLength(dear, 7)
    lengths.calibrated = True
    assert not lengths.should_draft()  # at the prior rate 0.5 no cap pays
    assert lengths.choose(7, [1.0] * 7) > 0  # but this proposal is certain to be kept
    assert lengths.should_draft()
    assert lengths.choose(7, [0.0] * 7) == 0
    assert not lengths.should_draft()


def test_best_cap_prefers_fewer_drafts_on_a_tie():
    flat = CostModel(verify_ms=[10.0, 20.0, 30.0], draft_ms=0.0)
    assert flat.best_cap([1.0, 1.0]) == 0  # every cap gives 0.1 token per ms


def test_learned_estimates_carry_over_to_the_next_generation():
    from mlx_lm_dspark.session import Session

    class Holder:
        pass

    session = Session(Holder(), target=None)
    first = session.draft_length(GPU_LIKE, 7)
    for _ in range(5):
        first.update(7, 7, [0.05] * 7)
    first.declined = 3
    again = session.draft_length(GPU_LIKE, 7)
    assert again is first and again.calibrated and again.declined == 0  # the streak is per generation
    other = session.draft_length(CPU_LIKE, 7)
    assert other is not first and not other.calibrated  # another target (cost model): start afresh
    assert session.draft_length(CPU_LIKE, 3).max_drafts == 3  # another block: start afresh
    assert session.draft_length(CPU_LIKE, 3, learn=False) is not session.lengths  # sampling: a fresh one


def test_probes_rescue_a_good_drafter_with_a_pessimistic_confidence_head():
    lengths = DraftLength(GPU_LIKE, 7)
    caps = []
    for _ in range(3 * lengths.min_probe_every + 40):
        cap = lengths.choose(7, [0.05] * 7) if lengths.should_draft() else 0
        caps.append(cap)
        if cap:
            lengths.update(cap, cap, [0.05] * cap)  # every draft kept
    assert caps[:2] == [1, 7]  # the head's foresight checked on one draft, wrong: then whole proposals ...
    assert all(c > 0 for c in caps)  # ... so drafting goes on every round ...
    assert caps[-10:] == [7] * 10  # ... and soon with the full block


# The tiny test pair's costs on this CPU: drafting pays when drafts are
# right 80 % of the time, not at the running rates' prior of 50 %.
TINY_LIKE = CostModel(verify_ms=[2.47, 3.24, 3.41, 3.57, 3.73, 3.89, 4.06, 4.22], draft_ms=1.98)


def simulate_generation(lengths, tokens, right, declined_factor=1.6):
    """Drive ``lengths`` as the round loop does over one greedy generation of
    ``tokens`` tokens whose drafts are right where ``right(position)``;
    rounds take their modelled time (declined proposals ``declined_factor``
    times it).  Returns the caps of the rounds (None: no proposal)."""
    lengths.start()
    produced, caps = 0, []
    while produced < tokens:
        lengths.at(32 + produced)
        n = min(7, tokens - produced - 1)
        if n <= 0 or not lengths.should_draft():
            lengths.observe(0, TINY_LIKE.verify_ms[0])
            caps.append(None)
            produced += 1
            continue
        confidence = [0.8] * n
        cap = lengths.choose(n, confidence)
        accepted = 0
        while accepted < cap and right(produced + accepted):
            accepted += 1
        lengths.update(cap, accepted, confidence)
        lengths.judge(confidence, n)
        modelled = TINY_LIKE.round_ms(cap)
        lengths.observe(cap, modelled * (declined_factor if cap == 0 else 1.0), proposed=True)
        caps.append(cap)
        produced += accepted + 1
    return caps


def test_a_good_drafter_keeps_drafting_from_one_generation_to_the_next():
    """A short first generation (a warm-up) ends with too few tokens left to
    draft; the next generations draft from their first round on."""
    import random

    assert TINY_LIKE.best_cap([0.8] * 7) == 7 and TINY_LIKE.best_cap([0.5] * 7) == 0
    lengths = DraftLength(TINY_LIKE, 7)
    for seed in range(12):
        pattern = random.Random(seed)
        rights = [pattern.random() < 0.8 for _ in range(200)]
        caps = simulate_generation(lengths, 16 if seed == 0 else 96, lambda pos: rights[pos])
        if seed > 0:
            assert caps[0] is not None and caps[0] > 0, (seed, caps)
            undrafted = sum(c is None or c == 0 for c in caps[:-3])  # the last rounds have too few tokens left
            assert undrafted <= 2, (seed, caps)


def test_a_probe_that_finds_more_resumes_proposals():
    lengths = DraftLength(TINY_LIKE, 7)
    for _ in range(10):
        lengths.update(7, 0, [0.3] * 7)  # a bad phase: the running rates say drafting does not pay ...
    lengths.declined = DECLINES  # ... and drafting stopped
    while not lengths.should_draft():
        pass
    assert lengths.choose(7, [0.3] * 7) == 7  # a probe: the estimate said 0
    lengths.update(7, 5, [0.3] * 7)  # ... and 5 were right
    assert TINY_LIKE.best_cap(lengths._rates()) == 0  # the rates alone would wait for the next probe
    assert lengths.should_draft()  # proposals resume at once; their confidences judge them


def test_no_proposals_where_even_a_perfect_drafter_would_not_pay():
    """Verifying K tokens at K steps' cost (a CPU-bound target): no round
    proposes, not even to calibrate or probe."""
    dear = CostModel(verify_ms=[10.0 * w * 1.05 for w in range(1, 9)], draft_ms=5.0)
    assert dear.best_cap([1.0] * 7) == 0
    lengths = DraftLength(dear, 7)
    assert not any(lengths.should_draft() for _ in range(10 * lengths.min_probe_every))
    cheap = DraftLength(TINY_LIKE, 7)
    assert cheap.should_draft()  # where drafting can pay, the first round proposes (calibration)


def test_too_few_tokens_left_is_not_a_declined_proposal():
    lengths = DraftLength(TINY_LIKE, 7)
    lengths.calibrated = lengths.drafting = True
    assert lengths.choose(1, [0.8]) == 0  # one draft cannot pay for a drafter round here
    assert lengths.declined == 0 and lengths.drafting
    assert lengths.choose(7, [0.05] * 7) == 0  # a whole proposal not worth verifying is
    assert lengths.declined == 1 and not lengths.drafting


def test_rounds_stop_waiting_for_confidences_that_typical_ones_stand_in_for():
    lengths = DraftLength(GPU_LIKE, 7)
    sure = [0.9] * 7
    rounds = 0
    while lengths.reads_confidence():
        rounds += 1
        assert rounds <= 30, "typical confidences never came to choose as well as the proposal's"
        cap = lengths.choose(7, sure)
        lengths.update(cap, cap, sure)  # every draft kept
        lengths.judge(sure, 7)
    assert rounds >= AGREED_ROUNDS
    assert lengths.typical_confidence() == pytest.approx(sure)
    assert lengths.choose(7, lengths.typical_confidence()) == 7  # as the proposal's own would
    lengths.update(7, 7, sure)
    lengths.judge(sure, 7)
    assert not lengths.reads_confidence()
    # A proposal the confidences would have cut after two slots: judged after
    # its round, the next rounds read the confidences again.
    doubtful = [0.95, 0.9, 0.02, 0.9, 0.9, 0.9, 0.9]
    assert lengths.now.best_cap(lengths.acceptance(doubtful), scale=lengths.time_scale) == 2
    lengths.update(7, 2, doubtful)
    lengths.judge(doubtful, 7)
    assert lengths.reads_confidence()
    assert lengths.choose(7, doubtful) == 2
    rounds = 0
    while lengths.reads_confidence():  # until the doubtful profile is the typical one
        rounds += 1
        assert rounds <= 60, "typical confidences never came to follow the new profile"
        cap = lengths.choose(7, doubtful)
        lengths.update(cap, min(cap, 2), doubtful)
        lengths.judge(doubtful, 7)
    lengths.start()
    assert not lengths.reads_confidence()  # a new generation goes on from what was typical
    assert lengths.choose(7, lengths.typical_confidence()) == 2


class ConfidentOracle(OracleDrafter):
    """The test oracle with a confidence head that always says 0.95."""

    def propose(self, cache, anchor, start, num_drafts, choose=None):
        tokens, _, q = super().propose(cache, anchor, start, num_drafts, choose)
        return tokens, mx.full((num_drafts,), 0.95, dtype=mx.float32), q


@pytest.mark.parametrize("right", ["perfect", "partial"])
def test_the_loop_chooses_without_waiting_while_typical_confidences_do_as_well(models, monkeypatch, right):
    model, _ = models["qwen3"]
    prompt = [(5 * i + 1) % 300 + 5 for i in range(17)]
    expected = plain_tokens(model, prompt, 90)
    more = plain_tokens(model, prompt, 110)
    pattern = (lambda pos: True) if right == "perfect" else (lambda pos: pos % 5 != 0)
    drafter = ConfidentOracle(text_args(model), prompt + more, right=pattern)
    monkeypatch.setattr("mlx_lm_dspark.speculative.cost_model", lambda drafter, target: GPU_LIKE)
    seen, real_choose = [], DraftLength.choose

    def choose(self, proposed, confidence=None):
        seen.append(self.reads_confidence())  # whether this round waited for its confidences
        return real_choose(self, proposed, confidence)

    monkeypatch.setattr(DraftLength, "choose", choose)
    got = [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=90)]
    assert got == expected
    assert seen[:AGREED_ROUNDS] == [True] * AGREED_ROUNDS  # a new drafter starts reading
    assert False in seen  # then typical confidences chose as well and rounds stopped waiting


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("qwen3", "gemma4"):
        target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp(family), family)
        out[family] = (mlx_lm.load(str(target_dir))[0], drafter_dir)
    return out


@pytest.mark.parametrize("family", ["qwen3", "gemma4"])
@pytest.mark.parametrize("drafter_kind", ["random", "perfect", "partial"])
def test_exact_with_the_automatic_cap(models, family, drafter_kind):
    model, drafter_dir = models[family]
    prompt = [(7 * i + 3) % 300 + 5 for i in range(21)]
    expected = plain_tokens(model, prompt, 60)
    if drafter_kind == "random":
        drafter = load_drafter(drafter_dir, bits=None)
    else:
        right = (lambda pos: True) if drafter_kind == "perfect" else (lambda pos: pos % 3 != 0)
        more = plain_tokens(model, prompt, 80)
        drafter = OracleDrafter(text_args(model), prompt + more, right=right)
    got = [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=60)]
    assert got == expected
    stats = last_stats(drafter)
    assert stats.cap is None and "draft cap auto" in stats.summary()
    assert all(0 <= n <= drafter.max_drafts for n in stats.proposal_lengths)


def test_an_explicit_cap_wins(models):
    model, drafter_dir = models["qwen3"]
    drafter = load_drafter(drafter_dir, bits=None)
    list(speculative_generate_step(mx.array([5, 6, 7]), model, drafter, max_tokens=20, num_draft_tokens=2))
    assert last_stats(drafter).cap == 2 and set(last_stats(drafter).proposal_lengths[:-2]) == {2}  # the last two: max_tokens
    assert "draft cap 2" in last_stats(drafter).summary()


def test_decoding_feeds_round_times_to_the_automatic_cap(models):
    model, _ = models["qwen3"]
    prompt = [5, 6, 7]
    more = plain_tokens(model, prompt, 80)
    drafter = OracleDrafter(text_args(model), prompt + more, right=lambda pos: True)
    list(speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=60))
    undrafted, drafted = last_stats(drafter).time_scale
    assert drafted != 1.0 and 0.25 <= drafted <= 4.0  # drafted rounds were timed
    list(speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=20, num_draft_tokens=2))
    assert last_stats(drafter).time_scale is None  # an explicit cap learns nothing


def test_sampling_caps_do_not_depend_on_earlier_generations(models):
    """With sampling the caps decide which random draws a round makes: a
    seed must reproduce the text in the same process, whatever ran before
    (greedy decoding alone carries learned estimates over)."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_lm_dspark.session import find

    model, drafter_dir = models["qwen3"]
    prompt = [5, 6, 7]
    more = plain_tokens(model, prompt, 80)
    drafter = OracleDrafter(text_args(model), prompt + more, right=lambda pos: pos % 3 != 0)
    sampler = make_sampler(temp=0.8)

    def sampled():
        mx.random.seed(3)
        return [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=40,
                                                          sampler=sampler)]

    first = sampled()
    list(speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=60))  # greedy: learns
    assert sampled() == first
    assert find(drafter, model).lengths is not None  # greedy kept its estimates


# The parts of DraftLength, one job each.


def test_acceptance_estimates_count_the_slots_the_target_judged():
    from mlx_lm_dspark.autocap import PRIOR, AcceptanceEstimates

    estimates = AcceptanceEstimates(4)
    assert estimates.rates() == [PRIOR] * 4  # nothing tried yet
    estimates.record(4, 1, [0.9, 0.6, 0.3, 0.2])  # slot 1 kept, slot 2 rejected, slots 3-4 never judged
    assert estimates.tried == [1.0, 1.0, 0.0, 0.0]
    assert estimates.kept == [1.0, 0.0, 0.0, 0.0]
    assert estimates.predicted == [0.9, 0.6, 0.0, 0.0]
    rates = estimates.rates()
    assert rates[0] > PRIOR > rates[1] and rates[2:] == [PRIOR, PRIOR]
    # Confidences are scaled by how they fared: slot 1 was right at 0.9 ...
    assert estimates.acceptance([0.9, 0.9])[0] > estimates.acceptance([0.9, 0.9])[1]  # ... slot 2 wrong at 0.6
    assert estimates.acceptance([]) == [] and len(estimates.acceptance([0.5] * 9)) == 4


def test_round_time_scale_is_updated_in_place_for_runs_of_one_kind():
    from mlx_lm_dspark.autocap import RoundTimeScale

    clock = RoundTimeScale(7)
    scale = clock.scale
    clock.observe(GPU_LIKE, 0, 2 * GPU_LIKE.round_ms(0), proposed=False)
    assert clock.scale is scale and scale[0] > 1.0 and clock.timed == [1, 0]
    clock.observe(GPU_LIKE, 3, 2 * GPU_LIKE.round_ms(3), proposed=True)  # a switch: not timed
    clock.observe(GPU_LIKE, 0, GPU_LIKE.round_ms(0), proposed=True)  # a declined proposal: not timed
    assert clock.timed == [1, 0]
    clock.start()  # a new generation's first round follows none: timed
    clock.observe(GPU_LIKE, 3, 2 * GPU_LIKE.round_ms(3), proposed=True)
    assert clock.timed == [1, 1] and scale[1] > 1.0


def test_probe_schedule_calibrates_then_backs_off_and_resumes_on_a_find():
    from mlx_lm_dspark.autocap import ProbeSchedule

    schedule = ProbeSchedule(GPU_LIKE, 7)
    for _ in range(CALIBRATION_ROUNDS):
        assert schedule.due() and schedule.choose(0, 7) == 7  # verified whole whatever the estimate
        schedule.record(7, 0)
    assert schedule.calibrated and not schedule.due()
    assert schedule.choose(0, 7) == 0 and schedule.choose(0, 7) == 0 and schedule.stopped()
    every = schedule.probe_every
    while not schedule.due():
        schedule.wait()
    assert schedule.choose(0, 7) == 7 and schedule.probe_every == 2 * every  # a probe; the next comes later
    schedule.record(7, 4)  # ... and it found more than the estimate's cap
    assert schedule.probe_every == schedule.min_probe_every and schedule.drafting and not schedule.stopped()
    assert schedule.choose(0, 3) == 0 and schedule.drafting  # too few tokens left: not a declined proposal


def test_confidence_reads_judge_whether_reading_would_have_paid():
    from mlx_lm_dspark.autocap import PRIOR, AcceptanceEstimates, ConfidenceReads

    estimates = AcceptanceEstimates(7)
    reads = ConfidenceReads(7)
    assert reads.reads() and reads.typical() == [PRIOR] * 7
    sure = [0.95] * 7
    for _ in range(AGREED_ROUNDS):  # typical confidences standing in chose what the proposal's would
        accept = estimates.acceptance(sure)
        reads.chosen = (reads.typical(), accept, GPU_LIKE.best_cap(accept))
        reads.judge(sure, 7, GPU_LIKE, [1.0, 1.0], estimates.acceptance)
    assert not reads.reads() and reads.typical()[0] > PRIOR
    doubtful = [0.95, 0.02, 0.9, 0.9, 0.9, 0.9, 0.9]  # its own would have cut after one draft
    reads.chosen = (reads.typical(), estimates.acceptance(reads.typical()), 7)
    reads.judge(doubtful, 7, GPU_LIKE, [1.0, 1.0], estimates.acceptance)
    assert reads.reads() and reads.agreed == 0


def test_draft_length_reaches_its_parts():
    lengths = DraftLength(GPU_LIKE, 7)
    assert lengths.time_scale is lengths.clock.scale  # the loop keeps this list: updated in place
    lengths.calibrated = lengths.drafting = True
    lengths.declined = 1
    assert lengths.schedule.calibrated and lengths.schedule.drafting and lengths.schedule.declined == 1
    assert lengths.min_probe_every == lengths.schedule.min_probe_every and lengths.timed is lengths.clock.timed


def _decode_at(cost, context, real, accept, rounds=400):
    """Simulated automatic-cap rounds at ``context`` whose real times are
    ``real[k]`` (k drafts verified) and whose drafts are each kept with
    probability ``accept``: tokens per ms over the second half."""
    import random

    lengths = DraftLength(cost, 7)
    lengths.calibrated = True
    lengths.schedule.drafting = True  # the shorter contexts before were drafting
    draws = random.Random(0)
    spent_ms = tokens = 0.0
    for i in range(rounds):
        lengths.at(context)
        k = lengths.choose(7) if lengths.should_draft() else 0
        kept = 0
        while kept < k and draws.random() < accept:
            kept += 1
        lengths.update(k, kept)
        lengths.observe(k, real[k], k > 0)
        if i >= rounds // 2:
            spent_ms, tokens = spent_ms + real[k], tokens + kept + 1
    return tokens / spent_ms


def test_beyond_the_measured_contexts_plain_steps_are_timed_where_used():
    """Far beyond the contexts a cost model was measured at, its growth is an
    extrapolation: one whose plain-step growth came out far too steep makes
    drafting look cheap there.  A plain check times undrafted rounds where
    they run, so drafting that does not pay at the real costs stops, and
    decoding stays about as fast as plain; where it does pay it goes on."""
    context = 3000
    steep = CostModel(verify_ms=[10.0 * w for w in range(1, 9)], draft_ms=5.0, context=32,
                      verify_ms_per_position=[0.072] + [0.003] * 7, draft_ms_per_position=0.0)
    cpu = [(10.0 + 0.003 * context) * (k + 1) + (5.0 if k else 0.0) for k in range(8)]  # K+1 steps
    accept = 0.6  # drafting pays at the model's costs, not at the real ones
    assert steep.at(context).best_cap([accept] * 7) > 0
    assert CostModel(verify_ms=cpu, draft_ms=0.0).best_cap([accept] * 7) == 0
    assert _decode_at(steep, context, cpu, accept) >= 0.97 / cpu[0]
    gpu = [(10.0 + 0.003 * context) + 0.5 * k + (2.0 if k else 0.0) for k in range(8)]  # wide verifies nearly free
    assert _decode_at(steep, context, gpu, 0.9) >= 2.5 / gpu[0]


SEQUENTIAL = CostModel(verify_ms=[10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5], draft_ms=8.0,
                       draft_ms_per_draft=1.0)  # each draft is one drafter forward (EAGLE3)


def test_a_whole_round_that_keeps_what_the_confidence_head_foresaw_ends_the_calibration():
    """Nothing kept where the head gave the first draft less than FORESEEN
    ends the calibration at once; a hopeful head proved wrong, a round that
    kept a draft, or no head at all do not."""
    from mlx_lm_dspark.autocap import FORESEEN, ProbeSchedule

    foreseen = ProbeSchedule(GPU_LIKE, 7)
    foreseen.choose(0, 7)
    foreseen.record(7, 0, [FORESEEN / 2] * 7)
    assert foreseen.calibrated and not foreseen.due()
    for kept, confidence in ((0, [0.9] * 7), (1, [FORESEEN / 2] * 7), (0, None), (0, [FORESEEN] + [0.0] * 6)):
        schedule = ProbeSchedule(GPU_LIKE, 7)
        schedule.choose(0, 7)
        schedule.record(7, kept, confidence)
        assert not schedule.calibrated and schedule.due(), (kept, confidence)


def test_a_first_proposal_the_head_foresees_rejected_checks_that_draft_alone():
    """Before any whole round, a proposal whose first confidence is under
    FORESEEN verifies one draft; rejected, the head is trusted and the
    calibration ends; kept, whole proposals follow.  Once per pair, only
    with scores, only before a whole round."""
    from mlx_lm_dspark.autocap import FORESEEN

    pessimist = [FORESEEN / 2] * 7
    right = DraftLength(GPU_LIKE, 7)
    assert right.choose(7, pessimist) == 1
    right.update(1, 0, pessimist)
    assert right.calibrated and not right.schedule.due()
    wrong = DraftLength(GPU_LIKE, 7)
    assert wrong.choose(7, pessimist) == 1
    wrong.update(1, 1, pessimist)
    assert not wrong.calibrated and wrong.choose(7, pessimist) == 7  # checked once: whole rounds now
    wrong.update(7, 7, pessimist)
    assert wrong.choose(7, pessimist) == 7
    for confidence in (None, [FORESEEN] * 7, [0.9] * 7):
        assert DraftLength(GPU_LIKE, 7).choose(7, confidence) == 7, confidence
    after_whole = DraftLength(GPU_LIKE, 7)
    after_whole.choose(7, [0.9] * 7)
    after_whole.update(7, 3, [0.9] * 7)
    assert after_whole.choose(7, pessimist) == 7
    cut = DraftLength(GPU_LIKE, 7)  # a generation that ended inside the check's round
    cut.choose(7, pessimist)
    cut.start()
    cut.update(7, 0, [0.9] * 7)
    assert not cut.calibrated and cut.schedule.whole == 1


def test_a_sequential_drafter_is_asked_for_the_cap_before_it_drafts():
    lengths = DraftLength(SEQUENTIAL, 7)
    assert lengths.proposal_length(7) == 7  # calibration rounds: whole proposals
    for _ in range(CALIBRATION_ROUNDS):
        assert lengths.choose(7) == 7
        lengths.update(7, 2)  # two kept, the third rejected, every round
    cap = lengths.proposal_length(7)
    assert 0 < cap < 7 and cap == SEQUENTIAL.best_cap(lengths.acceptance(), limit=7, scale=lengths.time_scale)
    assert lengths.choose(cap) == cap  # the verify takes what was drafted
    # Rounds drafting fewer than all still lead to a probe of the whole proposal.
    probes = 0
    for _ in range(lengths.min_probe_every * 2 + 2):
        n = lengths.proposal_length(7)
        chosen = lengths.choose(n)
        probes += chosen == 7
        lengths.update(chosen, min(2, chosen))
    assert probes >= 1


def test_a_sequential_drafter_that_never_pays_is_not_run():
    lengths = DraftLength(SEQUENTIAL, 7)
    for _ in range(CALIBRATION_ROUNDS):
        lengths.choose(lengths.proposal_length(7))
        lengths.update(7, 0)
    assert lengths.proposal_length(7) == 0  # declined before drafting: no drafter forward spent
    assert lengths.declined == 1 and not lengths.drafting


def test_the_loop_asks_a_sequential_drafter_only_for_the_drafts_it_verifies(models, monkeypatch):
    from mlx_lm_dspark.speculative import bind, cost_model

    model, _ = models["qwen3"]
    prompt = [(5 * i + 2) % 300 + 5 for i in range(17)]
    expected = plain_tokens(model, prompt, 80)
    drafter = OracleDrafter(text_args(model), prompt + plain_tokens(model, prompt, 100),
                            right=lambda pos: pos % 4 != 0)
    drafter.sequential_drafts = True
    cost_model(drafter, bind(drafter, model), measured=SEQUENTIAL)
    asked = []
    propose = drafter.propose

    def recording(cache, anchor, start, num_drafts, choose=None):
        asked.append(num_drafts)
        return propose(cache, anchor, start, num_drafts, choose)

    monkeypatch.setattr(drafter, "propose", recording)
    got = [t for t, _, _ in speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=80)]
    assert got == expected
    stats = last_stats(drafter)
    assert any(0 < n < drafter.max_drafts for n in asked)  # proposals cut before drafting
    drafted = [n for n in stats.proposal_lengths if n]
    assert drafted == asked[: len(drafted)]  # every round verified all its proposal drafted
