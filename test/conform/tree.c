/* tree: process-tree shapes: threads, sessions, process groups, zombies, orphans. */
#include "conform.h"
#include <pthread.h>
#include <sys/syscall.h>

/* threads: three threads count with their own tid and thread-local data. */
#define NT 3
static volatile unsigned long tcount[NT];
static volatile pid_t ttid[NT];
static __thread int tls_id = -1;
static unsigned long tlast[NT];
static int tstall[NT];

static void *counter_thread(void *a)
{
	int i = (int)(long)a;
	tls_id = i * 7 + 1;
	ttid[i] = gettid();
	for (;;) {
		CHECK(tls_id == i * 7 + 1, "thread %d: thread-local value %d, want %d", i, tls_id, i * 7 + 1);
		CHECK(gettid() == ttid[i], "thread %d: tid %d, was %d", i, (int)gettid(), (int)ttid[i]);
		tcount[i]++;
		pause_ms(5);
	}
	return NULL;
}

static void threads_setup(void)
{
	for (int i = 0; i < NT; i++) {
		pthread_t t;
		CHECK(pthread_create(&t, NULL, counter_thread, (void *)(long)i) == 0, "pthread_create");
	}
	while (!ttid[NT - 1] || !ttid[0] || !ttid[1])
		pause_ms(1);
}

static void threads_check(unsigned long n)
{
	(void)n;
	for (int i = 0; i < NT; i++) {
		if (tcount[i] == tlast[i])
			CHECK(++tstall[i] < 10, "thread %d has not counted for 10 rounds (stuck at %lu)", i, tcount[i]);
		else
			tstall[i] = 0;
		tlast[i] = tcount[i];
	}
	CHECK(atoi(proc_field(0, "Threads")) == NT + 1, "%s threads, want %d", proc_field(0, "Threads"), NT + 1);
}

/* session: a child leads a session of its own, with a grandchild in it. */
static pid_t kid, grandkid, mysid, mypgrp;

static void session_setup(void)
{
	int p[2];
	SYS(pipe(p));
	mysid = getsid(0);
	mypgrp = getpgrp();
	kid = SYS(fork());
	if (kid == 0) {
		SYS(setsid());
		pid_t me = getpid();
		pid_t g = SYS(fork());
		if (g == 0) {
			for (;;) {
				CHECK(getsid(0) == me, "grandchild: sid %d, want %d", (int)getsid(0), (int)me);
				CHECK(getpgrp() == me, "grandchild: pgrp %d, want %d", (int)getpgrp(), (int)me);
				pause_ms(50);
			}
		}
		SYS(write(p[1], &g, sizeof g));
		for (;;) {
			CHECK(getsid(0) == me && getpgrp() == me, "session leader: sid %d pgrp %d, want %d", (int)getsid(0),
			      (int)getpgrp(), (int)me);
			alive(g, "grandchild");
			pause_ms(50);
		}
	}
	CHECK(read(p[0], &grandkid, sizeof grandkid) == sizeof grandkid, "reading the grandchild's pid");
}

static void session_check(unsigned long n)
{
	(void)n;
	alive(kid, "session leader");
	CHECK(getsid(kid) == kid, "child sid %d, want %d", (int)getsid(kid), (int)kid);
	CHECK(getpgid(kid) == kid, "child pgid %d, want %d", (int)getpgid(kid), (int)kid);
	CHECK(getsid(grandkid) == kid, "grandchild sid %d, want %d", (int)getsid(grandkid), (int)kid);
	CHECK(getsid(0) == mysid && getpgrp() == mypgrp, "own sid/pgrp %d/%d, was %d/%d", (int)getsid(0), (int)getpgrp(),
	      (int)mysid, (int)mypgrp);
}

/* pgrp: two children in a process group led by the first. */
static pid_t ga, gb;

static void member(pid_t leader)
{
	for (;;) {
		CHECK(getpgrp() == leader, "member: pgrp %d, want %d", (int)getpgrp(), (int)leader);
		pause_ms(50);
	}
}

static void pgrp_setup(void)
{
	mypgrp = getpgrp();
	ga = SYS(fork());
	if (ga == 0) {
		setpgid(0, 0);
		member(getpid());
	}
	setpgid(ga, ga);
	gb = SYS(fork());
	if (gb == 0) {
		setpgid(0, ga);
		member(ga);
	}
	setpgid(gb, ga);
}

static void pgrp_check(unsigned long n)
{
	(void)n;
	alive(ga, "group leader");
	alive(gb, "group member");
	CHECK(getpgid(ga) == ga && getpgid(gb) == ga, "pgids %d %d, want %d", (int)getpgid(ga), (int)getpgid(gb), (int)ga);
	CHECK(getpgrp() == mypgrp, "own pgrp %d, was %d", (int)getpgrp(), (int)mypgrp);
	CHECK(kill(-ga, 0) == 0, "kill(-%d, 0): %s", (int)ga, strerror(errno));
}

/* zombie: a child that exited with status 7, never reaped. */
static pid_t zombie;

static void zombie_setup(void)
{
	zombie = SYS(fork());
	if (zombie == 0)
		_exit(7);
	while (proc_state(zombie, NULL) != 'Z')
		pause_ms(1);
}

static void zombie_check(unsigned long n)
{
	(void)n;
	siginfo_t si;
	memset(&si, 0, sizeof si);
	SYS(waitid(P_PID, zombie, &si, WEXITED | WNOHANG | WNOWAIT));
	CHECK(si.si_pid == zombie && si.si_code == CLD_EXITED && si.si_status == 7,
	      "zombie %d: waitid gives pid %d code %d status %d, want exited with 7", (int)zombie, (int)si.si_pid, si.si_code,
	      si.si_status);
	char st = proc_state(zombie, NULL);
	CHECK(st == 'Z', "zombie %d is in state %c", (int)zombie, st);
}

/* orphan: a grandchild whose parent exited, reparented to the reaper. */
static pid_t orphan;

static void orphan_setup(void)
{
	int p[2];
	SYS(pipe(p));
	pid_t mid = SYS(fork());
	if (mid == 0) {
		pid_t me = getpid();
		pid_t g = SYS(fork());
		if (g == 0) {
			while (getppid() == me)
				pause_ms(1);
			pid_t r = getppid();
			SYS(write(p[1], &r, sizeof r));
			for (;;) {
				CHECK(getppid() == r, "orphan: parent %d, was %d", (int)getppid(), (int)r);
				pause_ms(50);
			}
		}
		SYS(write(p[1], &g, sizeof g));
		_exit(0);
	}
	pid_t reaper;
	CHECK(read(p[0], &orphan, sizeof orphan) == sizeof orphan, "reading the orphan's pid");
	SYS(waitpid(mid, NULL, 0));
	CHECK(read(p[0], &reaper, sizeof reaper) == sizeof reaper, "reading the orphan's new parent");
	CHECK(reaper != getpid(), "the orphan was reparented to us");
}

static void orphan_check(unsigned long n)
{
	(void)n;
	CHECK(kill(orphan, 0) == 0, "orphan %d: %s", (int)orphan, strerror(errno));
	CHECK(waitpid(-1, NULL, WNOHANG) <= 0, "a child of ours ended");
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"threads", threads_setup, threads_check}, {"session", session_setup, session_check},
	    {"pgrp", pgrp_setup, pgrp_check},          {"zombie", zombie_setup, zombie_check},
	    {"orphan", orphan_setup, orphan_check},    {0},
	};
	return conform_main(argc, argv, modes);
}
