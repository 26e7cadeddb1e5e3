#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for ferry without touching the system.
#
# Result: .deps/bin/criu, an executable that ferry finds by itself (see
# internal/criu.DefaultProvisionedPaths).
#
#   - If the criu on PATH is already >= 4.2, .deps/bin/criu just execs it.
#   - Otherwise the criu package of Debian testing ("forky", see
#     /work/shared/ENGINE.md: bookworm's 3.17 does not start on current
#     kernels, trixie's 4.1 cannot dump TCP sockets on them) and the
#     libraries it needs are downloaded with a private apt configuration,
#     unpacked with dpkg-deb -x into .deps/criu, and started through that
#     prefix's own dynamic loader by the wrapper .deps/bin/criu.
#
# Nothing under /etc/apt, /var/lib/apt, /var/cache/apt or /var/lib/dpkg is
# written: sources, lists, caches and the dpkg status apt consults are
# private, and the system's apt hooks (APT::Update::Post-Invoke and friends,
# which on Docker-derived images delete /var/cache/apt/*.bin) are cleared.
#
# Idempotent and quick when done (one `criu --version`). Concurrent runs are
# serialised with flock. The prefix is built in a scratch directory beside
# it and moved into place in one rename; the wrapper, written last, is the
# mark of a finished run, so an interrupted run never looks done.
#
# Environment:
#   FERRY_FORCE_PROVISION=1  download even if a usable CRIU is already there
#   FERRY_CRIU_SUITE         Debian suite to take criu from (default forky)
#   FERRY_DEBIAN_MIRROR      mirror (default http://deb.debian.org/debian)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deps="$repo/.deps"
prefix="$deps/criu"
wrapper="$deps/bin/criu"
suite="${FERRY_CRIU_SUITE:-forky}"
mirror="${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
force="${FERRY_FORCE_PROVISION:-}"
min_major=4 min_minor=2

say() { echo "provision-criu: $*"; }
die() {
  echo "provision-criu: $*" >&2
  exit 1
}

# criu_version CMD...: print the version CMD --version reports, e.g. 4.2.1.
criu_version() {
  "$@" --version 2>/dev/null | awk '$1 == "Version:" {print $2; exit}'
}

# version_ok CMD...: true if CMD --version reports >= 4.2.
version_ok() {
  local v major minor
  v=$(criu_version "$@") || return 1
  [[ $v =~ ^([0-9]+)\.([0-9]+) ]] || return 1
  major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  ((major > min_major || (major == min_major && minor >= min_minor)))
}

done_already() {
  [ -z "$force" ] && [ -x "$wrapper" ] && version_ok "$wrapper"
}

# Fast path: nothing to do (no lock, no network).
if done_already; then
  exit 0
fi

mkdir -p "$deps/bin"
# Two `make test` at once must not interleave their renames.
if command -v flock >/dev/null; then
  exec 9>"$deps/.provision.lock"
  flock 9
  if done_already; then
    exit 0 # another run finished while we waited
  fi
fi
# Leftovers of runs that were killed (SIGKILL skips the EXIT trap).
rm -rf "$deps"/.provision-work.* "$prefix.old"

# A system CRIU that is new enough: point the wrapper at it.
if [ -z "$force" ] && sys=$(command -v criu) && [ "$(readlink -f "$sys")" != "$(readlink -f "$wrapper")" ] && version_ok "$sys"; then
  printf '#!/bin/sh\n# Written by scripts/provision-criu.sh: the system CRIU is new enough.\nexec %q "$@"\n' "$sys" >"$wrapper.tmp"
  chmod 0755 "$wrapper.tmp"
  mv -f "$wrapper.tmp" "$wrapper"
  say "using the system's CRIU $(criu_version "$wrapper") at $sys"
  exit 0
fi

for tool in apt-get apt-cache dpkg dpkg-deb; do
  command -v "$tool" >/dev/null ||
    die "no CRIU >= $min_major.$min_minor on PATH and no $tool to fetch Debian's: install CRIU >= $min_major.$min_minor and pass --criu or set FERRY_CRIU"
done
arch=$(dpkg --print-architecture)
case "$arch" in
  amd64) triplet=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
  arm64) triplet=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
  *) die "unsupported architecture $arch: install CRIU >= $min_major.$min_minor and pass --criu" ;;
esac

say "fetching criu and its libraries from Debian $suite into $prefix"
work=$(mktemp -d "$deps/.provision-work.XXXXXX") # same filesystem: mv is a rename
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
echo "deb $mirror $suite main" >"$work/sources.list"
: >"$work/state/status" # an empty dpkg status: apt must not consult the system's
cat >"$work/apt.conf" <<'EOF'
// Read after the system's configuration (apt-get -c): keep its proxies and
// keyrings, drop its hooks, which act on the system's caches.
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
// Only Packages indices are needed (no appstream or apt-file data).
#clear Acquire::IndexTargets::deb::DEP-11;
#clear Acquire::IndexTargets::deb::DEP-11-icons-small;
#clear Acquire::IndexTargets::deb::DEP-11-icons;
#clear Acquire::IndexTargets::deb::Contents-deb;
Acquire::Languages "none";
Acquire::Retries "3";
// Docker images disable the binary cache; without it every apt-cache call
// re-reads the whole index.
Dir::Cache::pkgcache "pkgcache.bin";
EOF
apt_opts=(
  -c "$work/apt.conf"
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State=$work/state"
  -o "Dir::State::Lists=$work/state/lists"
  -o "Dir::State::status=$work/state/status"
  -o "Dir::Cache=$work/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -qq update

# criu's runtime closure, asked from the suite itself (so a newer criu with
# new libraries still works), plus the libraries ENGINE.md found enough, in
# case the resolver leaves one out. Names the suite lacks are skipped; criu
# itself is required.
mapfile -t closure < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances criu 2>/dev/null | grep -v '^ ' | grep -v '[<>]' || true)
known=(criu libcompel1 libc6 libgnutls30t64 libnftables1 libnl-3-200 libprotobuf-c1
  libbsd0 libnet9 libuuid1 libmd0 libnftnl11 libmnl0 libjansson4 libxtables12
  libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10
  libp11-kit0 libffi8 libgcc-s1 libedit2 libtinfo6 libbpf1 libelf1t64 zlib1g libzstd1)
mapfile -t names < <(printf '%s\n' "${closure[@]}" "${known[@]}" | sed '/^$/d' | sort -u)
# One apt-cache policy call for all names: those with a candidate exist.
mapfile -t want < <(apt-cache "${apt_opts[@]}" policy "${names[@]}" 2>/dev/null |
  awk '/^[^ ].*:$/ {p = substr($0, 1, length($0) - 1)} $1 == "Candidate:" && $2 != "(none)" {print p}')
has_criu=
for p in "${want[@]}"; do
  [ "$p" != criu ] || has_criu=1
done
[ -n "$has_criu" ] || die "Debian $suite ($mirror) has no criu package"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${want[@]}")
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done

# Try the new prefix where it is before moving anything.
root="$work/root"
libpath_of() { echo "$1/usr/lib/$triplet:$1/lib/$triplet"; }
loader_of() {
  if [ -x "$1/usr/lib/$triplet/$loader" ]; then
    echo "$1/usr/lib/$triplet/$loader"
  else
    echo "$1/lib/$triplet/$loader"
  fi
}
[ -x "$root/usr/sbin/criu" ] || die "the criu package of $suite has no usr/sbin/criu"
if ! version_ok "$(loader_of "$root")" --library-path "$(libpath_of "$root")" "$root/usr/sbin/criu"; then
  "$(loader_of "$root")" --library-path "$(libpath_of "$root")" "$root/usr/sbin/criu" --version >&2 || true
  die "the downloaded criu does not run or is older than $min_major.$min_minor (output above)"
fi

# Unmark first (the wrapper is the mark of a finished run), then swap the
# prefix in with renames, then write the wrapper.
rm -f "$wrapper"
if [ -e "$prefix" ]; then
  mv -T "$prefix" "$prefix.old"
fi
mv -T "$root" "$prefix"
rm -rf "$prefix.old"
{
  echo '#!/bin/sh'
  echo "# Written by scripts/provision-criu.sh: CRIU from Debian $suite, run through"
  echo "# its own loader and libraries so the system's stay untouched."
  printf 'exec %q --library-path %q %q "$@"\n' "$(loader_of "$prefix")" "$(libpath_of "$prefix")" "$prefix/usr/sbin/criu"
} >"$wrapper.tmp"
chmod 0755 "$wrapper.tmp"
version_ok "$wrapper.tmp" || die "the provisioned criu does not run through $wrapper.tmp"
mv -f "$wrapper.tmp" "$wrapper"
say "CRIU $(criu_version "$wrapper") ready at $wrapper"

# Tell at once whether this kernel suits it (ferry doctor says more).
if [ "$(id -u)" -eq 0 ]; then
  if out=$("$wrapper" check 2>&1) && [[ $out == *"Looks good"* ]]; then
    say "criu check: Looks good."
  else
    say "criu check did not pass on this kernel (run ferry doctor):"
    printf '%s\n' "$out" | grep -v -e '^Warn' -e 'RLIMIT_NOFILE' | tail -n 5 >&2
  fi
fi
