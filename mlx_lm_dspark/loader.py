"""Load DSpark / DFlash drafter checkpoints (local or hub) into MLX.

Downloads go through mlx-lm's own helper (HF cache, progress bars), and
quantization is mlx's own ``nn.quantize``.  Whether a checkpoint is a drafter
is decided from its config.json alone.
"""

import json
from pathlib import Path
from typing import Optional, Union

from .config import DrafterConfigError, drafter_args, is_drafter_config, layout_of, unrecognised_drafter
from .registry import kind_for

DEFAULT_BITS = 4  # what a drafter stored in float is quantized to on load
DEFAULT_GROUP_SIZE = 64
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # mlx's affine quantization
AUTO = "auto"  # bits: DEFAULT_BITS for a float drafter, a quantized one as stored

# Defaults for drafters loaded through mlx-lm's own ``load`` (the CLI sets
# them from --draft-bits / --draft-block-size / --draft-confidence).
load_defaults = {
    "bits": AUTO,
    "group_size": None,
    "block_size": None,
    "confidence_threshold": None,
    "lookup": None,  # a lookup specification (``lookup.parse_spec``): its rounds may propose lookup drafts
}


class DrafterOptionError(ValueError):
    """A drafter option (bits, block size, confidence threshold) or path
    that cannot be used with this drafter; the message says what can."""


class DrafterFileError(DrafterConfigError, FileNotFoundError):
    """A drafter checkpoint that lacks a file it needs."""


def user_errors() -> tuple:
    """The errors a user's input causes (a bad checkpoint, option or pair):
    their messages say what is wrong and what to do, so a command line
    prints them as one line instead of a traceback."""
    from .target import DrafterMismatchError, UnsupportedCacheError

    return DrafterConfigError, DrafterOptionError, DrafterMismatchError, UnsupportedCacheError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_config(model_path: Union[str, Path]) -> Optional[dict]:
    """config.json of a local checkpoint directory, or None if there is none."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DrafterConfigError(
            f"{path} is not valid JSON ({e}): the checkpoint is damaged; re-download or re-convert it."
        ) from None
    if not isinstance(config, dict):
        raise DrafterConfigError(
            f"{path} holds a JSON {type(config).__name__}, not an object: the checkpoint is damaged; "
            "re-download or re-convert it."
        )
    return config


def names_lookup(path_or_repo) -> bool:
    """Whether a --draft-model value names the lookup proposer (``ngram``,
    ``ngram:n=4,k=8``) rather than a checkpoint: a local path of that name wins."""
    from .lookup import is_spec

    return is_spec(str(path_or_repo)) and not Path(str(path_or_repo)).exists()


def _lookup_settings(spec: str):
    from .lookup import LookupSpecError, parse_spec

    try:
        return parse_spec(spec)
    except LookupSpecError as e:
        raise DrafterOptionError(f"{spec!r}: {e}") from None


def load_lookup(spec: str = "ngram"):
    """The lookup proposer a specification names (``ngram``, ``ngram:n=4,min=2,k=8``)."""
    from .lookup import LookupDrafter

    return LookupDrafter(_lookup_settings(spec))


def with_lookup(drafter, spec: Optional[str] = "ngram"):
    """``drafter`` whose rounds may propose lookup drafts instead (``lookup.WithLookup``);
    ``spec`` None: the drafter as it is."""
    if spec is None:
        return drafter
    from .lookup import LookupSettings, WithLookup

    settings = _lookup_settings(spec)
    if "k=" not in spec.replace(" ", ""):
        settings = LookupSettings(n=settings.n, min_n=settings.min_n, k=max(1, drafter.max_drafts))
    return WithLookup(drafter, settings)


def has_tokenizer(model_path: Union[str, Path]) -> bool:
    return any((Path(model_path) / name).exists() for name in _TOKENIZER_FILES)


def _should_quantize(group_size):
    import mlx.nn as nn

    def predicate(path, module):
        if path.startswith("confidence_head"):
            return False  # a 1-row head: tiny, and its threshold is precision-sensitive
        if not isinstance(module, (nn.Linear, nn.Embedding)) or not hasattr(module, "to_quantized"):
            return False
        return module.weight.shape[-1] % group_size == 0

    return predicate


def _check_policy(model, block_size, confidence_threshold) -> None:
    trained = model.args.block_size
    if block_size is not None and not (isinstance(block_size, int) and 1 <= block_size <= trained):
        raise DrafterOptionError(
            f"block_size {block_size!r} is not available for this drafter: it was trained with blocks "
            f"of {trained}; give a block size from 1 to {trained} (--draft-block-size)."
        )
    if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
        raise DrafterOptionError(
            f"confidence threshold {confidence_threshold!r} is not a probability; give a value in [0, 1]."
        )


def _check_bits(bits) -> None:
    if bits not in (None, AUTO) and bits not in SUPPORTED_BITS:
        raise DrafterOptionError(
            f"cannot quantize a drafter to {bits!r} bits: mlx quantizes to "
            f"{', '.join(map(str, SUPPORTED_BITS))} bits (or 'none' keeps the stored precision)."
        )


def _read_weights(model_path: Path) -> dict:
    import mlx.core as mx

    files = sorted(Path(model_path).glob("model*.safetensors"))
    if not files:
        raise DrafterFileError(
            f"No model*.safetensors in {model_path}: the drafter checkpoint is incomplete "
            "(expected config.json and model.safetensors)."
        )
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx reports truncation and bad headers with assorted types
            raise DrafterConfigError(
                f"The weights file {f} cannot be read ({type(e).__name__}: {e}): it is truncated or "
                "damaged; re-download the checkpoint."
            ) from None
    return weights


def _stored_quantization(config: dict, model_path) -> Optional[dict]:
    stored = config.get("quantization")
    if not stored:
        return None
    if not (isinstance(stored, dict) and stored.get("bits") in SUPPORTED_BITS
            and isinstance(stored.get("group_size"), int) and stored["group_size"] > 0):
        raise DrafterConfigError(
            f"quantization is {stored!r}, expected {{\"bits\": one of {list(SUPPORTED_BITS)}, "
            f"\"group_size\": a positive integer}}: the checkpoint at {model_path} is malformed."
        )
    return stored


def _quantize(model, stored: Optional[dict], bits, group_size: Optional[int]) -> None:
    """Quantize on load: ``bits`` AUTO quantizes a float drafter to
    DEFAULT_BITS and keeps a quantized one as stored; a number re-quantizes a
    drafter stored at other settings (dequantized first); None keeps the
    stored precision.  ``group_size`` not given: the stored one, else 64."""
    import mlx.nn as nn

    if bits is None or (bits == AUTO and stored):
        return
    bits = DEFAULT_BITS if bits == AUTO else bits
    if group_size is None:
        group_size = stored["group_size"] if stored else DEFAULT_GROUP_SIZE
    if stored:
        if (stored["bits"], stored["group_size"]) == (bits, group_size):
            return
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_should_quantize(group_size))


def build_drafter(
    model_path: Path,
    config: dict,
    *,
    bits=AUTO,
    group_size: Optional[int] = None,
    block_size: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    lookup: Optional[str] = None,
    lazy: bool = False,
):
    """Build and load the drafter stored at ``model_path`` (config already read);
    ``lookup``: a lookup specification whose proposals its rounds may take instead."""
    import mlx.core as mx
    import mlx.nn as nn

    _check_bits(bits)
    if layout_of(config) is not None:  # DSpark/DFlash layouts: every field checked, the checkpoint named
        drafter_args(config, source=model_path)
    kind = kind_for(config)
    if kind is None:
        raise DrafterConfigError(unrecognised_drafter(config, model_path))
    try:
        model = kind.build(config)
    except DrafterConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise DrafterConfigError(f"{e} (the checkpoint at {model_path} is malformed)") from None
    _check_policy(model, block_size, confidence_threshold)

    weights = _read_weights(model_path)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    stored = _stored_quantization(config, model_path)
    if stored:
        nn.quantize(
            model,
            group_size=stored["group_size"],
            bits=stored["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise DrafterConfigError(
            f"The weights in {model_path} do not match a {kind.name} drafter built from its "
            f"config.json: {e}"
        ) from None
    vocab = getattr(model, "vocab", None)
    problem = vocab.problem() if vocab is not None else None
    if problem:
        raise DrafterConfigError(f"The draft vocabulary mapping in {model_path} is damaged: {problem}.")
    _quantize(model, stored, bits, group_size)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())

    model.kind = kind.name
    model.source = str(model_path)
    if block_size is not None:
        model.block_size = block_size
    if confidence_threshold is not None:
        model.confidence_threshold = confidence_threshold
    return with_lookup(model, lookup)


def load_drafter(
    path_or_repo: Union[str, Path],
    *,
    bits=AUTO,
    group_size: Optional[int] = None,
    block_size: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    revision: Optional[str] = None,
    lookup: Optional[str] = None,
):
    """Load a DSpark/DFlash drafter from a local path or a Hugging Face repo,
    or the lookup proposer (``"ngram"``, ``"ngram:n=4,min=2,k=8"``: no checkpoint).

    ``bits`` quantizes the drafter on load: by default a float drafter to
    4 bits and a quantized one as stored; a number (1-6 or 8) re-quantizes
    a drafter stored at other settings; ``None`` keeps the stored precision.
    ``block_size`` (<= the trained block) and ``confidence_threshold`` are
    run-time policy stored on the drafter.  ``lookup`` (a specification
    like ``"ngram"``): rounds may propose lookup drafts instead of the
    drafter's where the costs expect more tokens per second from them.
    """
    from mlx_lm.utils import _download

    if names_lookup(path_or_repo):
        return load_lookup(str(path_or_repo))

    path = _download(str(path_or_repo), revision=revision)
    config = read_config(path)
    if config is None:
        raise DrafterFileError(f"No config.json in {path}: not a model checkpoint.")
    if not is_drafter_config(config):
        raise DrafterOptionError(
            f"{path_or_repo} is not a DSpark/DFlash drafter (config.json has none of the drafter "
            "fields); load it with mlx_lm.load instead."
        )
    return build_drafter(
        path,
        config,
        bits=bits,
        group_size=group_size,
        block_size=block_size,
        confidence_threshold=confidence_threshold,
        lookup=lookup,
    )


class DrafterVocabulary(int):
    """A drafter's vocabulary is its target's, and a drafter has no tokenizer
    to compare: it equals any tokenizer's size, so mlx-lm's "tokenizer does
    not match" check passes, and the real check (vocab size, hidden size,
    taps, family), which can name the difference, happens when the drafter
    is bound to its target."""

    def __eq__(self, other):
        return isinstance(other, int) and other > 0

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = int.__hash__


class DrafterTokenizer:
    """Returned by ``mlx_lm.load`` for drafter repos, which ship no tokenizer."""

    def __init__(self, vocab_rows: int):
        self.vocab_size = DrafterVocabulary(vocab_rows)

    def __getattr__(self, name):
        raise AttributeError(
            f"A DSpark/DFlash drafter has no tokenizer of its own (asked for {name!r}); "
            "it decodes with its target model's tokenizer."
        )
