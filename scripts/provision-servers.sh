#!/bin/sh
# provision-servers.sh PKG:BINARY... installs each Debian package whose
# binary is not on PATH, for the real-server tests (test/servers_test.go).
# It runs `apt-get update` at most once and never starts a service: the
# packages' own init scripts are kept from running by a policy-rc.d that
# exists only while apt-get runs, so the tests start each server themselves.
set -eu
missing=""
for spec in "$@"; do
	pkg=${spec%%:*}
	bin=${spec#*:}
	if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ] && [ ! -x "/usr/bin/$bin" ]; then
		missing="$missing $pkg"
	fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "provision-servers: needs root to install:$missing" >&2
	exit 1
fi
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	made_policy=1
fi
cleanup() { [ -n "$made_policy" ] && rm -f "$policy"; return 0; }
trap cleanup EXIT
apt-get -o DPkg::Lock::Timeout=300 update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $missing
