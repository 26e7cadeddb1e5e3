package test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMigrateChaos migrates a job for real between two network namespaces
// again and again and, at a random moment of each migration (from the
// connect to the end), does one harmful thing: kill -9 of the source's
// `ferry migrate`, kill -9 of the destination's `ferry serve`, or takes
// the link down (up again after a short while, or only once both sides
// have given up). Then it does what an operator or a restart would (a new
// serve; the settle command a record names), and checks on both hosts,
// by `ferry list --json` and by the job's own counter, that the job ends
// in exactly one running copy, which continues its count with its memory
// intact, or in the documented in-doubt state whose settle command then
// leaves exactly one; never two running, never none; and that `ferry
// list` tells the truth (running advances, frozen does not).
//
// Each run is named by its seed, which decides its fault, its mode and its
// moment (the machine's timing still decides what that moment falls on):
// FERRY_CHAOS_SEED=N (or N,M,...) replays those runs alone
// (FERRY_CHAOS_DEBUG=1: with both sides' debug logs);
// FERRY_CHAOS_RUNS sets how many runs (default 10: each fault and mode at
// least once); FERRY_CHAOS_WINDOW (a Go duration) pins the span the
// moment is drawn from, counted from the source's connect, which is
// otherwise the time a clean migration of each mode takes, measured first.
func TestMigrateChaos(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	lazy := newEnv(t).lazyPages()

	var seeds []uint64
	if s := os.Getenv("FERRY_CHAOS_SEED"); s != "" {
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
			if err != nil {
				t.Fatalf("FERRY_CHAOS_SEED=%q: %v", s, err)
			}
			seeds = append(seeds, n)
		}
	} else {
		runs := 10
		if s := os.Getenv("FERRY_CHAOS_RUNS"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				t.Fatalf("FERRY_CHAOS_RUNS=%q: want a count", s)
			}
			runs = n
		}
		// Consecutive seeds from a multiple of the number of combinations:
		// every fault and mode comes up once in each len(chaosCombos) runs.
		base := uint64(time.Now().UnixNano()) % 1e6 * uint64(len(chaosCombos))
		for i := range runs {
			seeds = append(seeds, base+uint64(i))
		}
	}
	t.Logf("chaos seeds %d..%d (FERRY_CHAOS_SEED=N replays one)", seeds[0], seeds[len(seeds)-1])

	window := map[string]time.Duration{}
	if s := os.Getenv("FERRY_CHAOS_WINDOW"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("FERRY_CHAOS_WINDOW=%q: %v", s, err)
		}
		window["stop-copy"], window["post-copy"] = d, d
	} else {
		for _, mode := range []string{"stop-copy", "post-copy"} {
			if mode == "post-copy" && !lazy {
				continue
			}
			t.Run("clean "+mode, func(t *testing.T) { window[mode] = cleanMigration(t, w, mode) })
			if window[mode] == 0 {
				t.Fatalf("the clean %s migration failed: no chaos without it", mode)
			}
		}
	}

	var mu sync.Mutex
	var outcomes []chaosOutcome
	// Two runs at a time: a run that waits out a dead link (one to two
	// minutes of the peers' deadlines) mostly sleeps. (Three at a time
	// starved ferry serve's start-up past serveProc's 10 s here.)
	slots := make(chan struct{}, 2)
	t.Run("runs", func(t *testing.T) {
		for _, seed := range seeds {
			r := newChaosRun(seed)
			if r.mode == "post-copy" && !lazy {
				t.Logf("seed %d: %s in post-copy skipped: no userfaultfd here", seed, r.fault)
				continue
			}
			r.moment = time.Duration(r.frac * float64(window[r.mode]))
			t.Run(r.String(), func(t *testing.T) {
				t.Parallel()
				slots <- struct{}{}
				defer func() { <-slots }()
				o := chaosOutcome{seed: seed, fault: r.fault, mode: r.mode, moment: r.moment, outcome: "FAILED"}
				defer func() {
					mu.Lock()
					outcomes = append(outcomes, o)
					mu.Unlock()
				}()
				o.outcome = r.run(t, w)
			})
		}
	})
	chaosSummary(t, seeds, outcomes)
}

// The faults a run injects, and the combinations the runs cycle through.
const (
	faultSource   = "kill-source" // kill -9 of the source's ferry migrate
	faultServe    = "kill-serve"  // kill -9 of the destination's ferry serve (restarted at once)
	faultLinkBlip = "link-blip"   // the veth down, up again within 3 s
	faultLinkDead = "link-dead"   // the veth down until both sides have given up
)

var chaosCombos = [][2]string{
	{faultSource, "stop-copy"}, {faultServe, "stop-copy"}, {faultLinkBlip, "stop-copy"}, {faultLinkDead, "stop-copy"},
	{faultSource, "post-copy"}, {faultServe, "post-copy"}, {faultLinkBlip, "post-copy"}, {faultLinkDead, "post-copy"},
}

// chaosRun is one migration with one fault, all decided by seed.
type chaosRun struct {
	seed        uint64
	fault, mode string
	frac        float64       // where in the migration the fault falls, 0..1
	moment      time.Duration // frac of the mode's window
	blip        time.Duration // how long a link blip lasts
	rejudged    bool          // checkTruth judged a copy again once (see there)
}

func newChaosRun(seed uint64) *chaosRun {
	rng := rand.New(rand.NewPCG(seed, 0x6665727279))
	c := chaosCombos[seed%uint64(len(chaosCombos))]
	return &chaosRun{seed: seed, fault: c[0], mode: c[1], frac: rng.Float64(),
		blip: 300*time.Millisecond + time.Duration(rng.Int64N(int64(2700*time.Millisecond)))}
}

func (r *chaosRun) String() string {
	return fmt.Sprintf("seed %d %s %s at %s", r.seed, r.fault, r.mode, r.moment.Round(time.Millisecond))
}

type chaosOutcome struct {
	seed        uint64
	fault, mode string
	moment      time.Duration
	outcome     string
}

// cleanMigration migrates a job once without a fault and returns how long
// its ferry migrate took (0 if it failed).
func cleanMigration(t *testing.T, w, mode string) time.Duration {
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7400")
	dst.serve(h.b, listen, token)
	if r := src.ferryIn(h.a, "run", "--name", "cj", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("cj", "verify ", 1)
	cmd, out := src.startFerryIn(h.a, "migrate", "cj", "--to", listen, "--token-file", token, "--mode", mode)
	t0 := connected(t, cmd, listen)
	code, ended := waitExitWithin(cmd, time.Minute)
	took := time.Since(t0)
	if !ended || code != 0 {
		t.Errorf("a clean %s migration: exit %d\n%s", mode, code, out)
		return 0
	}
	t.Logf("a clean %s migration took %s from its connect: the faults fall within that", mode, took.Round(time.Millisecond))
	return took
}

// run does the migration, the fault, the recovery and the checks, and
// returns the outcome for the summary.
func (r *chaosRun) run(t *testing.T, w string) string {
	const name = "cx"
	var src, dst *env
	// Last of all: whatever a killed ferry left running.
	t.Cleanup(func() { reapLeftovers(t, src); reapLeftovers(t, dst) })
	h := newHosts(t)
	src, dst = newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7400")
	first, debug := "", []string{} // FERRY_CHAOS_DEBUG: both sides log the handover
	if os.Getenv("FERRY_CHAOS_DEBUG") != "" {
		first, debug = `set -- --debug "$@";`, []string{"--debug"}
	}
	serveCmd, srv := dst.serveProc(h.b, listen, token, first)
	if rr := src.ferryIn(h.a, "run", "--name", name, "--", w, "memory", "64"); rr.code != 0 {
		t.Fatalf("run: %s", rr)
	}
	src.waitLines(name, "verify ", 1)
	sum := src.lines(name, "sum ")[0]
	before, _ := src.verifyLines(name)
	last := before[len(before)-1]

	t.Cleanup(func() { t.Logf("serve log:\n%s", srv.text()) })
	cmd, out := src.startFerryIn(h.a, append(debug, "migrate", name, "--to", listen, "--token-file", token, "--mode", r.mode)...)
	connected(t, cmd, listen)
	time.Sleep(r.moment)
	linkDown := false
	setLink := func(state string) {
		if rr := exec1(t, "ip", "-n", h.a, "link", "set", h.vethA, state); rr != 0 {
			t.Fatalf("ip link set %s %s: exit %d", h.vethA, state, rr)
		}
		linkDown = state == "down"
	}
	switch r.fault {
	case faultSource:
		_ = cmd.Process.Kill()
	case faultServe:
		_ = serveCmd.Process.Kill()
		_ = serveCmd.Wait()
	case faultLinkBlip, faultLinkDead:
		setLink("down")
		defer func() {
			if linkDown {
				setLink("up")
			}
		}()
	}
	t.Logf("%s after %s", r.fault, r.moment.Round(time.Millisecond))
	if r.fault == faultServe {
		// What systemd's Restart= would do.
		killed := srv
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("the killed serve's log:\n%s", killed.text())
			}
		})
		serveCmd, srv = dst.serveProc(h.b, listen, token, "")
	}
	if r.fault == faultLinkBlip {
		time.Sleep(r.blip)
		setLink("up")
	}
	code, ended := waitExitWithin(cmd, 3*time.Minute)
	if !ended {
		// Every wait on a peer is bounded (README): give the state of both
		// sides, and of the job's counter on each, before failing.
		sn, _ := src.verifyLines(name)
		dn, _ := dst.verifyLines(name)
		time.Sleep(2 * time.Second)
		sn2, _ := src.verifyLines(name)
		dn2, _ := dst.verifyLines(name)
		t.Fatalf("ferry migrate did not end within 3m of the %s: source %s (counter %d then %d lines), destination %s (counter %d then %d lines)\n%s",
			r.fault, describe(src, name), len(sn), len(sn2), describe(dst, name), len(dn), len(dn2), out)
	}
	t.Logf("ferry migrate: exit %d\n%s", code, out)
	// Both sides have given up, or finished: the destination holds no
	// connection of the migration open any more.
	for deadline := time.Now().Add(3 * time.Minute); serveBusy(t, h.b, listen); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			ss, _ := exec.Command("ip", "netns", "exec", h.b, "ss", "-tnp").CombinedOutput()
			t.Fatalf("the destination still holds the migration's connection after 3m: source %s, destination %s\n%s",
				describe(src, name), describe(dst, name), ss)
		}
	}
	if linkDown {
		setLink("up")
	}
	logState := func(when string) {
		t.Logf("%s: source %s; destination %s", when, describe(src, name), describe(dst, name))
	}
	logState("after the fault")
	// The source's ferry gave the job back, ended it, or left it frozen in
	// doubt; the shim acts on the lease of a killed one at once.
	eventually(t, 30*time.Second, "the source's lease to be let go", func() bool {
		v, ok := src.list()[name]
		// (A copy kept frozen for good, in doubt, keeps its guard's
		// word on why as its operation.)
		return ok && (v.Operation == "" || v.State == "exited" || v.State == "frozen" && v.Migration != nil && !alive(v.Migration.Owner))
	})

	// A destination copy that runs on pages still coming is a passing
	// state: it completes, or is dropped once its page link ends (a
	// dead source) or the source goes silent. So is a start under way
	// (a serve killed while it restored leaves its shim to give the
	// start up, or to finish it if it was done: seen still starting
	// 9 ms after the source had given up, then frozen in doubt). Judge
	// what each comes to.
	eventually(t, 90*time.Second, "the destination's copy to stop waiting for pages, or to end its start", func() bool {
		v, ok := dst.list()[name]
		// (A start whose serve was killed is given up by its shim, and
		// the new serve clears it: no stale record stays.)
		return !ok || v.State != "starting" && v.State != "stale" && (v.Migration == nil || v.Migration.State != "lazy")
	})

	// What is judged from here on is each copy as its truth check
	// judged it: a copy frozen at the look may be judged as it is a
	// moment later (seed 934344: a killed migrate's CRIU held it frozen
	// until it let go, and its guard then gave it back).
	s, d := src.job(name), dst.list()[name]
	s = r.checkTruth(t, src, "source", s, sum)
	d = r.checkTruth(t, dst, "destination", d, sum)
	running := countState(s, d, "running")
	if running > 1 {
		t.Fatalf("two running copies: source %+v, destination %+v", s, d)
	}
	for side, v := range map[string]jobView{"source": s, "destination": d} {
		if v.State == "frozen" && v.Migration == nil {
			t.Fatalf("the %s's copy is frozen with no migration note: %+v", side, v)
		}
	}
	frozen := countState(s, d, "frozen")
	if running == 0 && frozen == 0 {
		t.Fatalf("the job is lost: source %s, destination %s", describe(src, name), describe(dst, name))
	}

	outcome := ""
	switch {
	case s.Migration == nil && d.Migration == nil:
		// No doubt: one copy runs, none is held.
		if frozen != 0 {
			t.Fatalf("a frozen copy with no note: source %+v, destination %+v", s, d)
		}
		outcome = map[bool]string{true: "one running here", false: "one running there"}[s.State == "running"]
	case s.Migration != nil:
		// In doubt on the source: re-running the migration settles it.
		if s.Migration.Role != "source" || !strings.Contains(s.Migration.Resolve, "ferry migrate "+name) {
			t.Fatalf("the source's note does not name the settle command: %+v", s.Migration)
		}
		rr := src.ferryIn(h.a, "migrate", name, "--to", listen, "--token-file", token)
		t.Logf("settling from the source: %s", rr)
		switch {
		case rr.code == 0 && strings.Contains(rr.stdout, "settled the migration of "+name):
			outcome = "in doubt, settled by ferry migrate"
		case rr.code == 0 && s.State == "running" && s.Migration.State == "frozen" && strings.Contains(rr.stdout, "migrated "+name+" to"):
			// It ran on here (given back before any commit): the
			// command settled whatever the destination held, then
			// moved the job.
			outcome = "in doubt, settled and moved by ferry migrate"
		default:
			t.Fatalf("settling the migration: %s", rr)
		}
	default:
		// In doubt on the destination only. The documented state has the
		// source say so too whenever its copy is not the one that runs:
		// `ferry list` on both sides, and `ferry migrate` there settles it.
		if d.Migration.Role != "destination" {
			t.Fatalf("the destination's note: %+v", d.Migration)
		}
		if s.State != "running" {
			t.Fatalf("the destination holds the job in doubt (%s) but the source, whose copy is %s, has no note: "+
				"its ferry list does not say so, and ferry migrate there cannot settle it", d.Migration.Note, s.State)
		}
		// The source's copy runs (its shim gave it back): the
		// destination's note says to kill the held one.
		if !strings.Contains(d.Migration.Resolve, "ferry kill "+name) {
			t.Fatalf("the destination's note does not say how to settle: %+v", d.Migration)
		}
		dst.must("kill", name)
		outcome = "in doubt there, held copy killed by hand"
	}
	logState("settled")

	// Exactly one copy runs, and it continues the count with its memory.
	s, d = src.job(name), dst.list()[name]
	s = r.checkTruth(t, src, "source", s, sum)
	d = r.checkTruth(t, dst, "destination", d, sum)
	if n := countState(s, d, "running"); n != 1 || countState(s, d, "frozen") != 0 {
		t.Fatalf("after settling %d running copies: source %+v, destination %+v", n, s, d)
	}
	where, there := src, "here"
	if d.State == "running" {
		where, there = dst, "there"
	}
	where.assertContinues(name, sum, last)
	if len(where.lines(name, "sum ")) > map[bool]int{true: 1, false: 0}[where == src] {
		t.Fatal("the job started afresh")
	}
	if strings.HasPrefix(outcome, "in doubt") {
		outcome += ", runs " + there
	}
	return outcome
}

// checkTruth checks what `ferry list` says of one side's copy against the
// job's own counter: a running copy counts on with its memory intact, a
// frozen one does not count, an ended one has no process. It returns the
// view it judged: v, or the one a re-judge read.
func (r *chaosRun) checkTruth(t *testing.T, e *env, side string, v jobView, sum string) jobView {
	t.Helper()
	if v.Name == "" {
		return v // no copy on that side
	}
	ns, _ := e.verifyLines(v.Name)
	switch v.State {
	case "running":
		n := len(ns)
		ok := false
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if now, _ := e.verifyLines(v.Name); len(now) > n {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("ferry list says the %s's copy runs, but its counter stays at %d lines: %+v", side, n, v)
		}
		_, sums := e.verifyLines(v.Name)
		for _, s := range sums {
			if s != sum {
				t.Fatalf("the %s's copy runs with its memory changed: sum %s, want %s", side, s, sum)
			}
		}
	case "frozen":
		// Frozen for 2.5 s: the counter stays. A copy that ferry list
		// stops calling frozen meanwhile is judged as it is then, once:
		// a CRIU whose ferry was killed may freeze the job again after
		// its guard gave it back, and the guard then thaws it (seed
		// 1080236: frozen at the look, counting 2 s later).
		for deadline := time.Now().Add(2500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
			now, _ := e.verifyLines(v.Name)
			if len(now) == len(ns) {
				continue
			}
			if cur := e.list()[v.Name]; cur.State != "frozen" && !r.rejudged {
				t.Logf("the %s's copy was frozen, and is %s now: judged as it is now", side, cur.State)
				r.rejudged = true
				return r.checkTruth(t, e, side, cur, sum)
			}
			t.Fatalf("ferry list says the %s's copy is frozen, but it counted from %d to %d lines", side, len(ns), len(now))
		}
	case "exited", "stale":
		// stale: a record whose creator was killed; no copy of the job.
		if v.Tasks != 0 || v.MainPID != 0 || v.InitPID != 0 && alive(v.InitPID) {
			t.Fatalf("ferry list says the %s's copy is %s, with processes: %+v", side, v.State, v)
		}
	default:
		t.Fatalf("the %s's copy is %s (%s)", side, v.State, v.Status)
	}
	return v
}

func countState(s, d jobView, state string) int {
	n := 0
	if s.State == state {
		n++
	}
	if d.State == state {
		n++
	}
	return n
}

// describe is one side's copy as ferry list has it, for the log.
func describe(e *env, name string) string {
	v, ok := e.list()[name]
	if !ok {
		return "none"
	}
	s := v.State
	if v.Status != "" && v.Status != v.State {
		s += " (" + v.Status + ")"
	}
	if v.Operation != "" {
		s += ", " + v.Operation
	}
	if v.Migration != nil {
		s += fmt.Sprintf(", in doubt as %s: %s; to settle: %s", v.Migration.Role, v.Migration.Note, v.Migration.Resolve)
	}
	return s
}

// serveBusy says whether a process in namespace ns (the serve) still
// holds a connection on listen's port. One it closed may linger in the
// kernel while the link is down (FIN-WAIT-1, retried for minutes) or
// after (TIME-WAIT): ss names no process for those.
func serveBusy(t *testing.T, ns, listen string) bool {
	_, port, _ := net.SplitHostPort(listen)
	out, err := exec.Command("ip", "netns", "exec", ns, "ss", "-Htnp", "state", "all", "sport", "= :"+port).Output()
	if err != nil {
		t.Fatalf("ss in %s: %v", ns, err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] != "LISTEN" && strings.Contains(l, "users:(") {
			return true
		}
	}
	return false
}

// connected waits until cmd has a TCP socket to listen's port (of any
// state: its connect has begun) and returns when it saw it.
func connected(t *testing.T, cmd *exec.Cmd, listen string) time.Time {
	t.Helper()
	_, port, _ := net.SplitHostPort(listen)
	p, _ := strconv.Atoi(port)
	want := fmt.Sprintf(":%04X ", p)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		// The process's own view: its network namespace's sockets.
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", cmd.Process.Pid))
		if err != nil {
			t.Fatalf("ferry migrate ended before it connected: %v", err)
		}
		for _, l := range strings.Split(string(b), "\n")[1:] {
			if f := strings.Fields(l); len(f) > 2 && strings.HasSuffix(f[2]+" ", want) {
				return time.Now()
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("ferry migrate did not connect within a minute")
	return time.Time{}
}

// waitExitWithin waits up to d for cmd (started by startFerryIn) and
// returns its exit status (-1 if a signal ended it) and whether it ended.
func waitExitWithin(cmd *exec.Cmd, d time.Duration) (int, bool) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
		return cmd.ProcessState.ExitCode(), true
	case <-time.After(d):
		return 0, false
	}
}

// reapLeftovers kills, by pid, any process still naming e's state
// directory once the run is over (a CRIU or lazy-pages daemon that a
// killed serve left behind: this test started them), and says so.
func reapLeftovers(t *testing.T, e *env) {
	out, _ := exec.Command("pgrep", "-f", e.root).Output()
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + f + "/cmdline")
		if len(cmdline) == 0 {
			continue
		}
		t.Logf("left behind, killed: %d %q", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		if p, err := os.FindProcess(pid); err == nil {
			_ = p.Kill()
		}
	}
}

// chaosSummary prints the runs by fault, mode and outcome.
func chaosSummary(t *testing.T, seeds []uint64, runs []chaosOutcome) {
	count := map[[3]string]int{}
	var keys [][3]string
	var failed []string
	for _, o := range runs {
		k := [3]string{o.fault, o.mode, o.outcome}
		if count[k] == 0 {
			keys = append(keys, k)
		}
		count[k]++
		if o.outcome == "FAILED" {
			failed = append(failed, fmt.Sprintf("%d (%s %s at %s)", o.seed, o.fault, o.mode, o.moment.Round(time.Millisecond)))
		}
	}
	sort.Slice(keys, func(i, j int) bool {
		return strings.Join(keys[i][:], " ") < strings.Join(keys[j][:], " ")
	})
	var b strings.Builder
	fmt.Fprintf(&b, "chaos: %d runs, seeds %d..%d\n", len(runs), seeds[0], seeds[len(seeds)-1])
	fmt.Fprintf(&b, "%-12s %-10s %-50s %s\n", "FAULT", "MODE", "OUTCOME", "RUNS")
	for _, k := range keys {
		fmt.Fprintf(&b, "%-12s %-10s %-50s %d\n", k[0], k[1], k[2], count[k])
	}
	if len(failed) > 0 {
		fmt.Fprintf(&b, "failed seeds (FERRY_CHAOS_SEED=N replays one): %s\n", strings.Join(failed, ", "))
	}
	t.Log("\n" + b.String())
}
