/* signals: pending (queued with values), blocked masks, handlers, sigaltstack. */
#include "conform.h"
#include <pthread.h>
#include <sys/syscall.h>

/* hexfield reads a mask of the calling thread's /proc status (/proc is
 * the host's: /proc/thread-self names the thread, its pid there does not). */
static unsigned long long hexfield(const char *name)
{
	const char *fn = "/proc/thread-self/status";
	FILE *f = fopen(fn, "r");
	CHECK(f, "open %s", fn);
	char line[256];
	size_t n = strlen(name);
	while (fgets(line, sizeof line, f)) {
		if (!strncmp(line, name, n) && line[n] == ':') {
			fclose(f);
			return strtoull(line + n + 1, NULL, 16);
		}
	}
	fail("no %s in %s", name, fn);
}

/* pending: SIGUSR1 pending for the process, SIGUSR2 for the thread, and a
 * queue of four SIGRTMIN+1 carrying consecutive values, taken and refilled
 * one a round. */
static int next_take, next_give;

static void give(void)
{
	union sigval v = {.sival_int = next_give++};
	SYS(sigqueue(getpid(), SIGRTMIN + 1, v));
}

static void pending_setup(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	sigaddset(&s, SIGUSR2);
	sigaddset(&s, SIGRTMIN + 1);
	SYS(sigprocmask(SIG_BLOCK, &s, NULL));
	SYS(kill(getpid(), SIGUSR1));
	SYS(syscall(SYS_tgkill, getpid(), gettid(), SIGUSR2));
	for (int i = 0; i < 4; i++)
		give();
}

static void pending_check(unsigned long n)
{
	(void)n;
	sigset_t s;
	SYS(sigpending(&s));
	CHECK(sigismember(&s, SIGUSR1) && sigismember(&s, SIGUSR2) && sigismember(&s, SIGRTMIN + 1),
	      "pending set lacks SIGUSR1, SIGUSR2 or SIGRTMIN+1");
	unsigned long long shd = hexfield("ShdPnd"), own = hexfield("SigPnd");
	CHECK(shd & sigbit(SIGUSR1), "SIGUSR1 no longer pending for the process (ShdPnd %llx)", shd);
	CHECK(own & sigbit(SIGUSR2), "SIGUSR2 no longer pending for the thread (SigPnd %llx)", own);
	sigset_t rt;
	sigemptyset(&rt);
	sigaddset(&rt, SIGRTMIN + 1);
	siginfo_t si;
	struct timespec zero = {0, 0};
	SYS(sigtimedwait(&rt, &si, &zero));
	CHECK(si.si_code == SI_QUEUE && si.si_value.sival_int == next_take && si.si_pid == getpid(),
	      "queued signal: code %d value %d pid %d, want SI_QUEUE value %d pid %d", si.si_code, si.si_value.sival_int,
	      (int)si.si_pid, next_take, (int)getpid());
	next_take++;
	give();
}

/* blocked: the main thread and a second thread block different sets;
 * each checks its own. */
static volatile unsigned long long other_mask;

static void *blocker(void *a)
{
	(void)a;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGHUP);
	sigaddset(&s, SIGRTMIN + 7);
	pthread_sigmask(SIG_SETMASK, &s, NULL);
	unsigned long long m = hexfield("SigBlk");
	CHECK(m & sigbit(SIGHUP) && !(m & sigbit(SIGWINCH)), "second thread's mask %llx", m);
	other_mask = m;
	for (;;) {
		pause_ms(50);
		unsigned long long now = hexfield("SigBlk");
		CHECK(now == m, "second thread blocks %llx, blocked %llx", now, m);
	}
	return NULL;
}

static unsigned long long main_mask;

static void blocked_setup(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	sigaddset(&s, SIGWINCH);
	sigaddset(&s, SIGRTMIN + 5);
	SYS(sigprocmask(SIG_SETMASK, &s, NULL));
	pthread_t t;
	CHECK(pthread_create(&t, NULL, blocker, NULL) == 0, "pthread_create");
	while (!other_mask)
		pause_ms(1);
	main_mask = hexfield("SigBlk");
	CHECK(main_mask & sigbit(SIGWINCH), "main mask %llx", main_mask);
}

static void blocked_check(unsigned long n)
{
	(void)n;
	unsigned long long m = hexfield("SigBlk");
	CHECK(m == main_mask, "main thread blocks %llx, blocked %llx", m, main_mask);
	sigset_t s;
	SYS(sigprocmask(SIG_BLOCK, NULL, &s));
	CHECK(sigismember(&s, SIGRTMIN + 5) && !sigismember(&s, SIGHUP), "sigprocmask disagrees");
	CHECK(atoi(proc_field(0, "Threads")) == 2, "%s threads, want 2", proc_field(0, "Threads"));
}

/* handlers: SIGUSR1 runs a SA_SIGINFO handler with SIGUSR2 masked inside,
 * SIGUSR2 is ignored, SIGHUP has a one-shot (SA_RESETHAND) handler. */
static volatile int hits, bad_inside;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	sigset_t s;
	pthread_sigmask(SIG_BLOCK, NULL, &s);
	if (sig != SIGUSR1 || si->si_pid != getpid() || !sigismember(&s, SIGUSR2))
		bad_inside = 1;
	hits++;
}

static void on_hup(int sig) { (void)sig; }

static void handlers_setup(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGUSR2);
	SYS(sigaction(SIGUSR1, &sa, NULL));
	signal(SIGUSR2, SIG_IGN);
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_hup;
	sa.sa_flags = SA_RESETHAND | SA_NODEFER;
	SYS(sigaction(SIGHUP, &sa, NULL));
}

static void handlers_check(unsigned long n)
{
	(void)n;
	struct sigaction sa;
	SYS(sigaction(SIGUSR1, NULL, &sa));
	CHECK(sa.sa_sigaction == on_usr1 && (sa.sa_flags & (SA_SIGINFO | SA_RESTART)) == (SA_SIGINFO | SA_RESTART) &&
	          sigismember(&sa.sa_mask, SIGUSR2),
	      "SIGUSR1 action: handler %p flags %#x", (void *)sa.sa_sigaction, sa.sa_flags);
	SYS(sigaction(SIGUSR2, NULL, &sa));
	CHECK(sa.sa_handler == SIG_IGN, "SIGUSR2 is no longer ignored");
	SYS(sigaction(SIGHUP, NULL, &sa));
	CHECK(sa.sa_handler == on_hup && (sa.sa_flags & (SA_RESETHAND | SA_NODEFER)) == (SA_RESETHAND | SA_NODEFER),
	      "SIGHUP action: handler %p flags %#x", (void *)sa.sa_handler, sa.sa_flags);
	int before = hits;
	SYS(raise(SIGUSR1));
	SYS(raise(SIGUSR2));
	CHECK(hits == before + 1, "SIGUSR1 handler ran %d times, want 1", hits - before);
	CHECK(!bad_inside, "inside the handler: wrong signal, sender or mask");
	CHECK(hexfield("SigIgn") & sigbit(SIGUSR2), "SigIgn lacks SIGUSR2");
}

/* altstack: a 64 KiB alternate stack that a SA_ONSTACK handler runs on. */
#define ALTSZ (64 * 1024)
static char *alt;
static volatile int on_alt, alt_runs;

static void on_alt_usr1(int sig)
{
	(void)sig;
	char here;
	stack_t cur;
	sigaltstack(NULL, &cur);
	on_alt = &here >= alt && &here < alt + ALTSZ && (cur.ss_flags & SS_ONSTACK);
	alt_runs++;
}

static void altstack_setup(void)
{
	alt = malloc(ALTSZ);
	CHECK(alt, "malloc");
	stack_t ss = {.ss_sp = alt, .ss_size = ALTSZ, .ss_flags = 0};
	SYS(sigaltstack(&ss, NULL));
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alt_usr1;
	sa.sa_flags = SA_ONSTACK;
	SYS(sigaction(SIGUSR1, &sa, NULL));
}

static void altstack_check(unsigned long n)
{
	(void)n;
	stack_t cur;
	SYS(sigaltstack(NULL, &cur));
	CHECK(cur.ss_sp == alt && cur.ss_size == ALTSZ && cur.ss_flags == 0, "sigaltstack is %p+%zu flags %d, want %p+%d",
	      cur.ss_sp, cur.ss_size, cur.ss_flags, (void *)alt, ALTSZ);
	int before = alt_runs;
	on_alt = 0;
	SYS(raise(SIGUSR1));
	CHECK(alt_runs == before + 1 && on_alt, "the handler did not run on the alternate stack");
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"pending", pending_setup, pending_check},    {"blocked", blocked_setup, blocked_check},
	    {"handlers", handlers_setup, handlers_check}, {"altstack", altstack_setup, altstack_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
