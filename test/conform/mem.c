/* mem: private and shared anonymous memory, private and shared file
 * mappings, mprotect, copy-on-write after fork, a large and a sparse
 * mapping. */
#include "conform.h"
#include <setjmp.h>
#include <sys/mman.h>

#define PG 4096
static uint32_t word(size_t page, uint32_t gen) { return (uint32_t)(page * 2654435761u) ^ (gen * 40503u) ^ 0x5a5a5a5a; }

static void *map(size_t len, int prot, int flags, int fd)
{
	void *p = mmap(NULL, len, prot, flags, fd, 0);
	CHECK(p != MAP_FAILED, "mmap %zu: %s", len, strerror(errno));
	return p;
}

/* A region of pages whose first and middle words follow word(page, gen):
 * rounds bump one page's generation. */
struct region {
	char *p;
	size_t pages;
	uint32_t *gen;
};

static void rfill(struct region *r)
{
	r->gen = calloc(r->pages, 4);
	for (size_t i = 0; i < r->pages; i++)
		((uint32_t *)(r->p + i * PG))[0] = ((uint32_t *)(r->p + i * PG))[512] = word(i, 0);
}

static void rbump(struct region *r, size_t i)
{
	r->gen[i]++;
	((uint32_t *)(r->p + i * PG))[0] = ((uint32_t *)(r->p + i * PG))[512] = word(i, r->gen[i]);
}

static void rcheck(struct region *r, const char *what)
{
	for (size_t i = 0; i < r->pages; i++) {
		uint32_t *w = (uint32_t *)(r->p + i * PG);
		CHECK(w[0] == word(i, r->gen[i]) && w[512] == word(i, r->gen[i]), "%s: page %zu holds %#x, want %#x", what, i, w[0],
		      word(i, r->gen[i]));
	}
}

/* anon-private: 8 MiB of private anonymous memory. large: 64 MiB. */
static struct region reg;

static void anon_private_setup(void)
{
	reg.pages = 2048;
	reg.p = map(reg.pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	rfill(&reg);
}

static void large_setup(void)
{
	reg.pages = 16384;
	reg.p = map(reg.pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	rfill(&reg);
}

static void region_check(unsigned long n)
{
	rcheck(&reg, "memory");
	rbump(&reg, (n * 7919) % reg.pages);
}

/* anon-shared: 1 MiB shared with a child, which counts in word 0 and
 * copies word 1 (ours) to word 2. */
static volatile uint32_t *sh;
static pid_t shkid;
static uint32_t sh_last;
static int sh_stall;

static void anon_shared_setup(void)
{
	sh = map(1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1);
	for (int i = 3; i < (1 << 18); i++)
		sh[i] = word(i, 1);
	shkid = SYS(fork());
	if (shkid == 0)
		for (;;) {
			sh[0]++;
			sh[2] = sh[1];
			pause_ms(5);
		}
}

static void anon_shared_check(unsigned long n)
{
	alive(shkid, "child sharing the mapping");
	if (sh[0] == sh_last)
		CHECK(++sh_stall < 10, "the child's count in the shared mapping stopped at %u", sh[0]);
	else
		sh_stall = 0;
	sh_last = sh[0];
	CHECK(n < 10 || sh[2] >= sh[1] - 5, "the child copies %u, we wrote %u: the mapping is not shared", sh[2], sh[1]);
	sh[1] = n;
	for (int i = 3; i < (1 << 18); i += 101)
		CHECK(sh[i] == word(i, 1), "shared word %d changed", i);
}

/* file-private: a 1 MiB file mapped private; rounds write to pages of the
 * map, which must not reach the file. file-shared: mapped shared; writes
 * through the map reach the file and writes to the file reach the map. */
static int mfd, shared_map;
static struct region freg;

static void file_setup(int shared)
{
	shared_map = shared;
	mfd = SYS(open(path("mapped"), O_RDWR | O_CREAT | O_TRUNC, 0600));
	freg.pages = 256;
	SYS(ftruncate(mfd, freg.pages * PG));
	freg.p = map(freg.pages * PG, PROT_READ | PROT_WRITE, MAP_SHARED, mfd);
	rfill(&freg);
	SYS(msync(freg.p, freg.pages * PG, MS_SYNC));
	if (!shared) {
		SYS(munmap(freg.p, freg.pages * PG));
		freg.p = map(freg.pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd);
	}
}

static void file_private_setup(void) { file_setup(0); }
static void file_shared_setup(void) { file_setup(1); }

static void file_check(unsigned long n)
{
	rcheck(&freg, "file mapping");
	size_t i = n % freg.pages;
	rbump(&freg, i);
	uint32_t v;
	CHECK(pread(mfd, &v, 4, i * PG) == 4, "pread");
	if (shared_map) {
		CHECK(v == word(i, freg.gen[i]), "a write through the shared map did not reach the file");
		size_t j = (i + 128) % freg.pages;
		freg.gen[j]++;
		uint32_t w = word(j, freg.gen[j]);
		SYS(pwrite(mfd, &w, 4, j * PG));
		SYS(pwrite(mfd, &w, 4, j * PG + 2048));
	} else {
		CHECK(v == word(i, 0), "a write to the private map reached the file");
	}
}

/* mprotect: four pages, read-write, read-only, none, read-write, split
 * into mappings of their own; writing to the read-only page and reading
 * the inaccessible one must fault. */
static char *pp;
static sigjmp_buf jb;
static volatile int faults;

static void on_segv(int sig)
{
	(void)sig;
	faults++;
	siglongjmp(jb, 1);
}

static void mprotect_setup(void)
{
	pp = map(4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	memset(pp, 0x11, 4 * PG);
	SYS(mprotect(pp + PG, PG, PROT_READ));
	SYS(mprotect(pp + 2 * PG, PG, PROT_NONE));
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_segv;
	sa.sa_flags = SA_NODEFER;
	SYS(sigaction(SIGSEGV, &sa, NULL));
}

static const char *perms(char *addr)
{
	static char line[512], p[8];
	FILE *f = fopen("/proc/self/maps", "r");
	CHECK(f, "open maps");
	p[0] = 0;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx %4s", &lo, &hi, p) == 3 && (unsigned long)addr >= lo && (unsigned long)addr < hi)
			break;
		p[0] = 0;
	}
	fclose(f);
	return p;
}

static void mprotect_check(unsigned long n)
{
	CHECK(!strcmp(perms(pp), "rw-p") && !strcmp(perms(pp + PG), "r--p") && !strcmp(perms(pp + 2 * PG), "---p") &&
	          !strcmp(perms(pp + 3 * PG), "rw-p"),
	      "protections %s %s %s %s", perms(pp), perms(pp + PG), perms(pp + 2 * PG), perms(pp + 3 * PG));
	CHECK(pp[PG + 5] == 0x11 && pp[3 * PG + 5] == 0x11, "protected pages lost their data");
	pp[(n % 2) * 3 * PG] = 0x11;
	int before = faults;
	if (!sigsetjmp(jb, 1))
		((volatile char *)pp)[PG] = 1;
	if (!sigsetjmp(jb, 1))
		(void)((volatile char *)pp)[2 * PG];
	CHECK(faults == before + 2, "%d of 2 accesses faulted", faults - before);
}

/* cow: 4 MiB private memory filled before a fork; afterwards the parent
 * rewrites the first half, the child the second; each must see its own
 * writes and the original elsewhere. */
static struct region cow;
static pid_t cowkid;

static void cow_verify(int child)
{
	for (size_t i = 0; i < cow.pages; i++) {
		int mine = child ? i >= cow.pages / 2 : i < cow.pages / 2;
		uint32_t want = word(i, mine ? (child ? 1000 : 2000) : 0);
		CHECK(((uint32_t *)(cow.p + i * PG))[0] == want, "%s: page %zu holds %#x, want %#x", child ? "child" : "parent", i,
		      ((uint32_t *)(cow.p + i * PG))[0], want);
	}
}

static void cow_write(int child)
{
	for (size_t i = child ? cow.pages / 2 : 0; i < (child ? cow.pages : cow.pages / 2); i++)
		((uint32_t *)(cow.p + i * PG))[0] = word(i, child ? 1000 : 2000);
}

static void cow_setup(void)
{
	cow.pages = 1024;
	cow.p = map(cow.pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
	rfill(&cow);
	cowkid = SYS(fork());
	if (cowkid == 0) {
		cow_write(1);
		for (;;) {
			cow_verify(1);
			pause_ms(50);
		}
	}
	cow_write(0);
}

static void cow_check(unsigned long n)
{
	(void)n;
	alive(cowkid, "child sharing pages copy-on-write");
	cow_verify(0);
}

/* sparse: 1 GiB reserved, one page touched every 64 MiB. */
#define SPARSE (1UL << 30)
static char *sp;

static void sparse_setup(void)
{
	sp = map(SPARSE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);
	for (unsigned long o = 0; o < SPARSE; o += 64UL << 20)
		*(uint32_t *)(sp + o) = word(o / PG, 3);
}

static void sparse_check(unsigned long n)
{
	for (unsigned long o = 0; o < SPARSE; o += 64UL << 20) {
		CHECK(*(uint32_t *)(sp + o) == word(o / PG, 3), "touched page at %lu MiB changed", o >> 20);
		CHECK(*(uint32_t *)(sp + o + (32UL << 20) + (n % 16) * PG) == 0, "an untouched page is not zero");
	}
	long rss = atol(proc_field(0, "VmRSS"));
	CHECK(rss < 256 * 1024, "RSS %ld kB: the untouched part was filled in", rss);
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"anon-private", anon_private_setup, region_check},
	    {"anon-shared", anon_shared_setup, anon_shared_check},
	    {"file-private", file_private_setup, file_check},
	    {"file-shared", file_shared_setup, file_check},
	    {"mprotect", mprotect_setup, mprotect_check},
	    {"cow", cow_setup, cow_check},
	    {"large", large_setup, region_check},
	    {"sparse", sparse_setup, sparse_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
