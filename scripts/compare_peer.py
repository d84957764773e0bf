"""Our round loop against mlx-dspark's at the same fixed caps, paired and interleaved.

    python scripts/compare_peer.py --model TARGET --draft-model DRAFTER --caps 1,3,6 --trials 15

Needs mlx-dspark installed beside mlx-lm-dspark (a separate environment: it
is not a dependency).  Per trial and cap (the caps' order rotates with the
trial) it runs our speculative loop and mlx-dspark's ``speculative_generate``
(its lookup drafts and adaptive cap off) on the same prompt, each right after
a plain decoding run (mlx-lm's ``generate_step``), which side first
alternating with the trial.  It checks both greedy outputs equal the plain
one and reports end-to-end tokens/s (prefill included, the same for all
three), each side's speed-up over the plain run just before it (median of
the pairs) and ours over the peer's.
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import generate_step  # mlx-lm first: it activates mlx-lm-dspark's patches

from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark_tools.benchmark import PROMPTS, encode


def timed_tokens(generator, max_tokens):
    start = time.perf_counter()
    tokens = [int(item[0]) for item, _ in zip(generator, range(max_tokens))]
    return tokens, time.perf_counter() - start


def run_plain(model, prompt, max_tokens):
    return timed_tokens(generate_step(mx.array(prompt), model, max_tokens=max_tokens), max_tokens)


def run_ours(model, drafter, prompt, max_tokens, cap):
    gen = speculative_generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens, num_draft_tokens=cap)
    return timed_tokens(gen, max_tokens)


def run_peer(peer_target, tokenizer, peer_drafter, prompt, max_tokens, cap):
    from mlx_dspark.generate import speculative_generate

    start = time.perf_counter()
    result = speculative_generate(peer_target, tokenizer, peer_drafter, prompt_ids=list(prompt),
                                  max_new_tokens=max_tokens, max_draft_tokens=cap, lookup_drafts=False,
                                  confidence_threshold=0.0, temperature=0.0)
    return list(result.token_ids), time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model", required=True)
    parser.add_argument("--caps", default="1,3,6")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=PROMPTS["chat"][0])
    parser.add_argument("--draft-bits", default="none",
                        help="Both sides quantize the drafter to these bits on load ('none': stored precision; "
                             "mlx-dspark cannot quantize a tiny drafter whose widths its group size does not divide).")
    args = parser.parse_args(argv)
    from mlx_dspark.load import load_drafter as peer_load_drafter
    from mlx_dspark.load import load_target as peer_load_target

    caps = [int(c) for c in args.caps.split(",")]
    model, tokenizer = mlx_lm.load(args.model)
    bits = None if args.draft_bits == "none" else int(args.draft_bits)
    drafter = load_drafter(args.draft_model, bits=bits)
    peer_target, _ = peer_load_target(args.model, require_tap=True)
    peer_drafter, _ = peer_load_drafter(args.draft_model, quantize=bits is not None, bits=bits or 4)
    prompt = encode(tokenizer, args.prompt, True)

    plain, _ = run_plain(model, prompt, args.max_tokens)  # warm-up, and the reference text
    for cap in caps:
        run_ours(model, drafter, prompt, 16, cap)
        run_peer(peer_target, tokenizer, peer_drafter, prompt, 16, cap)
    rows = {cap: {"ours": [], "peer": [], "plain": [], "ours_x": [], "peer_x": []} for cap in caps}
    for trial in range(args.trials):
        shift = trial % len(caps)
        for cap in caps[shift:] + caps[:shift]:
            row = rows[cap]
            sides = [("ours", lambda: run_ours(model, drafter, prompt, args.max_tokens, cap)),
                     ("peer", lambda: run_peer(peer_target, tokenizer, peer_drafter, prompt, args.max_tokens, cap))]
            for side, run in sides[trial % 2:] + sides[: trial % 2]:  # which side runs first alternates
                tokens_p, seconds_p = run_plain(model, prompt, args.max_tokens)
                tokens, seconds = run()
                n = min(len(tokens), len(plain))
                if tokens[:n] != plain[:n] or tokens_p != plain:
                    raise SystemExit(f"{side} at cap {cap}, trial {trial + 1}: output differs from plain decoding")
                row["plain"].append(len(tokens_p) / seconds_p)
                row[side].append(len(tokens) / seconds)
                row[f"{side}_x"].append(row[side][-1] / row["plain"][-1])

    median = statistics.median
    print(f"{args.trials} trials x {args.max_tokens} tokens, greedy, outputs equal to plain decoding in every run")
    print(f"{'cap':>4}{'plain tok/s':>13}{'ours tok/s':>12}{'peer tok/s':>12}{'ours/peer':>11}"
          f"{'ours x plain':>14}{'peer x plain':>14}")
    for cap, row in rows.items():
        print(f"{cap:>4}{median(row['plain']):>13.1f}{median(row['ours']):>12.1f}{median(row['peer']):>12.1f}"
              f"{median(row['ours']) / median(row['peer']):>11.2f}{median(row['ours_x']):>14.2f}"
              f"{median(row['peer_x']):>14.2f}")


if __name__ == "__main__":
    main()
