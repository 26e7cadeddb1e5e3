/* stop: a child stopped with SIGSTOP stays stopped; its sibling runs. */
#include "conform.h"
#include <sys/mman.h>
#include <sys/ptrace.h>

static volatile uint32_t *counts;
static pid_t stopped, running;
static uint32_t frozen_at, run_last;
static int run_stall;

static void counting(int i)
{
	for (;;) {
		counts[i]++;
		pause_ms(5);
	}
}

static void stopped_setup(void)
{
	counts = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(counts != MAP_FAILED, "mmap");
	stopped = SYS(fork());
	if (stopped == 0)
		counting(0);
	running = SYS(fork());
	if (running == 0)
		counting(1);
	while (counts[0] < 3)
		pause_ms(1);
	SYS(kill(stopped, SIGSTOP));
	int st;
	SYS(waitpid(stopped, &st, WUNTRACED));
	CHECK(WIFSTOPPED(st), "child not stopped");
	frozen_at = counts[0];
}

static void stopped_check(unsigned long n)
{
	(void)n;
	/* CRIU restores a stopped task by sending it SIGSTOP as it lets the
	 * tree go, so right after a restore the child may still show R for a
	 * moment on its way into the stop; it must never count meanwhile, as
	 * the signal is taken before it returns to its own code. */
	char st = proc_state(stopped, NULL);
	for (int i = 0; st != 'T' && i < 200; i++) {
		pause_ms(10);
		st = proc_state(stopped, NULL);
	}
	CHECK(st == 'T', "the stopped child is in state %c", st);
	CHECK(counts[0] == frozen_at, "the stopped child counted on: %u, stopped at %u", counts[0], frozen_at);
	alive(running, "running child");
	if (counts[1] == run_last)
		CHECK(++run_stall < 10, "the running child stopped counting");
	else
		run_stall = 0;
	run_last = counts[1];
}

/* ptraced: a child that asked to be traced and stopped itself: it waits
 * in a signal-delivery stop that we, its tracer, never end. */
static void ptraced_setup(void)
{
	counts = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(counts != MAP_FAILED, "mmap");
	stopped = SYS(fork());
	if (stopped == 0) {
		SYS(ptrace(PTRACE_TRACEME, 0, NULL, NULL));
		raise(SIGSTOP);
		counting(0);
	}
	int st;
	SYS(waitpid(stopped, &st, 0));
	CHECK(WIFSTOPPED(st) && WSTOPSIG(st) == SIGSTOP, "child not in a ptrace stop");
}

static void ptraced_check(unsigned long n)
{
	(void)n;
	char st = proc_state(stopped, NULL);
	CHECK(st == 't', "the traced child is in state %c, want t", st);
	CHECK(counts[0] == 0, "the traced child ran on");
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"stopped", stopped_setup, stopped_check},
	    {"ptraced", ptraced_setup, ptraced_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
