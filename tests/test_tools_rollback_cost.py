"""The rollback-cost tool: paired differences and the report."""

from mlx_lm_dspark_tools import rollback_cost


def test_paired_takes_per_repetition_differences():
    # Medians of each side differ by 0; the differences of each pair are 10, 11, 12.
    a = [110, 11, 212]
    b = [100, 0, 200]
    assert rollback_cost.paired(a, b) == (11, 10.5, 11.5)
    assert rollback_cost.paired([5], [2]) == (3, 3, 3)


def test_measure_and_report_tiny_hybrid():
    m = rollback_cost.measure("lfm2", "tiny", width=4, kept=[1, 3], reps=1, context=8)
    for name in rollback_cost.DESIGNS:
        extra, q1, q3 = m[f"{name} verify extra"]
        assert q1 <= extra <= q3
        for a in (1, 3):
            assert m[f"{name} rollback to {a}"] >= 0
    lines = rollback_cost.report("lfm2", m, 4, [1, 3])
    assert lines[0].startswith("lfm2: plain step")
    assert len(lines) == 1 + 2 * len(rollback_cost.DESIGNS)
    assert all("plain steps" in line for line in lines[1:])
