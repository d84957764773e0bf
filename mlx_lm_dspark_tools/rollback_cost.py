"""What rolling back recurrent state costs, per design, on random hybrid targets.

For each family it times, paired in one loop (every repetition runs each
piece once, in turn): a plain one-token step and a verify of ``width`` tokens
through the bare host model (no recording), the same through the target
adapter under each rollback design, and the rollback itself from ``width``
tokens back to ``kept`` ones (evaluated).  The overhead of a round is the
design's verify beyond the bare verify plus its rollback; it is printed in
milliseconds and as shares of a plain step and of a bare verify.  The verify's
extra is the median of each repetition's difference (paired: both verifies ran
in the same repetition), with its quartiles, so drift across repetitions
cancels.

    python -m mlx_lm_dspark_tools.rollback_cost --shape tiny --width 8 --reps 30
"""

import argparse
import statistics
import time

import mlx.core as mx

from mlx_lm_dspark import recurrent
from mlx_lm_dspark.target import TargetAdapter, rollback
from mlx_lm_dspark_tools.tiny import HYBRID_MODEL_TYPES, make_hybrid_target

# "tiny": the tests' models; "medium": Qwen3.5-like proportions at 1/4 width
# (head dims 128, as the released checkpoints), a few layers.
SHAPES = {
    "tiny": dict(kw={}, overrides={}),
    "medium": dict(
        kw=dict(vocab_size=8192, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=128,
                intermediate_size=3072),
        overrides=dict(linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=128,
                       linear_value_head_dim=128, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                       mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=128, block_ff_dim=3072),
    ),
}
DESIGNS = {"replay": recurrent.Replay, "stepwise": recurrent.Stepwise}


def _reset(cache, snapshot, length):
    """Back to the prefilled context (KV entries trimmed, recurrent arrays restored)."""
    for c, state in zip(cache, snapshot):
        if recurrent.is_recurrent(c):
            recurrent.restore(c, state)
        else:
            c.trim(c.offset - length)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def measure(family, shape, width, kept, reps, context=64):
    model, _ = make_hybrid_target(family, **SHAPES[shape]["kw"], overrides=SHAPES[shape]["overrides"])
    target = TargetAdapter(model, [1])
    cache = target.make_cache()
    vocab = target.vocab_size
    prompt = mx.random.randint(3, vocab, (1, context), key=mx.random.key(0)).astype(mx.uint32)
    model(prompt, cache=cache)
    mx.eval([c.state for c in cache])
    snapshot = [recurrent.state_of(c) if recurrent.is_recurrent(c) else None for c in cache]
    block = mx.random.randint(3, vocab, (1, width), key=mx.random.key(1)).astype(mx.uint32)
    one = block[:, :1]
    mx.eval(block)

    def bare(tokens):
        def run():
            mx.eval(model(tokens, cache=cache), [c.state for c in cache])
        return run

    def adapted(tokens):
        def run():
            logits, features = target(tokens, cache)
            mx.eval(logits, features, [c.state for c in cache])
        return run

    def back(n):
        def run():
            rollback(cache, n)
            mx.eval([c.state for c in cache])
        return run

    pieces = {"bare step": (None, bare(one)), "bare verify": (None, bare(block))}
    for name in DESIGNS:
        pieces[f"{name} step"] = (name, adapted(one))
        pieces[f"{name} verify"] = (name, adapted(block))
    samples = {k: [] for k in pieces}
    for name in DESIGNS:
        for a in kept:
            samples[f"{name} rollback to {a}"] = []
    for rep in range(reps + 2):  # two warm-up repetitions
        for key, (design, fn) in pieces.items():
            recurrent.use(DESIGNS.get(design, recurrent.Replay))
            _reset(cache, snapshot, context)
            t = _timed(fn)
            if rep >= 2:
                samples[key].append(t)
            if design is not None and key.endswith("verify"):
                for a in kept:
                    _reset(cache, snapshot, context)
                    adapted(block)()
                    t = _timed(back(width - a))
                    if rep >= 2:
                        samples[f"{design} rollback to {a}"].append(t)
    recurrent.use(recurrent.Replay)
    m = {k: statistics.median(v) for k, v in samples.items()}
    for name in DESIGNS:
        m[f"{name} verify extra"] = paired(samples[f"{name} verify"], samples["bare verify"])
    return m


def paired(a, b) -> tuple:
    """Median and quartiles of the per-repetition differences ``a - b``."""
    d = sorted(x - y for x, y in zip(a, b))
    if len(d) < 2:
        return d[0], d[0], d[0]
    q1, q2, q3 = statistics.quantiles(d, n=4, method="inclusive")
    return q2, q1, q3


def report(family, m, width, kept) -> list:
    step, verify = m["bare step"], m["bare verify"]
    lines = [f"{family}: plain step {step:.2f} ms, verify of {width} {verify:.2f} ms (bare host model)"]
    for name in DESIGNS:
        extra_verify, q1, q3 = m[f"{name} verify extra"]
        for a in kept:
            overhead = extra_verify + m[f"{name} rollback to {a}"]
            lines.append(
                f"  {name:8s} keep {a:2d}: verify {extra_verify:+6.2f} ms ({q1:+.2f}..{q3:+.2f}), rollback {m[f'{name} rollback to {a}']:6.2f} ms"
                f" -> {overhead:6.2f} ms/round = {overhead / step:5.2f} plain steps, {overhead / verify:6.1%} of a verify"
            )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Time recurrent-state rollback designs on random hybrid targets.")
    parser.add_argument("--families", default=",".join(HYBRID_MODEL_TYPES))
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--width", type=int, default=8, help="verify width (anchor + drafts)")
    parser.add_argument("--kept", default=None, help="tokens kept after the rollback, comma-separated")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    kept = [int(x) for x in args.kept.split(",")] if args.kept else sorted({1, args.width // 2, args.width - 1})
    for family in args.families.split(","):
        m = measure(family, args.shape, args.width, kept, args.reps)
        print("\n".join(report(family, m, args.width, kept)), flush=True)


if __name__ == "__main__":
    main()
