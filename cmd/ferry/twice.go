package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/job"
)

// warnListenersInUse warns, in one line on w, when the tree in the
// checkpoint at path listens on an address (TCP, or a unix socket path)
// that a running job of s listens on now: most often the same checkpoint
// restored a second time, or the original still running. CRIU restores
// listening sockets in repair mode, so the copy would listen beside the
// other without a word, and connections would go to either.
//
// It warns rather than refuses: a copy side by side is a use (restore
// --name), and one that does not listen harms nothing. It reads only the
// manifest; a checkpoint on standard input, a FIFO or a special file is
// not looked at.
func warnListenersInUse(w io.Writer, s *job.Registry, path string) {
	want := listeners(checkpointInventory(path))
	if len(want) == 0 {
		return
	}
	recs, err := s.List()
	if err != nil {
		return
	}
	var clash []string
	for _, r := range recs {
		if !r.InitAlive() {
			continue
		}
		inv, _, err := dump.DryRun(s, r.Name, dump.Allowed{})
		if err != nil {
			continue
		}
		for _, a := range listeners(inv) {
			if slices.Contains(want, a) {
				clash = append(clash, fmt.Sprintf("%s (job %s)", a, r.Name))
			}
		}
	}
	if len(clash) > 0 {
		fmt.Fprintf(w, "ferry: warning: the restored tree will listen on %s already listened on here: two copies of one checkpoint? connections may reach either\n", strings.Join(clash, ", "))
	}
}

// checkpointInventory reads the walk recorded in a checkpoint's manifest.
func checkpointInventory(path string) *dump.Inventory {
	var m *checkpoint.Manifest
	if path == "-" {
		return nil
	}
	// Only a file or directory is read ahead: a FIFO or other special
	// file would block here and lose what it gives to the restore.
	st, err := os.Stat(path)
	if err != nil || !st.Mode().IsRegular() && !st.IsDir() {
		return nil
	}
	if checkpoint.IsStream(path) {
		f, err := os.Open(path)
		if err != nil {
			return nil
		}
		defer f.Close()
		pm, t, err := image.ReadIndex(f)
		if err != nil {
			return nil
		}
		if fm := t.GetFinalManifest(); fm != nil {
			pm = fm
		}
		if m, err = checkpoint.FromRecord(pm); err != nil {
			return nil
		}
	} else {
		var err error
		if m, err = checkpoint.LoadManifest(path); err != nil {
			return nil
		}
	}
	return m.GetInventory()
}

// listeners lists the addresses the tree listens on: "tcp ADDR:PORT",
// "unix PATH".
func listeners(inv *dump.Inventory) []string {
	if inv == nil {
		return nil
	}
	var out []string
	for _, s := range inv.Sockets {
		switch {
		case strings.HasPrefix(s.Family, "tcp") && s.State == "listen":
			out = append(out, "tcp "+s.Local)
		case s.Family == "unix" && s.State == "listening" && s.Local != "":
			out = append(out, "unix "+s.Local)
		}
	}
	return out
}
