"""Load DSpark / DFlash drafter checkpoints (local or hub) into MLX.

Downloads go through mlx-lm's own helper (HF cache, progress bars), and
quantization is mlx's own ``nn.quantize``.  Whether a checkpoint is a drafter
is decided from its config.json alone.
"""

import glob
import json
from pathlib import Path
from typing import Optional, Union

from .config import is_drafter_config
from .registry import kind_for

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64

# Defaults for drafters loaded through mlx-lm's own ``load`` (the CLI sets
# them from --draft-bits / --draft-block-size / --draft-confidence).
load_defaults = {
    "bits": DEFAULT_BITS,
    "group_size": DEFAULT_GROUP_SIZE,
    "block_size": None,
    "confidence_threshold": None,
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_config(model_path: Union[str, Path]) -> Optional[dict]:
    """config.json of a local checkpoint directory, or None if there is none."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


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


def build_drafter(
    model_path: Path,
    config: dict,
    *,
    bits: Optional[int] = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    block_size: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    lazy: bool = False,
):
    """Build and load the drafter stored at ``model_path`` (config already read)."""
    import mlx.core as mx
    import mlx.nn as nn

    kind = kind_for(config)
    if kind is None:
        raise ValueError(
            f"{model_path} is not a DSpark/DFlash drafter checkpoint (its config.json has no "
            "Qwen3DSparkModel/Gemma4DSparkModel/DFlashDraftModel architecture and no drafter fields)."
        )
    model = kind.build(config)

    files = sorted(glob.glob(str(Path(model_path) / "model*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"No model*.safetensors in {model_path}: the drafter checkpoint is incomplete "
            "(expected config.json and model.safetensors)."
        )
    weights = {}
    for f in files:
        weights.update(mx.load(f))

    stored = config.get("quantization")
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
        raise ValueError(
            f"The weights in {model_path} do not match a {kind.name} drafter built from its "
            f"config.json: {e}"
        ) from e
    if bits and not stored:
        nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_should_quantize(group_size))
    model.eval()
    if not lazy:
        mx.eval(model.parameters())

    model.kind = kind.name
    model.source = str(model_path)
    if block_size is not None:
        model.block_size = block_size
    if confidence_threshold is not None:
        model.confidence_threshold = confidence_threshold
    return model


def load_drafter(
    path_or_repo: Union[str, Path],
    *,
    bits: Optional[int] = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    block_size: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    revision: Optional[str] = None,
):
    """Load a DSpark/DFlash drafter from a local path or a Hugging Face repo.

    ``bits`` quantizes the drafter on load (``None`` keeps the stored
    precision); ``block_size`` (<= the trained block) and
    ``confidence_threshold`` are run-time policy stored on the drafter.
    """
    from mlx_lm.utils import _download

    path = _download(str(path_or_repo), revision=revision)
    config = read_config(path)
    if config is None:
        raise FileNotFoundError(f"No config.json in {path}: not a model checkpoint.")
    if not is_drafter_config(config):
        raise ValueError(
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
    )


class DrafterVocabulary(int):
    """A drafter's vocabulary is its target's: it matches any tokenizer whose
    ids index the drafter's embedding rows.  The real check (vocab size,
    hidden size, taps, family) happens when the drafter is bound to a target."""

    def __eq__(self, other):
        return isinstance(other, int) and 0 < other <= int(self)

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
