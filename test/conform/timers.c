/* timers: interval timers, POSIX timers, timerfd. */
#include "conform.h"
#include <sys/time.h>
#include <sys/timerfd.h>

/* advancing fails when *count has not moved for 10 rounds (500 ms) while a
 * 10 ms timer should have moved it 50 times. */
static void advancing(const char *what, unsigned long count, unsigned long *last, int *stall)
{
	if (count == *last)
		CHECK(++*stall < 10, "%s has not fired for 10 rounds (at %lu)", what, count);
	else
		*stall = 0;
	*last = count;
}

static int near_ms(struct timespec ts, long ms) { return labs(ts.tv_sec * 1000 + ts.tv_nsec / 1000000 - ms) <= 1; }

/* itimer: ITIMER_REAL every 10 ms counting in a SIGALRM handler; a
 * 1000 s ITIMER_VIRTUAL and ITIMER_PROF that must stay armed. */
static volatile unsigned long alarms;
static unsigned long alarms_last;
static int alarms_stall;

static void on_alarm(int sig) { (void)sig, alarms++; }

static void itimer_setup(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	SYS(sigaction(SIGALRM, &sa, NULL));
	struct itimerval real = {{0, 10000}, {0, 10000}}, slow = {{1000, 0}, {1000, 0}};
	SYS(setitimer(ITIMER_REAL, &real, NULL));
	SYS(setitimer(ITIMER_VIRTUAL, &slow, NULL));
	SYS(setitimer(ITIMER_PROF, &slow, NULL));
}

static void itimer_check(unsigned long n)
{
	(void)n;
	struct itimerval v;
	SYS(getitimer(ITIMER_REAL, &v));
	CHECK(v.it_interval.tv_sec == 0 && labs(v.it_interval.tv_usec - 10000) < 1000, "ITIMER_REAL interval %ld.%06ld",
	      (long)v.it_interval.tv_sec, (long)v.it_interval.tv_usec);
	for (int w = ITIMER_VIRTUAL; w <= ITIMER_PROF; w++) {
		SYS(getitimer(w, &v));
		CHECK(v.it_interval.tv_sec == 1000 && v.it_value.tv_sec > 0 && v.it_value.tv_sec <= 1000,
		      "itimer %d: interval %ld value %ld, want 1000 and armed", w, (long)v.it_interval.tv_sec, (long)v.it_value.tv_sec);
	}
	advancing("ITIMER_REAL", alarms, &alarms_last, &alarms_stall);
}

/* posix: a 10 ms CLOCK_MONOTONIC timer signalling SIGRTMIN+2 with value
 * 77, a one-shot CLOCK_REALTIME timer 1000 s away, a SIGEV_NONE 1 s
 * CLOCK_BOOTTIME timer. */
static timer_t t1, t2, t3;
static volatile unsigned long fired;
static volatile int bad_fire;
static unsigned long fired_last;
static int fired_stall;

static void on_timer(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig != SIGRTMIN + 2 || si->si_code != SI_TIMER || si->si_value.sival_int != 77)
		bad_fire = 1;
	fired++;
}

static timer_t mktimer(clockid_t clk, int notify, int sig, int val, long interval_ms, long value_ms)
{
	struct sigevent sev;
	memset(&sev, 0, sizeof sev);
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = val;
	timer_t t;
	SYS(timer_create(clk, &sev, &t));
	struct itimerspec its = {{interval_ms / 1000, (interval_ms % 1000) * 1000000}, {value_ms / 1000, (value_ms % 1000) * 1000000}};
	SYS(timer_settime(t, 0, &its, NULL));
	return t;
}

static void posix_setup(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_timer;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	SYS(sigaction(SIGRTMIN + 2, &sa, NULL));
	t1 = mktimer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 2, 77, 10, 10);
	t2 = mktimer(CLOCK_REALTIME, SIGEV_SIGNAL, SIGRTMIN + 3, 88, 0, 1000000);
	t3 = mktimer(CLOCK_BOOTTIME, SIGEV_NONE, 0, 0, 1000, 1000);
}

static void posix_check(unsigned long n)
{
	(void)n;
	struct itimerspec its;
	SYS(timer_gettime(t1, &its));
	CHECK(near_ms(its.it_interval, 10), "timer 1 interval %ld.%09ld", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
	SYS(timer_gettime(t2, &its));
	CHECK(its.it_interval.tv_sec == 0 && its.it_interval.tv_nsec == 0 && its.it_value.tv_sec > 0 && its.it_value.tv_sec <= 1000,
	      "timer 2: interval %ld value %ld, want a one-shot 1000 s away", (long)its.it_interval.tv_sec, (long)its.it_value.tv_sec);
	SYS(timer_gettime(t3, &its));
	CHECK(near_ms(its.it_interval, 1000) && (its.it_value.tv_sec > 0 || its.it_value.tv_nsec > 0),
	      "timer 3: interval %ld.%09ld", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
	CHECK(!bad_fire, "timer 1 signalled with the wrong signal, code or value");
	advancing("timer 1", fired, &fired_last, &fired_stall);
}

/* timerfd: a 10 ms CLOCK_MONOTONIC timerfd read as it expires, and a
 * one-shot CLOCK_REALTIME one 1000 s away. */
static int tf1, tf2;

static char *fdinfo_clock(void)
{
	static char buf[1024];
	char fn[64];
	snprintf(fn, sizeof fn, "/proc/self/fdinfo/%d", tf1);
	int fd = open(fn, O_RDONLY);
	ssize_t r = read(fd, buf, sizeof buf - 1);
	close(fd);
	buf[r > 0 ? r : 0] = 0;
	return buf;
}
static unsigned long expirations, exp_last;
static int exp_stall;

static void timerfd_setup(void)
{
	tf1 = SYS(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK));
	tf2 = SYS(timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK));
	struct itimerspec fast = {{0, 10000000}, {0, 10000000}}, far = {{0, 0}, {1000, 0}};
	SYS(timerfd_settime(tf1, 0, &fast, NULL));
	SYS(timerfd_settime(tf2, 0, &far, NULL));
}

static void timerfd_check(unsigned long n)
{
	(void)n;
	uint64_t v;
	ssize_t r = read(tf1, &v, sizeof v);
	if (r == sizeof v)
		expirations += v;
	else
		CHECK(errno == EAGAIN, "read timerfd: %s", strerror(errno));
	struct itimerspec its;
	SYS(timerfd_gettime(tf1, &its));
	if (expirations == exp_last && exp_stall == 8)
		dprintf(1, "timerfd stalled: value %ld.%09ld interval %ld.%09ld, fdinfo clockid %s", (long)its.it_value.tv_sec,
			its.it_value.tv_nsec, (long)its.it_interval.tv_sec, its.it_interval.tv_nsec, fdinfo_clock());
	advancing("timerfd", expirations, &exp_last, &exp_stall);
	CHECK(near_ms(its.it_interval, 10), "timerfd interval %ld.%09ld", (long)its.it_interval.tv_sec, its.it_interval.tv_nsec);
	SYS(timerfd_gettime(tf2, &its));
	CHECK(its.it_value.tv_sec > 0 && its.it_value.tv_sec <= 1000 && its.it_interval.tv_sec == 0,
	      "one-shot timerfd: value %ld, want armed, <= 1000 s", (long)its.it_value.tv_sec);
	CHECK(read(tf2, &v, sizeof v) < 0 && errno == EAGAIN, "the one-shot timerfd expired early");
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"itimer", itimer_setup, itimer_check},
	    {"posix", posix_setup, posix_check},
	    {"timerfd", timerfd_setup, timerfd_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
