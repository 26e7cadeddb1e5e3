#!/usr/bin/env bash
# Provision Versity's S3 gateway (github.com/versity/versitygw, Apache-2.0)
# for ferry's tests: a real S3 server the S3 store tests start on loopback
# (or in a network namespace they made), serving a temporary directory.
#
# Result: .deps/bin/versitygw. It is a test dependency only: it is built
# with `go install` from the Go module proxy into .deps/bin, using its own
# module graph, so nothing of it enters ferry's go.mod or ferry's binary.
#
# Idempotent and quick when done (one `versitygw --version`). Concurrent
# runs are serialised with flock; the binary is built into a scratch
# directory and renamed into place, so an interrupted run never looks done.
#
# Environment:
#   FERRY_FORCE_PROVISION=1  rebuild even if the pinned version is there
#   FERRY_VERSITYGW_VERSION  module version (default v1.8.0)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deps="$repo/.deps"
bin="$deps/bin/versitygw"
version="${FERRY_VERSITYGW_VERSION:-v1.8.0}"
force="${FERRY_FORCE_PROVISION:-}"
go="${GO:-go}"

die() {
  echo "provision-versitygw: $*" >&2
  exit 1
}

# The stamp beside the binary names the version it was built from.
done_already() {
  [ -z "$force" ] && [ -x "$bin" ] && [ "$(cat "$bin.version" 2>/dev/null)" = "$version" ]
}

if done_already; then
  exit 0
fi

mkdir -p "$deps/bin"
if command -v flock >/dev/null; then
  exec 9>"$deps/.provision-versitygw.lock"
  flock 9
  if done_already; then
    exit 0
  fi
fi
rm -rf "$deps"/.versitygw-work.*
command -v "$go" >/dev/null || die "no Go toolchain ($go) to build the S3 test server"

echo "provision-versitygw: building versitygw $version from the Go module proxy into $bin"
work=$(mktemp -d "$deps/.versitygw-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
# No GOWORK and no GOFLAGS, run outside the repository: the install uses
# versitygw's own module graph and never touches ferry's go.mod.
(cd "$work" && GOWORK=off GOFLAGS='' CGO_ENABLED=0 GOBIN="$work" "$go" install \
  "github.com/versity/versitygw/cmd/versitygw@$version") ||
  die "building github.com/versity/versitygw/cmd/versitygw@$version failed (is the Go module proxy reachable?)"
[ -x "$work/versitygw" ] || die "go install left no versitygw binary"
rm -f "$bin.version"
mv -f "$work/versitygw" "$bin"
echo "$version" >"$bin.version"
echo "provision-versitygw: versitygw $version ready at $bin"
