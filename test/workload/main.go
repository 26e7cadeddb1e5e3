// Command workload is the victim program of ferry's integration tests: each
// mode keeps a kind of state that a checkpoint must carry, and prints lines
// from which a test can tell whether that state survived a restore.
//
//	workload memory MIB      fill MIB of anonymous memory with a pattern;
//	                         print "sum HEX" at start and "verify N HEX" each second
//	                         (with $WORKLOAD_VERIFY_IF set: only while that path
//	                         exists, so that a benchmark's idle copies take no CPU)
//	workload gens MIB        rewrite MIB page by page without end, each page with the
//	                         next generation after checking it holds the last one;
//	                         print "gen G" after each pass, "corrupt PAGE HAS WANT"
//	                         (and exit 3) when a page holds another generation: a
//	                         page saved after the tree was let go again shows so
//	workload demo MIB        a counter and MIB of memory; print "count N ... sha256 HEX" each second
//	workload pipes           a tree of 4 processes in a ring of pipes plus a
//	                         socketpair, passing a sequence number; print "seq N"
//	workload threads N       N OS threads each counting; print "threads T1 T2 ..."
//	workload timer           an interval timer (10 ms) whose SIGALRM handler counts;
//	                         print "ticks N"
//	workload tcp PORT        a TCP server on 127.0.0.1:PORT that answers "pong N\n" to
//	                         each "ping\n", and a client in the same process on an
//	                         established connection; print "echo N"
//	workload serve ADDR      a TCP server on ADDR that answers "pong N\n" to each
//	                         "ping\n" (N counts across connections); print "served N"
//	workload churn MIB       fill MIB with random bytes and print "ready"; on SIGUSR1
//	                         rewrite 1% of its pages, scattered at random, with new random
//	                         bytes and print "churned N HEX" (sha256 of all of it); on
//	                         SIGUSR2 print "sum HEX"
//	workload sysv            SysV shm, a semaphore set and a message queue in the
//	                         job's IPC namespace; print "sysv ok N" while they hold
//	workload file PATH       map PATH shared and read it at an offset; print
//	                         "file N OFFSET BYTE"
//	workload fanotify DIR [inode|mount|fs]
//	                         watch DIR with fanotify; print "fan N NAME" for each file
//	                         closed after writing there ("fan 0 ready" first)
//	workload sparse PATH GIB a deleted sparse file of GIB GiB with a few pages of
//	                         pattern, checked every 20 ms; print "sparse N ok"
//	workload nobody          a child running as uid 65534 counts; print "nobody N UID"
//	workload unix-serve PATH a unix stream server answering each line with "N LINE"
//	workload unix-dgram PATH a unix datagram socket connected to PATH sends "dg N"
//	                         every 20 ms; print "sent N"
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 2 {
		fatal("usage: workload MODE [ARGS]")
	}
	switch os.Args[1] {
	case "memory":
		memory(atoi(arg(2)))
	case "stamp":
		stamp(atoi(arg(2)))
	case "gens":
		gens(atoi(arg(2)))
	case "demo":
		demo(atoi(arg(2)))
	case "pipes":
		pipes()
	case "pipe-stage":
		pipeStage(atoi(arg(2)))
	case "threads":
		threads(atoi(arg(2)))
	case "timer":
		timer()
	case "tcp":
		tcp(arg(2))
	case "gotcp":
		goTCP(arg(2))
	case "serve":
		serve(arg(2))
	case "churn":
		churn(atoi(arg(2)))
	case "sysv":
		sysv()
	case "file":
		file(arg(2))
	case "fanotify":
		how := "inode"
		if len(os.Args) > 3 {
			how = os.Args[3]
		}
		fanotify(arg(2), how)
	case "sparse":
		sparse(arg(2), atoi(arg(3)))
	case "nobody":
		nobody()
	case "unix-serve":
		unixServe(arg(2))
	case "unix-dgram":
		unixDgram(arg(2))
	default:
		fatal("unknown mode " + os.Args[1])
	}
}

func arg(i int) string {
	if len(os.Args) <= i {
		fatal("missing argument")
	}
	return os.Args[i]
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fatal(err.Error())
	}
	return n
}

func fatal(msg string) {
	fmt.Fprintln(os.Stderr, "workload:", msg)
	os.Exit(2)
}

// demo keeps a counter and MIB of patterned memory; every second it
// prints the counter and a checksum of the memory, recomputed each time.
func demo(mib int) {
	buf := fill(mib)
	for n := 1; ; n++ {
		s := sha256.Sum256(buf)
		fmt.Printf("count %d memory %d MiB sha256 %s\n", n, mib, hex.EncodeToString(s[:8]))
		time.Sleep(time.Second)
	}
}

// memory fills half the buffer with pseudo-random bytes and half with
// text, then checks the whole every second.
func memory(mib int) {
	buf := fill(mib)
	sum := func() string { s := sha256.Sum256(buf); return hex.EncodeToString(s[:]) }
	fmt.Printf("sum %s\n", sum())
	gate := os.Getenv("WORKLOAD_VERIFY_IF")
	for n := 1; ; n++ {
		time.Sleep(time.Second)
		if gate != "" {
			// Hashing a GiB takes most of a core: the benchmark's copies
			// hash only when asked to prove their memory.
			for _, err := os.Stat(gate); err != nil; _, err = os.Stat(gate) {
				time.Sleep(100 * time.Millisecond)
			}
		}
		fmt.Printf("verify %d %s\n", n, sum())
	}
}

// gens rewrites its memory page by page, generation after generation,
// checking each page before it writes it: a checkpoint taken while it
// runs holds pages [0,k) of generation g+1 and [k,n) of generation g (k
// in its registers), and a restored copy finds exactly that. A page the
// original changed after its checkpoint began but that the checkpoint
// saved afterwards holds another generation, and the copy says so.
func gens(mib int) {
	const page = 4096
	buf := make([]byte, mib<<20)
	pages := len(buf) / page
	fill := func(p int, g byte) {
		b := buf[p*page : (p+1)*page]
		for i := range b {
			b[i] = g
		}
	}
	for p := range pages {
		fill(p, 0)
	}
	for g := byte(0); ; g++ {
		for p := range pages {
			b := buf[p*page : (p+1)*page]
			for _, v := range b {
				if v != g {
					fmt.Printf("corrupt %d %d %d\n", p, v, g)
					os.Exit(3)
				}
			}
			fill(p, g+1)
		}
		fmt.Printf("gen %d\n", g+1)
		time.Sleep(time.Millisecond)
	}
}

// stamp holds MIB of memory and prints the time (µs since the epoch)
// every millisecond, touching one page of that memory each time: the
// largest gap between two stamps is the longest pause the job saw.
func stamp(mib int) {
	buf := fill(mib)
	fmt.Printf("sum %d\n", len(buf))
	w := bufio.NewWriterSize(os.Stdout, 4096)
	for i := 0; ; i++ {
		buf[(i*4096)%len(buf)]++
		fmt.Fprintf(w, "t %d\n", time.Now().UnixMicro())
		w.Flush()
		time.Sleep(time.Millisecond)
	}
}

// fill allocates MIB of memory, half pseudo-random bytes, half text.
func fill(mib int) []byte {
	buf := make([]byte, mib<<20)
	r := rand.New(rand.NewPCG(1, 2))
	half := len(buf) / 2
	for i := 0; i+8 <= half; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			buf[i+j] = byte(v >> (8 * j))
		}
	}
	text := []byte("ferry carries a process across the water, page by page. ")
	for i := half; i < len(buf); i++ {
		buf[i] = text[(i-half)%len(text)]
	}
	return buf
}

// pipes starts three stages; with the parent they form a ring:
// parent -> s1 -> s2 (over a socketpair) -> s3 -> parent. The parent
// injects 1, every stage passes n+1 on, the parent prints each number
// coming back and sends it on incremented.
func pipes() {
	self, _ := os.Executable()
	r0, w0, _ := os.Pipe() // parent -> s1
	r1, w1, _ := os.Pipe() // s1 -> s2 (socketpair replaces below)
	r1.Close()
	w1.Close()
	sp, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	a := os.NewFile(uintptr(sp[0]), "sp0")
	b := os.NewFile(uintptr(sp[1]), "sp1")
	r2, w2, _ := os.Pipe() // s2 -> s3
	r3, w3, _ := os.Pipe() // s3 -> parent
	start := func(in, out *os.File, stage int) {
		cmd := exec.Command(self, "pipe-stage", strconv.Itoa(stage))
		cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, os.Stderr
		if err := cmd.Start(); err != nil {
			fatal(err.Error())
		}
	}
	start(r0, a, 1)
	start(b, w2, 2)
	start(r2, w3, 3)
	for _, f := range []*os.File{r0, a, b, w2, r2, w3} {
		f.Close()
	}
	in := bufio.NewReader(r3)
	n := 0
	fmt.Fprintf(w0, "%d\n", n)
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			fatal("ring broken: " + err.Error())
		}
		got := atoi(strings.TrimSpace(line))
		if got != n+3 {
			fatal(fmt.Sprintf("ring lost state: sent %d, got %d back", n, got))
		}
		n = got + 1
		fmt.Printf("seq %d\n", n)
		time.Sleep(20 * time.Millisecond)
		fmt.Fprintf(w0, "%d\n", n)
	}
}

func pipeStage(stage int) {
	in := bufio.NewReader(os.Stdin)
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			if err == io.EOF {
				os.Exit(0)
			}
			fatal(err.Error())
		}
		fmt.Printf("%d\n", atoi(strings.TrimSpace(line))+1)
	}
}

func threads(n int) {
	counts := make([]atomic.Int64, n)
	for i := range n {
		go func() {
			runtime.LockOSThread()
			for {
				counts[i].Add(1)
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	for {
		time.Sleep(100 * time.Millisecond)
		var b strings.Builder
		b.WriteString("threads")
		for i := range counts {
			fmt.Fprintf(&b, " %d", counts[i].Load())
		}
		fmt.Println(b.String())
	}
}

func timer() {
	ch := make(chan os.Signal, 64)
	signal.Notify(ch, unix.SIGALRM)
	it := unix.Itimerval{Interval: unix.Timeval{Usec: 10000}, Value: unix.Timeval{Usec: 10000}}
	if _, err := unix.Setitimer(unix.ItimerReal, it); err != nil {
		fatal(err.Error())
	}
	ticks := 0
	for range ch {
		ticks++
		if ticks%10 == 0 {
			fmt.Printf("ticks %d\n", ticks)
		}
	}
}

// goTCP listens the way a Go program does by default (MPTCP where the
// kernel has it, unless GODEBUG=multipathtcp=0), answers each connection
// with "hello N", and counts.
func goTCP(port string) {
	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		fatal(err.Error())
	}
	var served atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				fatal(err.Error())
			}
			fmt.Fprintf(c, "hello %d\n", served.Add(1))
			c.Close()
		}
	}()
	for n := 1; ; n++ {
		fmt.Printf("count %d\n", n)
		time.Sleep(100 * time.Millisecond)
	}
}

func tcp(port string) {
	// Plain TCP: Go >= 1.24 listens with MPTCP by default, which CRIU
	// cannot checkpoint.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		fatal(err.Error())
	}
	var served atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				fatal(err.Error())
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if strings.TrimSpace(line) == "ping" {
						fmt.Fprintf(c, "pong %d\n", served.Add(1))
					}
				}
			}()
		}
	}()
	d := net.Dialer{}
	d.SetMultipathTCP(false)
	c, err := d.Dial("tcp", "127.0.0.1:"+port)
	if err != nil {
		fatal(err.Error())
	}
	r := bufio.NewReader(c)
	for n := 1; ; n++ {
		if _, err := fmt.Fprintf(c, "ping\n"); err != nil {
			fatal("client write: " + err.Error())
		}
		line, err := r.ReadString('\n')
		if err != nil {
			fatal("client read: " + err.Error())
		}
		fmt.Printf("echo %d %s\n", n, strings.TrimSpace(line))
		time.Sleep(50 * time.Millisecond)
	}
}

func churn(mib int) {
	buf := make([]byte, mib<<20)
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(os.Getpid())))
	randomize := func(b []byte) {
		for i := 0; i+8 <= len(b); i += 8 {
			v := r.Uint64()
			for j := range 8 {
				b[i+j] = byte(v >> (8 * j))
			}
		}
	}
	randomize(buf)
	sum := func() string { s := sha256.Sum256(buf); return hex.EncodeToString(s[:]) }
	fmt.Println("ready")
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGUSR2)
	pages := len(buf) / 4096
	for n := 1; ; {
		if <-sig == syscall.SIGUSR2 {
			fmt.Printf("sum %s\n", sum())
			continue
		}
		for range pages / 100 {
			p := r.IntN(pages)
			randomize(buf[p*4096 : (p+1)*4096])
		}
		fmt.Printf("churned %d %s\n", n, sum())
		n++
	}
}

func serve(addr string) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false) // CRIU cannot checkpoint MPTCP
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		fatal(err.Error())
	}
	var served atomic.Int64
	for {
		c, err := ln.Accept()
		if err != nil {
			fatal(err.Error())
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if strings.TrimSpace(line) == "ping" {
					n := served.Add(1)
					fmt.Fprintf(c, "pong %d\n", n)
					fmt.Printf("served %d\n", n)
				}
			}
		}()
	}
}

const ipcKey = 0x46525259 // "FRRY"

func sysv() {
	const shmSize = 1 << 20
	shmid, err := unix.SysvShmGet(ipcKey, shmSize, unix.IPC_CREAT|0o600)
	if err != nil {
		fatal("shmget: " + err.Error())
	}
	mem, err := unix.SysvShmAttach(shmid, 0, 0)
	if err != nil {
		fatal("shmat: " + err.Error())
	}
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	semid, _, errno := syscall.Syscall(syscall.SYS_SEMGET, ipcKey, 3, unix.IPC_CREAT|0o600)
	if errno != 0 {
		fatal("semget: " + errno.Error())
	}
	const setval = 16
	for i, v := range []int{5, 11, 42} {
		if _, _, errno := syscall.Syscall6(syscall.SYS_SEMCTL, semid, uintptr(i), setval, uintptr(v), 0, 0); errno != 0 {
			fatal("semctl: " + errno.Error())
		}
	}
	msqid, _, errno := syscall.Syscall(syscall.SYS_MSGGET, ipcKey, unix.IPC_CREAT|0o600, 0)
	if errno != 0 {
		fatal("msgget: " + errno.Error())
	}
	type msg struct {
		mtype int64
		text  [32]byte
	}
	for i := 1; i <= 3; i++ {
		m := msg{mtype: int64(i)}
		copy(m.text[:], fmt.Sprintf("message %d", i))
		if _, _, errno := syscall.Syscall6(syscall.SYS_MSGSND, msqid, uintptr(unsafe.Pointer(&m)), 32, 0, 0, 0); errno != 0 {
			fatal("msgsnd: " + errno.Error())
		}
	}
	const getval = 12
	for n := 1; ; n++ {
		for i := range mem {
			if mem[i] != byte(i*7) {
				fatal(fmt.Sprintf("shm byte %d changed", i))
			}
		}
		for i, want := range []uintptr{5, 11, 42} {
			v, _, errno := syscall.Syscall6(syscall.SYS_SEMCTL, semid, uintptr(i), getval, 0, 0, 0)
			if errno != 0 || v != want {
				fatal(fmt.Sprintf("semaphore %d = %d (%v), want %d", i, v, errno, want))
			}
		}
		// Receive the oldest message and send it back, so the queue keeps
		// all three in rotation.
		var m msg
		if _, _, errno := syscall.Syscall6(syscall.SYS_MSGRCV, msqid, uintptr(unsafe.Pointer(&m)), 32, 0, unix.IPC_NOWAIT, 0); errno != 0 {
			fatal("msgrcv: " + errno.Error())
		}
		want := fmt.Sprintf("message %d", m.mtype)
		if got := strings.TrimRight(string(m.text[:]), "\x00"); got != want {
			fatal(fmt.Sprintf("message %q, want %q", got, want))
		}
		if _, _, errno := syscall.Syscall6(syscall.SYS_MSGSND, msqid, uintptr(unsafe.Pointer(&m)), 32, 0, 0, 0); errno != 0 {
			fatal("msgsnd: " + errno.Error())
		}
		fmt.Printf("sysv ok %d\n", n)
		time.Sleep(50 * time.Millisecond)
	}
}

// file maps PATH shared and keeps an fd open at a moving offset.
func file(path string) {
	f, err := os.Open(path)
	if err != nil {
		fatal(err.Error())
	}
	st, _ := f.Stat()
	size := int(st.Size())
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		fatal(err.Error())
	}
	buf := make([]byte, 1)
	for n := 1; ; n++ {
		off, _ := f.Seek(0, io.SeekCurrent)
		if _, err := f.Read(buf); err != nil {
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				fatal(err.Error())
			}
			continue
		}
		if buf[0] != m[off] {
			fatal(fmt.Sprintf("read %d at %d, mapping has %d", buf[0], off, m[off]))
		}
		fmt.Printf("file %d %d %d\n", n, off, buf[0])
		time.Sleep(20 * time.Millisecond)
	}
}

// fanotify watches DIR with fanotify (notification class; a mark on the
// directory's inode, its mount or its filesystem, as HOW says) and prints a
// line for every file closed after writing there, with a running count:
// "fan N NAME".
func fanotify(dir, how string) {
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_NOTIF|unix.FAN_CLOEXEC, unix.O_RDONLY)
	if err != nil {
		fatal("fanotify_init: " + err.Error())
	}
	flags := map[string]uint{"inode": unix.FAN_MARK_ADD, "mount": unix.FAN_MARK_ADD | unix.FAN_MARK_MOUNT, "fs": unix.FAN_MARK_ADD | unix.FAN_MARK_FILESYSTEM}[how]
	if flags == 0 {
		fatal("fanotify: mark inode, mount or fs, not " + how)
	}
	if err := unix.FanotifyMark(fd, flags, unix.FAN_CLOSE_WRITE|unix.FAN_EVENT_ON_CHILD, unix.AT_FDCWD, dir); err != nil {
		fatal("fanotify_mark: " + err.Error())
	}
	fmt.Println("fan 0 ready")
	buf := make([]byte, 4096)
	n := 0
	for {
		m, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			fatal("reading fanotify: " + err.Error())
		}
		for off := 0; off+int(unsafe.Sizeof(unix.FanotifyEventMetadata{})) <= m; {
			ev := (*unix.FanotifyEventMetadata)(unsafe.Pointer(&buf[off]))
			if ev.Event_len == 0 {
				break
			}
			name := "?"
			if ev.Fd >= 0 {
				name, _ = os.Readlink(fmt.Sprintf("/proc/self/fd/%d", ev.Fd))
				unix.Close(int(ev.Fd))
			}
			n++
			fmt.Printf("fan %d %s\n", n, filepath.Base(name))
			off += int(ev.Event_len)
		}
	}
}

// sparse creates PATH as a sparse file of GIB GiB with a few pages of
// pattern at spread offsets, unlinks it and keeps it open, checking the
// pattern every 20 ms: "sparse N ok".
func sparse(path string, gib int) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		fatal(err.Error())
	}
	size := int64(gib) << 30
	if err := f.Truncate(size); err != nil {
		fatal(err.Error())
	}
	offs := []int64{0, size / 3, size / 2, size - 4096}
	page := func(off int64) []byte {
		b := make([]byte, 4096)
		for i := range b {
			b[i] = byte(off>>12) + byte(i)
		}
		return b
	}
	for _, off := range offs {
		if _, err := f.WriteAt(page(off), off); err != nil {
			fatal(err.Error())
		}
	}
	if err := os.Remove(path); err != nil {
		fatal(err.Error())
	}
	got := make([]byte, 4096)
	for n := 1; ; n++ {
		for _, off := range offs {
			if _, err := f.ReadAt(got, off); err != nil {
				fatal(err.Error())
			}
			if string(got) != string(page(off)) {
				fatal(fmt.Sprintf("sparse file differs at %d", off))
			}
		}
		if st, err := f.Stat(); err != nil || st.Size() != size {
			fatal(fmt.Sprintf("sparse file size %v, want %d", st, size))
		}
		fmt.Printf("sparse %d ok\n", n)
		time.Sleep(20 * time.Millisecond)
	}
}

// nobody starts a shell running as uid and gid 65534 (a shell: this
// binary may sit where nobody cannot reach it) that counts:
// "nobody N UID".
func nobody() {
	cmd := exec.Command("/bin/sh", "-c", `u=$(id -u); i=0; while :; do i=$((i+1)); echo "nobody $i $u"; sleep 0.02; done`)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := cmd.Run(); err != nil {
		fatal(err.Error())
	}
}

// unixServe listens on the unix stream socket PATH and answers every line
// a client sends with "N LINE", N counting answers across clients.
func unixServe(path string) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		fatal(err.Error())
	}
	fmt.Println("unix listening")
	var n atomic.Int64
	for {
		c, err := ln.Accept()
		if err != nil {
			fatal(err.Error())
		}
		go func() {
			defer c.Close()
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				fmt.Fprintf(c, "%d %s\n", n.Add(1), sc.Text())
			}
		}()
	}
}

// unixDgram connects a datagram socket to PATH (bound by someone else)
// and sends "dg N" on it every 20 ms. A send that fails is reported and
// the count goes on.
func unixDgram(path string) {
	c, err := net.Dial("unixgram", path)
	if err != nil {
		fatal(err.Error())
	}
	for n := 1; ; n++ {
		if _, err := fmt.Fprintf(c, "dg %d", n); err != nil {
			fmt.Println("send failed:", err)
		}
		fmt.Printf("sent %d\n", n)
		time.Sleep(20 * time.Millisecond)
	}
}
