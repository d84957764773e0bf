"""The undrafted loop against plain decoding at a long context, with adjacent pairs.

    python scripts/long_context_loop.py CONTEXT TRIALS TOKENS   (e.g. 8192 10 64)

Demo pair, the benchmark's first chat prompt lengthened to CONTEXT tokens.
It prefills once (target and drafter), then per trial runs plain
``generate_step``, the speculative loop at cap 0 and at the automatic cap
(the order rotating with the trial), each continuing the same prefilled
caches, trimmed back after each run: the runs of a trial follow each other
within a second or two, where the benchmark's pairs sit a whole prefill
apart.  Checks every output equals the first and that the automatic cap
proposed nothing; prints ms/token per side and each side's ratio to the
plain run of the same trial.
"""
import statistics
import sys
import time

import mlx.core as mx
import mlx_lm.generate  # noqa
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark.speculative import speculative_generate_step
from mlx_lm_dspark.session import last_stats
from mlx_lm_dspark_tools import benchmark as B

context, trials, tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model, tok = load("mlx_lm_dspark/demo_pair/target")
drafter = load_drafter("mlx_lm_dspark/demo_pair/drafter", bits=4)
prompt = B.lengthen(tok, B.encode(tok, B.PROMPTS["chat"][0], True), context)
pc = make_prompt_cache(model)
n = len(pc)
dc = drafter.make_cache()
full = pc + dc
t0 = time.perf_counter()
g = speculative_generate_step(mx.array(prompt[:-1]), model, drafter, prompt_cache=full, max_tokens=1, num_draft_tokens=0)
next(g); g.close()
print(f"prefill {time.perf_counter()-t0:.1f} s, offsets {pc[0].offset} {dc[0].offset}", flush=True)
base = len(prompt) - 1
def reset():
    for c in pc:
        c.trim(c.offset - base)
    for c in dc:
        c.trim(c.offset - base)
eos = set(tok.eos_token_ids)
last = mx.array(prompt[-1:])
def plain():
    return B.timed(generate_step(last, model, max_tokens=tokens, prompt_cache=pc), eos)
def spec(cap):
    return lambda: B.timed(speculative_generate_step(last, model, drafter, prompt_cache=full, max_tokens=tokens, num_draft_tokens=cap), eos)
kinds = {"plain": plain, "cap0": spec(0), "auto": spec(None)}
res = {k: [] for k in kinds}
ref = None
for t in range(trials + 1):
    order = list(kinds)[t % 3:] + list(kinds)[:t % 3]
    for k in order:
        reset()
        r = kinds[k]()
        if ref is None:
            ref = r.tokens
        assert r.tokens == ref, k
        if k == "auto":
            s = last_stats(drafter)
            assert sum(s.proposal_lengths) == 0 and not s.declined
        if t:
            res[k].append(1000 * B.seconds_per_token(r))
for k, v in res.items():
    print(f"{k}: ms/token median {statistics.median(v):.2f} min {min(v):.2f}  all {' '.join(f'{x:.2f}' for x in v)}")
for k in ("cap0", "auto"):
    ratios = sorted(p / s for p, s in zip(res["plain"], res[k]))
    print(f"{k} over plain (same trial): median {statistics.median(ratios):.3f} q {ratios[len(ratios)//4]:.3f}-{ratios[3*len(ratios)//4]:.3f}; min/min {min(res['plain'])/min(res[k]):.3f}")
