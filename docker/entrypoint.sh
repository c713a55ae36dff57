#!/bin/sh
# op-bridge-entrypoint.sh — the classic background-daemon pattern, for images that must keep
# their own entrypoint or init. Prefer `ENTRYPOINT ["op-bridge","run","--"]`: as PID 1,
# op-bridge forwards signals, reaps zombies and flushes pending write-backs before the
# container stops. Here the daemon is a background sibling, so on `docker stop` it gets no
# SIGTERM of its own and is killed with the container: run this under an init
# (`docker run --init`, or tini as ENTRYPOINT before this script) and do not rely on
# write-back of rotations in the last moments before a stop.
#
#   ENTRYPOINT ["/usr/local/bin/op-bridge-entrypoint.sh"]
#   CMD ["openclaw", "gateway"]
#
# Environment: OP_BRIDGE_* configure the daemon as usual (OP_BRIDGE_SOCKET, …);
# OP_BRIDGE_START_TIMEOUT is how many seconds to wait for its socket (default 30).
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: op-bridge-entrypoint.sh CMD [ARGS...]" >&2
    exit 2
fi

OP_BRIDGE_SOCKET="${OP_BRIDGE_SOCKET:-/run/op-bridge/op-bridge.sock}"
export OP_BRIDGE_SOCKET
timeout="${OP_BRIDGE_START_TIMEOUT:-30}"
case "$timeout" in
    '' | *[!0-9]*)
        echo "op-bridge-entrypoint: OP_BRIDGE_START_TIMEOUT must be whole seconds, got '$timeout'" >&2
        exit 2
        ;;
esac

op-bridge daemon &
daemon=$!

# Wait until the daemon answers (it has resolved every secret by then), it dies, or the
# timeout passes. The daemon binds its socket only once it can answer, so each ping fails at
# once until then. Ten polls a second (`sleep 0.1` is GNU and busybox, not strict POSIX);
# the clock also bounds the wait, should pings be slow (whole seconds: at most one extra).
started=$(date +%s)
tries=$((timeout * 10))
until op-bridge ping --socket "$OP_BRIDGE_SOCKET" --timeout 500ms >/dev/null 2>&1; do
    if ! kill -0 "$daemon" 2>/dev/null; then
        status=0
        wait "$daemon" || status=$?
        echo "op-bridge-entrypoint: op-bridge daemon exited with status $status before serving" >&2
        [ "$status" -ne 0 ] || status=1
        exit "$status"
    fi
    if [ "$tries" -le 0 ] || [ $(($(date +%s) - started)) -gt "$timeout" ]; then
        echo "op-bridge-entrypoint: op-bridge not answering on $OP_BRIDGE_SOCKET after ${timeout}s" >&2
        kill "$daemon" 2>/dev/null || true
        exit 69
    fi
    tries=$((tries - 1))
    sleep 0.1
done

# The application gets its secrets from the socket (or `op-bridge get NAME`), never the
# 1Password token, a session, or the references (with the daemon's own prefix and suffix).
unset OP_SERVICE_ACCOUNT_TOKEN OP_CONNECT_TOKEN
prefix="${OP_BRIDGE_PREFIX:-OP_}"
suffix="${OP_BRIDGE_SUFFIX:-_REF}"
for name in $(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
    case "$name" in
        OP_SESSION_*) unset "$name" ;;
        "$prefix"*"$suffix")
            if [ "${#name}" -gt $((${#prefix} + ${#suffix})) ]; then
                unset "$name"
            fi
            ;;
    esac
done

exec "$@"
