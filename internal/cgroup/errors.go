package cgroup

import "errors"

// ErrNoHierarchy means the host has no cgroup hierarchy in which ferry can
// create a job cgroup and freeze it: neither a cgroup2 mount whose child
// cgroups have cgroup.freeze (Linux 5.2+), nor a cgroup v1 freezer mount.
var ErrNoHierarchy = errors.New("no usable cgroup hierarchy with a freezer")
