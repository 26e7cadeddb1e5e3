/*
 * tracer: not a conformance case but the foreign tracer of one, as strace
 * or a debugger would be. Usage: tracer PID.
 *
 * It PTRACE_SEIZEs PID (the task runs on, traced), prints "seized PID",
 * and passes every signal the task gets on to it. On SIGTERM it detaches
 * (PTRACE_INTERRUPT, then PTRACE_DETACH from the stop, handing back a
 * signal that stop held), prints "detached" and exits 0. It exits 3 if
 * the task ends first. A test uses it to show that ferry refuses a traced
 * task and that detaching the tracer, as the refusal says, is enough.
 */
#include "conform.h"
#include <sys/ptrace.h>

static volatile sig_atomic_t term;

static void on_term(int sig)
{
	(void)sig;
	term = 1;
}

/* event_stop says whether wait status st is a PTRACE_EVENT_STOP (a
 * group-stop or the stop PTRACE_INTERRUPT asked for). */
static int event_stop(int st)
{
	return (st >> 16) == PTRACE_EVENT_STOP;
}

static int group_stop_sig(int sig)
{
	return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: tracer PID\n");
		return 2;
	}
	pid_t pid = atoi(argv[1]);
	/* No SA_RESTART: SIGTERM interrupts waitpid. */
	struct sigaction sa = {.sa_handler = on_term};
	SYS(sigaction(SIGTERM, &sa, NULL));
	SYS(ptrace(PTRACE_SEIZE, pid, NULL, NULL));
	dprintf(1, "seized %d\n", (int)pid);

	for (;;) {
		int st;
		pid_t r = waitpid(pid, &st, __WALL);
		if (r < 0 && errno == EINTR && term)
			break;
		if (r < 0)
			fail("waitpid %d: %s", (int)pid, strerror(errno));
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			dprintf(1, "gone\n");
			return 3;
		}
		if (!WIFSTOPPED(st))
			continue;
		int sig = WSTOPSIG(st);
		if (event_stop(st) && group_stop_sig(sig))
			SYS(ptrace(PTRACE_LISTEN, pid, NULL, NULL));
		else if (event_stop(st))
			SYS(ptrace(PTRACE_CONT, pid, NULL, NULL));
		else
			SYS(ptrace(PTRACE_CONT, pid, NULL, (void *)(long)sig)); /* pass it on */
		if (term)
			break;
	}

	/* Detach: stop the task, then let it go from that stop. */
	SYS(ptrace(PTRACE_INTERRUPT, pid, NULL, NULL));
	for (int i = 0; i < 100; i++) {
		int st;
		pid_t r = waitpid(pid, &st, __WALL);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail("waitpid %d: %s", (int)pid, strerror(errno));
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			dprintf(1, "gone\n");
			return 3;
		}
		if (!WIFSTOPPED(st))
			continue;
		int sig = event_stop(st) ? 0 : WSTOPSIG(st); /* a signal-delivery stop keeps its signal */
		SYS(ptrace(PTRACE_DETACH, pid, NULL, (void *)(long)sig));
		dprintf(1, "detached\n");
		return 0;
	}
	fail("no stop to detach %d from", (int)pid);
}
