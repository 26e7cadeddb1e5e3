#!/usr/bin/env bash
# make demo: the main job of ferry, end to end, on built-in defaults.
# Uses a private state directory under a temp dir and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY="$PWD/bin/ferry"
ROOT=$(mktemp -d /tmp/ferry-demo.XXXXXX)
export FERRY_ROOT="$ROOT/state"
JOB=demo

cleanup() {
  "$FERRY" kill --grace 1s "$JOB" >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "host check"
"$FERRY" doctor

step "start a job: a counter that prints a line every 100 ms"
"$FERRY" run --name "$JOB" -- sh -c 'i=0; while :; do i=$((i+1)); echo "count $i"; sleep 0.1; done'
sleep 1
"$FERRY" list

step "freeze it: the log stops growing"
"$FERRY" freeze "$JOB"
a=$("$FERRY" logs "$JOB" | wc -l); sleep 1; b=$("$FERRY" logs "$JOB" | wc -l)
echo "lines before: $a, one second later: $b"
[ "$a" = "$b" ] || { echo "demo: log grew while frozen" >&2; exit 1; }
"$FERRY" list

step "thaw it: the count continues"
"$FERRY" thaw "$JOB"
sleep 0.5
"$FERRY" logs "$JOB" | tail -n 3

step "kill it: no process and no cgroup left"
"$FERRY" kill "$JOB"
"$FERRY" list
echo
echo "demo finished"
