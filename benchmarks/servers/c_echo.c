/*
 * Reference peer: a single-threaded epoll + OpenSSL TLS 1.3 echo server.
 *
 * It does the least work any server on this OpenSSL can do for the benchmark
 * workloads, so its row shows the floor that OpenSSL (handshake crypto,
 * record encryption, its per-connection state) sets under the Python servers.
 *
 * Command line as the Python servers (unknown flags are ignored):
 *     c_echo --port P --host H --certfile C --keyfile K
 *     c_echo --version      (prints the OpenSSL it runs on, for the harness)
 *
 * TLS settings mirror benchmarks/servers/_common.server_context(): TLS 1.3
 * only, one certificate, OpenSSL defaults otherwise (session tickets on,
 * default groups and suites), plus the options and modes that CPython's
 * ssl.SSLContext layers on top of SSL_CTX_new (see make_context()).
 *
 * Built by benchmarks/cbuild.py:  cc -O2 c_echo.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

/* tornado's default backlog; every Python server here uses 100-128. */
#define BACKLOG 128
/* A TLS record carries at most 16 KiB; 64 KiB matches the Python servers'
 * read size and always holds a whole record. */
#define IO_CHUNK 65536
/* Records echoed per wake-up before other connections get a turn (level-
 * triggered epoll brings us back if the socket still has data). */
#define MAX_RECORDS_PER_WAKEUP 16
#define MAX_EVENTS 256

struct conn {
    int fd;
    SSL *ssl;
    int handshake_done;
    uint32_t events;          /* what epoll is currently watching for */
    /* Plaintext that SSL_write could not take yet. Allocated only under
     * back-pressure and freed once sent, so idle connections hold no buffer. */
    unsigned char *pending;
    size_t pending_len;
    struct conn *prev, *next; /* all live connections, for a clean exit */
};

static struct conn *conns;
static int epfd = -1;
static volatile sig_atomic_t stopping;
/* One shared read buffer: the server is single-threaded and echoes (or
 * copies into conn->pending) before the next read. */
static unsigned char scratch[IO_CHUNK];

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void die_ssl(const char *what)
{
    fprintf(stderr, "c_echo: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static void on_sigterm(int sig)
{
    (void)sig;
    stopping = 1;
}

/* Same as _common.prepare_process(): die with the harness, and allow as many
 * descriptors as the hard limit permits (the memory workload holds 1000). */
static void prepare_process(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
            perror("setrlimit");
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
    if (getppid() == 1) /* the parent died before prctl took effect */
        exit(1);
}

static SSL_CTX *make_context(const char *certfile, const char *keyfile)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        die_ssl("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    /* What CPython's SSLContext(PROTOCOL_TLS_SERVER) adds to OpenSSL's
     * defaults, so that both sides run the same OpenSSL configuration. Only
     * RELEASE_BUFFERS matters for TLS 1.3: OpenSSL frees an idle connection's
     * 16 KiB record buffers, which the memory workload sees. */
    SSL_CTX_set_options(ctx, (SSL_OP_ALL & ~SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS) |
                                 SSL_OP_NO_SSLv3 | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* ACCEPT_MOVING_WRITE_BUFFER: after SSL_write says WANT_WRITE we retry
     * from conn->pending, not from the scratch buffer it first saw. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (SSL_CTX_use_certificate_chain_file(ctx, certfile) != 1)
        die_ssl("cannot load certificate chain");
    if (SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM) != 1)
        die_ssl("cannot load private key");
    if (SSL_CTX_check_private_key(ctx) != 1)
        die_ssl("private key does not match the certificate");
    return ctx;
}

static int listen_on(const char *host, const char *port)
{
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "c_echo: %s:%s: %s\n", host, port, gai_strerror(rc));
        exit(1);
    }
    int fd = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd < 0)
            continue;
        int one = 1; /* as asyncio and tornado do, so restarts never see EADDRINUSE */
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, BACKLOG) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        die("bind/listen");
    return fd;
}

/* Point epoll at what the connection is waiting for, if that changed. */
static int watch(struct conn *c, uint32_t events)
{
    if (events == c->events)
        return 0;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0)
        return -1;
    c->events = events;
    return 0;
}

/* Free everything a connection owns. close() also removes it from epoll. */
static void conn_close(struct conn *c, int clean)
{
    /* Answer the peer's close_notify with ours (best effort, never waits);
     * after a fatal error OpenSSL must not be asked to shut down. */
    if (clean)
        SSL_shutdown(c->ssl);
    /* A failed call leaves entries on this thread's error queue; they would
     * confuse SSL_get_error() on the next connection. */
    ERR_clear_error();
    SSL_free(c->ssl);
    close(c->fd);
    free(c->pending);
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c);
}

/* What to wait for after an SSL call failed with SSL_get_error() == err:
 * EPOLLIN or EPOLLOUT, or 0 if the connection is finished. */
static uint32_t wait_for(int err)
{
    switch (err) {
    case SSL_ERROR_WANT_READ:
        return EPOLLIN;
    case SSL_ERROR_WANT_WRITE:
        return EPOLLOUT;
    default: /* ZERO_RETURN (close_notify), SYSCALL (EOF, reset), SSL (alert) */
        return 0;
    }
}

/* Finish whatever the connection is doing until OpenSSL would block; then
 * watch for what it is blocked on. Called for any event on the socket: with
 * level-triggered epoll, running the state machine is simpler than reading
 * meaning into EPOLLIN/EPOLLOUT/EPOLLERR (an error surfaces from the SSL
 * call). Returns 0 to keep the connection, -1 after closing it. */
static int serve(struct conn *c)
{
    uint32_t want = EPOLLIN;
    int err = 0;

    if (!c->handshake_done) {
        int rc = SSL_accept(c->ssl);
        if (rc != 1) {
            err = SSL_get_error(c->ssl, rc);
            want = wait_for(err);
            goto blocked;
        }
        c->handshake_done = 1;
    }

    for (int records = 0;;) {
        size_t n;
        /* Unsent data first: nothing more is read until it is gone, which
         * is the back-pressure on a client that does not read its echo. */
        if (c->pending) {
            if (!SSL_write_ex(c->ssl, c->pending, c->pending_len, &n)) {
                err = SSL_get_error(c->ssl, 0);
                want = wait_for(err);
                goto blocked;
            }
            /* Without SSL_MODE_ENABLE_PARTIAL_WRITE (CPython does not set it)
             * n is the whole length; handle a short count all the same. */
            if (n < c->pending_len) {
                memmove(c->pending, c->pending + n, c->pending_len - n);
                c->pending_len -= n;
                continue;
            }
            free(c->pending);
            c->pending = NULL;
            c->pending_len = 0;
        }
        /* Yield to other connections now and then, unless OpenSSL holds
         * decrypted or buffered bytes epoll cannot know about. */
        if (records++ == MAX_RECORDS_PER_WAKEUP && !SSL_has_pending(c->ssl)) {
            want = EPOLLIN;
            break;
        }
        if (!SSL_read_ex(c->ssl, scratch, sizeof scratch, &n)) {
            err = SSL_get_error(c->ssl, 0);
            want = wait_for(err);
            goto blocked;
        }
        size_t sent = 0;
        int written = SSL_write_ex(c->ssl, scratch, n, &sent);
        if (!written) {
            err = SSL_get_error(c->ssl, 0);
            if (!(want = wait_for(err)))
                goto blocked;
            sent = 0; /* nothing counts as sent until a retry succeeds */
        }
        if (sent < n) {
            /* Keep the rest: scratch is reused by the next read. The loop
             * retries it at once after a short count, or on the wake-up
             * OpenSSL asked for. */
            c->pending_len = n - sent;
            c->pending = malloc(c->pending_len);
            if (!c->pending) {
                conn_close(c, 0);
                return -1;
            }
            memcpy(c->pending, scratch + sent, c->pending_len);
            if (!written)
                goto blocked;
        }
    }

blocked:
    if (!want) {
        conn_close(c, err == SSL_ERROR_ZERO_RETURN);
        return -1;
    }
    if (watch(c, want) != 0) {
        conn_close(c, 0);
        return -1;
    }
    return 0;
}

static void accept_all(int lfd, SSL_CTX *ctx)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                perror("accept4"); /* e.g. EMFILE: retried on the next wake-up */
            return;
        }
        /* Echo replies are small writes that must not wait for Nagle. */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

        struct conn *c = calloc(1, sizeof *c);
        SSL *ssl = c ? SSL_new(ctx) : NULL;
        if (!ssl || !SSL_set_fd(ssl, fd)) {
            fprintf(stderr, "c_echo: out of memory for a connection\n");
            ERR_clear_error();
            SSL_free(ssl);
            free(c);
            close(fd);
            continue;
        }
        SSL_set_accept_state(ssl);
        c->fd = fd;
        c->ssl = ssl;
        /* The client speaks first (ClientHello): wait until it has. */
        c->events = EPOLLIN;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            perror("epoll_ctl");
            SSL_free(ssl);
            free(c);
            close(fd);
            continue;
        }
        c->next = conns;
        if (conns)
            conns->prev = c;
        conns = c;
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *port = NULL, *certfile = NULL, *keyfile = NULL;

    /* --name value or --name=value, like argparse; anything else is ignored
     * so the harness can pass the Python servers' extra flags unchanged. */
    for (int i = 1; i < argc; i++) {
        static const char *names[] = {"--port", "--host", "--certfile", "--keyfile"};
        const char **slots[] = {&port, &host, &certfile, &keyfile};
        if (strcmp(argv[i], "--version") == 0) {
            puts(OpenSSL_version(OPENSSL_VERSION));
            return 0;
        }
        for (int k = 0; k < 4; k++) {
            size_t len = strlen(names[k]);
            if (strncmp(argv[i], names[k], len) != 0)
                continue;
            if (argv[i][len] == '=')
                *slots[k] = argv[i] + len + 1;
            else if (argv[i][len] == '\0' && i + 1 < argc)
                *slots[k] = argv[++i];
        }
    }
    if (!port || !certfile || !keyfile) {
        fprintf(stderr, "usage: %s --port P [--host H] --certfile C --keyfile K\n", argv[0]);
        return 2;
    }

    prepare_process();

    /* Writing to a socket the peer has reset must fail with EPIPE, not kill
     * the server (CPython ignores SIGPIPE for the same reason). */
    signal(SIGPIPE, SIG_IGN);
    /* SIGTERM is blocked except inside epoll_pwait(), so it can only arrive
     * there (EINTR) and no wake-up is lost between checking and waiting. */
    sigset_t term, during_wait;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, &during_wait);
    sigdelset(&during_wait, SIGTERM);
    struct sigaction sa = {.sa_handler = on_sigterm};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);

    SSL_CTX *ctx = make_context(certfile, keyfile);
    int lfd = listen_on(host, port);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL}; /* NULL: listener */
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) != 0)
        die("epoll_ctl");
    fprintf(stderr, "c_echo: listening on %s:%s (%s, options 0x%llx)\n", host, port,
            OpenSSL_version(OPENSSL_VERSION), (unsigned long long)SSL_CTX_get_options(ctx));

    struct epoll_event events[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_pwait(epfd, events, MAX_EVENTS, -1, &during_wait);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_pwait");
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                accept_all(lfd, ctx);
            else
                serve(events[i].data.ptr);
        }
    }

    /* Clean exit: free every connection so leak checkers see nothing. */
    while (conns)
        conn_close(conns, 0);
    close(lfd);
    close(epfd);
    SSL_CTX_free(ctx);
    return 0;
}
