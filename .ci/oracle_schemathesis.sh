#!/usr/bin/env bash
# Oracle: schemathesis (4.x) fuzzes the daemon against its own GET /openapi.json,
# every check, every phase (coverage, fuzzing, stateful; positive and negative
# data), twice: once with POUSSETACHES_API_KEY (sent as "Authorization: Bearer")
# and once without.  Each run gets a daemon of its own: a fresh 0700 data dir, a
# free loopback port, --allow-url http://127.0.0.1:9/ so that no enqueued task
# can be delivered anywhere real (port 9, discard: refused).  The daemon is
# stopped (SIGTERM, then wait) at the end, also on failure.
#
#   bash .ci/oracle_schemathesis.sh VENV      # VENV: a virtualenv with schemathesis 4.x
#
# Optional: ORACLE_ST_MAX_EXAMPLES (cases per operation and phase; default sized
# for about 3 minutes for both runs on 2 cores), ORACLE_ST_SEED.
# Ends with one line per run:
#   oracle schemathesis <version> (api key): N operations-cases tried in S s: F failures
# and exits non-zero if either run failed.
set -euo pipefail

VENV="${1:?usage: bash .ci/oracle_schemathesis.sh VENV (a virtualenv with schemathesis 4.x)}"
cd "$(dirname "$0")/.."
ST="$VENV/bin/schemathesis"
MAX_EXAMPLES="${ORACLE_ST_MAX_EXAMPLES:-450}"
SEED="${ORACLE_ST_SEED:-20240607}"
START_TIMEOUT=20
API_KEY="oracle-test-key-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"

die() { echo "oracle_schemathesis: $*" >&2; exit 2; }
[ -x "$ST" ] || die "no $ST: install schemathesis 4.x into $VENV first"
[ -f poussetaches.py ] || die "run from the repo root (no poussetaches.py in $PWD)"
# rules JSON Schema cannot express (cross-field, clock- or state-relative): kept
# out of positive generation only; see the file
export SCHEMATHESIS_HOOKS="$PWD/.ci/schemathesis_hooks.py"
[ -f "$SCHEMATHESIS_HOOKS" ] || die "no $SCHEMATHESIS_HOOKS"
VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))')"
case "$VERSION" in
    4.*) ;;
    *) die "this script is written for the schemathesis 4.x CLI, found $VERSION" ;;
esac

# nothing of the caller's environment may reconfigure the daemon, and every
# request goes straight to 127.0.0.1 (no proxy)
for name in ${!POUSSETACHES_@}; do unset "$name"; done
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

WORK="$(mktemp -d)"
DAEMON_PID=""
ST_PID=""
SUMMARY=()

stop_daemon() {  # SIGTERM, wait up to 20 s, then SIGKILL; sets DAEMON_RC
    DAEMON_RC=0
    [ -n "$DAEMON_PID" ] || return 0
    local pid="$DAEMON_PID" i
    DAEMON_PID=""
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "oracle_schemathesis: daemon $pid still running 20 s after SIGTERM: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || DAEMON_RC=$?
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$ST_PID" ]; then
        kill -TERM "$ST_PID" 2>/dev/null || true
        wait "$ST_PID" 2>/dev/null || true
    fi
    stop_daemon || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_daemon() {  # $1: the API key ("" for none), $2: log file; sets DAEMON_PID, DAEMON_URL
    local key="$1" log="$2" data i
    data="$(mktemp -d "$WORK/data.XXXXXX")"
    chmod 0700 "$data"
    if [ -n "$key" ]; then
        POUSSETACHES_API_KEY="$key" python3 poussetaches.py serve --host 127.0.0.1 --port 0 \
            --data-dir "$data" --allow-url http://127.0.0.1:9/ </dev/null >"$log" 2>&1 &
    else
        python3 poussetaches.py serve --host 127.0.0.1 --port 0 \
            --data-dir "$data" --allow-url http://127.0.0.1:9/ </dev/null >"$log" 2>&1 &
    fi
    DAEMON_PID=$!
    DAEMON_URL=""
    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        DAEMON_URL="$(grep -o -m1 'serving on http://127\.0\.0\.1:[0-9]*' "$log" | cut -d' ' -f3 || true)"
        [ -n "$DAEMON_URL" ] && return 0
        if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            echo "oracle_schemathesis: the daemon exited before serving; its log:" >&2
            cat "$log" >&2
            DAEMON_PID=""
            return 1
        fi
        sleep 0.1
    done
    echo "oracle_schemathesis: the daemon did not log 'serving on http://127.0.0.1:PORT' within" \
         "${START_TIMEOUT} s; its log:" >&2
    cat "$log" >&2
    return 1
}

# $1: label ("api key" / "no key"), $2: the API key or ""
run_oracle() {
    local label="$1" key="$2" tag log report rc=0 t0 elapsed cases failures daemon_problems=0
    local -a auth=()
    tag="${label// /-}"
    log="$WORK/daemon-$tag.log"
    report="$WORK/report-$tag.json"
    echo "=== oracle schemathesis $VERSION ($label) ==="
    if ! start_daemon "$key" "$log"; then
        stop_daemon
        SUMMARY+=("oracle schemathesis $VERSION ($label): 0 operations-cases tried in 0 s: 1 failures")
        return 1
    fi
    echo "daemon $DAEMON_PID serving on $DAEMON_URL"
    if [ -n "$key" ]; then
        auth=(--header "Authorization: Bearer $key")
    fi
    : >"$WORK/schemathesis.toml"  # explicit and empty: no schemathesis.toml found elsewhere applies
    t0=$SECONDS
    # run in $WORK: whatever schemathesis or Hypothesis writes stays out of the repo
    # in the background, so that a signal to this script is handled at once (cleanup)
    (cd "$WORK" && exec timeout --kill-after=10 1200 "$ST" --config-file "$WORK/schemathesis.toml" \
        run "$DAEMON_URL/openapi.json" \
        --checks all --mode all --phases examples,coverage,fuzzing,stateful \
        --max-examples "$MAX_EXAMPLES" --seed "$SEED" --workers 1 \
        --continue-on-failure --request-timeout 10 --max-redirects 0 \
        --generation-database none --no-color \
        --report json --report-json-path "$report" \
        ${auth[@]+"${auth[@]}"}) &
    ST_PID=$!
    wait "$ST_PID" || rc=$?
    ST_PID=""
    elapsed=$((SECONDS - t0))
    if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
        echo "oracle_schemathesis: FAILURE: the daemon died during the run; its log:" >&2
        tail -n 50 "$log" >&2
        daemon_problems=$((daemon_problems + 1))
        stop_daemon  # reaps it
    fi
    stop_daemon
    if [ "$daemon_problems" = 0 ] && [ "$DAEMON_RC" != 0 ]; then
        echo "oracle_schemathesis: FAILURE: the daemon exited $DAEMON_RC after SIGTERM (expected 0)" >&2
        daemon_problems=$((daemon_problems + 1))
    fi
    if grep -q '^Exception in thread' "$log"; then  # SPEC 2: no input may kill a thread
        echo "oracle_schemathesis: FAILURE: a daemon thread died:" >&2
        grep -A 30 '^Exception in thread' "$log" | head -n 60 >&2
        daemon_problems=$((daemon_problems + 1))
    fi
    if grep -q 'unexpected error answering' "$log"; then
        echo "--- daemon log: the 500s' tracebacks (first 80 lines) ---"
        awk '/unexpected error answering/ {on = 1; print; next}
             /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] / {on = 0}
             on' "$log" | head -n 80
    fi
    read -r cases failures < <(python3 - "$report" <<'EOF' || echo "0 1"
import json, sys
try:
    with open(sys.argv[1]) as f:
        report = json.load(f)
    print(report["test_cases"]["generated"],
          report["test_cases"]["unique_failures"] + len(report.get("errors") or []))
except (OSError, ValueError, KeyError, TypeError) as exc:
    print("oracle_schemathesis: no usable schemathesis report: %s" % exc, file=sys.stderr)
    print("0 1")
EOF
)
    failures=$((failures + daemon_problems))
    if [ "$rc" != 0 ] && [ "$failures" = 0 ]; then
        echo "oracle_schemathesis: schemathesis exited $rc" >&2
        failures=1
    fi
    SUMMARY+=("oracle schemathesis $VERSION ($label): $cases operations-cases tried in $elapsed s: $failures failures")
    [ "$rc" = 0 ] && [ "$failures" = 0 ]
}

status=0
run_oracle "api key" "$API_KEY" || status=1
run_oracle "no key" "" || status=1
printf '%s\n' "${SUMMARY[@]}"
exit "$status"
