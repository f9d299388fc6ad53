/* goread_tp.c: the tracepoint Go read sampler (the default).
 *
 * Kernels: any with BTF, the BPF ring buffer, task-local storage for tracing programs and
 * bpf_get_current_task_btf()/bpf_task_pt_regs() usable from tracepoints (5.15+); built and
 * tested on 6.18 x86_64. Tracepoints only (docs/kernel.md: no kprobes, no fentry). Two ways:
 *   in the watch (compiled into bpf/water.c, OTW_TP_AT_RECV): no program of its own on the
 *     read path. The water probe's sock:sock_recv_length, which runs inside every socket
 *     read(2) at its end, calls otw_read_end with what it knows of the socket. One hit per
 *     read instead of three (enter, exit, and the water probe's own), and no cost at all on
 *     reads of files and pipes.
 *   alone (GoReadSampler without the water probe):
 *     syscalls:sys_enter_read   otw_tp_read_enter: the start time, in task-local storage
 *     syscalls:sys_exit_read    otw_tp_read_exit: otw_read_end
 *   either way, with a binary path: raw sched:sched_process_exec watches a process that
 *   execs the binary.
 *
 * A Go net.(*conn).Read is read(2) on a non-blocking socket: -EAGAIN when nothing is waiting
 * (the goroutine parks in netpoll), then, after the wake-up, the read(2) that returns the
 * bytes. Go's fd mutex lets one goroutine read an fd at a time, and the goroutine may resume on
 * another thread, so a park is kept per (process, fd): in the `parks` array (row = the
 * process's slot, column = fd; written in place, never inserted or deleted), or in the
 * `parks_big` LRU hash for fds >= OTW_MAX_FDS or processes beyond OTW_MAX_PROCS (also reused in
 * place). The blocked read starts at the first -EAGAIN read and ends at the read that returns
 * data. Every read is counted with its latency (one per-CPU lookup); only a read lasting
 * >= OTW_THRESHOLD_NS (or, in the watch, one whose bytes waited that long in the queue) pays
 * for the goroutine id (R14 -> *(g + goid_off)), the user stack (still running through
 * net.(*conn).Read), the socket key (from the water probe, or the fd -> socket walk alone),
 * and a ring-buffer record (no wakeup; Python consumes on a timer). A record the ring buffer
 * cannot take is counted, and the next one this CPU delivers says how many and when.
 * The pid filter is the `procs` hash, filled by Python (-D macros: see goread.py).
 */
#include <linux/sched.h>
#define OTW_GOREAD_PROG 1
#include "sockkey.h"
#include "pidns.h"
#include "goread.h"

#ifndef OTW_MAX_PROCS
#define OTW_MAX_PROCS 64
#endif
#ifndef OTW_MAX_FDS
#define OTW_MAX_FDS 4096
#endif
#ifndef OTW_READ_RINGBUF_PAGES  /* pages of read_events; a macro of its own: compiled into
                                * bpf/water.c, whose `events` has OTW_RINGBUF_PAGES */
#define OTW_READ_RINGBUF_PAGES 64
#endif
#ifndef OTW_TP_RET_OFF
#define OTW_TP_RET_OFF 16      /* sys_exit_read's `long ret` (tracefs format) */
#endif
#ifndef OTW_EAGAIN
#define OTW_EAGAIN 11
#endif
#define OTW_NO_SLOT 0xffffffff

BPF_HASH(procs, u32, struct goread_proc, OTW_MAX_PROCS * 4);
BPF_ARRAY(procs_gen, u32, 1);   /* bumped after every change of `procs` (Python, exec hook) */
BPF_ARRAY(parks, struct goread_park, OTW_MAX_PROCS * OTW_MAX_FDS);
BPF_TABLE("lru_hash", u64, struct goread_park, parks_big, 16384);
BPF_TASK_STORAGE(tasks, struct goread_task);
BPF_PERCPU_ARRAY(counts, struct goread_counts, 1);
BPF_RINGBUF_OUTPUT(read_events, OTW_READ_RINGBUF_PAGES);

#include "goverdict.c"

#if OTW_EXEC_WATCH
/* Processes that exec an executable Python named are watched from their first instruction,
 * not from Python's next /proc scan: `exec_targets` holds, by executable (the kernel's dev_t,
 * inode: struct goread_exe), the process row to give them (struct goread_proc: goid offset and
 * label layout of that binary; slot none: their parks wait in the LRU hash until Python gives
 * the process a row). One entry with --go-binary, one per Go binary seen for the agent. */
#ifndef OTW_MAX_EXES
#define OTW_MAX_EXES 1024   /* binaries watched at exec at once */
#endif
BPF_HASH(exec_targets, struct goread_exe, struct goread_proc, OTW_MAX_EXES);

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
    /* TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
    const char *bprm = (const char *)ctx->args[2];
    const char *file = 0, *inode = 0, *sb = 0;
    struct goread_exe x = {};
    u32 dev = 0;
    bpf_probe_read_kernel(&file, sizeof(file), bprm + OFF_BPRM_FILE);
    if (!file)
        return 0;
    bpf_probe_read_kernel(&inode, sizeof(inode), file + OFF_FILE_INODE);
    if (!inode)
        return 0;
    bpf_probe_read_kernel(&x.ino, sizeof(x.ino), inode + OFF_INODE_INO);
    bpf_probe_read_kernel(&sb, sizeof(sb), inode + OFF_INODE_SB);
    if (sb)
        bpf_probe_read_kernel(&dev, sizeof(dev), sb + OFF_SB_DEV);
    x.dev = dev;
    struct goread_proc *want = exec_targets.lookup(&x);
    if (!want)
        return 0;
    u32 tgid = otw_pid_tgid() >> 32;
    if (!tgid)      /* a process of another pid namespace than the agent's (bpf/pidns.h) */
        return 0;
    struct goread_proc p = *want;
    procs.update(&tgid, &p);
    u32 zero = 0;
    u32 *gen = procs_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    return 0;
}
#endif

static __always_inline struct goread_counts *otw_counts(void)
{
    u32 zero = 0;
    return counts.lookup(&zero);
}

/* The calling thread's state when its process is traced, else NULL. A thread of a traced
 * process gets task storage at its first read: one lookup afterwards (the pid filter's hash
 * is asked once per thread, not once per read; other processes' threads ask it each read). */
static __always_inline struct goread_task *otw_go_task(struct task_struct *task)
{
    struct goread_task *ts = tasks.task_storage_get(task, 0, 0);
    if (ts)
        return ts;
    u32 tgid = otw_pid_tgid() >> 32;
    struct goread_proc *p = procs.lookup(&tgid);
    if (!p)
        return 0;
    ts = tasks.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!ts)
        return 0;
    ts->proc = *p;  /* a live process keeps its row (Python re-slots only dead pids) */
    return ts;
}

/* The park slot of (process, fd); created in parks_big on first need when create is set. */
static __always_inline struct goread_park *otw_park(const struct goread_proc *p, u32 tgid,
                                                    long fd, int create)
{
    if (fd < 0)
        return 0;
    if (p->slot < OTW_MAX_PROCS && fd < OTW_MAX_FDS) {
        u32 idx = p->slot * OTW_MAX_FDS + (u32)fd;
        return parks.lookup(&idx);
    }
    u64 key = (u64)tgid << 32 | (u32)fd;
    struct goread_park *pk = parks_big.lookup(&key);
    if (pk || !create)
        return pk;
    struct goread_park fresh = {};
    parks_big.update(&key, &fresh);
    return parks_big.lookup(&key);
}

static __always_inline void otw_read_emit(void *ctx, struct goread_counts *c, struct pt_regs *regs,
                                     const struct goread_proc *p, u64 id, long fd, long ret,
                                     u64 count, u64 start, u64 end,
                                     const struct otw_read_ev *ev, u8 parked, u64 arrival,
                                     u8 kverdict)
{
    u32 evf = ev->flags;
    u64 key = ev->sock_key;  /* the water probe's table has this socket: no fd walk */
#ifdef OTW_TP_AT_RECV
    if (!key) {   /* the table takes every TCP socket: this one is not TCP */
        c->n[OTW_CNT_NOT_SOCKET] += 1;
        return;
    }
#else
    if (!key && otw_fd_sock_key(fd, &key) < 0) {
        c->n[OTW_CNT_NOT_SOCKET] += 1;
        return;
    }
#endif
    struct goread_event *e = read_events.ringbuf_reserve(sizeof(struct goread_event));
    if (!e) {
        c->n[OTW_CNT_LOST] += 1;
        otw_lost_note(&c->lost_pending, &c->lost_since_ns, &c->lost_until_ns, end);
        return;
    }
    otw_lost_take(&c->lost_pending, &c->lost_since_ns, &c->lost_until_ns, &e->lost_before,
                  &e->lost_since_ns, &e->lost_until_ns);  /* losses before it: it says them */
    e->ts_start_ns = start;
    e->ts_end_ns = end;
    e->sock_key = key;
    e->returned = ret;
    e->requested = count;
    e->caller_ip = 0;
    e->arrival_ns = arrival;
    e->queue_delay_ns = (evf & OTW_EV_QDELAY) ? ev->qdelay_ns : 0;
    e->parked = parked;
    e->evidence = (u8)evf;
    e->send_ns = ev->send_ns;
    e->prev_arrival_ns = parked ? ev->prev_arrival_ns : 0;
    __builtin_memcpy(e->raddr, ev->raddr, 16);
    e->rport = ev->rport;
    e->role = ev->role;
    e->kverdict = kverdict;
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->fd = (s32)fd;
    e->source = OTW_SOURCE_TRACEPOINT;
    e->goid = 0;
    e->has_goid = 0;
    u32 goid_off = p->goid_off;
    u64 g = goid_off ? regs->r14 : 0;
    if (g && bpf_probe_read_user(&e->goid, sizeof(e->goid), (void *)(g + goid_off)) == 0)
        e->has_goid = 1;
    otw_read_links(e, g, p->links);   /* the request it served (goverdict.c) */
    long n = bpf_get_stack(ctx, e->ips, sizeof(e->ips), BPF_F_USER_STACK);
    e->stack_len = n > 0 ? n / sizeof(u64) : 0;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    read_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* Count a finished read. A slow one (it blocked the threshold, or it did not park but the bytes
 * it found had waited the threshold in the queue) is judged (otw_judge, goverdict.c); returns
 * its verdict when the read goes on the ring buffer, else 0. */
static __always_inline u8 otw_read_slow(struct goread_counts *c, u32 tgid, u64 start, u64 end,
                                        u8 parked, u64 arrival, const struct otw_read_ev *ev)
{
    u64 dur = end - start;
    int blocked = otw_count_read(c, dur);
    u32 evf = ev->flags;
    int qslow = !parked && (evf & OTW_EV_QDELAY) && ev->qdelay_ns >= OTW_THRESHOLD_NS;
    if (!blocked && !qslow)
        return 0;
    return otw_judge(c, tgid, blocked, parked, ev->role, start, end, arrival, ev->send_ns,
                     ev->prev_arrival_ns, evf, ev->qdelay_ns);
}

/* A parked read was woken by the first arrival onto its empty queue after the park (0:
 * unknown: the water probe did not see the socket, or nothing arrived since) */
static __always_inline u64 otw_woken_at(u8 parked, u64 start, const struct otw_read_ev *ev)
{
    if (parked && (ev->flags & OTW_EV_SOCKET) && ev->empty_arrival_ns >= start)
        return ev->empty_arrival_ns;
    return 0;
}

/* A read of a traced thread ended at `now` with `ret`. `enter`: when its read(2) began (alone:
 * sys_enter_read), or 0 in the watch, where this runs at sock_recv_length inside the read(2)
 * and a read that did not park is taken to have taken no time (the syscall's own microseconds
 * are not measured there; a parked read starts at its first -EAGAIN, all the same). */
static __always_inline void otw_read_end(void *ctx, struct task_struct *task,
                                         const struct goread_proc *p, u64 enter, u64 now,
                                         long ret, const struct otw_read_ev *ev)
{
    struct goread_counts *c = otw_counts();
    if (!c)
        return;
    c->n[OTW_CNT_ENTER] += 1;   /* reads whose start is known: alone, those entered since */
    c->n[OTW_CNT_EXIT] += 1;    /* attach; in the watch, every socket read */
    u64 id = otw_pid_tgid();
    u32 tgid = id >> 32;
    /* the user registers at the syscall: rdi = fd, rdx = count (still there at its end) */
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    long fd = regs->di;
    u64 g = p->goid_off ? regs->r14 : 0;
    if (ret == -OTW_EAGAIN) {
        c->n[OTW_CNT_PARKS] += 1;
        struct goread_park *pk = otw_park(p, tgid, fd, 1);
        if (!pk)
            return;
        /* a first attempt, or a park left by another goroutine (or an earlier owner of the
         * slot): start here; a repeated -EAGAIN of the same read keeps its first start */
        if (!pk->start_ns || pk->gen != p->gen || pk->g != g) {
            pk->start_ns = enter ? enter : now;
            pk->g = g;
            pk->gen = p->gen;
        }
        return;
    }
    u64 start = enter ? enter : now;
    u8 parked = 0;
    struct goread_park *pk = otw_park(p, tgid, fd, 0);
    if (pk && pk->start_ns) {
        if (pk->gen == p->gen && pk->g == g) {
            start = pk->start_ns;
            parked = 1;
        }
        pk->start_ns = 0;
    }
    u64 arrival = otw_woken_at(parked, start, ev);
    u8 v = otw_read_slow(c, tgid, start, now, parked, arrival, ev);
    if (!v)
        return;
    otw_read_emit(ctx, c, regs, p, id, fd, ret, regs->dx, start, now, ev, parked, arrival, v);
}

#ifdef OTW_TP_AT_RECV
/* The watch, on a socket the water probe watches: the park is the socket's own (water.c keeps
 * when and which goroutine parked in its entry), so a read that did not park needs no user
 * registers unless it is recorded. */

/* the *g of the current goroutine (user R14 at the syscall), 0 when not Go */
static __always_inline u64 otw_go_g(const struct goread_proc *p)
{
    if (!p->goid_off)
        return 0;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    return regs->r14;
}

static __always_inline void otw_watch_park(void)
{
    struct goread_counts *c = otw_counts();
    if (!c)
        return;
    c->n[OTW_CNT_ENTER] += 1;
    c->n[OTW_CNT_EXIT] += 1;
    c->n[OTW_CNT_PARKS] += 1;
}

/* A read of process `tgid` (the socket's reader, bpf/water.c) returned at `now`; park_start:
 * when its goroutine parked on the socket (0: it did not park, and is counted at 0 ns) */
static __always_inline void otw_watch_read_end(void *ctx, const struct goread_proc *p, u32 tgid,
                                               u64 now, long ret, const struct otw_read_ev *ev,
                                               u64 park_start)
{
    struct goread_counts *c = otw_counts();
    if (!c)
        return;
    c->n[OTW_CNT_ENTER] += 1;
    c->n[OTW_CNT_EXIT] += 1;
    u8 parked = park_start != 0;
    u64 start = parked ? park_start : now;
    u64 arrival = otw_woken_at(parked, start, ev);
    u8 v = otw_read_slow(c, tgid, start, now, parked, arrival, ev);
    if (!v)
        return;
    u64 id = otw_pid_tgid();   /* the thread too, for the record (a pod build: a helper) */
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    otw_read_emit(ctx, c, regs, p, id, regs->di, ret, regs->dx, start, now, ev, parked,
                  arrival, v);
}
#else
/* alone: the read(2) tracepoints (the watch calls otw_read_end from sock_recv_length) */
int otw_tp_read_enter(void *ctx)
{
    struct goread_task *ts = otw_go_task(bpf_get_current_task_btf());
    if (ts)
        ts->enter_ns = bpf_ktime_get_ns();
    return 0;
}

int otw_tp_read_exit(void *ctx)
{
    /* only threads whose sys_enter_read passed the pid filter have an enter time: no
     * second `procs` lookup (a thread of another process has no storage: a NULL check) */
    struct task_struct *task = bpf_get_current_task_btf();
    struct goread_task *ts = tasks.task_storage_get(task, 0, 0);
    if (!ts || !ts->enter_ns)
        return 0;   /* not traced, or entered before we attached */
    u64 now = bpf_ktime_get_ns();
    u64 enter = ts->enter_ns;
    ts->enter_ns = 0;
    long ret = *(long *)((char *)ctx + OTW_TP_RET_OFF);
    struct otw_read_ev ev = {};
    otw_read_end(ctx, task, &ts->proc, enter, now, ret, &ev);
    return 0;
}
#endif
