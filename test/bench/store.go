package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The store section: a job holding MIB of random memory is snapshotted
// into a fresh snapshot store (the first snapshot stores everything),
// rewrites 1% of its pages, and is snapshotted again (only what changed
// should be stored), set against a full ferry checkpoint of the same job
// to a .ferry file in the same run. Once, at the end, the latest
// snapshot is restored and its memory checked against the job's own sum.

type storeRow struct {
	name                string
	walls, frozens      []time.Duration
	raws, news, storeds []int64
	storeDirs           []int64 // the store directory's size after the snapshot
}

func (r *storeRow) print() {
	mib := func(v []int64) string {
		if len(v) == 0 {
			return "-"
		}
		return fmt.Sprintf("%.1f MiB", float64(medianInt(v))/(1<<20))
	}
	fmt.Printf("%-52s %10s %10s %12s %12s %12s\n", r.name, ms(medianDur(r.walls)), ms(medianDur(r.frozens)),
		mib(r.raws), mib(r.news), mib(r.storeds))
}

// storeResult is what ferry checkpoint --json prints (dump.Result); the
// snapshot (store.Snapshot) has no json tags.
type storeResult struct {
	Frozen   int64 `json:"frozenNs"`
	Size     int64 `json:"sizeBytes"`
	Snapshot *struct {
		ID          string
		RawBytes    int64
		NewBytes    int64
		StoredBytes int64
	} `json:"snapshot"`
}

// storeBench runs the section for a job of mib MiB.
func storeBench(criu, workload, tmp string, mib int) {
	fmt.Printf("\nsnapshot store: a %d MiB job of random memory rewriting 1%% of its pages between two snapshots,\n", mib)
	fmt.Printf("a fresh store each repetition, medians of %d\n", *reps)
	root := filepath.Join(tmp, "store-root")
	ferry := func(args ...string) string {
		return run(*ferryBin, append([]string{"--root", root, "--criu", criu}, args...)...)
	}
	const name = "storebench"
	ferry("run", "--name", name, "--", workload, "churn", strconv.Itoa(mib))
	cleanups = append(cleanups, func() { _ = exec.Command(*ferryBin, "--root", root, "kill", "--grace", "1s", name).Run() })
	waitFor(func() bool { return strings.Contains(ferry("logs", name), "ready\n") }, 5*time.Minute, "the churn workload to fill its memory")
	pid := jobMainPid(ferry, name, workload)

	full := &storeRow{name: "ferry checkpoint -> .ferry file (full, zstd, on disk)"}
	first := &storeRow{name: "store: first snapshot (empty store)"}
	second := &storeRow{name: "store: second snapshot, 1% of pages rewritten"}
	checkpoint := func(r *storeRow, args ...string) *storeResult {
		start := time.Now()
		out := ferry(append([]string{"checkpoint", "--json", "--leave-running"}, args...)...)
		wall := time.Since(start)
		var res storeResult
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			fatal("ferry checkpoint --json: %v", err)
		}
		r.walls = append(r.walls, wall)
		r.frozens = append(r.frozens, time.Duration(res.Frozen))
		if s := res.Snapshot; s != nil {
			r.raws = append(r.raws, s.RawBytes)
			r.news = append(r.news, s.NewBytes)
			r.storeds = append(r.storeds, s.StoredBytes)
		} else {
			r.storeds = append(r.storeds, res.Size)
		}
		return &res
	}
	// Each round: a fresh store, its first snapshot, a churn, the second
	// snapshot, then the full checkpoint (after the store, so that a cold
	// first round does not flatter the store).
	var lastStore, churnSum string
	for i := range *reps {
		dir := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-store-%d-%d", os.Getpid(), i))
		cleanups = append(cleanups, func() { os.RemoveAll(dir) })
		checkpoint(first, "--store", dir, name)
		first.storeDirs = append(first.storeDirs, dirSize(dir))

		before := strings.Count(ferry("logs", name), "churned ")
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			fatal("signalling the churn workload: %v", err)
		}
		waitFor(func() bool { return strings.Count(ferry("logs", name), "churned ") > before }, 2*time.Minute, "the workload to rewrite its pages")
		churnSum = lastField(ferry("logs", name), "churned ")

		res := checkpoint(second, "--store", dir, name)
		if res.Snapshot == nil {
			fatal("ferry checkpoint --store --json: no snapshot in the result")
		}
		second.storeDirs = append(second.storeDirs, dirSize(dir))

		file := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-store-%d-%d.ferry", os.Getpid(), i))
		cleanups = append(cleanups, func() { os.Remove(file) })
		checkpoint(full, "-o", file, name)
		os.Remove(file)

		if lastStore != "" {
			os.RemoveAll(lastStore)
		}
		lastStore = dir
	}

	// Correctness, once: the latest snapshot restored holds the memory
	// the job had when it was taken.
	const restored = "storebench-restored"
	cleanups = append(cleanups, func() { _ = exec.Command(*ferryBin, "--root", root, "kill", "--grace", "1s", restored).Run() })
	ferry("restore", "--store", lastStore, "--name", restored, "--progress", "off", name)
	rpid := jobMainPid(ferry, restored, workload)
	matched := "no"
	if err := syscall.Kill(rpid, syscall.SIGUSR2); err == nil &&
		waitFor(func() bool { return strings.Contains(ferry("logs", restored), "sum ") }, time.Minute, "") &&
		lastField(ferry("logs", restored), "sum ") == churnSum {
		matched = "yes"
	}
	ferry("kill", "--grace", "1s", restored)
	ferry("kill", "--grace", "1s", name)
	os.RemoveAll(lastStore)

	fmt.Printf("%-52s %10s %10s %12s %12s %12s\n", "", "wall", "frozen", "raw", "new", "stored")
	for _, r := range []*storeRow{full, first, second} {
		r.print()
	}
	fd, sd := medianInt(first.storeDirs), medianInt(second.storeDirs)
	fmt.Printf("\nstore directory on disk: %.1f MiB after the first snapshot, %.1f MiB more after the second\n",
		float64(fd)/(1<<20), float64(sd-fd)/(1<<20))
	fmt.Printf("restored snapshot's memory checksum matched: %s\n\n", matched)

	ratio := func(name string, v float64, target string, met bool) {
		verdict := "not met"
		if met {
			verdict = "met"
		}
		fmt.Printf("%-58s %8.3f   target %-8s %s\n", name, v, target, verdict)
	}
	fs, ss, ff := medianInt(first.storeds), medianInt(second.storeds), medianInt(full.storeds)
	sw, fw := medianDur(second.walls), medianDur(full.walls)
	ratio("second snapshot stored / first snapshot stored", float64(ss)/float64(max(1, fs)), "<= 0.05", ss*20 <= fs)
	ratio("second snapshot / ferry checkpoint (.ferry): wall", div(sw, fw), "< 1", sw < fw)
	ratio("second snapshot stored / .ferry file size", float64(ss)/float64(max(1, ff)), "<= 0.05", ss*20 <= ff)
	fmt.Println("\nNotes: wall is the ferry command end to end; frozen is ferry's own figure (the job frozen")
	fmt.Println("while CRIU dumps into tmpfs). CRIU dumps the whole job every time (no soft-dirty tracking),")
	fmt.Println("so a second snapshot freezes the job as long as the first; the store then hashes every")
	fmt.Println("4 KiB page while the job runs and compresses and writes only those it does not hold. raw is")
	fmt.Println("the size of CRIU's images, new the raw size of the chunks the store did not hold, stored what")
	fmt.Println("the snapshot added to the store (compressed chunks, page-hash lists, indexes). Random memory")
	fmt.Println("does not compress: the first snapshot and the .ferry file are about the job's size.")
}

// jobMainPid is the host pid of job name's main process (the child of
// its init), checked to be the workload before anything signals it.
func jobMainPid(ferry func(...string) string, name, workload string) int {
	var pid int
	waitFor(func() bool {
		var views []struct {
			Name    string `json:"name"`
			MainPID int    `json:"mainPid"`
		}
		if err := json.Unmarshal([]byte(ferry("list", "--json")), &views); err != nil {
			fatal("ferry list --json: %v", err)
		}
		for _, v := range views {
			if v.Name == name {
				pid = v.MainPID
			}
		}
		return pid > 0
	}, 30*time.Second, "the main pid of job "+name)
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.HasPrefix(string(cmdline), workload+"\x00") {
		fatal("job %s: main pid %d is not the workload (%q)", name, pid, cmdline)
	}
	return pid
}

// lastField is the last word of the last line starting with prefix
// ("churned N HEX" gives HEX, "sum HEX" gives HEX).
func lastField(log, prefix string) string {
	var last string
	for l := range strings.SplitSeq(log, "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			last = v
		}
	}
	f := strings.Fields(last)
	if len(f) == 0 {
		return ""
	}
	return f[len(f)-1]
}
