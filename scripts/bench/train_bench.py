#!/usr/bin/env python3
"""LoRA training throughput and peak memory: `metal-candle train-lora` vs PyTorch + PEFT, CPU.

Both train the same f32 weights (SmolLM2-135M-Instruct: transformers dequantizes the GGUF and
`save_pretrained`s it once to WORK/hf), the same adapter (rank 8, alpha 16, q_proj + v_proj,
AdamW lr 1e-4), the same batches (batch 4 × 256 random token ids, every label counted), and the
same thread count. Runs alternate (ours, ours with --grad-checkpoint, torch, …: one interleaved run) so a
machine whose load drifts hurts both alike. Tokens/s counts input tokens over the timed steps
(the first step of each run is a warm-up and not timed); peak RSS is the process's
`ru_maxrss` (each side runs as its own child process).

Usage:  /tmp/venv-train/bin/python scripts/bench/train_bench.py --gguf SMOLLM2.gguf \\
            --bin target/release/metal-candle [--threads 2] [--steps 4] [--rounds 1] [--work DIR]
Prints one JSON line per run and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQ, RANK, ALPHA, LR = 4, 256, 8, 16.0, 1e-4


def make_hf(gguf: Path, out: Path) -> None:
    if (out / "config.json").exists():
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: write the f32 weights and the
    # config ourselves (tied lm_head left out, as save_pretrained does).
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def make_data(hf: Path, out: Path, rows: int, seed: int = 0) -> None:
    import random

    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    with open(out, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": [rng.randrange(1, vocab) for _ in range(SEQ)]}) + "\n")


def torch_worker(hf: Path, data: Path, steps: int, threads: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    rows = [json.loads(l)["input_ids"] for l in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    times = []
    for s in range(steps + 1):
        batch = torch.tensor(rows[(s * BATCH) % len(rows):][:BATCH])
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    timed = times[1:]
    print(json.dumps({"side": "torch", "tokens_per_s": BATCH * SEQ * len(timed) / sum(timed), "step_s": timed}))


def child(cmd: list[str], env: dict) -> tuple[str, int, float]:
    """Runs `cmd`; returns its stdout, its own peak RSS in bytes (wait4's ru_maxrss) and wall time."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env})
        stdout = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # reaped here, not by Popen: its own rusage
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if p.returncode:
            err.seek(0)
            sys.exit(f"{cmd[0]} failed:\n{err.read()}")
    return stdout, usage.ru_maxrss * 1024, wall


def ours(binary: Path, hf: Path, data: Path, steps: int, threads: int, work: Path, checkpoint: bool = False) -> dict:
    cmd = [str(binary), "train-lora", "--model", str(hf), "--data", str(data), "--out", str(work / "ours-out"),
           "--targets", "q_proj,v_proj", "--rank", str(RANK), "--alpha", str(ALPHA), "--lr", str(LR),
           "--batch-size", str(BATCH), "--steps", str(steps + 1), "--max-seq-len", str(SEQ), "--threads", str(threads),
           "--device", "cpu", "--json"] + (["--grad-checkpoint"] if checkpoint else [])
    stdout, rss, wall = child(cmd, {"RAYON_NUM_THREADS": str(threads)})
    lines = [json.loads(l) for l in stdout.splitlines() if '"loss"' in l]
    elapsed = [l["elapsed_s"] for l in lines]
    timed = [elapsed[i] - elapsed[i - 1] for i in range(1, len(elapsed))]
    return {"side": "ours-grad-checkpoint" if checkpoint else "ours", "tokens_per_s": BATCH * SEQ * len(timed) / sum(timed), "peak_rss_bytes": rss, "step_s": timed, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--bin", type=Path, default=Path("target/release/metal-candle"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/metal-candle-train-bench"))
    ap.add_argument("--torch-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        torch_worker(a.torch_worker[0], a.torch_worker[1], a.steps, a.threads)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    hf, data = a.work / "hf", a.work / "data.jsonl"
    make_hf(a.gguf, hf)
    make_data(hf, data, BATCH * (a.steps + 1))
    results = []
    for _ in range(a.rounds):
        for checkpoint in (False, True):
            r = ours(a.bin, hf, data, a.steps, a.threads, a.work, checkpoint)
            print(json.dumps(r), flush=True)
            results.append(r)
        stdout, rss, _ = child([sys.executable, __file__, "--torch-worker", str(hf), str(data), "--steps", str(a.steps), "--threads", str(a.threads)],
                               {"OMP_NUM_THREADS": str(a.threads)})
        t = json.loads(stdout.strip().splitlines()[-1])
        t["peak_rss_bytes"] = rss
        print(json.dumps(t), flush=True)
        results.append(t)
    def best(side: str, key: str):
        return max(r[key] for r in results if r["side"] == side)
    print(json.dumps({"summary": True, "threads": a.threads, "batch": BATCH, "seq": SEQ, "rank": RANK,
                      "ours_tokens_per_s": best("ours", "tokens_per_s"), "torch_tokens_per_s": best("torch", "tokens_per_s"),
                      "ours_peak_rss_mb": best("ours", "peak_rss_bytes") / 1e6,
                      "ours_grad_checkpoint_tokens_per_s": best("ours-grad-checkpoint", "tokens_per_s"),
                      "ours_grad_checkpoint_peak_rss_mb": best("ours-grad-checkpoint", "peak_rss_bytes") / 1e6,
                      "torch_peak_rss_mb": max(r["peak_rss_bytes"] for r in results if r["side"] == "torch") / 1e6}))


if __name__ == "__main__":
    main()
