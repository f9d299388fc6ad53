/* pingpong.c: the Python-independent driver for bench/water_overhead.py.
 *
 *   pingpong pp   PORT COUNT SIZE CLIENT_CPU SERVER_CPU
 *       SIZE-byte ping-pong over one loopback TCP connection (TCP_NODELAY both ends):
 *       COUNT/10 warm-up round trips, then COUNT timed ones. Prints "us_per_rt=<float>" (wall
 *       time) and "cpu_us_per_rt=<float>" (both ends' CPU time, /proc/PID/schedstat).
 *   pingpong loop PORT SIZE CLIENT_CPU SERVER_CPU COUNTER_FILE
 *       the same ping-pong until SIGTERM, its count of round trips kept in COUNTER_FILE's first
 *       8 bytes (water_overhead.py --toggle: probes switched under one connection).
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
#include <fcntl.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

/* ns a task has run on a CPU (/proc/PID/schedstat, first field: sum_exec_runtime); -1 if
 * unknown. Without CONFIG_IRQ_TIME_ACCOUNTING (as on the test machine) it includes the softirq
 * work done in the task's context: on loopback the receiving side's TCP and its BPF programs
 * run in the sender's. */
static long long task_ns(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
    FILE *f = fopen(path, "r");
    long long ns = -1;
    if (f) {
        if (fscanf(f, "%lld", &ns) != 1)
            ns = -1;
        fclose(f);
    }
    return ns;
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
    long long c0 = task_ns(getpid()), s0 = task_ns(pid);
    double t0 = now_s();
    for (long i = 0; i < count; i++) {
        full_write(fd, buf, size);
        if (!full_read(fd, buf, size))
            die("short read");
    }
    double t1 = now_s();
    long long c1 = task_ns(getpid()), s1 = task_ns(pid);
    close(fd);
    if (wait_child(pid))
        return 1;
    printf("us_per_rt=%.4f\n", (t1 - t0) * 1e6 / count);
    /* both ends' CPU time: what the round trips cost, without the time other tasks held the
     * CPU (wall time counts it: on a shared machine most of the noise) */
    if (c0 >= 0 && c1 >= 0 && s0 >= 0 && s1 >= 0)
        printf("cpu_us_per_rt=%.4f\n", (double)((c1 - c0) + (s1 - s0)) / 1e3 / count);
    return 0;
}

/* Round trips until SIGTERM, counted in the first 8 bytes of COUNTER_FILE (mapped shared):
 * the benchmark reads the count and both ends' CPU time while it switches probes on and off
 * under one long-lived connection. Prints "server_pid=N" once the connection is up. */
static volatile sig_atomic_t stop_loop;

static void on_term(int sig)
{
    (void)sig;
    stop_loop = 1;
}

static int pploop(int port, size_t size, int ccpu, int scpu, const char *counter_file)
{
    char *buf = calloc(1, size);
    int cfd = open(counter_file, O_RDWR);
    if (cfd < 0)
        die("open counter file");
    volatile unsigned long long *count = mmap(NULL, 8, PROT_READ | PROT_WRITE, MAP_SHARED,
                                              cfd, 0);
    if (count == MAP_FAILED)
        die("mmap counter file");
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
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    pin(ccpu);
    int fd = connect_to(port);
    nodelay(fd);
    printf("server_pid=%d\n", (int)pid);
    fflush(stdout);
    unsigned long long n = 0;
    while (!stop_loop) {
        full_write(fd, buf, size);
        if (!full_read(fd, buf, size))
            die("short read");
        *count = ++n;
    }
    close(fd);
    return wait_child(pid);
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
    if (argc == 7 && !strcmp(argv[1], "loop"))
        return pploop(atoi(argv[2]), (size_t)atol(argv[3]), atoi(argv[4]), atoi(argv[5]),
                      argv[6]);
    if (argc == 7 && !strcmp(argv[1], "bulk"))
        return bulk(atoi(argv[2]), atoll(argv[3]), (size_t)atol(argv[4]), atoi(argv[5]),
                    atoi(argv[6]));
    fprintf(stderr, "usage: %s pp PORT COUNT SIZE CLIENT_CPU SERVER_CPU\n"
                    "       %s loop PORT SIZE CLIENT_CPU SERVER_CPU COUNTER_FILE\n"
                    "       %s bulk PORT BYTES WRITE SENDER_CPU RECEIVER_CPU\n",
            argv[0], argv[0], argv[0]);
    return 2;
}
