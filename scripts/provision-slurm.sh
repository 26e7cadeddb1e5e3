#!/usr/bin/env bash
# Provision a single-node Slurm for ferry's Slurm test (test/slurm_test.go)
# without touching the system: Debian's slurm-wlm 22.05 (slurmctld, slurmd,
# the client commands) and munge, downloaded with apt-get download from the
# system's own apt sources and unpacked with dpkg-deb -x into .deps/slurm.
# Nothing is installed, no service is started; the test writes its own
# slurm.conf, starts munged, slurmctld and slurmd on private ports and
# stops them.
#
# Result: .deps/slurm/bin/{sbatch,srun,scontrol,squeue,scancel,sinfo,
# munged,slurmctld,slurmd}, wrappers that set LD_LIBRARY_PATH to the
# unpacked libraries; .deps/slurm/plugins (slurm.conf's PluginDir) and
# .deps/slurm/bin/slurmstepd (slurmd -d).
#
# Idempotent and quick when done (a few seconds when not). Needs the Debian
# mirror the system's apt uses (bookworm has 22.05); `make test` runs it
# (make test-deps), and the Slurm test fails without it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
deps="$repo/.deps"
prefix="$deps/slurm"
mark="$prefix/bin/sbatch"
pkgs=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libmunge2 libhwloc15 liblua5.1-0)

die() {
  echo "provision-slurm: $*" >&2
  exit 1
}

if [ -x "$mark" ] && [ -z "${FERRY_FORCE_PROVISION:-}" ]; then
  exit 0
fi
for tool in apt-get dpkg-deb dpkg; do
  command -v "$tool" >/dev/null || die "needs $tool (a Debian-like system) to fetch slurm-wlm"
done
[ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is provisioned"
mkdir -p "$deps"
deps=$(cd "$deps" && pwd -P) prefix=$(cd "$deps" && pwd -P)/slurm # wrappers name real paths
mark="$prefix/bin/sbatch"
exec 9>"$deps/.provision-slurm.lock"
flock 9
if [ -x "$mark" ] && [ -z "${FERRY_FORCE_PROVISION:-}" ]; then
  exit 0
fi
rm -rf "$deps"/.slurm-work.*
work=$(mktemp -d "$deps/.slurm-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "provision-slurm: fetching ${pkgs[*]} into $prefix"
(cd "$work" && apt-get download -qq "${pkgs[@]}" 2>/dev/null) ||
  die "apt-get download ${pkgs[*]} failed (is a Debian mirror reachable? apt-get update may help)"
mkdir "$work/root"
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
[ -x "$work/root/usr/sbin/slurmctld-wlm" ] || die "the slurmctld package has no usr/sbin/slurmctld-wlm"
mkdir "$work/root/bin"
final_lib="$prefix/root/usr/lib/x86_64-linux-gnu"
wrap() { # wrap NAME PATH-UNDER-ROOT
  {
    echo '#!/bin/sh'
    echo "# Written by scripts/provision-slurm.sh: Debian's $1, unpacked, not installed."
    # shellcheck disable=SC2016 # expanded by the wrapper, not here
    printf 'LD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %q "$@"\n' "$final_lib/slurm-wlm:$final_lib" "$prefix/root/$2"
  } >"$work/root/bin/$1"
  chmod 0755 "$work/root/bin/$1"
}
for c in sbatch srun scontrol squeue scancel sinfo sacct munge unmunge; do
  wrap "$c" "usr/bin/$c"
done
wrap munged usr/sbin/munged
wrap slurmctld usr/sbin/slurmctld-wlm
wrap slurmd usr/sbin/slurmd-wlm
wrap slurmstepd usr/sbin/slurmstepd-wlm
rm -rf "$prefix"
mkdir -p "$prefix"
mv "$work/root" "$prefix/root"
ln -s root/usr/lib/x86_64-linux-gnu/slurm-wlm "$prefix/plugins"
# The mark of a finished run, last.
mv "$prefix/root/bin" "$prefix/bin"
LD_LIBRARY_PATH="$final_lib/slurm-wlm:$final_lib" "$prefix/root/usr/sbin/slurmctld-wlm" -V >/dev/null ||
  { rm -rf "${prefix:?}/bin"; die "the unpacked slurmctld does not run"; }
echo "provision-slurm: $("$prefix/bin/slurmctld" -V) ready in $prefix"
