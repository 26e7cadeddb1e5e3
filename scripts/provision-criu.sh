#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for ferry without touching the system.
#
# If the system's criu is new enough, .deps/bin/criu just points at it.
# Otherwise the criu package of Debian testing and the libraries it needs are
# downloaded with a private apt configuration (no sources added, no lists or
# caches of the system's apt touched), unpacked into .deps/criu, and started
# through that prefix's own dynamic loader by the wrapper .deps/bin/criu.
# Idempotent; quick when already done; an interrupted run never leaves a
# prefix that looks finished (it is built aside and moved into place).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deps="$repo/.deps"
prefix="$deps/criu"
wrapper="$deps/bin/criu"
suite="${FERRY_CRIU_SUITE:-forky}"
mirror="${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
min_major=4 min_minor=2

# version_ok BINARY: true if BINARY --version reports >= 4.2.
version_ok() {
  local v
  v=$("$@" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}') || return 1
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -gt "$min_major" ] || { [ "$major" -eq "$min_major" ] && [ "${minor:-0}" -ge "$min_minor" ]; }
}

if [ -x "$wrapper" ] && version_ok "$wrapper"; then
  exit 0
fi

mkdir -p "$deps/bin"

if [ -z "${FERRY_FORCE_PROVISION:-}" ] && sys=$(command -v criu 2>/dev/null) && version_ok "$sys"; then
  printf '#!/bin/sh\nexec %q "$@"\n' "$sys" > "$wrapper.tmp"
  chmod 0755 "$wrapper.tmp"
  mv -f "$wrapper.tmp" "$wrapper"
  echo "provision-criu: using the system's $("$wrapper" --version | head -1) at $sys"
  exit 0
fi

arch=$(dpkg --print-architecture)
case "$arch" in
  amd64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
  arm64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
  *) echo "provision-criu: unsupported architecture $arch; install CRIU >= 4.2 and pass --criu" >&2; exit 1 ;;
esac

echo "provision-criu: fetching criu and its libraries from Debian $suite into $prefix"
work=$(mktemp -d "$deps/.provision.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
echo "deb $mirror $suite main" > "$work/sources.list"
touch "$work/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::State::status=$work/status"
  -o "Dir::Cache=$work/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
  -o "Acquire::Retries=3"
)
apt-get "${apt_opts[@]}" -qq update

# criu's runtime closure, asked from the suite itself (so a newer criu with
# new libraries still works), plus the libraries ENGINE.md found enough on
# this OS in case the resolver leaves one out; names a suite lacks are
# skipped, criu itself is required.
mapfile -t closure < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances criu 2>/dev/null | grep -v '^ ' | grep -v '[<>]' | sort -u)
known=(criu libcompel1 libc6 libgnutls30t64 libnftables1 libnl-3-200 libprotobuf-c1
  libbsd0 libnet9 libuuid1 libmd0 libnftnl11 libmnl0 libjansson4 libxtables12
  libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10
  libp11-kit0 libffi8 libgcc-s1 libedit2 libtinfo6 libbpf1 libelf1t64 zlib1g libzstd1)
want=()
while read -r p; do
  [ -n "$p" ] || continue
  policy=$(apt-cache "${apt_opts[@]}" policy "$p" 2>/dev/null || true)
  if [[ $policy == *"Candidate: "[0-9]* ]]; then
    want+=("$p")
  elif [ "$p" = criu ]; then
    echo "provision-criu: Debian $suite has no criu package" >&2
    exit 1
  fi
done < <(printf '%s\n' "${closure[@]}" "${known[@]}" | sort -u)
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${want[@]}")
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done

root="$work/root"
[ -x "$root/usr/sbin/criu" ] || { echo "provision-criu: criu binary missing from the package" >&2; exit 1; }
# Move the prefix into place first, then write the wrapper: the wrapper is
# the mark of a finished provisioning.
rm -rf "$prefix.old"
[ -d "$prefix" ] && mv "$prefix" "$prefix.old"
mv "$root" "$prefix"
rm -rf "$prefix.old"
libpath="$prefix/usr/lib/$triplet:$prefix/lib/$triplet"
ld="$prefix/usr/lib/$triplet/$loader"
[ -x "$ld" ] || ld="$prefix/lib/$triplet/$loader"
cat > "$wrapper.tmp" <<WRAP
#!/bin/sh
# Written by scripts/provision-criu.sh: CRIU from Debian $suite, run through
# its own loader and libraries so the system's stay untouched.
exec "$ld" --library-path "$libpath" "$prefix/usr/sbin/criu" "\$@"
WRAP
chmod 0755 "$wrapper.tmp"
if ! version_ok "$wrapper.tmp"; then
  echo "provision-criu: the provisioned criu does not run or is older than 4.2:" >&2
  "$wrapper.tmp" --version >&2 || true
  rm -f "$wrapper.tmp"
  exit 1
fi
mv -f "$wrapper.tmp" "$wrapper"
echo "provision-criu: $("$wrapper" --version | head -1) ready at $wrapper"
