"""Benchmark speculative decoding with a drafter against plain decoding.

    python -m mlx_lm_dspark_tools.benchmark --model T --draft-model D --prompts all
    python -m mlx_lm_dspark_tools.benchmark --model T --draft-model A --draft-model B --draft-model C

Per prompt, trial and cap it runs plain decoding (mlx-lm's ``generate_step``)
and then speculative decoding with the same sampler, times generation only
(tokens per second from the first yielded token to the last; the prefill is
reported on its own) and checks that greedy outputs are identical.  The
speed-up of a prompt is the median over trials of each speculative run's
rate over the plain run just before it: a shared machine's speed drifts by
tens of percent over seconds, and the pair sees the same phase.  It reports
plain and speculative tokens/s, the speed-up, τ
(mean accepted drafts + 1 per round), the acceptance of each draft position,
the drafts verified per round, the machine's cost model and the speed-up
that cost model predicts for the rounds run (their caps, context lengths
and accepted drafts; efficiency = measured / predicted).

``--oracle-acceptance F`` replaces the drafter by a benchmark-only oracle
(``oracle_drafter.py``) that is right at each position with probability F;
with ``--draft-model`` too, the real drafter still runs every round (its
cost is kept, its tokens replaced).  ``--sweep-caps`` also runs every fixed
cap 0..max to compare with the automatic cap, ``--caps 0,5,7`` only those.

``--draft-model`` given several times runs each drafter (any kinds: DSpark,
DFlash, EAGLE3, lookup) through the whole benchmark on the same target, one
after the other, each paired with plain decoding, and prints them side by
side per category (τ, speed-up, speed-up over the first, the cost per
round).  ``--compare-lookup [SPEC]`` makes the same comparison of lookup
alone (``--draft-model SPEC``, default ``ngram``), the drafter alone and the
drafter combined with lookup (the ``edit`` prompts repeat their context,
where lookup pays).  Given several times it compares those lookup settings
(each alone and, with a drafter, combined); without ``--draft-model`` it
runs lookup alone.  Their JSON has ``config``, ``base`` (the variant the
speed-ups are also compared with) and ``variants``: name -> the results
below plus ``draft_model``, ``drafter_kind`` and ``max_drafts``.

``--json PATH`` writes everything; top-level keys:

- ``config``: the options, versions and device;
- ``cost_model``: ``verify_ms`` (by verify width 1..max_drafts+1) and ``draft_ms`` with
  ``context`` positions cached, and their growth per further position
  (``verify_ms_per_position``, ``draft_ms_per_position``): measured before
  the runs and again between them (``cost_repetitions`` in all), the
  predictions use it; ``cost_model_at_start``: the one measured before the
  runs, which the automatic cap used;
- ``prompts``: per prompt ``name``, ``category``, ``prompt_tokens``, ``plain``,
  ``speculative``, (with --sweep-caps) ``sweep`` (cap -> speculative) and
  (with --context) ``context_prefill_ms``;
- ``prefilled_once``: True with --context: each prompt was prefilled once
  (all but its last token, ``context_prefill_ms``) and every run decoded
  from a copy of that cache (its own ``prefill_ms`` is then the last token's);
- ``by_category``: per category ``plain``, ``speculative``, ``sweep``, ``best_fixed_cap``
  (``cap``, ``speedup``, and ``held_out``: the automatic cap's speed-up over
  the best fixed cap chosen on the other half of the trials, see
  ``held_out_best_fixed``);
- ``overall``: the same over every prompt.

``plain`` has ``tokens_per_s``, ``prefill_ms``, ``generated_tokens``, ``runs``;
``speculative`` has those and ``cap``, ``speedup``, ``pair_quartiles`` (the
quartiles of single runs' speed-ups over their plain runs), ``tau``, ``rounds``,
``drafted``, ``declined`` (rounds whose proposal was made, then none of it
verified), ``accepted``, ``drafts_per_round``, ``cap_counts``,
``acceptance_by_position`` (rounds where slot k was verified and kept /
rounds where it was verified), ``conditional_acceptance`` (kept / reached:
verified with every slot before it kept), ``predicted_speedup``,
``efficiency``, ``time_over_model`` (the paired plain runs' and the
speculative runs' time over the cost model's for the same tokens and
rounds, a declined proposal costing a drafter round: how far the machine
was from the model during the runs, each side alone), ``host_ms_per_round`` (loop time outside waits for the device),
``loop_ms_per_round`` (the part of it not spent building the target's and
drafter's graphs: what the round loop itself adds) and (automatic cap)
``learned_time_scale``: the (undrafted, drafted) rounds' measured time over
the cost model's that the cap learned while decoding.
"""

import argparse
import copy
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx_lm.generate  # noqa: F401  (first: importing .speculative before mlx-lm is circular)

from mlx_lm_dspark import cost as costs
from mlx_lm_dspark.session import last_stats
from mlx_lm_dspark.speculative import bind, cost_model, speculative_generate_step

PROMPTS = {
    "chat": [
        "Give me three tips for keeping houseplants alive through a dry winter.",
        "Explain to a ten year old why the sky turns orange at sunset.",
        "Write a short, friendly note inviting my neighbours to a garden party on Saturday.",
        "What are the pros and cons of working from home? Answer in a few bullet points.",
    ],
    "code": [
        "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
        "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
        "Implement a small stack class in Python with push, pop and peek methods and a short usage example.",
        "Write a shell one-liner that counts the lines of every .py file under a directory, then explain it.",
    ],
    "math": [
        "A train covers 180 km in 2.5 hours. What is its average speed in km/h? Show your steps.",
        "Solve for x: 3x + 7 = 22. Explain each step.",
        "What is the sum of the first 50 positive even numbers? Reason step by step.",
        "A rectangle has a perimeter of 36 cm and its length is twice its width. Find its area.",
    ],
    # Where lookup (n-gram) drafts shine: the answer repeats the context.
    "edit": [
        "Here is a file. Return the whole file with the class Stack renamed to Pile and nothing else.\n\n"
        "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n"
        "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
        "    def pop(self):\n        return self.items.pop()\n\n    def peek(self):\n"
        "        return self.items[-1]\n\n    def __len__(self):\n        return len(self.items)\n\n"
        "Renamed:\n\nclass Pile:\n",
        "Rename the variable total to result in this function and return the function.\n\n"
        "def mean(values):\n    total = 0\n    count = 0\n    for value in values:\n        total += value\n"
        "        count += 1\n    if count == 0:\n        raise ValueError(\"mean of no values\")\n"
        "    return total / count\n\nWith total renamed to result:\n\ndef mean(values):\n",
        "Quote the second paragraph of this passage exactly.\n\n"
        "The river rose in the night and by morning the lower fields were under water. Nobody in the village "
        "had seen it so high since the old mill was built.\n\n"
        "By noon the water had reached the steps of the church, and the children were sent up the hill with "
        "the goats while their parents carried sacks of grain to the loft above the school.\n\n"
        "The second paragraph, quoted exactly:\n\nBy noon the water",
        "Reformat this JSON with one key per line, indented by two spaces.\n\n"
        '{"name": "garden party", "day": "Saturday", "time": "15:00", "guests": ["Ann", "Bo", "Cy"], '
        '"food": {"cake": 2, "bread": 4}, "music": true}\n\nReformatted:\n\n{\n  "name": "garden party",\n',
    ],
}

WARMUP_TOKENS = 8
COST_SHARE = 0.1  # at most this share of the benchmark's time re-measures the cost model between runs


class OutputMismatch(RuntimeError):
    """Speculative greedy output differs from plain greedy output."""


@dataclass
class Prompt:
    name: str
    category: str
    text: str
    tokens: List[int] = field(default_factory=list)


@dataclass
class Run:
    """One generation: its tokens, prefill and generation time, and (for
    speculative runs) the drafts verified and kept per round."""

    tokens: List[int]
    prefill_s: float
    decode_s: float
    prompt: str = ""  # the prompt's name: trials of one prompt are pooled by median
    trial: int = 0
    plain: Optional["Run"] = None  # a speculative run's plain run, made just before it
    prompt_tokens: int = 0
    proposal_lengths: List[int] = field(default_factory=list)
    accepted_lengths: List[int] = field(default_factory=list)
    declined: List[int] = field(default_factory=list)  # rounds whose proposal was made, then none of it verified
    host_s: float = 0.0
    graph_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time during generation (every thread)
    switches: int = 0  # context switches during generation (voluntary + involuntary)
    syncs: int = 0  # the loop's blocking reads of the device
    hand_offs: int = 0  # ... and graphs it queued without waiting
    time_scale: Optional[List[float]] = None  # automatic cap's learned round time over the cost model's


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Benchmark speculative decoding against plain decoding.")
    parser.add_argument("--model", required=True, help="The target model (local path or Hugging Face repo).")
    parser.add_argument("--draft-model", action="append", default=None,
                        help="The drafter (DSpark, DFlash, EAGLE3 or a lookup spec). Given several times: each "
                             "runs on the same target and they are reported side by side.")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", choices=[*PROMPTS, "all"], default="all", help="Built-in prompt set.")
    prompts.add_argument("--prompts-file", default=None, help='JSONL file of {"turns": [...]}; the first turn is used.')
    parser.add_argument("--num-prompts", type=int, default=None, help="Use at most this many prompts (of each built-in category).")
    parser.add_argument("--max-tokens", "-m", type=int, default=128, help="Tokens to generate per run.")
    parser.add_argument("--trials", type=int, default=1, help="Runs of each prompt (plain and speculative).")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    parser.add_argument("--top-p", type=float, default=0.0, help="Sampling top-p.")
    parser.add_argument("--top-k", type=int, default=0, help="Sampling top-k.")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p.")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (and the oracle's pattern).")
    parser.add_argument("--num-draft-tokens", type=int, default=None,
                        help="Fixed cap on drafts per round (default: automatic).")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--sweep-caps", action="store_true", help="Also run every fixed cap 0..max drafts.")
    sweep.add_argument("--caps", type=parse_caps, default=None,
                       help="Also run these fixed caps (comma-separated, e.g. 0,5,7): a sweep of the "
                            "candidates only, so more trials fit in the same time.")
    parser.add_argument("--draft-bits", default="4", help="Quantize the drafter on load ('none': stored precision).")
    parser.add_argument("--draft-lookup", nargs="?", const="ngram", default=None, metavar="SPEC",
                        help="Combine the drafter with lookup proposals (a spec like ngram:n=4,k=7).")
    parser.add_argument("--compare-lookup", nargs="?", const="ngram", action="append", default=None, metavar="SPEC",
                        help="Run lookup alone (--draft-model SPEC, default ngram), the drafter alone and both "
                             "combined, each against plain decoding, and report them side by side (repeatable: "
                             "several lookup settings; without --draft-model: lookup alone).")
    parser.add_argument("--oracle-acceptance", type=float, default=None,
                        help="Replace the drafter by an oracle right at each position with this probability.")
    parser.add_argument("--draft-block-size", type=int, default=None,
                        help="Effective drafter block (at most the trained one; the oracle's block, default 7).")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="Apply the tokenizer's chat template when it has one.")
    parser.add_argument("--context", type=int, default=None,
                        help="Lengthen every prompt to this many tokens (filler text before it): the long-context "
                             "case.  Each prompt is then prefilled once (all but its last token, reported as "
                             "'context prefill') and every run decodes from a copy of that cache, so a prompt's "
                             "paired runs happen back to back.")
    parser.add_argument("--drafter-contexts", type=parse_caps, default=None,
                        help="Also time one drafter round with these many positions cached (e.g. 64,4096), "
                             "against attention's own reads at those lengths.")
    kv = parser.add_argument_group("KV cache (mlx-lm's options, the same for the plain and the speculative runs)")
    kv.add_argument("--max-kv-size", type=int, default=None,
                    help="A rotating KV cache of this many positions (mlx-lm's --max-kv-size).")
    kv.add_argument("--kv-bits", type=int, default=None, help="Quantize the KV cache to this many bits.")
    kv.add_argument("--kv-group-size", type=int, default=64, help="Group size of the KV cache's quantization.")
    kv.add_argument("--quantized-kv-start", type=int, default=0,
                    help="Quantize the KV cache once it holds this many positions.")
    parser.add_argument("--cached-cost", action="store_true",
                        help="Reuse the cached cost model instead of measuring it again before the runs.")
    parser.add_argument("--json", default=None, help="Write all results to this JSON file.")
    parser.add_argument("--plot", default=None, help="Write a PNG plot of the speed-ups (needs matplotlib).")
    return parser


# ---------------------------------------------------------------- prompts


def read_prompts_file(path) -> List[Prompt]:
    """The first turn of each ``{"turns": [...]}`` line of a JSONL file."""
    path = Path(path)
    out = []
    # Split on "\n" only: str.splitlines() also splits on Unicode line
    # separators that JSON strings may contain (the arena-hard prompts do).
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e}).") from None
        turns = record.get("turns") if isinstance(record, dict) else None
        if not turns or not isinstance(turns[0], str):
            raise ValueError(f"{path}:{i + 1}: expected {{\"turns\": [\"...\", ...]}}")
        out.append(Prompt(f"{path.stem}-{len(out) + 1}", path.stem, turns[0]))
    return out


def load_prompts(args) -> List[Prompt]:
    """The prompts to run: the file's first ``--num-prompts``, or that many of
    each built-in category."""
    limit = args.num_prompts
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file)[:limit]
    else:
        names = list(PROMPTS) if args.prompts == "all" else [args.prompts]
        prompts = [Prompt(f"{c}-{i + 1}", c, t) for c in names for i, t in enumerate(PROMPTS[c][:limit])]
    if not prompts:
        raise ValueError("No prompts to run.")
    return prompts


def encode(tokenizer, text: str, chat_template: bool) -> List[int]:
    """Token ids of ``text``, in the chat template when asked and available."""
    if chat_template and getattr(tokenizer, "has_chat_template", False):
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def lengthen(tokenizer, prompt: List[int], context: int) -> List[int]:
    """``prompt`` after enough filler (the built-in prompts' text, repeated)
    to make ``context`` tokens: the long-context case."""
    missing = context - len(prompt)
    if missing <= 0:
        return prompt
    text = " ".join(t for texts in PROMPTS.values() for t in texts)
    piece = list(tokenizer.encode(text))
    filler = (piece * (missing // max(len(piece), 1) + 1))[:missing]
    return filler + prompt


# ---------------------------------------------------------------- runs


def parse_bits(value) -> Optional[int]:
    return None if value is None or str(value).lower() == "none" else int(value)


def make_drafter(args, model):
    """The drafter to benchmark: loaded, the oracle, or the oracle around it."""
    from mlx_lm_dspark.loader import load_drafter
    from mlx_lm_dspark.target import text_args

    from .oracle import OracleDrafter

    inner = None
    if args.draft_model:
        inner = load_drafter(args.draft_model, bits=parse_bits(args.draft_bits), block_size=args.draft_block_size,
                             lookup=getattr(args, "draft_lookup", None))
    if args.oracle_acceptance is None:
        if inner is None:
            raise ValueError("--draft-model is required (or --oracle-acceptance).")
        return inner
    settings = text_args(model) if inner is None else None
    return OracleDrafter(settings, acceptance=args.oracle_acceptance, confidence=args.oracle_acceptance,
                         block_size=args.draft_block_size or 7, inner=inner, seed=args.seed)


def _usage():
    """(process CPU seconds, context switches) so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_nvcsw + u.ru_nivcsw


def timed(generator, eos_ids) -> Run:
    """Consume a generator of (token, ...) and time it: prefill until the
    first token, generation from the first token to the last (with the CPU
    time and context switches in between)."""
    tokens = []
    start = time.perf_counter()
    first = last = start
    began = ended = _usage()
    try:
        for item in generator:
            now = time.perf_counter()
            token = int(item[0])
            if not tokens:
                first = now
                began = ended = _usage()
            else:
                ended = _usage()
            last = now
            tokens.append(token)
            if token in eos_ids:
                break
    finally:
        generator.close()
    return Run(tokens, prefill_s=first - start, decode_s=last - first,
               cpu_s=ended[0] - began[0], switches=ended[1] - began[1])


def cache_options(args, model) -> dict:
    """The KV-cache keywords of one run (a fresh rotating prompt cache for
    ``--max-kv-size``), given alike to plain and speculative decoding."""
    from mlx_lm.models.cache import make_prompt_cache

    options = {}
    if getattr(args, "max_kv_size", None) is not None:
        options["prompt_cache"] = make_prompt_cache(model, max_kv_size=args.max_kv_size)
    if getattr(args, "kv_bits", None) is not None:
        options.update(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                       quantized_kv_start=args.quantized_kv_start)
    return options


@dataclass
class Prefilled:
    """A prompt's cache after all but its last token (the target's entries,
    then the drafter's context), made once so that every run of the prompt
    decodes from a copy of it instead of prefilling the prompt again."""

    cache: list
    target_entries: int
    tokens: int  # the prompt tokens in the cache
    seconds: float

    def plain_cache(self) -> list:
        return copy.deepcopy(self.cache[: self.target_entries])

    def speculative_cache(self) -> list:
        return copy.deepcopy(self.cache)


def prefill_prompt(model, drafter, prompt: List[int], args) -> Prefilled:
    """Prefill ``prompt[:-1]`` into a target cache made as ``cache_options``
    makes it (rotating with --max-kv-size, quantized with --kv-bits) and the
    drafter's context, through the speculative loop's own prefill."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_dspark.speculative import KVQuantization, TokenHistory, prefill

    target = bind(drafter, model)
    target_cache = make_prompt_cache(model, max_kv_size=getattr(args, "max_kv_size", None))
    draft_cache = drafter.make_cache()
    kv = KVQuantization(getattr(args, "kv_bits", None), getattr(args, "kv_group_size", 64),
                        getattr(args, "quantized_kv_start", 0))
    began = time.perf_counter()
    if len(prompt) > 1:
        prefill(target, drafter, mx.array(prompt[:-1]), target_cache, draft_cache, 0, TokenHistory(None), kv)
        mx.eval([c.state for c in target_cache] + [c.state for c in draft_cache])
    seconds = time.perf_counter() - began
    mx.clear_cache()
    return Prefilled(target_cache + draft_cache, len(target_cache), max(len(prompt) - 1, 0), seconds)


def run_options(args, model, prefilled: Optional[Prefilled], side: str) -> dict:
    """``cache_options`` for one run, with a copy of the prompt's prefilled
    cache (``side``: "plain" takes the target's entries only)."""
    options = cache_options(args, model)
    if prefilled is not None:
        options["prompt_cache"] = prefilled.plain_cache() if side == "plain" else prefilled.speculative_cache()
        options["cached"] = prefilled.tokens
    return options


def run_plain(model, prompt: List[int], max_tokens: int, sampler, eos_ids, cached: int = 0, **cache_options) -> Run:
    """Plain decoding of ``prompt``, whose first ``cached`` tokens are
    already in ``prompt_cache`` (only the rest is fed)."""
    from mlx_lm.generate import generate_step

    fed = prompt[cached:]
    gen = generate_step(mx.array(fed), model, max_tokens=max_tokens, sampler=sampler, **cache_options)
    run = timed(gen, eos_ids)
    run.prompt_tokens = len(prompt)
    return run


def run_speculative(model, drafter, prompt: List[int], max_tokens: int, sampler, cap, eos_ids, cached: int = 0,
                    **cache_options) -> Run:
    fed = prompt[cached:]
    gen = speculative_generate_step(mx.array(fed), model, drafter, max_tokens=max_tokens,
                                    sampler=sampler, num_draft_tokens=cap, **cache_options)
    run = timed(gen, eos_ids)
    run.prompt_tokens = len(prompt)
    stats = last_stats(drafter)
    if stats is not None:
        run.proposal_lengths = list(stats.proposal_lengths)
        run.accepted_lengths = list(stats.accepted_lengths)
        run.declined = list(stats.declined)
        run.host_s = stats.host_seconds
        run.graph_s = stats.graph_seconds
        run.syncs, run.hand_offs = getattr(stats, "syncs", 0), getattr(stats, "hand_offs", 0)
        run.time_scale = list(stats.time_scale) if stats.time_scale is not None else None
    return run


def check_same(plain: Run, spec: Run, tokenizer, label: str) -> None:
    """Fail loudly, with where and how they differ, unless the tokens match."""
    a, b = plain.tokens, spec.tokens
    if a == b:
        return
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo, hi = max(0, i - 8), i + 8

    def show(tokens):
        try:
            text = repr(tokenizer.decode(tokens[lo:hi]))
        except Exception:  # a diff must never fail on decoding
            text = "?"
        return f"ids {tokens[lo:hi]} text {text}"

    raise OutputMismatch(
        f"Greedy speculative output differs from plain decoding for {label} at generated token {i} "
        f"(plain {len(a)} tokens, speculative {len(b)}), shown from token {lo}:\n"
        f"  plain:       {show(a)}\n"
        f"  speculative: {show(b)}"
    )


# ---------------------------------------------------------------- statistics


def acceptance(runs: List[Run], max_drafts: int):
    """Per draft slot k: kept / verified, and kept / reached (verified with
    every slot before it kept: what the automatic cap estimates per slot)."""
    rounds = [(n, a) for r in runs for n, a in zip(r.proposal_lengths, r.accepted_lengths)]
    by_position, conditional = [], []
    for k in range(1, max_drafts + 1):
        verified = sum(1 for n, _ in rounds if n >= k)
        reached = sum(1 for n, a in rounds if n >= k and a >= k - 1)
        kept = sum(1 for _, a in rounds if a >= k)
        by_position.append(kept / verified if verified else None)
        conditional.append(kept / reached if reached else None)
    return by_position, conditional


def seconds_per_token(run: Run) -> float:
    return run.decode_s / (len(run.tokens) - 1)


def paired(runs: List[Run]) -> List[Run]:
    """The speculative runs that have a plain run to compare with (and both
    more than one token, so both have a rate)."""
    return [r for r in runs if len(r.tokens) > 1 and r.plain is not None and len(r.plain.tokens) > 1]


def modelled_ms(cost, run: Run):
    """The cost model's (plain, speculative) time for a speculative run's
    tokens after the first: per round draft_ms + verify_ms[cap] at that
    round's context length (a declined proposal: draft_ms + verify_ms[0]),
    against verify_ms[0] per token over the same positions."""
    context = run.prompt_tokens
    declined = set(run.declined)
    plain_ms = spec_ms = 0.0
    for i, (n, a) in enumerate(zip(run.proposal_lengths, run.accepted_lengths)):
        at = cost.at(context)
        spec_ms += at.round_ms(min(n, cost.max_drafts)) + (at.draft_ms if i in declined else 0.0)
        plain_ms += (a + 1) * at.verify_ms[0]
        context += a + 1
    return plain_ms, spec_ms


def predicted_speedup(cost, runs: List[Run]) -> Optional[float]:
    """The cost model's speed-up for the rounds actually run (their caps,
    context lengths and accepted drafts)."""
    plain_ms = spec_ms = 0.0
    for r in runs:
        p, q = modelled_ms(cost, r)
        plain_ms, spec_ms = plain_ms + p, spec_ms + q
    return plain_ms / spec_ms if spec_ms > 0 else None


def time_over_model(cost, runs: List[Run]) -> Optional[List[float]]:
    """(plain, speculative) measured time over the cost model's: the paired
    plain runs over verify_ms[0] per token, the speculative runs over their
    rounds' modelled times (medians over runs).  Efficiency is about their
    ratio; each alone says how far this machine's speed during the runs was
    from the cost model's (and the loop's own overhead, for the second)."""
    plain, spec = [], []
    for r in paired(runs):
        p, q = modelled_ms(cost, r)
        if q > 0:
            spec.append(1000 * r.decode_s / q)
            plain.append(1000 * seconds_per_token(r.plain) * (len(r.tokens) - 1) / p)
    return [statistics.median(plain), statistics.median(spec)] if spec else None


def rate(runs: List[Run]) -> float:
    """Generated tokens per second after the first token: per prompt the
    median over its trials (a burst of machine noise slows single runs, by
    up to 2x on a shared CPU), then over prompts total tokens / total time."""
    by_prompt = {}
    for r in runs:
        if len(r.tokens) > 1:
            by_prompt.setdefault(r.prompt, []).append(r)
    tokens = seconds = 0.0
    for trials in by_prompt.values():
        n = sum(len(r.tokens) - 1 for r in trials) / len(trials)
        tokens += n
        seconds += n * statistics.median(seconds_per_token(r) for r in trials)
    return tokens / seconds if seconds > 0 else 0.0


def paired_speedup(runs: List[Run]) -> Optional[float]:
    """Speculative runs' speed-up over their plain runs: per prompt the
    median over trials of plain time per token over speculative time per
    token within each pair, then over prompts total plain time over total
    speculative time (each prompt's plain time: its tokens at its median
    plain time per token)."""
    by_prompt = {}
    for r in paired(runs):
        by_prompt.setdefault(r.prompt, []).append(r)
    plain_s = spec_s = 0.0
    for trials in by_prompt.values():
        tokens = sum(len(r.tokens) - 1 for r in trials) / len(trials)
        per_token = statistics.median(seconds_per_token(r.plain) for r in trials)
        plain_s += tokens * per_token
        spec_s += tokens * per_token * statistics.median(seconds_per_token(r) / seconds_per_token(r.plain)
                                                         for r in trials)
    return plain_s / spec_s if spec_s > 0 else None


def pair_quartiles(runs: List[Run]) -> Optional[List[float]]:
    """Lower and upper quartile of the runs' speed-ups over their own plain
    runs: how much single pairs scatter on this machine (the speed-up is
    the median of a prompt's pairs; differences well inside this spread
    need many more trials to tell apart)."""
    ratios = sorted(seconds_per_token(r.plain) / seconds_per_token(r) for r in paired(runs))
    if not ratios:
        return None
    return [ratios[(len(ratios) - 1) // 4], ratios[(3 * len(ratios)) // 4]]


def summarize_plain(runs: List[Run]) -> dict:
    steps = sum(len(r.tokens) - 1 for r in runs)
    return {
        "tokens_per_s": rate(runs),
        "prefill_ms": 1000 * sum(r.prefill_s for r in runs) / len(runs),
        "generated_tokens": sum(len(r.tokens) for r in runs),
        "runs": len(runs),
        "cpu_ms_per_token": 1000 * sum(r.cpu_s for r in runs) / steps if steps else None,
        "switches_per_token": sum(r.switches for r in runs) / steps if steps else None,
    }


def _mean_scale(runs: List[Run]) -> Optional[List[float]]:
    """The automatic cap's learned (undrafted, drafted) round time over the
    cost model's, averaged over runs (None with a fixed cap)."""
    learned = [r.time_scale for r in runs if r.time_scale is not None]
    return [sum(e[i] for e in learned) / len(learned) for i in range(2)] if learned else None


def summarize_speculative(runs: List[Run], cost, max_drafts: int, cap) -> dict:
    out = summarize_plain(runs)
    proposals = [n for r in runs for n in r.proposal_lengths]
    accepted = [a for r in runs for a in r.accepted_lengths]
    rounds = len(proposals)
    by_position, conditional = acceptance(runs, max_drafts)
    counts = {}
    for n in proposals:
        counts[str(n)] = counts.get(str(n), 0) + 1
    speedup = paired_speedup(runs)
    predicted = predicted_speedup(cost, runs) if cost is not None else None
    out.update(
        cap="auto" if cap is None else cap,
        speedup=speedup,
        pair_quartiles=pair_quartiles(runs),
        tau=(sum(accepted) + rounds) / rounds if rounds else None,
        rounds=rounds,
        drafted=sum(proposals),
        declined=sum(len(r.declined) for r in runs),
        accepted=sum(accepted),
        drafts_per_round=sum(proposals) / rounds if rounds else None,
        cap_counts=dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        acceptance_by_position=by_position,
        conditional_acceptance=conditional,
        predicted_speedup=predicted,
        efficiency=speedup / predicted if speedup is not None and predicted else None,
        time_over_model=time_over_model(cost, runs) if cost is not None else None,
        host_ms_per_round=1000 * sum(r.host_s for r in runs) / rounds if rounds else None,
        loop_ms_per_round=1000 * sum(r.host_s - r.graph_s for r in runs) / rounds if rounds else None,
        graph_ms_per_round=1000 * sum(r.graph_s for r in runs) / rounds if rounds else None,
        syncs_per_round=sum(r.syncs for r in runs) / rounds if rounds else None,
        hand_offs_per_round=sum(r.hand_offs for r in runs) / rounds if rounds else None,
        switches_per_round=sum(r.switches for r in runs) / rounds if rounds else None,
        cpu_ms_per_round=1000 * sum(r.cpu_s for r in runs) / rounds if rounds else None,
        learned_time_scale=_mean_scale(runs),
    )
    return out


def held_out_best_fixed(spec: Dict, main_key) -> Optional[dict]:
    """The automatic cap's speed-up over the best fixed cap with that cap
    chosen on one half of the trials and compared on the other, then the
    halves swapped (geometric mean of the two ratios).  The best of several
    speed-ups measured on the same runs that judge it wins partly by their
    noise (on this machine single pairs scatter by tens of percent), which
    biases an in-sample "auto vs best fixed" against any automatic cap."""
    fixed = [k for k in spec if k != "auto"]
    trials = sorted({r.trial for r in spec.get("auto", [])})
    if main_key != "auto" or not fixed or len(trials) < 2:
        return None
    halves = (set(trials[0::2]), set(trials[1::2]))

    def speedup(k, half):
        return paired_speedup([r for r in spec[k] if r.trial in half])

    ratios, caps = [], []
    for pick, judge in (halves, halves[::-1]):
        best = max(fixed, key=lambda k: speedup(k, pick) or 0.0)
        auto, other = speedup("auto", judge), speedup(best, judge)
        if auto and other:
            ratios.append(auto / other)
            caps.append(best)
    if not ratios:
        return None
    return {"caps": caps, "ratio": math.prod(ratios) ** (1 / len(ratios))}


def summarize(plain: List[Run], spec: Dict, cost, max_drafts: int, main_key) -> dict:
    """Plain, main speculative configuration and sweep (if any) of a set of runs."""
    out = {"plain": summarize_plain(plain),
           "speculative": summarize_speculative(spec[main_key], cost, max_drafts, main_key)}
    sweep = {k: summarize_speculative(v, cost, max_drafts, k) for k, v in spec.items() if k != "auto"}
    if len(spec) > 1:
        out["sweep"] = {str(k): sweep[k] for k in sorted(sweep)}
        best = max(sweep, key=lambda k: sweep[k]["speedup"] or 0.0)
        out["best_fixed_cap"] = {"cap": best, "speedup": sweep[best]["speedup"],
                                 "held_out": held_out_best_fixed(spec, main_key)}
    return out


# ---------------------------------------------------------------- the drafter round against the context


def drafter_round_costs(target, drafter, contexts: List[int], reps: int = 15) -> Optional[dict]:
    """Per context length: one drafter round (two committed positions added,
    a full-block proposal, evaluated) and attention's own part of it (each
    layer's block queries against the context's and the block's keys), in
    ms, medians of interleaved repetitions.  A round whose cost grows with
    the context only by attention's reads grows by about as much as the
    latter.  None for drafters that are not DSpark/DFlash networks."""
    layers = getattr(drafter, "layers", None)
    if not layers or not hasattr(layers[0], "self_attn"):
        return None
    taps = len(drafter.target_layer_ids)
    H, B = drafter.args.hidden_size, drafter.block_size
    dtype = drafter.hidden_norm.weight.dtype  # the drafter's compute dtype (norms are never quantized)
    anchor, pair = mx.array([1], dtype=mx.uint32), mx.array([1, 1], dtype=mx.uint32)
    new = mx.random.normal((1, 2, taps * H), key=mx.random.key(1)).astype(dtype)
    setups = []
    for n in contexts:
        cache = drafter.make_cache()
        drafter.add_context(cache, mx.random.normal((1, n, taps * H), key=mx.random.key(n)).astype(dtype), 0)
        mx.eval([c.state for c in cache])
        attention = []
        for layer in layers:
            a = layer.self_attn
            q = mx.random.normal((1, a.n_heads, B, a.head_dim)).astype(dtype)
            k = mx.random.normal((1, a.n_kv_heads, n + 2 + B, a.head_dim)).astype(dtype)
            attention.append((q, k, a.scale))
        mx.eval([x for q, k, _ in attention for x in (q, k)])
        setups.append((n, cache, attention))

    def one_round(n, cache):
        began = time.perf_counter()
        drafter.add_context(cache, new, n, pair)
        mx.eval([x for x in drafter.propose(cache, anchor, n + 2, drafter.max_drafts) if x is not None])
        elapsed = time.perf_counter() - began
        for c in cache:
            c.trim(2)
        return elapsed

    def reads(attention):
        began = time.perf_counter()
        mx.eval([mx.fast.scaled_dot_product_attention(q, k, k, scale=scale) for q, k, scale in attention])
        return time.perf_counter() - began

    times = {n: ([], []) for n in contexts}
    for rep_ in range(reps + 1):
        for n, cache, attention in setups:
            r, a = one_round(n, cache), reads(attention)
            if rep_:  # the first is a warm-up
                times[n][0].append(1000 * r)
                times[n][1].append(1000 * a)
    return {str(n): {"round_ms": statistics.median(r), "attention_ms": statistics.median(a)}
            for n, (r, a) in times.items()}


# ---------------------------------------------------------------- the benchmark


def parse_caps(value: str) -> List[int]:
    """``--caps``: comma-separated fixed caps, each at least 0."""
    try:
        caps = [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,7, got {value!r}") from None
    if not caps or min(caps) < 0:
        raise argparse.ArgumentTypeError(f"expected caps of at least 0 such as 0,5,7, got {value!r}")
    return sorted(set(caps))


def configurations(args, max_drafts: int) -> list:
    """Caps to run: the main one (None = automatic) first, then the sweep
    (every cap with --sweep-caps, or those of --caps)."""
    main_cap = args.num_draft_tokens
    caps = [main_cap]
    chosen = getattr(args, "caps", None)
    if chosen and max(chosen) > max_drafts:
        raise ValueError(f"--caps {','.join(map(str, chosen))}: this drafter drafts at most {max_drafts} "
                         f"tokens a round; give caps from 0 to {max_drafts}.")
    if args.sweep_caps:
        caps += [c for c in range(max_drafts + 1) if c != main_cap]
    elif chosen:
        caps += [c for c in chosen if c != main_cap]
    return caps


def benchmark(model, tokenizer, drafter, prompts: List[Prompt], args, progress=True) -> dict:
    """Run every prompt, trial and cap; return the results (see the module docstring)."""
    from mlx_lm.sample_utils import make_sampler
    from tqdm import tqdm

    sampler = make_sampler(args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k)
    greedy = args.temp == 0
    eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    oracle = hasattr(drafter, "set_continuation")
    max_drafts = drafter.max_drafts
    caps = configurations(args, max_drafts)
    key = lambda cap: "auto" if cap is None else cap  # noqa: E731

    for p in prompts:
        p.tokens = encode(tokenizer, p.text, args.chat_template)
        if getattr(args, "context", None):
            p.tokens = lengthen(tokenizer, p.tokens, args.context)
    # Measured now (outside the timings) unless told to reuse the cached one,
    # and again between the runs for the predictions: this machine's speed
    # changes over minutes, and the predictions must see it as the runs did.
    target = bind(drafter, model)
    cost_sampler = None
    if args.cached_cost:
        cost = cost_model(drafter, target)
    else:
        cost_sampler = costs.extend(costs.Sampler(target, drafter))
        cost = cost_model(drafter, target, measured=cost_sampler.model())
    started, sampling_s = time.perf_counter(), 0.0

    # With --context each prompt is prefilled once and every run decodes
    # from a copy of its cache: re-prefilling a long prompt per run would put
    # tens of seconds, and the machine's drift over them, between the paired runs.
    once = bool(getattr(args, "context", None))
    prefilled = {}

    def prefilled_for(p):
        if not once:
            return None
        if p.name not in prefilled:
            prefilled.clear()  # one prompt's cache at a time
            prefilled[p.name] = prefill_prompt(model, drafter, p.tokens, args)
            if progress:
                print(f"{p.name}: prefilled {len(p.tokens) - 1} tokens in {prefilled[p.name].seconds:.1f} s",
                      file=sys.stderr)
        return prefilled[p.name]

    # Warm up both paths once.
    first = prompts[0].tokens
    ready = prefilled_for(prompts[0])
    warm = run_plain(model, first, min(WARMUP_TOKENS, args.max_tokens), sampler, eos_ids,
                     **run_options(args, model, ready, "plain"))
    if oracle:
        drafter.set_continuation(first + warm.tokens)
    run_speculative(model, drafter, first, min(WARMUP_TOKENS, args.max_tokens), sampler, caps[0], eos_ids,
                    **run_options(args, model, ready, "speculative"))
    context_prefill_s = {}

    runs = {p.name: ([], {key(c): [] for c in caps}) for p in prompts}
    total = len(prompts) * args.trials * 2 * len(caps)
    with tqdm(total=total, desc="benchmark", unit="run", disable=not progress, file=sys.stderr) as bar:
        for p in prompts:
            plain_runs, spec_runs = runs[p.name]
            ready = prefilled_for(p)
            if ready is not None:
                context_prefill_s[p.name] = ready.seconds
            for trial in range(args.trials):
                # Each trial starts at another configuration, so a slow phase
                # of the machine does not always land on the same one.
                shift = trial % len(caps)
                for cap in caps[shift:] + caps[:shift]:
                    plain = run_plain(model, p.tokens, args.max_tokens, sampler, eos_ids,
                                      **run_options(args, model, ready, "plain"))
                    plain.prompt, plain.trial = p.name, trial
                    plain_runs.append(plain)
                    bar.update()
                    if oracle:
                        drafter.set_continuation(p.tokens + plain.tokens, trial)
                    spec = run_speculative(model, drafter, p.tokens, args.max_tokens, sampler, cap, eos_ids,
                                           **run_options(args, model, ready, "speculative"))
                    spec.prompt, spec.plain, spec.trial = p.name, plain, trial
                    if greedy:
                        check_same(plain, spec, tokenizer, f"prompt {p.name!r} (cap {key(cap)}, trial {trial + 1})")
                    spec_runs[key(cap)].append(spec)
                    bar.update()
                mx.clear_cache()
                if cost_sampler is not None and sampling_s < COST_SHARE * (time.perf_counter() - started):
                    sampling_s += cost_sampler.take()

    main_key = key(caps[0])
    results = {"cost_model": asdict(cost), "prompts": []}
    if cost_sampler is not None:
        results["cost_model_at_start"] = results["cost_model"]
        cost = cost_sampler.model()
        results["cost_model"] = asdict(cost)
        results["cost_repetitions"] = cost_sampler.repetitions
    for p in prompts:
        plain_runs, spec_runs = runs[p.name]
        entry = {"name": p.name, "category": p.category, "prompt_tokens": len(p.tokens)}
        if p.name in context_prefill_s:
            entry["context_prefill_ms"] = 1000 * context_prefill_s[p.name]
        entry.update(summarize(plain_runs, spec_runs, cost, max_drafts, main_key))
        results["prompts"].append(entry)

    def pooled(names):
        plain = [r for n in names for r in runs[n][0]]
        spec = {key(c): [r for n in names for r in runs[n][1][key(c)]] for c in caps}
        return summarize(plain, spec, cost, max_drafts, main_key)

    categories = list(dict.fromkeys(p.category for p in prompts))
    results["by_category"] = {c: pooled([p.name for p in prompts if p.category == c]) for c in categories}
    results["overall"] = pooled([p.name for p in prompts])
    results["greedy_checked"] = greedy
    results["prefilled_once"] = once
    if getattr(args, "drafter_contexts", None):
        results["drafter_round"] = drafter_round_costs(target, getattr(drafter, "inner", None) or drafter,
                                                       args.drafter_contexts)
    return results


# ---------------------------------------------------------------- report


def _num(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _acceptance_cells(values) -> str:
    return " ".join("  - " if v is None else f"{v:.2f}" for v in values)


def _spread(quartiles) -> str:
    return "-" if not quartiles else f"{quartiles[0]:.2f}-{quartiles[1]:.2f}"


def format_report(results: dict) -> str:
    """The results as readable tables."""
    lines = []
    config = results.get("config", {})
    if config:
        drafter = config.get("draft_model") or "-"
        if config.get("oracle_acceptance") is not None:
            drafter = f"oracle F={config['oracle_acceptance']}" + (f" around {config['draft_model']}"
                                                                   if config.get("draft_model") else "")
        lines.append(f"target {config.get('model')}, drafter {drafter}, {config.get('max_tokens')} tokens, "
                     f"{config.get('trials')} trial(s), temp {config.get('temp')}, "
                     f"cap {config.get('num_draft_tokens') or 'auto'}, device {config.get('device')}")
        kv = [f"rotating, max_kv_size {config['max_kv_size']}"] if config.get("max_kv_size") is not None else []
        if config.get("kv_bits") is not None:
            kv.append(f"{config['kv_bits']}-bit (group {config.get('kv_group_size')}) "
                      f"from position {config.get('quantized_kv_start')}")
        if kv:
            lines.append("KV cache: " + ", ".join(kv))
    cost = results["cost_model"]
    spread = results.get("cost_repetitions")
    lines.append(f"cost model{f' ({spread} repetitions before and between the runs)' if spread else ''} "
                 f"at {cost.get('context', 0)} cached positions: draft {cost['draft_ms']:.2f} ms/round; "
                 f"verify ms by width 1..{len(cost['verify_ms'])}: " + " ".join(f"{v:.2f}" for v in cost["verify_ms"]))
    if cost.get("verify_ms_per_position"):
        lines.append(f"  growth per 100 more positions: draft {100 * cost['draft_ms_per_position']:.2f} ms; verify ms "
                     "by width: " + " ".join(f"{100 * v:.2f}" for v in cost["verify_ms_per_position"]))
    if results.get("prefilled_once"):
        lines.append("prompts prefilled once (all but the last token), every run decoding from a copy: context "
                     "prefill ms " + ", ".join(f"{e['name']} {e['context_prefill_ms']:.0f}" for e in results["prompts"]
                                               if "context_prefill_ms" in e)
                     + "; the column below is the last token's")
    header = (f"{'prompt':<16}{'prefill ms':>11}{'plain tok/s':>12}{'spec tok/s':>11}{'speedup':>8}{'pairs q1-q3':>13}{'τ':>6}"
              f"{'drafts/rd':>10}{'pred':>7}{'eff':>6}{'host ms/rd':>11}{'loop ms/rd':>11}  acceptance by position")
    lines += ["", header, "-" * len(header)]

    def row(name, s):
        p, q = s["plain"], s["speculative"]
        return (f"{name:<16}{p['prefill_ms']:>11.1f}{p['tokens_per_s']:>12.1f}{q['tokens_per_s']:>11.1f}"
                f"{_num(q['speedup'], '{:.2f}x'):>8}{_spread(q.get('pair_quartiles')):>13}"
                f"{_num(q['tau']):>6}{_num(q['drafts_per_round']):>10}"
                f"{_num(q['predicted_speedup'], '{:.2f}x'):>7}{_num(q['efficiency']):>6}"
                f"{_num(q['host_ms_per_round']):>11}{_num(q.get('loop_ms_per_round')):>11}  "
                f"{_acceptance_cells(q['acceptance_by_position'])}")

    for entry in results["prompts"]:
        lines.append(row(entry["name"], entry))
    lines.append("-" * len(header))
    if len(results["by_category"]) > 1:
        for name, s in results["by_category"].items():
            lines.append(row(name, s))
    lines.append(row("overall", results["overall"]))
    lines += ["", "per round (speculative) and per token (plain): host ms = graph building + loop; syncs = blocking "
              "reads of the device, hand-offs = graphs queued without waiting; switches = context switches "
              "(process); cpu = process CPU ms (all threads)",
              f"{'':<16}{'host ms':>8}{'graph':>7}{'loop':>7}{'syncs':>7}{'hand-offs':>10}{'switches':>9}"
              f"{'cpu ms':>8}   plain/token:{'switches':>9}{'cpu ms':>8}"]

    def per_round(name, s):
        p, q = s["plain"], s["speculative"]
        return (f"{name:<16}{_num(q['host_ms_per_round']):>8}{_num(q.get('graph_ms_per_round')):>7}"
                f"{_num(q.get('loop_ms_per_round')):>7}{_num(q.get('syncs_per_round')):>7}"
                f"{_num(q.get('hand_offs_per_round')):>10}{_num(q.get('switches_per_round'), '{:.0f}'):>9}"
                f"{_num(q.get('cpu_ms_per_round')):>8}   {'':>12}{_num(p.get('switches_per_token'), '{:.0f}'):>9}"
                f"{_num(p.get('cpu_ms_per_token')):>8}")

    lines.append(per_round("overall", results["overall"]))
    for c, s in results["overall"].get("sweep", {}).items():
        lines.append(per_round(f"cap {c}", {"plain": results["overall"]["plain"], "speculative": s}))
    drafter_round = results.get("drafter_round")
    if drafter_round:
        lines.append("")
        lines.append("drafter round (2 positions added + full-block proposal) by cached positions: " + "; ".join(
            f"{n}: {v['round_ms']:.3f} ms (attention reads {v['attention_ms']:.3f} ms)" for n, v in drafter_round.items()))
        (a, low), (b, high) = list(drafter_round.items())[0], list(drafter_round.items())[-1]
        lines.append(f"  {a} -> {b}: round +{high['round_ms'] - low['round_ms']:.3f} ms, attention reads "
                     f"+{high['attention_ms'] - low['attention_ms']:.3f} ms")
    scale = results["overall"]["speculative"].get("learned_time_scale")
    if scale:
        lines.append(f"automatic cap learned round time over the cost model's: x{scale[0]:.2f} undrafted, "
                     f"x{scale[1]:.2f} drafted")

    if "sweep" in results["overall"]:
        caps = list(results["overall"]["sweep"])
        main = results["overall"]["speculative"]["cap"]
        head = (f"{'speed-up':<16}{str(main):>8}" + "".join(f"{'cap ' + c:>8}" for c in caps)
                + f"   {'best fixed':<12}{'vs best':>9}{'held out':>10}")
        lines += ["", head, "-" * len(head)]
        groups = dict(results["by_category"])
        groups["overall"] = results["overall"]
        for name, s in groups.items():
            cells = "".join(f"{_num(s['sweep'][c]['speedup'], '{:.2f}x'):>8}" for c in caps)
            best, main_speedup = s["best_fixed_cap"], s["speculative"]["speedup"]
            versus = main_speedup / best["speedup"] - 1 if main_speedup and best["speedup"] else None
            held = best.get("held_out")
            lines.append(f"{name:<16}{_num(main_speedup, '{:.2f}x'):>8}{cells}"
                         f"   {str(best['cap']) + ' (' + _num(best['speedup'], '{:.2f}x') + ')':<12}"
                         f"{_num(versus, '{:+.1%}'):>9}{_num(held and held['ratio'] - 1, '{:+.1%}'):>10}")
        overall = results["overall"]
        for label, field_name, fmt in (("τ", "tau", "{:.2f}"), ("pred.", "predicted_speedup", "{:.2f}x"),
                                       ("eff.", "efficiency", "{:.2f}")):
            cells = "".join(f"{_num(overall['sweep'][c][field_name], fmt):>8}" for c in caps)
            lines.append(f"{'overall ' + label:<16}{_num(overall['speculative'][field_name], fmt):>8}{cells}")
    return "\n".join(lines)


def import_pyplot():
    """matplotlib's pyplot (headless), or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plot(results: dict, path, plt) -> None:
    """Speed-up vs fixed cap per category (with the main cap dashed) when
    swept, else measured and predicted speed-up per prompt."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = dict(results["by_category"])
    if "sweep" in results["overall"]:
        groups["overall"] = results["overall"]
        for i, (name, s) in enumerate(groups.items()):
            caps = [int(c) for c in s["sweep"]]
            line, = ax.plot(caps, [s["sweep"][str(c)]["speedup"] for c in caps], marker="o", label=name)
            ax.axhline(s["speculative"]["speedup"], color=line.get_color(), linestyle="--", linewidth=1)
        ax.set_xlabel("fixed draft cap (dashed: automatic cap)")
    else:
        names = [e["name"] for e in results["prompts"]]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [e["speculative"]["speedup"] or 0 for e in results["prompts"]], 0.4,
               label="measured")
        ax.bar([i + 0.2 for i in x], [e["speculative"]["predicted_speedup"] or 0 for e in results["prompts"]], 0.4,
               label="predicted")
        ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel("speed-up over plain decoding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(parser, argv=None):
    """The options, with ``draft_model`` one path (or None) as a single run
    takes it and ``draft_models`` every ``--draft-model`` given."""
    args = parser.parse_args(argv)
    args.draft_models = args.draft_model or []
    args.draft_model = args.draft_models[0] if args.draft_models else None
    return args


def run(argv=None) -> dict:
    """Parse ``argv``, run the benchmark, print and write the report; return the results."""
    parser = setup_arg_parser()
    args = parse_args(parser, argv)
    if args.trials < 1 or args.max_tokens < 1:
        parser.error("--trials and --max-tokens must be at least 1")
    if args.num_draft_tokens is not None and args.num_draft_tokens < 0:
        parser.error("--num-draft-tokens must be >= 0")
    if args.max_kv_size is not None and args.max_kv_size < 1:
        parser.error("--max-kv-size must be at least 1")
    if args.draft_model is None and args.oracle_acceptance is None and not args.compare_lookup:
        parser.error("--draft-model is required (or --oracle-acceptance for an oracle drafter, or --compare-lookup "
                     "for lookup alone)")
    if len(args.draft_models) > 1 and args.compare_lookup:
        parser.error("--compare-lookup compares one drafter with lookup: give a single --draft-model "
                     "(or give lookup as one of several --draft-model, e.g. --draft-model ngram)")
    if args.oracle_acceptance is not None and args.temp > 0:
        print("--oracle-acceptance drafts the plain run's tokens: with sampling the speculative run leaves "
              "them, so acceptance falls below F.", file=sys.stderr)
    plt = None
    if args.plot:
        plt = import_pyplot()
        if plt is None:
            print(f"--plot {args.plot}: matplotlib is not installed (pip install matplotlib); "
                  "running the benchmark without the plot.", file=sys.stderr)

    import mlx_lm

    mx.random.seed(args.seed)
    model, tokenizer = mlx_lm.load(args.model)
    if len(args.draft_models) > 1:
        drafters = drafter_variants(args, model)
        prompts = load_prompts(args)
        for drafter in drafters.values():
            check_caps(parser, args, drafter)
        return compare(model, tokenizer, drafters, prompts, args)
    drafter = make_drafter(args, model) if args.draft_model or args.oracle_acceptance is not None else None
    prompts = load_prompts(args)
    try:
        for spec in args.compare_lookup or ():
            parse_lookup(spec)
    except ValueError as e:
        parser.error(str(e))
    if drafter is not None:
        check_caps(parser, args, drafter)
    if args.compare_lookup:
        return compare_lookup(model, tokenizer, drafter, prompts, args)
    results = benchmark(model, tokenizer, drafter, prompts, args)
    results = {
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            "num_draft_tokens": args.num_draft_tokens if args.num_draft_tokens is not None else "auto",
            "max_drafts": drafter.max_drafts,
            "drafter_kind": getattr(drafter, "kind", None),
            "mlx": mx.__version__,
            "mlx_lm": getattr(mlx_lm, "__version__", None),
            "device": str(mx.default_device()),
        },
        **results,
    }
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    if plt is not None:
        write_plot(results, args.plot, plt)
        print(f"wrote {args.plot}")
    return results


def check_caps(parser, args, drafter) -> None:
    """--caps beyond the drafter's block: say so, no traceback."""
    try:
        configurations(args, drafter.max_drafts)
    except ValueError as e:
        parser.error(str(e))


# ---------------------------------------------------------------- variants side by side


def drafter_variants(args, model) -> Dict[str, object]:
    """Every ``--draft-model``, loaded as a single run loads it, named by
    its order and kind ("1:dspark", "2:eagle3", ...)."""
    variants = {}
    for i, path in enumerate(args.draft_models, 1):
        drafter = make_drafter(argparse.Namespace(**{**vars(args), "draft_model": path}), model)
        if getattr(drafter, "source", None) is None:
            drafter.source = path
        variants[f"{i}:{getattr(drafter, 'kind', None) or 'drafter'}"] = drafter
    return variants


def compare(model, tokenizer, variants: Dict[str, object], prompts: List[Prompt], args, base=None) -> dict:
    """Benchmark each variant against plain decoding; print their report
    side by side, speed-ups also over ``base`` (default: the first), and
    write it with --json."""
    base = base or next(iter(variants))
    results = {"config": {**{k: v for k, v in vars(args).items() if k not in ("json", "plot", "draft_models")},
                          "draft_model": args.draft_models if len(args.draft_models) > 1 else args.draft_model,
                          "device": str(mx.default_device())},
               "base": base, "variants": {}}
    for name, variant in variants.items():
        print(f"-- {name}: {getattr(variant, 'source', getattr(variant, 'kind', name))}", file=sys.stderr)
        results["variants"][name] = {
            "draft_model": str(getattr(variant, "source", None) or name),
            "drafter_kind": getattr(variant, "kind", None),
            "max_drafts": variant.max_drafts,
            **benchmark(model, tokenizer, variant, prompts, args),
        }
    print(format_variants_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


def format_variants_report(results: dict) -> str:
    """Per category and variant: τ, speed-up over plain decoding (paired
    runs) and over the base variant (the ratio of the two paired
    speed-ups), the cost per round (the cost model's full proposal and
    verification of it, and the measured speculative round), and
    acceptance by position."""
    variants, base = results["variants"], results.get("base")
    width = max(10, *(len(name) + 2 for name in variants))
    versus = f"vs {base}" if base else "vs base"
    header = (f"{'category':<10}{'proposer':<{width}}{'plain tok/s':>12}{'spec tok/s':>11}{'τ':>6}{'drafts/rd':>10}"
              f"{'speedup':>9}{versus:>12}{'draft ms':>9}{'verify ms':>10}{'ms/round':>9}  acceptance by position")
    lines = [header, "-" * len(header)]
    groups = list(next(iter(variants.values()))["by_category"]) + ["overall"]
    for group in groups:
        def of(name):
            r = variants[name]
            return r["overall"] if group == "overall" else r["by_category"][group]

        base_speedup = of(base)["speculative"]["speedup"] if base in variants else None
        for name in variants:
            s, cost = of(name), variants[name]["cost_model"]
            p, q = s["plain"], s["speculative"]
            ratio = q["speedup"] / base_speedup if q["speedup"] and base_speedup else None
            round_ms = 1000 * q["tau"] / q["tokens_per_s"] if q["tau"] and q["tokens_per_s"] else None
            lines.append(f"{group:<10}{name:<{width}}{p['tokens_per_s']:>12.1f}{q['tokens_per_s']:>11.1f}"
                         f"{_num(q['tau']):>6}{_num(q['drafts_per_round']):>10}{_num(q['speedup'], '{:.2f}x'):>9}"
                         f"{_num(ratio, '{:.2f}x'):>12}{_num(cost['draft_ms']):>9}{_num(cost['verify_ms'][-1]):>10}"
                         f"{_num(round_ms):>9}  {_acceptance_cells(q['acceptance_by_position'])}")
    lines += [f"{name}: {v['draft_model']}" for name, v in variants.items() if v.get("draft_model") not in (None, name)]
    return "\n".join(lines)


def parse_lookup(spec: str):
    """The settings of a --compare-lookup value (``ValueError`` saying what is wrong)."""
    from mlx_lm_dspark.lookup import parse_spec

    settings = parse_spec(spec)
    if settings is None:
        raise ValueError(f"--compare-lookup {spec}: not a lookup specification (ngram, ngram:n=4,min=2,k=8).")
    return settings


def lookup_variants(drafter, specs) -> Dict[str, object]:
    """The proposers ``--compare-lookup`` runs: lookup alone, the drafter
    alone (when there is one), and the drafter combined with lookup; with
    several ``specs``, each named by its settings."""
    from mlx_lm_dspark.loader import load_lookup, with_lookup
    from mlx_lm_dspark.lookup import spec_of

    specs = [specs] if isinstance(specs, str) else list(specs)

    def name(kind, variant):
        return kind if len(specs) == 1 else f"{kind} {spec_of(variant.settings).partition(':')[2]}"

    alone = [load_lookup(spec) for spec in specs]
    variants = {name("lookup", v): v for v in alone}
    if drafter is not None:
        variants["drafter"] = drafter
        combined = [with_lookup(drafter, spec) for spec in specs]
        variants.update({name("combined", v): v for v in combined})
    return variants


def compare_lookup(model, tokenizer, drafter, prompts: List[Prompt], args) -> dict:
    """``compare`` for each of ``lookup_variants``, against the drafter alone."""
    return compare(model, tokenizer, lookup_variants(drafter, args.compare_lookup), prompts, args, base="drafter")


def main(argv=None) -> None:
    run(argv)  # a console script's main must not return the results (sys.exit would print them)


if __name__ == "__main__":
    main()
