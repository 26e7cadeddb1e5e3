package main

import (
	"errors"

	"github.com/ferry-cr/ferry/internal/cgroup"
)

// hint is a sentence appended to an error's one line when the error
// often has a cause that its own words do not name.
func hint(err error) string {
	if errors.Is(err, cgroup.ErrNoHierarchy) {
		// `ip netns exec` unshares the mount namespace and mounts a
		// fresh sysfs on /sys, which has no cgroup filesystems under it.
		return " (under `ip netns exec`, which mounts a /sys of its own without cgroups: enter the network namespace with `nsenter --net=/run/netns/NAME` instead)"
	}
	return ""
}
