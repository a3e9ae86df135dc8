#!/usr/bin/env python3
"""Documents/s of all-MiniLM-L6-v2 on short sentences: metal-candle vs sentence-transformers (PyTorch
CPU), same threads, interleaved rounds, batch sizes 1, 32 and 256.

Each round runs, for every batch size, `metal-candle embed --repeat R` (median over R timed calls
after loading) and sentence-transformers' `encode` (median over R calls, batch_size = the batch),
alternating which goes first. The table prints the median over rounds and the ratio.

Usage:  python scripts/bench/embed_bench.py [--model DIR] [--bin target/release/metal-candle]
            [--threads 2] [--rounds 3] [--repeat 10]
Needs:  sentence-transformers==6.2.0 torch==2.15.0 transformers==5.23.0 (see
        scripts/fixtures/make_embedding_fixtures.py) and `cargo build --release --features cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCHES = [1, 32, 256]
WORDS = "the a quick brown fox jumps over lazy dog model vector search query document answer text".split()


def sentences(n: int) -> list[str]:
    """Short English sentences (8–14 words), deterministic."""
    out = []
    for i in range(n):
        k = 8 + i % 7
        out.append(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(k)).capitalize() + ".")
    return out


def ours(binary: str, model: str, texts: list[str], repeat: int, threads: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts) + "\n")
        path = f.name
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [binary, "embed", "--device", "cpu", "--model", model, "--file", path, "--repeat", str(repeat), "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    os.unlink(path)
    return json.loads(out.stdout.strip().splitlines()[-1])["docs_per_s"]


def theirs(st, texts: list[str], batch: int, repeat: int) -> float:
    st.encode(texts, batch_size=batch)  # warm-up
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        st.encode(texts, batch_size=batch)
        rates.append(len(texts) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/metal-candle/minilm/model"))
    ap.add_argument("--bin", default=str(REPO / "target/release/metal-candle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(args.model, device="cpu")
    results = {b: {"ours": [], "st": []} for b in BATCHES}
    for r in range(args.rounds):
        for b in BATCHES:
            texts = sentences(b)
            order = ["ours", "st"] if r % 2 == 0 else ["st", "ours"]
            for who in order:
                if who == "ours":
                    rate = ours(args.bin, args.model, texts, args.repeat, args.threads)
                else:
                    rate = theirs(st, texts, b, args.repeat)
                results[b][who].append(rate)
                print(f"round {r} batch {b} {who}: {rate:.1f} docs/s", file=sys.stderr)
    print(f"| batch | metal-candle docs/s | sentence-transformers docs/s | ratio |")
    print("| --- | --- | --- | --- |")
    for b in BATCHES:
        o, s = statistics.median(results[b]["ours"]), statistics.median(results[b]["st"])
        print(f"| {b} | {o:.1f} | {s:.1f} | {o / s:.2f}× |")


if __name__ == "__main__":
    main()
