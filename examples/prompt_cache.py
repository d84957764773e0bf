"""Reusing a prompt cache across turns with a drafter.

    python examples/prompt_cache.py [--model T --draft-model D] [--max-tokens N]

A conversation is continued turn after turn through one mlx-lm prompt cache:
each turn feeds only its new tokens, the cache keeps everything before.  The
drafter's context travels with the cache (here a target-only cache from
``make_prompt_cache(model)``; mlx-lm's combined
``make_prompt_cache(model) + make_prompt_cache(drafter)`` works too).  The
same conversation is run without the drafter, and every turn's text must match.
Defaults to the demo pair shipped in the package, offline.
"""

import argparse

from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_lm_dspark
from mlx_lm_dspark.demo import pair_paths

TURNS = [
    "def read_lines(path):\n",
    "\n\nclass Stack:\n    def __init__(self):\n",
    "\n\ndef main(argv=None):\n",
]


def converse(model, tokenizer, max_tokens, **kwargs):
    """Each turn's completion, all turns through one prompt cache."""
    cache = make_prompt_cache(model)
    replies = []
    for turn in TURNS:
        new_tokens = tokenizer.encode(turn)  # only what the cache has not seen yet
        text = "".join(r.text for r in stream_generate(model, tokenizer, new_tokens, max_tokens=max_tokens,
                                                       prompt_cache=cache, **kwargs))
        replies.append(text)
    return replies


def main():
    demo_target, demo_drafter = pair_paths()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(demo_target))
    parser.add_argument("--draft-model", default=str(demo_drafter))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="Fixed drafts per round (default: chosen each round).")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    drafter = mlx_lm_dspark.load_drafter(args.draft_model)
    extra = {} if args.num_draft_tokens is None else {"num_draft_tokens": args.num_draft_tokens}

    plain = converse(model, tokenizer, args.max_tokens)
    speculative = converse(model, tokenizer, args.max_tokens, draft_model=drafter, **extra)
    for i, (turn, reply) in enumerate(zip(TURNS, speculative), 1):
        print(f"--- turn {i}: {turn!r}\n{reply}")
    same = sum(a == b for a, b in zip(plain, speculative))
    print(f"turns identical to plain decoding: {same}/{len(TURNS)}")
    raise SystemExit(0 if same == len(TURNS) else 1)


if __name__ == "__main__":
    main()
