#!/usr/bin/env bash
# Builds deltasync-web for the browser into web/dist (deltasync.js and its
# wasm), installing the wasm-bindgen CLI that matches the wasm-bindgen crate
# in Cargo.lock when it is missing or another version.
#
# Usage: web/build.sh                 the package apps use, in web/dist
#        web/build.sh --conformance   with the store conformance suite, in web/dist-conformance
set -euo pipefail
features=()
out=web/dist
case "${1:-}" in
  "") ;;
  --conformance) features=(--features conformance); out=web/dist-conformance ;;
  *) echo "usage: web/build.sh [--conformance]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac

# The CLI must be the exact version of the crate: the generated glue and the
# wasm's custom sections are tied to it.
want="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
if [ -z "$want" ]; then
  echo "build.sh: no wasm-bindgen in Cargo.lock" >&2
  exit 1
fi
have="$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)"
if [ "$have" != "$want" ]; then
  echo "build.sh: installing wasm-bindgen-cli $want (found: ${have:-none}); this takes a few minutes once" >&2
  # --locked can fail when the registry lacks one of the CLI's locked
  # versions; the unlocked build still gives the same CLI version.
  cargo install wasm-bindgen-cli --version "$want" --locked \
    || cargo install wasm-bindgen-cli --version "$want"
fi

rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
# What a page downloads: optimised for size (the budget is 400 KB gzipped,
# docs/benchmarks.md), no debug info, link-time optimisation, one codegen unit.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=true \
  CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
CARGO_TARGET_DIR="$target_dir" cargo build -p deltasync-web --release --target wasm32-unknown-unknown "${features[@]}"
rm -rf "$out"
wasm-bindgen --target web --out-dir "$out" --out-name deltasync_core \
  "$target_dir/wasm32-unknown-unknown/release/deltasync_web.wasm"
if [ "$out" = web/dist ]; then
  # What a page downloads goes through binaryen's optimiser too: it takes a
  # seventh off the gzipped wasm (391 -> 341 KB), which keeps the bundle
  # inside its 400 KB budget. binaryen is one of web/'s npm packages; the
  # features are those rustc enables for wasm32-unknown-unknown.
  wasm_opt=web/node_modules/.bin/wasm-opt
  if [ ! -x "$wasm_opt" ] && command -v npm >/dev/null 2>&1; then
    (cd web && npm ci --no-audit --no-fund >&2)
  fi
  if [ -x "$wasm_opt" ]; then
    "$wasm_opt" "${WASM_OPT_LEVEL:--O2}" --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
      --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
      "$out/deltasync_core_bg.wasm" -o "$out/deltasync_core_bg.wasm"
  else
    echo "build.sh: no npm to install binaryen's wasm-opt (web/package.json): web/dist is not optimised by it, and is ~50 KB larger gzipped" >&2
  fi
fi
# The API apps import (deltasync.js) wraps the generated glue (deltasync_core.js).
cp web/src/deltasync.js web/src/deltasync.d.ts "$out/"
if [ "$out" = web/dist ]; then
  # The example app is served as one folder (deltasync serve --static examples/web-tasks).
  rm -rf examples/web-tasks/dist
  mkdir -p examples/web-tasks
  cp -r web/dist examples/web-tasks/dist
fi
echo "build.sh: $out/deltasync.js (with deltasync_core.js and deltasync_core_bg.wasm) is ready"
