package test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The real-server tests run servers from Debian's packages under ferry and
// check that what a client cares about (a dataset, an open connection, a
// file served, a database's integrity) survives checkpoint and restore.
// scripts/provision-servers.sh installs a package when its binary is
// missing; the tests never rely on a server being installed already, and
// never start one as a system service: each runs under `ferry run` in a
// temporary directory with its own configuration on a port of its own.

var provisionMu sync.Mutex

// provision installs the Debian packages (PKG:BINARY) whose binaries are
// missing and returns the path of each binary, failing the test when it
// cannot (a missing server is a failure, not a skip: the test setup is
// there to install it).
func provision(t *testing.T, specs ...string) map[string]string {
	t.Helper()
	provisionMu.Lock()
	defer provisionMu.Unlock()
	script, err := filepath.Abs("../scripts/provision-servers.sh")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(script, specs...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("provisioning %v: %v\n%s", specs, err, out)
	}
	paths := map[string]string{}
	for _, s := range specs {
		bin := s[strings.Index(s, ":")+1:]
		p, err := exec.LookPath(bin)
		if err != nil {
			for _, dir := range []string{"/usr/sbin", "/usr/bin"} {
				if _, err := os.Stat(filepath.Join(dir, bin)); err == nil {
					p = filepath.Join(dir, bin)
				}
			}
		}
		if p == "" {
			t.Fatalf("%s not found after provisioning", bin)
		}
		paths[bin] = p
	}
	return paths
}

// waitDial waits until addr accepts a TCP connection (from namespace ns,
// or this one when ns is empty).
func waitDial(t *testing.T, ns, addr string) {
	t.Helper()
	eventually(t, 20*time.Second, addr+" to accept connections", func() bool {
		try := func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		}
		if ns == "" {
			return try() == nil
		}
		return inNetns(t, ns, try) == nil
	})
}

// resp is a client of Redis speaking RESP over a plain TCP connection.
type resp struct {
	c net.Conn
	r *bufio.Reader
	w *bufio.Writer
}

func dialResp(t *testing.T, addr string) *resp {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("connecting to redis at %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	return &resp{c: c, r: bufio.NewReader(c), w: bufio.NewWriter(c)}
}

// send writes one command (not flushed: callers pipeline).
func (p *resp) send(args ...string) {
	fmt.Fprintf(p.w, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(p.w, "$%d\r\n%s\r\n", len(a), a)
	}
}

// reply reads one reply: a status, an integer or a bulk string as text;
// a nil bulk as "(nil)"; an error reply as an error.
func (p *resp) reply() (string, error) {
	line, err := p.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", fmt.Errorf("empty reply line")
	}
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", errors.New(line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil {
			return "", err
		}
		if n < 0 {
			return "(nil)", nil
		}
		b := make([]byte, n+2)
		if _, err := io.ReadFull(p.r, b); err != nil {
			return "", err
		}
		return string(b[:n]), nil
	}
	return "", fmt.Errorf("unexpected reply %q", line)
}

func (p *resp) do(t *testing.T, args ...string) string {
	t.Helper()
	p.send(args...)
	if err := p.w.Flush(); err != nil {
		t.Fatalf("redis %v: %v", args, err)
	}
	s, err := p.reply()
	if err != nil {
		t.Fatalf("redis %v: %v", args, err)
	}
	return s
}

// TestServerRedis: a Redis holding 10000 keys of several types is
// checkpointed (ending it) and restored; the restored server answers with
// the same DEBUG DIGEST (a hash of the whole dataset), the same DBSIZE and
// the same values, and takes writes.
func TestServerRedis(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	bins := provision(t, "redis-server:redis-server")
	dir := t.TempDir()
	port := freePort(t, "tcp4")
	addr := net.JoinHostPort("127.0.0.1", port)
	r := e.ferry("run", "--name", "redis", "--", bins["redis-server"],
		"--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--dir", dir, "--enable-debug-command", "yes")
	if r.code != 0 {
		t.Fatalf("run redis: %s", r)
	}
	waitDial(t, "", addr)

	c := dialResp(t, addr)
	const keys = 10000
	for i := 0; i < keys; i++ {
		switch i % 4 {
		case 0, 1:
			c.send("SET", fmt.Sprintf("k:%d", i), fmt.Sprintf("value-%d-%s", i, strings.Repeat("x", i%97)))
		case 2:
			c.send("HSET", fmt.Sprintf("h:%d", i), "a", strconv.Itoa(i), "b", strconv.Itoa(i*7))
		case 3:
			c.send("RPUSH", fmt.Sprintf("l:%d", i), "one", strconv.Itoa(i), "three")
		}
	}
	if err := c.w.Flush(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < keys; i++ {
		if _, err := c.reply(); err != nil {
			t.Fatalf("loading key %d: %v", i, err)
		}
	}
	digest := c.do(t, "DEBUG", "DIGEST")
	size := c.do(t, "DBSIZE")
	sample := c.do(t, "GET", "k:4001")
	if size != strconv.Itoa(keys) || len(digest) != 40 || strings.Trim(digest, "0") == "" {
		t.Fatalf("before the checkpoint: DBSIZE %s, digest %q", size, digest)
	}
	c.c.Close() // no established connection at the checkpoint

	ckpt := filepath.Join(t.TempDir(), "redis.ferry")
	start := time.Now()
	e.must("checkpoint", "-o", ckpt, "redis")
	t.Logf("checkpoint took %s", time.Since(start))
	if v := e.job("redis"); v.State != "exited" {
		t.Fatalf("after the checkpoint the job is %s, want exited", v.State)
	}
	start = time.Now()
	e.must("restore", ckpt)
	t.Logf("restore took %s", time.Since(start))
	waitDial(t, "", addr)

	c = dialResp(t, addr)
	if got := c.do(t, "DEBUG", "DIGEST"); got != digest {
		t.Fatalf("after the restore DEBUG DIGEST is %s, was %s", got, digest)
	}
	if got := c.do(t, "DBSIZE"); got != size {
		t.Fatalf("after the restore DBSIZE is %s, was %s", got, size)
	}
	if got := c.do(t, "GET", "k:4001"); got != sample {
		t.Fatalf("after the restore k:4001 is %q, was %q", got, sample)
	}
	if got := c.do(t, "HGET", "h:4002", "b"); got != strconv.Itoa(4002*7) {
		t.Fatalf("after the restore h:4002.b is %q", got)
	}
	if got := c.do(t, "INCR", "counter"); got != "1" {
		t.Fatalf("INCR after the restore: %q", got)
	}
	if got := c.do(t, "DEBUG", "DIGEST"); got == digest {
		t.Fatalf("the digest did not change after a write: the server is not the one answering")
	}
}

// mc is a client of memcached's text protocol on one connection.
type mc struct {
	c net.Conn
	r *bufio.Reader
}

func (m *mc) set(t *testing.T, key, val string) {
	t.Helper()
	_ = m.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(m.c, "set %s 0 0 %d\r\n%s\r\n", key, len(val), val); err != nil {
		t.Fatalf("set %s: %v", key, err)
	}
	line, err := m.r.ReadString('\n')
	if err != nil || line != "STORED\r\n" {
		t.Fatalf("set %s: %q %v", key, line, err)
	}
}

// get returns the value of key, or "" with ok false when there is none.
func (m *mc) get(t *testing.T, key string) (string, bool) {
	t.Helper()
	_ = m.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(m.c, "get %s\r\n", key); err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	line, err := m.r.ReadString('\n')
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if line == "END\r\n" {
		return "", false
	}
	f := strings.Fields(line)
	if len(f) != 4 || f[0] != "VALUE" {
		t.Fatalf("get %s: answer %q", key, line)
	}
	n, _ := strconv.Atoi(f[3])
	b := make([]byte, n+2)
	if _, err := io.ReadFull(m.r, b); err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if end, err := m.r.ReadString('\n'); err != nil || end != "END\r\n" {
		t.Fatalf("get %s: trailer %q %v", key, end, err)
	}
	return string(b[:n]), true
}

func dialMC(t *testing.T, ns, addr string) *mc {
	t.Helper()
	c := connectIn(t, ns, addr)
	return &mc{c: c, r: bufio.NewReader(c)}
}

// runMemcached starts memcached (2 threads, TCP only) as job name on
// addr:port inside namespace ns of e.
func runMemcached(t *testing.T, e *env, bin, ns, name, host, port string) {
	t.Helper()
	r := e.ferryIn(ns, "run", "--name", name, "--", bin, "-u", "root", "-l", host, "-p", port,
		"-U", "0", "-t", "2", "-m", "64")
	if r.code != 0 {
		t.Fatalf("run memcached: %s", r)
	}
	waitDial(t, ns, net.JoinHostPort(host, port))
}

// TestServerMemcached: memcached holding keys, with a client whose
// connection stays open, is checkpointed with --tcp-established and
// restored; the same connection's next get answers with the value set
// before, and a set on it is seen by a new client.
func TestServerMemcached(t *testing.T) {
	requireCriu(t)
	requireRoot(t)
	bins := provision(t, "memcached:memcached")
	h := newHosts(t)
	e := newEnv(t)
	addr := net.JoinHostPort(h.addrA, "7141")
	runMemcached(t, e, bins["memcached"], h.a, "mc", h.addrA, "7141")

	m := dialMC(t, h.a, addr)
	for i := 0; i < 500; i++ {
		m.set(t, fmt.Sprintf("key%d", i), fmt.Sprintf("value %d", i*i))
	}
	if v, ok := m.get(t, "key321"); !ok || v != "value 103041" {
		t.Fatalf("before the checkpoint key321 = %q %v", v, ok)
	}
	ckpt := filepath.Join(t.TempDir(), "mc.ferry")
	start := time.Now()
	if r := e.ferryIn(h.a, "checkpoint", "--tcp-established", "-o", ckpt, "mc"); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	t.Logf("checkpoint took %s", time.Since(start))
	// The client sees no end of its connection while the server is away.
	_ = m.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := m.r.ReadByte(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the client's connection after the checkpoint: %v, want nothing (no FIN)", err)
	}
	start = time.Now()
	if r := e.ferryIn(h.a, "restore", ckpt); r.code != 0 {
		t.Fatalf("restore: %s", r)
	}
	t.Logf("restore took %s", time.Since(start))
	if v, ok := m.get(t, "key321"); !ok || v != "value 103041" {
		t.Fatalf("after the restore the open connection's get key321 = %q %v", v, ok)
	}
	m.set(t, "after", "restore")
	if v, ok := dialMC(t, h.a, addr).get(t, "after"); !ok || v != "restore" {
		t.Fatalf("a new client after the restore: get after = %q %v", v, ok)
	}
	if v, ok := dialMC(t, h.a, addr).get(t, "key499"); !ok || v != fmt.Sprintf("value %d", 499*499) {
		t.Fatalf("a new client after the restore: get key499 = %q %v", v, ok)
	}
}

// TestServerMemcachedMigrate: memcached with an open client connection
// moves by stop-copy migration with --tcp-established to another
// namespace, which takes over the service address (the serve hook moves
// it); the client, which stays put, gets its keys on the same connection.
func TestServerMemcachedMigrate(t *testing.T) {
	requireCriu(t)
	requireRoot(t)
	bins := provision(t, "memcached:memcached")
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "memcached moves with its clients 7")
	service := fmt.Sprintf("198.18.%d.11", h.net)
	if out, err := exec.Command("ip", "-n", h.a, "addr", "add", service+"/32", "dev", h.vethA).CombinedOutput(); err != nil {
		t.Fatalf("adding the service address: %v\n%s", err, out)
	}
	hook := filepath.Join(t.TempDir(), "hook")
	script := fmt.Sprintf(`#!/bin/sh
case "$1" in
pre-restore) ip -n %[1]s addr del %[3]s/32 dev %[2]s && ip -n %[4]s addr add %[3]s/32 dev %[5]s ;;
discarded) ip -n %[4]s addr del %[3]s/32 dev %[5]s; ip -n %[1]s addr add %[3]s/32 dev %[2]s ;;
esac
`, h.a, h.vethA, service, h.b, h.vethB)
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	listen := net.JoinHostPort(h.addrB, "7142")
	dst.serveWith(h.b, listen, token, []string{"--hook", hook})

	addr := net.JoinHostPort(service, "7143")
	runMemcached(t, src, bins["memcached"], h.a, "mcm", service, "7143")
	m := dialMC(t, h.b, addr)
	for i := 0; i < 300; i++ {
		m.set(t, fmt.Sprintf("m%d", i), strings.Repeat(strconv.Itoa(i), 5))
	}
	start := time.Now()
	if r := src.ferryIn(h.a, "migrate", "mcm", "--to", listen, "--token-file", token, "--tcp-established", "--mode", "stop-copy"); r.code != 0 {
		t.Fatalf("migrate: %s", r)
	}
	t.Logf("migration took %s", time.Since(start))
	if v := dst.job("mcm"); v.State != "running" {
		t.Fatalf("destination job after migration: %s", v.State)
	}
	if v := src.job("mcm"); v.State != "exited" {
		t.Errorf("source job after migration: %s", v.State)
	}
	if v, ok := m.get(t, "m123"); !ok || v != strings.Repeat("123", 5) {
		t.Fatalf("after the migration the open connection's get m123 = %q %v", v, ok)
	}
	m.set(t, "moved", "yes")
	if v, ok := dialMC(t, h.b, addr).get(t, "moved"); !ok || v != "yes" {
		t.Fatalf("a new client after the migration: get moved = %q %v", v, ok)
	}
}

// TestServerNginx: nginx with `user root;`, a master and two workers,
// serves a static file before and after a checkpoint and restore: the
// same bytes, from the same master and workers.
func TestServerNginx(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	bins := provision(t, "nginx:nginx")
	dir := t.TempDir()
	port := freePort(t, "tcp4")
	www := filepath.Join(dir, "www")
	if err := os.MkdirAll(www, 0o755); err != nil {
		t.Fatal(err)
	}
	body := strings.Repeat("ferry carries nginx\n", 500)
	if err := os.WriteFile(filepath.Join(www, "page.txt"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`user root;
worker_processes 2;
daemon off;
master_process on;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 64; }
http {
	default_type text/plain;
	access_log %[1]s/access.log;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	keepalive_timeout 0;
	server {
		listen 127.0.0.1:%[2]s;
		root %[3]s;
	}
}
`, dir, port, www)
	cf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := e.ferry("run", "--name", "nginx", "--", bins["nginx"], "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", cf); r.code != 0 {
		t.Fatalf("run nginx: %s", r)
	}
	addr := net.JoinHostPort("127.0.0.1", port)
	waitDial(t, "", addr)
	url := "http://" + addr + "/page.txt"
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	fetch := func(when string) {
		t.Helper()
		for i := 0; i < 4; i++ { // more than one request, so both workers are likely asked
			resp, err := client.Get(url)
			if err != nil {
				t.Fatalf("GET %s %s: %v", url, when, err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || string(b) != body {
				t.Fatalf("GET %s %s: status %d, %d bytes (want %d), %v", url, when, resp.StatusCode, len(b), len(body), err)
			}
		}
	}
	fetch("before the checkpoint")
	tasks := e.job("nginx").Tasks
	if tasks < 3 {
		t.Fatalf("nginx job has %d tasks, want a master and two workers", tasks)
	}

	ckpt := filepath.Join(t.TempDir(), "nginx.ferry")
	start := time.Now()
	e.must("checkpoint", "-o", ckpt, "nginx")
	t.Logf("checkpoint took %s", time.Since(start))
	start = time.Now()
	e.must("restore", ckpt)
	t.Logf("restore took %s", time.Since(start))
	fetch("after the restore")
	if got := e.job("nginx").Tasks; got != tasks {
		t.Errorf("after the restore the job has %d tasks, had %d", got, tasks)
	}
	log, _ := os.ReadFile(filepath.Join(dir, "access.log"))
	if n := strings.Count(string(log), "GET /page.txt"); n != 8 {
		t.Errorf("access log has %d requests, want 8 (4 before, 4 after, logged by the restored server)", n)
	}
}

// sqliteJob starts, as job name, one sqlite3 that keeps database db open
// and commits one transaction after another, fed by a shell loop: each
// inserts row i and adds i to a running total, then prints "committed|i"
// (sqlite3 flushes its output after each statement). pragmas run first.
func sqliteJob(t *testing.T, e *env, sq, db, name, pragmas string) {
	t.Helper()
	if out, err := exec.Command(sq, db, "PRAGMA journal_mode=WAL; CREATE TABLE t(n INTEGER PRIMARY KEY, v TEXT); CREATE TABLE total(s INTEGER); INSERT INTO total VALUES(0);").CombinedOutput(); err != nil {
		t.Fatalf("creating the database: %v\n%s", err, out)
	}
	loop := fmt.Sprintf(`i=0
{ echo '%s'
while :; do i=$((i+1))
echo "BEGIN IMMEDIATE; INSERT INTO t VALUES($i, hex(randomblob(64))); UPDATE total SET s = s + $i; COMMIT; SELECT 'committed', $i;"
sleep 0.01; done; } | %s -bail %s`, pragmas, sq, db)
	if r := e.ferry("run", "--name", name, "--", "sh", "-c", loop); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
}

// committed is the last row job name's sqlite3 said it committed.
func committed(e *env, name string) int {
	e.t.Helper()
	l := e.lines(name, "committed|")
	if len(l) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(l[len(l)-1]))
	return n
}

// sqliteConsistent checks, from a sqlite3 of its own, that db passes
// integrity_check and holds rows 1..max (none lost, none doubled) with
// the total that they sum to (every transaction whole); it returns max.
func sqliteConsistent(t *testing.T, sq, db string) int {
	t.Helper()
	q := func(sql string) string {
		out, err := exec.Command(sq, db, sql).CombinedOutput()
		if err != nil {
			t.Fatalf("sqlite3 %q: %v\n%s", sql, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := q("PRAGMA integrity_check;"); got != "ok" {
		t.Fatalf("integrity_check: %s", got)
	}
	got := q("SELECT count(*), max(n), (SELECT s FROM total) FROM t;")
	f := strings.Split(got, "|")
	if len(f) != 3 {
		t.Fatalf("count, max, total: %q", got)
	}
	count, _ := strconv.Atoi(f[0])
	max, _ := strconv.Atoi(f[1])
	total, _ := strconv.Atoi(f[2])
	if count != max || total != max*(max+1)/2 {
		t.Fatalf("the rows are not 1..max with their total: count %d, max %d, total %d", count, max, total)
	}
	return max
}

// TestServerSQLite: one sqlite3 keeps a WAL-mode database open in
// exclusive locking mode (its write lock on the database file held for
// the connection's life; the WAL index in its own memory) and commits a
// transaction after another. ferry refuses it without --file-locks,
// naming the flag; with it, the checkpoint and restore carry the lock
// (another connection is kept out after the restore, as before) and the
// loop goes on from the row it had committed. Once it is stopped the
// database passes integrity_check with every row and its total.
func TestServerSQLite(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	bins := provision(t, "sqlite3:sqlite3")
	sq := bins["sqlite3"]
	db := filepath.Join(t.TempDir(), "test.db")
	sqliteJob(t, e, sq, db, "sqlite", "PRAGMA locking_mode=EXCLUSIVE; PRAGMA journal_mode=WAL;")
	eventually(t, 30*time.Second, "100 transactions", func() bool { return committed(e, "sqlite") >= 100 })
	locked := func(when string) {
		t.Helper()
		out, err := exec.Command(sq, db, "SELECT count(*) FROM t;").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "locked") {
			t.Fatalf("%s another connection read the database (%v: %s): the job's lock is not held", when, err, out)
		}
	}
	locked("before the checkpoint")

	if r := e.ferry("checkpoint", "-o", filepath.Join(t.TempDir(), "refused.ferry"), "sqlite"); r.code != 16 || !strings.Contains(r.stderr, "--file-locks") {
		t.Fatalf("checkpoint without --file-locks: want exit 16 naming --file-locks, got %s", r)
	}
	ckpt := filepath.Join(t.TempDir(), "sqlite.ferry")
	start := time.Now()
	e.must("checkpoint", "--file-locks", "-o", ckpt, "sqlite")
	t.Logf("checkpoint took %s", time.Since(start))
	at := committed(e, "sqlite")
	start = time.Now()
	e.must("restore", ckpt)
	t.Logf("restore took %s", time.Since(start))
	eventually(t, 30*time.Second, "the loop to commit 50 more rows", func() bool {
		if v := e.job("sqlite"); v.State != "running" {
			t.Fatalf("after the restore the job is %s: %s", v.State, e.must("logs", "sqlite"))
		}
		return committed(e, "sqlite") >= at+50
	})
	// The restored rows follow on from the last one before the checkpoint.
	l := e.lines("sqlite", "committed|")
	for i := 1; i < len(l); i++ {
		a, _ := strconv.Atoi(strings.TrimSpace(l[i-1]))
		b, _ := strconv.Atoi(strings.TrimSpace(l[i]))
		if b != a+1 {
			t.Fatalf("committed %d after %d", b, a)
		}
	}
	locked("after the restore")
	e.must("kill", "sqlite")
	if max := sqliteConsistent(t, sq, db); max < at+50 {
		t.Fatalf("the database holds rows up to %d, the job committed past %d", max, at+50)
	}
}

// TestServerSQLiteSharedMemory: SQLite's default WAL mode, where every
// connection maps the database's -shm file (MAP_SHARED) and holds a POSIX
// read lock on it for its life: the lock tells the next connection that
// the WAL index is in use. CRIU 4.2 restores the lock and then drops it:
// its restorer closes the descriptor it mapped the file through, and a
// close drops the process's POSIX locks on that file. Another connection
// then takes itself for the first, truncates the -shm file, and the
// restored sqlite3 dies of SIGBUS. ferry refuses such a tree up front
// (exit 16, with the reason), and the job runs on; a ferry that carried
// the lock would pass too.
func TestServerSQLiteSharedMemory(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	bins := provision(t, "sqlite3:sqlite3")
	sq := bins["sqlite3"]
	db := filepath.Join(t.TempDir(), "test.db")
	sqliteJob(t, e, sq, db, "sqlite", "PRAGMA journal_mode=WAL;")
	eventually(t, 30*time.Second, "100 transactions", func() bool { return committed(e, "sqlite") >= 100 })
	ckpt := filepath.Join(t.TempDir(), "sqlite.ferry")
	r := e.ferry("checkpoint", "--file-locks", "-o", ckpt, "sqlite")
	if r.code == 16 {
		if !strings.Contains(r.stderr, "lock") || !strings.Contains(r.stderr, "map") {
			t.Fatalf("refused without naming the locked, mapped file: %s", r)
		}
		if v := e.job("sqlite"); v.State != "running" {
			t.Fatalf("after the refusal the job is %s", v.State)
		}
		return
	}
	if r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	at := committed(e, "sqlite")
	e.must("restore", ckpt)
	// Another connection, as any reader would open one, while the
	// restored job writes on.
	for i := 0; i < 10; i++ {
		_ = exec.Command(sq, db, "SELECT count(*) FROM t;").Run()
		time.Sleep(50 * time.Millisecond)
	}
	eventually(t, 30*time.Second, "the loop to commit 50 more rows", func() bool {
		if v := e.job("sqlite"); v.State != "running" {
			t.Fatalf("after the restore the job is %s (the -shm lock was lost): %s", v.State, e.must("logs", "sqlite"))
		}
		return committed(e, "sqlite") >= at+50
	})
	e.must("kill", "sqlite")
	sqliteConsistent(t, sq, db)
}
