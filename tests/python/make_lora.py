#!/usr/bin/env python3
"""Writes a PEFT LoRA adapter directory for SmolLM2-135M-Instruct with seeded random A/B.

SmolLM2-135M is a llama model: hidden 576, 30 layers, 9 attention heads and 3 KV heads of
head_dim 64 (q_proj 576 -> 576, k_proj/v_proj 576 -> 192, o_proj 576 -> 576), MLP intermediate
1536 (gate_proj/up_proj 576 -> 1536, down_proj 1536 -> 576).

The directory gets `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with float32 `base_model.model.model.layers.{i}.<module>.lora_A.weight`
([r, in]) and `.lora_B.weight` ([out, r]). B is non-zero (PEFT initialises it to zero, which would
make the adapter a no-op) and large enough that greedy output differs from the base model.

    python make_lora.py OUT_DIR [--seed N] [--rank R] [--alpha A] [--targets q_proj,v_proj] [--b-std S]
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

HIDDEN = 576
LAYERS = 30
HEADS = 9
KV_HEADS = 3
HEAD_DIM = 64
INTERMEDIATE = 1536

# module -> (path inside a layer, in_features, out_features)
MODULES = {
    "q_proj": ("self_attn.q_proj", HIDDEN, HEADS * HEAD_DIM),
    "k_proj": ("self_attn.k_proj", HIDDEN, KV_HEADS * HEAD_DIM),
    "v_proj": ("self_attn.v_proj", HIDDEN, KV_HEADS * HEAD_DIM),
    "o_proj": ("self_attn.o_proj", HEADS * HEAD_DIM, HIDDEN),
    "gate_proj": ("mlp.gate_proj", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp.up_proj", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp.down_proj", INTERMEDIATE, HIDDEN),
}


def make_lora(out_dir, seed=0, rank=8, alpha=16.0, targets=("q_proj", "v_proj"), b_std=0.2):
    """Writes the adapter into `out_dir` (created) and returns the tensors written."""
    unknown = [t for t in targets if t not in MODULES]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; known: {sorted(MODULES)}")
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for target in targets:
            path, fan_in, fan_out = MODULES[target]
            key = f"base_model.model.model.layers.{layer}.{path}"
            # A like PEFT's kaiming-uniform init scale; B random instead of PEFT's zeros.
            a = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(rank, fan_in)).astype(np.float32)
            b = rng.normal(0.0, b_std, size=(fan_out, rank)).astype(np.float32)
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--b-std", type=float, default=0.2, help="standard deviation of the lora_B entries")
    args = p.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    tensors = make_lora(args.out_dir, args.seed, args.rank, args.alpha, targets, args.b_std)
    print(f"wrote {args.out_dir}: {len(tensors)} tensors, r={args.rank}, alpha={args.alpha}, "
          f"targets={list(targets)}, seed={args.seed}", file=sys.stderr)


if __name__ == "__main__":
    main()
