"""Runtime hook for mlx-vlm: our drafters as draft kind ``mlx-lm-dspark``.

mlx-vlm (0.7.10) resolves a drafter with ``load_drafter(path, kind)``,
prefills the target itself (vision tower included) while capturing the
layers in ``drafter.config.target_layer_ids``, then hands the prefilled cache
to a round loop chosen by kind.  We hook in at three places:

- ``mlx_vlm.speculative.drafters.load_drafter``: ``kind="mlx-lm-dspark"``
  loads with :func:`mlx_lm_dspark.load_drafter`; without a kind, checkpoints
  mlx-vlm loads and runs natively stay mlx-vlm's, and only those it cannot
  run (it fails to load them, or a Gemma-4 DSpark drafter with
  ``attention_k_eq_v``, whose missing ``v_proj`` its loop reads) come to us.
  To mlx-vlm the drafter reports its ``"dflash"`` kind, so its prefill
  plumbing (capture ids, whole-prompt prefill, hidden concatenation) runs
  unchanged, and it gains what that plumbing reads (``SeenByMlxVlm``).
- ``mlx_vlm.generate.ar.run_speculative_rounds`` / ``run_speculative_server_rounds``:
  our drafter object (not the kind string) sends the rounds to our loop
  (:func:`mlx_lm_dspark.speculative.decode`); anything else goes to mlx-vlm.
  ``ar.SpeculativePrefill``, the first of mlx-vlm to meet the drafter in a
  generation, gives one of ours (however it was loaded) what mlx-vlm reads.
- the ``--draft-kind`` choices of ``mlx_vlm.generate`` and ``mlx_vlm.server``.

Every hook first checks the installed mlx-vlm against the supported range
and that the host still looks the way it is patched, and raises
``HostMismatchError`` if not (:mod:`.guards`).
"""

import argparse
import functools
import json
import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import List

import mlx.core as mx

from . import guards
from .guards import HostMismatchError  # noqa: F401 (raised by every patch here)
from .mlx_lm import argparse_with

KIND = "mlx-lm-dspark"
HOST_KIND = "dflash"  # the mlx-vlm kind whose prefill our drafters need
HOST = "mlx-vlm"

logger = logging.getLogger(__name__)


def _fail(what: str, detail: str):
    guards.fail(HOST, what, detail)


def _expect_params(module, name: str, params):
    return guards.expect_params(module, name, params, _fail)


def _expect_calls(func, where: str, callees):
    guards.expect_calls(func, where, callees, _fail)


def _once(module) -> bool:
    return guards.once(module, HOST)


# ---------------------------------------------------------------- loading


def _local_config(path_or_repo) -> dict:
    try:
        return json.loads((Path(path_or_repo) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _ours(config: dict) -> bool:
    from ..registry import kind_for

    return bool(config) and kind_for(config) is not None


def _native_cannot_run(config: dict) -> bool:
    """A drafter mlx-vlm 0.7.10 loads but whose round loop would crash."""
    nested = config.get("dflash_config") or {}
    return "Gemma4DSparkModel" in (config.get("architectures") or []) and bool(
        nested.get("attention_k_eq_v", config.get("attention_k_eq_v"))
    )


class _HostKind(str):
    """mlx-vlm's ``"dflash"`` (whose prefill plumbing our drafters use) that
    also answers to our kind's name, so mlx-vlm does not report overriding
    the kind the user chose."""

    def __new__(cls):
        return super().__new__(cls, HOST_KIND)

    def __eq__(self, other):
        return other == KIND or str.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__

    def __repr__(self):
        return repr(KIND)


class SeenByMlxVlm:
    """What mlx-vlm's speculative plumbing reads from a drafter, mixed into
    the class of a drafter we load for it (the drafter stays what it was
    otherwise; the network class carries no host plumbing)."""

    @property
    def config(self) -> SimpleNamespace:
        """The taps mlx-vlm's prefill captures; a model_type it does not map
        to one of its own kinds."""
        return SimpleNamespace(model_type="mlx_lm_dspark", target_layer_ids=list(self.target_layer_ids))

    @property
    def accept_lens(self) -> List[int]:
        """Accepted drafts per round of the last generation (mlx-vlm's stats line)."""
        from ..session import last_stats

        stats = last_stats(self)
        return list(stats.accepted_lengths) if stats is not None else []

    @property
    def draft_lens(self) -> List[int]:
        """Drafts verified per round of the last generation."""
        from ..session import last_stats

        stats = last_stats(self)
        return list(stats.proposal_lengths) if stats is not None else []

    def validate_target_compatibility(self, target_model) -> None:
        """Called by mlx-vlm before generating: refuse a mismatched target."""
        from ..speculative import bind

        bind(self, target_model)


_SEEN_CLASSES = {}


def seen_by_mlx_vlm(drafter):
    """``drafter`` with ``SeenByMlxVlm`` mixed into its class (idempotent)."""
    cls = type(drafter)
    if isinstance(drafter, SeenByMlxVlm):
        return drafter
    sub = _SEEN_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (SeenByMlxVlm, cls), {"__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SEEN_CLASSES[cls] = sub
    drafter.__class__ = sub
    return drafter


def _load_ours(path_or_repo):
    from ..loader import load_drafter

    drafter = load_drafter(path_or_repo, bits=None)
    logger.info("Loaded %s as an mlx-lm-dspark %s drafter.", path_or_repo, drafter.kind)
    return seen_by_mlx_vlm(drafter), _HostKind()


def patch_drafters(drafters) -> None:
    if not _once(drafters):
        return
    original = _expect_params(drafters, "load_drafter", ["path_or_repo", "kind"])
    known = getattr(drafters, "KNOWN_DRAFTER_KINDS", None)
    if not isinstance(known, set):
        _fail(f"{drafters.__name__}.KNOWN_DRAFTER_KINDS", "it is no longer a set of kind names")

    @functools.wraps(original)
    def load_drafter(path_or_repo, kind=None, **kwargs):
        if kind == KIND:
            return _load_ours(path_or_repo)
        if kind is None:
            config = _local_config(path_or_repo)
            if _ours(config) and _native_cannot_run(config):
                return _load_ours(path_or_repo)
            try:
                return original(path_or_repo, kind=kind, **kwargs)
            except Exception as native_error:
                if not _ours(config):
                    raise
                logger.info("mlx-vlm cannot load %s (%s); using mlx-lm-dspark.", path_or_repo, native_error)
                return _load_ours(path_or_repo)
        return original(path_or_repo, kind=kind, **kwargs)

    drafters.load_drafter = load_drafter
    known.add(KIND)


# ---------------------------------------------------------------- rounds


def _is_ours(draft_model) -> bool:
    from ..speculative import is_drafter

    return is_drafter(draft_model)


def _prompt_features(hidden_states, layer_ids) -> mx.array:
    """mlx-vlm captures each tapped layer once, in layer order; the drafter
    wants them in its own ``target_layer_ids`` order."""
    order = sorted(set(layer_ids))
    if len(hidden_states) != len(order):
        raise RuntimeError(
            f"mlx-vlm captured {len(hidden_states)} hidden states for taps {layer_ids}; "
            "its capture contract changed and mlx-lm-dspark needs an update."
        )
    return mx.concatenate([hidden_states[order.index(i)] for i in layer_ids], axis=-1)


def _num_drafts(draft_block_size):
    """mlx-vlm's ``--draft-block-size`` counts the verified block with its
    anchor; unset, our automatic draft length decides."""
    if draft_block_size is None:
        return None
    if int(draft_block_size) < 1:
        raise ValueError(f"draft_block_size must be at least 1, got {draft_block_size}.")
    return int(draft_block_size) - 1


class _PrefilledTokens(threading.local):
    """The token ids of the prompt part mlx-vlm is about to prefill, as seen
    where its ``SpeculativePrefill`` is made (``generate_step`` /
    ``PromptProcessingBatch``, whose ``input_ids`` they are): the round loop
    gets the captured states of those positions but, after a chunked
    prefill, only the last token, and an EAGLE3 drafter pairs each state
    with the token after it."""

    ids = None


_prefilled = _PrefilledTokens()


def _capture_prompt_ids(caller_locals) -> None:
    ids = caller_locals.get("input_ids")
    if isinstance(ids, mx.array) and ids.ndim == 2 and ids.shape[0] == 1:
        _prefilled.ids = ids[0]
    elif isinstance(ids, (list, tuple)) and len(ids) == 1:
        _prefilled.ids = mx.array(list(ids[0]))
    else:
        _prefilled.ids = None  # a batch, or none: drafters that read states alone still run


def _prompt_tokens(length: int):
    """The last ``length`` prefilled token ids, or None where they are not
    known (the drafter then says it needs them, if it does)."""
    ids, _prefilled.ids = _prefilled.ids, None
    if ids is None or ids.size < length:
        return None
    return ids[ids.size - length:].astype(mx.uint32)


def our_rounds(model, drafter, prompt_cache, features, first_token, logprobs, *, max_tokens,
               sampler, greedy, num_draft_tokens, tokens=None):
    """Our round loop on a target mlx-vlm has prefilled: ``prompt_cache``
    holds the prompt, ``features`` [1, L, n_taps·H] are the tapped states of
    its last L positions (``tokens`` [L] the ids read there, when known),
    ``first_token`` was sampled after them.  Yields (token, logprobs) from
    ``first_token`` on."""
    from ..sampling import greedy_sampler
    from ..speculative import bind, decode
    from ..target import cache_length, check_rollback

    target = bind(drafter, model)
    check_rollback(prompt_cache)
    position = cache_length(prompt_cache)
    draft_cache = drafter.make_cache()
    # A reused prompt cache was prefilled only past its cached part: the drafter
    # sees the captured positions (fewer drafts kept, never a wrong token).
    drafter.add_context(draft_cache, features, position - features.shape[1], tokens)
    anchor = mx.array(first_token).reshape(1).astype(mx.uint32)
    if logprobs.ndim > 1:
        logprobs = logprobs.reshape(-1)
    rounds = decode(
        target, drafter, prompt_cache, draft_cache, anchor, logprobs, position,
        num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
        sampler=greedy_sampler if greedy else sampler,
    )
    try:
        for token, token_logprobs, _ in rounds:
            yield token, token_logprobs
    finally:
        rounds.close()


def _plain_batch_rounds(model, prompt_cache, first_bonus, *, max_tokens, sampler, stop_check):
    """Coalesced server requests: plain batched decoding (our loop runs one
    sequence), exact like mlx-vlm's own batched decoding."""
    y = first_bonus.reshape(-1)
    done = [False] * y.shape[0]
    for _ in range(max_tokens):
        out = model(y[:, None], cache=prompt_cache)
        logits = getattr(out, "logits", out)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(logprobs).reshape(-1)
        tokens = y.tolist()
        row_tokens = []
        for row, token in enumerate(tokens):
            if done[row]:
                row_tokens.append(None)
                continue
            row_tokens.append(int(token))
            if stop_check is not None and stop_check(row, int(token)):
                done[row] = True
        yield row_tokens, None
        if all(done):
            return


def patch_ar(ar) -> None:
    if not _once(ar):
        return
    rounds = _expect_params(
        ar, "run_speculative_rounds",
        ["model", "draft_model", "prompt_cache", "first_token", "logprobs", "last_outputs", "max_tokens",
         "sampler", "draft_block_size", "sampler_is_greedy"],
    )
    server_rounds = _expect_params(
        ar, "run_speculative_server_rounds",
        ["model", "draft_model", "prompt_cache", "hidden", "first_bonus", "max_tokens", "sampler",
         "draft_block_size", "stop_check", "greedy_sampling"],
    )
    _expect_calls(ar.generate_step, "mlx_vlm.generate.ar.generate_step",
                  ["run_speculative_rounds", "SpeculativePrefill"])
    batch = getattr(ar, "SpeculativeGenerationBatch", None)
    if not isinstance(batch, type) or not hasattr(batch, "_start_rounds"):
        _fail("mlx_vlm.generate.ar.SpeculativeGenerationBatch", "the class or its _start_rounds is gone")
    _expect_calls(batch._start_rounds, "SpeculativeGenerationBatch._start_rounds",
                  ["run_speculative_server_rounds"])
    prompt_batch = getattr(ar, "PromptProcessingBatch", None)
    if not isinstance(prompt_batch, type):
        _fail("mlx_vlm.generate.ar.PromptProcessingBatch", "the class is gone")
    _expect_calls(prompt_batch.__init__, "PromptProcessingBatch.__init__", ["SpeculativePrefill"])
    prefill = getattr(ar, "SpeculativePrefill", None)
    if not isinstance(prefill, type):
        _fail("mlx_vlm.generate.ar.SpeculativePrefill", "the class is gone")
    _expect_params(ar, "SpeculativePrefill", ["draft_kind", "drafter"])

    class SpeculativePrefill(prefill):
        __doc__ = prefill.__doc__

        def __init__(self, draft_kind, drafter, *args, **kwargs):
            if drafter is not None and _is_ours(drafter):
                seen_by_mlx_vlm(drafter)
                _capture_prompt_ids(sys._getframe(1).f_locals)
            super().__init__(draft_kind, drafter, *args, **kwargs)

    SpeculativePrefill.__module__, SpeculativePrefill.__qualname__ = prefill.__module__, prefill.__qualname__

    @functools.wraps(rounds)
    def run_speculative_rounds(model, draft_model, prompt_cache, input_ids, first_token, logprobs,
                               last_outputs, *, draft_kind, max_tokens, sampler, draft_block_size=None,
                               sampler_is_greedy=False, **kwargs):
        if not _is_ours(draft_model):
            yield from rounds(model, draft_model, prompt_cache, input_ids, first_token, logprobs,
                              last_outputs, draft_kind=draft_kind, max_tokens=max_tokens, sampler=sampler,
                              draft_block_size=draft_block_size, sampler_is_greedy=sampler_is_greedy,
                              **kwargs)
            return
        features = _prompt_features(last_outputs.hidden_states, draft_model.target_layer_ids)
        yield from our_rounds(model, draft_model, prompt_cache, features, first_token, logprobs,
                              max_tokens=max_tokens, sampler=sampler, greedy=sampler_is_greedy,
                              num_draft_tokens=_num_drafts(draft_block_size),
                              tokens=_prompt_tokens(features.shape[1]))

    @functools.wraps(server_rounds)
    def run_speculative_server_rounds(model, draft_model, prompt_cache, hidden, *, first_bonus, max_tokens,
                                      sampler, draft_block_size=None, stop_check=None,
                                      greedy_sampling=False, **kwargs):
        if not _is_ours(draft_model):
            yield from server_rounds(model, draft_model, prompt_cache, hidden, first_bonus=first_bonus,
                                     max_tokens=max_tokens, sampler=sampler, draft_block_size=draft_block_size,
                                     stop_check=stop_check, greedy_sampling=greedy_sampling, **kwargs)
            return
        if first_bonus.size > 1:
            yield from _plain_batch_rounds(model, prompt_cache, first_bonus, max_tokens=max_tokens,
                                           sampler=sampler, stop_check=stop_check)
            return
        # The batch sends the first token itself; our loop yields it first.
        taps = draft_model.target_layer_ids
        features = _prompt_features(mx.split(hidden, len(set(taps)), axis=-1), taps)
        tokens = our_rounds(model, draft_model, prompt_cache, features, first_bonus, mx.zeros((1,)),
                            max_tokens=max_tokens, sampler=sampler, greedy=greedy_sampling,
                            num_draft_tokens=_num_drafts(draft_block_size),
                            tokens=_prompt_tokens(features.shape[1]))
        try:
            next(tokens)
            for token, _ in tokens:
                yield [token], None
                if stop_check is not None and stop_check(0, token):
                    return
        finally:
            tokens.close()
            from ..session import last_stats

            stats = last_stats(draft_model)
            if stats is not None:
                logger.info("mlx-lm-dspark: %s", stats.summary())

    ar.run_speculative_rounds = run_speculative_rounds
    ar.run_speculative_server_rounds = run_speculative_server_rounds
    ar.SpeculativePrefill = SpeculativePrefill


# ---------------------------------------------------------------- command lines


def _add_our_kind(module_name: str):
    """Adds our kind to ``--draft-kind``'s choices of a parser (when it parses)."""

    def adjust(parser):
        actions = [a for a in parser._actions if "--draft-kind" in a.option_strings]
        if len(actions) != 1 or not actions[0].choices:
            _fail(f"{module_name}'s --draft-kind option", "it is gone or no longer has choices")
        if KIND not in actions[0].choices:
            actions[0].choices = [*actions[0].choices, KIND]
            actions[0].help = (actions[0].help or "") + f" '{KIND}': an mlx-lm-dspark DSpark/DFlash drafter."

    return adjust


def _patch_parser(module, function: str) -> None:
    func = getattr(module, function, None)
    if not callable(func):
        _fail(f"{module.__name__}.{function}", "the function no longer exists")
    _expect_calls(func, f"{module.__name__}.{function}", ["argparse", "ArgumentParser"])
    if getattr(module, "argparse", None) is not argparse:
        _fail(f"{module.__name__}", "it no longer imports argparse as a module")
    module.argparse = argparse_with(_add_our_kind(module.__name__))


def patch_dispatch(dispatch) -> None:
    if _once(dispatch):
        _patch_parser(dispatch, "parse_arguments")


def patch_server_cli(cli) -> None:
    if _once(cli):
        _patch_parser(cli, "main")

