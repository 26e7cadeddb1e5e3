/*
 * conform.h: the loop every conformance program shares.
 *
 * A program sets up one kind of kernel state, then calls run_loop: every
 * 50 ms it checks that the state still holds and prints "ok N" (N counts
 * from 1, kept only in the program's memory), or prints "FAIL <what>" and
 * exits 1. After a checkpoint and restore the count must go on without a
 * gap: a restore that lost memory starts again at 1, one that lost the
 * state prints FAIL. Child processes that check their own share of the
 * state print FAIL the same way; their parent notices them gone.
 *
 * Usage of every program: PROGRAM MODE DIR [ARG]: MODE picks the state,
 * DIR is a directory the program may create files in (it must still be
 * there at restore), ARG is mode-specific (a TCP/UDP port).
 */
#ifndef CONFORM_H
#define CONFORM_H

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *dir = ".";
static const char *arg3;

__attribute__((format(printf, 1, 2), noreturn, unused)) static void fail(const char *fmt, ...)
{
	char buf[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	dprintf(1, "FAIL %s (pid %d)\n", buf, (int)getpid());
	_exit(1);
}

/* CHECK fails with the message unless cond holds. */
#define CHECK(cond, ...)                                                                                      \
	do {                                                                                                  \
		if (!(cond))                                                                                  \
			fail(__VA_ARGS__);                                                                    \
	} while (0)

/* SYS fails, naming the call and errno, when a system call returns < 0. */
#define SYS(call)                                                                                             \
	({                                                                                                    \
		long _r = (long)(call);                                                                       \
		if (_r < 0)                                                                                   \
			fail("%s: %s", #call, strerror(errno));                                               \
		_r;                                                                                           \
	})

/* pause_ms sleeps ms milliseconds, signals or not. */
static __attribute__((unused)) void pause_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	while (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR)
		;
}

static __attribute__((unused)) char *path(const char *name)
{
	static char buf[8][4096];
	static int i;
	char *p = buf[i++ % 8];
	snprintf(p, 4096, "%s/%s", dir, name);
	return p;
}

/* alive fails unless child pid is still running (not exited, not reaped). */
static __attribute__((unused)) void alive(pid_t pid, const char *what)
{
	int st;
	pid_t r = waitpid(pid, &st, WNOHANG);
	CHECK(r == 0, "%s (pid %d) is gone: waitpid %d, status %#x", what, (int)pid, (int)r, st);
}

/* proc_field returns the text after "NAME:" in /proc/PID/status (pid 0: self). */
static __attribute__((unused)) char *proc_field(pid_t pid, const char *name)
{
	static char line[512];
	char fn[64];
	if (pid)
		snprintf(fn, sizeof fn, "/proc/%d/status", (int)pid);
	else
		snprintf(fn, sizeof fn, "/proc/self/status");
	FILE *f = fopen(fn, "r");
	CHECK(f, "open %s: %s", fn, strerror(errno));
	size_t n = strlen(name);
	while (fgets(line, sizeof line, f)) {
		if (!strncmp(line, name, n) && line[n] == ':') {
			fclose(f);
			char *v = line + n + 1;
			while (*v == ' ' || *v == '\t')
				v++;
			v[strcspn(v, "\n")] = 0;
			return v;
		}
	}
	fclose(f);
	fail("no %s in %s", name, fn);
}

/*
 * host_pid is the pid in /proc's namespace of child, a child of this
 * process (0 if none): a job runs in a PID namespace of its own but sees
 * the host's /proc, where /proc/self and the children files of
 * /proc/self/task/TID name processes by their pids out there.
 */
static __attribute__((unused)) pid_t host_pid(pid_t child)
{
	char fn[300], buf[4096];
	DIR *d = opendir("/proc/self/task");
	CHECK(d, "opendir /proc/self/task: %s", strerror(errno));
	pid_t found = 0;
	struct dirent *de;
	while (!found && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(fn, sizeof fn, "/proc/self/task/%s/children", de->d_name);
		int fd = open(fn, O_RDONLY);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, buf, sizeof buf - 1);
		close(fd);
		buf[n > 0 ? n : 0] = 0;
		for (char *tok = strtok(buf, " \n"); tok && !found; tok = strtok(NULL, " \n")) {
			pid_t h = atoi(tok);
			char *ns = proc_field(h, "NSpid");
			char *last = strrchr(ns, '\t');
			if (atoi(last ? last + 1 : ns) == child)
				found = h;
		}
	}
	closedir(d);
	return found;
}

/* proc_state is the state letter (R, S, T, Z...) and parent of child, a
 * child of this process. */
static __attribute__((unused)) char proc_state(pid_t child, pid_t *ppid)
{
	char fn[64], buf[1024];
	pid_t pid = host_pid(child);
	if (!pid)
		return '?';
	snprintf(fn, sizeof fn, "/proc/%d/stat", (int)pid);
	int fd = open(fn, O_RDONLY);
	if (fd < 0)
		return '?';
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return '?';
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	if (!p)
		return '?';
	char st;
	int pp;
	if (sscanf(p + 2, "%c %d", &st, &pp) != 2)
		return '?';
	if (ppid)
		*ppid = pp;
	return st;
}

/* sigbit is the bit of signal sig in the hex masks of /proc/PID/status. */
static __attribute__((unused)) unsigned long long sigbit(int sig) { return 1ULL << (sig - 1); }

static __attribute__((unused)) void run_loop(void (*check)(unsigned long n))
{
	for (unsigned long n = 1;; n++) {
		check(n);
		dprintf(1, "ok %lu\n", n);
		pause_ms(50);
	}
}

struct mode {
	const char *name;
	void (*setup)(void);
	void (*check)(unsigned long n);
};

/* conform_main runs the mode named by argv[1] of the table. */
static __attribute__((unused)) int conform_main(int argc, char **argv, const struct mode *modes)
{
	if (argc < 3) {
		dprintf(2, "usage: %s MODE DIR [ARG]\n", argv[0]);
		return 2;
	}
	dir = argv[2];
	arg3 = argc > 3 ? argv[3] : NULL;
	for (const struct mode *m = modes; m->name; m++) {
		if (!strcmp(m->name, argv[1])) {
			m->setup();
			run_loop(m->check);
		}
	}
	dprintf(2, "%s: unknown mode %s\n", argv[0], argv[1]);
	return 2;
}

#endif
