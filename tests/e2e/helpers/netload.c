/* Loopback traffic of known size for the probe tests (tests/probes.rs),
 * built by tests/e2e/src/probes_support.rs with cc.
 *
 *   netload tcp-serve READ WRITE        listen on 127.0.0.1:0, print "port N",
 *                                       accept one connection, read READ bytes,
 *                                       write WRITE bytes, wait for the peer to
 *                                       close, print "retrans BYTES"
 *   netload tcp-client IP PORT SEND RECV  connect, write SEND bytes, read RECV
 *                                       bytes, print "retrans BYTES", close
 *   netload udp-send IP PORT COUNT SIZE   send COUNT datagrams of SIZE bytes
 *
 * "retrans" is tcpi_bytes_retrans of the socket: payload the kernel sent
 * twice (loopback retransmits only under heavy load, after a spurious RTO),
 * which the network probes rightly count again. */
#include <arpa/inet.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static char buf[1 << 16];

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void send_all(int fd, unsigned long long n)
{
	while (n > 0) {
		size_t chunk = n < sizeof(buf) ? n : sizeof(buf);
		ssize_t w = write(fd, buf, chunk);
		if (w <= 0)
			die("write");
		n -= (unsigned long long)w;
	}
}

static void recv_all(int fd, unsigned long long n)
{
	while (n > 0) {
		size_t chunk = n < sizeof(buf) ? n : sizeof(buf);
		ssize_t r = read(fd, buf, chunk);
		if (r <= 0)
			die("read");
		n -= (unsigned long long)r;
	}
}

static void print_retrans(int fd)
{
	struct tcp_info info;
	socklen_t len = sizeof(info);
	memset(&info, 0, sizeof(info));
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0)
		die("getsockopt TCP_INFO");
	printf("retrans %llu\n", (unsigned long long)info.tcpi_bytes_retrans);
	fflush(stdout);
}

static struct sockaddr_in addr_of(const char *ip, const char *port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((unsigned short)atoi(port));
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		die("inet_pton");
	return a;
}

int main(int argc, char **argv)
{
	memset(buf, 0x5a, sizeof(buf));
	if (argc == 4 && strcmp(argv[1], "tcp-serve") == 0) {
		int l = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = addr_of("127.0.0.1", "0");
		socklen_t len = sizeof(a);
		if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1) ||
		    getsockname(l, (struct sockaddr *)&a, &len))
			die("listen");
		printf("port %d\n", ntohs(a.sin_port));
		fflush(stdout);
		int fd = accept(l, NULL, NULL);
		if (fd < 0)
			die("accept");
		recv_all(fd, strtoull(argv[2], NULL, 10));
		send_all(fd, strtoull(argv[3], NULL, 10));
		/* The peer closes after reading everything: all our data is
		 * acknowledged, no retransmission can follow. */
		while (read(fd, buf, sizeof(buf)) > 0)
			;
		print_retrans(fd);
		return 0;
	}
	if (argc == 6 && strcmp(argv[1], "tcp-client") == 0) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = addr_of(argv[2], argv[3]);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)))
			die("connect");
		send_all(fd, strtoull(argv[4], NULL, 10));
		/* The server writes only after reading all we sent, so once its
		 * bytes are here every byte of ours was acknowledged. */
		recv_all(fd, strtoull(argv[5], NULL, 10));
		print_retrans(fd);
		close(fd);
		return 0;
	}
	if (argc == 6 && strcmp(argv[1], "udp-send") == 0) {
		int fd = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in a = addr_of(argv[2], argv[3]);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)))
			die("connect");
		long count = strtol(argv[4], NULL, 10);
		size_t size = strtoul(argv[5], NULL, 10);
		if (size > sizeof(buf))
			die("size");
		for (long i = 0; i < count; i++)
			if (send(fd, buf, size, 0) != (ssize_t)size)
				die("send");
		return 0;
	}
	fprintf(stderr, "usage: see the comment at the top of netload.c\n");
	return 2;
}
