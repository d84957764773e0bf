"""Every change mlx-lm-dspark makes to mlx-lm, applied as its modules load.

- ``mlx_lm.utils``: ``load_model`` builds drafters from their config;
  ``load_tokenizer`` answers for drafter repos, which ship no tokenizer.
- ``mlx_lm.sample_utils``: samplers from ``make_sampler`` carry their
  settings, so the p/q acceptance rule can compute their distribution;
- ``mlx_lm.generate``: ``speculative_generate_step`` dispatches to our round
  loop for our drafters; ``stream_generate`` keeps ``max_kv_size`` for them
  (mlx-lm drops it for draft models: it builds the rotating prompt cache
  plain decoding would); ``setup_arg_parser`` gains the drafter options;
  ``generate(verbose=True)`` also prints the acceptance statistics and
  checks the pair before printing anything; ``main`` prints a user's mistake
  (bad checkpoint, option or pair) as one line, without a traceback.
- ``mlx_lm.server``: the command line gains the drafter options and
  ``--num-draft-tokens`` defaults to "not given" (a request may still set
  it); with ``--draft-model`` the default pair is loaded, checked and its
  costs measured at start-up (``ModelProvider.__init__``), and ``main``
  prints a user's mistake as one line; each request's acceptance
  statistics are logged and returned in its ``usage`` as ``speculative``
  (OpenAI clients ignore unknown fields); requests mlx-lm lets through but
  cannot serve (``logit_bias`` ids outside the vocabulary, ``seed`` outside
  [0, 2^64), ``max_tokens`` beyond the context, a body that is not UTF-8)
  get a 400 naming the field, and the HTTP server listens with a backlog
  that takes a burst of clients. A request's drafter that does not match the target is
  refused before its response starts (an error answer, not a dropped
  connection), and a client that disconnects stops its generation,
  streaming or not; SIGINT and SIGTERM stop the generations in flight and
  shut the server down. A prompt the prompt cache holds exactly (an earlier prompt
  and its answer) is served from it less its last token, which is fed again
  (mlx-lm fed an empty remainder). Concurrent requests with a drafter that
  batched rounds decode exactly share them (``batch.ServerBatch`` as the
  batch loop's ``BatchGenerator``; mlx-lm 0.32) instead of queueing.
  A generation that raises answers its request with the error (a 500, or an
  error event ending its stream) instead of dropping the connection; a
  batched round that raises ends the requests in it, and the batch loop
  goes on (it died, refusing every later request).

Each patch first checks the installed mlx-lm against the supported range
and that the host function still looks the way this code expects, and raises
``HostMismatchError`` otherwise (:mod:`.guards`): a silent mismatch could
change what users' generations return.
"""

import argparse
import functools
import inspect
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
import types
import weakref
from pathlib import Path

from .. import loader
from . import guards
from .guards import HostMismatchError  # noqa: F401 (raised by every patch here)

LEGACY_NUM_DRAFT_TOKENS = 3  # mlx_lm.generate's --num-draft-tokens default
HOST = "mlx-lm"

# The shapes of the host functions whose parameters changed within the
# supported range: mlx-lm 0.32 added a ``stream`` parameter to both.
_STEP_OPTIONS = ["num_draft_tokens", "max_tokens", "sampler", "logits_processors", "prompt_cache",
                 "prefill_step_size", "kv_bits", "kv_group_size", "quantized_kv_start"]
SPECULATIVE_STEP_SHAPES = (
    ["prompt", "model", "draft_model", "stream", *_STEP_OPTIONS],  # mlx-lm 0.32
    ["prompt", "model", "draft_model", *_STEP_OPTIONS],  # mlx-lm 0.31
)
SERVE_SINGLE_SHAPES = (
    ["self", "request", "stream"],  # mlx-lm 0.32
    ["self", "request"],  # mlx-lm 0.31
)


def _fail(what: str, detail: str):
    guards.fail(HOST, what, detail)


def _expect_params(module, name: str, params, fail=None):
    """``module.name``, after checking it still takes ``params`` (``fail``
    raises the host's HostMismatchError; mlx-lm's by default)."""
    return guards.expect_params(module, name, params, fail or _fail)


def _expect_calls(module, name: str, callees):
    guards.expect_calls(getattr(module, name), f"{module.__name__}.{name}", callees, _fail)


def _once(module) -> bool:
    return guards.once(module, HOST)


def patch_utils(utils) -> None:
    if not _once(utils):
        return
    load_model = _expect_params(utils, "load_model", ["model_path", "lazy", "model_config"])
    load_tokenizer = _expect_params(
        utils, "load_tokenizer", ["model_path", "tokenizer_config_extra", "eos_token_ids"]
    )
    download = _expect_params(utils, "_download", ["path_or_hf_repo", "revision"])
    _expect_calls(utils, "load", ["_download", "load_model", "load_tokenizer"])

    @functools.wraps(download)
    def download_unless_lookup(path_or_hf_repo, *args, **kwargs):
        if loader.names_lookup(path_or_hf_repo):
            return Path(path_or_hf_repo)  # nothing to fetch: ``load_model`` builds it
        return download(path_or_hf_repo, *args, **kwargs)

    @functools.wraps(load_model)
    def load_model_or_drafter(model_path, lazy=False, *args, **kwargs):
        if loader.names_lookup(model_path):
            _refuse_private_generate_copy()
            return loader.load_lookup(str(model_path)), {}
        config = loader.read_config(model_path)
        if config is not None and loader.is_drafter_config(config):
            _refuse_private_generate_copy()
            model = loader.build_drafter(Path(model_path), config, lazy=lazy, **loader.load_defaults)
            return model, config
        return load_model(model_path, lazy, *args, **kwargs)

    @functools.wraps(load_tokenizer)
    def load_tokenizer_or_stand_in(model_path, *args, **kwargs):
        if loader.names_lookup(model_path):
            return loader.DrafterTokenizer(0)
        config = loader.read_config(model_path)
        if (
            config is not None
            and loader.is_drafter_config(config)
            and not loader.has_tokenizer(model_path)
        ):
            return loader.DrafterTokenizer(config.get("vocab_size", 0))
        return load_tokenizer(model_path, *args, **kwargs)

    utils._download = download_unless_lookup
    utils.load_model = load_model_or_drafter
    utils.load_tokenizer = load_tokenizer_or_stand_in


def patch_sample_utils(sample_utils) -> None:
    if not _once(sample_utils):
        return
    from ..sampling import SamplerSettings, greedy_sampler

    fields = list(SamplerSettings.__dataclass_fields__)
    make_sampler = _expect_params(sample_utils, "make_sampler", fields)
    signature = inspect.signature(make_sampler)

    @functools.wraps(make_sampler)
    def make_sampler_with_settings(*args, **kwargs):
        sampler = make_sampler(*args, **kwargs)
        if sampler is not greedy_sampler:  # the one shared greedy function (mlx-lm >= 0.32)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            sampler.dspark_settings = SamplerSettings(**{f: bound.arguments[f] for f in fields})
        return sampler

    sample_utils.make_sampler = make_sampler_with_settings


def _refuse_private_generate_copy() -> None:
    """``python -m mlx_lm.generate`` runs a second, private copy of mlx-lm's
    generate module as ``__main__``, which the import hook never sees: its
    speculative step would call the drafter as if it were a language model.
    Refuse with the commands that work."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == "mlx_lm.generate" and not getattr(main, "_mlx_lm_dspark_patched", False):
        print(
            "mlx-lm-dspark: `python -m mlx_lm.generate` runs a private copy of mlx-lm's generate module "
            "that cannot use a DSpark/DFlash drafter; run `mlx_lm.generate ...` or "
            "`python -m mlx_lm generate ...` instead.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _one_line_errors(main, prog: str):
    """``main`` with our user errors printed as ``prog: error: ...`` and exit
    status 2, like argparse's, instead of a traceback."""

    @functools.wraps(main)
    def main_with_clear_errors(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except loader.user_errors() as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return main_with_clear_errors


_BITS_CHOICES = f"one of {', '.join(map(str, loader.SUPPORTED_BITS))}, 'none' or 'auto'"


def _bits(value: str):
    word = value.strip().lower()
    if word == "none":
        return None
    if word == loader.AUTO:
        return loader.AUTO
    try:
        bits = int(word)
    except ValueError:
        bits = None
    if bits not in loader.SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"expected {_BITS_CHOICES}, got {value!r}")
    return bits


def _in_range(kind, low, high, what):
    """An argparse type: ``kind`` parsed and checked to lie in [low, high]."""

    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not low <= x <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return x

    return parse


_positive_int = _in_range(int, 1, float("inf"), "an integer >= 1")
_non_negative_int = _in_range(int, 0, float("inf"), "an integer >= 0")
_probability = _in_range(float, 0.0, 1.0, "a value in [0, 1]")


def _lookup_settings(value: str) -> str:
    """A --draft-lookup value, checked: the lookup specification it makes."""
    from ..lookup import LookupSpecError, RESERVED, parse_spec

    spec = f"{RESERVED}:{value}" if value.strip() else RESERVED
    try:
        parse_spec(spec)
    except LookupSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


class _DrafterDefault(argparse.Action):
    """Store the option and make it the default for drafters loaded next."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        loader.load_defaults[self.dest.removeprefix("draft_")] = values


def add_drafter_arguments(parser: argparse.ArgumentParser) -> None:
    loader.load_defaults.update(
        bits=loader.AUTO,
        group_size=None,
        block_size=None,
        confidence_threshold=None,
        lookup=None,
    )
    for action in parser._actions:
        if "--num-draft-tokens" in action.option_strings:
            # "not given" must stay distinguishable: a DSpark drafter then
            # drafts its whole block, an ordinary draft model keeps 3.
            action.default = None
            action.type = _non_negative_int
            action.help = (
                "Most tokens to draft per round (a DSpark/DFlash drafter proposes at most its block). "
                "Default: for DSpark/DFlash drafters, chosen each round from this machine's measured "
                f"costs and the drafter's acceptance; {LEGACY_NUM_DRAFT_TOKENS} for ordinary draft models."
            )
    group = parser.add_argument_group(
        "speculative drafter (mlx-lm-dspark)",
        "Options for DSpark/DFlash drafters given with --draft-model.",
    )
    group.add_argument(
        "--draft-bits",
        dest="draft_bits",
        type=_bits,
        action=_DrafterDefault,
        default=loader.AUTO,
        help=(
            f"Quantize the drafter to this many bits on load ({_BITS_CHOICES}); a drafter stored "
            "quantized at other settings is re-quantized, 'none' keeps the stored precision. "
            f"Default: auto ({loader.DEFAULT_BITS} bits for a float drafter, a quantized one as stored)."
        ),
    )
    group.add_argument(
        "--draft-block-size",
        dest="draft_block_size",
        type=_positive_int,
        action=_DrafterDefault,
        default=None,
        help="Block length to draft with, from 1 to the block the drafter was trained with. Default: the trained block.",
    )
    group.add_argument(
        "--draft-confidence",
        dest="draft_confidence_threshold",
        type=_probability,
        action=_DrafterDefault,
        default=None,
        help="Cut each proposal at the first slot whose confidence is below this value (DSpark only).",
    )
    group.add_argument(
        "--draft-lookup",
        dest="draft_lookup",
        nargs="?",
        const="",
        type=_lookup_settings,
        action=_DrafterDefault,
        default=None,
        metavar="SETTINGS",
        help=(
            "With a DSpark/DFlash drafter, let each round propose the continuation of an earlier "
            "occurrence of the last tokens instead, when the measured costs expect more tokens/s from it. "
            "SETTINGS as for --draft-model ngram:SETTINGS (e.g. n=4,min=2,k=8). "
            "(--draft-model ngram alone: lookup without a drafter.)"
        ),
    )


def patch_generate(generate_module) -> None:
    if not _once(generate_module):
        return
    from ..session import last_stats
    from ..speculative import bind, is_drafter, speculative_generate_step as ours

    # Ours takes every parameter of either shape (``stream`` too, which 0.31
    # callers never pass), so the wrapper forwards the caller's arguments.
    stock_step = guards.expect_shape(
        _expect_params(generate_module, "speculative_generate_step", []),
        f"{generate_module.__name__}.speculative_generate_step",
        SPECULATIVE_STEP_SHAPES,
        _fail,
    )
    _expect_calls(generate_module, "stream_generate", ["speculative_generate_step"])
    stock_stream = _expect_params(generate_module, "stream_generate", ["model", "draft_model"])
    stream_signature = inspect.signature(stock_stream)
    stream_options = next((p.name for p in stream_signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if stream_options is None:
        _fail(f"{generate_module.__name__}.stream_generate", "it no longer takes **kwargs for generate_step")
    from mlx_lm.models import cache as cache_module

    make_prompt_cache = _expect_params(cache_module, "make_prompt_cache", ["model", "max_kv_size"])
    setup_arg_parser = _expect_params(generate_module, "setup_arg_parser", [])
    stock_generate = _expect_params(generate_module, "generate", ["model", "tokenizer", "prompt", "verbose"])
    _expect_calls(generate_module, "main", ["setup_arg_parser", "load", "generate"])
    main = _expect_params(generate_module, "main", [])

    @functools.wraps(stock_step)
    def speculative_generate_step(prompt, model, draft_model, *args, **kwargs):
        if is_drafter(draft_model):
            _say_if_clamped(draft_model, kwargs.get("num_draft_tokens"))
            return ours(prompt, model, draft_model, *args, **kwargs)
        if kwargs.get("num_draft_tokens", 0) is None:
            kwargs["num_draft_tokens"] = LEGACY_NUM_DRAFT_TOKENS
        return stock_step(prompt, model, draft_model, *args, **kwargs)

    @functools.wraps(stock_stream)
    def stream_generate(*args, **kwargs):
        bound = stream_signature.bind(*args, **kwargs)
        options = bound.arguments.get(stream_options, {})
        if (is_drafter(bound.arguments.get("draft_model")) and options.get("max_kv_size") is not None
                and options.get("prompt_cache") is None):
            # generate_step's own cache for max_kv_size, made here because
            # stream_generate drops the option on the way to a draft model.
            options["prompt_cache"] = make_prompt_cache(bound.arguments["model"], max_kv_size=options.pop("max_kv_size"))
        return stock_stream(*bound.args, **bound.kwargs)

    @functools.wraps(setup_arg_parser)
    def setup_arg_parser_with_drafter():
        parser = setup_arg_parser()
        add_drafter_arguments(parser)
        return parser

    @functools.wraps(stock_generate)
    def generate(model, tokenizer, prompt, verbose=False, **kwargs):
        draft = kwargs.get("draft_model")
        if is_drafter(draft):
            bind(draft, model)  # a mismatched pair is refused before anything is printed
        text = stock_generate(model, tokenizer, prompt, verbose=verbose, **kwargs)
        stats = last_stats(draft) if verbose and is_drafter(draft) else None
        if stats is not None:
            print(stats.summary())
        return text

    generate_module.speculative_generate_step = speculative_generate_step
    generate_module.stream_generate = stream_generate
    generate_module.setup_arg_parser = setup_arg_parser_with_drafter
    generate_module.generate = generate
    generate_module.main = _one_line_errors(main, "mlx_lm.generate")


_clamps_said = set()


def _say_if_clamped(drafter, num_draft_tokens) -> None:
    """A --num-draft-tokens above what the drafter proposes per round is
    clamped to it; say so once per drafter and value."""
    if num_draft_tokens is None or num_draft_tokens <= drafter.max_drafts:
        return
    key = (id(drafter), num_draft_tokens)
    if key not in _clamps_said:
        _clamps_said.add(key)
        print(
            f"mlx-lm-dspark: num_draft_tokens {num_draft_tokens} is more than this drafter proposes per "
            f"round; drafting at most {drafter.max_drafts}.",
            file=sys.stderr,
        )


def _expect_method(cls, name: str, params):
    """Like ``_expect_params`` for a method of a host class."""
    func = getattr(cls, name, None)
    what = f"{cls.__module__}.{cls.__name__}.{name}"
    if not callable(func):
        _fail(what, "the method no longer exists")
    have = list(inspect.signature(func).parameters)
    missing = [p for p in params if p not in have]
    if missing:
        _fail(what, f"parameters {missing} are gone (it now takes {have})")
    return func


_handler_request = threading.local()  # the HTTP handler thread's current request context


class _ReportingQueue:
    """A request's response queue as the generation thread sees it: when the
    request ends (its ``None`` marker), the drafter's statistics for it are
    logged and attached to the request's context for the handler thread."""

    def __init__(self, queue, context_type, model_provider):
        self._queue = queue
        self._context_type = context_type
        self._provider = model_provider
        self._context = None

    def put(self, item, *args, **kwargs):
        from ..session import clear_last_stats, last_stats
        from ..speculative import is_drafter

        draft = self._provider.draft_model
        if isinstance(item, self._context_type):
            self._context = item
            if is_drafter(draft):
                clear_last_stats(draft)  # only this request's rounds are reported
        elif item is None and self._context is not None and is_drafter(draft):
            stats = last_stats(draft)
            if stats is not None:
                self._context.dspark_usage = stats.as_dict()
                logging.info(stats.summary())
        return self._queue.put(item, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


def _with_speculative_usage(response: dict) -> dict:
    context = getattr(_handler_request, "context", None)
    extra = getattr(context, "dspark_usage", None)
    if extra is not None and isinstance(response.get("usage"), dict):
        response["usage"]["speculative"] = extra
    return response


def argparse_with(adjust) -> types.ModuleType:
    """A copy of ``argparse`` whose parsers call ``adjust(parser)`` when they
    parse: how to change a parser the host builds inside a function."""

    class ArgumentParser(argparse.ArgumentParser):
        def parse_known_args(self, args=None, namespace=None):
            adjust(self)
            return super().parse_known_args(args, namespace)

    module = types.ModuleType("argparse")
    module.__dict__.update(argparse.__dict__)
    module.ArgumentParser = ArgumentParser
    return module


def patch_server(server) -> None:
    if not _once(server):
        return
    _expect_calls(server, "main", ["argparse", "ArgumentParser", "parse_args", "ModelProvider", "run"])
    responder, handler = server.ResponseGenerator, server.APIHandler
    for name in ("GenerationContext", "ResponseGenerator", "APIHandler"):
        if not isinstance(getattr(server, name, None), type):
            _fail(f"mlx_lm.server.{name}", "the class no longer exists")
    serve_single = guards.expect_shape(
        _expect_method(responder, "_serve_single", []),
        f"{server.__name__}.ResponseGenerator._serve_single",
        SERVE_SINGLE_SHAPES,
        _fail,
    )
    _expect_calls(responder, "_serve_single", ["stream_generate", "put"])
    generate = _expect_method(responder, "generate", ["request", "generation_args", "progress_callback"])
    validate = _expect_method(handler, "validate_model_parameters", [])
    generate_response = _expect_method(handler, "generate_response", ["prompt_token_count"])
    usage_response = _expect_method(handler, "completion_usage_response", ["prompt_token_count"])
    _expect_calls(handler, "do_POST", ["num_draft_tokens", "validate_model_parameters", "decode", "JSONDecodeError"])
    do_post = _expect_method(handler, "do_POST", [])
    run_http_server = _expect_params(server, "_run_http_server", ["host", "port", "response_generator", "server_class"])
    stock_server_class = inspect.signature(run_http_server).parameters["server_class"].default
    if not isinstance(stock_server_class, type) or not hasattr(stock_server_class, "request_queue_size"):
        _fail(f"{server.__name__}._run_http_server", "its server_class default is no longer a socketserver class")
    provider = server.ModelProvider if isinstance(getattr(server, "ModelProvider", None), type) else None
    if provider is None:
        _fail("mlx_lm.server.ModelProvider", "the class no longer exists")
    provider_init = _expect_method(provider, "__init__", ["cli_args"])
    _expect_method(provider, "load_default", [])
    _expect_calls(responder, "_generate", ["load_default"])
    main = _expect_params(server, "main", [])
    lru = getattr(server, "LRUPromptCache", None)
    if not isinstance(lru, type):
        _fail("mlx_lm.server.LRUPromptCache", "the class no longer exists")
    fetch_nearest = _expect_method(lru, "fetch_nearest_cache", ["model", "tokens"])
    from mlx_lm.models import cache as cache_module

    can_trim = _expect_params(cache_module, "can_trim_prompt_cache", ["cache"])
    trim = _expect_params(cache_module, "trim_prompt_cache", ["cache", "num_tokens"])

    @functools.wraps(fetch_nearest)
    def fetch_nearest_leaving_a_token(self, model, tokens):
        cache, rest = fetch_nearest(self, model, tokens)
        if cache is None or len(rest) or not len(tokens):
            return cache, rest
        # An exact hit leaves nothing to feed the model: re-feed the last
        # token, as a longer cached entry trimmed to the prompt does.
        if can_trim(cache):
            trim(cache, 1)
            return cache, list(tokens[-1:])
        return None, tokens

    def with_drafter_arguments(parser):
        if not any("--draft-bits" in a.option_strings for a in parser._actions):
            add_drafter_arguments(parser)

    server_argparse = argparse_with(with_drafter_arguments)

    @functools.wraps(serve_single)
    def _serve_single(self, request, *stream):
        queue, body, args = request
        refusal = _pair_refusal(self.model_provider)
        if refusal is not None:
            # Before the request's context: the handler answers it as an error
            # instead of dropping the connection after its 200 was queued.
            return queue.put(refusal)
        reporting = _ReportingQueue(queue, server.GenerationContext, self.model_provider)
        return serve_single(self, (reporting, body, args), *stream)

    @functools.wraps(generate)
    def generate_remembering_context(self, request, generation_args, progress_callback=None):
        context, tokens = generate(self, request, generation_args, progress_callback)
        _handler_request.context = context
        _live_contexts[id(context)] = context
        responses = _until_client_leaves(context, tokens, getattr(_handler_request, "connection", None))
        return context, _failing_as_generation(context, responses)

    @functools.wraps(validate)
    def validate_model_parameters(self):
        try:
            if self.num_draft_tokens is not None:
                validate(self)
                return _validate_limits(self)
            # Not given: the drafter's own cap (ordinary draft models: 3).
            self.num_draft_tokens = 0
            try:
                validate(self)
            finally:
                self.num_draft_tokens = None
            _validate_limits(self)
        except ValueError as e:
            raise _InvalidRequest(str(e)) from e

    @functools.wraps(do_post)
    def do_post_answering_every_request(self):
        _handler_request.connection = self.connection
        try:
            return do_post(self)
        except _ClientLeft:
            self.close_connection = True
            logging.info("Client disconnected: generation stopped")
        except UnicodeDecodeError as e:
            # The body is read and decoded before any header is sent.
            self._set_completion_headers(400)
            self.end_headers()
            self.wfile.write(json.dumps({"error": f"Request body is not UTF-8: {e}"}).encode())
        except _InvalidRequest as e:
            # mlx-lm < 0.32 lets validation errors drop the connection
            # (newer releases answer them before reaching here).
            self._set_completion_headers(400)
            self.end_headers()
            self.wfile.write(json.dumps({"error": str(e)}).encode())
        except _GenerationFailed as e:
            _answer_failed_generation(self, e)

    @functools.wraps(provider_init)
    def init_loading_drafter(self, cli_args, *args, **kwargs):
        provider_init(self, cli_args, *args, **kwargs)
        if getattr(cli_args, "model", None) is not None and getattr(cli_args, "draft_model", None) is not None:
            # At start-up rather than in the first request: loading, the
            # pair's checks and measuring the machine's costs (the
            # generation thread's own load_default then finds it loaded).
            self.load_default()
            _materialize(self.model, self.draft_model)
            _prepare_drafter(self.model, self.draft_model, cli_args)

    @functools.wraps(generate_response)
    def generate_response_with_usage(self, *args, **kwargs):
        return _with_speculative_usage(generate_response(self, *args, **kwargs))

    @functools.wraps(usage_response)
    def usage_response_with_speculative(self, *args, **kwargs):
        return _with_speculative_usage(usage_response(self, *args, **kwargs))

    server.argparse = server_argparse
    server.main = _one_line_errors(main, "mlx_lm.server")
    provider.__init__ = init_loading_drafter
    responder._serve_single = _serve_single
    responder.generate = generate_remembering_context
    handler.validate_model_parameters = validate_model_parameters
    lru.fetch_nearest_cache = fetch_nearest_leaving_a_token
    handler.do_POST = do_post_answering_every_request
    server._run_http_server = _with_server_class(run_http_server, _backlogged(stock_server_class))
    handler.generate_response = generate_response_with_usage
    handler.completion_usage_response = usage_response_with_speculative
    _patch_batched_drafting(server, responder, provider)


def _batched_drafting_host(server) -> bool:
    """Whether this mlx-lm's batch loop drives ``BatchGenerator`` the way
    ``batch.ServerBatch`` answers (stop sequences given per sequence: mlx-lm
    0.32); older ones serve requests with a drafter one at a time."""
    generator = getattr(server, "BatchGenerator", None)
    insert = getattr(generator, "insert_segments", None)
    return callable(insert) and "stop_sequences" in inspect.signature(insert).parameters


def _patch_batched_drafting(server, responder, provider) -> None:
    """Concurrent requests with a drafter join one batch
    (``batch.ServerBatch``) instead of queueing for one at a time: the
    provider calls a batchable pair batchable, ``_is_batchable`` lets in the
    requests the batched rounds decode exactly as served alone (no seed;
    a request's own ``num_draft_tokens`` becomes its row's cap), and the loop's
    ``BatchGenerator`` is ours for such a pair.  Each request's statistics
    reach its context as in the one-at-a-time path."""
    if not _batched_drafting_host(server):
        return
    is_batchable = _expect_method(responder, "_is_batchable", ["args"])
    load = _expect_method(provider, "_load", ["model_path", "adapter_path", "draft_model_path"])
    _expect_calls(responder, "_generate", ["BatchGenerator", "insert_segments", "next", "remove"])
    context_init = server.GenerationContext.__init__
    stock_generator = server.BatchGenerator
    providers = weakref.WeakSet()
    contexts = threading.local()  # the generation thread's newest GenerationContext and request's draft count

    @functools.wraps(context_init)
    def remembered_context(self, *args, **kwargs):
        context_init(self, *args, **kwargs)
        contexts.newest = self

    @functools.wraps(load)
    def load_judging_batchability(self, *args, **kwargs):
        load(self, *args, **kwargs)
        providers.add(self)
        if _batchable_pair(self):
            self.is_batchable = True

    @functools.wraps(is_batchable)
    def is_batchable_with_drafter(self, args):
        if not is_batchable(self, args):
            return False
        provider_ = self.model_provider
        if getattr(provider_, "draft_model", None) is None:
            return True
        contexts.num_draft_tokens = args.num_draft_tokens  # the request about to be inserted
        return getattr(provider_.cli_args, "kv_bits", None) is None

    def batch_generator(model, *args, **kwargs):
        from ..batch import ServerBatch

        owner = next((p for p in providers if p.model is model), None)
        if owner is None or not _batchable_pair(owner):
            return stock_generator(model, *args, **kwargs)
        batch = ServerBatch(model, owner.draft_model, num_draft_tokens=getattr(owner.cli_args, "num_draft_tokens", None),
                            prefill_step_size=kwargs.get("prefill_step_size", 2048), stream=kwargs.get("stream"))
        requests = {}

        def inserted(uid):
            requests[uid] = getattr(contexts, "newest", None)
            cap = getattr(contexts, "num_draft_tokens", None)
            if cap is not None:
                batch.caps[uid] = cap

        def finished(uid, stats):
            context = requests.pop(uid, None)
            if context is not None:
                context.dspark_usage = stats.as_dict()
            logging.info(stats.summary())

        def failed(uid, error):
            context = requests.pop(uid, None)
            if context is not None:
                context.dspark_error = error  # raised in the request's handler
                context.stop()  # and the batch loop drops the request

        batch.inserted, batch.finished, batch.failed = inserted, finished, failed
        return batch

    server.GenerationContext.__init__ = remembered_context
    provider._load = load_judging_batchability
    responder._is_batchable = is_batchable_with_drafter
    server.BatchGenerator = batch_generator


def _batchable_pair(provider) -> bool:
    """Whether the provider's loaded pair decodes in batched rounds: one of
    our drafters, a pair that binds, caches batched rounds roll back, no KV quantization."""
    from ..batch import unbatchable
    from ..speculative import is_drafter

    draft = getattr(provider, "draft_model", None)
    if not is_drafter(draft) or getattr(provider.cli_args, "kv_bits", None) is not None:
        return False
    if _pair_refusal(provider) is not None:
        return False
    from mlx_lm.models.cache import make_prompt_cache

    return unbatchable(make_prompt_cache(provider.model)) is None


LISTEN_BACKLOG = 128  # socketserver's default of 5 resets a burst of simultaneous clients
SEED_LIMIT = 2**64  # mx.random.seed takes an unsigned 64-bit integer


def _backlogged(server_class):
    """``server_class`` listening with a backlog of ``LISTEN_BACKLOG``."""
    return type(server_class.__name__, (server_class,), {"request_queue_size": LISTEN_BACKLOG})


_live_contexts = weakref.WeakValueDictionary()  # id -> the generation contexts of requests being answered


def _interrupt(signum, frame):
    """SIGINT/SIGTERM: stop every request's generation, then interrupt
    serve_forever as Ctrl-C does; mlx-lm's shutdown then waits for its
    generation thread, which otherwise finishes the streams in flight."""
    for context in list(_live_contexts.values()):
        context.stop()
    raise KeyboardInterrupt


def _with_server_class(run_http_server, server_class):
    @functools.wraps(run_http_server)
    def run_with_backlog(host, port, response_generator, server_class=server_class, **kwargs):
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            return run_http_server(host, port, response_generator, server_class=server_class, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    return run_with_backlog


def _vocab_and_context(provider):
    """(vocabulary size, context length) of the provider's loaded model;
    None where unknown (not loaded yet, or the model does not say)."""
    model = getattr(provider, "model", None)
    if model is None:
        return None, None
    args = getattr(model, "args", None)
    text = getattr(args, "text_config", None)
    def field(name):
        value = getattr(args, name, None)
        if value is None and isinstance(text, dict):
            value = text.get(name)
        return value if isinstance(value, int) and value > 0 else None

    vocab = field("vocab_size")
    if vocab is None:
        vocab = getattr(getattr(provider, "tokenizer", None), "vocab_size", None)
    return vocab, field("max_position_embeddings")


def _validate_limits(handler) -> None:
    """What mlx-lm's validation lets through and generation cannot take:
    ``logit_bias`` token ids outside the vocabulary (the logit-bias processor
    writes out of bounds), an empty ``prompt``, a ``seed`` outside [0, 2^64) (mx.random.seed
    raises in the generation thread) and a ``max_tokens`` beyond the
    model's context. Raises ValueError, which the handler answers with 400."""
    if handler.body.get("prompt", None) in ("", []):
        # An empty prompt kills mlx-lm's batch generation thread.
        raise ValueError("prompt must not be empty")
    seed = handler.seed
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    vocab, context = _vocab_and_context(handler.response_generator.model_provider)
    if handler.logit_bias and vocab is not None:
        outside = sorted(t for t in handler.logit_bias if not 0 <= t < vocab)
        if outside:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}): got {outside[:5]}")
    if context is not None and handler.max_tokens > context:
        raise ValueError(f"max_tokens must be at most {context} (the model's context), got {handler.max_tokens}")


class _InvalidRequest(ValueError):
    """A request parameter the server cannot serve (answered with 400)."""


class _ClientLeft(ConnectionError):
    """The client closed its connection while its request was generating."""


def _client_gone(connection) -> bool:
    """Whether the peer of ``connection`` has closed it (readable, and
    nothing left to read)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


CLIENT_CHECK_S = 0.05  # how often a generating request looks at its client's socket


def _until_client_leaves(context, responses, connection):
    """``responses``, stopping the request's generation when its client
    disconnects: a non-streaming client that gives up is otherwise noticed
    only when its answer is written, after generating every token, while
    requests with a drafter wait behind it.  The socket is looked at every
    ``CLIENT_CHECK_S`` seconds, not on every token."""
    checked = time.monotonic()
    for response in responses:
        if connection is not None and time.monotonic() - checked >= CLIENT_CHECK_S:
            checked = time.monotonic()
            if _client_gone(connection):
                context.stop()
                raise _ClientLeft()
        yield response


class _GenerationFailed(RuntimeError):
    """The generation of a request raised after its answer began."""


def _failing_as_generation(context, responses):
    """``responses``, raising ``_GenerationFailed`` when the request's
    generation failed: an error the generation thread queued (mlx-lm's
    one-at-a-time path) or one a batched round reported on the context."""
    try:
        for response in responses:
            error = getattr(context, "dspark_error", None)
            if error is not None:
                raise _GenerationFailed(f"{type(error).__name__}: {error}")
            yield response
    except (_ClientLeft, _GenerationFailed):
        raise
    except Exception as e:
        raise _GenerationFailed(f"{type(e).__name__}: {e}") from e


def _answer_failed_generation(handler, error) -> None:
    """A 500 naming the error where the answer has not started (mlx-lm
    sends a non-streaming answer's headers only with its body), else an
    error event ending the stream."""
    logging.error(f"Generation failed: {error}")
    message = json.dumps({"error": f"Generation failed: {error}"})
    handler.close_connection = True
    try:
        if getattr(handler, "stream", False):
            handler.wfile.write(f"data: {message}\n\n".encode())
        else:
            handler._headers_buffer = []  # the 200 queued, not sent
            handler._set_completion_headers(500)
            handler.end_headers()
            handler.wfile.write(message.encode())
        handler.wfile.flush()
    except OSError:
        pass  # the client is gone too


def _pair_refusal(provider):
    """The user error (a mismatched pair, say) that serving with the
    provider's loaded pair would raise, or None; binds the pair."""
    from ..speculative import bind, is_drafter

    draft = getattr(provider, "draft_model", None)
    if not is_drafter(draft):
        return None
    try:
        bind(draft, provider.model)
    except loader.user_errors() as e:
        return e
    return None


def _materialize(*models) -> None:
    """Evaluate every array the models hold, parameters or not (Gemma-4's
    RoPE keeps its frequencies as a private member, computed lazily when the
    model is built).  Loaded at start-up, in the main thread, they would
    otherwise be first evaluated in the server's generation thread, which
    does not own the stream they were built on ("There is no Stream(cpu, 0)
    in current thread")."""
    import mlx.core as mx

    arrays = []
    for model in models:
        if hasattr(model, "named_modules"):
            arrays += [v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)]
    mx.eval(arrays)


def _prepare_drafter(model, draft_model, cli_args) -> None:
    """Bind a DSpark/DFlash drafter to its target and, when requests may
    leave the draft count to the automatic cap, load or measure the pair's
    cost model."""
    from ..speculative import bind, cost_model, is_drafter

    if not is_drafter(draft_model):
        return
    target = bind(draft_model, model)
    if getattr(cli_args, "num_draft_tokens", None) is None:
        cost_model(draft_model, target)
