// Package progress reports how far a long checkpoint or restore has got:
// a live line on a terminal, JSON lines for tools that drive ferry, and
// nothing at all when stderr is a log file or a pipe, so logs stay clean.
package progress

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Mode says how progress is shown.
type Mode int

const (
	// Auto shows a live line when the writer is a terminal and nothing
	// otherwise, so redirected output never fills up with "\r" noise.
	Auto Mode = iota
	// Off shows nothing.
	Off
	// Line redraws one line in place, even when the writer is no terminal.
	Line
	// JSON writes one JSON object per line, for programs rather than people.
	JSON
)

// Redraw intervals: a person cannot read more than ~5 updates a second, and a
// program polling JSON needs no more than one.
const (
	lineInterval = 200 * time.Millisecond
	jsonInterval = time.Second
)

// String returns the name ParseMode accepts for m.
func (m Mode) String() string {
	switch m {
	case Auto:
		return "auto"
	case Off:
		return "off"
	case Line:
		return "line"
	case JSON:
		return "json"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses the value of a --progress flag.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "auto", "":
		return Auto, nil
	case "off", "none":
		return Off, nil
	case "line", "tty":
		return Line, nil
	case "json":
		return JSON, nil
	}
	return Auto, fmt.Errorf("invalid progress mode %q: want auto, off (none), line (tty) or json", s)
}

// Meter counts bytes of one operation and reports them in the background.
// A nil *Meter is valid and does nothing, so callers never need to check
// whether progress is wanted.
type Meter struct {
	w     io.Writer
	mode  Mode // Line or JSON; a meter is never built for Off
	op    string
	bytes atomic.Int64
	total atomic.Int64
	phase atomic.Pointer[string]

	// Injectable for tests, so they need neither sleeps nor timing asserts.
	now      func() time.Time
	interval time.Duration
	tick     <-chan time.Time // when set, used instead of a time.Ticker
	isTerm   func(io.Writer) bool

	start   time.Time
	stop    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// option adjusts a Meter before its goroutine starts; tests only.
type option func(*Meter)

func withClock(now func() time.Time) option           { return func(m *Meter) { m.now = now } }
func withInterval(d time.Duration) option             { return func(m *Meter) { m.interval = d } }
func withTicks(c <-chan time.Time) option             { return func(m *Meter) { m.tick = c } }
func withTerminal(isTerm func(io.Writer) bool) option { return func(m *Meter) { m.isTerm = isTerm } }

// New starts a meter for operation op ("checkpoint", "restore", ...) writing
// to w. total is the expected byte count, or 0 when unknown. Auto becomes Line
// when w is a terminal and Off otherwise. For Off, New returns nil, which is
// a usable no-op meter. Call Done to stop the background goroutine.
func New(w io.Writer, mode Mode, op string, total int64) *Meter {
	return newMeter(w, mode, op, total)
}

func newMeter(w io.Writer, mode Mode, op string, total int64, opts ...option) *Meter {
	m := &Meter{w: w, mode: mode, op: op, now: time.Now, isTerm: isTerminal}
	for _, o := range opts {
		o(m)
	}
	if m.mode == Auto {
		m.mode = Off
		if m.isTerm(w) {
			m.mode = Line
		}
	}
	if w == nil || (m.mode != Line && m.mode != JSON) {
		return nil
	}
	if m.interval <= 0 {
		m.interval = lineInterval
		if m.mode == JSON {
			m.interval = jsonInterval
		}
	}
	m.total.Store(total)
	m.start = m.now()
	m.stop = make(chan struct{})
	m.stopped = make(chan struct{})
	go m.run()
	return m
}

// isTerminal reports whether w is a terminal. It goes through SyscallConn
// rather than Fd, because Fd would switch the file to blocking mode.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || f == nil {
		return false
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	var termErr error = unix.ENOTTY
	if err := rc.Control(func(fd uintptr) {
		_, termErr = unix.IoctlGetTermios(int(fd), unix.TCGETS)
	}); err != nil {
		return false
	}
	return termErr == nil
}

// run redraws on every tick until Done. It is the only writer to w until it
// exits, so output needs no lock.
func (m *Meter) run() {
	defer close(m.stopped)
	tick := m.tick
	if tick == nil {
		t := time.NewTicker(m.interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-m.stop:
			return
		case <-tick:
			m.draw(false, nil)
		}
	}
}

// Add counts n more bytes. It is safe for concurrent use.
func (m *Meter) Add(n int64) {
	if m == nil {
		return
	}
	m.bytes.Add(n)
}

// SetPhase names the current step ("freezing", "dumping", "writing",
// "restoring"), because bytes alone do not explain a pause.
func (m *Meter) SetPhase(phase string) {
	if m == nil {
		return
	}
	m.phase.Store(&phase)
}

// SetTotal sets the expected byte count once it is known; 0 means unknown.
func (m *Meter) SetTotal(total int64) {
	if m == nil {
		return
	}
	m.total.Store(total)
}

// Bytes returns the bytes counted so far.
func (m *Meter) Bytes() int64 {
	if m == nil {
		return 0
	}
	return m.bytes.Load()
}

// Writer returns a writer that counts the bytes written through it to w.
// A nil meter returns w itself, so the copy keeps its fast paths.
func (m *Meter) Writer(w io.Writer) io.Writer {
	if m == nil {
		return w
	}
	return &countWriter{m: m, w: w}
}

// Reader returns a reader that counts the bytes read from r through it.
// A nil meter returns r itself.
func (m *Meter) Reader(r io.Reader) io.Reader {
	if m == nil {
		return r
	}
	return &countReader{m: m, r: r}
}

// Done stops the background goroutine and draws the final line or JSON
// object, reporting err when it is not nil. Later calls do nothing.
func (m *Meter) Done(err error) {
	if m == nil {
		return
	}
	m.once.Do(func() {
		close(m.stop)
		<-m.stopped
		m.draw(true, err)
	})
}

type countWriter struct {
	m *Meter
	w io.Writer
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.m.Add(int64(n))
	return n, err
}

type countReader struct {
	m *Meter
	r io.Reader
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.m.Add(int64(n))
	return n, err
}

// snapshot is one report; its JSON form is the --progress=json line.
type snapshot struct {
	Op          string `json:"op"`
	Phase       string `json:"phase"`
	Bytes       int64  `json:"bytes"`
	Total       int64  `json:"total,omitempty"`
	BytesPerSec int64  `json:"bytesPerSec"`
	ElapsedMs   int64  `json:"elapsedMs"`
	Done        bool   `json:"done,omitempty"`
	Error       string `json:"error,omitempty"`

	elapsed time.Duration
	rate    float64
}

func (m *Meter) snapshot(done bool, err error) snapshot {
	elapsed := m.now().Sub(m.start)
	if elapsed < 0 {
		elapsed = 0
	}
	s := snapshot{
		Op:        m.op,
		Bytes:     m.bytes.Load(),
		Total:     m.total.Load(),
		ElapsedMs: elapsed.Milliseconds(),
		Done:      done,
		elapsed:   elapsed,
	}
	if p := m.phase.Load(); p != nil {
		s.Phase = *p
	}
	if s.Total < 0 {
		s.Total = 0
	}
	if elapsed > 0 {
		s.rate = float64(s.Bytes) / elapsed.Seconds()
		s.BytesPerSec = int64(s.rate)
	}
	if err != nil {
		s.Error = err.Error()
	}
	return s
}

// draw writes one report. Write errors are ignored: progress must never fail
// the operation it describes.
func (m *Meter) draw(done bool, err error) {
	s := m.snapshot(done, err)
	switch m.mode {
	case JSON:
		b, jerr := json.Marshal(s)
		if jerr != nil {
			return
		}
		_, _ = m.w.Write(append(b, '\n'))
	case Line:
		if done && err != nil {
			// The caller reports the failure on a line of its own:
			// wipe the progress line rather than repeat it.
			_, _ = io.WriteString(m.w, "\r\x1b[K")
			return
		}
		line := "\r" + formatLine(s) + "\x1b[K"
		if done {
			line += "\n"
		}
		_, _ = io.WriteString(m.w, line)
	}
}

// formatLine renders s as e.g.
// "checkpoint  dumping  412.0 MiB / 1.0 GiB  41%  823.4 MiB/s  0:00.5".
func formatLine(s snapshot) string {
	var b strings.Builder
	b.WriteString(s.Op)
	if s.Phase != "" {
		b.WriteString("  ")
		b.WriteString(s.Phase)
	}
	b.WriteString("  ")
	b.WriteString(FormatBytes(s.Bytes))
	if s.Total > 0 {
		fmt.Fprintf(&b, " / %s  %d%%", FormatBytes(s.Total), s.Bytes*100/s.Total)
	}
	fmt.Fprintf(&b, "  %s/s  %s", FormatBytes(int64(s.rate)), formatElapsed(s.elapsed))
	return b.String()
}

// FormatBytes renders n in binary units with one decimal ("412.0 MiB"),
// or as plain bytes below 1 KiB.
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	for _, u := range []string{"KiB", "MiB", "GiB", "TiB", "PiB"} {
		v /= unit
		if v < unit && v > -unit || u == "PiB" {
			return fmt.Sprintf("%.1f %s", v, u)
		}
	}
	return fmt.Sprintf("%d B", n) // unreachable
}

// formatElapsed renders d as m:ss.d, or h:mm:ss past an hour, where tenths
// no longer matter.
func formatElapsed(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	if d >= time.Hour {
		s := int64(d / time.Second)
		return fmt.Sprintf("%d:%02d:%02d", s/3600, s/60%60, s%60)
	}
	tenths := int64(d / (100 * time.Millisecond))
	return fmt.Sprintf("%d:%02d.%d", tenths/600, tenths/10%60, tenths%10)
}
