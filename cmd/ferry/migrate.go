package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/migrate"
	pb "github.com/ferry-cr/ferry/proto"
	"github.com/ferry-cr/ferry/restore"
)

var serveCommand = &cli.Command{
	Name:      "serve",
	Before:    sweepScratch,
	Usage:     "receive migrated jobs from peers that hold the shared token",
	ArgsUsage: " ",
	Description: `Listens for ferry migrate. Every connection runs TLS 1.3, and the peer
must prove it holds the token in --token-file (an HMAC bound to the TLS
session, compared in constant time) before this host proves it in turn and
before any job data is accepted; refusals are logged with the peer's
address. --tls-cert, --tls-key and --tls-ca add certificates to that proof,
never replace it. A connection that has not proved the token within 10s is
closed, and only a few such connections are let in at once (--max-pending,
--max-pending-per-host). Each incoming job is restored as a job of this
ferry's --root, held frozen until the source confirms its copy is gone,
then started.

--hook PATH runs "PATH EVENT JOB" (FERRY_PEER=ADDR:PORT in its environment)
at three moments: pre-restore, when the whole checkpoint has arrived and the
source's copy is stopped with its TCP connections locked (move the job's
service address here; a non-zero exit refuses the job and the source resumes),
discarded, when our copy was dropped and the source's runs on (give the
address back), and running.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "listen", Required: true, Usage: "`ADDR:PORT` to listen on"},
		&cli.StringFlag{Name: "token-file", Required: true, Usage: "file holding the shared secret (mode 0600, at least 16 bytes)"},
		&cli.StringFlag{Name: "hook", Usage: "run `PATH EVENT JOB` at pre-restore (take over the source's addresses; failing refuses the job), discarded and running"},
		&cli.IntFlag{Name: "max-pending", Value: 64, Usage: "connections that have not proved the token yet let in at once (more are closed at once)"},
		&cli.IntFlag{Name: "max-pending-per-host", Value: 8, Usage: "the same, from one address"},
		tlsCertFlag, tlsKeyFlag, tlsCAFlag,
	},
	Action: func(c *cli.Context) error {
		if err := exactArgs(c, 0, ""); err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		token, err := migrate.ReadToken(c.String("token-file"))
		if err != nil {
			return usageError{err}
		}
		pki, err := loadPKI(c)
		if err != nil {
			return err
		}
		if c.Int("max-pending") < 1 || c.Int("max-pending-per-host") < 1 {
			return usageError{fmt.Errorf("--max-pending and --max-pending-per-host must be at least 1")}
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		bin, err := findCriu(c)
		if err != nil {
			return err
		}
		if h := c.String("hook"); h != "" {
			if _, err := exec.LookPath(h); err != nil {
				return usageError{fmt.Errorf("--hook: %w", err)}
			}
		}
		ln, err := net.Listen("tcp", c.String("listen"))
		if err != nil {
			return withCode(err, exitMigrate)
		}
		sv := &migrate.Server{
			Store: s, Token: token, PKI: pki, Logger: slog.Default(), Hook: c.String("hook"),
			MaxPending: c.Int("max-pending"), MaxPendingPerHost: c.Int("max-pending-per-host"),
			Caps:    migrate.CapabilitiesFromFeatures(bin.Features(c.Context, "mem_dirty_track", "uffd", "uffd-noncoop")),
			Restore: restore.Options{Criu: bin, ServeDir: filepath.Join(s.Root, "serve"), CgroupRoot: c.String("cgroup-root"), Logger: slog.Default()},
		}
		// Migrations an earlier serve left half done go on by their
		// records, before new ones come in.
		sv.Recover(c.Context)
		slog.Info("serving migrations", "listen", ln.Addr().String(), "root", s.Root)
		return sv.Serve(c.Context, ln)
	},
}

var migrateCommand = &cli.Command{
	Name:      "migrate",
	Before:    sweepScratch,
	Usage:     "move a running job to another host (ferry serve there)",
	ArgsUsage: "JOB",
	Description: `Moves JOB to the ferry serve at --to. The job runs in at most one place at
any moment: it is frozen and checkpointed straight into the connection (no
file on either side), ended here only once the destination holds it, and
started there only once it is gone here. On any failure before that, it
keeps running here. If the last confirmation is lost, the copy that exists
is held frozen and ferry list says so, with the command that settles it;
migrate of a job in doubt here settles it with the destination: the held
copy runs where the other ended, and is dropped where the other is whole.

--mode post-copy sends everything but the job's memory, starts it on the
destination at once, and moves the memory behind it (CRIU lazy pages over a
second connection to the same port); the source stays frozen until every
page has arrived, and resumes only if the destination drops its copy.
--mode auto picks from both hosts' capabilities, the job's memory and
--max-downtime, and says why.

Both connections run TLS 1.3. This host proves it holds the token, then
checks the destination's proof before it says anything of the job: a
destination that cannot prove it (an impostor, or a relay in the middle)
gets nothing and migrate exits 20. --tls-cert, --tls-key and --tls-ca add
certificates (the destination's must name the host of --to), never replace
the token.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "to", Required: true, Usage: "destination `ADDR:PORT`"},
		&cli.StringFlag{Name: "token-file", Required: true, Usage: "file holding the shared secret"},
		&cli.StringFlag{Name: "mode", Value: "auto", Usage: "auto, stop-copy or post-copy (pre-copy is not built)"},
		&cli.DurationFlag{Name: "max-downtime", Usage: "longest acceptable pause of the job (auto weighs it)"},
		&cli.BoolFlag{Name: "tcp-established", Usage: "carry established TCP connections (move the address to the destination)"},
		&cli.BoolFlag{Name: "file-locks", Usage: "carry file locks"},
		&cli.BoolFlag{Name: "ext-unix-sk", Usage: "allow unix sockets connected outside the tree"},
		&cli.StringFlag{Name: "compress", Value: "auto", Usage: "auto (zstd only while the link is slower than compressing), s2, zstd, or none"},
		&cli.IntFlag{Name: "level", Value: 1, Usage: "zstd level, 1 (fastest) to 4"},
		&cli.DurationFlag{Name: "timeout", Usage: "give up (the job keeps running here) after this long"},
		&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
		progressFlag,
		tlsCertFlag, tlsKeyFlag, tlsCAFlag,
	},
	Action: func(c *cli.Context) error {
		s, name, err := jobArg(c)
		if err != nil {
			return err
		}
		mode, err := migrate.ParseMode(c.String("mode"))
		if err != nil {
			return usageError{err}
		}
		img := image.WriterOptions{Level: c.Int("level")}
		switch c.String("compress") {
		case "auto":
			img.Adaptive = true
		case "zstd":
		case "s2":
			img.Compression = pb.Compression_COMPRESSION_S2
		case "none":
			img.NoCompress = true
		default:
			return usageError{fmt.Errorf("unknown --compress %q (auto, s2, zstd or none)", c.String("compress"))}
		}
		token, err := migrate.ReadToken(c.String("token-file"))
		if err != nil {
			return usageError{err}
		}
		pki, err := loadPKI(c)
		if err != nil {
			return err
		}
		bin, err := findCriu(c)
		if err != nil {
			return err
		}
		meter, err := newMeter(c, "migrate")
		if err != nil {
			return err
		}
		ctx := c.Context
		if d := c.Duration("timeout"); d > 0 {
			var cancel func()
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		if migrate.InDoubt(s, name) {
			// A migration of the job ended in doubt here: settle it with
			// the destination instead of migrating again.
			st, err := migrate.Settle(ctx, s, name, migrate.Options{To: c.String("to"), Token: token, PKI: pki, Logger: slog.Default()})
			if err != nil {
				meter.Done(err)
				return withCode(err, exitMigrate)
			}
			if st.Source != "running" {
				meter.Done(nil)
				if c.Bool("json") {
					return writeJSON(c, st)
				}
				fmt.Fprintf(c.App.Writer, "settled the migration of %s with %s: %s\n", st.Job, st.To, st.Outcome)
				return nil
			}
			// The job ran on here after an earlier move failed, and the
			// copy that move may have left there is gone: now move it.
			slog.Info("settled an earlier migration", "job", st.Job, "with", st.To, "outcome", st.Outcome)
		}
		rep, err := migrate.Migrate(ctx, s, name, migrate.Options{
			To: c.String("to"), Token: token, PKI: pki, Mode: mode, MaxDowntime: c.Duration("max-downtime"),
			Source: migrate.CapabilitiesFromFeatures(bin.Features(ctx, "mem_dirty_track", "uffd", "uffd-noncoop")),
			Logger: slog.Default(),
			Dump: dump.Options{
				Criu: bin, FerryVersion: versionString(), Logger: slog.Default(),
				LogDir: filepath.Join(s.Root, "logs"), CgroupRoot: c.String("cgroup-root"), CriuLogLevel: criuLogLevel(c),
				TCPEstablished: c.Bool("tcp-established"), FileLocks: c.Bool("file-locks"), ExtUnixSk: c.Bool("ext-unix-sk"),
				Image: img, Progress: meter,
			},
		})
		meter.Done(err)
		if err != nil {
			return withCode(err, exitMigrate)
		}
		if c.Bool("json") {
			return writeJSON(c, rep)
		}
		fmt.Fprintf(c.App.Writer, "migrated %s to %s as %s (%s): %s sent in %s (%s/s), downtime %s\n%s\n",
			rep.Job, rep.To, rep.RemoteName, rep.Mode, humanBytes(rep.BytesSent), rep.Total.Round(time.Millisecond),
			humanBytes(int64(rep.Throughput)), rep.Downtime.Round(time.Millisecond), rep.Reason)
		return nil
	},
}

// Certificates a site may add to the token (both commands).
var (
	tlsCertFlag = &cli.StringFlag{Name: "tls-cert", Usage: "present this PEM certificate (with --tls-key) instead of a throwaway one"}
	tlsKeyFlag  = &cli.StringFlag{Name: "tls-key", Usage: "the private key of --tls-cert (PEM)"}
	tlsCAFlag   = &cli.StringFlag{Name: "tls-ca", Usage: "accept only peers whose certificate chains to this PEM CA (in addition to the token)"}
)

func loadPKI(c *cli.Context) (migrate.PKI, error) {
	p, err := migrate.LoadPKI(c.String("tls-cert"), c.String("tls-key"), c.String("tls-ca"))
	if err != nil {
		return p, usageError{err}
	}
	return p, nil
}
