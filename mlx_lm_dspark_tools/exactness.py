"""Randomized exactness check: greedy speculative output against plain decoding.

Every case is drawn from one integer seed (``Case.draw``): the target
(family, flavour, sliding window, precision), the drafter (DSpark, DFlash,
their on-disk layouts, or an oracle right on a chosen fraction of
positions), lookup (n-gram) drafts instead of the drafter or combined with
it (then often on a prompt that repeats itself), the block and cap, the prompt and ``max_tokens``, an EOS inside
the run, a consumer that closes early, the KV-cache options mlx-lm offers
(``kv_bits`` / ``kv_group_size`` / ``quantized_kv_start``, rotating prompt
caches, ``max_kv_size``) and a second turn on the same cache.  The expected
tokens always come from running the plain target through mlx-lm's
``stream_generate`` with the same options and the same consumer; the case
is exact when every turn yields the same tokens and leaves the same number
of positions in the cache.

Tiny targets and drafters are built once per name in a session directory,
loaded once per process, and plain runs are cached by everything that
decides them, so thousands of cases reuse them.

    python -m mlx_lm_dspark_tools.exactness --seed 1234
    python -m mlx_lm_dspark_tools.exactness --seeds 0:2000
    python -m mlx_lm_dspark_tools.exactness --seeds 0:2000 --where lookup=alone

The first prints the case, and where it diverges the position, both tokens
and the plain top-2 logit margin there; a range prints a per-dimension
table (cases, divergences, refusals); ``--where DIMENSION=VALUE`` keeps
the cases with that value of a reported dimension.  A refusal is one of mlx-lm-dspark's
own errors raised before the first token; refusals are counted by name.
"""

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

FORMAT = 1  # bump when what a name builds changes (invalidates session directories)

HALF_PRECISIONS = ("bfloat16", "float16")
AFFINE_BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
MX_MODES = ("mxfp4", "mxfp8")
GEMMA4_WINDOWS = (2, 3, 4, 6, 8, 16)
DRAFTER_KINDS = ("oracle", "dspark", "dflash", "dspark-dflash_config", "zlab")
ACCEPTANCES = (0.0, 0.3, 0.6, 0.85, 1.0)
KV_BITS = (2, 3, 4, 6, 8)
ROTATING_KEEP = 4  # what make_prompt_cache(model, max_kv_size=W) keeps
ROTATING_KEEPS = (ROTATING_KEEP, ROTATING_KEEP, 0, 1, 7)  # a user's own RotatingKVCache(keep=...)
VOCAB_SIZE = 512
FIRST_ORDINARY_ID = 3  # ids below are <pad>, <eos>, <unk>

# Configurations a case can be in that are known to be hard to keep exact
# (issue 19); the test decides which of them it excludes.
TAGS = ("half-precision", "rotating-keep-wrapped", "max-kv-size", "kv-start-after-prefill")


def _weighted(rng: random.Random, table):
    """One key of ``table`` (key -> weight)."""
    r = rng.random() * sum(table.values())
    for key, weight in table.items():
        r -= weight
        if r < 0:
            return key
    return key


def _length(rng: random.Random, buckets):
    """A length from ((weight, low, high), ...): a bucket, then uniform in it."""
    low, high = _weighted(rng, {(lo, hi): w for w, lo, hi in buckets})
    return rng.randint(low, high)


PROMPT_LENGTHS = ((0.4, 1, 8), (0.35, 9, 48), (0.25, 49, 200))
MAX_TOKENS = ((0.55, 1, 8), (0.33, 9, 32), (0.10, 33, 100), (0.02, 101, 300))
SECOND_MAX_TOKENS = ((0.7, 1, 8), (0.3, 9, 32))
LOOKUPS = {None: 0.7, "alone": 0.15, "combined": 0.15}  # lookup drafts: none, instead of the drafter, or with it
LOOKUP_MAX_N = 5


@dataclass(frozen=True)
class Case:
    """One randomized generation, compared against plain decoding."""

    seed: int
    family: str  # "qwen3" or "gemma4"
    flavour: str  # the model_type: qwen3, gemma4, gemma4_text, gemma4_unified
    head_dim: int
    tied: bool
    window: Optional[int]  # Gemma-4 sliding window
    precision: str  # float32, bfloat16, float16, q{bits}g{group}, mxfp4, mxfp8
    drafter: str  # one of DRAFTER_KINDS
    drafter_bits: Optional[int]  # real drafters: quantized on load, or None
    acceptance: Optional[float]  # oracle: fraction of positions it gets right
    block: int  # effective block (drafts per round: block, zlab block - 1)
    cap: Optional[int]  # num_draft_tokens; None = the automatic cap
    prompt: Tuple[int, ...]
    max_tokens: int
    eos_pick: Optional[float]  # where in the plain run the EOS token is taken from
    close_after: Optional[int]  # the consumer closes after this many tokens
    kv_bits: Optional[int]
    kv_group_size: int
    quantized_kv_start: Optional[int]
    prompt_cache: Optional[str]  # None (stream_generate makes one), "target", "combined"
    rotating: Optional[int]  # prompt cache of RotatingKVCache(max_size=W, keep=rotating_keep)
    max_kv_size: Optional[int]  # passed to stream_generate
    second_prompt: Optional[Tuple[int, ...]]  # a second turn on the same cache
    second_max_tokens: Optional[int]
    rotating_keep: int = ROTATING_KEEP
    lookup: Optional[str] = None  # "alone" (``--draft-model ngram``: the drafter is unused) or "combined"
    lookup_spec: Optional[str] = None  # the lookup specification, e.g. "ngram:n=3,min=1,k=5"
    overrides: Tuple[str, ...] = ()  # "field=value" set after drawing (``--set``)

    @classmethod
    def draw(cls, seed: int) -> "Case":
        """The case of ``seed``: every dimension drawn from ``random.Random(seed)``."""
        rng = random.Random(seed)
        family = rng.choice(("qwen3", "gemma4"))
        if family == "qwen3":
            flavour, window, tied = "qwen3", None, rng.random() < 0.3
            head_dim = _weighted(rng, {32: 0.75, 64: 0.15, 128: 0.1})
        else:
            flavour = _weighted(rng, {"gemma4": 0.6, "gemma4_text": 0.2, "gemma4_unified": 0.2})
            window, tied, head_dim = rng.choice(GEMMA4_WINDOWS), True, 16
        kind = _weighted(rng, {"float32": 0.4, "half": 0.15, "affine": 0.35, "mx": 0.1})
        if kind == "float32":
            precision = "float32"
        elif kind == "half":
            precision = _weighted(rng, {"bfloat16": 0.6, "float16": 0.4})
        elif kind == "affine":
            precision = f"q{rng.choice(AFFINE_BITS)}g{rng.choice(GROUP_SIZES)}"
        else:
            precision = rng.choice(MX_MODES)
        drafter = _weighted(rng, {"oracle": 0.45, "dspark": 0.25, "dflash": 0.15,
                                  "dspark-dflash_config": 0.08, "zlab": 0.07})
        if drafter == "zlab" and family != "qwen3":
            drafter = "dspark"  # the zlab layout exists for Qwen3 drafters only
        drafter_bits = (4 if rng.random() < 0.3 else None) if drafter != "oracle" else None
        acceptance = rng.choice(ACCEPTANCES) if drafter == "oracle" else None
        block = rng.randint(2, 16)
        cap = None if rng.random() < 0.25 else rng.randint(0, block)
        prompt = tuple(rng.randrange(FIRST_ORDINARY_ID, VOCAB_SIZE) for _ in range(_length(rng, PROMPT_LENGTHS)))
        max_tokens = _length(rng, MAX_TOKENS)
        eos_pick = rng.random() if max_tokens >= 3 and rng.random() < 0.15 else None
        close_after = rng.randint(1, max_tokens - 1) if max_tokens >= 2 and rng.random() < 0.1 else None

        # KV options.  mlx-lm cannot quantize a rotating cache (Gemma-4's
        # sliding layers, or any cache made with a max_kv_size), so kv_bits
        # goes with Qwen3's plain caches only; Gemma-4 ignores max_kv_size.
        kv_bits, kv_group_size, kv_start, rotating, max_kv_size = None, 64, None, None, None
        rotating_keep = ROTATING_KEEP
        reach = len(prompt) + max_tokens
        mode = _weighted(rng, {"kv_bits": 0.25, "rotating": 0.1, "max_kv_size": 0.08, "plain": 0.57})
        if mode == "kv_bits" and family == "qwen3":
            kv_bits = rng.choice(KV_BITS)
            kv_group_size = rng.choice([g for g in GROUP_SIZES if head_dim % g == 0])
            where = _weighted(rng, {"zero": 0.2, "inside": 0.4, "after": 0.4})
            if where == "zero":
                kv_start = 0
            elif where == "inside":
                kv_start = rng.randint(1, len(prompt))
            else:
                kv_start = rng.randint(len(prompt) + 1, reach + 1)
        elif mode == "rotating" and family == "qwen3":
            rotating_keep = rng.choice(ROTATING_KEEPS)
            rotating = rng.randint(rotating_keep + 1, max(rotating_keep + 2, 2 * reach))
        elif mode == "max_kv_size":
            max_kv_size = rng.randint(ROTATING_KEEP + 1, max(ROTATING_KEEP + 2, 2 * reach))

        prompt_cache = None
        if max_kv_size is None:  # generate_step ignores max_kv_size when given a cache
            prompt_cache = _weighted(rng, {None: 0.4, "target": 0.35, "combined": 0.25})
            if rotating is not None and prompt_cache is None:
                prompt_cache = "target"
        second_prompt = second_max_tokens = None
        if prompt_cache is not None and rng.random() < 0.35:
            second_prompt = tuple(rng.randrange(FIRST_ORDINARY_ID, VOCAB_SIZE) for _ in range(rng.randint(1, 40)))
            second_max_tokens = _length(rng, SECOND_MAX_TOKENS)

        # Drawn last, so that every other dimension of a seed is what it was
        # before lookup was one.
        lookup, lookup_spec = _weighted(rng, LOOKUPS), None
        if lookup is not None:
            n = rng.randint(1, LOOKUP_MAX_N)
            lookup_spec = f"ngram:n={n},min={rng.randint(1, n)}"
            if lookup == "alone":
                lookup_spec += f",k={block}"  # drafts per round: the block, as for a drafter
            if len(prompt) >= 4 and rng.random() < 0.5:  # pasted and repeated: long matches
                period = rng.randint(1, len(prompt) // 2)
                prompt = (prompt[:period] * (len(prompt) // period + 1))[: len(prompt)]
        return cls(seed=seed, family=family, flavour=flavour, head_dim=head_dim, tied=tied, window=window,
                   precision=precision, drafter=drafter, drafter_bits=drafter_bits, acceptance=acceptance,
                   block=block, cap=cap, prompt=prompt, max_tokens=max_tokens, eos_pick=eos_pick,
                   close_after=close_after, kv_bits=kv_bits, kv_group_size=kv_group_size,
                   quantized_kv_start=kv_start, prompt_cache=prompt_cache, rotating=rotating,
                   max_kv_size=max_kv_size, second_prompt=second_prompt, second_max_tokens=second_max_tokens,
                   rotating_keep=rotating_keep, lookup=lookup, lookup_spec=lookup_spec)

    def with_overrides(self, overrides) -> "Case":
        """The case with fields set from "field=value" strings (values in
        JSON: ``max_tokens=200``, ``precision="bfloat16"``, ``window=3``)."""
        names = {f.name for f in fields(self)} - {"seed", "overrides"}
        changes = {}
        for item in overrides:
            name, _, value = item.partition("=")
            if name not in names:
                raise ValueError(f"--set {item}: no case field {name!r} (fields: {', '.join(sorted(names))})")
            try:
                changes[name] = json.loads(value)
            except ValueError:
                changes[name] = value  # a bare string: precision=bfloat16
            if isinstance(changes[name], list):
                changes[name] = tuple(changes[name])
        return replace(self, overrides=self.overrides + tuple(overrides), **changes)

    # What the case is ------------------------------------------------------

    @property
    def reach(self) -> int:
        """Most positions the target cache can hold by the end of the case."""
        n = len(self.prompt) + self.max_tokens
        if self.second_prompt is not None:
            n += len(self.second_prompt) + self.second_max_tokens
        return n

    @property
    def max_drafts(self) -> int:
        return self.block - 1 if self.drafter == "zlab" and self.lookup != "alone" else self.block

    def tags(self) -> set:
        """The configurations of TAGS this case is in."""
        tags = set()
        if self.precision in HALF_PRECISIONS:
            tags.add("half-precision")
        if self.rotating is not None and self.reach > self.rotating:
            tags.add("rotating-keep-wrapped")
        if self.max_kv_size is not None and self.family == "qwen3":
            tags.add("max-kv-size")
        if self.kv_bits is not None and len(self.prompt) < self.quantized_kv_start <= self.reach:
            tags.add("kv-start-after-prefill")
        return tags

    def target_name(self) -> str:
        tied = "-tied" if self.tied and self.family == "qwen3" else ""
        window = f"-w{self.window}" if self.window else ""
        return f"{self.flavour}-hd{self.head_dim}{tied}{window}"

    def describe(self) -> str:
        """The case on one line."""
        if self.lookup == "alone":
            drafter = f"lookup {self.lookup_spec}"
        elif self.drafter == "oracle":
            drafter = f"oracle(acceptance {self.acceptance})"
        else:
            drafter = f"{self.drafter}({'float' if self.drafter_bits is None else f'{self.drafter_bits}-bit'})"
        if self.lookup == "combined":
            drafter += f" + lookup {self.lookup_spec}"
        parts = [f"seed {self.seed}" + (f" (with {', '.join(self.overrides)})" if self.overrides else ""), f"{self.target_name()} {self.precision}", drafter, f"block {self.block}",
                 f"cap {'auto' if self.cap is None else self.cap}", f"prompt {len(self.prompt)}",
                 f"max_tokens {self.max_tokens}"]
        if self.eos_pick is not None:
            parts.append(f"eos pick {self.eos_pick:.2f}")
        if self.close_after is not None:
            parts.append(f"close after {self.close_after}")
        if self.kv_bits is not None:
            parts.append(f"kv_bits {self.kv_bits} group {self.kv_group_size} start {self.quantized_kv_start}")
        if self.rotating is not None:
            parts.append(f"rotating cache {self.rotating} (keep {self.rotating_keep})")
        if self.max_kv_size is not None:
            parts.append(f"max_kv_size {self.max_kv_size}")
        if self.prompt_cache is not None:
            parts.append(f"prompt_cache {self.prompt_cache}")
        if self.second_prompt is not None:
            parts.append(f"second turn (prompt {len(self.second_prompt)}, max_tokens {self.second_max_tokens})")
        return ", ".join(parts)

    def reproduction(self) -> str:
        sets = "".join(f" --set '{item}'" for item in self.overrides)
        return f"python -m mlx_lm_dspark_tools.exactness --seed {self.seed}{sets}"


# ---------------------------------------------------------------- dimensions


def _bucket(n: int, edges) -> str:
    low = 1
    for high in edges:
        if n <= high:
            return f"{low}" if low == high else f"{low}-{high}"
        low = high + 1
    return f">{edges[-1]}"


def dimensions(case: Case) -> Dict[str, str]:
    """The case's value per reported dimension (for the summary table)."""
    if case.precision.startswith("q"):
        precision = f"affine {case.precision[1:].split('g')[0]}-bit"
        group = f"group {case.precision.split('g')[1]}"
    else:
        precision, group = case.precision, "-"
    if case.cap is None:
        cap = "auto"
    elif case.cap == 0:
        cap = "0"
    elif case.cap >= case.max_drafts:
        cap = "full block"
    else:
        cap = "partial"
    if case.kv_bits is None:
        kv = "none"
    elif case.quantized_kv_start <= len(case.prompt):
        kv = "start inside prefill"
    else:
        kv = "start after prefill"
    window = "-"
    if case.window is not None:
        window = "narrower than verify" if case.window < case.max_drafts + 1 else "at least verify"
    turns = "one" if case.second_prompt is None else f"two ({case.prompt_cache} cache)"

    def wraps(size):
        return "-" if size is None else ("wraps" if case.reach > size else "no wrap")

    alone = case.lookup == "alone"
    return {
        "family": case.family,
        "flavour": case.flavour,
        "precision": precision,
        "group size": group,
        "drafter": "-" if alone else case.drafter,
        "drafter bits": "-" if alone or case.drafter == "oracle" else str(case.drafter_bits or "float"),
        "acceptance": "-" if alone or case.acceptance is None else str(case.acceptance),
        "lookup": case.lookup or "-",
        "lookup n-gram": "-" if case.lookup_spec is None else case.lookup_spec.split(",k=")[0][len("ngram:"):],
        "block": _bucket(case.block, (2, 4, 8, 12, 16)),
        "cap": cap,
        "prompt": _bucket(len(case.prompt), (1, 8, 48, 200)),
        "max_tokens": _bucket(case.max_tokens, (1, 10, 40, 120, 300)),
        "eos in run": "yes" if case.eos_pick is not None else "no",
        "closes early": "yes" if case.close_after is not None else "no",
        "kv quantization": kv,
        "kv_bits": str(case.kv_bits or "-"),
        "rotating prompt cache": wraps(case.rotating),
        "rotating keep": "-" if case.rotating is None else str(case.rotating_keep),
        "max_kv_size": wraps(case.max_kv_size),
        "prompt_cache": str(case.prompt_cache),
        "turns": turns,
        "sliding window": window,
        "tags": ", ".join(sorted(case.tags())) or "-",
    }


# ---------------------------------------------------------------- models


def default_session_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"mlx-lm-dspark-exactness-{FORMAT}"


TARGET_LAYERS = {"qwen3": (0, 1), "gemma4": (1, 3)}  # drafter taps of the shapes below


def _target_kwargs(case: Case) -> dict:
    """The tiny target's shape: small enough for thousands of runs."""
    if case.family == "qwen3":
        return dict(num_layers=2, head_dim=case.head_dim, tie_word_embeddings=case.tied)
    # Sliding, full, sliding, full: two own KV caches, two KV-shared layers.
    return dict(model_type=case.flavour, num_layers=4, sliding_window_pattern=2, num_kv_shared_layers=2,
                sliding_window=case.window)


def _float_target(case: Case):
    from .tiny import make_gemma4_target, make_qwen3_target

    make = make_qwen3_target if case.family == "qwen3" else make_gemma4_target
    return make(**_target_kwargs(case))


def _build_target(path: Path, case: Case) -> None:
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    from .tiny import save_target

    model, config = _float_target(case)
    if case.precision in HALF_PRECISIONS:
        model.set_dtype(getattr(mx, case.precision))
    elif case.precision.startswith("q"):
        bits, group = (int(x) for x in case.precision[1:].split("g"))
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, group, bits)
    elif case.precision in MX_MODES:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, None, None, mode=case.precision)
    save_target(path, model, config)


DRAFTER_LAYOUTS = {  # kind -> (layout, markov_rank)
    "dspark": ("deepspec", 16),
    "dflash": ("deepspec", 0),
    "dspark-dflash_config": ("dflash_config", 16),
    "zlab": ("zlab", 0),
}


def trained_block(block: int) -> int:
    """The drafter's trained block for an effective ``block`` (drafters are
    built per trained block; the case's block is set at run time)."""
    return next(b for b in (4, 8, 16) if b >= block)


def _build_drafter(path: Path, case: Case) -> None:
    from mlx.utils import tree_flatten

    from .tiny import save_drafter

    model, config = _float_target(case)
    layout, rank = DRAFTER_LAYOUTS[case.drafter]
    save_drafter(path, config, layout=layout, markov_rank=rank, block_size=trained_block(case.block),
                 target_layer_ids=TARGET_LAYERS[case.family], num_drafter_layers=1,
                 target_weights=dict(tree_flatten(model.parameters())))


def _built(path: Path, build) -> Path:
    """``path``, built by ``build(tmp)`` unless already there (atomic, so
    concurrent sessions never see half a checkpoint)."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        build(tmp)
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass
class Plain:
    """What plain decoding did: tokens and top-2 margins per turn, cache lengths."""

    tokens: List[List[int]]
    margins: List[List[float]]
    cache_lengths: List[int]


class Session:
    """Built checkpoints, loaded models and plain runs, shared by many cases."""

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else default_session_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        # Cost models the automatic cap measures or is given stay in the session.
        os.environ.setdefault("MLX_LM_DSPARK_CACHE", str(self.root / "cost"))
        self.targets = {}
        self.drafters = {}
        self.plain_runs = {}

    def target(self, case: Case):
        """(model, tokenizer) of the case's target, built and loaded once."""
        name = f"{case.target_name()}-{case.precision}"
        if name not in self.targets:
            import mlx_lm

            path = _built(self.root / "targets" / name, lambda p: _build_target(p, case))
            self.targets[name] = mlx_lm.load(str(path))
        return self.targets[name]

    def drafter(self, case: Case, model):
        """The case's drafter (lookup alone, or combined with it), with its
        effective block and a fresh cap state."""
        from mlx_lm_dspark.loader import load_lookup, with_lookup

        if case.lookup == "alone":
            return load_lookup(case.lookup_spec)
        return with_lookup(self._drafter(case, model), case.lookup_spec if case.lookup == "combined" else None)

    def _drafter(self, case: Case, model):
        if case.drafter == "oracle":
            from mlx_lm_dspark.target import text_args

            from .oracle import OracleDrafter

            return OracleDrafter(text_args(model), acceptance=case.acceptance, confidence=case.acceptance,
                                 block_size=case.max_drafts, seed=case.seed)
        name = f"{case.target_name()}-{case.drafter}-b{trained_block(case.block)}"
        key = (name, case.drafter_bits)
        if key not in self.drafters:
            from mlx_lm_dspark import load_drafter

            path = _built(self.root / "drafters" / name, lambda p: _build_drafter(p, case))
            self.drafters[key] = load_drafter(path, bits=case.drafter_bits)
        drafter = self.drafters[key]
        drafter.block_size = case.block
        return drafter

    def plain(self, case: Case, eos: Optional[int], turns: int) -> Plain:
        """Plain decoding of the case (the first ``turns`` turns), cached by
        everything that decides it (in memory and in the session directory)."""
        model, tokenizer = self.target(case)
        protocol = dict(target=f"{case.target_name()}-{case.precision}", eos=eos, turns=turns,
                        **{k: v for k, v in asdict(case).items() if k in PLAIN_FIELDS})
        protocol["prompt_cache"] = None if case.prompt_cache is None else "target"  # plain runs take no drafter entries
        key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:32]
        if key in self.plain_runs:
            return self.plain_runs[key]
        path = self.root / "plain" / f"{key}.json"
        try:
            run = Plain(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            run = generate(case, model, tokenizer, None, eos, turns, margins=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(run)))
            os.replace(tmp, path)
        self.plain_runs[key] = run
        return run


# Case fields that decide plain decoding (the drafter, block and cap do not).
PLAIN_FIELDS = ("prompt", "max_tokens", "close_after", "kv_bits", "kv_group_size", "quantized_kv_start",
                "prompt_cache", "rotating", "rotating_keep", "max_kv_size", "second_prompt", "second_max_tokens")


# ---------------------------------------------------------------- running


def _top2_margin(logprobs) -> float:
    import mlx.core as mx
    import numpy as np

    row = np.array(logprobs.astype(mx.float32)).reshape(-1)
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])


def _make_cache(case: Case, model, drafter):
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    if case.prompt_cache is None:
        return None
    if case.rotating is not None and case.rotating_keep != ROTATING_KEEP:
        cache = [RotatingKVCache(max_size=case.rotating, keep=case.rotating_keep) for _ in model.layers]
    else:
        cache = make_prompt_cache(model, max_kv_size=case.rotating)
    if case.prompt_cache == "combined" and drafter is not None:
        cache += drafter.make_cache()
    return cache


def _cache_length(cache, model) -> int:
    from mlx_lm.models.cache import make_prompt_cache

    if cache is None:
        return -1
    entries = cache[: len(make_prompt_cache(model))]
    for c in entries:
        offset = getattr(c, "offset", None)
        if offset is not None:
            return int(offset)
    return 0


def generate(case: Case, model, tokenizer, drafter, eos: Optional[int], turns: int, margins=False,
             run: Optional[Plain] = None) -> Plain:
    """Run the case's turns through ``stream_generate`` (with ``drafter``, or
    plain), consuming the way the case says (closing early or not).  Tokens
    land in ``run`` as they come, so a caller sees how far a failed run got."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    if eos is not None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) | {eos}
    cache = _make_cache(case, model, drafter)
    run = run if run is not None else Plain([], [], [])
    plan = [(case.prompt, case.max_tokens, case.close_after)]
    if case.second_prompt is not None:
        plan.append((case.second_prompt, case.second_max_tokens, None))
    for prompt, max_tokens, close_after in plan[:turns]:
        kw = dict(max_tokens=max_tokens)
        if case.kv_bits is not None:
            kw.update(kv_bits=case.kv_bits, kv_group_size=case.kv_group_size,
                      quantized_kv_start=case.quantized_kv_start)
        if case.max_kv_size is not None:
            kw["max_kv_size"] = case.max_kv_size
        if cache is not None:
            kw["prompt_cache"] = cache
        if drafter is not None:
            kw["draft_model"] = drafter
            if case.cap is not None:
                kw["num_draft_tokens"] = case.cap
        tokens, turn_margins = [], []
        run.tokens.append(tokens)
        run.margins.append(turn_margins)
        stream = stream_generate(model, tokenizer, mx.array(prompt, dtype=mx.uint32), **kw)
        try:
            for response in stream:
                tokens.append(int(response.token))
                if margins:
                    turn_margins.append(round(_top2_margin(response.logprobs), 6))
                if close_after is not None and len(tokens) == close_after:
                    break
        finally:
            stream.close()
        run.cache_lengths.append(_cache_length(cache, model))
    return run


def pick_eos(case: Case, tokens: List[int]) -> Optional[int]:
    """An EOS token plain decoding emits mid-run: a token's first occurrence
    after the first position, chosen by ``case.eos_pick``."""
    firsts = [i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]]
    if case.eos_pick is None or not firsts:
        return None
    return tokens[firsts[int(case.eos_pick * len(firsts))]]


def _set_cost_model(drafter, model):
    """A fixed cost model for the automatic cap (verifying more costs little,
    as on a GPU): the cap then drafts and varies, and no case spends seconds
    measuring one."""
    from mlx_lm_dspark.cost import CostModel
    from mlx_lm_dspark.speculative import bind, cost_model

    costs = CostModel(verify_ms=[10.0 + 0.5 * w for w in range(drafter.max_drafts + 1)], draft_ms=2.0)
    with contextlib.suppress(TypeError, AttributeError):
        cost_model(drafter, bind(drafter, model), measured=costs)


def refusal_errors() -> tuple:
    """mlx-lm-dspark's own error classes (a refusal is one of them raised
    before the first token), found in its loaded modules."""
    found = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm_dspark.") or module is None:
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Exception) and value.__module__ == name
                    and value.__name__ != "HostMismatchError"):
                found.add(value)
    return tuple(found)


@dataclass
class Outcome:
    """How a case went: exact, diverged, refused, error, or host-unsupported
    (plain decoding itself fails with these options)."""

    case: Case
    status: str
    detail: str = ""
    turn: Optional[int] = None
    position: Optional[int] = None
    plain_token: Optional[int] = None
    speculative_token: Optional[int] = None
    margin: Optional[float] = None
    seconds: float = 0.0
    drafted: Optional[int] = None  # drafts verified in the last turn, and how many were kept
    accepted: Optional[int] = None

    def line(self) -> str:
        """The outcome, the case and its reproduction, on one line."""
        where = ""
        if self.status == "diverged":
            where = (f" at turn {self.turn + 1} position {self.position}: plain {self.plain_token}, "
                     f"speculative {self.speculative_token}, plain top-2 margin "
                     f"{'n/a' if self.margin is None else f'{self.margin:.4g}'}")
        detail = f" ({self.detail})" if self.detail else ""
        if self.drafted is not None:
            detail += f" (last turn: {self.accepted} of {self.drafted} drafts kept)"
        return f"{self.status}{where}{detail} | {self.case.describe()} | {self.case.reproduction()}"


def _first_divergence(plain: Plain, got: Plain):
    """(turn, position, plain token, speculative token, margin, detail) of the first difference, or None."""
    for turn, (want, have) in enumerate(zip(plain.tokens, got.tokens)):
        for i in range(max(len(want), len(have))):
            a = want[i] if i < len(want) else None
            b = have[i] if i < len(have) else None
            if a != b:
                margin = plain.margins[turn][i] if i < len(plain.margins[turn]) else None
                detail = "" if a is not None and b is not None else f"{len(want)} plain tokens, {len(have)} speculative"
                return turn, i, a, b, margin, detail
        if plain.cache_lengths[turn] != got.cache_lengths[turn]:
            held = f"cache holds {got.cache_lengths[turn]} positions after the turn, plain {plain.cache_lengths[turn]}"
            return turn, len(want), None, None, None, held
    return None


def run_case(case: Case, session: Session) -> Outcome:
    """Run ``case`` speculatively and plainly and compare."""
    from mlx_lm_dspark.session import clear_last_stats, last_stats

    began = time.perf_counter()
    turns = 1 if case.second_prompt is None else 2
    try:
        model, tokenizer = session.target(case)
        eos = None
        if case.eos_pick is not None:
            eos = pick_eos(case, session.plain(case, None, 1).tokens[0])
        plain = session.plain(case, eos, turns)
    except Exception as e:  # noqa: BLE001  (the host cannot run it: not ours to compare)
        return Outcome(case, "host-unsupported", f"plain decoding fails: {type(e).__name__}: {e}",
                       seconds=time.perf_counter() - began)
    drafter = session.drafter(case, model)
    if case.drafter == "oracle" and case.lookup != "alone":
        sequence = list(case.prompt) + plain.tokens[0]
        if turns == 2:
            sequence += list(case.second_prompt) + plain.tokens[1]
        drafter.set_continuation(sequence, trial=case.seed)
    if case.cap is None:
        _set_cost_model(drafter, model)
    refusals = refusal_errors()
    clear_last_stats(drafter)  # a loaded drafter is shared by many cases
    got = Plain([], [], [])
    try:
        generate(case, model, tokenizer, drafter, eos, turns, run=got)
    except refusals as e:
        status = "refused" if got.tokens and not got.tokens[-1] else "error"  # before the turn's first token
        return Outcome(case, status, f"{type(e).__name__}: {str(e).splitlines()[0]}",
                       seconds=time.perf_counter() - began)
    except Exception as e:  # noqa: BLE001
        return Outcome(case, "error", f"{type(e).__name__}: {e}", seconds=time.perf_counter() - began)
    seconds = time.perf_counter() - began
    stats = last_stats(drafter)
    drafts = dict(drafted=stats.drafted, accepted=stats.accepted) if stats is not None else {}
    first = _first_divergence(plain, got)
    if first is None:
        return Outcome(case, "exact", seconds=seconds, **drafts)
    turn, position, a, b, margin, detail = first
    return Outcome(case, "diverged", detail, turn, position, a, b, margin, seconds, **drafts)


# ---------------------------------------------------------------- many cases

STATUSES = ("exact", "diverged", "refused", "error", "host-unsupported")


def run_cases(seeds, session: Optional[Session] = None, keep=lambda case: True, report=None,
              overrides=()) -> List[Outcome]:
    """Outcomes of the cases of ``seeds`` (with ``overrides``) that ``keep``
    accepts; ``report`` is called with each outcome as it comes."""
    session = session or Session()
    outcomes = []
    for seed in seeds:
        case = Case.draw(seed).with_overrides(overrides)
        if not keep(case):
            continue
        outcome = run_case(case, session)
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes


def summary(outcomes: List[Outcome]) -> str:
    """A table per dimension and value: cases and how many diverged, were
    refused, failed or were unsupported by the host; then the refusals by name."""
    counts = defaultdict(Counter)
    for outcome in outcomes:
        for dim, value in dimensions(outcome.case).items():
            counts[(dim, value)][outcome.status] += 1
            counts[(dim, value)]["cases"] += 1
    head = (f"{'dimension':<22} {'value':<34} {'cases':>6} {'diverged':>9} {'refused':>8} {'errors':>7} "
            f"{'host-unsup':>10}")
    lines = [head, "-" * len(head)]
    for (dim, value) in sorted(counts, key=lambda k: (list(dimensions(outcomes[0].case)).index(k[0]), k[1])):
        c = counts[(dim, value)]
        lines.append(f"{dim:<22} {value[:34]:<34} {c['cases']:>6} {c['diverged']:>9} {c['refused']:>8} "
                     f"{c['error']:>7} {c['host-unsupported']:>10}")
    total = Counter(o.status for o in outcomes)
    seconds = sum(o.seconds for o in outcomes)
    lines.append("-" * len(head))
    lines.append(f"{len(outcomes)} cases in {seconds:.0f} s: " + ", ".join(f"{total[s]} {s}" for s in STATUSES))
    refusals = Counter(o.detail for o in outcomes if o.status == "refused")
    for detail, n in refusals.most_common():
        lines.append(f"refused {n}x: {detail}")
    return "\n".join(lines)


def cross_table(outcomes: List[Outcome], by: List[str]) -> str:
    """Cases and divergences per combination of the dimensions ``by`` (the
    half-precision rates in the README are measured this way)."""
    counts = defaultdict(Counter)
    for outcome in outcomes:
        values = dimensions(outcome.case)
        counts[tuple(values[d] for d in by)][outcome.status] += 1
    width = [max(len(d), *(len(k[i]) for k in counts)) for i, d in enumerate(by)]
    head = "  ".join(d.ljust(w) for d, w in zip(by, width)) + f"  {'cases':>6} {'diverged':>9} {'rate':>7}"
    lines = [head, "-" * len(head)]
    for key in sorted(counts):
        c = counts[key]
        n = sum(c.values())
        lines.append("  ".join(v.ljust(w) for v, w in zip(key, width))
                     + f"  {n:>6} {c['diverged']:>9} {c['diverged'] / n:>7.2%}")
    return "\n".join(lines)


def _seed_range(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_dspark_tools.exactness",
        description="Randomized exactness check: greedy speculative decoding against plain decoding.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="Run one case and print it in full.")
    which.add_argument("--seeds", type=_seed_range, help="Run the cases of a range START:STOP and print a table.")
    parser.add_argument("--tag", action="append", default=[], choices=TAGS,
                        help="Only cases in this configuration (repeatable: any of them).")
    parser.add_argument("--exclude-tag", action="append", default=[], choices=TAGS,
                        help="Skip cases in this configuration (repeatable).")
    parser.add_argument("--where", action="append", default=[], metavar="DIMENSION=VALUE",
                        help="Only cases with this value of a reported dimension (repeatable: all of them), "
                             "e.g. --where lookup=alone.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="Set a case field after drawing (JSON value; repeatable), e.g. max_tokens=200.")
    parser.add_argument("--session-dir", type=Path, default=None,
                        help=f"Where checkpoints and plain runs are kept (default: {default_session_dir()}).")
    parser.add_argument("--by", action="append", default=[], metavar="DIMENSION",
                        help="Also print cases and divergences per combination of these dimensions "
                             "(repeatable), e.g. --by family --by precision.")
    parser.add_argument("--verbose", action="store_true", help="Print every case, not only those not exact.")
    args = parser.parse_args(argv)
    where = [item.partition("=")[::2] for item in args.where]
    unknown = [d for d in args.by + [d for d, _ in where] if d not in dimensions(Case.draw(0))]
    if unknown:
        parser.error(f"{unknown[0]!r}: no such dimension (dimensions: {', '.join(dimensions(Case.draw(0)))})")
    try:
        Case.draw(0).with_overrides(args.overrides)
    except ValueError as e:
        parser.error(str(e))
    import mlx_lm.generate  # noqa: F401  (mlx-lm first: it activates mlx-lm-dspark's patches)

    session = Session(args.session_dir)
    if args.seed is not None:
        case = Case.draw(args.seed).with_overrides(args.overrides)
        print(case.describe())
        print(f"tags: {', '.join(sorted(case.tags())) or '-'}")
        outcome = run_case(case, session)
        print(outcome.line())
        return 0 if outcome.status in ("exact", "refused", "host-unsupported") else 1

    def keep(case):
        tags, values = case.tags(), dimensions(case)
        return ((not args.tag or tags & set(args.tag)) and not tags & set(args.exclude_tag)
                and all(values[d] == v for d, v in where))

    def report(outcome):
        if args.verbose or outcome.status != "exact":
            print(outcome.line(), flush=True)

    outcomes = run_cases(args.seeds, session, keep, report, args.overrides)
    if not outcomes:
        print("no case in that range matches the filters")
        return 0
    print(summary(outcomes))
    if args.by:
        print()
        print(cross_table(outcomes, args.by))
    return 1 if any(o.status in ("diverged", "error") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
