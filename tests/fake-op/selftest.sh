#!/usr/bin/env bash
# Self-test for the fake `op` CLI. Usage: tests/fake-op/selftest.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OP="$HERE/op"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT

export FAKE_OP_STORE="$T/store.json"
export FAKE_OP_CONTROL="$T/control.json"
export FAKE_OP_LOG="$T/calls.jsonl"
unset FAKE_OP_DELAY_MS FAKE_OP_REQUIRE_TOKEN OP_SERVICE_ACCOUNT_TOKEN || true

PASS=0
FAIL=0
ok()   { PASS=$((PASS + 1)); echo "ok   - $1"; }
bad()  { FAIL=$((FAIL + 1)); echo "FAIL - $1" >&2; }
check() { # check NAME CMD... : passes if CMD succeeds
  local name="$1"; shift
  if "$@"; then ok "$name"; else bad "$name"; fi
}
py() { python3 -c "$@"; }

# run CMD...: sets RC, stdout in $T/out, stderr in $T/err (stdin is /dev/null)
run() { set +e; "$@" >"$T/out" 2>"$T/err" </dev/null; RC=$?; set -e; }
# run_in INPUT CMD...: like run, but with INPUT on stdin (a pipe)
run_in() { local in="$1"; shift; set +e; printf '%s' "$in" | "$@" >"$T/out" 2>"$T/err"; RC=$?; set -e; }

# expect_err NAME REGEX CMD... : exit 1, empty stdout, exactly one [ERROR] line matching REGEX
expect_err() {
  local name="$1" re="$2"; shift 2
  run "$@"
  if [[ $RC -eq 1 && ! -s "$T/out" && "$(wc -l <"$T/err")" -eq 1 ]] &&
     grep -qE "^\[ERROR\] [0-9]{4}/[0-9]{2}/[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} $re\$" "$T/err"; then
    ok "$name"
  else
    bad "$name (rc=$RC stdout=$(head -c 200 "$T/out") stderr=$(cat "$T/err"))"
  fi
}
ctl() { printf '%s' "$1" >"$FAKE_OP_CONTROL"; }

python3 - "$FAKE_OP_STORE" <<'EOF'
import json, sys
store = {
  "dev": {
    "db": {"username": "admin", "password": "line1\nline2 ünï€😀\n", "extra": {"token": "tok-1"}},
    "api": {"credential": "k"},
  },
  "prod": {"db": {"password": "prodpw"}},
}
json.dump(store, open(sys.argv[1], "w"), ensure_ascii=False)
EOF

# ---------------------------------------------------------------- basics
run "$OP" --version
check "--version" test "$RC:$(cat "$T/out")" = "0:2.30.0"
run "$OP" whoami
check "whoami" bash -c "[[ $RC -eq 0 ]] && grep -q 'User Type: *SERVICE_ACCOUNT' '$T/out' && grep -q 'URL: *https://my.1password.com' '$T/out'"

# ---------------------------------------------------------------- read
run "$OP" read op://dev/db/password
check "read adds newline, byte exact" py "import sys; d=open('$T/out','rb').read(); sys.exit(0 if $RC==0 and d=='line1\nline2 ünï€😀\n\n'.encode() else 1)"
run "$OP" read -n op://dev/db/password
check "read -n byte exact" py "import sys; d=open('$T/out','rb').read(); sys.exit(0 if $RC==0 and d=='line1\nline2 ünï€😀\n'.encode() else 1)"
run "$OP" read op://dev/db/password --no-newline --account acme --force
check "read options after ref" py "import sys; d=open('$T/out','rb').read(); sys.exit(0 if $RC==0 and d=='line1\nline2 ünï€😀\n'.encode() else 1)"
run "$OP" read --no-newline op://dev/db/extra/token
check "read sectioned field" test "$RC:$(cat "$T/out")" = "0:tok-1"
run "$OP" read -n op://dev/db/token
check "read 3-segment finds sectioned field" test "$RC:$(cat "$T/out")" = "0:tok-1"
run "$OP" read -n "op://dev/db/password?attribute=type"
check "read ?attribute=type" test "$RC:$(cat "$T/out")" = "0:CONCEALED"

# ---------------------------------------------------------------- errors
expect_err "read: item missing" \
  "could not read secret 'op://dev/nope/password': could not get item nope from vault dev: \"nope\" isn't an item in the \"dev\" vault\. Specify the item with its UUID, name, or domain\." \
  "$OP" read op://dev/nope/password
expect_err "read: vault missing" \
  "could not read secret 'op://zz/db/password': could not get item db from vault zz: \"zz\" isn't a vault in this account\. Specify the vault with its ID or name\." \
  "$OP" read op://zz/db/password
expect_err "read: field missing" \
  "could not read secret 'op://dev/db/nofield': item 'dev/db' does not have a field 'nofield'" \
  "$OP" read op://dev/db/nofield
expect_err "read: not op://" \
  "could not read secret 'dev/db/password': invalid secret reference 'dev/db/password': secret reference must start with \"op://\".*" \
  "$OP" read dev/db/password
expect_err "read: too few segments" \
  "could not read secret 'op://dev/db': invalid secret reference 'op://dev/db': too few segments" \
  "$OP" read op://dev/db
expect_err "item get: missing (vault)" \
  "\"nope\" isn't an item in the \"dev\" vault\. Specify the item with its UUID, name, or domain\." \
  "$OP" item get nope --vault dev --format json
expect_err "item get: missing (no vault)" \
  "\"nope\" isn't an item\. Specify the item with its UUID, name, or domain\." \
  "$OP" item get nope --format json
expect_err "item get: vault missing" \
  "\"zz\" isn't a vault in this account\. Specify the vault with its ID or name\." \
  "$OP" item get db --vault zz
expect_err "item get: ambiguous" "More than one item matches \"db\".*" "$OP" item get db
expect_err "unknown command" "unknown command \"frobnicate\" for \"op\"" "$OP" frobnicate
expect_err "unknown flag" "unknown flag: --bogus" "$OP" read --bogus op://dev/db/password
expect_err "store unset" ".*FAKE_OP_STORE.*" env -u FAKE_OP_STORE "$OP" read op://dev/db/password
expect_err "store missing" ".*FAKE_OP_STORE.*" env FAKE_OP_STORE="$T/nope.json" "$OP" whoami

# ---------------------------------------------------------------- item get
run "$OP" item get db --vault dev --format json
cp "$T/out" "$T/db.json"
check "item get JSON shape" python3 - "$T/db.json" <<'EOF'
import json, re, sys
raw = open(sys.argv[1], encoding="utf-8").read()
assert raw.endswith("}\n") and raw.startswith("{\n  \"id\"")
j = json.loads(raw)
assert re.fullmatch(r"[a-z0-9]{26}", j["id"]), j["id"]
assert j["title"] == "db" and isinstance(j["version"], int)
assert j["vault"]["name"] == "dev" and j["vault"]["id"]
assert j["category"] in ("LOGIN", "API_CREDENTIAL")
for k in ("last_edited_by", "created_at", "updated_at"):
    assert j[k], k
assert [s["label"] for s in j["sections"]] == ["extra"]
f = {x["label"]: x for x in j["fields"]}
assert f["username"]["type"] == "STRING" and f["password"]["type"] == "CONCEALED"
assert f["password"]["value"] == "line1\nline2 ünï€😀\n"
assert f["password"]["reference"] == "op://dev/db/password"
assert f["token"]["section"] == {"id": j["sections"][0]["id"], "label": "extra"}
assert f["token"]["reference"] == "op://dev/db/extra/token"
assert "section" not in f["username"]
EOF
ID=$(py "import json; print(json.load(open('$T/db.json'))['id'])")
run "$OP" item get "$ID" --format=json
check "item get by id, no vault" py "import json,sys; sys.exit(0 if $RC==0 and json.load(open('$T/out'))['title']=='db' else 1)"
run "$OP" item get db --vault dev --fields label=username
check "item get --fields" test "$RC:$(cat "$T/out")" = "0:admin"

# ---------------------------------------------------------------- item edit (stdin JSON)
NEWJSON=$(python3 - "$T/db.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1], encoding="utf-8"))
j["fields"] = [f for f in j["fields"] if f["label"] != "username"]   # drop a field
for f in j["fields"]:
    if f["label"] == "password":
        f["value"] = "new\npw ✓"
print(json.dumps(j, ensure_ascii=False))
EOF
)
run_in "$NEWJSON" "$OP" item edit db --vault dev --format json
check "edit stdin: exit 0 + JSON out" py "import json,sys; j=json.load(open('$T/out')); sys.exit(0 if $RC==0 and j['version']==2 else 1)"
check "edit stdin: whole-item replace" python3 - "$FAKE_OP_STORE" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1], encoding="utf-8"))
assert s["dev"]["db"] == {"password": "new\npw ✓", "extra": {"token": "tok-1"}}, s["dev"]["db"]
assert s["prod"]["db"] == {"password": "prodpw"}
assert set(s) == {"dev", "prod"}
EOF
run "$OP" read -n op://dev/db/username
check "edit stdin: dropped field gone from read" test "$RC" = 1
run "$OP" item get db --vault dev --format json
check "edit stdin: id stable, version persisted" py "import json,sys; j=json.load(open('$T/out')); sys.exit(0 if j['id']=='$ID' and j['version']==2 else 1)"

# rename via JSON title
RENAME=$(py "import json; j=json.load(open('$T/out')); j['title']='db2'; print(json.dumps(j))")
run_in "$RENAME" "$OP" item edit db --vault dev
run "$OP" item get db2 --vault dev --format json
check "edit stdin: rename keeps id" py "import json,sys; j=json.load(open('$T/out')); sys.exit(0 if $RC==0 and j['id']=='$ID' and j['version']==3 else 1)"
run_in "" "$OP" item edit db2 --vault dev --title db
check "edit --title rename back (empty stdin ignored)" bash -c "[[ $RC -eq 0 ]] && '$OP' read -n op://dev/db/extra/token </dev/null | grep -qx tok-1"

# ---------------------------------------------------------------- item edit (assignments)
run "$OP" item edit db --vault dev 'password=a=b c' 'extra.token[password]=tok-2' 'newsec.k[text]=v' 'username=root'
check "edit assignments" python3 - "$FAKE_OP_STORE" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1], encoding="utf-8"))
assert s["dev"]["db"] == {"password": "a=b c", "extra": {"token": "tok-2"}, "newsec": {"k": "v"}, "username": "root"}, s["dev"]["db"]
EOF
run "$OP" item edit db --vault dev 'newsec.k[delete]'
check "edit [delete]" py "import json,sys; s=json.load(open('$FAKE_OP_STORE')); sys.exit(0 if $RC==0 and 'newsec' not in s['dev']['db'] else 1)"

# ---------------------------------------------------------------- item create
run "$OP" item create --vault dev --title new-item --category 'API Credential' 'credential=c1' 'meta.region=eu'
check "create with assignments" py "import json,sys; j=json.load(open('$T/out')); s=json.load(open('$FAKE_OP_STORE')); sys.exit(0 if $RC==0 and j['category']=='API_CREDENTIAL' and s['dev']['new-item']=={'credential':'c1','meta':{'region':'eu'}} else 1)"
expect_err "create duplicate" ".*already exists.*" "$OP" item create --vault dev --title new-item 'x=y'
run_in '{"title":"from-json","vault":{"name":"prod"},"category":"LOGIN","sections":[{"id":"s1","label":"sec"}],"fields":[{"id":"password","type":"CONCEALED","label":"password","value":"pj"},{"id":"x","section":{"id":"s1"},"label":"x","value":"xv"}]}' "$OP" item create
check "create from stdin JSON" py "import json,sys; s=json.load(open('$FAKE_OP_STORE')); sys.exit(0 if $RC==0 and s['prod']['from-json']=={'password':'pj','sec':{'x':'xv'}} else 1)"

# ---------------------------------------------------------------- concurrency: 20 parallel edits
pids=()
for i in $(seq 1 20); do "$OP" item edit db --vault dev "par.f$i=v$i" >/dev/null 2>&1 </dev/null & pids+=($!); done
cfail=0; for p in "${pids[@]}"; do wait "$p" || cfail=$((cfail + 1)); done
check "20 concurrent edits all land" py "import json,sys; s=json.load(open('$FAKE_OP_STORE')); sys.exit(0 if $cfail==0 and len(s['dev']['db']['par'])==20 else 1)"

# ---------------------------------------------------------------- knobs
ctl '{"delay_ms": 400}'
s=$(date +%s%N); run "$OP" read -n op://dev/db/password; e=$(date +%s%N)
check "delay_ms (control)" test $(( (e - s) / 1000000 )) -ge 400
ctl '{}'
s=$(date +%s%N); FAKE_OP_DELAY_MS=300 run "$OP" --version; e=$(date +%s%N)
check "FAKE_OP_DELAY_MS env" test $(( (e - s) / 1000000 )) -ge 300

ctl '{"outage": true}'
expect_err "outage on" 'Get "https://my\.1password\.com/api/v2/.*": dial tcp: lookup my\.1password\.com: no such host' "$OP" read op://dev/db/password
ctl '{"outage": false}'
run "$OP" read -n op://dev/db/extra/token
check "outage off again" test "$RC:$(cat "$T/out")" = "0:tok-2"

ctl '{"server_error": true}'
expect_err "server_error" '\(500\) Internal Server Error: an internal error occurred, please try again' "$OP" item get db --vault dev
ctl '{"auth_fail": true}'
expect_err "auth_fail" "\(401\) Unauthorized: You aren't authorized to perform this action\. Check that your service account token is valid\." "$OP" whoami
ctl '{}'
expect_err "FAKE_OP_REQUIRE_TOKEN without token" "\(401\) Unauthorized: .*" env FAKE_OP_REQUIRE_TOKEN=1 "$OP" read op://dev/db/password
run env FAKE_OP_REQUIRE_TOKEN=1 OP_SERVICE_ACCOUNT_TOKEN=ops_x "$OP" read op://dev/db/password
check "FAKE_OP_REQUIRE_TOKEN with token" test "$RC" = 0

ctl '{"rate_limit": 2, "rate_limit_retry_s": 7}'
pids=()
for i in 1 2 3 4; do (rc=0; "$OP" read -n op://dev/db/password >"$T/rl.$i.out" 2>"$T/rl.$i.err" </dev/null || rc=$?; echo $rc >"$T/rl.$i.rc") & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
nf=$(cat "$T"/rl.*.rc | grep -cx 1 || true)
check "rate_limit=2 over 4 concurrent calls -> exactly 2 fail" test "$nf" = 2
check "rate_limit message" bash -c "cat '$T'/rl.*.err | grep -cE \"^\\[ERROR\\] .* \\(429\\) Too Many Requests: You've reached the maximum number of requests\\. Please retry in 7 seconds\\.\$\" | grep -qx 2"
check "rate_limit decremented to 0" py "import json,sys; sys.exit(0 if json.load(open('$FAKE_OP_CONTROL'))['rate_limit']==0 else 1)"

ctl '{"fail_edits": 1}'
expect_err "fail_edits fails edit" '\(500\) Internal Server Error: .*' "$OP" item edit db --vault dev 'x=1'
run "$OP" read -n op://dev/db/extra/token
check "fail_edits leaves reads alone" test "$RC" = 0
run "$OP" item edit db --vault dev 'x=1'
check "fail_edits consumed" test "$RC" = 0
ctl '{"slow_edit_ms": 300}'
s=$(date +%s%N); run "$OP" item edit db --vault dev 'x=2'; e=$(date +%s%N)
check "slow_edit_ms" test $(( (e - s) / 1000000 )) -ge 300
ctl '{}'

ctl '{"hang": true}'
set +e; timeout 1 "$OP" read op://dev/db/password </dev/null >/dev/null 2>&1; RC=$?; set -e
check "hang killed by timeout (SIGTERM)" test "$RC" = 124
ctl '{}'
check "hang logged exit null before hanging" py "import json,sys; l=[json.loads(x) for x in open('$FAKE_OP_LOG')]; sys.exit(0 if l[-1]['exit'] is None and l[-1]['argv']==['read','op://dev/db/password'] else 1)"


# ---------------------------------------------------------------- inject
ctl '{}'
py "import json; p='$FAKE_OP_STORE'; s=json.load(open(p)); s['inj']={'db':{'password':'line1\\nline2 ünï€😀\\n','extra':{'token':'tok-1'}}}; json.dump(s, open(p,'w'), ensure_ascii=False)"
run_in $'A\n{{ op://inj/db/password }}\nB {{op://inj/db/extra/token}} C' "$OP" inject
check "inject copies template, raw values byte exact" py "import sys; d=open('$T/out','rb').read(); sys.exit(0 if $RC==0 and d=='A\nline1\nline2 ünï€😀\n\nB tok-1 C'.encode() else 1)"
run_in $'x {{ op://dev/nope/password }} {{ op://inj/db/password }}' "$OP" inject
check "inject fails whole template on first bad ref" bash -c "[[ $RC -eq 1 && ! -s '$T/out' ]] && grep -q \"could not read secret 'op://dev/nope/password'\" '$T/err'"
run_in 'no markers' "$OP" inject
check "inject without markers copies" test "$RC:$(cat "$T/out")" = "0:no markers"
ctl '{"process_ms": 200, "item_ms": 100}'
s=$(date +%s%N); run_in '{{ op://inj/db/password }}{{ op://inj/db/extra/token }}{{ op://dev/api/credential }}' "$OP" inject; e=$(date +%s%N)
check "cost model: process_ms + item_ms per distinct item" test $(( (e - s) / 1000000 )) -ge 400
ctl '{}'

# ---------------------------------------------------------------- call log
: >"$FAKE_OP_LOG"
"$OP" read -n --account acme op://dev/db/extra/token </dev/null >/dev/null
printf '%s' "" | "$OP" item edit db --vault dev 'y=1' >/dev/null
echo '{"title":"db","fields":[{"label":"only","value":"1"}]}' | OP_SERVICE_ACCOUNT_TOKEN=t "$OP" item edit db --vault dev >/dev/null
"$OP" read op://dev/nope/x </dev/null >/dev/null 2>&1 || true
check "call log" python3 - "$FAKE_OP_LOG" "$FAKE_OP_STORE" <<'EOF'
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
assert len(lines) == 4, lines
l = [json.loads(x) for x in lines]
for r in l:
    assert set(r) == {"ts", "pid", "argv", "stdin_devnull", "stdin_tty", "stdin", "exit", "env_token"}, r
assert l[0]["argv"] == ["read", "-n", "--account", "acme", "op://dev/db/extra/token"]
assert l[0]["stdin_devnull"] is True and l[0]["stdin"] is None and l[0]["exit"] == 0
assert l[0]["env_token"] is False and l[0]["stdin_tty"] is False
assert l[1]["stdin_devnull"] is False and l[1]["stdin"] == "" and l[1]["exit"] == 0
assert l[2]["stdin"].startswith('{"title":"db"') and l[2]["env_token"] is True
assert l[3]["exit"] == 1
assert json.load(open(sys.argv[2], encoding="utf-8"))["dev"]["db"] == {"only": "1"}
EOF

echo "$PASS passed, $FAIL failed"
[[ $FAIL -eq 0 ]]
