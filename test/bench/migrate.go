package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The migration section: a job stamping the time every millisecond is
// moved between two ferry roots of this machine over loopback (ferry
// serve on 127.0.0.1), by stop-copy and by post-copy. The figure that
// matters is the largest gap between two stamps (what the job saw), set
// against CRIU's own checkpoint + restore of the same memory and, for
// post-copy, CRIU's own lazy migration of the same job (lazy.go),
// measured in the same run.

type migrationRow struct {
	name             string
	gaps, totals     []time.Duration
	downtimes, bytes []int64
}

// pairedDur is the median over the rounds of a[i] / b[i].
func pairedDur(a, b []time.Duration) float64 {
	n := min(len(a), len(b))
	if n == 0 {
		return 0
	}
	r := make([]float64, n)
	for i := range n {
		r[i] = div(a[i], b[i])
	}
	slices.Sort(r)
	if n%2 == 1 {
		return r[n/2]
	}
	return (r[n/2-1] + r[n/2]) / 2
}

func medianDur(v []time.Duration) time.Duration {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianInt(v []int64) int64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// migrationBench runs the section for each memory size.
func migrationBench(criu, workload, tmp string, sizes []int) {
	fmt.Printf("\nmigration over loopback: a job stamping the time every ms; largest gap it saw, medians of %d\n", *reps)
	token := filepath.Join(tmp, "token")
	if err := os.WriteFile(token, []byte("ferry-bench-token-0123456789abcdef\n"), 0o600); err != nil {
		fatal("%v", err)
	}
	dst := filepath.Join(tmp, "dst")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("%v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	serve := exec.Command(*ferryBin, "--root", dst, "--criu", criu, "serve", "--listen", addr, "--token-file", token)
	serveLog, _ := os.Create(filepath.Join(tmp, "serve.log"))
	serve.Stdout, serve.Stderr = serveLog, serveLog
	if err := serve.Start(); err != nil {
		fatal("ferry serve: %v", err)
	}
	cleanups = append(cleanups, func() { _ = serve.Process.Signal(syscall.SIGTERM); _ = serve.Wait() })
	waitFor(func() bool {
		b, _ := os.ReadFile(serveLog.Name())
		return strings.Contains(string(b), "serving migrations")
	}, 30*time.Second, "ferry serve")

	src := filepath.Join(tmp, "src")
	ferryAt := func(root string, args ...string) string {
		return run(*ferryBin, append([]string{"--root", root, "--criu", criu}, args...)...)
	}
	fmt.Printf("%-52s %10s %10s %10s %10s\n", "", "gap", "downtime", "total", "sent")
	type verdict struct {
		name   string
		v      float64
		target string
		met    bool
	}
	var verdicts []verdict
	var pairs []string
	for _, mib := range sizes {
		// Every round measures the references and then ferry, one after
		// the other: drift on a noisy machine hits all of them alike, and
		// each round's ratios are printed as well (paired).
		ref := startWorkloadMiB(workload, mib)
		refRow := &row{name: "reference"}
		var lazyGaps, lazyTotals []time.Duration
		rows := map[string]*migrationRow{}
		modes := []string{"stop-copy", "post-copy"}
		for _, mode := range modes {
			rows[mode] = &migrationRow{name: fmt.Sprintf("%d MiB: ferry migrate --mode %s", mib, mode)}
		}
		for i := range *reps {
			// Reference: CRIU's own dump to tmpfs and restore of this memory.
			dir := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-mref-%d-%d", os.Getpid(), i))
			cleanups = append(cleanups, func() { os.RemoveAll(dir) })
			d := criuDump(criu, ref, dir)
			r := criuRestore(criu, dir)
			refRow.samples = append(refRow.samples, sample{wall: d.frozen + r.wall})
			os.RemoveAll(dir)
			// Reference: CRIU's own lazy migration of the same job (lazy.go).
			g, t := criuLazyMigrate(criu, workload, mib, i)
			lazyGaps, lazyTotals = append(lazyGaps, g), append(lazyTotals, t)

			for _, mode := range modes {
				r := rows[mode]
				name := fmt.Sprintf("mig%d%s%d", mib, strings.ReplaceAll(mode, "-", ""), i)
				ferryAt(src, "run", "--name", name, "--", workload, "stamp", strconv.Itoa(mib))
				cleanups = append(cleanups, func() {
					_ = exec.Command(*ferryBin, "--root", src, "kill", "--grace", "1s", name).Run()
					_ = exec.Command(*ferryBin, "--root", dst, "kill", "--grace", "1s", name).Run()
				})
				waitFor(func() bool { return strings.Count(ferryAt(src, "logs", name), "\nt ") > 100 }, 5*time.Minute, "the stamping job")
				settle()
				out := ferryAt(src, "migrate", name, "--to", addr, "--token-file", token, "--mode", mode, "--json")
				var rep struct {
					Total    int64 `json:"totalNs"`
					Downtime int64 `json:"downtimeNs"`
					Bytes    int64 `json:"bytesSent"`
				}
				if err := json.Unmarshal([]byte(out), &rep); err != nil {
					fatal("ferry migrate --json: %v", err)
				}
				// Let the destination stamp on for a while, then read the gap.
				time.Sleep(1500 * time.Millisecond)
				stamps := append(stampsOf(ferryAt(src, "logs", name)), stampsOf(ferryAt(dst, "logs", name))...)
				r.gaps = append(r.gaps, largestGap(stamps))
				r.totals = append(r.totals, time.Duration(rep.Total))
				r.downtimes = append(r.downtimes, rep.Downtime)
				r.bytes = append(r.bytes, rep.Bytes)
				_ = exec.Command(*ferryBin, "--root", dst, "kill", "--grace", "1s", name).Run()
			}
		}
		_ = syscall.Kill(ref, syscall.SIGKILL)
		refCR := refRow.median().wall
		lazyGap := medianDur(lazyGaps)
		fmt.Printf("%-52s %10s\n", fmt.Sprintf("%d MiB: criu dump (frozen) + criu restore (reference)", mib), ms(refCR))
		fmt.Printf("%-52s %10s %10s %10s\n", fmt.Sprintf("%d MiB: criu lazy migration, gap (reference)", mib), ms(lazyGap), "", ms(medianDur(lazyTotals)))
		for _, mode := range modes {
			r := rows[mode]
			fmt.Printf("%-52s %10s %10s %10s %7.0f MiB\n", r.name, ms(medianDur(r.gaps)), ms(time.Duration(medianInt(r.downtimes))),
				ms(medianDur(r.totals)), float64(medianInt(r.bytes))/(1<<20))
		}
		refWalls := make([]time.Duration, len(refRow.samples))
		for i, sm := range refRow.samples {
			refWalls[i] = sm.wall
		}
		pairs = append(pairs,
			fmt.Sprintf("%-58s %8.2f", fmt.Sprintf("%d MiB: stop-copy gap / (criu dump + restore)", mib), pairedDur(rows["stop-copy"].gaps, refWalls)),
			fmt.Sprintf("%-58s %8.2f", fmt.Sprintf("%d MiB: post-copy gap / criu lazy migration gap", mib), pairedDur(rows["post-copy"].gaps, lazyGaps)))
		sc, pc := medianDur(rows["stop-copy"].gaps), medianDur(rows["post-copy"].gaps)
		verdicts = append(verdicts,
			verdict{fmt.Sprintf("%d MiB: stop-copy gap / (criu dump + restore)", mib), div(sc, refCR), "<= 1.3", div(sc, refCR) <= 1.3},
			verdict{fmt.Sprintf("%d MiB: post-copy gap / criu lazy migration gap", mib), div(pc, lazyGap), "<= 1", pc <= lazyGap},
			verdict{fmt.Sprintf("%d MiB: post-copy gap / stop-copy gap", mib), div(pc, sc), "< 1", pc < sc})
	}
	fmt.Println()
	for _, v := range verdicts {
		state := "not met"
		if v.met {
			state = "met"
		}
		fmt.Printf("%-58s %8.2f   target %-8s %s\n", v.name, v.v, v.target, state)
	}
	fmt.Println("\npaired (informative): the median over the rounds of each round's ratio, measured in one round")
	for _, p := range pairs {
		fmt.Println(p)
	}
	fmt.Println("\nNotes: gap = largest interval between two of the job's stamps across the move (source log,")
	fmt.Println("then destination log); downtime = ferry's own figure (source frozen until the destination")
	fmt.Println("reports its copy running). Post-copy keeps the source frozen, holding the memory, until every")
	fmt.Println("page has been fetched; total counts that.")
}

// stampsOf parses the "t MICROS" lines of a stamping job's log.
func stampsOf(log string) []int64 {
	var out []int64
	for l := range strings.SplitSeq(log, "\n") {
		if v, ok := strings.CutPrefix(l, "t "); ok {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

// largestGap is the longest interval between consecutive stamps.
func largestGap(stamps []int64) time.Duration {
	slices.Sort(stamps)
	var gap int64
	for i := 1; i < len(stamps); i++ {
		gap = max(gap, stamps[i]-stamps[i-1])
	}
	return time.Duration(gap) * time.Microsecond
}
