/*
 * Load generator for the handshake workloads: new TLS 1.3 connections, as
 * fast as one core can open them, so that the server, not the generator, is
 * the bound.
 *
 * It is GnuTLS, not OpenSSL, because of what a client costs: on OpenSSL 3.0
 * a client handshake costs more CPU than the server's (Python's ssl or C
 * alike), so one generator core could not keep one server core busy. GnuTLS
 * does the client side in about half of that. The servers see the same
 * handshake as from Python's ssl client: one X25519 key share, their own
 * cipher preference (TLS_AES_256_GCM_SHA384), SNI, an ECDSA (or RSA)
 * CertificateVerify, two session tickets that the client ignores.
 *
 * Each connection: non-blocking connect, full handshake (a new session per
 * connection, no resumption), 1 byte out, its echo back, close without
 * close_notify -- what benchmarks/certs.echo_once() does with Python's ssl.
 * `--connections N` connections are kept in flight on one epoll loop.
 *
 * Like benchmarks/certs.load_context(): TLS 1.3 only, no certificate
 * verification (the client still checks the CertificateVerify signature),
 * SNI "localhost", TCP_NODELAY.
 *
 * Protocol with the harness (benchmarks/workloads/handshake.py), one line each:
 *     stdout: "ready"            after --warmup connections completed
 *     stdin:  "go END"           END: CLOCK_MONOTONIC seconds (time.monotonic())
 *     stdout: "DONE ERRORS CPU"  connections completed and failed before END,
 *                                and this process's CPU seconds in between
 * Connections still in flight at END are closed and not counted.
 *
 *     handshake_gnutls --host H --port P [--connections N] [--warmup K] [--sni NAME]
 *     handshake_gnutls --version     (the GnuTLS it runs on)
 *
 * Built by benchmarks/cbuild.py:  cc -O2 handshake_gnutls.c -lgnutls
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#define MAX_CONNECTIONS 1024
/* TLS 1.3 only, one X25519 key share (what OpenSSL's client sends first). */
#define PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:-GROUP-ALL:+GROUP-X25519"
/* A stalled server must not stall the generator: epoll_wait wakes at least
 * this often to look at the deadline. */
#define TICK_MS 100
/* The warm-up gives up (exit status 1) if it cannot finish in this time. */
#define WARMUP_TIMEOUT 30.0

enum state { CONNECTING, HANDSHAKING, ECHOING };

struct conn {
    int fd; /* -1: free slot */
    gnutls_session_t tls; /* NULL until connected */
    enum state state;
    uint32_t events;
};

static struct conn conns[MAX_CONNECTIONS];
static int epfd = -1;
static struct sockaddr_in server;
static gnutls_certificate_credentials_t credentials; /* none: nothing is verified */
static gnutls_priority_t priorities;
static const char *sni = "localhost";
static long done, errors;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void check(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, "handshake_gnutls: %s: %s\n", what, gnutls_strerror(rc));
        exit(1);
    }
}

static void make_context(void)
{
    check(gnutls_global_init(), "gnutls_global_init");
    check(gnutls_certificate_allocate_credentials(&credentials), "credentials");
    const char *err_pos = NULL;
    check(gnutls_priority_init(&priorities, PRIORITIES, &err_pos), "gnutls_priority_init");
}

static void watch(struct conn *c, uint32_t events)
{
    if (events == c->events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0)
        die("epoll_ctl");
    c->events = events;
}

static void conn_close(struct conn *c)
{
    if (c->tls)
        gnutls_deinit(c->tls); /* no gnutls_bye(): a close without close_notify */
    c->tls = NULL;
    close(c->fd); /* also drops it from the epoll set */
    c->fd = -1;
}

/* Open a new connection in slot c; on failure the slot stays free. */
static void conn_open(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        errors++;
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->tls = NULL;
    c->state = CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
        die("epoll_ctl");
    if (connect(fd, (struct sockaddr *)&server, sizeof server) != 0 && errno != EINPROGRESS) {
        errors++;
        conn_close(c);
    }
}

/* Where a TLS call that returned rc wants to be called again; 0 on failure. */
static uint32_t wait_for(struct conn *c, int rc)
{
    if (rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED)
        return 0;
    return gnutls_record_get_direction(c->tls) ? EPOLLOUT : EPOLLIN;
}

/* Advance one connection; returns 1 when its echo came back, -1 on failure,
 * 0 while it still waits. */
static int advance(struct conn *c)
{
    int rc;
    uint32_t want;
    switch (c->state) {
    case CONNECTING: {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)
            return -1;
        if (gnutls_init(&c->tls, GNUTLS_CLIENT | GNUTLS_NONBLOCK) < 0) {
            c->tls = NULL;
            return -1;
        }
        if (gnutls_priority_set(c->tls, priorities) < 0 ||
            gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, credentials) < 0 ||
            gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, sni, strlen(sni)) < 0)
            return -1;
        gnutls_transport_set_int(c->tls, c->fd);
        c->state = HANDSHAKING;
    }
        /* fall through */
    case HANDSHAKING:
        rc = gnutls_handshake(c->tls);
        if (rc < 0) {
            want = wait_for(c, rc);
            if (!want)
                return -1;
            watch(c, want);
            return 0;
        }
        /* One byte fits any send buffer: the write completes at once. */
        if (gnutls_record_send(c->tls, "x", 1) != 1)
            return -1;
        c->state = ECHOING;
        /* fall through */
    case ECHOING: {
        char byte;
        /* The session tickets arrive before the echo; recv takes them. */
        rc = (int)gnutls_record_recv(c->tls, &byte, 1);
        if (rc == 1)
            return byte == 'x' ? 1 : -1;
        want = wait_for(c, rc);
        if (!want)
            return -1;
        watch(c, want);
        return 0;
    }
    }
    return -1;
}

/* Run until `target` connections completed (target > 0) or until `end`. */
static void run(int connections, long target, double end)
{
    struct epoll_event events[MAX_CONNECTIONS];
    for (int i = 0; i < connections; i++)
        if (conns[i].fd < 0)
            conn_open(&conns[i]);
    for (;;) {
        if ((target > 0 && done >= target) || now() >= end)
            break;
        int n = epoll_wait(epfd, events, connections, TICK_MS);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            int rc = advance(c);
            if (rc == 0)
                continue;
            if (rc > 0)
                done++;
            else
                errors++;
            conn_close(c);
            conn_open(c);
        }
        /* Slots whose connect() failed at once are retried on the next turn. */
        for (int i = 0; i < connections; i++)
            if (conns[i].fd < 0)
                conn_open(&conns[i]);
    }
    for (int i = 0; i < connections; i++)
        if (conns[i].fd >= 0)
            conn_close(&conns[i]);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0, connections = 4;
    long warmup = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--version")) {
            printf("GnuTLS %s\n", gnutls_check_version(NULL));
            return 0;
        }
        if (i + 1 >= argc)
            break;
        if (!strcmp(argv[i], "--host"))
            host = argv[++i];
        else if (!strcmp(argv[i], "--port"))
            port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--connections"))
            connections = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = atol(argv[++i]);
        else if (!strcmp(argv[i], "--sni"))
            sni = argv[++i];
    }
    if (port <= 0 || port > 65535 || connections < 1 || connections > MAX_CONNECTIONS) {
        fprintf(stderr, "usage: handshake_gnutls --host H --port P [--connections 1-%d]\n",
                MAX_CONNECTIONS);
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1) {
        fprintf(stderr, "handshake_gnutls: %s is not an IPv4 address\n", host);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
    if (getppid() == 1)
        return 1;
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < MAX_CONNECTIONS; i++)
        conns[i].fd = -1;
    make_context();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");

    run(connections, warmup, now() + WARMUP_TIMEOUT);
    if (done < warmup) {
        fprintf(stderr, "handshake_gnutls: warm-up: %ld of %ld connections in %.0f s (%ld errors)\n",
                done, warmup, WARMUP_TIMEOUT, errors);
        return 1;
    }
    puts("ready");
    fflush(stdout);

    double end;
    if (scanf(" go %lf", &end) != 1)
        return 1; /* the harness went away */
    done = errors = 0;
    double cpu0 = cpu_seconds();
    run(connections, 0, end);
    printf("%ld %ld %.6f\n", done, errors, cpu_seconds() - cpu0);
    fflush(stdout);
    return 0;
}
