"""Reproduce the demo pair shipped in ``mlx_lm_dspark/demo_pair``.

A small Qwen3-architecture code model trained from scratch on the Python
standard library's own source (every Python installation carries it), and
its DSpark drafter trained with ``mlx_lm_dspark.train`` against the
*quantized* target (the precision it is verified by at run time).  Both are
saved 4-bit.  The whole run takes about half an hour on a small CPU:

    python scripts/make_demo_pair.py                     # writes mlx_lm_dspark/demo_pair
    python scripts/make_demo_pair.py --out /tmp/pair --target-iters 50 --drafter-iters 20   # a smoke run

Steps: corpus (stdlib ``.py`` files, tests and GUI packages left out, a
fixed ~3 % of files held out) -> byte-level BPE tokenizer (Hugging Face
``tokenizers``, already an mlx-lm dependency) -> target trained with
mlx-lm's own trainer (``mlx_lm.tuner.trainer.train``, full weights) ->
4-bit with mlx-lm's ``quantize_model`` -> drafter trained with our trainer
-> drafter quantized 4-bit -> ``manifest.json`` with the corpus hash,
training settings, times and held-out numbers.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def use_fast_blas():
    """On Linux, mlx's CPU wheel links the reference BLAS, many times slower
    than OpenBLAS for training's float matmuls.  If an
    OpenBLAS is installed (Debian: ``apt install libopenblas0``), re-run this
    script with it preloaded so mlx's ``cblas_sgemm`` calls resolve to it.
    Not needed on a Mac (Metal / Accelerate)."""
    from mlx_lm_dspark.train import OPENBLAS_PATHS

    if sys.platform != "linux" or os.environ.get("MLX_LM_DSPARK_BLAS_CHECKED"):
        return
    os.environ["MLX_LM_DSPARK_BLAS_CHECKED"] = "1"
    lib = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
    if lib is None:
        print("note: no OpenBLAS found; training runs on mlx's reference BLAS and takes many hours "
              "(Debian/Ubuntu: apt install libopenblas0)", file=sys.stderr)
        return
    os.environ["LD_PRELOAD"] = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    use_fast_blas()

import mlx.core as mx
import mlx.optimizers as optim

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "mlx_lm_dspark" / "demo_pair"

# Not representative of ordinary library code, or not library code at all.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
             "site-packages", "dist-packages", "__pycache__"}
EOS = "<|endoftext|>"
MASK = "<|mask|>"

TARGET_CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- corpus


def corpus_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not set(p.relative_to(root).parts[:-1]) & SKIP_DIRS]
    return root, files


def is_held_out(rel: str) -> bool:
    """A fixed ~3 % of files, chosen by a hash of their path."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 32 == 0


def read_corpus(max_files=None):
    """(train texts, held-out texts, description) of the stdlib sources.
    ``max_files`` (smoke runs) keeps the first files and holds out the last."""
    root, files = corpus_files()
    if max_files:
        files = files[:max_files]
    train, held, digest = [], [], hashlib.sha256()
    for i, p in enumerate(files):
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        hold = i == len(files) - 1 if max_files else is_held_out(rel)
        (held if hold else train).append(text)
    info = {"python": sys.version.split()[0], "stdlib": str(root), "files": len(train) + len(held),
            "held_out_files": len(held), "bytes": sum(map(len, train + held)), "sha256": digest.hexdigest()}
    return train, held, info


def held_out_prompts(texts, n=10, context=12):
    """Code prompts from held-out files: the lines before a function
    definition, and the ``def`` line itself (what completion is asked next)."""
    prompts = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        at = next((i for i in range(context, len(lines)) if lines[i].lstrip().startswith("def ")), None)
        if at is not None:
            prompts.append("".join(lines[at - context : at + 1]))
        if len(prompts) == n:
            break
    return prompts


def write_prompts(texts, path: Path):
    """``{"turns": [prompt]}`` JSONL, the benchmark's --prompts-file format."""
    path.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in held_out_prompts(texts)))


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size, path: Path):
    """A byte-level BPE tokenizer (any text encodes; spaces and newlines
    round-trip exactly), saved as a Hugging Face fast tokenizer mlx-lm loads.
    No chat template: this is a base (completion) model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS,
                                        additional_special_tokens=[MASK], clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def chunks(texts, tokenizer, length):
    """Documents (each ended by EOS) concatenated and cut into rows of
    ``length + 1`` tokens (inputs and shifted targets)."""
    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_token_id)
    n = (len(ids) - 1) // length
    return [(ids[i * length : i * length + length + 1], 0) for i in range(n)], len(ids)


# ---------------------------------------------------------------- target


def train_target(train_rows, held_rows, vocab_size, args, out: Path):
    """Train the target from scratch with mlx-lm's trainer; save it in
    ``out`` (float) and return (model, config, stats)."""
    from mlx_lm.models import qwen3
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.utils import save_config, save_model

    config = dict(TARGET_CONFIG, vocab_size=vocab_size)
    if args.hidden_size:
        config.update(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
                      head_dim=args.hidden_size // config["num_attention_heads"])
    if args.num_layers:
        config["num_hidden_layers"] = args.num_layers
    mx.random.seed(args.seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    warmup = max(1, args.target_iters // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, args.target_lr, warmup),
         optim.cosine_decay(args.target_lr, args.target_iters - warmup, args.target_lr / 10)],
        [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.1)
    out.mkdir(parents=True, exist_ok=True)
    targs = TrainingArgs(batch_size=args.target_batch, iters=args.target_iters, val_batches=8,
                         steps_per_report=max(1, args.target_iters // 20), steps_per_eval=args.target_iters,
                         steps_per_save=args.target_iters, max_seq_length=args.target_seq + 1,
                         adapter_file=str(out / "training-weights.safetensors"))
    tic = time.perf_counter()
    train(model, optimizer, train_rows, held_rows, args=targs)
    seconds = time.perf_counter() - tic
    model.eval()
    val_loss = evaluate(model, held_rows, batch_size=args.target_batch, num_batches=-1,
                        max_seq_length=args.target_seq + 1)
    (out / "training-weights.safetensors").unlink(missing_ok=True)
    for p in out.glob("*_training-weights.safetensors"):
        p.unlink()
    save_model(out, model)
    save_config(dict(config), out / "config.json")
    return model, config, {"seconds": round(seconds), "held_out_loss": round(val_loss, 3),
                           "held_out_perplexity": round(math.exp(val_loss), 2)}


def quantize_target(model, config, tokenizer_dir: Path, out: Path, bits: int):
    from mlx_lm.utils import quantize_model, save_config, save_model

    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, dict(config), 64, bits)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


# ---------------------------------------------------------------- drafter


def train_drafter(target_dir: Path, texts, args, out: Path):
    """Train against the quantized target's own weights, dequantized: the
    same function as the 4-bit model, but on the CPU float matmuls (BLAS)
    run many times faster than mlx's quantized ones at training batch sizes."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from mlx_lm_dspark.train import TrainingArgs, train

    model, tokenizer = load(str(target_dir))
    model = dequantize_model(model)

    targs = TrainingArgs(block_size=args.block_size, num_layers=args.drafter_layers,
                         markov_rank=args.markov_rank, iters=args.drafter_iters,
                         batch_size=args.drafter_batch, seq_length=args.drafter_seq,
                         anchors_per_seq=args.anchors, learning_rate=args.drafter_lr,
                         save_every=max(1, args.drafter_iters // 10), eval_every=max(1, args.drafter_iters // 5),
                         eval_sequences=16, eval_tokens=48, seed=args.seed)
    tic = time.perf_counter()
    train((model, tokenizer), list(texts), targs, output=out)
    seconds = time.perf_counter() - tic
    history = json.loads((out / "trainer_state.json").read_text())["history"]
    evals = [h for h in history if "tau" in h]
    return {"seconds": round(seconds), "held_out": evals}


def quantize_drafter(src: Path, out: Path, bits: int):
    """The drafter as ``load_drafter(bits=...)`` quantizes it on load
    (confidence head kept in float), stored quantized."""
    from mlx.utils import tree_flatten

    from mlx_lm_dspark.loader import load_drafter

    drafter = load_drafter(str(src), bits=bits, group_size=64)
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": 64, "bits": bits}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(drafter.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- main


def _shown(path: Path) -> str:
    """A path as recorded in the manifest: relative to the checkout when inside it."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Where the pair is written (target/, drafter/).")
    p.add_argument("--work", type=Path, default=None, help="Scratch directory (default: a directory in the system temp dir).")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=None, help="Override the target's width (smoke runs).")
    p.add_argument("--num-layers", type=int, default=None, help="Override the target's depth (smoke runs).")
    p.add_argument("--max-files", type=int, default=None, help="Use only the first N corpus files (smoke runs).")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-iters", type=int, default=1000)
    p.add_argument("--target-batch", type=int, default=8)
    p.add_argument("--target-seq", type=int, default=256)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--drafter-only", action="store_true", help="Retrain only the drafter, for the target in --out.")
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--drafter-layers", type=int, default=2)
    p.add_argument("--markov-rank", type=int, default=64)
    p.add_argument("--drafter-iters", type=int, default=300)
    p.add_argument("--drafter-batch", type=int, default=8)
    p.add_argument("--drafter-seq", type=int, default=256)
    p.add_argument("--anchors", type=int, default=16)
    p.add_argument("--drafter-lr", type=float, default=1e-3)
    return p


def retrain_drafter(args, work, train_texts, held_texts, t0):
    """Train a new drafter for the target already in ``args.out``."""
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    log("training the drafter with mlx_lm_dspark.train (against the quantized target)")
    drafter_stats = train_drafter(args.out / "target", train_texts, args, work / "drafter")
    log(f"drafter: {drafter_stats}")
    shutil.rmtree(args.out / "drafter", ignore_errors=True)
    quantize_drafter(work / "drafter", args.out / "drafter", args.bits)
    write_prompts(held_texts, args.out / "held_out_prompts.jsonl")
    for key in ("block_size", "drafter_layers", "markov_rank", "drafter_iters", "drafter_batch", "drafter_seq",
                "anchors", "drafter_lr"):
        manifest["settings"][key] = getattr(args, key)
    manifest["drafter"] = drafter_stats
    manifest_path.write_text(json.dumps(manifest, indent=2))
    log(f"rewrote {args.out / 'drafter'} in {round(time.perf_counter() - t0)} s")


def main(argv=None):
    args = build_parser().parse_args(argv)
    work = args.work or Path(tempfile.gettempdir()) / "mlx_lm_dspark_demo_work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train_texts, held_texts, corpus = read_corpus(args.max_files)
    if args.drafter_only:
        return retrain_drafter(args, work, train_texts, held_texts, t0)
    log(f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB (Python {corpus['python']})")
    tokenizer = train_tokenizer(train_texts, args.vocab_size, work / "tokenizer")
    train_rows, n_train = chunks(train_texts, tokenizer, args.target_seq)
    held_rows, n_held = chunks(held_texts, tokenizer, args.target_seq)
    log(f"tokenizer: {len(tokenizer)} ids; {n_train} training tokens, {n_held} held out")

    log("training the target with mlx_lm.tuner.trainer.train")
    model, config, target_stats = train_target(train_rows, held_rows, len(tokenizer), args, work / "target-float")
    log(f"target: {target_stats}")
    shutil.rmtree(args.out, ignore_errors=True)
    quantize_target(model, config, work / "tokenizer", args.out / "target", args.bits)

    log("training the drafter with mlx_lm_dspark.train (against the quantized target)")
    drafter_stats = train_drafter(args.out / "target", train_texts, args, work / "drafter")
    log(f"drafter: {drafter_stats}")
    quantize_drafter(work / "drafter", args.out / "drafter", args.bits)

    manifest = {
        "corpus": corpus,
        "tokens": {"train": n_train, "held_out": n_held},
        "settings": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": {"config": config, **target_stats},
        "drafter": drafter_stats,
        "total_seconds": round(time.perf_counter() - t0),
        "mlx": mx.__version__,
    }
    write_prompts(held_texts, args.out / "held_out_prompts.jsonl")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"wrote {args.out} in {manifest['total_seconds']} s")


if __name__ == "__main__":
    main()
