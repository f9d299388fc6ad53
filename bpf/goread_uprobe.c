/* goread_uprobe.c: the uprobe Go read sampler (--probes uprobe).
 *
 * Kernels: any with BTF, uprobes (CONFIG_UPROBES) and the BPF ring buffer (5.8+); built and
 * tested on 6.18 x86_64. Go 1.17+ amd64 (register ABI). Attaches to:
 *   uprobe net.(*conn).Read+0          otw_up_read_entry
 *   uprobe at every `ret` in it        otw_up_read_return
 * NEVER a uretprobe: it rewrites the return address on the goroutine stack, and Go (which
 * moves and scans its stacks) dies of it (docs/go.md).
 *
 * One program serves every traced binary: its uprobes are attached per binary (and pid), and
 * the binary's Go facts (struct goread_gofacts: runtime.g.goid's offset, where the labels and
 * start function are, and the fd's path from the receiver) come from maps Python writes before
 * it attaches: `up_procs` by tgid, the processes it knows, and `up_exes` by executable
 * (dev, inode), where a process started since Python's last /proc scan finds them
 * (otw_up_facts). A process in neither is timed and counted, never recorded (OTW_CNT_UNKNOWN).
 *
 * At entry: RAX = receiver *conn, RCX = len(b), R14 = *g. At a `ret`: RAX = n, RBX != 0 when
 * err != nil, [rsp] = the return address into the direct caller (the frame pointer was already
 * restored, so a frame-pointer walk from here skips that caller: it travels as caller_ip).
 * In-flight state is keyed by (tgid, *g): the goroutine may change thread between entry and
 * return, and its g is fixed for its life; the goid itself (*(g + goid_off)) is read only
 * for blocked reads. The LRU entry of a goroutine is inserted once and rewritten in place.
 * Every Read is counted with its exact Go-level latency, and needs no Go fact for it; a Read
 * lasting >= OTW_THRESHOLD_NS looks its process's facts up (one hash lookup by tgid), reads
 * goid, fd (*(*(conn + conn_fd) + netfd_sysfd)), the socket key and the user stack, and goes
 * out on the ring buffer without a wakeup; a record the ring buffer cannot take is counted,
 * and the next one this CPU delivers says how many and when. Compiled into the water probe
 * (OTW_WATER_EMBED) every return looks the facts up: the fd finds the socket's evidence.
 */
#include <linux/sched.h>
#define OTW_GOREAD_PROG 1
#include "sockkey.h"
#include "pidns.h"
#include "goread.h"
#ifndef OTW_WATER_EMBED
#define OTW_WATER_EMBED 0   /* 1 when bpf/water.c compiles this file in (socks is its map) */
#endif

#ifndef OTW_READ_RINGBUF_PAGES  /* pages of read_events; a macro of its own: compiled into
                                * bpf/water.c, whose `events` has OTW_RINGBUF_PAGES */
#define OTW_READ_RINGBUF_PAGES 64
#endif
#ifndef OTW_MAX_INFLIGHT
#define OTW_MAX_INFLIGHT 65536
#endif

#ifndef OTW_UP_MAX_PROCS
#define OTW_UP_MAX_PROCS 4096  /* processes entered by pid (more: found by executable) */
#endif
#ifndef OTW_UP_MAX_EXES
#define OTW_UP_MAX_EXES 1024   /* binaries traced at once */
#endif

BPF_TABLE("lru_hash", struct goread_key, struct goread_inflight, inflight, OTW_MAX_INFLIGHT);
BPF_PERCPU_ARRAY(counts, struct goread_counts, 1);
BPF_RINGBUF_OUTPUT(read_events, OTW_READ_RINGBUF_PAGES);
BPF_HASH(up_procs, u32, struct goread_gofacts, OTW_UP_MAX_PROCS);
BPF_HASH(up_exes, struct goread_exe, struct goread_gofacts, OTW_UP_MAX_EXES);
#include "goverdict.c"

/* The Go facts of the current process: by tgid when Python has entered it, else by its
 * executable (task->mm->exe_file->f_inode: a process of a traced binary started since
 * Python's last scan, traced from its first read). NULL: neither knows it. */
static __always_inline struct goread_gofacts *otw_up_facts(u32 tgid)
{
    struct goread_gofacts *gf = up_procs.lookup(&tgid);
    if (gf)
        return gf;
    const char *task = (const char *)bpf_get_current_task();
    const char *mm = 0, *file = 0, *inode = 0, *sb = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), task + OFF_TASK_MM);
    if (!mm)
        return 0;
    bpf_probe_read_kernel(&file, sizeof(file), mm + OFF_MM_EXE_FILE);
    if (!file)
        return 0;
    bpf_probe_read_kernel(&inode, sizeof(inode), file + OFF_FILE_INODE);
    if (!inode)
        return 0;
    struct goread_exe x = {};
    u32 dev = 0;
    bpf_probe_read_kernel(&x.ino, sizeof(x.ino), inode + OFF_INODE_INO);
    bpf_probe_read_kernel(&sb, sizeof(sb), inode + OFF_INODE_SB);
    if (sb)
        bpf_probe_read_kernel(&dev, sizeof(dev), sb + OFF_SB_DEV);
    x.dev = dev;
    return up_exes.lookup(&x);
}

int otw_up_read_entry(struct pt_regs *ctx)
{
    u64 now = bpf_ktime_get_ns();
    struct goread_key k = {};
    k.g = ctx->r14;
    k.tgid = otw_pid_tgid() >> 32;
    if (!k.tgid)    /* a process of another pid namespace (bpf/pidns.h): the same file in
                     * another pod (an image layer's inode is shared); not ours */
        return 0;
    u32 zero = 0;
    struct goread_counts *c = counts.lookup(&zero);
    struct goread_inflight *f = inflight.lookup(&k);
    if (f) {
        if (f->start_ns) {
            /* entered again before returning: the prologue's stack-growth path restarts the
             * function; it is the same Read, keep its first start */
            if (c)
                c->n[OTW_CNT_REENTER] += 1;
            return 0;
        }
        f->start_ns = now;
        f->conn = ctx->ax;
        f->requested = ctx->cx;
    } else {
        struct goread_inflight fresh = {};
        fresh.start_ns = now;
        fresh.conn = ctx->ax;
        fresh.requested = ctx->cx;
        inflight.update(&k, &fresh);
    }
    if (c)
        c->n[OTW_CNT_ENTER] += 1;
    return 0;
}

int otw_up_read_return(struct pt_regs *ctx)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = otw_pid_tgid();
    struct goread_key k = {};
    k.g = ctx->r14;
    k.tgid = id >> 32;
    if (!k.tgid)    /* another pid namespace's process (as at entry) */
        return 0;
    u32 zero = 0;
    struct goread_counts *c = counts.lookup(&zero);
    if (!c)
        return 0;
    c->n[OTW_CNT_EXIT] += 1;
    struct goread_inflight *f = inflight.lookup(&k);
    if (!f || !f->start_ns) {
        c->n[OTW_CNT_ORPHAN] += 1;
        return 0;
    }
    u64 start = f->start_ns;
    f->start_ns = 0;
    u64 dur = now - start;
    int blocked = otw_count_read(c, dur);
#if !OTW_WATER_EMBED
    if (!blocked)
        return 0;
#endif
    struct goread_gofacts *gf = otw_up_facts(k.tgid);
    if (!gf) {
        if (blocked)
            c->n[OTW_CNT_UNKNOWN] += 1;
        return 0;
    }

    /* fd from the receiver: conn.fd (*netFD) -> netFD.pfd (poll.FD) .Sysfd (int) */
    u64 netfd = 0;
    s64 fd = -1;
    bpf_probe_read_user(&netfd, sizeof(netfd), (void *)(f->conn + gf->conn_fd));
    if (netfd)
        bpf_probe_read_user(&fd, sizeof(fd), (void *)(netfd + gf->netfd_sysfd));
    u64 key = 0;
    u32 evf = 0;
    u64 arrival = 0, qdelay = 0, send = 0, prev_arrival = 0;
    u8 role = 0;
    const u8 *peer = 0;
    u16 rport = 0;
#if OTW_WATER_EMBED
    /* compiled into the water probe: this Read's last read(2) just returned on the socket,
     * and the water probe noted its evidence there (otw_note_read) */
    const char *sk = 0;
    if (otw_fd_sock(fd, &sk) < 0) {
        if (blocked)
            c->n[OTW_CNT_NOT_SOCKET] += 1;
        return 0;
    }
    u64 skey = (u64)sk;
    struct water_sock *ws = socks.lookup(&skey);
    if (ws && ws->s.watched && ws->a.ev_read_ns >= start && ws->a.ev_read_ns <= now) {
        evf = ws->a.ev_flags;
        arrival = ws->a.ev_arrival_ns;
        qdelay = ws->a.ev_qdelay_ns;
        send = ws->a.ev_send_ns;
        prev_arrival = ws->a.ev_prev_arrival_ns;
        role = ws->s.role;
        rport = ws->s.rport;
        peer = ws->s.raddr;
    }
    /* not blocked: still a slow read if the bytes it found had waited the threshold */
    int qslow = !(evf & OTW_EV_PARKED) && (evf & OTW_EV_QDELAY) && qdelay >= OTW_THRESHOLD_NS;
    if (!blocked && !qslow)
        return 0;
    if (ws && ws->s.watched)
        key = ws->s.sock_key;
    else if (otw_fd_sock_key(fd, &key) < 0)
        return 0;
#else
    if (otw_fd_sock_key(fd, &key) < 0) {
        c->n[OTW_CNT_NOT_SOCKET] += 1;
        return 0;
    }
#endif
    /* the kernel's verdict, counted whether or not the read is recorded */
    u8 parked = (evf & OTW_EV_PARKED) ? 1 : 0;
    u8 v = otw_judge(c, k.tgid, blocked, parked, role, start, now, arrival, send, prev_arrival,
                     evf, qdelay);
    if (!v)
        return 0;
    struct goread_event *e = read_events.ringbuf_reserve(sizeof(struct goread_event));
    if (!e) {
        c->n[OTW_CNT_LOST] += 1;
        otw_lost_note(&c->lost_pending, &c->lost_since_ns, &c->lost_until_ns, now);
        return 0;
    }
    otw_lost_take(&c->lost_pending, &c->lost_since_ns, &c->lost_until_ns, &e->lost_before,
                  &e->lost_since_ns, &e->lost_until_ns);  /* losses before it: it says them */
    e->ts_start_ns = start;
    e->ts_end_ns = now;
    e->sock_key = key;
    e->returned = (s64)ctx->ax;
    e->requested = f->requested;
    e->pid = k.tgid;
    e->tid = (u32)id;
    e->fd = (s32)fd;
    e->source = OTW_SOURCE_UPROBE;
    e->goid = 0;
    e->has_goid = 0;
    if (k.g && bpf_probe_read_user(&e->goid, sizeof(e->goid), (void *)(k.g + gf->goid_off)) == 0)
        e->has_goid = 1;
    otw_read_links(e, k.g, gf->links);    /* the request it served (goverdict.c) */
    e->caller_ip = 0;
    e->arrival_ns = arrival;        /* 0 and no evidence when the water probe runs apart */
    e->queue_delay_ns = (evf & OTW_EV_QDELAY) ? qdelay : 0;
    e->parked = parked;
    e->evidence = (u8)evf;
    e->send_ns = send;
    e->prev_arrival_ns = parked ? prev_arrival : 0;
    e->rport = rport;
    e->role = role;
    e->kverdict = v;
    if (peer)
        bpf_probe_read_kernel(e->raddr, 16, peer);
    else
        __builtin_memset(e->raddr, 0, 16);
    bpf_probe_read_user(&e->caller_ip, sizeof(e->caller_ip), (void *)ctx->sp);
    long n = bpf_get_stack(ctx, e->ips, sizeof(e->ips), BPF_F_USER_STACK);
    e->stack_len = n > 0 ? n / sizeof(u64) : 0;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    read_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 0;
}
