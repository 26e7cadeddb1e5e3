// Package checkpoint describes a checkpoint as it sits on disk until the
// image-stream format replaces it: a directory with CRIU's image files and
// ferry's manifest beside them.
//
//	<checkpoint>/       0700
//	  ferry.json        Manifest: what was dumped, how, and from where
//	  *.img             CRIU's images, untouched
//	  dump.log          CRIU's log of the dump
//	  stats-dump        CRIU's dump statistics
package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// FormatVersion is the version of the manifest; a reader rejects others.
const FormatVersion = 1

// ManifestFile is the manifest's name inside a checkpoint directory.
const ManifestFile = "ferry.json"

// maxManifestSize bounds what Load reads.
const maxManifestSize = 16 << 20

// Errors a reader tells apart with errors.Is.
var (
	ErrNotCheckpoint      = errors.New("not a ferry checkpoint")
	ErrUnsupportedVersion = errors.New("checkpoint format version not supported")
	ErrIncomplete         = errors.New("checkpoint is incomplete")
)

// Manifest is ferry's description of a checkpoint.
type Manifest struct {
	Format       int       `json:"format"`
	FerryVersion string    `json:"ferryVersion"`
	CriuVersion  string    `json:"criuVersion"`
	Kernel       string    `json:"kernel"`
	Host         string    `json:"host"`
	Created      time.Time `json:"created"`

	Job     string   `json:"job"`
	Command []string `json:"command"`
	Dir     string   `json:"dir"`
	// Foreign is set for a tree that ferry did not start (--pid) and for
	// such a tree after ferry restored it: it comes back under a new ferry
	// init, in fresh PID, IPC and mount namespaces, with its own pids.
	Foreign bool `json:"foreign,omitempty"`
	// ExternalPidNS says the tree's PID namespace was declared external at
	// dump (its init is not part of the checkpoint): restore hands CRIU the
	// new namespace under the key extRootPidNS.
	ExternalPidNS bool `json:"externalPidNs,omitempty"`
	ShellJob      bool `json:"shellJob,omitempty"`

	// OutputPipe is the inode key ("pipe:[N]") of the pipe that carried
	// the job's stdout and stderr to its shim: restore hands CRIU a fresh
	// pipe under this key.
	OutputPipe string `json:"outputPipe,omitempty"`
	// ErrorPipe is the same for stderr when it is another pipe.
	ErrorPipe string `json:"errorPipe,omitempty"`

	TCPEstablished bool `json:"tcpEstablished,omitempty"`
	// NetworkLock is CRIU's network locking method for TCP connections
	// ("nftables" or "iptables"); restore must use the same one.
	NetworkLock string `json:"networkLock,omitempty"`
	FileLocks   bool   `json:"fileLocks,omitempty"`
	ExtUnixSk   bool   `json:"extUnixSk,omitempty"`

	// Periodic is the job's periodic snapshot policy when it was
	// checkpointed (ferry run --checkpoint-every), so that a job restored
	// from a snapshot store carries on taking snapshots into that store.
	Periodic *Periodic `json:"periodic,omitempty"`

	// Init is the ferry binary that runs as the tree's pid 1. CRIU checks
	// that every executable is the same file at restore, so a restore
	// needs this exact build at this path.
	Init *Executable `json:"init,omitempty"`

	Processes   int   `json:"processes"`
	Threads     int   `json:"threads"`
	MemoryBytes int64 `json:"memoryBytes"` // pages written by CRIU
	// Inventory and Plan are the walk and the plan of the dump (dump.Inventory
	// and dump.Plan as JSON), CriuStats CRIU's own dump statistics: what
	// `ferry inspect` shows without reading any image.
	Inventory json.RawMessage `json:"inventory,omitempty"`
	Plan      json.RawMessage `json:"plan,omitempty"`
	CriuStats json.RawMessage `json:"criuStats,omitempty"`

	// Files lists every file of the checkpoint with its size, so that a
	// restore can tell a truncated checkpoint before touching anything.
	Files map[string]int64 `json:"files"`
}

// Periodic is a periodic snapshot policy without its store: the store
// is the one the snapshot is restored from.
type Periodic struct {
	Every time.Duration `json:"everyNs"`
	Keep  int           `json:"keep,omitempty"` // 0 keeps all
}

// PidNSKey names the tree's PID namespace when it was dumped as external.
const PidNSKey = "extRootPidNS"

// OutputPipes lists the inherit-fd keys of the pipes that carried the
// tree's stdout and stderr: restore gives each the job's fresh log pipe.
func (m *Manifest) OutputPipes() []string {
	var keys []string
	for _, k := range []string{m.OutputPipe, m.ErrorPipe} {
		if k != "" && (len(keys) == 0 || keys[0] != k) {
			keys = append(keys, k)
		}
	}
	return keys
}

// Executable identifies a binary by path and content.
type Executable struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// ErrExecutableChanged means a binary the checkpoint needs at restore is
// missing or is not the one the checkpoint was taken with.
var ErrExecutableChanged = errors.New("executable missing or changed since the checkpoint")

// Identify reads path's size and SHA-256.
func Identify(path string) (*Executable, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return &Executable{Path: path, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// Check verifies that the binary at e.Path is still the one recorded.
func (e *Executable) Check() error {
	now, err := Identify(e.Path)
	if err != nil {
		return fmt.Errorf("%s: %w (%w)", e.Path, ErrExecutableChanged, err)
	}
	if now.Size != e.Size || now.SHA256 != e.SHA256 {
		return fmt.Errorf("%s: %w: it is another build now (the checkpoint needs sha256 %.12s, found %.12s); keep the ferry binary a checkpoint was taken with at its path", e.Path, ErrExecutableChanged, e.SHA256, now.SHA256)
	}
	return nil
}

// Load reads and validates the manifest of the checkpoint in dir, and
// checks that every file it lists is present with its recorded size.
func Load(dir string) (*Manifest, error) {
	m, err := LoadManifest(dir)
	if err != nil {
		return nil, err
	}
	if len(m.Files) == 0 {
		return nil, fmt.Errorf("%q: manifest lists no image files: %w", dir, ErrIncomplete)
	}
	for name, size := range m.Files {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("%q: %s: %w", dir, name, ErrIncomplete)
		}
		if st.Size() != size {
			return nil, fmt.Errorf("%q: %s has %d bytes, manifest says %d: %w", dir, name, st.Size(), size, ErrIncomplete)
		}
	}
	return m, nil
}

// WriteHead writes m, less its list of files, as dir's manifest: for a
// restore that starts from a stream's first record, before its images
// have come (LoadManifest reads it; Load would find it incomplete).
func WriteHead(dir string, m *Manifest) error {
	head := *m
	head.Files = nil
	data, err := json.MarshalIndent(&head, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ManifestFile), append(data, '\n'), 0o600)
}

// LoadManifest is Load without looking for the image files: for a
// directory whose images are streamed to CRIU from elsewhere.
func LoadManifest(dir string) (*Manifest, error) {
	f, err := os.Open(filepath.Join(dir, ManifestFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%q: %w (no %s)", dir, ErrNotCheckpoint, ManifestFile)
		}
		return nil, fmt.Errorf("reading checkpoint %q: %w", dir, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > maxManifestSize {
		return nil, fmt.Errorf("%q: manifest of %d bytes exceeds %d: %w", dir, st.Size(), maxManifestSize, ErrNotCheckpoint)
	}
	return DecodeManifest(f, fmt.Sprintf("%q", dir))
}

// DecodeManifest reads and checks a manifest (ferry.json) from r; where
// names it in errors.
func DecodeManifest(r io.Reader, where string) (*Manifest, error) {
	var m Manifest
	if err := json.NewDecoder(io.LimitReader(r, maxManifestSize)).Decode(&m); err != nil {
		return nil, fmt.Errorf("%s: manifest: %w: %w", where, ErrNotCheckpoint, err)
	}
	if m.Format != FormatVersion {
		return nil, fmt.Errorf("%s has format %d, this ferry reads %d: %w", where, m.Format, FormatVersion, ErrUnsupportedVersion)
	}
	for name, size := range m.Files {
		if name != filepath.Base(name) || size < 0 {
			return nil, fmt.Errorf("%s: file %q of %d bytes in manifest: %w", where, name, size, ErrNotCheckpoint)
		}
	}
	return &m, nil
}

// SameRestore says whether a restore started from one manifest restores
// the other: whether everything a restore's command line is made of is
// the same in both.
func SameRestore(a, b *Manifest) bool {
	return slices.Equal(a.OutputPipes(), b.OutputPipes()) && a.ExternalPidNS == b.ExternalPidNS &&
		a.ShellJob == b.ShellJob && a.TCPEstablished == b.TCPEstablished && a.NetworkLock == b.NetworkLock &&
		a.FileLocks == b.FileLocks && a.ExtUnixSk == b.ExtUnixSk && a.Foreign == b.Foreign &&
		slices.Equal(a.Command, b.Command) && a.Dir == b.Dir
}
