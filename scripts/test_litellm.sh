#!/usr/bin/env bash
# Scale-out test: two `metal-candle serve` replicas behind litellm.Router, one stopped with SIGTERM
# mid-traffic (tests/python/test_litellm_router.py, config docs/litellm_config.yaml).
#
#   scripts/test_litellm.sh BINARY GGUF      # e.g. target/release/metal-candle "$(scripts/get_smollm2.sh)"
#
# Builds nothing: BINARY is a `metal-candle` built with the `server` feature. The Python venv
# (tests/python/requirements-litellm.txt, ~370 MB, a few minutes to install once) lives in
# ${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/venv-litellm and is rebuilt when that file changes.
# The test itself takes 15-30 s; it is killed after $LITELLM_TEST_TIMEOUT seconds (default 300).
# Every process it starts is stopped on exit, whatever happens.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY GGUF" >&2; exit 2; }
binary=$(realpath "$1")
gguf=$(realpath "$2")
[ -x "$binary" ] || { echo "$binary: not an executable" >&2; exit 2; }
[ -f "$gguf" ] || { echo "$gguf: no such file" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
req="$repo/tests/python/requirements-litellm.txt"
venv="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/venv-litellm"
python="${PYTHON:-python3}"

stamp=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$stamp" ]; then
  echo "installing $req into $venv (once)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  timeout 900 "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$stamp" >"$venv/.requirements-sha256"
fi

work=$(mktemp -d)
pids="$work/pids"
test_pid=""
cleanup() {
  # The test stops its replicas itself; this is for a test that was killed before it could.
  if [ -n "$test_pid" ] && kill -0 "$test_pid" 2>/dev/null; then kill "$test_pid" 2>/dev/null || true; fi
  if [ -f "$pids" ]; then
    while read -r pid; do
      kill -9 "$pid" 2>/dev/null || true
    done <"$pids"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
set +e
timeout --kill-after=20 "${LITELLM_TEST_TIMEOUT:-300}" \
  "$venv/bin/python" "$repo/tests/python/test_litellm_router.py" \
  --binary "$binary" --gguf "$gguf" --config "$repo/docs/litellm_config.yaml" --pid-file "$pids" &
test_pid=$!
wait "$test_pid"
rc=$?
set -e
echo "test_litellm_router.py: exit $rc after $(( $(date +%s) - start )) s" >&2
[ "$rc" -ne 124 ] || echo "timed out after ${LITELLM_TEST_TIMEOUT:-300} s" >&2
exit "$rc"
