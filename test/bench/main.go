// Command bench measures ferry's checkpoint and restore against CRIU on
// its own, in one run, on the same workload, and prints medians and
// ratios (make bench). It asserts nothing: the figures are the result.
//
// Sections, in this order (-only picks one):
//
// checkpoint:
//   - reference dump: criu dump --leave-running into a tmpfs directory
//   - podman-style: criu dump into a directory on disk, then tar | zstd -1 -T0
//   - ferry checkpoint (to disk and to tmpfs), --leave-running
//   - ferry checkpoint to a .ferry file, in its default codec (s2) and in
//     zstd (--compress zstd), for the choice of the default
//   - reference restore: criu restore from tmpfs into a fresh PID namespace
//   - ferry restore of its checkpoints: directory, .ferry (s2), .ferry (zstd)
//
// migrate (-migrate-mib):
//   - ferry migrate over loopback, stop-copy and post-copy, against CRIU's
//     own dump + restore of the same memory, and post-copy against CRIU's
//     own lazy migration (dump --lazy-pages, lazy-pages, restore
//     --lazy-pages) of the same job over the same loopback
//
// store (-store-mib):
//   - ferry checkpoint of a job of random memory to a .ferry file on disk
//   - the job's first snapshot into an empty snapshot store on disk
//   - its second snapshot after it rewrote 1% of its pages
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
)

var (
	reps     = flag.Int("n", 3, "repetitions of each measurement (the migration and store sections)")
	ckptReps = flag.Int("ckpt-n", 5, "repetitions of the checkpoint and restore section (a second or two each; on a noisy host three are too few)")
	mib      = flag.Int("mib", 1024, "workload memory in MiB (half random, half text)")
	migMiB   = flag.String("migrate-mib", "256,1024", "memory sizes (MiB) of the migration section; empty skips it")
	storeMiB = flag.String("store-mib", "1024", "memory size (MiB) of the snapshot-store section; empty or 0 skips it")
	only     = flag.String("only", "", "run only this section: checkpoint, migrate or store")
	ferryBin = flag.String("ferry", "bin/ferry", "ferry binary")
	criuBin  = flag.String("criu", "", "CRIU binary (default: $FERRY_CRIU, .deps/bin/criu, PATH)")
	diskDir  = flag.String("disk", "/var/tmp", "directory on disk for on-disk checkpoints")
	shmDir   = flag.String("tmpfs", "/dev/shm", "tmpfs directory")
)

// verifyIf is the file whose presence lets the workload's copies hash
// their memory.
var verifyIf string

// cleanups run at exit, also on error and on Ctrl-C.
var cleanups []func()

func cleanup() {
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	cleanups = nil
}

func fatal(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	cleanup()
	os.Exit(1)
}

type sample struct {
	wall, frozen time.Duration
	size         int64
}

type row struct {
	name    string
	samples []sample
}

func (r *row) median() sample {
	if len(r.samples) == 0 {
		return sample{}
	}
	med := func(f func(sample) int64) int64 {
		v := make([]int64, len(r.samples))
		for i, s := range r.samples {
			v[i] = f(s)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return sample{
		wall:   time.Duration(med(func(s sample) int64 { return int64(s.wall) })),
		frozen: time.Duration(med(func(s sample) int64 { return int64(s.frozen) })),
		size:   med(func(s sample) int64 { return s.size }),
	}
}

func main() {
	flag.Parse()
	if *only != "" && *only != "checkpoint" && *only != "migrate" && *only != "store" {
		fatal("-only: %q is not checkpoint, migrate or store", *only)
	}
	storeSize := 0
	if f := strings.TrimSpace(*storeMiB); f != "" {
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 {
			fatal("-store-mib: bad size %q", f)
		}
		storeSize = n
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; fatal("interrupted") }()
	defer cleanup()

	criu := findCriu()
	tmp, err := os.MkdirTemp("", "ferry-bench-")
	if err != nil {
		fatal("%v", err)
	}
	cleanups = append(cleanups, func() { os.RemoveAll(tmp) })
	workload := filepath.Join(tmp, "workload")
	build := exec.Command("go", "build", "-o", workload, "./test/workload")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fatal("building workload: %v\n%s", err, out)
	}
	// The workload's copies hash their memory (most of a core each) only
	// while this file exists: only when a restored copy proves its memory,
	// never while something is timed.
	verifyIf = filepath.Join(tmp, "verify")
	os.Setenv("WORKLOAD_VERIFY_IF", verifyIf)
	fmt.Printf("ferry bench: medians of %d (checkpoint and restore) and %d (migration, store); criu: %s\n\n", *ckptReps, *reps, criu)

	if *only == "" || *only == "checkpoint" {
		checkpointBench(criu, workload, tmp)
	}
	if (*only == "" || *only == "migrate") && *migMiB != "" {
		var sizes []int
		for f := range strings.SplitSeq(*migMiB, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				fatal("-migrate-mib: bad size %q", f)
			}
			sizes = append(sizes, n)
		}
		migrationBench(criu, workload, tmp, sizes)
	}
	if (*only == "" || *only == "store") && storeSize > 0 {
		storeBench(criu, workload, tmp, storeSize)
	}
}

// checkpointBench is the checkpoint and restore section.
func checkpointBench(criu, workload, tmp string) {
	fmt.Printf("checkpoint and restore: a %d MiB workload (half random, half text)\n", *mib)
	// The reference workload, started directly, and the same workload as
	// a ferry job.
	ref := startWorkload(workload)
	root := filepath.Join(tmp, "root")
	ferry := func(args ...string) string {
		return run(*ferryBin, append([]string{"--root", root, "--criu", criu}, args...)...)
	}
	ferry("run", "--name", "bench", "--", workload, "memory", fmt.Sprint(*mib))
	cleanups = append(cleanups, func() { _ = exec.Command(*ferryBin, "--root", root, "kill", "--grace", "1s", "bench").Run() })
	waitFor(func() bool { return strings.Contains(ferry("logs", "bench"), "sum ") }, 5*time.Minute, "workload to fill its memory")
	sum := strings.Fields(strings.SplitN(strings.SplitN(ferry("logs", "bench"), "sum ", 2)[1], "\n", 2)[0])[0]

	refDump := &row{name: "criu dump -> tmpfs (reference)"}
	podman := &row{name: "podman-style: dump to disk + tar|zstd -1 -T0"}
	ferryDisk := &row{name: "ferry checkpoint -> disk (directory, fsynced)"}
	ferryShm := &row{name: "ferry checkpoint -> tmpfs"}
	ferryFile := &row{name: "ferry checkpoint -> .ferry file (s2, default; disk)"}
	ferryFileShm := &row{name: "ferry checkpoint -> .ferry file (s2; tmpfs)"}
	ferryZstd := &row{name: "ferry checkpoint -> .ferry file (--compress zstd)"}
	ferryCkpt := func(r *row, dir string, args ...string) {
		cleanups = append(cleanups, func() { os.RemoveAll(dir) })
		settle()
		start := time.Now()
		out := ferry(append(append([]string{"checkpoint", "--json", "--leave-running", "-o", dir}, args...), "bench")...)
		wall := time.Since(start)
		var res struct {
			Frozen int64 `json:"frozenNs"`
			Size   int64 `json:"sizeBytes"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			fatal("ferry checkpoint --json: %v", err)
		}
		r.samples = append(r.samples, sample{wall: wall, frozen: time.Duration(res.Frozen), size: res.Size})
	}
	// One untimed dump first (page cache and tmpfs warm), then every
	// method once per round, so that drift on a noisy machine hits all.
	warm := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-warm-%d", os.Getpid()))
	cleanups = append(cleanups, func() { os.RemoveAll(warm) })
	criuDump(criu, ref, warm)
	os.RemoveAll(warm)
	var keep, ckpt, fileCkpt, zstdCkpt string
	for i := range *ckptReps {
		dir := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-ref-%d-%d", os.Getpid(), i))
		cleanups = append(cleanups, func() { os.RemoveAll(dir) })
		refDump.samples = append(refDump.samples, criuDump(criu, ref, dir))
		if keep == "" {
			keep = dir
		} else {
			os.RemoveAll(dir)
		}

		pdir := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-podman-%d-%d", os.Getpid(), i))
		archive := pdir + ".tar.zst"
		cleanups = append(cleanups, func() { os.RemoveAll(pdir); os.Remove(archive) })
		start := time.Now()
		s := criuDump(criu, ref, pdir)
		run("sh", "-c", fmt.Sprintf("tar -C %q -cf - . | zstd -q -1 -T0 -o %q", pdir, archive))
		s.wall = time.Since(start)
		s.size = fileSize(archive)
		podman.samples = append(podman.samples, s)
		os.RemoveAll(pdir)
		os.Remove(archive)

		fdir := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-ferry-%d-%d", os.Getpid(), i))
		ferryCkpt(ferryDisk, fdir)
		if ckpt != "" {
			os.RemoveAll(ckpt)
		}
		ckpt = fdir
		sdir := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-ferry-%d-%d", os.Getpid(), i))
		ferryCkpt(ferryShm, sdir)
		os.RemoveAll(sdir)
		ffile := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-ferry-%d-%d.ferry", os.Getpid(), i))
		ferryCkpt(ferryFile, ffile)
		if fileCkpt != "" {
			os.Remove(fileCkpt)
		}
		fileCkpt = ffile
		// The same on tmpfs: ferry's own cost, without this host's disk
		// (whose writes here vary from 0.15 to 1.5 s for 512 MiB).
		sfile := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-ferry-%d-%d.ferry", os.Getpid(), i))
		ferryCkpt(ferryFileShm, sfile)
		os.Remove(sfile)
		zfile := filepath.Join(*diskDir, fmt.Sprintf("ferry-bench-ferry-zstd-%d-%d.ferry", os.Getpid(), i))
		ferryCkpt(ferryZstd, zfile, "--compress", "zstd")
		if zstdCkpt != "" {
			os.Remove(zstdCkpt)
		}
		zstdCkpt = zfile
	}
	// The reference restore runs in the same rounds as ferry's, before
	// each round's three: drift on a noisy machine hits all four alike.
	refRestore := &row{name: "criu restore from tmpfs, fresh pid ns (reference)"}
	ferryRestore := &row{name: "ferry restore (directory on disk)"}
	ferryRestoreFile := &row{name: "ferry restore (.ferry file, s2, served to CRIU)"}
	ferryRestoreZstd := &row{name: "ferry restore (.ferry file, zstd)"}
	verified := 0
	for i := range 3 * *ckptReps {
		name := fmt.Sprintf("restored%d", i)
		if i%3 == 0 {
			refRestore.samples = append(refRestore.samples, criuRestore(criu, keep))
		}
		from, r := ckpt, ferryRestore
		switch i % 3 {
		case 1:
			from, r = fileCkpt, ferryRestoreFile
		case 2:
			from, r = zstdCkpt, ferryRestoreZstd
		}
		settle()
		start := time.Now()
		ferry("restore", "--name", name, from)
		r.samples = append(r.samples, sample{wall: time.Since(start)})
		// Correctness: the restored copy verifies its memory against the sum.
		if err := os.WriteFile(verifyIf, nil, 0o600); err != nil {
			fatal("%v", err)
		}
		ok := waitFor(func() bool { return strings.Contains(ferry("logs", name), sum) }, 30*time.Second, "")
		if ok {
			verified++
		}
		ferry("kill", "--grace", "1s", name)
		os.Remove(verifyIf)
	}

	rows := []*row{refDump, podman, ferryDisk, ferryShm, ferryFile, ferryFileShm, ferryZstd, refRestore, ferryRestore, ferryRestoreFile, ferryRestoreZstd}
	fmt.Printf("%-52s %10s %10s %12s\n", "", "wall", "frozen", "size")
	for _, r := range rows {
		m := r.median()
		frozen, size := "-", "-"
		if m.frozen > 0 {
			frozen = ms(m.frozen)
		}
		if m.size > 0 {
			size = fmt.Sprintf("%.0f MiB", float64(m.size)/(1<<20))
		}
		fmt.Printf("%-52s %10s %10s %12s\n", r.name, ms(m.wall), frozen, size)
	}
	fmt.Printf("\nrestored copies whose memory checksum matched: %d of %d\n\n", verified, 3**ckptReps)
	// The job re-hashes its memory now and then: it must not run on
	// (taking CPU) while the next sections measure.
	_ = exec.Command(*ferryBin, "--root", root, "kill", "--grace", "1s", "bench").Run()
	_ = syscall.Kill(ref, syscall.SIGKILL)

	rd, pm, fd, fs, ff, rr, fr, frf := refDump.median(), podman.median(), ferryDisk.median(), ferryShm.median(), ferryFile.median(), refRestore.median(), ferryRestore.median(), ferryRestoreFile.median()
	fz, frz := ferryZstd.median(), ferryRestoreZstd.median()
	ratio := func(name string, v float64, target string, met bool) {
		verdict := "not met"
		if met {
			verdict = "met"
		}
		fmt.Printf("%-58s %6.2fx   target %-8s %s\n", name, v, target, verdict)
	}
	ratio("ferry (disk) / reference: wall", div(fd.wall, rd.wall), "<= 1.2", div(fd.wall, rd.wall) <= 1.2)
	ratio("ferry (disk) / reference: frozen", div(fd.frozen, rd.frozen), "<= 1.2", div(fd.frozen, rd.frozen) <= 1.2)
	ratio("ferry (tmpfs) / reference: wall", div(fs.wall, rd.wall), "<= 1.2", div(fs.wall, rd.wall) <= 1.2)
	ratio("ferry (tmpfs) / reference: frozen", div(fs.frozen, rd.frozen), "<= 1.2", div(fs.frozen, rd.frozen) <= 1.2)
	ratio("ferry (.ferry file) / reference: wall", div(ff.wall, rd.wall), "<= 1.5", div(ff.wall, rd.wall) <= 1.5)
	ratio("ferry (.ferry file) / reference: frozen", div(ff.frozen, rd.frozen), "<= 1.2", div(ff.frozen, rd.frozen) <= 1.2)
	ratio("podman-style / ferry (.ferry file): wall", div(pm.wall, ff.wall), ">= 3", div(pm.wall, ff.wall) >= 3)
	ratio("ferry .ferry size / podman-style archive size", float64(ff.size)/float64(max(1, pm.size)), "<= 1.15", float64(ff.size) <= 1.15*float64(pm.size))
	ratio("ferry restore (directory) / reference restore: wall", div(fr.wall, rr.wall), "<= 1.2", div(fr.wall, rr.wall) <= 1.2)
	ratio("ferry restore (.ferry file) / reference restore: wall", div(frf.wall, rr.wall), "<= 1.1", div(frf.wall, rr.wall) <= 1.1)
	fmt.Println("\npaired (informative): the median over the rounds of each round's ratio, its two measured back to back")
	fmt.Printf("%-58s %6.2fx\n", "ferry (.ferry file) / reference: wall", paired(ferryFile, refDump))
	fmt.Printf("%-58s %6.2fx\n", "ferry (.ferry file on tmpfs) / reference: wall", paired(ferryFileShm, refDump))
	fmt.Printf("%-58s %6.2fx\n", "ferry (.ferry file on tmpfs) / reference: frozen", pairedFrozen(ferryFileShm, refDump))
	fmt.Printf("%-58s %6.2fx\n", "ferry (.ferry file) / reference: frozen", pairedFrozen(ferryFile, refDump))
	fmt.Printf("%-58s %6.2fx\n", "podman-style / ferry (.ferry file): wall", paired(podman, ferryFile))
	fmt.Printf("%-58s %6.2fx\n", "ferry restore (directory) / reference restore: wall", paired(ferryRestore, refRestore))
	fmt.Printf("%-58s %6.2fx\n", "ferry restore (.ferry file) / reference restore: wall", paired(ferryRestoreFile, refRestore))
	fmt.Printf("\nthe default codec, s2 against zstd (informative): checkpoint wall %.2fx, size %.2fx, restore wall %.2fx\n",
		div(ff.wall, fz.wall), float64(ff.size)/float64(max(1, fz.size)), div(frf.wall, frz.wall))
	fmt.Println("\nNotes: CRIU streams its images straight into the .ferry file (--stream), --leave-running")
	fmt.Println("(as here) too: ferry compresses them on every core while CRIU dumps (s2 by default;")
	fmt.Println("incompressible chunks are stored raw), the job stays frozen until every image is read out")
	fmt.Println("of CRIU's pipes, and runs again while the file is ended and synced. Files carry CRC-32C")
	fmt.Println("per record, SHA-256 digests only with --digests. The reference writes tmpfs and syncs")
	fmt.Println("nothing; the .ferry file is on disk and fsynced.")
	fmt.Println("A .ferry restore serves each image to CRIU as it asks (criu restore --stream), decoding")
	fmt.Println("chunks in parallel and checking each; nothing is unpacked.")
}

func div(a, b time.Duration) float64 { return float64(a) / float64(max(1, b)) }

// settle writes back what the measurements before left dirty, before the
// next one starts: a gigabyte written to disk a moment earlier made the
// next writer wait on its writeback (the default .ferry checkpoint, which
// follows the fsynced directory, took 2.6 s where the zstd one after it
// took 1.5).
func settle() { syscall.Sync() }

// paired is the median, over the rounds, of a's wall over b's in the
// same round: on a machine whose speed drifts between rounds (this VM's
// references vary by half from one run to the next), each round's ratio
// holds where the medians of the two rows may not.
func paired(a, b *row) float64 { return pairedBy(a, b, func(s sample) time.Duration { return s.wall }) }

// pairedFrozen is paired over the frozen times.
func pairedFrozen(a, b *row) float64 {
	return pairedBy(a, b, func(s sample) time.Duration { return s.frozen })
}

func pairedBy(a, b *row, of func(sample) time.Duration) float64 {
	pick := func(r *row) []time.Duration {
		w := make([]time.Duration, len(r.samples))
		for i, sm := range r.samples {
			w[i] = of(sm)
		}
		return w
	}
	return pairedDur(pick(a), pick(b))
}

func ms(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }

func findCriu() string {
	if *criuBin != "" {
		return *criuBin
	}
	if p := os.Getenv("FERRY_CRIU"); p != "" {
		return p
	}
	if p, err := filepath.Abs(".deps/bin/criu"); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath("criu")
	if err != nil {
		fatal("no CRIU: run make deps")
	}
	return p
}

// startWorkload starts the reference workload in a session of its own and
// waits until its memory is filled.
func startWorkload(bin string) int { return startWorkloadMiB(bin, *mib) }

// startWorkloadMiB is startWorkload with mib MiB.
func startWorkloadMiB(bin string, mib int) int {
	cmd := exec.Command(bin, "memory", fmt.Sprint(mib))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		fatal("%v", err)
	}
	if err := cmd.Start(); err != nil {
		fatal("starting workload: %v", err)
	}
	cleanups = append(cleanups, func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(out)
		once := false
		for sc.Scan() {
			if !once && strings.HasPrefix(sc.Text(), "sum ") {
				once = true
				close(ready)
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(5 * time.Minute):
		fatal("workload did not fill its memory")
	}
	return cmd.Process.Pid
}

// criuDump dumps pid with --leave-running into dir and reads CRIU's own
// frozen time.
func criuDump(criu string, pid int, dir string) sample {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fatal("%v", err)
	}
	settle()
	start := time.Now()
	run(criu, "dump", "-t", fmt.Sprint(pid), "-D", dir, "--leave-running", "-o", "dump.log")
	s := sample{wall: time.Since(start), size: dirSize(dir)}
	f, err := os.Open(dir)
	if err != nil {
		fatal("%v", err)
	}
	defer f.Close()
	if st, err := stats.CriuGetDumpStats(f); err == nil {
		s.frozen = time.Duration(st.GetFrozenTime()) * time.Microsecond
	}
	return s
}

// criuRestore restores dir in a fresh PID (and mount, for its /proc)
// namespace and times CRIU until the tree runs; then ends that namespace.
func criuRestore(criu, dir string) sample {
	script := fmt.Sprintf("%q restore -D %q -d -o restore.log && echo restored && exec sleep 600", criu, dir)
	settle()
	cmd := exec.Command("unshare", "-pf", "--mount-proc", "sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		fatal("%v", err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		fatal("%v", err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	wall := time.Since(start)
	// unshare's child is pid 1 of the namespace: killing the session ends it.
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	go func() { _, _ = io.Copy(io.Discard, out) }()
	_ = cmd.Wait()
	if strings.TrimSpace(line) != "restored" {
		fatal("reference restore failed; see %s/restore.log", dir)
	}
	return sample{wall: wall}
}

func run(name string, args ...string) string {
	cmd := exec.Command(name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		fatal("%s %s: %v: %s", name, strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

func waitFor(cond func() bool, d time.Duration, what string) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			if what != "" {
				fatal("timed out waiting for %s", what)
			}
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
	return true
}

func dirSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}
