/* pingpong.c: the Python-independent driver for bench/water_overhead.py.
 *
 *   pingpong pp   PORT COUNT SIZE CLIENT_CPU SERVER_CPU
 *       SIZE-byte ping-pong over one loopback TCP connection (TCP_NODELAY both ends):
 *       COUNT/10 warm-up round trips, then COUNT timed ones. Prints "us_per_rt=<float>".
 *   pingpong bulk PORT BYTES WRITE SENDER_CPU RECEIVER_CPU
 *       one connection streams BYTES in WRITE-byte writes; the receiver reads WRITE-byte
 *       chunks until EOF and answers one byte. Timed by the sender from its first write to
 *       that answer. Prints "gb_per_s=<float>" (10^9 bytes a second).
 *
 * PORT 0: an ephemeral port. The parent is the client/sender, a forked child the server/receiver; each pins itself
 * to its CPU first (-1: leave unpinned). Built by water_overhead.py with `cc -O2`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        die("sched_setaffinity");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void full_write(int fd, const char *buf, size_t n)
{
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        buf += w;
        n -= (size_t)w;
    }
}

/* 0 on EOF before n bytes */
static int full_read(int fd, char *buf, size_t n)
{
    while (n) {
        ssize_t r = read(fd, buf, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (r == 0)
            return 0;
        buf += r;
        n -= (size_t)r;
    }
    return 1;
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int listen_on(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("bind");
    if (listen(fd, 1) < 0)
        die("listen");
    return fd;
}

/* the port listen_on(0) was given */
static int bound_port(int fd)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    if (getsockname(fd, (struct sockaddr *)&a, &len) < 0)
        die("getsockname");
    return ntohs(a.sin_port);
}

static int connect_to(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("connect");
    return fd;
}

static int accept_one(int lfd)
{
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    close(lfd);
    return fd;
}

static int wait_child(pid_t pid)
{
    int status = 0;
    if (waitpid(pid, &status, 0) < 0)
        die("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 3;
}

static int pingpong(int port, long count, size_t size, int ccpu, int scpu)
{
    char *buf = calloc(1, size);
    int lfd = listen_on(port);
    port = bound_port(lfd);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        pin(scpu);
        int fd = accept_one(lfd);
        nodelay(fd);
        while (full_read(fd, buf, size))
            full_write(fd, buf, size);
        _exit(0);
    }
    close(lfd);
    pin(ccpu);
    int fd = connect_to(port);
    nodelay(fd);
    long warm = count / 10;
    for (long i = 0; i < warm; i++) {
        full_write(fd, buf, size);
        if (!full_read(fd, buf, size))
            die("short read (warm-up)");
    }
    double t0 = now_s();
    for (long i = 0; i < count; i++) {
        full_write(fd, buf, size);
        if (!full_read(fd, buf, size))
            die("short read");
    }
    double t1 = now_s();
    close(fd);
    if (wait_child(pid))
        return 1;
    printf("us_per_rt=%.4f\n", (t1 - t0) * 1e6 / count);
    return 0;
}

static int bulk(int port, long long total, size_t chunk, int scpu, int rcpu)
{
    char *buf = calloc(1, chunk);
    int lfd = listen_on(port);
    port = bound_port(lfd);
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        pin(rcpu);
        int fd = accept_one(lfd);
        long long got = 0;
        for (;;) {
            ssize_t r = read(fd, buf, chunk);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                die("read");
            }
            if (r == 0)
                break;
            got += r;
        }
        char ok = got == total ? 'k' : 'x';
        full_write(fd, &ok, 1);
        _exit(got == total ? 0 : 1);
    }
    close(lfd);
    pin(scpu);
    int fd = connect_to(port);
    double t0 = now_s();
    for (long long left = total; left > 0; left -= (long long)chunk)
        full_write(fd, buf, left < (long long)chunk ? (size_t)left : chunk);
    shutdown(fd, SHUT_WR);
    char ok = 0;
    if (!full_read(fd, &ok, 1) || ok != 'k')
        die("receiver did not get every byte");
    double t1 = now_s();
    close(fd);
    if (wait_child(pid))
        return 1;
    printf("gb_per_s=%.4f\n", total / (t1 - t0) / 1e9);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 7 && !strcmp(argv[1], "pp"))
        return pingpong(atoi(argv[2]), atol(argv[3]), (size_t)atol(argv[4]), atoi(argv[5]),
                        atoi(argv[6]));
    if (argc == 7 && !strcmp(argv[1], "bulk"))
        return bulk(atoi(argv[2]), atoll(argv[3]), (size_t)atol(argv[4]), atoi(argv[5]),
                    atoi(argv[6]));
    fprintf(stderr, "usage: %s pp PORT COUNT SIZE CLIENT_CPU SERVER_CPU\n"
                    "       %s bulk PORT BYTES WRITE SENDER_CPU RECEIVER_CPU\n",
            argv[0], argv[0]);
    return 2;
}
