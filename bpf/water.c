/* water.c: the kernel water-level probe.
 *
 * Kernels: any with BTF and these tracepoints (sock:sk_data_ready and sock:sock_recv_length
 * appeared in 6.x; raw skb:kfree_skb with rx_sk in 6.9+); built and tested on 6.18 x86_64.
 * Attaches to raw tracepoints only (no kprobes, no fentry: docs/kernel.md); raw, because they
 * hand the program the tracepoint's arguments without filling a perf record first:
 *   sock:sk_data_ready          rain: an arrival made the socket readable
 *   sock:sock_recv_length       drain: a recvmsg/read returned
 *   skb:kfree_skb               overflow: a dropped skb with its receiving socket and reason
 *   sock:sock_rcvqueue_full     overflow on the generic queueing path
 *   sock:inet_sock_set_state    state changes: TCP_CLOSE ends a socket (water left at close)
 *   tcp:tcp_destroy_sock        the socket is destroyed (catches closes we missed)
 * The arguments carry no protocol: a socket is taken into the table once, if it is TCP.
 *
 * Every struct offset is an OFF_* macro the loader (otelwater/probes/kernel.py) took from the
 * running kernel's BTF; headers only make BCC compile. Per event: one in-place lookup of the
 * socket's state, the queue figures of struct sock and tcp_sock's sequence numbers (direct
 * loads through the kfunc bpf_rdonly_cast where the kernel allows it, else two probe reads),
 * no clock unless a record is made (or Go readers are traced: their evidence is timed),
 * and a ring-buffer record only when something worth saying happened: the volume rose above
 * high water, a new peak (+1/8), the water fell back below low water (these three at most once
 * per OTW_LEVEL_GAP_NS per socket), a drop (at most one record per OTW_OVERFLOW_GAP_NS per
 * socket), a close, or any event with OTW_FOLLOW.
 * Lost records (ring buffer full) are counted per CPU and located in-band: the next record
 * the CPU delivers carries how many were lost before it, the first and the last loss time.
 * Filtering: the first event on a socket decides whether it is watched (ports, then pids or
 * their socket inodes, then cgroup); the verdict is cached in the same map entry, so a
 * filtered-out socket costs one lookup afterwards. Compiled for a pod (OTW_NETNS_ONLY), the
 * sockets of other network namespaces are not taken in at all.
 */
#include "water.h"
#include "sockkey.h"
#include "pidns.h"
#if OTW_GO_TP || OTW_GO_UPROBE
#define OTW_GOREAD_PROG 1  /* goread.h's sampler part (its maps) too */
#endif
#include "goread.h"

#ifndef OTW_MAX_SOCKETS
#define OTW_MAX_SOCKETS 65536
#endif
#ifndef OTW_RINGBUF_PAGES
#define OTW_RINGBUF_PAGES 64
#endif
#ifndef OTW_OVERFLOW_GAP_NS
#define OTW_OVERFLOW_GAP_NS 100000000ULL
#endif
#ifndef OTW_LEVEL_GAP_NS
#define OTW_LEVEL_GAP_NS 10000000ULL /* at most one rise/peak/fall record per socket per 10 ms */
#endif
#ifndef OTW_HIGH_WATER
#define OTW_HIGH_WATER 65536
#endif
#ifndef OTW_LOW_WATER
#define OTW_LOW_WATER (OTW_HIGH_WATER / 2)
#endif

#define OTW_IPPROTO_TCP 6

/* LRU: a socket whose close we missed is evicted, not kept forever. A plain hash ("hash",
 * bench/water_overhead.py --variant) measured no cheaper a lookup here (bench/README.md). */
#ifndef OTW_SOCKS_TYPE
#define OTW_SOCKS_TYPE "lru_hash"
#endif
BPF_TABLE(OTW_SOCKS_TYPE, u64, struct water_sock, socks, OTW_MAX_SOCKETS);
BPF_PERCPU_ARRAY(fresh_sock, struct water_sock, 1); /* scratch: too big for the BPF stack */
BPF_ARRAY(cfg, struct water_cfg, 1);
BPF_PERCPU_ARRAY(lost, struct water_lost, 1);
BPF_RINGBUF_OUTPUT(events, OTW_RINGBUF_PAGES);
/* (network namespace inode << 16 | port) of listening sockets: a socket whose local port is a
 * listener's was accepted, else dialed. Python writes the listeners it finds at start; the
 * kernel adds the port of every connection accepted since (SYN_RECV -> ESTABLISHED). An LRU
 * table: listeners come and go for weeks (restarts, pods); the least recently used one goes
 * when it is full, and every connection accepted through it puts its port back before the
 * connection's first event asks (a lookup a socket, not an event). */
BPF_TABLE("lru_hash", u64, u8, listen_ports, 16384);

#ifndef OTW_QSLOW_PER_S
#define OTW_QSLOW_PER_S 200 /* queue-delay slow reads recorded per socket per second (on
                             * average, a token bucket: evenly spread, OTW_QSLOW_BURST at once;
                             * a lagging socket makes every read slow, a body read in 4 KiB
                             * pieces dozens per stall), the rest counted */
#endif
#ifndef OTW_QSLOW_BURST
#define OTW_QSLOW_BURST 32
#endif
#define OTW_MSG_PEEK 2

/* `otelwater watch --go-*`: the Go read sampler is compiled into this program (the loader
 * inlines the file), so it reads each read's evidence from this program's maps: the
 * tracepoint sampler is called by sock_recv_length itself (which runs inside the read(2)),
 * the uprobe sampler reads the socket's entry (its fd walk finds the socket) */
#define OTW_READ_EVIDENCE (OTW_GO_TP || OTW_GO_UPROBE)
#define OTW_EAGAIN 11
#if OTW_GO_TP
#define OTW_TP_AT_RECV 1   /* its reads end in this program's sock_recv_length */
#include "goread_tp.c"
#endif

#if OTW_FILTER_PORTS
BPF_ARRAY(watch_ports, u8, 65536);
#endif
#if OTW_FILTER_PIDS
BPF_HASH(watch_pids, u32, u8, 4096);
BPF_HASH(watch_inodes, u64, u8, 65536);
#endif
#if OTW_FILTER_CGROUPS
BPF_HASH(watch_cgroups, u64, u8, 4096);   /* the --cgroup directories and every cgroup below */
#endif

static __always_inline u64 otw_sock_ino(const void *sk)
{
    const char *sock = 0;
    u64 ino = 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), (const char *)sk + OFF_SK_SOCKET);
    if (sock)
        bpf_probe_read_kernel(&ino, sizeof(ino), sock + OFF_SOCKALLOC_INODE + OFF_INODE_INO);
    return ino;
}

/* The peer's FIN arrived: SOCK_DONE in sk_flags (what SIOCINQ checks before leaving the FIN's
 * sequence number out of the unread bytes). Read at creation, state changes and close only. */
static __always_inline u8 otw_fin(const void *sk)
{
    unsigned long flags = 0;
    bpf_probe_read_kernel(&flags, sizeof(flags), (const char *)sk + OFF_SK_FLAGS);
    return (flags >> OTW_SOCK_DONE_BIT) & 1;
}

/* Is this socket one the user asked to watch? process_ctx: we run in the context of a
 * process reading the socket (sock_recv_length), so the current pid/cgroup say who owns it.
 * Arrivals, drops and state changes (closes included) can run in softirq on behalf of another
 * process (on loopback: the sender's), so they decide by the socket's inode only. */
static __always_inline int otw_decide(const struct water_state *st, int process_ctx)
{
#if OTW_FILTER_PORTS
    u32 lp = st->lport, rp = st->rport;
    u8 *hit = watch_ports.lookup(&lp);
    if (!hit || !*hit) {
        hit = watch_ports.lookup(&rp);
        if (!hit || !*hit)
            return 0;
    }
#endif
#if OTW_FILTER_PIDS
    {
        int ok = 0;
        if (process_ctx) {
            u32 tgid = otw_pid_tgid() >> 32;
            if (watch_pids.lookup(&tgid))
                ok = 1;
        }
        if (!ok && st->ino) {
            u64 ino = st->ino;
            if (watch_inodes.lookup(&ino))
                ok = 1;
        }
        if (!ok)
            return 0;
    }
#endif
#if OTW_FILTER_CGROUPS
    if (!process_ctx)
        return 0;
    {
        u64 cg = bpf_get_current_cgroup_id();
        if (!watch_cgroups.lookup(&cg))
            return 0;
    }
#endif
    return 1;
}

#define OTW_MAX2(a, b) ((a) > (b) ? (a) : (b))

#if OTW_KF_RDONLY_CAST
/* Direct reads. The kfunc bpf_rdonly_cast(ptr, BTF type id) (6.2+, every program type) types
 * its result as an untrusted pointer to that struct of the running kernel: the verifier turns
 * the call into a register move, checks each load against the struct's BTF (a load must lie
 * within one member) and makes it a fault-tolerant load, as bpf_probe_read_kernel would be,
 * but inline: no helper call (the two probe reads cost ~115 ns an event here, the direct
 * loads next to nothing: bench/README.md). BCC 0.26 cannot emit a kfunc call, so it is spelled
 * out: `call` with src_reg BPF_PSEUDO_KFUNC_CALL (2) and the kfunc's BTF id as imm. The loader
 * (otelwater/probes/loader.py, direct_read_cflags) passes the ids (OTW_KF_RDONLY_CAST,
 * OTW_BTF_SOCK, OTW_BTF_TCP_SOCK) once a test program making the same loads has passed the
 * verifier; else OTW_KF_RDONLY_CAST=0 and probe reads. */
/* The call scratches r0-r5, but BCC compiles with the host's front end, which knows no such
 * register names, and defines no macro that tells its BPF pass apart (__bpf__ is never
 * defined under BCC 0.26): the clobbers below are never in effect. The compiler may then
 * keep a value in r1-r5 across the call; the verifier refuses such a program (Rn !read_ok)
 * and the loader loads it again with probe reads (otelwater/probes/loader.py, load_bpf). */
#ifdef __bpf__
#define OTW_KF_CLOBBERS : "r0", "r1", "r2", "r3", "r4", "r5"
#else
#define OTW_KF_CLOBBERS
#endif
#define OTW_STR_(x) #x
#define OTW_STR(x) OTW_STR_(x)

/* the address as a plain number: BCC's rewriter turns a dereference of anything it sees
 * derived from the tracepoint's arguments into a bpf_probe_read_kernel */
static __always_inline u64 otw_kaddr(const void *p)
{
    u64 a;
    __builtin_memcpy(&a, &p, sizeof(a));
    return a;
}

#define OTW_RDONLY_CAST(addr, btf_id) ({                                                  \
    u64 __p;                                                                              \
    asm volatile("r1 = %[a]\n\t"                                                         \
                 "r2 = " OTW_STR(btf_id) "\n\t"                                           \
                 ".byte 0x85, 0x20, 0, 0\n\t"                                              \
                 ".long " OTW_STR(OTW_KF_RDONLY_CAST) "\n\t"                               \
                 "%[p] = r0"                                                              \
                 : [p] "=r"(__p) : [a] "r"(addr) OTW_KF_CLOBBERS);                        \
    __p; })
#define OTW_U32_AT(base, off) (*(const u32 *)((base) + (off)))
#endif

static __always_inline void otw_refresh(const void *sk, struct water_state *st)
{
#if OTW_KF_RDONLY_CAST
    u64 a = otw_kaddr(sk);
    u64 k = OTW_RDONLY_CAST(a, OTW_BTF_SOCK);
    st->level = OTW_U32_AT(k, OFF_SK_RCVQ_QLEN);
    st->volume = OTW_U32_AT(k, OFF_SK_RMEM_ALLOC);
    st->backlog = OTW_U32_AT(k, OFF_SK_BACKLOG_LEN);
    st->capacity = OTW_U32_AT(k, OFF_SK_RCVBUF);
    st->drops = OTW_U32_AT(k, OFF_SK_DROPS);
    u64 t = OTW_RDONLY_CAST(a, OTW_BTF_TCP_SOCK);
    st->rcv_nxt = OTW_U32_AT(t, OFF_TCP_RCV_NXT);
    st->copied_seq = OTW_U32_AT(t, OFF_TCP_COPIED_SEQ);
#else
    /* one buffer for both reads (the stack is near its 512 bytes with a Go sampler inside) */
    u8 buf[OTW_MAX2(OTW_SPAN_LEN, OTW_SEQ_LEN)];
    bpf_probe_read_kernel(buf, OTW_SPAN_LEN, (const char *)sk + OTW_SPAN_START);
    st->level = *(u32 *)&buf[OFF_SK_RCVQ_QLEN - OTW_SPAN_START];
    st->volume = *(u32 *)&buf[OFF_SK_RMEM_ALLOC - OTW_SPAN_START];
    st->backlog = *(u32 *)&buf[OFF_SK_BACKLOG_LEN - OTW_SPAN_START];
    st->capacity = *(u32 *)&buf[OFF_SK_RCVBUF - OTW_SPAN_START];
    st->drops = *(u32 *)&buf[OFF_SK_DROPS - OTW_SPAN_START];
#if OTW_SEQ_LEN
    /* rcv_nxt and copied_seq in one probe read: ~20 ns less than two */
    bpf_probe_read_kernel(buf, OTW_SEQ_LEN, (const char *)sk + OTW_SEQ_START);
    st->rcv_nxt = *(u32 *)&buf[OFF_TCP_RCV_NXT - OTW_SEQ_START];
    st->copied_seq = *(u32 *)&buf[OFF_TCP_COPIED_SEQ - OTW_SEQ_START];
#else
    u32 seq[2] = {};
    bpf_probe_read_kernel(&seq[0], 4, (const char *)sk + OFF_TCP_RCV_NXT);
    bpf_probe_read_kernel(&seq[1], 4, (const char *)sk + OFF_TCP_COPIED_SEQ);
    st->rcv_nxt = seq[0];
    st->copied_seq = seq[1];
#endif
#endif
}

static __always_inline struct water_arrivals *otw_arrivals(struct water_state *st)
{
    return &((struct water_sock *)st)->a;
}

/* The reading process's tgid as user space numbers it (bpf/pidns.h). In a pod build the
 * namespace's number costs a helper call (+106 ns a read here, bench/README.md); it is asked
 * again only when the reader's host tgid (one cheap helper) changes, so a socket read by one
 * process pays it once. Called on watched sockets only (the state's pid is then the reads'). */
static __always_inline u32 otw_reader_tgid(struct water_state *st)
{
#ifdef OTW_PIDNS_INO
    u32 host = bpf_get_current_pid_tgid() >> 32;
    struct water_arrivals *a = otw_arrivals(st);
    if (a->reader_host_tgid == host && st->pid)
        return st->pid;
    a->reader_host_tgid = host;
#endif
    return otw_pid_tgid() >> 32;
}

#if OTW_GO_TP
/* Is the socket's reader a traced process (its goread_proc), or NULL? The `procs` hash is
 * asked once per socket and reader, and again when its generation moved; the answer stays in
 * the socket's entry: a read pays an array lookup, not task storage (~90 ns a hit here). */
static __always_inline const struct goread_proc *otw_go_proc(struct water_state *st, u32 tgid)
{
    struct water_arrivals *a = otw_arrivals(st);
    u32 zero = 0;
    u32 *gen = procs_gen.lookup(&zero);
    u32 g = gen ? *gen : 0;
    if (a->go_tgid != tgid || a->go_gen != g) {
        struct goread_proc *p = procs.lookup(&tgid);
        a->go_tgid = tgid;
        a->go_gen = g;
        a->go_known = p != 0;
        if (p) {
            a->go_slot = p->slot;
            a->go_slot_gen = p->gen;
            a->go_goid_off = p->goid_off;
            a->go_links = p->links;
        }
    }
    return a->go_known ? (const struct goread_proc *)&a->go_slot : 0;
}
#endif

static __always_inline u64 otw_listen_key(u32 netns, u16 lport)
{
    return (u64)netns << 16 | lport;
}

/* Dialed or accepted, by the listeners of the socket's namespace: decided once Python has
 * written the listeners it found at start (the filter generation moves from 0 after that); a
 * socket seen before stays unknown until its next event. */
static __always_inline void otw_decide_role(struct water_state *st)
{
    u32 zero = 0;
    struct water_cfg *c = cfg.lookup(&zero);
    if (!c || !c->generation)
        return;
    u64 lk = otw_listen_key(st->netns, st->lport);
    st->role = listen_ports.lookup(&lk) ? OTW_ROLE_ACCEPTED : OTW_ROLE_DIALED;
}

/* The socket's state entry, created on first sight. NULL when the socket is not watched. */
static __always_inline struct water_state *otw_state(const void *sk, int process_ctx)
{
    u64 key = (u64)sk;
    struct water_sock *ws = socks.lookup(&key);
    if (ws) {
        struct water_state *st = &ws->s;
        if (st->watched) {
            if (!st->role)
                otw_decide_role(st);
            return st;
        }
#if OTW_FILTER_PORTS || OTW_FILTER_PIDS || OTW_FILTER_CGROUPS
        /* filtered out earlier: decide again only if the filter sets changed since (the
         * loader bumps the generation once the filters are written, so a socket decided
         * while they were still being written is decided again), or, for pid and cgroup
         * filters, a process reading the socket shows itself */
        u32 zero = 0;
        struct water_cfg *c = cfg.lookup(&zero);
        if (!c)
            return 0;
        int again = 0;
        u32 tgid = 0;
        if ((OTW_FILTER_PIDS || OTW_FILTER_CGROUPS) && process_ctx) {
            /* a reader other than the one already turned away */
            tgid = otw_pid_tgid() >> 32;
            again = tgid != st->pid;
        }
        if (c->generation == st->generation && !again)
            return 0;
        st->generation = c->generation;
        if (process_ctx)
            st->pid = tgid;  /* remembered for the check above (a watched socket's pid is
                              * set by its reads anyway) */
        if (!st->ino)
            st->ino = otw_sock_ino(sk);
        if (!otw_decide(st, process_ctx))
            return 0;
        st->watched = 1;
        return st;
#else
        return 0;
#endif
    }
    /* raw tracepoints carry no protocol: a socket is taken in once, if it is TCP */
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, SIZE_SK_PROTOCOL, (const char *)sk + OFF_SK_PROTOCOL);
    if (proto != OTW_IPPROTO_TCP)
        return 0;
#ifdef OTW_NETNS_ONLY
    /* an agent in a pod (bpf/pidns.h) watches its pod's network namespace only: another
     * one's socket is never taken in (on a busy node it would crowd the table out); each of
     * its events costs this lookup miss and three reads */
    if (otw_sock_netns(sk) != OTW_NETNS_ONLY)
        return 0;
#endif
    u8 state = 0;
    bpf_probe_read_kernel(&state, 1, (const char *)sk + OFF_SKC_STATE);
    /* a listener holds no data; a closed socket has been reported at its close (an event
     * after it, e.g. the owner reading the EOF, would take it in again under a key computed
     * after its port was released: lport 0, a socket that never was) */
    if (state == OTW_TCP_LISTEN || state == OTW_TCP_CLOSE)
        return 0;
    u32 zero = 0;
    struct water_sock *fresh = fresh_sock.lookup(&zero);
    if (!fresh)
        return 0;
    __builtin_memset(fresh, 0, sizeof(*fresh));
    struct otw_tuple t = {};
    if (otw_sock_tuple(sk, &t) < 0)
        return 0;
    struct water_state *f = &fresh->s;
    __builtin_memcpy(f->laddr, t.laddr, 16);
    __builtin_memcpy(f->raddr, t.raddr, 16);
    f->lport = t.lport;
    f->rport = t.rport;
    f->netns = t.netns;
    f->ino = otw_sock_ino(sk);
    f->tcp_state = state;
    f->role = state == OTW_TCP_SYN_SENT ? OTW_ROLE_DIALED
            : state == OTW_TCP_SYN_RECV ? OTW_ROLE_ACCEPTED : OTW_ROLE_UNKNOWN;
    if (!f->role)
        otw_decide_role(f);
    f->fin = otw_fin(sk);
    /* the key is computed once, for every socket: one decided "not watched" now may be
     * decided "watched" later (a new connection's first arrival comes before its inode is
     * known to the pid filter) and must then carry its real key */
    f->sock_key = otw_sock_key(&t);
    struct water_cfg *c = cfg.lookup(&zero);
    if (c)
        f->generation = c->generation;
    f->watched = otw_decide(f, process_ctx);
    int watched = f->watched;
    socks.update(&key, fresh);
    if (!watched)
        return 0;
    ws = socks.lookup(&key);
    return ws ? &ws->s : 0;
}

/* One record on the ring buffer. A loss is counted and travels in-band: the next record this
 * CPU delivers says how many were lost before it and when (otw_lost_take, goread.h).
 * The per-CPU slot is looked up here only, on the emit path. */
static __always_inline void otw_emit(struct water_state *st, u8 trigger, u64 now)
{
    u32 zero = 0;
    struct water_lost *l = lost.lookup(&zero);
    struct water_event *e = events.ringbuf_reserve(sizeof(struct water_event));
    if (!e) {
        if (l) {
            __sync_fetch_and_add(&l->total, 1);
            otw_lost_note(&l->pending, &l->since_ns, &l->until_ns, now);
        }
        return;
    }
    __builtin_memcpy(&e->s, st, sizeof(struct water_state));
    e->ts_ns = now;
    e->tid = (u32)otw_pid_tgid();
    e->trigger = trigger;
    if (l) {
        otw_lost_take(&l->pending, &l->since_ns, &l->until_ns, &e->lost_before,
                      &e->lost_since_ns, &e->lost_until_ns);
    } else {
        e->lost_before = 0;
        e->lost_since_ns = 0;
        e->lost_until_ns = 0;
    }
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    st->last_emit_ns = now;
}

/* After an arrival or a read: update the level marks, emit when they say so. A reader that
 * drains in large chunks crosses the marks on every read: records for one socket are spaced
 * at least OTW_LEVEL_GAP_NS apart (the marks keep moving; the sweep reports the last state).
 * now: the event's time, or 0 when the event has not read the clock (no Go readers: only a
 * record needs the time, and a clock read costs ~60 ns here, a fifth of the program). */
static __always_inline void otw_after_flow(struct water_state *st, u8 trigger, u64 now)
{
#if OTW_EVENT_CLOCK   /* the clock on every event, as before (bench/water_overhead.py --variant) */
    if (!now)
        now = bpf_ktime_get_ns();
#endif
    int emit = 0;
#if OTW_FOLLOW
    emit = 2;
#endif
    if (!st->above) {
        if (st->volume >= OTW_HIGH_WATER) {
            st->above = 1;
            st->peak_volume = st->volume;
            emit |= 1;
        }
    } else if (st->volume < OTW_LOW_WATER) {
        st->above = 0;
        emit |= 1;
    } else if (st->volume > st->peak_volume + (st->peak_volume >> 3)) {
        st->peak_volume = st->volume;
        emit |= 1;
    }
    st->changes += 1;
    st->last_trigger = trigger;
    if (!emit) {
#if OTW_READ_EVIDENCE || OTW_EVENT_CLOCK
        st->last_ts_ns = now;
#endif
        return;
    }
    if (!now)
        now = bpf_ktime_get_ns();
    st->last_ts_ns = now;
    if (emit == 1 && st->last_emit_ns && now - st->last_emit_ns < OTW_LEVEL_GAP_NS)
        return;
    otw_emit(st, trigger, now);
}

#if OTW_GO_UPROBE
#define OTW_WATER_EMBED 1
#include "goread_uprobe.c"
#endif

RAW_TRACEPOINT_PROBE(sk_data_ready)
{
    /* TP_PROTO(const struct sock *sk) */
    const void *sk = (const void *)ctx->args[0];
    struct water_state *st = otw_state(sk, 0);
    if (!st)
        return 0;
#if OTW_READ_EVIDENCE
    u32 before = st->rcv_nxt;
    int known = st->changes != 0;   /* rcv_nxt of an earlier event is in st */
#endif
    otw_refresh(sk, st);
#if OTW_READ_EVIDENCE
    u64 now = bpf_ktime_get_ns();
    if (!known || st->rcv_nxt != before) {
        /* remember the arrival: what it brought ends at rcv_nxt; when the queue was empty
         * before it (everything up to the previous rcv_nxt read), it starts at that */
        struct water_arrivals *a = otw_arrivals(st);
        u32 i = a->head & (OTW_ARRIVALS - 1);
        int onto_empty = known && st->copied_seq == before;
        a->ts_ns[i] = now;
        a->seq[i] = st->rcv_nxt;
        a->from[i] = onto_empty ? before : st->rcv_nxt;
        a->head += 1;
        if (onto_empty) {
            st->empty_arrival_ns = now;
            a->arrival_send_ns = a->last_send_ns;
        }
    }
#else
    u64 now = 0;    /* read only if a record is made */
#endif
    otw_after_flow(st, OTW_TRIGGER_ARRIVAL, now);
    return 0;
}

#if OTW_READ_EVIDENCE
static __always_inline void otw_read_ev_peer(struct otw_read_ev *ev, const struct water_state *st)
{
    __builtin_memcpy(ev->raddr, st->raddr, 16);
    ev->rport = st->rport;
    ev->role = st->role;
}

/* Our sends: sock:sock_send_length runs inside every sendmsg/write on a socket, in the
 * sender's context. With a Go reader traced, a socket's last send splits a parked read's wait
 * into idle and waiting for the peer (otw_kverdict). An entry lookup in place a send. */
RAW_TRACEPOINT_PROBE(sock_send_length)
{
    /* TP_PROTO(struct sock *sk, int ret, int flags) */
    int ret = (int)ctx->args[1];
    if (ret <= 0)
        return 0;
    const void *sk = (const void *)ctx->args[0];
    struct water_state *st = otw_state(sk, 1);
    if (st)
        otw_arrivals(st)->last_send_ns = bpf_ktime_get_ns();
    return 0;
}

/* A read on a watched socket returned (sock_recv_length: inside the reader's read(2)). Keep,
 * in the socket's kernel-only part, what the Go read sampler asks about it: whether the
 * reader parked since its last read (a -EAGAIN), the arrival that woke it (the last arrival
 * onto an empty queue, when after the park), and the queue delay of the oldest byte this read
 * returned, found among the socket's last OTW_ARRIVALS arrivals. */
static __always_inline void otw_note_read(struct water_state *st, int ret, int flags, u64 now,
                                          struct otw_read_ev *ev)
{
    struct water_arrivals *a = otw_arrivals(st);
    if (ret < 0)   /* -EAGAIN never gets here: sock_recv_length marks the park itself */
        return;
    u32 evf = OTW_EV_SOCKET;
    u64 arrival = 0, qd = 0;
    /* our last send before the arrival that woke the read (a later one is a response to it) */
    u64 send = a->last_send_ns;
    if (a->park_ns) {
        evf |= OTW_EV_PARKED;
        if (st->empty_arrival_ns >= a->park_ns) {
            arrival = st->empty_arrival_ns;
            send = a->arrival_send_ns;
        }
        a->park_ns = 0;
    }
    if (ret > 0 && !(flags & OTW_MSG_PEEK)) {
        u32 oldest = st->copied_seq - (u32)ret;   /* the first byte this read returned */
        u32 n = a->head < OTW_ARRIVALS ? a->head : OTW_ARRIVALS;
        u64 arrived = 0;
        int exact = 0;
#pragma unroll
        for (int k = 0; k < OTW_ARRIVALS; k++) {
            if (k >= n)
                break;
            u32 i = (a->head - n + k) & (OTW_ARRIVALS - 1);
            if ((s32)(a->seq[i] - oldest) > 0) {   /* the first arrival that brought it */
                arrived = a->ts_ns[i];
                /* exact when what came before this arrival is known: the previous arrival
                 * is remembered (its seq is at or below the byte), or the queue was empty */
                exact = k > 0 || (s32)(oldest - a->from[i]) >= 0;
                break;
            }
        }
        if (arrived && now >= arrived) {
            qd = now - arrived;
            evf |= OTW_EV_QDELAY | (exact ? OTW_EV_EXACT : 0);
            if (qd >= OTW_THRESHOLD_NS) {
                /* GCRA: one token every 1 s / OTW_QSLOW_PER_S, OTW_QSLOW_BURST at most */
                u64 gap = 1000000000ULL / OTW_QSLOW_PER_S;
                u64 tat = a->qslow_tat_ns > now ? a->qslow_tat_ns : now;
                if (tat - now <= (OTW_QSLOW_BURST - 1) * gap) {
                    a->qslow_tat_ns = tat + gap;
                    evf |= OTW_EV_QSLOW_OK;
                }
            }
        }
    }
    ev->sock_key = st->sock_key;
    ev->empty_arrival_ns = st->empty_arrival_ns;
    ev->qdelay_ns = qd;
    ev->flags = evf;
    ev->send_ns = send;
    ev->prev_arrival_ns = a->park_arrival_ns;
    otw_read_ev_peer(ev, st);
#if OTW_GO_UPROBE
    /* the uprobe sampler's return probe of this Read takes it from the socket's entry */
    a->ev_read_ns = now;
    a->ev_arrival_ns = arrival;
    a->ev_qdelay_ns = qd;
    a->ev_flags = evf;
    a->ev_send_ns = send;
    a->ev_prev_arrival_ns = a->park_arrival_ns;
#endif
}
#endif

RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    /* TP_PROTO(struct sock *sk, int ret, int flags) */
    const void *sk = (const void *)ctx->args[0];
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];
#if OTW_GO_TP
    /* a read of a traced Go process ends here, whether or not its socket is watched */
    struct otw_read_ev ev = {};
#endif
    struct water_state *st = otw_state(sk, 1);
    if (!st) {
#if OTW_GO_TP
        struct task_struct *task = bpf_get_current_task_btf();
        struct goread_task *ts = otw_go_task(task);
        if (ts) {
            /* a socket the user's filters leave out still has its key in the table (no
             * entry: not TCP) */
            u64 key = (u64)sk;
            struct water_sock *ws = socks.lookup(&key);
            if (ws) {
                ev.sock_key = ws->s.sock_key;
                otw_read_ev_peer(&ev, &ws->s);
            }
            otw_read_end(ctx, task, &ts->proc, 0, bpf_ktime_get_ns(), ret, &ev);
        }
#endif
        return 0;
    }
    u32 tgid = otw_reader_tgid(st);
    if (st->pid != tgid || !st->comm[0]) {
        st->pid = tgid;
        bpf_get_current_comm(st->comm, sizeof(st->comm));
    }
#if OTW_GO_TP
    const struct goread_proc *gp = otw_go_proc(st, tgid);
#endif
    if (ret == -OTW_EAGAIN) {
        /* nothing was waiting: the queue did not change (a Go reader parks next) */
#if OTW_READ_EVIDENCE
        struct water_arrivals *a = otw_arrivals(st);
        u64 g = 0;
#if OTW_GO_TP
        if (gp) {
            g = otw_go_g(gp);
            otw_watch_park();
        }
#endif
        if (!st->changes) {
            /* a socket first met at this park (a new connection's first read): its empty
             * queue's sequence numbers, so the arrival that wakes the read is known to land
             * on an empty queue */
            otw_refresh(sk, st);
            st->changes = 1;
        }
        /* the park starts at the first -EAGAIN; a park left by another goroutine (one whose
         * Read ended on a deadline, with no read(2) to close it) starts again here */
        if (!a->park_ns || a->park_g != g) {
            a->park_ns = bpf_ktime_get_ns();
            a->park_g = g;
            a->park_arrival_ns = a->head ? a->ts_ns[(a->head - 1) & (OTW_ARRIVALS - 1)] : 0;
        }
#endif
        return 0;
    }
    if (!st->ino)
        st->ino = otw_sock_ino(sk);
    otw_refresh(sk, st);
#if OTW_READ_EVIDENCE
    u64 now = bpf_ktime_get_ns();
#if OTW_GO_TP
    u64 park = otw_arrivals(st)->park_ns;
    if (gp && park && otw_arrivals(st)->park_g != otw_go_g(gp))
        park = 0;   /* another goroutine parked: this read did not wait */
    otw_note_read(st, ret, flags, now, &ev);
    if (gp)
        otw_watch_read_end(ctx, gp, tgid, now, ret, &ev, park);
#else
    struct otw_read_ev note = {};
    otw_note_read(st, ret, flags, now, &note);
#endif
#else
    u64 now = 0;    /* read only if a record is made */
#endif
    otw_after_flow(st, OTW_TRIGGER_READ, now);
    return 0;
}

static __always_inline void otw_overflow(const void *sk, u32 reason)
{
    struct water_state *st = otw_state(sk, 0);
    if (!st)
        return;
    u64 now = bpf_ktime_get_ns();
    otw_refresh(sk, st);
    st->drop_events += 1;
    st->drop_reason = reason;
    st->changes += 1;
    st->last_ts_ns = now;
    st->last_trigger = OTW_TRIGGER_OVERFLOW;
    if (st->drop_events == 1 || now - st->last_emit_ns >= OTW_OVERFLOW_GAP_NS
#if OTW_FOLLOW
        || 1
#endif
    )
        otw_emit(st, OTW_TRIGGER_OVERFLOW, now);
}

#if OTW_HAVE_KFREE_SKB_RX_SK
RAW_TRACEPOINT_PROBE(kfree_skb)
{
    /* TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason,
     *          struct sock *rx_sk) */
    const void *sk = (const void *)ctx->args[3];
    if (!sk)
        return 0;
    u64 key = (u64)sk;
    /* drops are only attributed to sockets already in the table: a TCP socket under
     * pressure has had arrivals first, and this keeps the host's other drops cheap */
    if (!socks.lookup(&key))
        return 0;
    otw_overflow(sk, (u32)ctx->args[2]);
    return 0;
}
#endif

RAW_TRACEPOINT_PROBE(sock_rcvqueue_full)
{
    /* TP_PROTO(struct sock *sk, struct sk_buff *skb) */
    const void *sk = (const void *)ctx->args[0];
    u64 key = (u64)sk;
    if (!socks.lookup(&key))
        return 0;
    otw_overflow(sk, 0);
    return 0;
}

static __always_inline void otw_close(const void *sk)
{
    u64 key = (u64)sk;
    int known = socks.lookup(&key) != 0;
    struct water_state *st = otw_state(sk, 0);
    if (st) {
        u64 now = bpf_ktime_get_ns();
        otw_refresh(sk, st);
        st->fin = otw_fin(sk);
        st->tcp_state = OTW_TCP_CLOSE;
        st->changes += 1;
        st->last_ts_ns = now;
        st->last_trigger = OTW_TRIGGER_CLOSE;
        /* a socket first seen at its close is reported only if water was left in it
         * (the FIN is not water: SIOCINQ does not count it either) */
        if (known || st->rcv_nxt - st->copied_seq > st->fin)
            otw_emit(st, OTW_TRIGGER_CLOSE, now);
    }
    socks.delete(&key);
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    /* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    if (newstate == OTW_TCP_CLOSE) {
        /* a socket already closed (after a reset, close(2) sets CLOSE again, once the
         * port is released: lport 0) has been reported */
        if (oldstate != OTW_TCP_CLOSE)
            otw_close(sk);
        return 0;
    }
    if (newstate == OTW_TCP_ESTABLISHED && oldstate == OTW_TCP_SYN_RECV) {
        /* an accepted connection: its local port is a listener's (a listener older than
         * otelwater that Python did not find, or in another network namespace) */
        struct otw_tuple t = {};
        if (otw_sock_tuple(sk, &t) == 0) {
            u64 lk = otw_listen_key(t.netns, t.lport);
            if (!listen_ports.lookup(&lk)) {
                u8 one = 1;
                listen_ports.update(&lk, &one);
            }
        }
    }
    u64 key = (u64)sk;
    struct water_sock *ws = socks.lookup(&key);
    if (ws) {
        ws->s.tcp_state = newstate;
        ws->s.fin = otw_fin(sk);
        if (newstate == OTW_TCP_ESTABLISHED && oldstate == OTW_TCP_SYN_SENT)
            ws->s.role = OTW_ROLE_DIALED;
        else if (newstate == OTW_TCP_ESTABLISHED && oldstate == OTW_TCP_SYN_RECV)
            ws->s.role = OTW_ROLE_ACCEPTED;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_destroy_sock)
{
    /* TP_PROTO(struct sock *sk) */
    const void *sk = (const void *)ctx->args[0];
    u64 key = (u64)sk;
    if (socks.lookup(&key))
        otw_close(sk);
    return 0;
}
