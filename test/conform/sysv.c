/* sysv: SysV shared memory, semaphores and message queues (in the job's
 * own IPC namespace). */
#include "conform.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>

/* shm: a 1 MiB private segment shared with a child that counts in it, a
 * keyed 64 KiB segment, and a detached segment that holds data. */
#define SHMSZ (1 << 20)
static int shm1, shm2, shm3;
static volatile uint32_t *seg;
static pid_t shmkid;
static uint32_t shm_last;
static int shm_stall;

static void shm_setup(void)
{
	shm1 = SYS(shmget(IPC_PRIVATE, SHMSZ, IPC_CREAT | 0600));
	shm2 = SYS(shmget(0x7e57, 64 * 1024, IPC_CREAT | 0640));
	shm3 = SYS(shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
	seg = shmat(shm1, NULL, 0);
	CHECK(seg != (void *)-1, "shmat");
	for (int i = 1; i < SHMSZ / 4; i++)
		seg[i] = i * 2654435761u;
	char *p3 = shmat(shm3, NULL, 0);
	CHECK(p3 != (void *)-1, "shmat");
	strcpy(p3, "detached but kept");
	SYS(shmdt(p3));
	shmkid = SYS(fork());
	if (shmkid == 0)
		for (;;) {
			seg[0]++;
			pause_ms(5);
		}
}

static void shm_check(unsigned long n)
{
	(void)n;
	alive(shmkid, "child counting in the segment");
	if (seg[0] == shm_last)
		CHECK(++shm_stall < 10, "the child's count in shared memory stopped at %u", seg[0]);
	else
		shm_stall = 0;
	shm_last = seg[0];
	for (int i = 1; i < SHMSZ / 4; i += 97)
		CHECK(seg[i] == i * 2654435761u, "segment word %d changed", i);
	struct shmid_ds ds;
	SYS(shmctl(shm1, IPC_STAT, &ds));
	CHECK(ds.shm_segsz == SHMSZ && ds.shm_nattch == 2 && (ds.shm_perm.mode & 0777) == 0600, "segment: %zu bytes, %lu attached, mode %o",
	      ds.shm_segsz, (unsigned long)ds.shm_nattch, ds.shm_perm.mode & 0777);
	CHECK(shmget(0x7e57, 0, 0) == shm2, "key 0x7e57 gives segment %d, want %d", shmget(0x7e57, 0, 0), shm2);
	char *p3 = shmat(shm3, NULL, SHM_RDONLY);
	CHECK(p3 != (void *)-1, "shmat the detached segment: %s", strerror(errno));
	CHECK(!strcmp(p3, "detached but kept"), "the detached segment holds %.20s", p3);
	SYS(shmdt(p3));
}

/* sem: a keyed set of 3 semaphores; rounds change them by known steps. */
static int semid;
static unsigned short semv[3] = {1, 5, 9};

static void sem_setup(void)
{
	semid = SYS(semget(0x5e11, 3, IPC_CREAT | 0600));
	SYS(semctl(semid, 0, SETALL, semv));
}

static void sem_check(unsigned long n)
{
	struct sembuf ops[2] = {{0, 1, 0}, {1, n % 2 ? -1 : 1, 0}};
	SYS(semop(semid, ops, 2));
	semv[0]++;
	semv[1] += n % 2 ? -1 : 1;
	unsigned short have[3];
	SYS(semctl(semid, 0, GETALL, have));
	CHECK(!memcmp(have, semv, sizeof have), "semaphores %u %u %u, want %u %u %u", have[0], have[1], have[2], semv[0], semv[1], semv[2]);
	CHECK(semget(0x5e11, 0, 0) == semid, "key 0x5e11 names another set");
}

/* msg: a keyed queue holding 6 messages of types 1-3; each round takes the
 * oldest and sends one more. */
static int q;
static long qsent, qgot;
struct qmsg {
	long type;
	char text[64];
};

static void qsend(void)
{
	struct qmsg m = {.type = qsent % 3 + 1};
	int len = snprintf(m.text, sizeof m.text, "message %ld", qsent);
	SYS(msgsnd(q, &m, len + 1, IPC_NOWAIT));
	qsent++;
}

static void msg_setup(void)
{
	q = SYS(msgget(0x3e55, IPC_CREAT | 0600));
	for (int i = 0; i < 6; i++)
		qsend();
}

static void msg_check(unsigned long n)
{
	(void)n;
	struct qmsg m;
	char want[64];
	snprintf(want, sizeof want, "message %ld", qgot);
	ssize_t r = msgrcv(q, &m, sizeof m.text, 0, IPC_NOWAIT);
	CHECK(r > 0 && m.type == qgot % 3 + 1 && !strcmp(m.text, want), "message %ld: %zd bytes, type %ld, %.20s", qgot, r, m.type, m.text);
	qgot++;
	qsend();
	struct msqid_ds ds;
	SYS(msgctl(q, IPC_STAT, &ds));
	CHECK(ds.msg_qnum == 6, "%lu messages queued, want 6", (unsigned long)ds.msg_qnum);
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"shm", shm_setup, shm_check},
	    {"sem", sem_setup, sem_check},
	    {"msg", msg_setup, msg_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
