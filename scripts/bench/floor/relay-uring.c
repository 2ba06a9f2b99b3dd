/*
 * The same floor as relay-epoll.c, on io_uring: what batching the syscalls of many
 * connections buys on this machine (scripts/bench/floor.sh, docs/BENCHMARKS.md).
 *
 *   relay-uring LISTEN_PORT UPSTREAM_PORT
 *
 * Each accepted client gets its own upstream connection. Each side has one multishot recv
 * into a ring of provided buffers (the socket stays armed: data that arrives completes at
 * once, with no poll to re-arm); each completion queues a send of that buffer to the other
 * side, and the send's completion gives the buffer back. One io_uring_enter per loop submits
 * every queued send and waits for the next completions: the syscalls of all connections that
 * were ready are paid once. The ring is single-issuer with deferred task work, so completions
 * run in this thread when it asks for them. (A first version re-armed a one-shot recv after
 * every send; it spent more system time than this one.) A benchmark tool, not a proxy: a
 * connection ends when either side ends or an operation fails.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

#define MAXCONN 8192
#define NBUF 4096 /* a power of two */
#define BUFSZ 4096
#define BGID 1

struct conn {
    int fd[2];   /* 0: client, 1: upstream */
    int live[2]; /* the side's multishot recv is armed */
};

static struct conn *conns[MAXCONN];
static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };

static uint64_t tag(int op, int id, int side, int bid) {
    return ((uint64_t)id << 24) | ((uint64_t)bid << 8) | (op << 1) | side;
}

static struct io_uring_sqe *sqe(void) {
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    if (!s) {
        io_uring_submit(&ring);
        s = io_uring_get_sqe(&ring);
    }
    if (!s) {
        fprintf(stderr, "no submission entry\n");
        exit(1);
    }
    return s;
}

static void give_back(int bid) {
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUFSZ, BUFSZ, bid, io_uring_buf_ring_mask(NBUF), 0);
    io_uring_buf_ring_advance(br, 1);
}

static void recv_on(int id, int side) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_recv_multishot(s, conns[id]->fd[side], NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = BGID;
    io_uring_sqe_set_data64(s, tag(OP_RECV, id, side, 0));
    conns[id]->live[side] = 1;
}

/* One side is done: wake the other side's recv with a shutdown; free when both are done. */
static void side_done(int id, int side) {
    struct conn *c = conns[id];
    c->live[side] = 0;
    if (c->live[!side]) {
        shutdown(c->fd[!side], SHUT_RDWR);
        return;
    }
    close(c->fd[0]);
    close(c->fd[1]);
    free(c);
    conns[id] = NULL;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void accept_on(int ls) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_multishot_accept(s, ls, NULL, NULL, 0);
    io_uring_sqe_set_data64(s, tag(OP_ACCEPT, 0, 0, 0));
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in la = loopback(atoi(argv[1])), ua = loopback(atoi(argv[2]));
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&la, sizeof la) < 0 || listen(ls, 4096) < 0) {
        perror("listen");
        return 1;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int e = io_uring_queue_init_params(4096, &ring, &p);
    if (e < 0) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-e));
        return 1;
    }
    br = mmap(NULL, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
              MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    bufs = malloc((size_t)NBUF * BUFSZ);
    if (br == MAP_FAILED || !bufs) {
        perror("buffers");
        return 1;
    }
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = NBUF, .bgid = BGID};
    e = io_uring_register_buf_ring(&ring, &reg, 0);
    if (e < 0) {
        fprintf(stderr, "io_uring_register_buf_ring: %s\n", strerror(-e));
        return 1;
    }
    for (int b = 0; b < NBUF; b++) give_back(b);
    accept_on(ls);
    int next = 0;
    for (;;) {
        e = io_uring_submit_and_wait(&ring, 1);
        if (e < 0 && e != -EINTR) {
            fprintf(stderr, "io_uring_submit_and_wait: %s\n", strerror(-e));
            return 1;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            uint64_t t = cqe->user_data;
            int op = (t >> 1) & 0x7f, side = t & 1, bid = (t >> 8) & 0xffff, id = (int)(t >> 24);
            int res = cqe->res, more = cqe->flags & IORING_CQE_F_MORE;
            if (op == OP_ACCEPT) {
                if (!more) accept_on(ls);
                if (res < 0) continue;
                int u = socket(AF_INET, SOCK_STREAM, 0), slot = -1;
                for (int k = 0; k < MAXCONN && slot < 0; k++, next = (next + 1) % MAXCONN)
                    if (!conns[next]) slot = next;
                struct conn *c = slot < 0 ? NULL : calloc(1, sizeof *c);
                if (!c || u < 0 || connect(u, (struct sockaddr *)&ua, sizeof ua) < 0) {
                    close(res);
                    if (u >= 0) close(u);
                    free(c);
                    continue;
                }
                setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                c->fd[0] = res;
                c->fd[1] = u;
                conns[slot] = c;
                recv_on(slot, 0);
                recv_on(slot, 1);
            } else if (op == OP_RECV) {
                struct conn *c = conns[id];
                if (res > 0) {
                    int b = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
                    if (!c) {
                        give_back(b);
                        continue;
                    }
                    struct io_uring_sqe *s = sqe();
                    io_uring_prep_send(s, c->fd[!side], bufs + (size_t)b * BUFSZ, res,
                                       MSG_WAITALL | MSG_NOSIGNAL);
                    io_uring_sqe_set_data64(s, tag(OP_SEND, id, side, b));
                }
                if (!c || more) continue;
                /* The multishot ended: out of buffers (re-arm) or the side is done. */
                if (res > 0 || res == -ENOBUFS)
                    recv_on(id, side);
                else
                    side_done(id, side);
            } else if (op == OP_SEND) {
                give_back(bid);
                struct conn *c = conns[id];
                if (res < 0 && c && c->live[!side]) shutdown(c->fd[!side], SHUT_RDWR);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}
