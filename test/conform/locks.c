/* locks: POSIX record locks, flock(2) locks and OFD locks (checkpointed
 * with --file-locks). A checker with a file description of its own must
 * find each lock in place. */
#include "conform.h"
#include <sys/file.h>

static int fd;
static pid_t checker;

static void make_file(void)
{
	fd = SYS(open(path("locked"), O_RDWR | O_CREAT, 0600));
	char buf[4096] = {0};
	SYS(write(fd, buf, sizeof buf));
}

/* getlk asks (with cmd F_GETLK or F_OFD_GETLK) who holds [start, start+100). */
static struct flock getlk(int f, int cmd, off_t start)
{
	struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = 100};
	SYS(fcntl(f, cmd, &l));
	return l;
}

/* posix: a write lock on [0,100) and a read lock on [200,300); a child
 * checks them with F_GETLK. */
static void posix_setup(void)
{
	make_file();
	struct flock w = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
	struct flock r = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 200, .l_len = 100};
	SYS(fcntl(fd, F_SETLK, &w));
	SYS(fcntl(fd, F_SETLK, &r));
	pid_t parent = getpid();
	checker = SYS(fork());
	if (checker == 0) {
		int mine = SYS(open(path("locked"), O_RDWR));
		for (;;) {
			struct flock l = getlk(mine, F_GETLK, 0);
			CHECK(l.l_type == F_WRLCK && l.l_pid == parent && l.l_start == 0 && l.l_len == 100,
			      "[0,100): lock type %d pid %d start %lld len %lld, want a write lock of %d", l.l_type, (int)l.l_pid,
			      (long long)l.l_start, (long long)l.l_len, (int)parent);
			l = getlk(mine, F_GETLK, 200);
			CHECK(l.l_type == F_RDLCK && l.l_pid == parent, "[200,300): lock type %d pid %d, want a read lock", l.l_type, (int)l.l_pid);
			l = getlk(mine, F_GETLK, 400);
			CHECK(l.l_type == F_UNLCK, "[400,500) is locked (type %d)", l.l_type);
			pause_ms(50);
		}
	}
}

static void checker_alive(unsigned long n) { (void)n, alive(checker, "lock checker"); }

/* flock: an exclusive flock on one file, a shared one on another; a
 * child's own descriptions can take the shared but not the exclusive. */
static void flock_setup(void)
{
	make_file();
	int sh = SYS(open(path("shared"), O_RDWR | O_CREAT, 0600));
	SYS(flock(fd, LOCK_EX | LOCK_NB));
	SYS(flock(sh, LOCK_SH | LOCK_NB));
	checker = SYS(fork());
	if (checker == 0) {
		int mine = SYS(open(path("locked"), O_RDWR)), mysh = SYS(open(path("shared"), O_RDWR));
		for (;;) {
			CHECK(flock(mine, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK, "the exclusive flock is gone");
			CHECK(flock(mysh, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK, "the shared flock is gone");
			SYS(flock(mysh, LOCK_SH | LOCK_NB));
			SYS(flock(mysh, LOCK_UN));
			pause_ms(50);
		}
	}
}

/* ofd: an OFD write lock on [0,100); a second description of ours must
 * conflict with it (an OFD lock belongs to the description). */
static int other;

static void ofd_setup(void)
{
	make_file();
	struct flock w = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
	SYS(fcntl(fd, F_OFD_SETLK, &w));
	other = SYS(open(path("locked"), O_RDWR));
}

static void ofd_check(unsigned long n)
{
	(void)n;
	struct flock l = getlk(other, F_OFD_GETLK, 0);
	CHECK(l.l_type == F_WRLCK && l.l_pid == -1 && l.l_start == 0 && l.l_len == 100, "OFD lock: type %d pid %d start %lld len %lld",
	      l.l_type, (int)l.l_pid, (long long)l.l_start, (long long)l.l_len);
	l = getlk(fd, F_OFD_GETLK, 0);
	CHECK(l.l_type == F_UNLCK, "the lock's own description conflicts with it");
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"posix", posix_setup, checker_alive},
	    {"flock", flock_setup, checker_alive},
	    {"ofd", ofd_setup, ofd_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
