"""The benchmark command: end to end on a tiny pair, its checks and its oracle drafter."""

import json
import sys
from pathlib import Path

import pytest

import mlx_lm_dspark_tools.benchmark as bench
from conftest import _host_loads
from mlx_lm_dspark.cost import CostModel
from mlx_lm_dspark_tools.oracle import uniform
from mlx_lm_dspark_tools.tiny import build_pair

SPEC_KEYS = {
    "tokens_per_s", "prefill_ms", "generated_tokens", "runs", "cap", "speedup", "tau", "rounds", "drafted",
    "accepted", "drafts_per_round", "cap_counts", "acceptance_by_position", "conditional_acceptance",
    "predicted_speedup", "efficiency", "host_ms_per_round", "loop_ms_per_round", "pair_quartiles",
    "time_over_model", "declined",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    target, drafter = build_pair(tmp_path_factory.mktemp("bench"), family="qwen3")
    return str(target), str(drafter)


def run(pair, *extra, drafter=True, tokens=12):
    argv = ["--model", pair[0], "--max-tokens", str(tokens), "--num-prompts", "2", *extra]
    if "--prompts" not in extra and "--prompts-file" not in extra:
        argv += ["--prompts", "chat"]
    if drafter:
        argv += ["--draft-model", pair[1]]
    return bench.run(argv)


@pytest.mark.slow
def test_end_to_end_writes_the_documented_json(pair, tmp_path, capsys):
    out = tmp_path / "results.json"
    run(pair, "--prompts", "code", "--sweep-caps", "--json", str(out))
    printed = capsys.readouterr().out
    assert "overall" in printed and "best fixed" in printed
    results = json.loads(out.read_text())
    assert {"config", "cost_model", "prompts", "by_category", "overall", "greedy_checked"} <= set(results)
    assert results["greedy_checked"] is True
    assert results["config"]["num_draft_tokens"] == "auto" and results["config"]["max_drafts"] == 7
    cost = results["cost_model"]
    assert len(cost["verify_ms"]) == 8 and cost["draft_ms"] > 0
    assert [p["name"] for p in results["prompts"]] == ["code-1", "code-2"]
    for entry in results["prompts"] + [results["overall"], results["by_category"]["code"]]:
        assert entry["plain"]["tokens_per_s"] > 0 and entry["plain"]["generated_tokens"] >= 12
        spec = entry["speculative"]
        assert SPEC_KEYS <= set(spec) and spec["cap"] == "auto"
        assert len(spec["acceptance_by_position"]) == 7 and spec["tau"] >= 1.0
        assert set(entry["sweep"]) == {str(c) for c in range(8)}
        assert SPEC_KEYS <= set(entry["sweep"]["3"]) and entry["sweep"]["3"]["cap"] == 3
        assert entry["best_fixed_cap"]["cap"] in range(8)
    # Every round of a fixed cap verifies exactly that many drafts (fewer only near the end).
    assert results["overall"]["sweep"]["3"]["cap_counts"]["3"] >= 4


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=[pytest.mark.skipif(not _host_loads(f), reason=f"the installed mlx-lm has no {f} model"),
                           *([] if f == "qwen3_5" else [pytest.mark.slow])])
    for f in ("gpt_oss", "qwen3_5", "nemotron_h")])
def test_end_to_end_on_other_families(family, tmp_path, capsys):
    """The benchmark on a tiny pair of an MoE/sliding target and two hybrid
    recurrent ones: its greedy check passes (every speculative run equals
    the plain run, with the automatic cap and with an oracle's drafts kept
    and rejected) and it reports τ and the speed-up."""
    target, drafter = build_pair(tmp_path, family=family, vocab_size=128, num_layers=4, target_layer_ids=(0, 2),
                                 num_drafter_layers=1, block_size=4)
    results = run((str(target), str(drafter)), tokens=10)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("prompt"))
    assert "speedup" in header and "τ" in header and "overall" in printed
    assert results["greedy_checked"] is True and results["config"]["max_drafts"] == 4
    for entry in results["prompts"] + [results["overall"]]:
        spec = entry["speculative"]
        assert spec["generated_tokens"] == entry["plain"]["generated_tokens"] >= 10
        assert spec["speedup"] > 0 and spec["rounds"] > 0 and spec["tau"] >= 1.0
    # An oracle around the drafter, right 4 times in 5: drafts kept and rejected, outputs still checked equal.
    oracle = run((str(target), str(drafter)), "--oracle-acceptance", "0.8", "--num-draft-tokens", "3", tokens=16)
    spec = oracle["overall"]["speculative"]
    assert oracle["greedy_checked"] is True and 1.0 < spec["tau"] < 4.0 and spec["accepted"] < spec["drafted"]
    # --context: runs decode from copies of one prefilled cache (recurrent layers' state copied, not trimmed).
    long = run((str(target), str(drafter)), "--context", "64", "--num-draft-tokens", "3", tokens=10)
    assert long["prefilled_once"] is True and long["greedy_checked"] is True
    assert long["overall"]["speculative"]["rounds"] > 0


def test_caps_runs_only_the_candidates(pair):
    results = run(pair, "--caps", "3,0", "--num-draft-tokens", "3", tokens=8)
    for entry in results["prompts"] + [results["overall"]]:
        assert entry["speculative"]["cap"] == 3 and set(entry["sweep"]) == {"0", "3"}  # the main cap is fixed too
        assert entry["sweep"]["0"]["drafted"] == 0 and entry["best_fixed_cap"]["cap"] in (0, 3)


def test_bad_caps_are_refused(pair, capsys):
    for caps in ("0,x", "-1", ","):
        with pytest.raises(SystemExit):
            bench.main(["--model", pair[0], "--draft-model", pair[1], "--caps", caps])
        assert "expected" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        bench.main(["--model", pair[0], "--draft-model", pair[1], "--caps", "1", "--sweep-caps"])
    with pytest.raises(SystemExit):
        run(pair, "--caps", "0,9")
    assert "at most 7 tokens a round; give caps from 0 to 7" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most 7 tokens a round"):  # the function itself
        bench.configurations(bench.setup_arg_parser().parse_args(["--model", "m", "--caps", "0,9"]), 7)


def test_greedy_mismatch_fails_loudly(pair, monkeypatch):
    real = bench.speculative_generate_step

    def broken(*args, **kwargs):
        for i, (token, logprobs, from_draft) in enumerate(real(*args, **kwargs)):
            yield (token + 1 if i == 5 else token), logprobs, from_draft

    monkeypatch.setattr(bench, "speculative_generate_step", broken)
    with pytest.raises(bench.OutputMismatch, match=r"at generated token 5") as err:
        run(pair, "--num-draft-tokens", "2")
    assert "plain:" in str(err.value) and "speculative:" in str(err.value)


@pytest.fixture(scope="module")
def pair_hd32(tmp_path_factory):
    """A pair whose head dimension KV quantization's group sizes divide."""
    target, drafter = build_pair(tmp_path_factory.mktemp("bench32"), family="qwen3", head_dim=32)
    return str(target), str(drafter)


@pytest.mark.parametrize("options", [("--max-kv-size", "12"),
                                     ("--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "20")])
def test_kv_cache_options_reach_both_sides(pair_hd32, options, monkeypatch, capsys):
    """A rotating cache that wraps / KV quantization starting mid-run: both
    runs get the options (greedy outputs still checked equal)."""
    pair = pair_hd32
    generate = sys.modules["mlx_lm.generate"]  # the module (mlx_lm.generate is also the function)
    seen = {"plain": [], "speculative": []}
    plain, spec = generate.generate_step, bench.speculative_generate_step

    def watched(side, fn):
        def call(*args, **kwargs):
            seen[side].append(kwargs)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(generate, "generate_step", watched("plain", plain))
    monkeypatch.setattr(bench, "speculative_generate_step", watched("speculative", spec))
    results = run(pair, *options, "--num-draft-tokens", "3", tokens=16)
    assert results["greedy_checked"] is True
    for side, calls in seen.items():
        assert calls, side
        for kwargs in calls:
            if "--max-kv-size" in options:
                caches = kwargs["prompt_cache"]
                assert all(c.max_size == 12 for c in caches[: len(caches) if side == "plain" else 1]), side
            else:
                assert (kwargs["kv_bits"], kwargs["kv_group_size"], kwargs["quantized_kv_start"]) == (4, 32, 20), side
    assert "KV cache: " in capsys.readouterr().out


def test_prompt_files_are_read(tmp_path):
    path = tmp_path / "evals.jsonl"
    lines = [{"turns": ["first question", "a follow-up"]}, {"turns": ["second"]}, {"turns": ["third"]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    prompts = bench.read_prompts_file(path)
    assert [(p.name, p.category, p.text) for p in prompts] == [
        ("evals-1", "evals", "first question"), ("evals-2", "evals", "second"), ("evals-3", "evals", "third")]
    args = bench.setup_arg_parser().parse_args(["--model", "m", "--prompts-file", str(path), "--num-prompts", "2"])
    assert [p.text for p in bench.load_prompts(args)] == ["first question", "second"]
    args = bench.setup_arg_parser().parse_args(["--model", "m", "--prompts", "math"])
    assert len(bench.load_prompts(args)) == len(bench.PROMPTS["math"])
    args = bench.setup_arg_parser().parse_args(["--model", "m", "--num-prompts", "1"])  # per built-in category
    assert [p.name for p in bench.load_prompts(args)] == ["chat-1", "code-1", "math-1", "edit-1"]
    path.write_text('{"question": "no turns"}\n')
    with pytest.raises(ValueError, match="turns"):
        bench.read_prompts_file(path)
    path.write_text('{"turns": ["ok"]}\n{"turns": ["broken\n')
    with pytest.raises(ValueError, match=r"evals.jsonl:2: not a JSON line"):
        bench.read_prompts_file(path)
    # A line separator inside a JSON string is not a line break.
    path.write_text(json.dumps({"turns": ["one\u2028two"]}, ensure_ascii=False) + "\n")
    assert [p.text for p in bench.read_prompts_file(path)] == ["one\u2028two"]


def test_the_shared_eval_prompt_sets_are_read():
    from conftest import EVAL_PROMPTS as root

    files = sorted(root.glob("*.jsonl"))
    assert files, f"no eval prompt sets under {root}"
    for f in files:
        prompts = bench.read_prompts_file(f)
        assert prompts and all(p.text for p in prompts), f.name


def test_prompt_file_end_to_end(pair, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"turns": ["the cat sat on the mat"]}) + "\n")
    results = run(pair, "--prompts-file", str(path), "--num-draft-tokens", "3", tokens=8)
    assert [p["name"] for p in results["prompts"]] == ["mine-1"]
    assert list(results["by_category"]) == ["mine"]


@pytest.mark.slow
def test_oracle_acceptance_sets_tau(pair):
    perfect = run(pair, "--oracle-acceptance", "1.0", "--num-draft-tokens", "3", drafter=False, tokens=25)
    spec = perfect["overall"]["speculative"]
    assert spec["tau"] == pytest.approx(4.0, abs=0.3)  # cap + 1 (the last round may be shorter)
    assert spec["acceptance_by_position"][:3] == [1.0, 1.0, 1.0]
    assert perfect["config"]["drafter_kind"] == "oracle"
    never = run(pair, "--oracle-acceptance", "0.0", "--num-draft-tokens", "3", drafter=False, tokens=25)
    assert never["overall"]["speculative"]["tau"] == 1.0
    # Around a real drafter (its cost kept, its tokens replaced), with the automatic cap.
    wrapped = run(pair, "--oracle-acceptance", "1.0", tokens=25)
    assert wrapped["overall"]["speculative"]["tau"] >= 1.0 and wrapped["config"]["max_drafts"] == 7


def test_oracle_pattern_is_deterministic_with_the_chosen_rate():
    values = [uniform(0, pos) for pos in range(20000)]
    assert values == [uniform(0, pos) for pos in range(20000)]
    assert sum(v < 0.3 for v in values) / len(values) == pytest.approx(0.3, abs=0.02)
    assert values != [uniform(1, pos) for pos in range(20000)]


def test_predicted_speedup_from_costs_and_the_rounds_run():
    cost = CostModel(verify_ms=[10.0, 10.0, 10.0, 10.0], draft_ms=0.0)
    perfect = [bench.Run([0] * 9, 0.0, 1.0, proposal_lengths=[3, 3], accepted_lengths=[3, 3])]
    by_position, conditional = bench.acceptance(perfect, 3)
    assert by_position == conditional == [1.0, 1.0, 1.0]
    assert bench.predicted_speedup(cost, perfect) == pytest.approx(4.0)
    # Slot 1 kept half the time, slot 2 never reached when slot 1 failed.
    half = [bench.Run([0] * 5, 0.0, 1.0, proposal_lengths=[2, 2], accepted_lengths=[2, 0])]
    by_position, conditional = bench.acceptance(half, 2)
    assert by_position == [0.5, 0.5] and conditional == [0.5, 1.0]
    slow_draft = CostModel(verify_ms=[10.0, 10.0, 10.0], draft_ms=10.0)
    # 4 tokens (3 + 1) in two rounds of 20 ms, against 4 plain steps of 10 ms.
    assert bench.predicted_speedup(slow_draft, half) == pytest.approx(40.0 / 40.0)
    # A declined proposal ran the drafter: its round costs a draft and a plain step.
    declined = [bench.Run([0] * 3, 0.0, 1.0, proposal_lengths=[0, 0], accepted_lengths=[0, 0], declined=[1])]
    assert bench.predicted_speedup(slow_draft, declined) == pytest.approx(20.0 / 30.0)


def test_predicted_speedup_follows_the_context_length():
    # Plain steps get no dearer with context, verifies of 4 tokens do: the
    # same acceptance predicts less after a long prompt.
    cost = CostModel(verify_ms=[10.0, 10.0, 10.0, 10.0], draft_ms=0.0, context=0,
                     verify_ms_per_position=[0.0, 0.01, 0.01, 0.01], draft_ms_per_position=0.0)
    short = [bench.Run([0] * 9, 0.0, 1.0, prompt_tokens=0, proposal_lengths=[3, 3], accepted_lengths=[3, 3])]
    long = [bench.Run([0] * 9, 0.0, 1.0, prompt_tokens=1000, proposal_lengths=[3, 3], accepted_lengths=[3, 3])]
    # Rounds start at contexts 0 and 4 (then 1000 and 1004): 10 + 0.01 * context ms each.
    assert bench.predicted_speedup(cost, short) == pytest.approx(80.0 / (10.0 + 10.04))
    assert bench.predicted_speedup(cost, long) == pytest.approx(80.0 / (20.0 + 20.04))


def test_time_over_model_compares_each_side_with_the_cost_model():
    cost = CostModel(verify_ms=[10.0, 10.0, 20.0], draft_ms=10.0)
    # 8 tokens after the first: two rounds keeping both of 2 drafts (30 ms each) and two
    # undrafted rounds (10 ms each), 80 ms modelled, 90 ms measured; its plain run took
    # 120 ms for the same 8 tokens (80 ms modelled).
    run = bench.Run([0] * 9, 0.0, 0.090, prompt="a", proposal_lengths=[2, 2, 0, 0], accepted_lengths=[2, 2, 0, 0])
    run.plain = bench.Run([0] * 9, 0.0, 0.120, prompt="a")
    assert bench.modelled_ms(cost, run) == pytest.approx((80.0, 80.0))
    assert bench.time_over_model(cost, [run]) == pytest.approx([1.5, 90.0 / 80.0])
    assert bench.time_over_model(cost, [bench.Run([0] * 9, 0.0, 0.1, prompt="a")]) is None  # unpaired


def test_rates_take_the_median_trial_of_each_prompt():
    def runs(name, seconds):
        return [bench.Run([0] * 11, 0.0, s, prompt=name) for s in seconds]

    # One trial hit by a slow phase of the machine does not move the rate.
    assert bench.rate(runs("a", [1.0, 1.0, 3.0])) == pytest.approx(10.0)
    assert bench.rate(runs("a", [1.0, 1.1, 1.2])) == pytest.approx(10 / 1.1)
    # Prompts pool as total tokens over total time.
    assert bench.rate(runs("a", [1.0]) + runs("b", [4.0])) == pytest.approx(20 / 5.0)


def test_speedups_pair_each_run_with_the_plain_run_before_it():
    def pair(name, plain_s, spec_s):
        run = bench.Run([0] * 11, 0.0, spec_s, prompt=name)
        run.plain = bench.Run([0] * 11, 0.0, plain_s, prompt=name)
        return run

    # The machine twice as slow during the second trial: each pair still shows 2x.
    assert bench.paired_speedup([pair("a", 1.0, 0.5), pair("a", 2.0, 1.0)]) == pytest.approx(2.0)
    # Unpaired medians mix the phases (plain 1.6 s over speculative 1.0 s: 1.6x); the pairs
    # say 2x, 2x and 1.6x, median 2x.
    runs = [pair("a", 1.0, 0.5), pair("a", 2.0, 1.0), pair("a", 1.6, 1.0)]
    assert bench.paired_speedup(runs) == pytest.approx(2.0)
    # Prompts pool as total plain time over total speculative time.
    assert bench.paired_speedup([pair("a", 1.0, 0.5), pair("b", 3.0, 1.0)]) == pytest.approx(4.0 / 1.5)
    assert bench.paired_speedup([bench.Run([0] * 11, 0.0, 1.0, prompt="a")]) is None  # no plain run
    assert bench.pair_quartiles(runs + [pair("a", 3.0, 1.0)]) == pytest.approx([1.6, 3.0])


def test_plot_without_matplotlib_says_so(pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    png, out = tmp_path / "speedup.png", tmp_path / "r.json"
    run(pair, "--num-draft-tokens", "2", "--plot", str(png), "--json", str(out), tokens=6)
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not png.exists() and out.exists()


def test_bad_options_are_refused(pair):
    with pytest.raises(SystemExit):
        bench.main(["--model", pair[0]])  # neither a drafter nor an oracle
    with pytest.raises(SystemExit):
        bench.main(["--model", pair[0], "--draft-model", pair[1], "--prompts", "poems"])


def test_held_out_best_fixed_cap_is_chosen_on_other_trials():
    """Two equally fast fixed caps whose noise favours each in turn: the
    in-sample best fixed cap beats an automatic cap of the same speed by
    its noise; chosen on the other trials it does not."""

    def pair(trial, speedup):
        plain = bench.Run([0] * 11, 0.0, 1.0, prompt="p", trial=trial)
        return bench.Run([0] * 11, 0.0, 1.0 / speedup, prompt="p", plain=plain, trial=trial)

    trials = range(8)
    noisy = lambda trial, cap: 1.5 * (1.2 if (trial + cap) % 2 else 1 / 1.2)  # noqa: E731
    spec = {"auto": [pair(t, 1.5) for t in trials],
            5: [pair(t, noisy(t, 5) * (1.1 if t < 2 else 1.0)) for t in trials],
            6: [pair(t, noisy(t, 6)) for t in trials]}
    summary = bench.summarize([r.plain for r in spec["auto"]], spec, None, 7, "auto")
    best = summary["best_fixed_cap"]
    assert summary["speculative"]["speedup"] == pytest.approx(1.5)
    assert best["speedup"] > 1.5  # in sample, the noise makes a fixed cap "better"
    held = best["held_out"]
    # Even trials favour cap 5, odd ones cap 6: each half picks the cap the other half disfavours.
    assert held["caps"] == [5, 6] and held["ratio"] == pytest.approx(1.2)
    # A fixed main configuration has no held-out comparison.
    fixed = {5: spec[5], 6: spec[6]}
    assert bench.summarize([r.plain for r in spec[5]], fixed, None, 7, 5)["best_fixed_cap"]["held_out"] is None


def test_oracle_pattern_depends_on_the_continuation():
    from types import SimpleNamespace

    from mlx_lm_dspark_tools.oracle import OracleDrafter

    inner = SimpleNamespace(args=SimpleNamespace(vocab_size=100), target_layer_ids=[0], max_drafts=7)
    oracle = OracleDrafter(None, acceptance=0.5, confidence=0.5, inner=inner)
    oracle.set_continuation([5, 6, 7])
    first = [oracle.right(p) for p in range(300)]
    assert oracle.drafts(0, 2) == [6 if first[1] else 7, 7 if first[2] else 8]
    oracle.set_continuation([5, 6, 8])
    assert [oracle.right(p) for p in range(300)] != first
    oracle.set_continuation([5, 6, 7])
    assert [oracle.right(p) for p in range(300)] == first
    # Each trial draws its own pattern at the same rate; a trial's runs share theirs.
    trials = []
    for trial in range(1, 4):
        oracle.set_continuation([5, 6, 7], trial)
        trials.append([oracle.right(p) for p in range(300)])
        oracle.set_continuation([5, 6, 7], trial)
        assert [oracle.right(p) for p in range(300)] == trials[-1]
    assert all(t != first for t in trials) and len({tuple(t) for t in trials}) == 3
    assert sum(map(sum, trials)) / 900 == pytest.approx(0.5, abs=0.06)


@pytest.mark.slow
def test_cost_model_is_measured_again_between_the_runs(pair, monkeypatch):
    """The machine's speed changes over minutes: the predictions use costs
    measured before and between the runs; the automatic cap used the first."""
    real = bench.costs.extend
    monkeypatch.setattr(bench.costs, "extend", lambda sampler: real(sampler, reps=3, max_reps=3))
    results = run(pair, "--trials", "2")
    assert results["cost_repetitions"] > 3
    start, final = results["cost_model_at_start"], results["cost_model"]
    assert len(start["verify_ms"]) == len(final["verify_ms"]) == 8
    cached = run(pair, "--cached-cost")  # reuses what the first run cached: nothing measured
    assert "cost_repetitions" not in cached and cached["cost_model"] == start


@pytest.fixture
def fixed_costs(monkeypatch):
    """A cost model given, not measured (seconds per proposer): fixed caps
    use it only for the report's predictions."""
    monkeypatch.setattr(bench, "cost_model", lambda drafter, target: CostModel(
        verify_ms=[1.0 + 0.1 * w for w in range(drafter.max_drafts + 1)], draft_ms=0.5))


def test_compare_lookup_reports_lookup_drafter_and_combined(pair, tmp_path, capsys, fixed_costs):
    out = tmp_path / "lookup.json"
    results = run(pair, "--prompts", "edit", "--compare-lookup", "ngram:n=2,min=1", "--num-draft-tokens", "3",
                  "--cached-cost", "--json", str(out), tokens=8)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["config"]["compare_lookup"] == ["ngram:n=2,min=1"]
    variants = results["variants"]
    assert list(variants) == ["lookup", "drafter", "combined"]
    drafts = {"lookup": 8, "drafter": 7, "combined": 7}  # lookup's default k; combined: the drafter's block
    for name, variant in variants.items():
        assert variant["greedy_checked"] is True and set(variant["by_category"]) == {"edit"}
        assert [p["name"] for p in variant["prompts"]] == ["edit-1", "edit-2"]
        for entry in (variant["overall"], variant["by_category"]["edit"]):
            spec = entry["speculative"]
            assert SPEC_KEYS <= set(spec) and spec["cap"] == 3 and spec["tau"] >= 1.0
            assert len(spec["acceptance_by_position"]) == drafts[name]
            assert entry["plain"]["generated_tokens"] >= 8
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    for group in ("edit", "overall"):
        assert [r[1] for r in rows if r and r[0] == group] == ["lookup", "drafter", "combined"]


def test_compare_lookup_of_several_settings_without_a_drafter(pair, capsys, fixed_costs):
    results = run(pair, "--prompts", "edit", "--num-prompts", "1", "--compare-lookup",
                  "--compare-lookup", "ngram:n=2,min=1,k=3", "--num-draft-tokens", "3", "--cached-cost",
                  drafter=False, tokens=6)
    assert list(results["variants"]) == ["lookup n=4,min=2,k=8", "lookup n=2,min=1,k=3"]
    assert len(results["variants"]["lookup n=2,min=1,k=3"]["overall"]["speculative"]["acceptance_by_position"]) == 3
    printed = capsys.readouterr().out
    assert "edit      lookup n=2,min=1,k=3" in printed and "drafter" not in printed.split("\n", 2)[2]


def test_compare_lookup_refuses_a_bad_spec(pair, capsys):
    for spec in ("ngram:q=1", "my-drafter"):
        with pytest.raises(SystemExit):
            bench.main(["--model", pair[0], "--compare-lookup", spec])
    err = capsys.readouterr().err
    assert "unknown lookup setting 'q'" in err and "my-drafter: not a lookup specification" in err


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, pair):
    """DSpark (the pair's), DFlash and EAGLE3 drafters of one target, and lookup."""
    import mlx.core as mx

    from mlx_lm_dspark_tools.tiny import save_drafter, save_eagle3_drafter

    root = tmp_path_factory.mktemp("kinds")
    target = Path(pair[0])
    config = json.loads((target / "config.json").read_text())
    weights = mx.load(str(target / "model.safetensors"))
    save_drafter(root / "dflash", config, markov_rank=0, target_weights=weights)
    save_eagle3_drafter(root / "eagle3", config, ttt_length=5, target_weights=weights)
    return pair[0], [pair[1], str(root / "dflash"), str(root / "eagle3"), "ngram"]


def test_several_drafters_run_side_by_side(kinds, tmp_path, capsys):
    target, drafters = kinds
    out = tmp_path / "results.json"
    argv = ["--model", target, "--max-tokens", "8", "--num-prompts", "1", "--prompts", "chat", "--json", str(out)]
    bench.run(argv + [x for d in drafters for x in ("--draft-model", d)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    names = ["1:dspark", "2:dflash", "3:eagle3", "4:ngram"]
    assert list(results["variants"]) == names and results["base"] == "1:dspark"
    assert results["config"]["draft_model"] == drafters and "draft_models" not in results["config"]
    for name, path in zip(names, drafters):
        v = results["variants"][name]
        assert v["drafter_kind"] == name[2:]
        assert v["draft_model"].startswith(path) and v["greedy_checked"] is True  # ngram: with its settings
        assert {"cost_model", "prompts", "by_category", "overall"} <= set(v)
        assert SPEC_KEYS <= set(v["overall"]["speculative"]) and v["overall"]["speculative"]["tau"] >= 1.0
        assert v["cost_model"]["draft_ms"] > 0 and len(v["cost_model"]["verify_ms"]) == v["max_drafts"] + 1
    assert [results["variants"][n]["max_drafts"] for n in names[:3]] == [7, 7, 5]
    assert results["variants"]["3:eagle3"]["cost_model"]["draft_ms_per_draft"] > 0  # drafts token by token
    assert results["variants"]["1:dspark"]["cost_model"]["draft_ms_per_draft"] == 0
    header = next(line for line in printed.splitlines() if line.startswith("category"))
    for column in ("τ", "speedup", "vs 1:dspark", "draft ms", "verify ms", "ms/round"):
        assert column in header
    rows = [line.split()[1] for line in printed.splitlines() if line.startswith("overall")]
    assert rows == names


def test_one_drafter_keeps_the_single_report(pair, capsys):
    results = run(pair, "--num-draft-tokens", "2", tokens=6)
    assert results["config"]["draft_model"] == pair[1] and "variants" not in results
    assert "draft_models" not in results["config"] or results["config"]["draft_models"] == [pair[1]]
    with pytest.raises(SystemExit):
        bench.main(["--model", pair[0], "--draft-model", pair[1], "--draft-model", "ngram", "--compare-lookup"])
    assert "--compare-lookup compares one drafter with lookup" in capsys.readouterr().err


def test_context_prefills_each_prompt_once(pair, monkeypatch):
    """With --context every prompt is prefilled once and each run (warm-up,
    plain, speculative, every trial) feeds only the last prompt token on a
    copy of that cache; the greedy outputs equal plain decoding from scratch."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    prefills, fed, plain_runs = [], [], []
    real_prefill, real_plain, real_spec = bench.prefill_prompt, bench.run_plain, bench.speculative_generate_step

    def counted(model, drafter, prompt, args):
        prefills.append(len(prompt))
        return real_prefill(model, drafter, prompt, args)

    def plain(model, prompt, *args, **kwargs):
        run = real_plain(model, prompt, *args, **kwargs)
        plain_runs.append((list(prompt), run.tokens))
        fed.append(len(prompt) - kwargs.get("cached", 0))
        return run

    def spec(prompt, *args, **kwargs):
        fed.append(prompt.size)
        return real_spec(prompt, *args, **kwargs)

    monkeypatch.setattr(bench, "prefill_prompt", counted)
    monkeypatch.setattr(bench, "run_plain", plain)
    monkeypatch.setattr(bench, "speculative_generate_step", spec)
    results = run(pair, "--context", "96", "--trials", "2", "--num-draft-tokens", "3", tokens=16)
    assert results["prefilled_once"] is True and results["greedy_checked"] is True
    assert prefills == [96, 96]  # two prompts, each once (the warm-up reuses the first's)
    assert fed == [1] * (2 + 2 * 2 * 2)  # warm-up pair, then 2 prompts x 2 trials x (plain, speculative)
    assert all(e["prompt_tokens"] == 96 and e["context_prefill_ms"] > 0 for e in results["prompts"])

    model, _ = load(pair[0])
    for prompt, tokens in plain_runs[1:]:
        scratch = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
        assert tokens == scratch[: len(tokens)] and len(tokens) == 16
