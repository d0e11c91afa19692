/*
 * A plain TCP echo in C (single-threaded, level-triggered epoll): the upstream
 * behind the proxies in `scripts/bench --proxy`. It is not measured; it only
 * has to cost the shared load-generator core as little as possible.
 *
 *     proxy_upstream_echo --port P [--host H]
 *     proxy_upstream_echo --version     (the OpenSSL it is linked with, for cbuild)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK 65536

struct conn {
    int fd;
    char *pending; /* bytes the kernel did not take yet (NULL if none) */
    size_t len, off;
};

static char buffer[CHUNK];

static void drop(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

static void watch(int ep, struct conn *c, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Send what is pending; 1 when all is sent, 0 to wait, -1 on error. */
static int flush(struct conn *c)
{
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0)
            return errno == EAGAIN ? 0 : -1;
        c->off += (size_t)n;
    }
    free(c->pending);
    c->pending = NULL;
    c->len = c->off = 0;
    return 1;
}

static void on_event(int ep, struct conn *c, unsigned events)
{
    if (c->pending) {
        int done = flush(c);
        if (done < 0) {
            drop(ep, c);
            return;
        }
        if (!done)
            return;
        watch(ep, c, EPOLLIN);
        if (!(events & EPOLLIN))
            return;
    }
    for (;;) {
        ssize_t n = recv(c->fd, buffer, CHUNK, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            drop(ep, c);
            return;
        }
        if (n < 0)
            return;
        ssize_t sent = send(c->fd, buffer, (size_t)n, MSG_NOSIGNAL);
        if (sent < 0 && errno != EAGAIN) {
            drop(ep, c);
            return;
        }
        if (sent < 0)
            sent = 0;
        if (sent < n) {
            /* Stop reading until the peer takes what it was sent. */
            c->len = (size_t)(n - sent);
            c->off = 0;
            c->pending = malloc(c->len);
            if (!c->pending) {
                drop(ep, c);
                return;
            }
            memcpy(c->pending, buffer + sent, c->len);
            watch(ep, c, EPOLLOUT);
            return;
        }
        if (n < CHUNK)
            return;
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--version") == 0) {
            puts(OpenSSL_version(OPENSSL_VERSION));
            return 0;
        }
        if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
            port = atoi(argv[++i]);
        else if (strcmp(argv[i], "--host") == 0 && i + 1 < argc)
            host = argv[++i];
    }
    if (port < 0) {
        fprintf(stderr, "usage: %s --port P [--host H]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (lfd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        perror("socket/host");
        return 1;
    }
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* inherited on Linux */
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c) {
                on_event(ep, c, events[i].events);
                continue;
            }
            for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    break;
                struct conn *nc = calloc(1, sizeof *nc);
                if (!nc) {
                    close(fd);
                    continue;
                }
                nc->fd = fd;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            }
        }
    }
}
