#!/usr/bin/env bash
# Makes (once) the Python venv the proxy tests' real clients run in, and prints its python.
#
#   bash tests/fake-upstream/setup.sh           # requests, httpx, openai
#   bash tests/fake-upstream/setup.sh --bench   # the same, and mitmproxy (benchmark only)
#
# The venv lives under the cargo target dir ($CARGO_TARGET_DIR, default ./target) as
# pyenv/ (mitmproxy's as pyenv-mitm/, with a Python >= 3.12); a venv that already imports
# everything is reused at once (idempotent, quick). Packages come from PyPI through pip.
# The last line of stdout is the clients' python; with --bench the line before it is
# mitmproxy's mitmdump.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac
venv="$target/pyenv"
python="$venv/bin/python"

# ensure VENV BASE MODULES PACKAGE...: makes VENV with the BASE python and installs the
# packages unless a stamp says it was done and the modules import; pip's output goes to
# stderr. Concurrent first runs (tests start in parallel) take turns.
ensure() {
    local venv="$1" base="$2" modules="$3"
    shift 3
    ready() { [ "$(cat "$venv/.op-bridge-ready" 2>/dev/null)" = "$*" ] && [ -x "$venv/bin/python" ]; }
    ready "$@" && return 0
    mkdir -p "$target"
    (
        flock 9
        if ! ready "$@"; then
            [ -x "$venv/bin/python" ] || $base -m venv "$venv" >&2
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
            "$venv/bin/python" -c "import $modules"
            echo "$*" >"$venv/.op-bridge-ready"
        fi
    ) 9>"$target/pyenv.lock"
}

# A Python >= 3.12 for mitmproxy (its current releases need one): on PATH, or from pyenv.
python312() {
    local c v
    for c in python3.13 python3.12 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$c"
            return
        fi
    done
    if command -v pyenv >/dev/null; then
        v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | tail -1)"
        [ -n "$v" ] && { echo "env PYENV_VERSION=$v python${v%.*}"; return; }
    fi
    return 1
}

ensure "$venv" python3 "requests, httpx, openai" requests httpx openai
if [ "${1:-}" = "--bench" ]; then
    # mitmproxy gets a venv of its own (bench only): it pins dependencies the clients' venv
    # need not share, and needs a newer Python. Its mitmdump is printed before the python.
    base="$(python312)" || { echo "setup.sh: mitmproxy needs Python >= 3.12, none found" >&2; exit 1; }
    ensure "$target/pyenv-mitm" "$base" mitmproxy mitmproxy
    echo "$target/pyenv-mitm/bin/mitmdump"
fi
echo "$python"
