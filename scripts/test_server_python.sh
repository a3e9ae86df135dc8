#!/usr/bin/env bash
# Python tests of `metal-candle serve`: the official openai client (tests/python/test_openai_client.py)
# and a bounded load test (tests/python/load_test.py), against servers this script starts on
# 127.0.0.1 (free ports: --port 0, the port read from the server's "listening on" line).
#
#   scripts/test_server_python.sh BINARY GGUF
#
# BINARY: a metal-candle built with the `cli` and `server` features; GGUF: SmolLM2-135M-Instruct
# (scripts/get_smollm2.sh). A venv with the pinned tests/python/requirements.txt is created (once)
# under ${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}/venv-server-tests. Every server started is
# stopped on exit, whatever happened (trap). Exits non-zero if any check failed.
# LOAD_REQUESTS (default 500) sets the load test's request count; PYTHON the interpreter that
# makes the venv (3.11 or later).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 BINARY GGUF" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
binary="$(realpath "$1")"
gguf="$(realpath "$2")"
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 2; }
[ -f "$gguf" ] || { echo "$gguf is not a file" >&2; exit 2; }
start_all=$(date +%s)

cache="${METAL_CANDLE_CACHE:-$HOME/.cache/metal-candle}"
venv="$cache/venv-server-tests"
req="$root/tests/python/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
# The pinned client stack needs Python 3.11 or later; PYTHON picks another interpreter.
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "$python is not Python 3.11 or later (the pinned openai client needs it): set PYTHON=python3.1x" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "venv: $venv (installing $req)"
  mkdir -p "$cache"
  [ -x "$venv/bin/python" ] || rm -rf "$venv" # a half-made venv is made again
  "$python" -m venv "$venv" || { echo "$python -m venv failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
  rm -f "$stamp"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
  echo "$want" >"$stamp"
fi
py="$venv/bin/python"

work=$(mktemp -d "${TMPDIR:-/tmp}/mc-server-tests.XXXXXX")
pids=()
names=()

stop_all() {
  local i pid
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "server ${names[$i]} (pid $pid) ignored SIGTERM for 5 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  pids=()
  names=()
}
# The test script running now: run in the background and waited for, so that a signal reaches
# the trap at once (bash runs traps only between foreground commands).
child=""
run_child() {
  "$@" &
  child=$!
  local rc=0
  wait "$child" || rc=$?
  child=""
  return "$rc"
}
cleanup() {
  local rc=$?
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  stop_all
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A private copy of the binary: a rebuild while the tests run does not change what they test.
cp "$binary" "$work/metal-candle"
bin="$work/metal-candle"

# start_server NAME ARGS...: starts `metal-candle serve --port 0 ARGS` and sets $url, $server_pid.
start_server() {
  local name=$1
  shift
  local log="$work/$name.log"
  "$bin" serve --host 127.0.0.1 --port 0 "$@" >"$log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  names+=("$name")
  local addr=""
  for _ in $(seq 300); do
    addr=$(sed -n 's|.*listening on http://\([0-9.]*:[0-9]*\).*|\1|p' "$log" | head -n1)
    [ -n "$addr" ] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "server $name exited before listening:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  if [ -z "$addr" ]; then
    echo "server $name printed no 'listening on' line in 30 s:" >&2
    cat "$log" >&2
    return 1
  fi
  url="http://$addr"
  echo "server $name: $url (pid $server_pid): serve $*"
}

# stop_server PID NAME: SIGTERM, and the server must exit 0 within its grace period.
failures=0
stop_server() {
  local pid=$1 name=$2 rc=0
  kill -TERM "$pid"
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "FAIL server $name still running 15 s after SIGTERM"
    failures=$((failures + 1))
    return
  fi
  wait "$pid" || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "PASS server $name exited 0 on SIGTERM"
  else
    echo "FAIL server $name exited $rc on SIGTERM"
    failures=$((failures + 1))
  fi
}

show_log_on_failure() { # NAME RC
  if [ "$2" -ne 0 ]; then
    echo "--- last lines of the $1 server's log"
    tail -n 40 "$work/$1.log" || true
    echo "---"
  fi
}

echo "== adapters (tests/python/make_lora.py, seeds 1 and 2)"
"$py" "$root/tests/python/make_lora.py" "$work/lora-a" --seed 1
"$py" "$root/tests/python/make_lora.py" "$work/lora-b" --seed 2

ctx=512
parallel=4
api_key="test-key-$$"

echo "== openai client (tests/python/test_openai_client.py)"
start_server main --model "smol=$gguf" --lora "a=$work/lora-a@smol" --lora "b=$work/lora-b@smol" --parallel "$parallel" --ctx "$ctx"
main_url=$url main_pid=$server_pid
start_server auth --model "smol=$gguf" --api-key "$api_key" --parallel 1 --ctx 256
auth_url=$url auth_pid=$server_pid
rc=0
run_child timeout -k 10 360 "$py" "$root/tests/python/test_openai_client.py" --binary "$bin" --gguf "$gguf" \
  --url "$main_url" --auth-url "$auth_url" --api-key "$api_key" \
  --adapter-a "$work/lora-a" --adapter-b "$work/lora-b" --ctx "$ctx" --parallel "$parallel" || rc=$?
[ "$rc" -eq 0 ] || failures=$((failures + 1))
[ "$rc" -ne 124 ] || echo "FAIL test_openai_client.py ran past its 360 s limit"
show_log_on_failure main "$rc"
stop_server "$main_pid" main
stop_server "$auth_pid" auth
pids=() names=()

echo "== embeddings (tests/python/test_embeddings_client.py, the real all-MiniLM-L6-v2)"
if [ -n "${METAL_CANDLE_MINILM_DIR:-}" ]; then
  start_server emb --embedding-model "minilm=$METAL_CANDLE_MINILM_DIR"
  emb_url=$url emb_pid=$server_pid
  rc=0
  run_child timeout -k 10 120 "$py" "$root/tests/python/test_embeddings_client.py" --url "$emb_url" || rc=$?
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  show_log_on_failure emb "$rc"
  stop_server "$emb_pid" emb
  pids=() names=()
else
  echo "SKIPPED: METAL_CANDLE_MINILM_DIR is not set (scripts/get_minilm.sh)"
fi

echo "== load test (tests/python/load_test.py)"
start_server load --model "smol=$gguf" --parallel 4 --ctx 512
load_url=$url load_pid=$server_pid
rc=0
run_child timeout -k 10 330 "$py" "$root/tests/python/load_test.py" --url "$load_url" --pid "$load_pid" \
  --requests "${LOAD_REQUESTS:-500}" --time-limit 300 || rc=$?
[ "$rc" -eq 0 ] || failures=$((failures + 1))
[ "$rc" -ne 124 ] || echo "FAIL load_test.py ran past its 330 s limit"
show_log_on_failure load "$rc"
stop_server "$load_pid" load
pids=() names=()

echo "== Python server tests: $failures failed part(s), $(($(date +%s) - start_all)) s in all"
[ "$failures" -eq 0 ]
