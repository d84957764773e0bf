"""Plain vs speculative decoding on a tiny random Qwen3 pair, fully offline.

Builds a small random target (with a tokenizer) and a random DSpark drafter
in the released DeepSpec layout in a temporary directory, then generates the
same prompt with and without the drafter.  A random drafter is rarely right,
so τ stays near 1 and there is no speed-up to expect here: the point is that
the text is identical and that the whole path (loading through mlx-lm,
tapping, verification, rollback) runs.  Real drafters are trained for their
target (see the README).
"""

import tempfile
import time
from pathlib import Path

import mlx_lm

import mlx_lm_dspark
from mlx_lm_dspark.tiny import build_pair
from mlx_lm_dspark.target import text_args

PROMPT = "the cat sat on the mat and the dog ran to the park"


def run(model, tokenizer, **kwargs):
    tic = time.perf_counter()
    responses = list(mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=48, **kwargs))
    elapsed = time.perf_counter() - tic
    return "".join(r.text for r in responses), responses, elapsed


def main():
    with tempfile.TemporaryDirectory() as tmp:
        target_dir, drafter_dir = build_pair(Path(tmp), family="qwen3")
        model, tokenizer = mlx_lm.load(str(target_dir))
        drafter, _ = mlx_lm.load(str(drafter_dir))  # recognised as a drafter from its config
        print(f"target: qwen3, {len(model.layers)} layers, hidden {text_args(model)['hidden_size']}")
        print(f"drafter: {drafter.kind}, block {drafter.block_size}, taps {drafter.target_layer_ids}")

        plain_text, plain, t_plain = run(model, tokenizer)
        spec_text, spec, t_spec = run(model, tokenizer, draft_model=drafter)
        print(f"\nplain       ({len(plain)} tokens, {t_plain:.2f}s): {plain_text!r}")
        print(f"speculative ({len(spec)} tokens, {t_spec:.2f}s): {spec_text!r}")
        print(f"identical: {plain_text == spec_text}")
        print(drafter.stats.summary())
        print(f"tokens from accepted drafts: {sum(r.from_draft for r in spec)}")
        print(f"mlx-lm-dspark {mlx_lm_dspark.__version__}")


if __name__ == "__main__":
    main()
