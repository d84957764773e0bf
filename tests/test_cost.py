"""The per-machine cost model: measured once per pair, cached on disk."""

import json
import statistics

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlx_lm_dspark import cost, load_drafter
from mlx_lm_dspark.speculative import bind
from mlx_lm_dspark_tools.tiny import build_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp("cost"), "gemma4", num_layers=4,
                                         sliding_window_pattern=2, target_layer_ids=(0, 2), block_size=4)
    model, _ = mlx_lm.load(str(target_dir))
    return model, drafter_dir


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LM_DSPARK_CACHE", str(tmp_path))
    return tmp_path


def test_measures_every_verify_width_and_a_drafter_round(pair):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    model_costs = cost.measure(target, drafter, reps=2)
    assert len(model_costs.verify_ms) == drafter.max_drafts + 1  # widths 1 .. max_drafts + 1
    assert all(t > 0 for t in model_costs.verify_ms) and model_costs.draft_ms > 0


def test_wider_verifies_and_longer_contexts_never_cost_less(pair):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    model_costs = cost.measure(bind(drafter, model), drafter, reps=2)
    assert model_costs.context == 32
    growth = model_costs.verify_ms_per_position
    assert len(growth) == len(model_costs.verify_ms) and all(g >= 0 for g in growth)
    assert model_costs.draft_ms_per_position >= 0
    wide = model_costs.verify_ms[1:]
    assert wide == sorted(wide) and growth[1:] == sorted(growth[1:])


def test_a_drafted_round_never_verifies_for_less_than_a_plain_step():
    """Plain steps timed 2.5x their model and drafted rounds as modelled: a
    draft nobody accepts must still not look cheaper than a plain step."""
    costs = cost.CostModel(verify_ms=[10.0 * w for w in range(1, 9)], draft_ms=2.0)
    scale = (2.5, 1.0)
    assert costs.round_ms(1, scale) == pytest.approx(2.0 + 25.0)
    assert costs.round_ms(7, scale) == pytest.approx(2.0 + 80.0)
    assert costs.best_cap([0.0] * 7, scale=scale) == 0
    assert costs.best_cap([0.05] * 7, scale=scale) == 0
    assert costs.best_cap([0.95] * 7, scale=scale) > 0
    for accept in ([0.0] * 7, [0.5] * 7, [0.95] * 7):  # the one-pass search agrees with round_ms
        rates = [costs.tokens_per_ms(accept, k, scale) for k in range(8)]
        assert costs.best_cap(accept, scale=scale) == rates.index(max(rates))


def test_non_decreasing_pools_dips_as_noise():
    assert cost.non_decreasing([3.0, 1.0, 2.0, 5.0, 4.0]) == [2.0, 2.0, 2.0, 4.5, 4.5]
    assert cost.non_decreasing([1.0, 2.0, 2.0, 7.0]) == [1.0, 2.0, 2.0, 7.0]
    assert cost.non_decreasing([]) == []


def test_costs_at_a_context_length():
    model_costs = cost.CostModel(verify_ms=[5.0, 6.0, 8.0], draft_ms=2.0, context=32,
                                 verify_ms_per_position=[0.0, 0.01, 0.02], draft_ms_per_position=0.005)
    later = model_costs.at(232)
    assert later.verify_ms == pytest.approx([5.0, 8.0, 12.0]) and later.draft_ms == pytest.approx(3.0)
    assert later.round_ms(2) == pytest.approx(15.0) and later.max_drafts == 2
    flat = cost.CostModel(verify_ms=[5.0, 6.0], draft_ms=2.0)  # a cost model without growth
    assert flat.at(10_000) is flat


def test_measuring_leaves_the_global_rng_alone(pair):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    mx.random.seed(5)
    expected = mx.random.uniform(shape=(4,)).tolist()
    mx.random.seed(5)
    cost.measure(target, drafter, reps=1)
    assert mx.random.uniform(shape=(4,)).tolist() == expected


def test_cached_on_disk_and_keyed_by_what_changes_costs(pair, cache_dir, monkeypatch):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    first = cost.load_or_measure(target, drafter)
    files = list(cache_dir.glob("cost-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["verify_ms"] == first.verify_ms

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(cost, "measure", no_measuring)
    assert cost.load_or_measure(target, drafter) == first
    # A 4-bit drafter costs differently: another key.
    quantized = load_drafter(drafter_dir, bits=4)
    assert cost.cache_key(bind(quantized, model), quantized) != cost.cache_key(target, drafter)


def test_refresh_measures_again_and_replaces_the_cached_file(pair, cache_dir, monkeypatch):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    cost.load_or_measure(target, drafter)
    fresh = cost.CostModel(verify_ms=[1.0] * (drafter.max_drafts + 1), draft_ms=1.0)
    monkeypatch.setattr(cost, "measure", lambda *args, **kwargs: fresh)
    assert cost.load_or_measure(target, drafter, refresh=True) == fresh
    assert cost.load_or_measure(target, drafter) == fresh  # what later generations read


def test_a_damaged_cache_file_is_measured_again(pair, cache_dir, capsys):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    path = cache_dir / f"cost-{cost.cache_key(target, drafter)}.json"
    path.write_text('{"verify_ms": [1.0')  # e.g. a crash mid-write by an older version
    model_costs = cost.load_or_measure(target, drafter)
    assert json.loads(path.read_text())["verify_ms"] == model_costs.verify_ms
    assert "is damaged (it is not valid JSON" in capsys.readouterr().err


def _good(widths):
    return {"verify_ms": [2.0 + w for w in range(widths)], "draft_ms": 1.0, "context": 32,
            "verify_ms_per_position": [0.01] * widths, "draft_ms_per_position": 0.001}


def _damaged(change):
    def make(widths):
        data = _good(widths)
        change(data, widths)
        return data
    return make


DAMAGED = {
    "list": lambda widths: [1.0, 2.0],
    "short_verify": _damaged(lambda d, w: d.update(verify_ms=d["verify_ms"][:-1])),
    "long_verify": _damaged(lambda d, w: d.update(verify_ms=d["verify_ms"] + [9.0])),
    "string_time": _damaged(lambda d, w: d["verify_ms"].__setitem__(1, "3.0")),
    "zero_plain_step": _damaged(lambda d, w: d["verify_ms"].__setitem__(0, 0.0)),
    "negative_draft": _damaged(lambda d, w: d.update(draft_ms=-1.0)),
    "nan_growth": _damaged(lambda d, w: d["verify_ms_per_position"].__setitem__(2, float("nan"))),
    "short_growth": _damaged(lambda d, w: d.update(verify_ms_per_position=[0.0])),
    "missing_draft": _damaged(lambda d, w: d.pop("draft_ms")),
    "missing_verify": _damaged(lambda d, w: d.pop("verify_ms")),
    "unknown_field": _damaged(lambda d, w: d.update(speed=3)),
    "string_context": _damaged(lambda d, w: d.update(context="32")),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_cache_file_with_damaged_values_is_measured_again(pair, cache_dir, capsys, monkeypatch, name):
    """Valid JSON with wrong lengths, types or values is never used (it would
    crash the automatic cap or steer it by NaN): one line, then measured."""
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    widths = drafter.max_drafts + 1
    path = cost.cache_path(target, drafter)
    path.write_text(json.dumps(DAMAGED[name](widths)))
    fresh = cost.CostModel(verify_ms=[1.0] * widths, draft_ms=1.0)
    monkeypatch.setattr(cost, "measure", lambda *args, **kwargs: fresh)
    assert cost.load_or_measure(target, drafter) == fresh
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is damaged" in err[0] and str(path) in err[0]
    assert "measuring this machine's speculative costs" in err[1]
    assert cost.CostModel(**json.loads(path.read_text())) == fresh  # replaced
    path.write_text(json.dumps(_good(widths)))
    assert cost.load_or_measure(target, drafter) == cost.CostModel(**_good(widths))  # a sound file is used
    assert capsys.readouterr().err == ""


def test_first_measurement_says_what_and_where_once(pair, cache_dir, capsys, monkeypatch):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    target = bind(drafter, model)
    fresh = cost.CostModel(verify_ms=[1.0] * (drafter.max_drafts + 1), draft_ms=1.0)
    monkeypatch.setattr(cost, "measure", lambda *args, **kwargs: fresh)
    cost.load_or_measure(target, drafter)
    cost.load_or_measure(target, drafter)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("mlx-lm-dspark: measuring this machine's speculative costs for the gemma4")
    assert str(drafter_dir) in err[0] and f"cached in {cache_dir}" in err[0]


MEASURE_SCRIPT = """
import sys
import mlx_lm
from mlx_lm_dspark import cost, load_drafter
from mlx_lm_dspark.speculative import bind
model, _ = mlx_lm.load(sys.argv[1])
drafter = load_drafter(sys.argv[2], bits=None)
print(cost.load_or_measure(bind(drafter, model), drafter).draft_ms)
"""


@pytest.mark.slow
def test_concurrent_processes_leave_one_valid_file(tmp_path_factory, cache_dir):
    import os
    import subprocess
    import sys

    target_dir, drafter_dir = build_pair(tmp_path_factory.mktemp("cost-procs"), "qwen3", num_layers=2,
                                         target_layer_ids=(0, 1), block_size=4)
    env = {**os.environ, "MLX_LM_DSPARK_CACHE": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", MEASURE_SCRIPT, str(target_dir), str(drafter_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["draft_ms"] > 0
    assert not list(cache_dir.glob(".cost-*"))  # no temporary files left behind


def test_relative_costs_ignore_slow_phases_and_bursts():
    # Two settings x three pieces x six repetitions: piece costs 1, 2, 3 (short)
    # and 1.5, 3, 4 (long), with the machine twice as slow in repetitions 1
    # and 4 (every piece alike) and one burst on one piece.
    true = [[1.0, 2.0, 3.0], [1.5, 3.0, 4.0]]
    speed = [1.0, 2.0, 1.0, 1.0, 2.0, 1.0]
    samples = [[[c * s for s in speed] for c in setting] for setting in true]
    samples[0][2][3] *= 10
    got = cost.relative_costs(samples)
    base = statistics.median(samples[0][0])  # the typical plain step over the repetitions
    for setting, want in zip(got, true):
        assert setting == pytest.approx([base * c for c in want])
    # The ratios between pieces are the true ones, whatever the phases.
    assert got[0][2] / got[0][1] == pytest.approx(1.5) and got[1][0] / got[0][0] == pytest.approx(1.5)


def test_relative_errors_follow_the_spread_of_the_ratios():
    reference = [4.0, 4.0, 4.0, 4.0]
    steady = [8.0, 8.0, 8.0, 8.0]  # always twice the plain step
    jittery = [6.0, 10.0, 6.0, 10.0]  # twice it on average, +-1 in ratio
    errors = cost.relative_errors([[reference, steady, jittery]])[0]
    assert errors[0] == 0.0 and errors[1] == 0.0
    assert errors[2] == pytest.approx(4.0 * 1.2533 * 1.4826 * 0.5 / 2)


def test_widths_within_their_errors_lie_on_a_line():
    line = [6.0 + 0.4 * k for k in range(7)]
    noisy = [v + d for v, d in zip(line, [0.1, -0.2, 0.25, -0.1, 0.2, -0.3, 0.05])]
    smoothed = cost.towards_line(noisy, [0.3] * 7)
    assert [a - 2 * b + c for a, b, c in zip(smoothed, smoothed[1:], smoothed[2:])] == pytest.approx([0.0] * 5, abs=1e-9)
    assert smoothed == pytest.approx(line, abs=0.05)  # the noise's own line, near the true one
    # Without errors the measured values stand.
    assert cost.towards_line(noisy, [0.0] * 7) == pytest.approx(noisy)
    # A real step (a kernel switch) far outside the errors is kept, near enough.
    step = [6.0, 6.1, 6.2, 6.3, 9.0, 9.1, 9.2]
    kept = cost.towards_line(step, [0.1] * 7)
    assert kept == pytest.approx(step, abs=0.1)  # within the timing errors
    assert kept[4] - kept[3] > 2.5
    assert cost.towards_line([5.0, 7.0], [1.0, 1.0]) == [5.0, 7.0]  # too few widths for a line


def test_smoothing_picks_the_right_cap_more_often_from_a_few_noisy_repetitions():
    """12 repetitions on a machine whose speed drifts (15 %) and whose pieces
    jitter (6 %), as a few seconds of measuring give here: at acceptances
    where the widest cap is best by under 3 %, the smoothed model picks it
    in clearly more of 600 simulated measurements than the unsmoothed one."""
    drafts, base, reps = 4, 4.5, 12
    true = [1.0] + [1.2 + 0.1 * w for w in range(drafts)] + [0.7]  # plain, verify widths 2.., drafter round
    want = cost.CostModel(verify_ms=[base * c for c in true[:-1]], draft_ms=base * true[-1])

    def margin(a):
        rates = sorted((want.tokens_per_ms([a] * drafts, k) for k in range(drafts + 1)), reverse=True)
        return rates[0] / rates[1]

    close = [a for a in (0.5 + 0.01 * k for k in range(49)) if want.best_cap([a] * drafts) == drafts and margin(a) < 1.03]
    assert close
    sampler = cost.Sampler.__new__(cost.Sampler)  # its samples only: no target to time
    sampler.context, sampler.longer = 32, 256
    right = {"smoothed": 0, "unsmoothed": 0}
    for seed in range(600):
        rng = np.random.default_rng(seed)
        phase = base * np.exp(rng.normal(0, 0.15, reps))
        plain = list(phase * np.exp(rng.normal(0, 0.03, reps)))
        setting = [plain] + [list(phase * c * np.exp(rng.normal(0, 0.06, reps))) for c in true[1:]]
        sampler.samples = [setting, setting]
        raw = cost.relative_costs(sampler.samples)[0]
        models = {
            "smoothed": sampler.model(),
            "unsmoothed": cost.CostModel(verify_ms=raw[:1] + cost.non_decreasing(raw[1:-1]), draft_ms=raw[-1]),
        }
        for name, model in models.items():
            right[name] += all(model.best_cap([a] * drafts) == drafts for a in close)
    assert right["smoothed"] >= right["unsmoothed"] + 30, right  # 393 vs 335 when written


def test_a_sampler_adds_repetitions_to_its_model(pair):
    model, drafter_dir = pair
    drafter = load_drafter(drafter_dir, bits=None)
    sampler = cost.Sampler(bind(drafter, model), drafter)
    assert sampler.repetitions == 0
    assert sampler.take() > 0 and sampler.repetitions == 1
    cost.extend(sampler, reps=3, max_reps=3)
    assert sampler.repetitions == 3
    first = sampler.model()
    assert len(first.verify_ms) == drafter.max_drafts + 1 and first.context == 32
    # The plain step is the median of its repetitions (the reference of the others).
    assert first.verify_ms[0] == pytest.approx(statistics.median(sampler.samples[0][0]))


def test_a_sequential_drafters_proposal_costs_less_with_fewer_drafts():
    """EAGLE3 drafts token by token: a proposal of k drafts costs k forwards,
    so with costs per draft the best cap is lower than with a flat proposal
    cost, and the one-pass search still agrees with ``round_ms``."""
    verify = [10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5]
    flat = cost.CostModel(verify_ms=verify, draft_ms=8.0)
    per_draft = cost.CostModel(verify_ms=verify, draft_ms=8.0, draft_ms_per_draft=1.0)
    assert per_draft.sequential and not flat.sequential
    assert per_draft.draft_ms_for(7) == 8.0 and per_draft.draft_ms_for(1) == pytest.approx(2.0)
    assert flat.draft_ms_for(1) == 8.0
    assert per_draft.round_ms(2) == pytest.approx(3.0 + 11.0)
    accept = [0.7] * 7
    assert per_draft.best_cap(accept) < flat.best_cap(accept)
    for model in (flat, per_draft):
        for a in ([0.3] * 7, [0.7] * 7, [0.95] * 7):
            rates = [model.tokens_per_ms(a, k) for k in range(8)]
            assert model.best_cap(a) == rates.index(max(rates))
    later = per_draft.at(500)
    assert later.draft_ms_per_draft == 1.0


def test_measures_the_cost_per_draft_of_a_drafter_that_drafts_token_by_token(tmp_path):
    from mlx_lm_dspark_tools.tiny import build_eagle3_pair

    target_dir, drafter_dir = build_eagle3_pair(tmp_path, "qwen3", num_layers=8, ttt_length=5)
    model, _ = mlx_lm.load(str(target_dir))
    drafter = load_drafter(drafter_dir, bits=None)
    assert drafter.sequential_drafts
    costs = cost.measure(bind(drafter, model), drafter, reps=3)
    assert len(costs.verify_ms) == 6 and costs.draft_ms > 0
    assert costs.sequential and 0 < costs.draft_ms_for(1) < costs.draft_ms


def test_a_cached_cost_per_draft_is_checked():
    assert cost._damage({**_good(4), "draft_ms_per_draft": 0.5}, 4) is None
    assert "draft_ms_per_draft" in cost._damage({**_good(4), "draft_ms_per_draft": -1.0}, 4)
