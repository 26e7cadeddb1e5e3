#!/usr/bin/env bash
# Installs a C compiler and the C library's static archive from Debian when
# the machine has no cc: for the jobs' small init (bin/ferry-init) and the
# conformance programs (make conform).
set -euo pipefail
if command -v cc >/dev/null; then
	exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
	echo "ferry: no C compiler (cc): install gcc and libc6-dev to build bin/ferry-init and test/conform" >&2
	exit 1
fi
echo "installing gcc and libc6-dev from Debian for bin/ferry-init and test/conform" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
