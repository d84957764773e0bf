"""The serving benchmark: both servers, every client count, equal answers."""

import pytest

from mlx_lm_dspark_tools import serve_benchmark
from mlx_lm_dspark_tools.tiny import build_pair


@pytest.mark.slow
def test_rows_for_each_client_count(tmp_path, capsys):
    from test_server import with_chat_template

    target, drafter = build_pair(tmp_path, "qwen3", vocab_size=128, num_layers=4, target_layer_ids=(0, 2),
                                 num_drafter_layers=1, block_size=4)
    with_chat_template(target)
    rows = serve_benchmark.main(["--model", str(target), "--draft-model", str(drafter), "--clients", "1,3",
                                 "--requests", "2", "--max-tokens", "6"])
    assert [r[0] for r in rows] == [1, 3]
    for _, plain_rate, spec_rate, plain_latencies, spec_latencies in rows:
        assert plain_rate > 0 and spec_rate > 0
    assert [len(r[3]) for r in rows] == [len(r[4]) for r in rows] == [2, 6]
    assert "answers equal in every run" in capsys.readouterr().out


def test_percentiles():
    assert serve_benchmark.percentile([3, 1, 2, 4], 0.5) in (2, 3)
    assert serve_benchmark.percentile(list(range(101)), 0.95) == 95
