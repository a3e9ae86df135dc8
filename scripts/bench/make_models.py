"""Random-weight GGUF models in real model shapes, for speed comparisons (speed does not depend on training).

Shapes:
  qwen2.5-0.5b  qwen2 arch: hidden 896, intermediate 4864, 24 layers, 14/2 heads (head_dim 64),
                vocab 151936, tied embeddings (no output.weight), q/k/v bias, rope_theta 1e6.
  llama3.2-1b   llama arch: hidden 2048, intermediate 8192, 16 layers, 32/8 heads (head_dim 64),
                vocab 128256, tied, rope_theta 5e5 with Llama 3 scaling baked into rope_freqs.weight.

Each shape is written as F16 exactly as llama.cpp's convert_hf_to_gguf.py --outtype f16 lays it out
(gguf-py's GGUFWriter, llama.cpp key and tensor names, 2-D weights F16, norms/biases/rope_freqs F32, a
minimal byte-level BPE ("gpt2") tokenizer in the metadata), then Q8_0, Q4_0 and Q4_K_M are made from the
F16 file by llama.cpp's own `llama-quantize` (the same type mix as published GGUFs: e.g. for Q4_K_M most
tensors Q4_K, half of attn_v/ffn_down Q6_K, and fallbacks such as Q5_0/Q8_0 where a row length is not a
multiple of 256, as for Qwen2.5-0.5B's 896 and 4864).

Usage (python 3.11, `pip install -r scripts/bench/requirements.txt`):
  python scripts/bench/make_models.py [--out DIR] [--shapes qwen2.5-0.5b,llama3.2-1b]
      [--types f16,q8_0,q4_0,q4_k_m] [--llama-quantize PATH]
DIR defaults to $METAL_CANDLE_BENCH_CACHE/models (else ~/.cache/metal-candle-bench/models). llama-quantize
defaults to the one scripts/bench/build_llama_cpp.sh builds (it is built if missing). Files that already
exist are kept. Prints the path of every file, one per line, on stdout.
Deterministic: fixed seeds, so rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf  # gguf==0.19.0 (llama.cpp's gguf-py)
import numpy as np

HERE = Path(__file__).resolve().parent
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context: int
    qkv_bias: bool
    llama3_rope: bool
    pre: str
    specials: tuple[tuple[int, str], ...]
    bos: int
    eos: int
    add_bos: bool


SHAPES = {
    s.name: s
    for s in [
        Shape(
            name="qwen2.5-0.5b",
            arch="qwen2",
            vocab=151936,
            hidden=896,
            inter=4864,
            layers=24,
            heads=14,
            kv_heads=2,
            head_dim=64,
            rope_theta=1e6,
            rms_eps=1e-6,
            context=32768,
            qkv_bias=True,
            llama3_rope=False,
            pre="qwen2",
            specials=((151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>")),
            bos=151643,
            eos=151645,
            add_bos=False,
        ),
        Shape(
            name="llama3.2-1b",
            arch="llama",
            vocab=128256,
            hidden=2048,
            inter=8192,
            layers=16,
            heads=32,
            kv_heads=8,
            head_dim=64,
            rope_theta=5e5,
            rms_eps=1e-5,
            context=131072,
            qkv_bias=False,
            llama3_rope=True,
            pre="llama-bpe",
            specials=(
                (128000, "<|begin_of_text|>"),
                (128001, "<|end_of_text|>"),
                (128006, "<|start_header_id|>"),
                (128007, "<|end_header_id|>"),
                (128009, "<|eot_id|>"),
            ),
            bos=128000,
            eos=128009,
            add_bos=True,
        ),
    ]
}

# llama-quantize type names; output file suffixes.
QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tokenizer(shape: Shape) -> tuple[list[str], list[int], list[str]]:
    """A minimal byte-level BPE vocabulary of the model's size: the 256 byte symbols, merged letter pairs
    (so the merge list is real), unique filler tokens, and the model's control tokens at their ids."""
    byte_syms = bytes_to_unicode()
    tokens = list(byte_syms)
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = []
    for a in letters:
        for b in letters:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    specials = dict(shape.specials)
    first_special = min(specials)
    while len(tokens) < first_special:
        tokens.append(f"[T{len(tokens)}]")
    while len(tokens) < shape.vocab:
        i = len(tokens)
        tokens.append(specials.get(i, f"<|reserved_{i}|>" if shape.arch == "llama" else f"[PAD{i}]"))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i in specials:
        types[i] = gguf.TokenType.CONTROL
    for i in range(first_special, shape.vocab):
        if i not in specials:
            types[i] = gguf.TokenType.CONTROL if shape.arch == "llama" else gguf.TokenType.USER_DEFINED
    assert len(tokens) == shape.vocab and len(set(tokens)) == shape.vocab
    return tokens, [int(t) for t in types], merges


def llama3_rope_freqs(shape: Shape) -> np.ndarray:
    """Llama 3.2's rope scaling factors as convert_hf_to_gguf.py bakes them into rope_freqs.weight."""
    factor, low_freq_factor, high_freq_factor, old_context = 32.0, 1.0, 4.0, 8192
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float32) / shape.head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_f16(shape: Shape, path: Path) -> None:
    rng = np.random.default_rng(20261121)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), shape.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"{shape.name}-shape (random weights)")
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.inter)
    w.add_block_count(shape.layers)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    if shape.arch == "llama":
        w.add_vocab_size(shape.vocab)
        w.add_rope_dimension_count(shape.head_dim)
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = tokenizer(shape)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(shape.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(shape.bos)
    w.add_eos_token_id(shape.eos)
    w.add_add_bos_token(shape.add_bos)

    def dense(name: str, out: int, inp: int, std: float = WEIGHT_STD) -> None:
        w.add_tensor(name, (rng.standard_normal((out, inp), dtype=np.float32) * std).astype(np.float16))

    def vec(name: str, n: int, mean: float, std: float) -> None:
        w.add_tensor(name, (mean + rng.standard_normal(n, dtype=np.float32) * std).astype(np.float32))

    h, q_out, kv_out = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    dense("token_embd.weight", shape.vocab, h)
    vec("output_norm.weight", h, 1.0, 0.02)
    if shape.llama3_rope:
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(shape))
    for i in range(shape.layers):
        p = f"blk.{i}"
        vec(f"{p}.attn_norm.weight", h, 1.0, 0.02)
        dense(f"{p}.attn_q.weight", q_out, h)
        dense(f"{p}.attn_k.weight", kv_out, h)
        dense(f"{p}.attn_v.weight", kv_out, h)
        if shape.qkv_bias:
            vec(f"{p}.attn_q.bias", q_out, 0.0, 0.02)
            vec(f"{p}.attn_k.bias", kv_out, 0.0, 0.02)
            vec(f"{p}.attn_v.bias", kv_out, 0.0, 0.02)
        dense(f"{p}.attn_output.weight", h, q_out)
        vec(f"{p}.ffn_norm.weight", h, 1.0, 0.02)
        dense(f"{p}.ffn_gate.weight", shape.inter, h)
        dense(f"{p}.ffn_up.weight", shape.inter, h)
        dense(f"{p}.ffn_down.weight", h, shape.inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)


def default_cache() -> Path:
    if "METAL_CANDLE_BENCH_CACHE" in os.environ:
        return Path(os.environ["METAL_CANDLE_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "metal-candle-bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_cache() / "models")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,llama3.2-1b")
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--llama-quantize", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    for t in types:
        if t != "f16" and t not in QUANT_TYPES:
            sys.exit(f"unknown type {t} (f16, {', '.join(QUANT_TYPES)})")
    quantize = args.llama_quantize
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if name not in SHAPES:
            sys.exit(f"unknown shape {name} ({', '.join(SHAPES)})")
        shape = SHAPES[name]
        f16 = args.out / f"{name}-shape.F16.gguf"
        if not f16.exists():
            print(f"writing {f16}", file=sys.stderr)
            write_f16(shape, f16)
        if "f16" in types:
            print(f16)
        for t in types:
            if t == "f16":
                continue
            out = args.out / f"{name}-shape.{QUANT_TYPES[t]}.gguf"
            if not out.exists():
                if quantize is None:
                    bindir = subprocess.run(
                        [str(HERE / "build_llama_cpp.sh")], check=True, capture_output=True, text=True
                    ).stdout.strip()
                    quantize = Path(bindir) / "llama-quantize"
                print(f"quantizing {out}", file=sys.stderr)
                tmp = out.with_suffix(".tmp")
                log = out.with_suffix(".quantize.log")
                with open(log, "w") as lf:
                    subprocess.run([str(quantize), str(f16), str(tmp), QUANT_TYPES[t]], check=True, stdout=lf, stderr=lf)
                tmp.rename(out)
            print(out)


if __name__ == "__main__":
    main()
