"""Batched speculative rounds against serial ones and plain decoding, by batch size.

    python -m mlx_lm_dspark_tools.batch_benchmark --model T --draft-model D --batch-sizes 1,2,4,8

For each batch size B, the same B prompts (the benchmark's built-in ones,
cycled) are decoded greedily four ways, in turn: plain decoding one prompt
after another, mlx-lm's ``batch_generate`` (plain batched), speculative
decoding one prompt after another, and ``mlx_lm_dspark.batch`` (speculative,
batched rounds).  Reports total generated tokens per second of each and
checks that both speculative ways give plain decoding's tokens.
"""

import argparse
import itertools
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import batch_generate as plain_batch_generate
from mlx_lm.generate import generate_step

from mlx_lm_dspark.batch import batch_generate
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step

from .benchmark import PROMPTS, encode, parse_caps


def setup_arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model", required=True)
    parser.add_argument("--batch-sizes", type=parse_caps, default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="Drafts per round (default: the drafter's block).")
    parser.add_argument("--trials", type=int, default=1)
    return parser


def _timed(run):
    began = time.perf_counter()
    out = run()
    return out, time.perf_counter() - began


def measure(model, tokenizer, drafter, prompts, max_tokens, num_draft_tokens):
    """Seconds of each way over ``prompts``, and whether the speculative ones matched."""

    def plain():
        return [[int(y) for y, _ in generate_step(mx.array(p), model, max_tokens=max_tokens)] for p in prompts]

    def speculative():
        return [[int(y) for y, _, _ in speculative_generate_step(
            mx.array(p), model, drafter, num_draft_tokens=num_draft_tokens or drafter.max_drafts,
            max_tokens=max_tokens)] for p in prompts]

    expected, plain_s = _timed(plain)
    _, plain_batched_s = _timed(lambda: plain_batch_generate(model, tokenizer, prompts, max_tokens=max_tokens))
    serial, serial_s = _timed(speculative)
    batched, batched_s = _timed(lambda: batch_generate(model, drafter, prompts, max_tokens=max_tokens,
                                                       num_draft_tokens=num_draft_tokens))
    if serial != expected or batched != expected:
        raise SystemExit("speculative tokens differ from plain decoding's")
    tokens = sum(len(e) for e in expected)
    return tokens, {"plain": plain_s, "plain batched": plain_batched_s,
                    "speculative": serial_s, "speculative batched": batched_s}


def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    model, tokenizer = load(args.model)
    drafter = load_drafter(args.draft_model)
    texts = list(itertools.chain(*PROMPTS.values()))
    print(f"target {args.model}, drafter {args.draft_model}, {args.max_tokens} tokens per prompt, "
          f"drafts per round {args.num_draft_tokens or drafter.max_drafts}, greedy; total tokens/s")
    ways = ["plain", "plain batched", "speculative", "speculative batched"]
    print(f"{'B':>3} " + " ".join(f"{w:>20}" for w in ways) + f" {'batched spec / plain batched':>30}")
    measure(model, tokenizer, drafter, [encode(tokenizer, texts[0], False)], 4, args.num_draft_tokens)  # warm-up
    for b in args.batch_sizes:
        prompts = [encode(tokenizer, texts[i % len(texts)], False) for i in range(b)]
        best = None
        for _ in range(args.trials):
            tokens, seconds = measure(model, tokenizer, drafter, prompts, args.max_tokens, args.num_draft_tokens)
            best = seconds if best is None else {w: min(best[w], seconds[w]) for w in ways}
        rates = {w: tokens / best[w] for w in ways}
        print(f"{b:>3} " + " ".join(f"{rates[w]:>20.1f}" for w in ways)
              + f" {rates['speculative batched'] / rates['plain batched']:>29.2f}x")


if __name__ == "__main__":
    main()
