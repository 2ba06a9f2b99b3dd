/*
 * The floor of an epoll proxy: the least CPU any epoll-based proxy can spend per keep-alive
 * request on this machine (scripts/bench/floor.sh, docs/BENCHMARKS.md).
 *
 *   relay-epoll LISTEN_PORT UPSTREAM_PORT
 *
 * Every accepted client gets its own upstream connection, and bytes are copied as they come,
 * with no parsing: per request one recv and one send each way, plus a share of epoll_wait
 * (level-triggered, so no read ends in EAGAIN). A real proxy does all of this and more, so no
 * epoll proxy can go below these figures. A benchmark tool, not a proxy: a send that would
 * block waits in poll(), and a connection ends when either side ends.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXFD 65536
static int peer[MAXFD];

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int send_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            poll(&pf, 1, 1000);
            continue;
        }
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

static void end_pair(int ep, int fd) {
    int other = peer[fd];
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, other, NULL);
    peer[fd] = peer[other] = -1;
    close(fd);
    close(other);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in la = loopback(atoi(argv[1])), ua = loopback(atoi(argv[2]));
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&la, sizeof la) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (int i = 0; i < MAXFD; i++) peer[i] = -1;
    static char buf[16384];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int u = socket(AF_INET, SOCK_STREAM, 0);
                    if (u < 0 || u >= MAXFD || c >= MAXFD ||
                        connect(u, (struct sockaddr *)&ua, sizeof ua) < 0) {
                        close(c);
                        if (u >= 0) close(u);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if (fcntl(u, F_SETFL, O_NONBLOCK) < 0) die("fcntl");
                    peer[c] = u;
                    peer[u] = c;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                    ev.data.fd = u;
                    epoll_ctl(ep, EPOLL_CTL_ADD, u, &ev);
                }
                continue;
            }
            if (peer[fd] < 0) continue; /* ended earlier in this batch */
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0 || send_all(peer[fd], buf, r) < 0) end_pair(ep, fd);
        }
    }
}
