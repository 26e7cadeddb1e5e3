#!/usr/bin/env bash
# Runs protoc, installing Debian's protobuf-compiler first when it is
# missing (as root; the only change to the system, and only when asked for
# through make proto / make check-proto).
set -euo pipefail
if ! command -v protoc >/dev/null; then
	if [ "$(id -u)" != 0 ]; then
		echo "protoc missing: apt-get install protobuf-compiler (as root)" >&2
		exit 1
	fi
	echo "installing protobuf-compiler from Debian" >&2
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null
fi
exec protoc "$@"
