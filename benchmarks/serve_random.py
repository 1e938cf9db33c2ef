"""`bitfold serve` over a random-weight model of a real shape, for serving benchmarks when no
checkpoint of that shape is at hand (nothing is downloaded, ever).

Speed does not depend on weight values, so, as in decode.py, the model is a real shape
(decode.py's SHAPES: llama3-8b, qwen2.5-7b, ...) with random weights, handed to bitfold's
normal loader through an in-memory ModelSource. The weights are drawn on the device one
tensor at a time as the loader asks for them (names and shapes from transformers' model
class built on the meta device), so no second copy of the model is ever held and the KV
cache gets what a real checkpoint would leave it. Initialization is transformers': normal(0,
0.02) matrices, unit norm weights.

The server needs a tokenizer covering the whole vocabulary (128,256 ids for llama3-8b) so that
every sampled id detokenizes. No Llama 3 tokenizer ships with a package, so a real tokenizer
(default: the embedded SmolLM2-135M's byte-level BPE, 49,152 ids) is padded with added tokens
`<|dummy_N|>` up to the shape's vocabulary: prompts are real text cut into real BPE tokens
(encoding is unchanged: the dummies never occur in text), and a random model's outputs, mostly
dummies, stream as text like any other token. `--export-tokenizer DIR` writes that tokenizer as
a small Hugging Face tokenizer folder, for machines without the model file.

    python benchmarks/serve_random.py --shape llama3-8b --port 8000          # + any `bitfold serve` flag
    python benchmarks/serve_random.py --shape llama3-8b --export-tokenizer .models/llama3-vocab-tokenizer
    python benchmarks/serve_random.py --shape llama3-8b --tokenizer .models/llama3-vocab-tokenizer
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import SHAPES  # noqa: E402  (also puts src/ on the path)

from bitfold.config import EngineConfig, ModelConfig  # noqa: E402
from bitfold.engine import LLMEngine, resolve_device  # noqa: E402
from bitfold.errors import BitfoldError  # noqa: E402
from bitfold.loader.source import ModelSource  # noqa: E402
from bitfold.loader.tokenizer import Tokenizer  # noqa: E402

# Smoke-test shapes for the CPU: decode.py's "tiny" with a real vocabulary, so that real text
# tokenizes into it.
SMOKE_SHAPES = {"tiny-128k": ("llama", {**SHAPES["tiny"][1], "vocab_size": 128256})}
ALL_SHAPES = {**SHAPES, **SMOKE_SHAPES}
MAX_POSITIONS = 8192  # Llama 3 8B's context
PAD_KEY = "bitfold_padding"  # in tokenizer_config.json: what the padded tokenizer was made from


# -- tokenizer ----------------------------------------------------------------------------------
def export_padded_tokenizer(base: str | None, vocab_size: int, folder: str) -> None:
    """Write `base`'s tokenizer (a model path; None = the embedded SmolLM2) padded with added
    tokens `<|dummy_N|>` to `vocab_size` ids, as tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken

    from bitfold.loader import open_model
    from bitfold.loader.default_model import default_model_path

    base = base or default_model_path()
    tok = open_model(base).load_tokenizer()
    if tok.vocab_size > vocab_size:
        raise BitfoldError(f"{base}'s tokenizer has {tok.vocab_size} ids, more than the model's {vocab_size}")
    backend = tok._backend  # noqa: SLF001 - the tokenizers.Tokenizer it wraps is what gets written out
    backend.add_tokens([AddedToken(f"<|dummy_{i}|>", special=False, normalized=False)
                        for i in range(tok.vocab_size, vocab_size)])
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size
    os.makedirs(folder, exist_ok=True)
    backend.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "add_bos_token": tok.add_bos,
              "add_eos_token": tok.add_eos, "chat_template": tok.chat_template,
              PAD_KEY: {"base": os.path.basename(os.path.normpath(base)), "base_vocab_size": tok.vocab_size,
                        "dummy_tokens": vocab_size - tok.vocab_size}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    sample = "The capital of France is Paris.\n\n<|im_start|>user 12345 é 日本"
    padded = Tokenizer.from_hf_folder(folder)
    if padded.encode(sample) != tok.encode(sample) or padded.eos_token_ids != tok.eos_token_ids:
        raise BitfoldError(f"{folder}: the padded tokenizer does not encode like {base}'s")


def load_tokenizer(path: str | None, vocab_size: int) -> tuple[Tokenizer, str]:
    """A tokenizer of exactly `vocab_size` ids and what it is: a folder written by
    export_padded_tokenizer, or any model path (None = the embedded SmolLM2) whose tokenizer is
    padded on the fly."""
    if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok, what = Tokenizer.from_hf_folder(path), describe_tokenizer(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export_padded_tokenizer(path, vocab_size, tmp)
            tok, what = Tokenizer.from_hf_folder(tmp), describe_tokenizer(tmp)
    if tok.vocab_size != vocab_size:
        raise BitfoldError(f"{path}: the tokenizer has {tok.vocab_size} ids, the model {vocab_size}")
    return tok, what


def describe_tokenizer(folder: str) -> str:
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        pad = json.load(f).get(PAD_KEY)
    if not pad:
        return f"the tokenizer of {folder}"
    return (f"{pad['base']}'s tokenizer ({pad['base_vocab_size']} ids) + {pad['dummy_tokens']} added dummy tokens "
            "`<|dummy_N|>` up to the model's vocabulary")


# -- model --------------------------------------------------------------------------------------
def meta_model(shape: str, max_positions: int):
    """transformers' model of `shape` on the meta device: parameter names, shapes and config, no memory."""
    import transformers as tf

    kind, dims = ALL_SHAPES[shape]
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    with torch.device("meta"):
        return model_cls(cfg_cls(**dims, max_position_embeddings=max_positions, tie_word_embeddings=False))


def random_source(shape: str, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0,
                  max_positions: int = MAX_POSITIONS) -> ModelSource:
    """A ModelSource of `shape` whose weights are drawn on `device` as they are read."""
    meta = meta_model(shape, max_positions)
    raw = meta.config.to_dict()
    raw["architectures"] = [type(meta).__name__]
    config = ModelConfig.from_hf(raw, f"random:{shape}")
    names = [(name, t.shape) for name, t in meta.state_dict().items()]
    std = meta.config.initializer_range

    def weights():
        gen = torch.Generator(device).manual_seed(seed)
        for name, size in names:
            t = torch.empty(size, dtype=dtype, device=device)
            if len(size) >= 2:
                t.normal_(0.0, std, generator=gen)
            else:  # norm weights 1, biases 0 (transformers' init)
                t.fill_(1.0 if "norm" in name else 0.0)
            yield name, t

    return ModelSource(path=f"random:{shape}", format="random", config=config, weights=weights,
                       load_tokenizer=lambda: tokenizer, max_context=max_positions)


def build_engine(shape: str, tokenizer: Tokenizer, config: EngineConfig, seed: int = 0) -> LLMEngine:
    device = resolve_device(config.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # the engine's "auto"
    return LLMEngine(config, source=random_source(shape, tokenizer, device, dtype, seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Every other flag goes to `bitfold serve` (see `bitfold serve --help`).")
    ap.add_argument("--shape", required=True, choices=sorted(ALL_SHAPES))
    ap.add_argument("--tokenizer", default=None, help="a padded tokenizer folder (--export-tokenizer), or a model "
                                                      "whose tokenizer gets padded (default: the embedded SmolLM2)")
    ap.add_argument("--export-tokenizer", metavar="DIR", default=None,
                    help="write the padded tokenizer to DIR and exit")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("-v", "--verbose", action="store_true")
    args, rest = ap.parse_known_args(argv)
    from bitfold.cli import build_parser
    from bitfold.server.cli import cmd_serve

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[bitfold] %(message)s")
    vocab = ALL_SHAPES[args.shape][1]["vocab_size"]
    try:
        if args.export_tokenizer:
            export_padded_tokenizer(args.tokenizer, vocab, args.export_tokenizer)
            print(f"wrote {args.export_tokenizer}: {describe_tokenizer(args.export_tokenizer)}")
            return 0
        serve_args = build_parser().parse_args(["-v"] * args.verbose + ["serve", *rest])
        tokenizer, what = load_tokenizer(args.tokenizer, vocab)
        print(f"[bitfold] random-weight {args.shape}; tokenizer: {what}", file=sys.stderr, flush=True)
        cmd_serve(serve_args, build_engine=lambda config: build_engine(args.shape, tokenizer, config, args.seed))
    except BitfoldError as e:
        print(f"bitfold: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
