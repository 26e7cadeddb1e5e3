/*
 * ferry-init: pid 1 of a ferry job's PID namespace, small on purpose.
 *
 * It does what ferry's Go init does for a job ferry starts, with no large
 * runtime: a Go process reserves ~1.6 GiB of address space that CRIU's
 * lazy dump pays for (tens of ms per checkpoint), and every checkpoint
 * carries the runtime's heap. Invoked by the job's shim as
 *
 *     ferry-init __init COMMAND [ARG...]
 *
 * with fd 3 the pipe on which the shim says "go" once it has put this
 * process into the job's cgroup, and fd 4 the pipe on which it answers
 * "ok" once the command runs (or "error: ..." if it could not start it).
 * It then forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the
 * command, reaps every orphan of the namespace, and exits with the
 * command's status (128+signal when a signal killed it). The command gets
 * exactly fds 0, 1 and 2.
 *
 * Restoring a tree ferry did not start (checkpoint --pid) needs more of
 * the init (a mount namespace, CRIU run from inside it): that stays with
 * ferry's Go init.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
#define NFORWARDED (sizeof(forwarded) / sizeof(forwarded[0]))

static void say(int fd, const char *fmt, const char *a, const char *b)
{
	char buf[512];
	int n = snprintf(buf, sizeof(buf), fmt, a, b);
	if (n > 0)
		(void)!write(fd, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

/* close_others closes every fd from lo on but keep. */
static void close_others(int lo, int keep)
{
	long max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 65536)
		max = 65536;
	for (int fd = lo; fd < max; fd++)
		if (fd != keep)
			close(fd);
}

int main(int argc, char **argv)
{
	if (argc < 3 || strcmp(argv[1], "__init") != 0) {
		fprintf(stderr, "ferry-init: usage: ferry-init __init COMMAND [ARG...]\n");
		return 127;
	}
	char go[8] = {0};
	ssize_t n;
	do
		n = read(3, go, sizeof(go) - 1);
	while (n < 0 && errno == EINTR);
	close(3);
	if (n < 2 || strncmp(go, "go", 2) != 0)
		return 127;

	/* The forwarded signals and SIGCHLD are taken synchronously. */
	sigset_t set, old;
	sigemptyset(&set);
	for (size_t i = 0; i < NFORWARDED; i++)
		sigaddset(&set, forwarded[i]);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, &old);

	int errpipe[2];
	if (pipe2(errpipe, O_CLOEXEC) < 0) {
		say(4, "error: pipe: %s%s\n", strerror(errno), "");
		return 127;
	}
	pid_t pid = fork();
	if (pid < 0) {
		say(4, "error: fork: %s%s\n", strerror(errno), "");
		return 127;
	}
	if (pid == 0) {
		sigprocmask(SIG_SETMASK, &old, NULL);
		close_others(3, errpipe[1]);
		execvp(argv[2], &argv[2]);
		int e = errno;
		(void)!write(errpipe[1], &e, sizeof(e));
		_exit(127);
	}
	close(errpipe[1]);
	int e;
	do
		n = read(errpipe[0], &e, sizeof(e));
	while (n < 0 && errno == EINTR);
	close(errpipe[0]);
	if (n == sizeof(e)) {
		say(4, "error: exec: \"%s\": %s\n", argv[2], strerror(e));
		return 127;
	}
	say(4, "ok\n%s%s", "", "");
	close(4);

	for (;;) {
		siginfo_t si;
		int sig = sigwaitinfo(&set, &si);
		if (sig < 0)
			continue; /* EINTR: a restore (CRIU) or a stop */
		if (sig != SIGCHLD) {
			kill(pid, sig);
			continue;
		}
		for (;;) {
			int ws;
			pid_t w = waitpid(-1, &ws, WNOHANG);
			if (w <= 0)
				break;
			if (w != pid)
				continue; /* an orphan of the namespace, reaped */
			if (WIFSIGNALED(ws))
				return 128 + WTERMSIG(ws);
			return WEXITSTATUS(ws);
		}
	}
}
