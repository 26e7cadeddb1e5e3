package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	ferrycriu "github.com/ferry-cr/ferry/internal/criu"
)

// The reference for post-copy: CRIU's own lazy migration of the same
// stamping job, between the same two ends as ferry's (loopback of this
// network namespace), as runc and the CRIU docs drive it:
//
//	source:      criu dump --lazy-pages --address A --port P  (keeps the tree
//	             frozen and serves its memory until every page has gone)
//	             then the other images are copied to the destination
//	destination: criu lazy-pages --page-server --address A --port P
//	             criu restore --lazy-pages  (in a fresh PID namespace, as the
//	             reference restore: the source's pids are still taken)
//
// The job writes its stamps to a file, which the restored copy reopens
// and appends to, so the largest gap between two stamps is what the job
// saw, as for ferry's migration. transfer is the time from the dump's
// start until the source's CRIU has served every page (the span ferry's
// post-copy total covers).
func criuLazyMigrate(criu, workload string, mib, i int) (gap, transfer time.Duration) {
	dir := filepath.Join(*shmDir, fmt.Sprintf("ferry-bench-lazy-%d-%d-%d", os.Getpid(), mib, i))
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	for _, d := range []string{src, dst} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			fatal("%v", err)
		}
	}
	logPath := filepath.Join(dir, "stamps.log")
	logf, err := os.Create(logPath)
	if err != nil {
		fatal("%v", err)
	}
	job := exec.Command(workload, "stamp", fmt.Sprint(mib))
	job.Stdout = logf
	job.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := job.Start(); err != nil {
		fatal("starting the stamping job: %v", err)
	}
	logf.Close()
	exited := make(chan struct{})
	go func() { _ = job.Wait(); close(exited) }()
	cleanups = append(cleanups, func() { _ = job.Process.Kill(); <-exited })
	stamps := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	waitFor(func() bool { return strings.Count(stamps(), "\nt ") > 100 }, 5*time.Minute, "the stamping job")

	// CRIU's lazy dump grows its pipes past fs.pipe-max-size (see
	// criu.RaisePipeMax, which ferry's post-copy takes too).
	release, err := ferrycriu.RaisePipeMax(ferrycriu.LazyPipeSize)
	if err != nil {
		fatal("%v", err)
	}
	defer release()
	port := freePort()
	dump := criuCmd(criu, "dump", "-t", fmt.Sprint(job.Process.Pid), "-D", src, "-o", "dump.log",
		"--lazy-pages", "--address", "127.0.0.1", "--port", port)
	dumpReady := statusFd(dump)
	start := time.Now()
	if err := dump.Start(); err != nil {
		fatal("criu dump --lazy-pages: %v", err)
	}
	dump.ExtraFiles[0].Close()
	dumpDone := make(chan error, 1)
	go func() { dumpDone <- dump.Wait() }()
	waitStatus(dumpReady, dumpDone, src, "dump.log", "criu dump --lazy-pages")

	// What a migration would copy across: every image but the memory,
	// which stays behind to be served.
	copyDir(src, dst)
	lazy := criuCmd(criu, "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port, "-D", dst, "-o", "lazy-pages.log")
	lazyReady := statusFd(lazy)
	if err := lazy.Start(); err != nil {
		fatal("criu lazy-pages: %v", err)
	}
	lazy.ExtraFiles[0].Close()
	lazyDone := make(chan error, 1)
	lazyExited := make(chan struct{})
	go func() { err := lazy.Wait(); close(lazyExited); lazyDone <- err }()
	cleanups = append(cleanups, func() { _ = lazy.Process.Kill(); <-lazyExited })
	waitStatus(lazyReady, lazyDone, dst, "lazy-pages.log", "criu lazy-pages")

	script := fmt.Sprintf("%q restore -D %q -d --lazy-pages -o restore.log && echo restored && exec sleep 600", criu, dst)
	restore := exec.Command("unshare", "-pf", "--mount-proc", "sh", "-c", script)
	restore.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := restore.StdoutPipe()
	if err != nil {
		fatal("%v", err)
	}
	if err := restore.Start(); err != nil {
		fatal("%v", err)
	}
	ended := false
	endRestore := func() {
		if !ended {
			ended = true
			_ = syscall.Kill(-restore.Process.Pid, syscall.SIGKILL)
			go func() { _, _ = io.Copy(io.Discard, out) }()
			_ = restore.Wait()
		}
	}
	cleanups = append(cleanups, endRestore)
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "restored" {
		fatal("criu restore --lazy-pages failed:\n%s\nlazy-pages:\n%s", logTail(filepath.Join(dst, "restore.log")), logTail(filepath.Join(dst, "lazy-pages.log")))
	}
	select {
	case err := <-dumpDone:
		if err != nil {
			fatal("criu dump --lazy-pages: %v:\n%s", err, logTail(filepath.Join(src, "dump.log")))
		}
		transfer = time.Since(start)
	case <-time.After(2 * time.Minute):
		fatal("criu dump --lazy-pages did not finish serving pages:\n%s", logTail(filepath.Join(src, "dump.log")))
	}
	// Let the restored copy stamp on for a while, then read the gap.
	time.Sleep(1500 * time.Millisecond)
	gap = largestGap(stampsOf(stamps()))
	endRestore()
	select {
	case <-lazyExited:
	case <-time.After(10 * time.Second):
		_ = lazy.Process.Kill()
	}
	os.RemoveAll(dir)
	return gap, transfer
}

func criuCmd(criu string, args ...string) *exec.Cmd {
	cmd := exec.Command(criu, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	return cmd
}

// statusFd gives cmd a pipe at fd 3 for --status-fd, on which CRIU writes
// a byte once it serves; the caller closes the write end
// (cmd.ExtraFiles[0]) once cmd started.
func statusFd(cmd *exec.Cmd) *os.File {
	r, w, err := os.Pipe()
	if err != nil {
		fatal("%v", err)
	}
	cmd.ExtraFiles = []*os.File{w}
	cmd.Args = append(cmd.Args, "--status-fd", "3")
	return r
}

// waitStatus waits for CRIU's readiness byte on r, failing if the
// command ends first.
func waitStatus(r *os.File, done <-chan error, dir, log, what string) {
	ready := make(chan bool, 1)
	go func() {
		var b [1]byte
		n, _ := r.Read(b[:])
		ready <- n == 1
		r.Close()
	}()
	select {
	case ok := <-ready:
		if ok {
			return
		}
	case <-time.After(2 * time.Minute):
	case err := <-done:
		fatal("%s ended before it served: %v:\n%s", what, err, logTail(filepath.Join(dir, log)))
	}
	fatal("%s did not become ready:\n%s", what, logTail(filepath.Join(dir, log)))
}

func freePort() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("%v", err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// copyDir copies the regular files of src into dst.
func copyDir(src, dst string) {
	ents, err := os.ReadDir(src)
	if err != nil {
		fatal("%v", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			fatal("%v", err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			fatal("%v", err)
		}
		if _, err := io.Copy(out, in); err != nil {
			fatal("copying %s: %v", e.Name(), err)
		}
		in.Close()
		out.Close()
	}
}

// logTail is the end of a CRIU log, for a failure's message (the
// directory goes with the cleanups).
func logTail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}
