/* fds: pipes, FIFOs, eventfd, signalfd, epoll, inotify, fanotify, memfd,
 * deleted and sparse deleted files, O_APPEND, shared fd tables and offsets. */
#include "conform.h"
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/signalfd.h>

/* A stream of 8-byte sequence numbers kept 1000 deep in a pipe or FIFO:
 * each round takes 100 and puts 100 more. */
static int rfd, wfd;
static uint64_t next_in, next_out;

static void put(int k)
{
	uint64_t buf[100];
	for (int i = 0; i < k; i++)
		buf[i] = next_in++ * 0x9E3779B97F4A7C15ULL;
	CHECK(write(wfd, buf, k * 8) == k * 8, "write: %s", strerror(errno));
}

static void stream_check(unsigned long n)
{
	(void)n;
	uint64_t buf[100];
	ssize_t r = read(rfd, buf, sizeof buf);
	CHECK(r == sizeof buf, "read %zd bytes of %zu: %s", r, sizeof buf, r < 0 ? strerror(errno) : "short");
	for (int i = 0; i < 100; i++, next_out++)
		CHECK(buf[i] == next_out * 0x9E3779B97F4A7C15ULL, "item %llu of the stream is wrong", (unsigned long long)next_out);
	put(100);
}

static void pipe_setup(void)
{
	int p[2];
	SYS(pipe2(p, O_NONBLOCK));
	rfd = p[0], wfd = p[1];
	for (int i = 0; i < 10; i++)
		put(100);
}

static void fifo_setup(void)
{
	SYS(mkfifo(path("fifo"), 0600));
	rfd = SYS(open(path("fifo"), O_RDONLY | O_NONBLOCK));
	wfd = SYS(open(path("fifo"), O_WRONLY | O_NONBLOCK));
	for (int i = 0; i < 10; i++)
		put(100);
}

/* fdinfo returns the value of "key:" in /proc/self/fdinfo/FD. */
static char *fdinfo(int fd, const char *key)
{
	static char line[512];
	char fn[64];
	snprintf(fn, sizeof fn, "/proc/self/fdinfo/%d", fd);
	FILE *f = fopen(fn, "r");
	CHECK(f, "open %s", fn);
	size_t n = strlen(key);
	while (fgets(line, sizeof line, f)) {
		if (!strncmp(line, key, n) && line[n] == ':') {
			fclose(f);
			return line + n + 1;
		}
	}
	fclose(f);
	fail("no %s in %s", key, fn);
}

/* eventfd: a counter that grows by 3 a round and is drained every 4th,
 * and a semaphore-mode one. */
static int ev, evsem;
static uint64_t evval = 5;

static void eventfd_setup(void)
{
	ev = SYS(eventfd(5, EFD_NONBLOCK));
	evsem = SYS(eventfd(0, EFD_NONBLOCK | EFD_SEMAPHORE));
}

static void eventfd_check(unsigned long n)
{
	uint64_t v = 3;
	SYS(write(ev, &v, 8));
	evval += 3;
	uint64_t have = strtoull(fdinfo(ev, "eventfd-count"), NULL, 16);
	CHECK(have == evval, "eventfd count %llu, want %llu", (unsigned long long)have, (unsigned long long)evval);
	if (n % 4 == 0) {
		SYS(read(ev, &v, 8));
		CHECK(v == evval, "eventfd read %llu, want %llu", (unsigned long long)v, (unsigned long long)evval);
		evval = 0;
	}
	v = 2;
	SYS(write(evsem, &v, 8));
	for (int i = 0; i < 2; i++) {
		SYS(read(evsem, &v, 8));
		CHECK(v == 1, "semaphore eventfd read %llu, want 1", (unsigned long long)v);
	}
	CHECK(read(evsem, &v, 8) < 0 && errno == EAGAIN, "semaphore eventfd not drained");
}

/* signalfd: SIGUSR1 and SIGUSR2 blocked and read through a signalfd; one
 * of them is always pending between rounds. */
static int sfd, want_sig = SIGUSR1;

static void signalfd_setup(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	sigaddset(&s, SIGUSR2);
	SYS(sigprocmask(SIG_BLOCK, &s, NULL));
	sfd = SYS(signalfd(-1, &s, SFD_NONBLOCK));
	SYS(raise(want_sig));
}

static void signalfd_check(unsigned long n)
{
	(void)n;
	struct signalfd_siginfo si;
	ssize_t r = read(sfd, &si, sizeof si);
	CHECK(r == sizeof si, "signalfd read %zd: %s", r, strerror(errno));
	CHECK((int)si.ssi_signo == want_sig && (pid_t)si.ssi_pid == getpid(), "signalfd gave signal %u from %u, want %d from %d",
	      si.ssi_signo, si.ssi_pid, want_sig, (int)getpid());
	unsigned long long mask = strtoull(fdinfo(sfd, "sigmask"), NULL, 16);
	CHECK(mask == (sigbit(SIGUSR1) | sigbit(SIGUSR2)), "signalfd mask %llx", mask);
	want_sig = want_sig == SIGUSR1 ? SIGUSR2 : SIGUSR1;
	SYS(raise(want_sig));
}

/* epoll: a pipe and an eventfd registered with their own cookies. */
static int ep, ep_pipe[2], ep_ev;

static void epoll_setup(void)
{
	ep = SYS(epoll_create1(EPOLL_CLOEXEC));
	SYS(pipe2(ep_pipe, O_NONBLOCK));
	ep_ev = SYS(eventfd(0, EFD_NONBLOCK));
	struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 0xA11CE}, e2 = {.events = EPOLLIN | EPOLLET, .data.u64 = 0xB0B};
	SYS(epoll_ctl(ep, EPOLL_CTL_ADD, ep_pipe[0], &e1));
	SYS(epoll_ctl(ep, EPOLL_CTL_ADD, ep_ev, &e2));
}

static void epoll_check(unsigned long n)
{
	SYS(write(ep_pipe[1], "x", 1));
	int both = n % 3 == 0;
	if (both) {
		uint64_t one = 1;
		SYS(write(ep_ev, &one, 8));
	}
	struct epoll_event evs[4];
	int k = SYS(epoll_wait(ep, evs, 4, 1000));
	CHECK(k == 1 + both, "epoll_wait gave %d events, want %d", k, 1 + both);
	int seen_a = 0, seen_b = 0;
	for (int i = 0; i < k; i++) {
		if (evs[i].data.u64 == 0xA11CE && evs[i].events == EPOLLIN)
			seen_a = 1;
		else if (evs[i].data.u64 == 0xB0B && evs[i].events == EPOLLIN)
			seen_b = 1;
		else
			fail("epoll event %#x with cookie %#llx", evs[i].events, (unsigned long long)evs[i].data.u64);
	}
	CHECK(seen_a && seen_b == both, "epoll events: pipe %d eventfd %d", seen_a, seen_b);
	char c;
	SYS(read(ep_pipe[0], &c, 1));
	if (both) {
		uint64_t v;
		SYS(read(ep_ev, &v, 8));
	}
}

/* wait_event polls fd for up to ms and returns whether it became readable. */
static int readable(int fd, int ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return SYS(poll(&p, 1, ms)) == 1;
}

/* inotify: a watch on DIR for creations; each round creates a file and
 * reads its event. An event queued at the checkpoint may be lost (CRIU
 * does not carry the queue), so a round tries a second file before it
 * fails: what must hold is the watch. */
static int in, wd;

static void inotify_setup(void)
{
	SYS(mkdir(path("watched"), 0700));
	in = SYS(inotify_init1(IN_NONBLOCK));
	wd = SYS(inotify_add_watch(in, path("watched"), IN_CREATE));
}

static int saw_create(const char *name)
{
	char buf[4096] __attribute__((aligned(8)));
	int found = 0;
	while (!found && readable(in, 500)) {
		ssize_t r = read(in, buf, sizeof buf);
		if (r < 0 && errno == EAGAIN)
			continue;
		CHECK(r > 0, "read inotify: %s", strerror(errno));
		for (char *p = buf; p < buf + r;) {
			struct inotify_event *ie = (struct inotify_event *)p;
			CHECK(ie->wd == wd, "inotify event for watch %d, want %d", ie->wd, wd);
			if ((ie->mask & IN_CREATE) && ie->len && !strcmp(ie->name, name))
				found = 1;
			p += sizeof *ie + ie->len;
		}
	}
	return found;
}

static void inotify_check(unsigned long n)
{
	int found = 0;
	for (int try = 0; try < 2 && !found; try++) {
		char name[64], full[4200];
		snprintf(name, sizeof name, "f%lu.%d", n, try);
		snprintf(full, sizeof full, "%s/%s", path("watched"), name);
		close(SYS(open(full, O_CREAT | O_WRONLY, 0600)));
		found = saw_create(name);
		unlink(full);
	}
	CHECK(found, "inotify reported no creation in 2 tries");
	CHECK(strstr(fdinfo(in, "inotify wd"), "mask:"), "fdinfo has no watch");
}

/* fanotify: a mark on DIR for opens of its files. */
static int fan;

static void fanotify_setup(void)
{
	SYS(mkdir(path("marked"), 0700));
	close(SYS(open(path("marked/file"), O_CREAT | O_WRONLY, 0600)));
	fan = SYS(fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, O_RDONLY));
	SYS(fanotify_mark(fan, FAN_MARK_ADD, FAN_OPEN | FAN_EVENT_ON_CHILD, AT_FDCWD, path("marked")));
}

static void fanotify_check(unsigned long n)
{
	(void)n;
	int found = 0;
	for (int try = 0; try < 2 && !found; try++) {
		close(SYS(open(path("marked/file"), O_RDONLY)));
		char buf[4096] __attribute__((aligned(8)));
		while (!found && readable(fan, 500)) {
			ssize_t r = read(fan, buf, sizeof buf);
			if (r < 0 && errno == EAGAIN)
				continue;
			CHECK(r > 0, "read fanotify: %s", strerror(errno));
			struct fanotify_event_metadata *m = (struct fanotify_event_metadata *)buf;
			for (; FAN_EVENT_OK(m, r); m = FAN_EVENT_NEXT(m, r)) {
				if ((m->mask & FAN_OPEN) && m->pid == getpid())
					found = 1;
				if (m->fd >= 0)
					close(m->fd);
			}
		}
	}
	CHECK(found, "fanotify reported no open in 2 tries");
}

/* memfd: 1 MiB, sealed against shrinking and growing, mapped shared;
 * a round writes a word through the map and reads it back with pread. */
#define MEMSZ (1 << 20)
static int mfd;
static uint32_t *mmem;
static uint32_t slots[256];

static void memfd_setup(void)
{
	mfd = SYS(memfd_create("conform", MFD_ALLOW_SEALING));
	SYS(ftruncate(mfd, MEMSZ));
	mmem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	CHECK(mmem != MAP_FAILED, "mmap memfd");
	for (int i = 0; i < 256; i++)
		mmem[i * 1024] = slots[i] = i * 3 + 1;
	SYS(fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL));
}

static void memfd_check(unsigned long n)
{
	int s = SYS(fcntl(mfd, F_GET_SEALS));
	CHECK(s == (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), "seals %#x", s);
	struct stat st;
	SYS(fstat(mfd, &st));
	CHECK(st.st_size == MEMSZ, "memfd size %lld", (long long)st.st_size);
	char link[256] = {0};
	char fn[64];
	snprintf(fn, sizeof fn, "/proc/self/fd/%d", mfd);
	SYS(readlink(fn, link, sizeof link - 1));
	CHECK(!strncmp(link, "/memfd:conform", 14), "memfd is %s", link);
	int i = n % 256;
	mmem[i * 1024] = slots[i] = (uint32_t)n;
	for (i = 0; i < 256; i++) {
		uint32_t v;
		CHECK(pread(mfd, &v, 4, i * 4096) == 4, "pread memfd");
		CHECK(v == slots[i] && mmem[i * 1024] == slots[i], "memfd slot %d: file %u map %u, want %u", i, v, mmem[i * 1024], slots[i]);
	}
}

/* deleted: an unlinked 256 KiB file open twice (read-write and
 * read-only); rounds write through one and read through the other.
 * sparse-deleted: the same file 2 GiB long with 8 KiB of data. */
#define DELSZ (256 * 1024)
static int dfd, dfd2;
static off_t dsize;
static unsigned char *model;

static void deleted_file(off_t size)
{
	dfd = SYS(open(path("ghost"), O_RDWR | O_CREAT | O_TRUNC, 0600));
	dfd2 = SYS(open(path("ghost"), O_RDONLY));
	model = malloc(DELSZ);
	for (int i = 0; i < DELSZ; i++)
		model[i] = (i * 7 + 3) & 0xff;
	SYS(pwrite(dfd, model, DELSZ, 0));
	dsize = size;
	if (size > DELSZ) {
		SYS(ftruncate(dfd, size));
		SYS(pwrite(dfd, model, 4096, size - 4096));
	}
	SYS(unlink(path("ghost")));
}

static void deleted_setup(void) { deleted_file(DELSZ); }
static void sparse_setup(void) { deleted_file(2LL << 30); }

static void deleted_check(unsigned long n)
{
	struct stat st;
	SYS(fstat(dfd, &st));
	CHECK(st.st_nlink == 0 && st.st_size == dsize, "deleted file: %lu links, %lld bytes", (unsigned long)st.st_nlink,
	      (long long)st.st_size);
	off_t off = (n % 64) * 4096 + 100;
	model[off] = (unsigned char)n;
	SYS(pwrite(dfd, &model[off], 1, off));
	static unsigned char buf[DELSZ];
	CHECK(pread(dfd2, buf, DELSZ, 0) == DELSZ, "pread the deleted file");
	CHECK(!memcmp(buf, model, DELSZ), "the deleted file's data changed");
	if (dsize > DELSZ) {
		CHECK(pread(dfd2, buf, 4096, dsize - 4096) == 4096 && !memcmp(buf, model, 4096), "the tail of the sparse file changed");
		CHECK(pread(dfd2, buf, 4096, dsize / 2) == 4096 && !buf[0] && !memcmp(buf, buf + 1, 4095), "a hole is not zero");
	}
}

/* append: a log written through an O_APPEND fd (seeked to 0 first, which
 * O_APPEND must override) and read back through a second fd. */
static int afd, arfd;
static off_t alen;

static void append_setup(void)
{
	afd = SYS(open(path("log"), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600));
	arfd = SYS(open(path("log"), O_RDONLY));
}

static void append_check(unsigned long n)
{
	char line[64], back[64];
	int len = snprintf(line, sizeof line, "line %lu\n", n);
	CHECK(SYS(fcntl(afd, F_GETFL)) & O_APPEND, "O_APPEND is gone");
	SYS(lseek(afd, 0, SEEK_SET));
	CHECK(write(afd, line, len) == len, "write");
	alen += len;
	struct stat st;
	SYS(fstat(afd, &st));
	CHECK(st.st_size == alen, "log is %lld bytes, want %lld", (long long)st.st_size, (long long)alen);
	CHECK(lseek(afd, 0, SEEK_CUR) == alen, "append offset %lld, want %lld", (long long)lseek(afd, 0, SEEK_CUR), (long long)alen);
	CHECK(read(arfd, back, len) == len && !memcmp(back, line, len), "reading back line %lu", n);
}

/* fdtable: a child made with CLONE_FILES shares our fd table: each round
 * opens an eventfd holding the round's number at fd 100 (replacing the
 * last), which the child must see; the child reports through a pipe. */
static int ack[2];
static pid_t tabkid;
static char tabstack[64 * 1024] __attribute__((aligned(16)));

static int table_child(void *a)
{
	(void)a;
	uint64_t last = 0;
	for (;;) {
		uint64_t v = 0;
		char *s = NULL;
		if (fcntl(100, F_GETFD) >= 0)
			s = fdinfo(100, "eventfd-count");
		if (s) {
			v = strtoull(s, NULL, 16);
			if (v > last) {
				SYS(write(ack[1], &v, 8));
				last = v;
			}
		}
		pause_ms(10);
	}
	return 0;
}

static void fdtable_setup(void)
{
	SYS(pipe2(ack, O_NONBLOCK));
	tabkid = SYS(clone(table_child, tabstack + sizeof tabstack, CLONE_FILES | SIGCHLD, NULL));
}

static uint64_t acked;

static void fdtable_check(unsigned long n)
{
	alive(tabkid, "child sharing the fd table");
	int e = SYS(eventfd(n, 0));
	SYS(dup2(e, 100));
	SYS(close(e));
	for (int i = 0; i < 100 && acked < n; i++) {
		uint64_t v;
		if (read(ack[0], &v, 8) == 8)
			acked = v;
		else
			pause_ms(10);
	}
	CHECK(acked == n, "the child sharing our fd table saw round %llu at fd 100, want %lu", (unsigned long long)acked, n);
}

/* offset: a file description shared with a forked child: each round the
 * child moves the offset to the round's number times 10 and we see it. */
static int ofd, ogo[2], odone[2];
static pid_t offkid;

static void offset_setup(void)
{
	ofd = SYS(open(path("shared"), O_RDWR | O_CREAT | O_TRUNC, 0600));
	SYS(pipe(ogo));
	SYS(pipe(odone));
	offkid = SYS(fork());
	if (offkid == 0) {
		unsigned long k;
		while (read(ogo[0], &k, sizeof k) == sizeof k) {
			SYS(lseek(ofd, k * 10, SEEK_SET));
			SYS(write(odone[1], &k, sizeof k));
		}
		_exit(0);
	}
}

static void offset_check(unsigned long n)
{
	alive(offkid, "child sharing the file description");
	unsigned long k;
	SYS(write(ogo[1], &n, sizeof n));
	CHECK(read(odone[0], &k, sizeof k) == sizeof k && k == n, "child did not answer round %lu", n);
	off_t o = SYS(lseek(ofd, 0, SEEK_CUR));
	CHECK(o == (off_t)n * 10, "shared offset %lld, the child set %lu", (long long)o, n * 10);
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"pipe", pipe_setup, stream_check},
	    {"fifo", fifo_setup, stream_check},
	    {"eventfd", eventfd_setup, eventfd_check},
	    {"signalfd", signalfd_setup, signalfd_check},
	    {"epoll", epoll_setup, epoll_check},
	    {"inotify", inotify_setup, inotify_check},
	    {"fanotify", fanotify_setup, fanotify_check},
	    {"memfd", memfd_setup, memfd_check},
	    {"deleted", deleted_setup, deleted_check},
	    {"sparse-deleted", sparse_setup, deleted_check},
	    {"append", append_setup, append_check},
	    {"fdtable", fdtable_setup, fdtable_check},
	    {"offset", offset_setup, offset_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
