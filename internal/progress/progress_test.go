package progress

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"
)

// fakeClock is a clock the test moves by hand; the meter goroutine reads it,
// hence the lock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1700000000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// manual returns a meter driven by a fake clock and a tick channel the test
// sends on. The channel is unbuffered, so each send returns only once the
// meter goroutine has taken it, and the next send or Done waits for that
// draw to finish: the output is fully deterministic.
func manual(t *testing.T, w io.Writer, mode Mode, op string, total int64) (*Meter, *fakeClock, chan<- time.Time) {
	t.Helper()
	clk := newFakeClock()
	ticks := make(chan time.Time)
	m := newMeter(w, mode, op, total, withClock(clk.Now), withTicks(ticks))
	if m == nil {
		t.Fatalf("newMeter(%v) returned nil", mode)
	}
	return m, clk, ticks
}

type jsonLine struct {
	Op          string  `json:"op"`
	Phase       string  `json:"phase"`
	Bytes       int64   `json:"bytes"`
	Total       *int64  `json:"total"`
	BytesPerSec int64   `json:"bytesPerSec"`
	ElapsedMs   int64   `json:"elapsedMs"`
	Done        *bool   `json:"done"`
	Error       *string `json:"error"`
}

func parseJSONLines(t *testing.T, out string) []jsonLine {
	t.Helper()
	if !strings.HasSuffix(out, "\n") {
		t.Fatalf("JSON output does not end with a newline: %q", out)
	}
	var lines []jsonLine
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var l jsonLine
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			t.Fatalf("invalid JSON line %q: %v", sc.Text(), err)
		}
		lines = append(lines, l)
	}
	return lines
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{
		"auto": Auto, "": Auto, "off": Off, "none": Off,
		"line": Line, "tty": Line, "json": JSON, " JSON ": JSON,
	} {
		got, err := ParseMode(in)
		if err != nil || got != want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	_, err := ParseMode("fancy")
	if err == nil {
		t.Fatal("ParseMode(fancy) succeeded")
	}
	for _, name := range []string{"fancy", "auto", "off", "none", "line", "tty", "json"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not mention %q", err, name)
		}
	}
	for _, m := range []Mode{Auto, Off, Line, JSON} {
		if got, err := ParseMode(m.String()); err != nil || got != m {
			t.Errorf("ParseMode(%v.String()) = %v, %v", m, got, err)
		}
	}
}

func TestJSON(t *testing.T) {
	var buf bytes.Buffer
	m, clk, ticks := manual(t, &buf, JSON, "checkpoint", 0)
	m.SetPhase("dumping")
	for i := 0; i < 4; i++ {
		m.Add(512)
		clk.Advance(500 * time.Millisecond)
		ticks <- time.Time{}
	}
	m.Done(nil)

	lines := parseJSONLines(t, buf.String())
	if len(lines) != 5 {
		t.Fatalf("got %d lines, want 5 (4 ticks + final):\n%s", len(lines), buf.String())
	}
	var prev int64
	for i, l := range lines {
		if l.Op != "checkpoint" || l.Phase != "dumping" {
			t.Errorf("line %d: op/phase = %q/%q", i, l.Op, l.Phase)
		}
		if l.Bytes < prev {
			t.Errorf("line %d: bytes went down from %d to %d", i, prev, l.Bytes)
		}
		prev = l.Bytes
		if l.Total != nil {
			t.Errorf("line %d: total present although unknown", i)
		}
		if l.Error != nil {
			t.Errorf("line %d: unexpected error %q", i, *l.Error)
		}
		if last := i == len(lines)-1; (l.Done != nil) != last || (last && !*l.Done) {
			t.Errorf("line %d: done = %v, want only on the last line", i, l.Done)
		}
	}
	final := lines[len(lines)-1]
	if final.Bytes != 2048 || final.ElapsedMs != 2000 || final.BytesPerSec != 1024 {
		t.Errorf("final = %+v, want 2048 bytes in 2000 ms at 1024 B/s", final)
	}
}

func TestJSONTotalAndError(t *testing.T) {
	var buf bytes.Buffer
	m, clk, _ := manual(t, &buf, JSON, "restore", 100)
	m.SetPhase("restoring")
	m.Add(40)
	clk.Advance(time.Second)
	m.Done(errors.New("criu: restore failed"))
	m.Done(errors.New("second call ignored"))

	lines := parseJSONLines(t, buf.String())
	if len(lines) != 1 {
		t.Fatalf("got %d lines, want exactly one final object:\n%s", len(lines), buf.String())
	}
	l := lines[0]
	if l.Done == nil || !*l.Done {
		t.Error("final object lacks done:true")
	}
	if l.Error == nil || *l.Error != "criu: restore failed" {
		t.Errorf("error = %v, want the first Done's error", l.Error)
	}
	if l.Total == nil || *l.Total != 100 || l.Bytes != 40 || l.Phase != "restoring" {
		t.Errorf("final = %+v", l)
	}
}

func TestLine(t *testing.T) {
	var buf bytes.Buffer
	m, clk, ticks := manual(t, &buf, Line, "checkpoint", 1<<30)
	m.SetPhase("dumping")
	m.Add(412 << 20)
	clk.Advance(500 * time.Millisecond)
	ticks <- time.Time{}
	m.Add(100 << 20)
	m.SetPhase("writing")
	m.Done(nil)

	out := buf.String()
	want := "\rcheckpoint  dumping  412.0 MiB / 1.0 GiB  40%  824.0 MiB/s  0:00.5\x1b[K" +
		"\rcheckpoint  writing  512.0 MiB / 1.0 GiB  50%  1.0 GiB/s  0:00.5\x1b[K\n"
	if out != want {
		t.Errorf("output\n%q\nwant\n%q", out, want)
	}
	if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") {
		t.Errorf("want exactly one newline, at the end: %q", out)
	}
}

func TestLineUnknownTotalAndError(t *testing.T) {
	var buf bytes.Buffer
	m, clk, _ := manual(t, &buf, Line, "restore", 0)
	m.Add(1536)
	clk.Advance(61 * time.Second)
	m.draw(false, nil)
	m.Done(errors.New("boom"))

	// A failure wipes the line: the caller prints the error itself.
	want := "\rrestore  1.5 KiB  25 B/s  1:01.0\x1b[K" + "\r\x1b[K"
	if got := buf.String(); got != want {
		t.Errorf("output %q, want %q", got, want)
	}
}

func TestAutoNotTerminal(t *testing.T) {
	var buf bytes.Buffer
	m := New(&buf, Auto, "checkpoint", 10)
	if m != nil {
		t.Error("Auto on a bytes.Buffer should give a nil (no-op) meter")
	}
	m.SetPhase("dumping")
	m.Add(10)
	m.Done(errors.New("x"))
	if buf.Len() != 0 {
		t.Errorf("wrote %q to a non-terminal", buf.String())
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	pm := New(w, Auto, "checkpoint", 0)
	if pm != nil {
		t.Error("Auto on a pipe should give a nil (no-op) meter")
	}
	pm.Add(5)
	pm.Done(nil)
	w.Close()
	if b, _ := io.ReadAll(r); len(b) != 0 {
		t.Errorf("wrote %q to a pipe", b)
	}
}

func TestAutoTerminal(t *testing.T) {
	var buf bytes.Buffer
	m := newMeter(&buf, Auto, "migrate", 0,
		withTerminal(func(io.Writer) bool { return true }),
		withClock(newFakeClock().Now), withTicks(make(chan time.Time)))
	if m == nil || m.mode != Line {
		t.Fatalf("Auto on a terminal should resolve to Line, got %+v", m)
	}
	m.Done(nil)
	if got, want := buf.String(), "\rmigrate  0 B  0 B/s  0:00.0\x1b[K\n"; got != want {
		t.Errorf("output %q, want %q", got, want)
	}
}

func TestOffAndNil(t *testing.T) {
	var buf bytes.Buffer
	for _, m := range []*Meter{nil, New(&buf, Off, "checkpoint", 1), New(nil, JSON, "x", 0)} {
		if m != nil {
			t.Fatalf("want nil meter, got %+v", m)
		}
		m.Add(1)
		m.SetPhase("p")
		m.SetTotal(2)
		if m.Bytes() != 0 {
			t.Error("nil meter counted bytes")
		}
		var sink bytes.Buffer
		if w := m.Writer(&sink); w != io.Writer(&sink) {
			t.Error("nil meter Writer should return its argument")
		}
		src := strings.NewReader("abc")
		if r := m.Reader(src); r != io.Reader(src) {
			t.Error("nil meter Reader should return its argument")
		}
		m.Done(nil)
		m.Done(errors.New("again"))
	}
	if buf.Len() != 0 {
		t.Errorf("Off wrote %q", buf.String())
	}
}

func TestWriterReaderCount(t *testing.T) {
	m, _, _ := manual(t, io.Discard, JSON, "checkpoint", 0)
	defer m.Done(nil)

	data := bytes.Repeat([]byte("ferry"), 10007) // 50035 bytes
	var dst bytes.Buffer
	n, err := io.Copy(m.Writer(&dst), iotest.HalfReader(bytes.NewReader(data)))
	if err != nil || n != int64(len(data)) || !bytes.Equal(dst.Bytes(), data) {
		t.Fatalf("copy through Writer: n=%d err=%v", n, err)
	}
	if got := m.Bytes(); got != int64(len(data)) {
		t.Errorf("Writer counted %d, want %d", got, len(data))
	}

	got, err := io.ReadAll(m.Reader(iotest.OneByteReader(bytes.NewReader(data[:999]))))
	if err != nil || len(got) != 999 {
		t.Fatalf("read through Reader: %d bytes, err=%v", len(got), err)
	}
	if got := m.Bytes(); got != int64(len(data))+999 {
		t.Errorf("Reader counted %d, want %d", got-int64(len(data)), 999)
	}

	// A short write must count only what was written.
	short := m.Writer(shortWriter{})
	if n, err := short.Write(make([]byte, 10)); n != 3 || err == nil {
		t.Fatalf("short write = %d, %v", n, err)
	}
	if got := m.Bytes(); got != int64(len(data))+999+3 {
		t.Errorf("short write counted %d, want 3", got-int64(len(data))-999)
	}
}

type shortWriter struct{}

func (shortWriter) Write(p []byte) (int, error) { return 3, io.ErrShortWrite }

// TestConcurrentAdd runs a real 1 ms ticker against many writers; with -race
// it checks that drawing and counting share nothing unsafely. It asserts only
// the final sum, never how many ticks happened.
func TestConcurrentAdd(t *testing.T) {
	var buf bytes.Buffer
	m := newMeter(&buf, JSON, "checkpoint", 0, withInterval(time.Millisecond))
	const workers, adds = 64, 2000
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < adds; j++ {
				m.Add(3)
				if j%500 == 0 {
					m.SetPhase("dumping")
					m.SetTotal(workers * adds * 3)
				}
			}
		}()
	}
	wg.Wait()
	var done sync.WaitGroup
	for i := 0; i < 4; i++ { // Done from several goroutines at once
		done.Add(1)
		go func() { defer done.Done(); m.Done(nil) }()
	}
	done.Wait()

	lines := parseJSONLines(t, buf.String())
	final := lines[len(lines)-1]
	if final.Bytes != workers*adds*3 || final.Done == nil || !*final.Done {
		t.Errorf("final = %+v, want %d bytes and done", final, workers*adds*3)
	}
	var prev int64
	for i, l := range lines {
		if l.Bytes < prev {
			t.Errorf("line %d: bytes went down from %d to %d", i, prev, l.Bytes)
		}
		prev = l.Bytes
		if l.Done != nil && i != len(lines)-1 {
			t.Errorf("line %d of %d has done", i, len(lines))
		}
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB",
		412 << 20: "412.0 MiB", 1 << 30: "1.0 GiB", 5 << 40: "5.0 TiB", 2048 << 50: "2048.0 PiB",
	} {
		if got := FormatBytes(n); got != want {
			t.Errorf("FormatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestFormatElapsed(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0:00.0", 500 * time.Millisecond: "0:00.5", 59*time.Second + 990*time.Millisecond: "0:59.9",
		61 * time.Second: "1:01.0", 59 * time.Minute: "59:00.0", time.Hour + 2*time.Minute + 3*time.Second: "1:02:03",
		-time.Second: "0:00.0",
	} {
		if got := formatElapsed(d); got != want {
			t.Errorf("formatElapsed(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestIsTerminal(t *testing.T) {
	if isTerminal(&bytes.Buffer{}) {
		t.Error("bytes.Buffer reported as a terminal")
	}
	if f, err := os.Open(os.DevNull); err == nil {
		defer f.Close()
		if isTerminal(f) {
			t.Error("/dev/null reported as a terminal")
		}
	}
	// A pty master answers TCGETS like a terminal; skip where there is none.
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	defer ptm.Close()
	if !isTerminal(ptm) {
		t.Error("/dev/ptmx not reported as a terminal")
	}
}
