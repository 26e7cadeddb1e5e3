/* sockets: unix stream/dgram/seqpacket socketpairs, unix listeners and
 * unconnected sockets, TCP (listening and established), UDP, IPv6. Only
 * loopback. */
#include "conform.h"
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

/* A connection (a socket pair, or two ends of a TCP connection) keeps 8
 * messages in flight each way; message k is 16+k%50 bytes starting with k.
 * Each round takes one from each direction and sends the next. */
struct duplex {
	int a, b, stream;
	uint64_t sent[2], got[2];
};

static size_t msg(uint64_t k, char *buf)
{
	size_t len = 16 + k % 50;
	for (size_t i = 0; i < len; i++)
		buf[i] = (char)(k * 31 + i);
	memcpy(buf, &k, 8);
	return len;
}

static void dsend(struct duplex *d, int dir)
{
	char buf[128];
	size_t len = msg(d->sent[dir], buf);
	ssize_t r = send(dir ? d->b : d->a, buf, len, MSG_NOSIGNAL);
	CHECK(r == (ssize_t)len, "send message %llu: %zd %s", (unsigned long long)d->sent[dir], r, strerror(errno));
	d->sent[dir]++;
}

static void drecv(struct duplex *d, int dir)
{
	char want[128], buf[256];
	size_t len = msg(d->got[dir], want);
	int fd = dir ? d->a : d->b;
	struct pollfd p = {.fd = fd, .events = POLLIN};
	CHECK(poll(&p, 1, 2000) == 1, "message %llu never came", (unsigned long long)d->got[dir]);
	ssize_t r = recv(fd, buf, d->stream ? len : sizeof buf, d->stream ? MSG_WAITALL : 0);
	CHECK(r == (ssize_t)len && !memcmp(buf, want, len), "message %llu: %zd bytes, want %zu, %s", (unsigned long long)d->got[dir], r,
	      len, r == (ssize_t)len ? "content differs" : "length differs");
	d->got[dir]++;
}

static void dfill(struct duplex *d)
{
	for (int i = 0; i < 8; i++)
		dsend(d, 0), dsend(d, 1);
}

static void dround(struct duplex *d)
{
	drecv(d, 0), drecv(d, 1);
	dsend(d, 0), dsend(d, 1);
}

static struct duplex pair;

static void pair_of(int type)
{
	int sv[2];
	SYS(socketpair(AF_UNIX, type, 0, sv));
	pair = (struct duplex){.a = sv[0], .b = sv[1], .stream = type == SOCK_STREAM};
	dfill(&pair);
}

static void stream_setup(void) { pair_of(SOCK_STREAM); }
static void dgram_setup(void) { pair_of(SOCK_DGRAM); }
static void seqpacket_setup(void) { pair_of(SOCK_SEQPACKET); }
static void pair_check(unsigned long n) { (void)n, dround(&pair); }

/* serve_pending accepts whatever waits on listener ls (the test dials it
 * after the restore) and greets it with "hello N". */
static void serve_pending(int ls, unsigned long n)
{
	int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
	if (c < 0) {
		CHECK(errno == EAGAIN, "accept: %s", strerror(errno));
		return;
	}
	dprintf(c, "hello %lu\n", n);
	close(c);
}

/* unix-listen: a listener bound to DIR/sock, one to an abstract name,
 * and an accepted connection with messages in flight. */
static int uls, uals;
static struct duplex uconn;

static int unix_listener(const char *name, int abstract)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	strncpy(a.sun_path + abstract, name, sizeof a.sun_path - 2);
	socklen_t len = offsetof(struct sockaddr_un, sun_path) + abstract + strlen(name) + !abstract;
	int s = SYS(socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0));
	SYS(bind(s, (struct sockaddr *)&a, len));
	SYS(listen(s, 8));
	if (!abstract) {
		int c = SYS(socket(AF_UNIX, SOCK_STREAM, 0));
		SYS(connect(c, (struct sockaddr *)&a, len));
		uconn = (struct duplex){.a = c, .b = SYS(accept(s, NULL, NULL)), .stream = 1};
		dfill(&uconn);
	}
	return s;
}

static void ulisten_setup(void)
{
	uls = unix_listener(path("sock"), 0);
	CHECK(arg3, "unix-listen needs an abstract name");
	uals = unix_listener(arg3, 1);
}

static void ulisten_check(unsigned long n)
{
	dround(&uconn);
	serve_pending(uls, n);
	serve_pending(uals, n);
}

/* unconnected: an unbound, unconnected stream socket; a datagram socket
 * bound to DIR/dgram that an unbound socket (sendto) and a connected one
 * send to, alternately, keeping 4 datagrams queued. */
static int lonely, dsrv, dto, dconn;
static struct sockaddr_un daddr = {.sun_family = AF_UNIX};
static uint64_t dsent, dgot;

static void dsend1(void)
{
	int fd = dsent % 2 ? dconn : dto;
	ssize_t r = sendto(fd, &dsent, 8, 0, dsent % 2 ? NULL : (struct sockaddr *)&daddr, dsent % 2 ? 0 : sizeof daddr);
	CHECK(r == 8, "send datagram %llu: %s", (unsigned long long)dsent, strerror(errno));
	dsent++;
}

static void unconnected_setup(void)
{
	lonely = SYS(socket(AF_UNIX, SOCK_STREAM, 0));
	strncpy(daddr.sun_path, path("dgram"), sizeof daddr.sun_path - 1);
	dsrv = SYS(socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK, 0));
	SYS(bind(dsrv, (struct sockaddr *)&daddr, sizeof daddr));
	dto = SYS(socket(AF_UNIX, SOCK_DGRAM, 0));
	dconn = SYS(socket(AF_UNIX, SOCK_DGRAM, 0));
	SYS(connect(dconn, (struct sockaddr *)&daddr, sizeof daddr));
	for (int i = 0; i < 4; i++)
		dsend1();
}

static void unconnected_check(unsigned long n)
{
	(void)n;
	int type;
	socklen_t l = sizeof type;
	SYS(getsockopt(lonely, SOL_SOCKET, SO_TYPE, &type, &l));
	CHECK(type == SOCK_STREAM, "the unconnected socket is of type %d", type);
	struct sockaddr_un a;
	l = sizeof a;
	SYS(getsockname(dsrv, (struct sockaddr *)&a, &l));
	CHECK(!strcmp(a.sun_path, daddr.sun_path), "bound to %s, want %s", a.sun_path, daddr.sun_path);
	uint64_t v;
	CHECK(recv(dsrv, &v, 8, 0) == 8, "datagram %llu: %s", (unsigned long long)dgot, strerror(errno));
	CHECK(v == dgot, "datagram %llu, want %llu", (unsigned long long)v, (unsigned long long)dgot);
	dgot++;
	dsend1();
}

/* tcp, tcp6: a listener on the loopback at port ARG and an established
 * connection to it, with messages in flight each way. */
static int tls;
static struct duplex tconn;

static void tcp_on(int family)
{
	CHECK(arg3, "tcp needs a port");
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof ss);
	socklen_t len;
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET, a->sin_port = htons(atoi(arg3));
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof *a;
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6, a->sin6_port = htons(atoi(arg3));
		a->sin6_addr = in6addr_loopback;
		len = sizeof *a;
	}
	tls = SYS(socket(family, SOCK_STREAM | SOCK_NONBLOCK, 0));
	int one = 1;
	SYS(setsockopt(tls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
	SYS(bind(tls, (struct sockaddr *)&ss, len));
	SYS(listen(tls, 8));
	int c = SYS(socket(family, SOCK_STREAM, 0));
	SYS(connect(c, (struct sockaddr *)&ss, len));
	SYS(setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one));
	struct pollfd p = {.fd = tls, .events = POLLIN};
	SYS(poll(&p, 1, 2000));
	tconn = (struct duplex){.a = c, .b = SYS(accept(tls, NULL, NULL)), .stream = 1};
	dfill(&tconn);
}

static void tcp_setup(void) { tcp_on(AF_INET); }
static void tcp6_setup(void) { tcp_on(AF_INET6); }

static void tcp_check(unsigned long n)
{
	dround(&tconn);
	serve_pending(tls, n);
}

/* udp, udp6: a socket bound at port ARG and one connected to it; each
 * round sends a datagram each way. A datagram queued at the checkpoint may
 * be lost (CRIU does not carry UDP queues): a round resends once. */
static int us, uc;
static struct sockaddr_storage uaddr, caddr;
static socklen_t ulen;
static uint64_t useq;

static int urecv(int fd, uint64_t want)
{
	uint64_t v;
	struct pollfd p = {.fd = fd, .events = POLLIN};
	while (poll(&p, 1, 300) == 1) {
		struct sockaddr_storage from;
		socklen_t fl = sizeof from;
		CHECK(recvfrom(fd, &v, 8, 0, (struct sockaddr *)&from, &fl) == 8, "recv: %s", strerror(errno));
		if (v == want) {
			if (fd == us)
				CHECK(fl == ulen && !memcmp(&from, &caddr, fl), "datagram from a wrong address");
			return 1;
		}
	}
	return 0;
}

static void udp_on(int family)
{
	CHECK(arg3, "udp needs a port");
	memset(&uaddr, 0, sizeof uaddr);
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&uaddr;
		a->sin_family = AF_INET, a->sin_port = htons(atoi(arg3));
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		ulen = sizeof *a;
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&uaddr;
		a->sin6_family = AF_INET6, a->sin6_port = htons(atoi(arg3));
		a->sin6_addr = in6addr_loopback;
		ulen = sizeof *a;
	}
	us = SYS(socket(family, SOCK_DGRAM, 0));
	SYS(bind(us, (struct sockaddr *)&uaddr, ulen));
	uc = SYS(socket(family, SOCK_DGRAM, 0));
	SYS(connect(uc, (struct sockaddr *)&uaddr, ulen));
	socklen_t l = sizeof caddr;
	SYS(getsockname(uc, (struct sockaddr *)&caddr, &l));
}

static void udp_setup(void) { udp_on(AF_INET); }
static void udp6_setup(void) { udp_on(AF_INET6); }

static void udp_check(unsigned long n)
{
	(void)n;
	struct sockaddr_storage a;
	socklen_t l = sizeof a;
	SYS(getpeername(uc, (struct sockaddr *)&a, &l));
	CHECK(l == ulen && !memcmp(&a, &uaddr, l), "the connected UDP socket's peer changed");
	int got = 0;
	for (int try = 0; try < 2 && !got; try++) {
		SYS(send(uc, &useq, 8, 0));
		got = urecv(us, useq);
	}
	CHECK(got, "datagram %llu did not arrive in 2 tries", (unsigned long long)useq);
	got = 0;
	for (int try = 0; try < 2 && !got; try++) {
		SYS(sendto(us, &useq, 8, 0, (struct sockaddr *)&caddr, ulen));
		got = urecv(uc, useq);
	}
	CHECK(got, "reply %llu did not arrive in 2 tries", (unsigned long long)useq);
	useq++;
}

/* packet: a raw packet socket bound to lo for no protocol (it receives
 * nothing). */
static int pk, lo;

static void packet_setup(void)
{
	lo = if_nametoindex("lo");
	CHECK(lo > 0, "no lo");
	pk = SYS(socket(AF_PACKET, SOCK_RAW, 0));
	struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_ifindex = lo};
	SYS(bind(pk, (struct sockaddr *)&a, sizeof a));
}

static void packet_check(unsigned long n)
{
	(void)n;
	struct sockaddr_ll a;
	socklen_t l = sizeof a;
	SYS(getsockname(pk, (struct sockaddr *)&a, &l));
	CHECK(a.sll_family == AF_PACKET && a.sll_ifindex == lo, "packet socket bound to family %d ifindex %d, want lo (%d)", a.sll_family,
	      a.sll_ifindex, lo);
	int type;
	l = sizeof type;
	SYS(getsockopt(pk, SOL_SOCKET, SO_TYPE, &type, &l));
	CHECK(type == SOCK_RAW, "packet socket of type %d", type);
}

int main(int argc, char **argv)
{
	static const struct mode modes[] = {
	    {"unix-stream", stream_setup, pair_check},
	    {"unix-dgram", dgram_setup, pair_check},
	    {"unix-seqpacket", seqpacket_setup, pair_check},
	    {"unix-listen", ulisten_setup, ulisten_check},
	    {"unix-unconnected", unconnected_setup, unconnected_check},
	    {"tcp", tcp_setup, tcp_check},
	    {"tcp6", tcp6_setup, tcp_check},
	    {"udp", udp_setup, udp_check},
	    {"udp6", udp6_setup, udp_check},
	    {"packet", packet_setup, packet_check},
	    {0},
	};
	return conform_main(argc, argv, modes);
}
