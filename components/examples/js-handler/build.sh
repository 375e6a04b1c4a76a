#!/usr/bin/env bash
# Builds the JavaScript handler into a WebAssembly component for world receipt-handler.
#
#   components/examples/js-handler/build.sh [OUT.wasm]    (default: ./js_handler.wasm)
#   BACKEND=qjs components/examples/js-handler/build.sh [OUT.wasm]
#
# BACKEND=starlingmonkey (default): jco's default engine, ~12 MB component, ~40 s build.
# BACKEND=qjs: QuickJS-ng via componentize-qjs, ~1.6 MB component, ~8 s build.
#
# Needs Node >= 20.19 and npm; installs the pinned toolchain (package-lock.json) from the
# npm registry only, into node_modules/ here (~340 MB; skipped when already installed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/js_handler.wasm}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
wit="$(cd "$here/../../../wit" && pwd)"
backend="${BACKEND:-starlingmonkey}"

cd "$here"
if ! npm ls --silent >/dev/null 2>&1; then
    if [ -f package-lock.json ]; then
        npm ci --no-audit --no-fund
    else
        npm install --no-audit --no-fund
    fi
fi
mkdir -p "$(dirname "$out")"
case "$backend" in
    starlingmonkey | sm)
        # --disable all: no WASI features (stdio, clocks, random, http, fetch-event), so
        # the component imports only clawdentity:queues interfaces.
        flags=(--disable all)
        ;;
    qjs | quickjs)
        # clawq's engine has no component-model async: build the synchronous variant.
        # --backend-qjs-stub-wasi: WASI imports become trap stubs, so again only
        # clawdentity:queues interfaces are imported.
        flags=(--backend qjs --backend-qjs-disable-async --backend-qjs-stub-wasi)
        ;;
    *)
        echo "BACKEND must be starlingmonkey or qjs, not \`$backend\`" >&2
        exit 2
        ;;
esac
npx --no-install jco componentize handler.js \
    --wit "$wit" --world-name receipt-handler "${flags[@]}" -o "$out"
