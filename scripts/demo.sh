#!/usr/bin/env bash
# make demo: ferry's main job end to end, on built-in defaults. A job with
# visible state (a counter and 256 MiB of patterned memory, checksummed each
# second) is checkpointed to disk, ended, restored, and shown to carry on
# from where it stopped. Private state directory; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY="$PWD/bin/ferry"
WORKLOAD="$PWD/bin/ferry-demo-workload"
MIB="${DEMO_MIB:-256}"
TMP=$(mktemp -d /tmp/ferry-demo.XXXXXX)
export FERRY_ROOT="$TMP/state"
JOB=demo
CKPT="$TMP/demo.ferry"

cleanup() {
  "$FERRY" kill --grace 1s "$JOB" >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }
last_count() { "$FERRY" logs "$JOB" | awk '/^count/ {n=$2} END {print n+0}'; }
sums() { "$FERRY" logs "$JOB" | awk '/^count/ {print $NF}' | sort -u; }
wait_count() { # wait until the count exceeds $1 (bounded)
  for _ in $(seq 1 100); do [ "$(last_count)" -gt "$1" ] && return 0; sleep 0.2; done
  fail "the count did not pass $1"
}

step "host check"
"$FERRY" doctor

step "start a job: a counter plus $MIB MiB of memory, checksummed every second"
"$FERRY" run --name "$JOB" -- "$WORKLOAD" demo "$MIB"
wait_count 2
"$FERRY" list
"$FERRY" logs "$JOB"

step "freeze it: the count stops; thaw it: the count goes on"
"$FERRY" freeze "$JOB"
a=$(last_count); sleep 1.5; b=$(last_count)
echo "count when frozen: $a, 1.5 s later: $b"
[ "$a" = "$b" ] || fail "the job counted while frozen"
"$FERRY" thaw "$JOB"
wait_count "$b"

step "checkpoint it to $CKPT: one compressed, checksummed file (the job ends once it is durable)"
"$FERRY" checkpoint -o "$CKPT" "$JOB"
at=$(last_count)
"$FERRY" list
ls -l "$CKPT"

step "verify and inspect the checkpoint"
"$FERRY" verify "$CKPT"
"$FERRY" inspect "$CKPT" | sed -n 1,12p

step "restore it: fresh PID namespace, same pids inside, same memory"
"$FERRY" restore "$CKPT"
wait_count $((at + 2))
"$FERRY" list
"$FERRY" logs "$JOB" | tail -n 5

after=$("$FERRY" logs "$JOB" | awk -v at="$at" '/^count/ && $2 == at+1 {print "ok"}')
[ "$after" = ok ] || fail "the count did not continue at $((at + 1)) after the restore"
[ "$(sums | wc -l)" = 1 ] || fail "the memory checksum changed across the restore: $(sums | tr '\n' ' ')"
echo "the count went on from $at to $((at + 1)) and the checksum of $MIB MiB is unchanged: $(sums)"

step "kill it: no process and no cgroup left"
"$FERRY" kill "$JOB"
"$FERRY" list
echo
echo "demo finished"
