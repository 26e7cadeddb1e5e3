/* creds: credentials (groups, gids, capability bounding set, no_new_privs,
 * another uid), resource limits, cwd and umask, the task's name. */
#include "conform.h"
#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <linux/capability.h>

/* groups: root with supplementary groups. (Other gids as well make CRIU
 * need CAP_SYS_RESOURCE: see uid.) */
static gid_t groups[3] = {4, 24, 27};

static void groups_setup(void) { SYS(setgroups(3, groups)); }

static void groups_check(unsigned long n)
{
	(void)n;
	gid_t g[8];
	int k = SYS(getgroups(8, g));
	CHECK(k == 3 && !memcmp(g, groups, sizeof groups), "%d supplementary groups", k);
}

/* prctl: CAP_SYS_BOOT dropped from the bounding set, no_new_privs set, a
 * name of its own. */
static void prctl_setup(void)
{
	SYS(prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0));
	SYS(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0));
	SYS(prctl(PR_SET_NAME, "conform-creds", 0, 0, 0));
}

static void prctl_check(unsigned long n)
{
	(void)n;
	CHECK(prctl(PR_CAPBSET_READ, CAP_SYS_BOOT, 0, 0, 0) == 0, "CAP_SYS_BOOT is back in the bounding set");
	CHECK(prctl(PR_CAPBSET_READ, CAP_SYS_ADMIN, 0, 0, 0) == 1, "CAP_SYS_ADMIN left the bounding set");
	CHECK(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1, "no_new_privs is off");
	char name[17] = {0};
	SYS(prctl(PR_GET_NAME, name, 0, 0, 0));
	CHECK(!strcmp(name, "conform-creds"), "the task is named %s", name);
}

/* uid: a task that dropped root for uid and gid 1000. */
static void uid_setup(void)
{
	SYS(setgroups(0, NULL));
	SYS(setresgid(1000, 1000, 1000));
	SYS(setresuid(1000, 1000, 1000));
}

static void uid_check(unsigned long n)
{
	(void)n;
	uid_t r, e, s;
	SYS(getresuid(&r, &e, &s));
	CHECK(r == 1000 && e == 1000 && s == 1000, "uids %d %d %d, want 1000", (int)r, (int)e, (int)s);
	CHECK(getegid() == 1000, "egid %d", (int)getegid());
}

/* rlimits: lowered soft and hard limits. */
static const struct {
	int res;
	struct rlimit lim;
} lims[] = {
    {RLIMIT_NOFILE, {256, 512}},
    {RLIMIT_CORE, {0, 1 << 20}},
    {RLIMIT_STACK, {4 << 20, 16 << 20}},
    {RLIMIT_MEMLOCK, {64 << 10, 128 << 10}},
    {RLIMIT_NPROC, {1000, 2000}},
};

static void rlimits_setup(void)
{
	for (size_t i = 0; i < sizeof lims / sizeof lims[0]; i++)
		SYS(setrlimit(lims[i].res, &lims[i].lim));
}

static void rlimits_check(unsigned long n)
{
	(void)n;
	for (size_t i = 0; i < sizeof lims / sizeof lims[0]; i++) {
		struct rlimit l;
		SYS(getrlimit(lims[i].res, &l));
		CHECK(l.rlim_cur == lims[i].lim.rlim_cur && l.rlim_max == lims[i].lim.rlim_max, "limit %d is %llu/%llu, want %llu/%llu",
		      lims[i].res, (unsigned long long)l.rlim_cur, (unsigned long long)l.rlim_max,
		      (unsigned long long)lims[i].lim.rlim_cur, (unsigned long long)lims[i].lim.rlim_max);
	}
}

/* cwd-umask: working directory DIR/a/b, umask 027. */
static char want_cwd[4096];

static void cwd_setup(void)
{
	SYS(mkdir(path("a"), 0755));
	SYS(mkdir(path("a/b"), 0755));
	SYS(chdir(path("a/b")));
	CHECK(getcwd(want_cwd, sizeof want_cwd), "getcwd");
	umask(027);
}

static void cwd_check(unsigned long n)
{
	char cwd[4096];
	CHECK(getcwd(cwd, sizeof cwd) && !strcmp(cwd, want_cwd), "cwd is %s, want %s", cwd, want_cwd);
	CHECK(!strcmp(proc_field(0, "Umask"), "0027"), "umask %s, want 0027", proc_field(0, "Umask"));
	char name[32];
	snprintf(name, sizeof name, "f%lu", n % 4);
	unlink(name);
	close(SYS(open(name, O_CREAT | O_WRONLY, 0666)));
	struct stat st;
	SYS(stat(name, &st));
	CHECK((st.st_mode & 0777) == 0640, "a new file has mode %o, want 640", st.st_mode & 0777);
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"groups", groups_setup, groups_check},
	    {"prctl", prctl_setup, prctl_check},
	    {"uid", uid_setup, uid_check},
	    {"rlimits", rlimits_setup, rlimits_check},
	    {"cwd-umask", cwd_setup, cwd_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
