"""Every GGUF tensor type bitfold claims to read (`SUPPORTED_TYPES`), end to end, against
transformers' own GGUF loading as the independent reference.

A tiny llama is written with `gguf.GGUFWriter` the way llama.cpp's converter writes one: its
metadata keys, a small byte-level BPE ("gpt2") tokenizer, GGUF tensor names, and the rows of
attn_q / attn_k permuted for interleaved rotary. The 2-D weights take the supported types round
robin (norms stay F32): F16/BF16/Q8_0/Q4_x/Q5_x quantize the real weights with `gguf.quants`;
K-quants, which `gguf` cannot quantize, are valid blocks crafted from random quant bytes with
small fp16 super-block scales. Checked: every type is in the file; bitfold's loaded weights and
transformers' equal the dequantized bytes in HF row order exactly; logits through bitfold's paged
cache (chunked prefill, batched decode) equal transformers' to < 1e-4; the tokenizers agree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from bitfold.loader import open_model  # noqa: E402
from bitfold.loader.gguf_file import SUPPORTED_TYPES  # noqa: E402
from bitfold.loader.gguf_reader import GGUFFile  # noqa: E402
from bitfold.weights.packed import as_float  # noqa: E402
from tests.helpers import PagedDriver, gpt2_bytes_to_unicode, rel_err  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, CTX = 256, 512, 2, 4, 2, 256  # K-quant rows: multiples of 256
ROPE_THETA, EPS = 50000.0, 1e-5  # not the defaults, so the metadata must be read

# K-quant block layouts (gguf/quants.py dequantizers): byte offset of the fp16 `d`, of `dmin`
# (None where the format has none), and dmin/d so that E[d*sc*q] ~= E[dmin*m] (roughly zero-mean
# weights). `d` is scaled per type so the dequantized weights have std ~0.05, like the rest:
#   Q2_K  scales[16] qs[64] d dmin          (84 B)   x = d*(sc&15)*q - dmin*(sc>>4), q in 0..3
#   Q3_K  hmask[32] qs[64] scales[12] d     (110 B)  x = d*(sc6-32)*q, q in -4..3
#   Q4_K  d dmin scales[12] qs[128]         (144 B)  x = d*sc6*q - dmin*m6, q in 0..15
#   Q5_K  d dmin scales[12] qh[32] qs[128]  (176 B)  x = d*sc6*q - dmin*m6, q in 0..31
#   Q6_K  ql[128] qh[64] scales[16]i8 d     (210 B)  x = d*sc8*(q-32), q in 0..63
K_QUANTS = {Q.Q2_K: (80, 82, 1.5, 3.6e-3), Q.Q3_K: (108, None, 0.0, 1.15e-3), Q.Q4_K: (0, 2, 7.5, 2.0e-4),
            Q.Q5_K: (0, 2, 15.5, 1.0e-4), Q.Q6_K: (208, None, 0.0, 3.6e-5)}
K_QUANTS_NAMES = [t.name for t in K_QUANTS]

# GGUF name stem -> HF name stem, in HF parameter order.
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def make_vocab() -> tuple[list[str], list[str], list[int]]:
    """256 byte tokens, a few merges (with their merged tokens), then <s> and </s> (CONTROL)."""
    byte_tokens = [gpt2_bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "Ġ a", "Ġa n", "Ġ w", "o r", "Ġw or", "l d",
              "Ġwor ld", "l l", "e ll", "h ell", "hell o"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = byte_tokens + merged + ["<s>", "</s>"]
    assert len(set(tokens)) == len(tokens)
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2
    return tokens, merges, [int(t) for t in types]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (n_head = KV heads for K). Acts on
    rows, so it applies equally to float rows and to rows of quantized blocks."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def craft_k_quant(rows: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Valid K-quant blocks for [rows, 256]: random quant/scale bytes, small finite fp16 d (and dmin)."""
    od, om, ratio, d_base = K_QUANTS[qtype]
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (rows * HIDDEN // 256, type_size), dtype=np.uint8)
    d = (d_base * rng.uniform(0.8, 1.2, len(blocks))).astype(np.float16)
    blocks[:, od:od + 2] = d.view(np.uint8).reshape(-1, 2)
    if om is not None:
        blocks[:, om:om + 2] = (d.astype(np.float32) * ratio).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_QUANTS:
        return craft_k_quant(w.shape[0], qtype, rng)
    return gguf.quants.quantize(w, qtype)  # F32 -> float32, F16 -> float16, others -> uint8 blocks


def tiny_llama_writer(path, name: str, file_type=None):
    """A GGUFWriter for the tiny llama of this file (shapes above, `make_vocab`'s tokenizer), its
    metadata written; the caller adds tensors (`add_llama_tensor`) and calls `finish_gguf`."""
    tokens, merges, token_types = make_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    return w


def add_llama_tensor(w, gname: str, raw, qtype) -> None:
    """Add tensor `gname` (raw: HF row order, as `encode` returns it): q/k rows permuted into
    llama.cpp's rotary order, as its converter writes them."""
    if gname.endswith("attn_q.weight"):
        raw = permute(raw, HEADS)
    elif gname.endswith("attn_k.weight"):
        raw = permute(raw, KV_HEADS)
    # For raw bytes (uint8) the writer derives the element shape from the byte shape itself;
    # passing raw_shape= the element shape [rows, 256] would be misread as a byte shape.
    w.add_tensor(gname, np.ascontiguousarray(raw), raw_dtype=qtype if raw.dtype == np.uint8 else None)


def finish_gguf(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_model(path) -> tuple[dict, dict]:
    """Write the tiny llama GGUF. Returns ({HF name: float32 weight in HF row order, decoded from the
    bytes written}, {HF name: GGUF type name})."""
    vocab = len(make_vocab()[0])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=CTX, rms_norm_eps=EPS, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    w = tiny_llama_writer(path, "bitfold tiny all-types llama", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)

    names = [("token_embd.weight", "model.embed_tokens.weight")]
    for i in range(LAYERS):
        names += [(f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight") for g, h in LAYER_NAMES.items()]
    names += [("output_norm.weight", "model.norm.weight"), ("output.weight", "lm_head.weight")]

    rng = np.random.default_rng(0)
    cycle = [getattr(Q, t) for t in SUPPORTED_TYPES]
    truth, types, n_2d = {}, {}, 0
    for gname, hname in names:
        hw = state[hname]
        if hw.ndim == 1:  # norms stay F32
            qtype = Q.F32
        else:
            qtype, n_2d = cycle[n_2d % len(cycle)], n_2d + 1
        raw = encode(hw, qtype, rng)  # HF row order
        dec = gguf.quants.dequantize(raw, qtype).reshape(hw.shape)
        assert dec.dtype == np.float32 and np.isfinite(dec).all(), gname
        assert 0.01 < dec.std() < 0.2 or hw.ndim == 1, (gname, qtype.name, dec.std())
        truth[hname], types[hname] = dec, qtype.name
        add_llama_tensor(w, gname, raw, qtype)
    finish_gguf(w)
    return truth, types


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("all-types") / "tiny-all-types.gguf"
    truth, types = build_model(path)
    return path, truth, types


@pytest.fixture(scope="module")
def bitfold_weights(tiny_gguf):
    path, _, _ = tiny_gguf
    # Q4_0/Q4_1/Q4_K/Q2_K tensors arrive packed (test_gguf_blocks.py); their floats are what counts here
    return {n: as_float(w, w.shape[-1]) for n, w in open_model(str(path)).weights()}


@pytest.fixture(scope="module")
def hf_model(tiny_gguf):
    """transformers' own GGUF loader (gguf.GGUFReader + gguf.dequantize + its reverse permute)."""
    path, _, _ = tiny_gguf
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def test_file_has_every_supported_type(tiny_gguf):
    path, _, types = tiny_gguf
    ref = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    by_type: dict[str, list[str]] = {}
    for r, t in zip(ref.tensors, ours.tensors):
        assert (t.name, t.tensor_type) == (r.name, r.tensor_type)
        if len(r.shape) == 2:
            by_type.setdefault(r.tensor_type.name, []).append(r.name)
        else:
            assert r.tensor_type is Q.F32, r.name
    assert sorted(by_type) == sorted(SUPPORTED_TYPES), by_type
    assert sorted(set(types.values())) == sorted(SUPPORTED_TYPES)
    # The permuted Q/K rows are exercised under block quants as well as float types.
    qk = {types[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in range(LAYERS) for p in "qk"}
    assert qk & set(K_QUANTS_NAMES) and qk & {"F16", "BF16", "F32"}
    for key in ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.context_length", "llama.vocab_size",
                "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert key in ref.fields, key


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_loaded_weights_equal_the_decoded_bytes(type_name, tiny_gguf, bitfold_weights, hf_model):
    """Per type: bitfold's loaded weights (un-permuted) and transformers' are bit-identical to the
    written bytes decoded by gguf in HF row order."""
    _, truth, types = tiny_gguf
    hf_state = hf_model.state_dict()
    names = [n for n, t in types.items() if t == type_name]
    assert names
    for name in names:
        want = torch.from_numpy(truth[name])
        assert bitfold_weights[name].dtype == torch.float32, name
        assert torch.equal(bitfold_weights[name], want), f"bitfold {name} ({type_name})"
        assert torch.equal(hf_state[name], want), f"transformers {name} ({type_name})"


def test_config_matches(tiny_gguf, hf_model):
    path, _, _ = tiny_gguf
    ours, theirs = open_model(str(path)).config, hf_model.config
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads, ours.num_kv_heads,
            ours.head_dim, ours.vocab_size, ours.tie_word_embeddings) == \
           (theirs.hidden_size, theirs.intermediate_size, theirs.num_hidden_layers, theirs.num_attention_heads,
            theirs.num_key_value_heads, theirs.head_dim, theirs.vocab_size, False)
    assert ours.rope_theta == ROPE_THETA and ours.rms_norm_eps == pytest.approx(EPS)
    rope = getattr(theirs, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(theirs, "rope_theta", None)) == ROPE_THETA


def test_prefill_and_decode_logits_match_transformers(tiny_gguf, hf_model):
    path, _, _ = tiny_gguf
    vocab = hf_model.config.vocab_size
    drv = PagedDriver(str(path), num_blocks=64, block_size=4)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 13, 22)]
    reqs = [drv.new(s) for s in seqs]

    def ref(ids):
        with torch.no_grad():
            return hf_model(torch.tensor([ids])).logits[0].float()

    # Chunked prefill through the paged cache: seq 2 in two chunks, batched with the others.
    a, b = drv.step([(reqs[0], 7), (reqs[2], 9)])
    c, d = drv.step([(reqs[1], 13), (reqs[2], 13)])
    full = {0: ref(seqs[0]), 1: ref(seqs[1]), 2: ref(seqs[2])}
    for got, want in ((a, full[0]), (c, full[1]), (torch.cat([b, d]), full[2])):
        assert torch.isfinite(got).all()
        assert want.abs().max() > 1.0  # logits of a sane size, not vanishing
        assert rel_err(got, want) < 1e-4
    for _ in range(2):  # batched decode steps
        for r, s in zip(reqs, seqs):
            t = int(torch.randint(0, vocab, (1,), generator=g))
            s.append(t)
            r.output_token_ids.append(t)
        outs = drv.step([(r, 1) for r in reqs])
        for o, s in zip(outs, seqs):
            assert rel_err(o, ref(s)[-1:]) < 1e-4


def test_tokenizer_matches_transformers(tiny_gguf):
    path, _, _ = tiny_gguf
    ours = open_model(str(path)).load_tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ("hello world", "the world and the other", "Hello, wörld! 日本語 🦙\n\tx", "</s> and <s>"):
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert any(i >= 256 for i in ours.encode(" the world", add_special_tokens=False))  # merges are used
