// Package job owns ferry's state directory and the lifecycle of a job: its
// record, its cgroup, the shim that supervises it from outside and the init
// that runs as pid 1 of its PID namespace.
//
// Layout of the state directory (--root, default /var/lib/ferry):
//
//	<root>/                 0700
//	  jobs/<name>/          0700, one per job
//	    job.json            the Record, replaced atomically
//	    log                 the job's stdout and stderr, appended by the shim
//	    shim.log            the shim's own diagnostics
//	    lock                flock(2) target serialising record updates
package job

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/atomicfile"
	"github.com/ferry-cr/ferry/internal/scratch"
)

// DefaultRoot is the state directory used when neither --root nor FERRY_ROOT
// is given.
const DefaultRoot = "/var/lib/ferry"

const (
	recordFile = "job.json"
	logFile    = "log"
	shimLog    = "shim.log"
	lockFile   = "lock"
	// maxRecordSize bounds what Load reads; a record is a few hundred bytes.
	maxRecordSize = 1 << 20
)

// Status is the lifecycle state recorded for a job. The zero value means
// unknown. Whether a running job is frozen is not recorded: it is read from
// the cgroup when asked, since the cgroup is the truth.
type Status string

// Statuses a job moves through.
const (
	Unknown  Status = ""
	Starting Status = "starting"
	Running  Status = "running"
	Exited   Status = "exited"
)

// Record is what ferry knows about one job. It is stored as JSON so that
// operators can read it.
type Record struct {
	Name    string    `json:"name"`
	ID      string    `json:"id"`
	Command []string  `json:"command"`
	Dir     string    `json:"dir"` // working directory of the job
	Created time.Time `json:"created"`
	Status  Status    `json:"status"`

	Cgroup        string `json:"cgroup,omitempty"`
	CgroupVersion int    `json:"cgroupVersion,omitempty"`

	// OwnerPID and OwnerStart name the process that created the record
	// (ferry run, restore, serve) by pid and start time, and ShimStart the
	// start time of ShimPID, recorded as soon as the shim is spawned: a
	// record still "starting" whose owner and shim are both gone was
	// abandoned mid-start (see Stale).
	OwnerPID   int    `json:"ownerPid,omitempty"`
	OwnerStart uint64 `json:"ownerStart,omitempty"`
	ShimPID    int    `json:"shimPid,omitempty"`
	ShimStart  uint64 `json:"shimStart,omitempty"`
	InitPID    int    `json:"initPid,omitempty"`   // host pid of ferry's init (pid 1 inside)
	InitStart  uint64 `json:"initStart,omitempty"` // start time of InitPID in clock ticks, guards against pid reuse

	Exit *ExitStatus `json:"exit,omitempty"`

	// RestoreFrom is the checkpoint this job was restored from, if any.
	RestoreFrom string `json:"restoreFrom,omitempty"`
	// RestoreCriu is the CRIU binary the shim restores with.
	RestoreCriu string `json:"restoreCriu,omitempty"`
	// Foreign marks a job whose tree ferry did not start: it runs as a
	// child of ferry's init in private PID, IPC and mount namespaces, and
	// CRIU works on it from inside those namespaces.
	Foreign bool `json:"foreign,omitempty"`
	// RestoreStopped has the shim leave the restored tree frozen (a
	// migration's destination copy waits so until the source's is gone).
	RestoreStopped bool `json:"restoreStopped,omitempty"`
	// RestoreLazy restores with CRIU lazy pages (a migration's post-copy).
	RestoreLazy bool `json:"restoreLazy,omitempty"`
	// Migration, when set, says that the job is part of a migration whose
	// outcome ferry could not settle, and how the operator settles it.
	Migration *MigrationNote `json:"migration,omitempty"`
	// Snapshots, when set, has the shim add a snapshot of the job to a
	// store periodically while it runs.
	Snapshots *SnapshotPolicy `json:"snapshots,omitempty"`
	// Resume marks a job ended by `ferry checkpoint --all`: `ferry
	// restore --all` brings it back from this snapshot.
	Resume *ResumePoint `json:"resume,omitempty"`
	// Operation is what holds the job's lease now (checkpoint, migrate,
	// snapshot...), or what a committed Keep verdict left it as; the
	// job's shim records it (see package lease).
	Operation string `json:"operation,omitempty"`
}

// SnapshotPolicy is `ferry run --checkpoint-every D --keep N --store DIR`.
type SnapshotPolicy struct {
	Store string        `json:"store"`
	Every time.Duration `json:"everyNs"`
	Keep  int           `json:"keep,omitempty"` // 0 keeps all
}

// ResumePoint is where a job checkpointed for a reboot comes back from.
type ResumePoint struct {
	Store    string `json:"store"`
	Snapshot string `json:"snapshot"`
}

// MigrationNote records a migration in doubt on one side.
type MigrationNote struct {
	Peer string `json:"peer"`
	Role string `json:"role"` // "source" or "destination"
	// State is where that side's handover stood when the note was
	// written (package migrate: committed, serving, in doubt, held,
	// lazy): what a restarted ferry drives the migration on from.
	State string `json:"state,omitempty"`
	// Owner is the pid of the ferry that wrote the note while it drove
	// the migration: a restarted serve recovers only what a dead one left.
	Owner   int       `json:"owner,omitempty"`
	Time    time.Time `json:"time"`
	Note    string    `json:"note"`    // what is known
	Resolve string    `json:"resolve"` // the command that settles it
}

// ExitStatus says how a job ended.
type ExitStatus struct {
	Code   int       `json:"code"`             // exit code, or 128+signal as a shell reports it
	Signal string    `json:"signal,omitempty"` // set when the init itself was killed by a signal
	Time   time.Time `json:"time"`
	Reason string    `json:"reason,omitempty"` // what ended it, when ferry knows (killed, start failed)
}

// ReasonAbandoned is the exit reason of a job whose start was abandoned:
// the process starting it was killed before the job ran, and a later
// ferry command cleared what it left.
const ReasonAbandoned = "start abandoned"

// String renders an exit status the way `ferry list` shows it.
func (e *ExitStatus) String() string {
	if e == nil {
		return ""
	}
	if e.Reason == "checkpointed" || e.Reason == ReasonAbandoned {
		return e.Reason
	}
	s := fmt.Sprintf("status %d", e.Code)
	if e.Signal != "" {
		s = "killed by " + e.Signal
	}
	if e.Reason != "" {
		s = e.Reason + ", " + s
	}
	return s
}

// Registry is a state directory: the records of its jobs.
type Registry struct {
	Root string
}

// OpenRegistry opens the state directory at root, creating it (0700) if needed.
func OpenRegistry(root string) (*Registry, error) {
	if root == "" {
		root = DefaultRoot
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("state directory %q: %w", root, err)
	}
	if err := os.MkdirAll(filepath.Join(abs, "jobs"), 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	return &Registry{Root: abs}, nil
}

// Dir is the directory that holds the job's record and log.
func (s *Registry) Dir(name string) string { return filepath.Join(s.Root, "jobs", name) }

// LogPath is the job's log file.
func (s *Registry) LogPath(name string) string { return filepath.Join(s.Dir(name), logFile) }

// ShimLogPath is where the job's shim writes its own diagnostics.
func (s *Registry) ShimLogPath(name string) string { return filepath.Join(s.Dir(name), shimLog) }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// ValidateName checks that name can be used as a job name: 1 to 63
// characters, letters, digits, '.', '_' and '-', not starting with a
// punctuation mark. Names become directory and cgroup names.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return &NameError{Name: name, Err: ErrInvalidName}
	}
	return nil
}

// GenerateName makes a name from the command's base name and a random
// suffix, for `ferry run` without --name.
func GenerateName(command string) string {
	base := filepath.Base(command)
	base = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			return r
		}
		return -1
	}, base)
	if base == "" || len(base) > 20 {
		base = "job"
	}
	return base + "-" + randomHex(3)
}

// NewID returns a random identifier for a job incarnation; it keeps cgroup
// names unique across state directories that share one host.
func NewID() string { return randomHex(8) }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on Linux.
	return hex.EncodeToString(b)
}

// Create makes the job's directory and writes its first record. It fails
// with ErrExists when a job of that name exists. The directory appears
// with its record in it (made as scratch space, see package scratch, and
// renamed into place), so that a process killed meanwhile leaves no
// directory without a record to hold the name.
func (s *Registry) Create(rec *Record) error {
	if err := ValidateName(rec.Name); err != nil {
		return err
	}
	data, err := encode(rec)
	if err != nil {
		return err
	}
	tmp, err := scratch.Dir(filepath.Join(s.Root, "jobs"), "job")
	if err != nil {
		return fmt.Errorf("creating job directory: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(tmp, recordFile), data, true); err != nil {
		_ = os.RemoveAll(tmp)
		return err
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, s.Dir(rec.Name), unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) {
		// A filesystem without RENAME_NOREPLACE: mkdir claims the name.
		_ = os.RemoveAll(tmp)
		return s.createInPlace(rec)
	}
	if err != nil {
		_ = os.RemoveAll(tmp)
		if errors.Is(err, unix.EEXIST) || errors.Is(err, unix.ENOTEMPTY) {
			return &NameError{Name: rec.Name, Err: ErrExists}
		}
		return fmt.Errorf("creating job directory: %w", err)
	}
	return atomicfile.SyncDir(filepath.Join(s.Root, "jobs"))
}

func (s *Registry) createInPlace(rec *Record) error {
	if err := os.Mkdir(s.Dir(rec.Name), 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return &NameError{Name: rec.Name, Err: ErrExists}
		}
		return fmt.Errorf("creating job directory: %w", err)
	}
	if err := s.Save(rec); err != nil {
		_ = os.RemoveAll(s.Dir(rec.Name))
		return err
	}
	return nil
}

// Load reads the record of job name.
func (s *Registry) Load(name string) (*Record, error) {
	if err := ValidateName(name); err != nil {
		return nil, &NameError{Name: name, Err: ErrNotFound}
	}
	f, err := os.Open(filepath.Join(s.Dir(name), recordFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &NameError{Name: name, Err: ErrNotFound}
		}
		return nil, fmt.Errorf("reading job %q: %w", name, err)
	}
	defer f.Close()
	var rec Record
	dec := json.NewDecoder(&limitedReader{f: f, n: maxRecordSize})
	if err := dec.Decode(&rec); err != nil {
		return nil, fmt.Errorf("decoding record of job %q: %w", name, err)
	}
	return &rec, nil
}

type limitedReader struct {
	f *os.File
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, fmt.Errorf("record larger than %d bytes", maxRecordSize)
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.f.Read(p)
	l.n -= int64(n)
	return n, err
}

// Save writes rec atomically: a temporary file in the same directory,
// fsync, rename, fsync of the directory.
func (s *Registry) Save(rec *Record) error {
	data, err := encode(rec)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(s.Dir(rec.Name), recordFile), data, true)
}

func encode(rec *Record) ([]byte, error) {
	data, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding record of job %q: %w", rec.Name, err)
	}
	return append(data, '\n'), nil
}

// Update applies fn to the current record of job name under the job's lock
// and saves the result, so that the shim and the CLI never overwrite each
// other's changes.
func (s *Registry) Update(name string, fn func(*Record) error) (*Record, error) {
	return s.update(name, fn, true)
}

// UpdateLive is Update for what describes live processes only: where a
// migration or a stop stands (Record.Migration, Record.Operation), and
// the job's cgroup, shim and running init as it starts. The
// record is replaced atomically as ever, but not synced to disk: such a
// note must outlive the death of the process that writes it, which the
// page cache assures, and not a crash of the machine, which ends the
// processes it describes. It is written on the path of a migration's
// downtime, where each sync costs milliseconds, and more under load.
func (s *Registry) UpdateLive(name string, fn func(*Record) error) (*Record, error) {
	return s.update(name, fn, false)
}

// update is Update, which syncs the record when durable; a record fn
// left as it was is not written at all.
func (s *Registry) update(name string, fn func(*Record) error, durable bool) (*Record, error) {
	unlock, err := s.lock(name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	before, err := encode(rec)
	if err != nil {
		return nil, err
	}
	if err := fn(rec); err != nil {
		return rec, err
	}
	data, err := encode(rec)
	if err != nil {
		return rec, err
	}
	if bytes.Equal(before, data) {
		return rec, nil
	}
	return rec, atomicfile.Write(filepath.Join(s.Dir(rec.Name), recordFile), data, durable)
}

func (s *Registry) lock(name string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(s.Dir(name), lockFile), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &NameError{Name: name, Err: ErrNotFound}
		}
		return nil, fmt.Errorf("locking job %q: %w", name, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("locking job %q: %w", name, err)
	}
	return func() { f.Close() }, nil
}

// List returns every job's record, sorted by creation time. Directories
// without a readable record (a `ferry run` that is just starting) are
// skipped.
func (s *Registry) List() ([]*Record, error) {
	entries, err := os.ReadDir(filepath.Join(s.Root, "jobs"))
	if err != nil {
		return nil, fmt.Errorf("listing jobs: %w", err)
	}
	var recs []*Record
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		rec, err := s.Load(e.Name())
		if err != nil {
			continue
		}
		recs = append(recs, rec)
	}
	slices.SortFunc(recs, func(a, b *Record) int { return a.Created.Compare(b.Created) })
	return recs, nil
}

// Remove deletes the job's directory, log included.
func (s *Registry) Remove(name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := os.RemoveAll(s.Dir(name)); err != nil {
		return fmt.Errorf("removing job %q: %w", name, err)
	}
	return nil
}
