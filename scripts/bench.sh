#!/usr/bin/env bash
# make bench: ferry against CRIU alone, measured in one run (see test/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x bin/ferry ] || { echo "bench: bin/ferry missing: run make build" >&2; exit 1; }
if [ -z "${FERRY_CRIU:-}" ] && [ -x .deps/bin/criu ]; then
  export FERRY_CRIU="$PWD/.deps/bin/criu"
fi
exec go run ./test/bench "$@"
