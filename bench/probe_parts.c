/* probe_parts.c: one small program per ingredient of otelwater's kernel programs, for
 * bench/probe_parts.py. Every program here is attached at the same time to the raw tracepoint
 * sock:sock_recv_length (TP_PROTO(struct sock *sk, int ret, int flags)) and does exactly one
 * thing that bpf/water.c or bpf/goread_tp.c does there; the kernel's BPF statistics then give
 * each one's cost per hit, and an ingredient's cost is its program's minus part_empty's.
 *
 * Each program uses what it computed (returns it, or writes it into its map entry) so that
 * clang keeps the work; a raw tracepoint ignores the return value. Map lookups are keyed by
 * the socket pointer, as water.c's `socks` is, and hit: the first event on a socket inserts.
 * Offsets and the span (OFF_*, OTW_SPAN_START/LEN) are the -D flags the water probe's loader
 * computes from the running kernel's BTF (otelwater/probes/kernel.py build_cflags), so the
 * reads are the ones water.c makes. Kernels: what bpf/water.c and bpf/goread_tp.c need (task
 * storage, bpf_task_pt_regs from a raw tracepoint: 5.15+); built on 6.18 x86_64.
 */
#include <linux/sched.h>
#include "water.h"
#include "sockkey.h"

#define PART_SOCKETS 65536          /* water.c's OTW_MAX_SOCKETS default */
#define PART_STACK_DEPTH 32         /* goread.h's OTW_STACK_DEPTH */

/* what part_stack and part_rb_submit tell Python: part_counts' only slot, n[PART_CNT_*] */
#define PART_CNT_STACK_CALLS 0
#define PART_CNT_STACK_FRAMES 1
#define PART_CNT_RB_LOST 2
#define PART_CNT_SLOTS 3
struct part_cnt {
    u64 n[PART_CNT_SLOTS];
};

BPF_TABLE("lru_hash", u64, struct water_sock, lru_socks, PART_SOCKETS);
BPF_HASH(hash_socks, u64, struct water_sock, PART_SOCKETS);
BPF_ARRAY(small_array, u64, 64);
BPF_PERCPU_ARRAY(percpu_counts, u64, 1);
BPF_TASK_STORAGE(task_hit, u64);
BPF_TASK_STORAGE(task_miss, u64);
BPF_PERCPU_ARRAY(part_counts, struct part_cnt, 1);
BPF_RINGBUF_OUTPUT(rb_discard, 64);
BPF_RINGBUF_OUTPUT(rb_submit, PART_RB_SUBMIT_PAGES);

static __always_inline const char *part_sk(struct bpf_raw_tracepoint_args *ctx)
{
    return (const char *)ctx->args[0];
}

static __always_inline struct part_cnt *part_counts_here(void)
{
    u32 zero = 0;
    return part_counts.lookup(&zero);
}

/* nothing: the cost of running a program at all, the statistics' own clock reads included */
int part_empty(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}

/* the tracepoint's three arguments and the current pid/tgid (every sock_recv_length) */
int part_args_pid(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0];
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];
    u64 id = bpf_get_current_pid_tgid();
    return (int)((id >> 32) ^ sk ^ ret ^ flags);
}

/* water.c's `socks`: an LRU hash keyed by the socket pointer, its entry updated in place */
int part_lru_lookup(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = (u64)part_sk(ctx);
    struct water_sock *ws = lru_socks.lookup(&key);
    if (!ws) {
        struct water_sock fresh = {};
        lru_socks.update(&key, &fresh);
        return 0;
    }
    ws->s.changes += 1;
    return 0;
}

/* ...a socket it has no entry for (water.c: every read of a socket that is not TCP, e.g. a
 * unix socket's, pays this lookup and one probe read of sk_protocol) */
int part_lru_miss(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = (u64)part_sk(ctx) ^ 1;   /* never inserted: socket pointers are aligned */
    return lru_socks.lookup(&key) != 0;
}

/* the same with a plain (preallocated) hash */
int part_hash_lookup(struct bpf_raw_tracepoint_args *ctx)
{
    u64 key = (u64)part_sk(ctx);
    struct water_sock *ws = hash_socks.lookup(&key);
    if (!ws) {
        struct water_sock fresh = {};
        hash_socks.update(&key, &fresh);
        return 0;
    }
    ws->s.changes += 1;
    return 0;
}

/* an array slot by a small index (goread_tp.c's `parks`, water.c's `cfg`, `watch_ports`) */
int part_array_lookup(struct bpf_raw_tracepoint_args *ctx)
{
    u32 i = ((u64)part_sk(ctx) >> 6) & 63;
    u64 *v = small_array.lookup(&i);
    if (v)
        *v += 1;
    return 0;
}

/* a per-CPU counter (goread_tp.c's `counts`, water.c's `fresh_sock` and `lost`) */
int part_percpu_inc(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    u64 *v = percpu_counts.lookup(&zero);
    if (v)
        *v += 1;
    return 0;
}

/* goread_tp.c's otw_go_task for a traced thread: task storage found (created once) */
int part_task_hit(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = bpf_get_current_task_btf();
    u64 *v = task_hit.task_storage_get(task, 0, 0);
    if (!v) {
        task_hit.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
        return 0;
    }
    *v += 1;
    return 0;
}

/* ...and for every other thread's read under `watch --go-pid`: no storage, NULL */
int part_task_miss(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = bpf_get_current_task_btf();
    return task_miss.task_storage_get(task, 0, 0) != 0;
}

/* one 4-byte probe read of struct sock (sk_rcvbuf) */
int part_read4(struct bpf_raw_tracepoint_args *ctx)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, 4, part_sk(ctx) + OFF_SK_RCVBUF);
    return v;
}

/* water.c's otw_refresh span: the five struct sock fields in one read */
int part_read_span(struct bpf_raw_tracepoint_args *ctx)
{
    u8 span[OTW_SPAN_LEN];
    bpf_probe_read_kernel(span, sizeof(span), part_sk(ctx) + OTW_SPAN_START);
    return *(u32 *)&span[OFF_SK_RCVQ_QLEN - OTW_SPAN_START]
         ^ *(u32 *)&span[OFF_SK_RMEM_ALLOC - OTW_SPAN_START]
         ^ *(u32 *)&span[OFF_SK_BACKLOG_LEN - OTW_SPAN_START]
         ^ *(u32 *)&span[OFF_SK_RCVBUF - OTW_SPAN_START]
         ^ *(u32 *)&span[OFF_SK_DROPS - OTW_SPAN_START];
}

/* water.c's otw_refresh sequence numbers: two 4-byte reads (rcv_nxt, copied_seq) */
int part_read_two(struct bpf_raw_tracepoint_args *ctx)
{
    u32 seq[2] = {};
    bpf_probe_read_kernel(&seq[0], 4, part_sk(ctx) + OFF_TCP_RCV_NXT);
    bpf_probe_read_kernel(&seq[1], 4, part_sk(ctx) + OFF_TCP_COPIED_SEQ);
    return seq[0] - seq[1];
}

/* ...and the same two fields in one read covering both */
#define PART_SEQ_LO (OFF_TCP_RCV_NXT < OFF_TCP_COPIED_SEQ ? OFF_TCP_RCV_NXT : OFF_TCP_COPIED_SEQ)
#define PART_SEQ_HI (OFF_TCP_RCV_NXT > OFF_TCP_COPIED_SEQ ? OFF_TCP_RCV_NXT : OFF_TCP_COPIED_SEQ)
int part_read_wide(struct bpf_raw_tracepoint_args *ctx)
{
    u8 buf[PART_SEQ_HI + 4 - PART_SEQ_LO];
    bpf_probe_read_kernel(buf, sizeof(buf), part_sk(ctx) + PART_SEQ_LO);
    return *(u32 *)&buf[OFF_TCP_RCV_NXT - PART_SEQ_LO]
         - *(u32 *)&buf[OFF_TCP_COPIED_SEQ - PART_SEQ_LO];
}

/* the clock every event stamps */
int part_ktime(struct bpf_raw_tracepoint_args *ctx)
{
    return (int)bpf_ktime_get_ns();
}

/* the reader's name (water.c: when a socket's reader changes; goread: every record) */
int part_comm(struct bpf_raw_tracepoint_args *ctx)
{
    char comm[16];
    bpf_get_current_comm(comm, sizeof(comm));
    return comm[0];
}

/* a water record's ring-buffer slot taken and given back */
int part_rb_discard(struct bpf_raw_tracepoint_args *ctx)
{
    struct water_event *e = rb_discard.ringbuf_reserve(sizeof(struct water_event));
    if (!e)
        return 0;
    e->ts_ns = 0;
    rb_discard.ringbuf_discard(e, 0);
    return 0;
}

/* ...and submitted without a wakeup (otw_emit), for a consumer that polls on a timer */
int part_rb_submit(struct bpf_raw_tracepoint_args *ctx)
{
    struct water_event *e = rb_submit.ringbuf_reserve(sizeof(struct water_event));
    if (!e) {
        struct part_cnt *c = part_counts_here();
        if (c)
            c->n[PART_CNT_RB_LOST] += 1;
        return 0;
    }
    e->ts_ns = 0;
    e->trigger = OTW_TRIGGER_READ;
    rb_submit.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 0;
}

/* the socket's address tuple: otw_sock_tuple's probe reads (7 for IPv4) */
int part_sock_tuple(struct bpf_raw_tracepoint_args *ctx)
{
    struct otw_tuple t = {};
    if (otw_sock_tuple(part_sk(ctx), &t) < 0)
        return 0;
    return t.lport ^ t.netns;
}

/* the socket key: the tuple and its FNV-1a hash (water.c: once per socket) */
int part_sock_key(struct bpf_raw_tracepoint_args *ctx)
{
    struct otw_tuple t = {};
    if (otw_sock_tuple(part_sk(ctx), &t) < 0)
        return 0;
    return (int)otw_sock_key(&t);
}

/* goread_tp.c's otw_read_end: the user registers at the syscall (fd, count, Go's g) */
int part_regs(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = bpf_get_current_task_btf();
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    return (int)(regs->di ^ regs->dx ^ regs->r14);
}

/* the fixed part of a user stack: one entry (the user IP at the syscall), no frame walked */
int part_stack1(struct bpf_raw_tracepoint_args *ctx)
{
    u64 ip = 0;
    long n = bpf_get_stack(ctx, &ip, sizeof(ip), BPF_F_USER_STACK);
    return n > 0 ? (int)ip : 0;
}

/* otw_read_emit's user stack (frame-pointer walk, at most 32 frames); the frames it found are
 * counted in part_counts (one more per-CPU lookup, part_percpu_inc's cost) */
int part_stack(struct bpf_raw_tracepoint_args *ctx)
{
    u64 ips[PART_STACK_DEPTH];
    long n = bpf_get_stack(ctx, ips, sizeof(ips), BPF_F_USER_STACK);
    struct part_cnt *c = part_counts_here();
    if (c) {
        c->n[PART_CNT_STACK_CALLS] += 1;
        if (n > 0)
            c->n[PART_CNT_STACK_FRAMES] += n / sizeof(u64);
    }
    return 0;
}
