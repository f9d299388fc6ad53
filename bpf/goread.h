/* goread.h: the layouts the Go read samplers (bpf/goread_tp.c, bpf/goread_uprobe.c) share with
 * Python. Defined once: BCC compiles this file into both programs, and
 * otelwater/probes/goread.py builds its ctypes types from this same text
 * (otelwater/events/layout.py). Fixed-width fields, largest first, explicit padding, no packing.
 *
 * Kernels: any with BTF, the BPF ring buffer (5.8+), task-local storage for tracing programs
 * and bpf_task_pt_regs (5.15+); built and tested on 6.18 x86_64. Attach points: see each .c.
 *
 * The user stack travels inline in the record (ips[OTW_STACK_DEPTH], filled by bpf_get_stack
 * straight into the reserved ring-buffer slot) rather than as a BPF_STACK_TRACE id: only
 * blocked reads carry one, the cost in the kernel is the same frame-pointer walk, and an
 * inline stack cannot be evicted or overwritten by a hash collision before Python reads it.
 */
#ifndef OTELWATER_GOREAD_H
#define OTELWATER_GOREAD_H

#define OTW_SOURCE_TRACEPOINT 1
#define OTW_SOURCE_UPROBE 2

#define OTW_STACK_DEPTH 32     /* user frames kept per blocked read */
#define OTW_HIST_SLOTS 40      /* log2 latency buckets: slot i counts [2^(i-1), 2^i) ns */

/* indexes of goread_counts.n (Python: GoReadStats) */
#define OTW_CNT_ENTER 0        /* sys_enter_read / fresh uprobe entries / watch: socket reads */
#define OTW_CNT_EXIT 1         /* sys_exit_read / uprobe returns / watch: socket reads */
#define OTW_CNT_READS 2        /* reads completed (a park + its data read count once) */
#define OTW_CNT_BLOCKED 3      /* of those, lasting >= threshold */
#define OTW_CNT_PARKS 4        /* tracepoint: -EAGAIN reads */
#define OTW_CNT_ORPHAN 5       /* returns with no entry (began before attach) */
#define OTW_CNT_REENTER 6      /* uprobe: entry again before a return (stack growth restart) */
#define OTW_CNT_LOST 7         /* records the ring buffer could not take */
#define OTW_CNT_NOT_SOCKET 8   /* blocked reads on fds that are not TCP sockets (no record) */
#define OTW_CNT_SUM_NS 9       /* sum of the latencies of all completed reads */
#define OTW_CNT_QSLOW 10       /* reads that found data which had waited >= threshold: recorded */
#define OTW_CNT_QSLOW_LIMITED 11 /* ...beyond OTW_QSLOW_PER_S a socket a second: counted only */
#define OTW_CNT_CUT 12         /* slow reads the record token bucket kept off the ring buffer
                                * (counted in `verdicts` all the same) */
#define OTW_CNT_IDLE 13        /* slow reads whose verdict is idle (not recorded unless asked) */
#define OTW_CNT_UNKNOWN 14     /* uprobe: blocked reads of a process whose Go facts are in neither
                                * up_procs nor up_exes (timed and counted, no record) */
#define OTW_CNT_SLOTS 15

/* the kernel's verdict of a slow read (goread_event.kverdict, `verdicts` keys): the rules of
 * otelwater/correlate/rules.py, decided where the read ends, so the counts are exact whatever
 * the ring buffer loses; 0: not a slow read */
#define OTW_V_PEER 1           /* peer-starved */
#define OTW_V_RUN 2            /* runtime-starved */
#define OTW_V_LAG 3            /* consumer-lagging */
#define OTW_V_UNKNOWN 4
#define OTW_V_IDLE 5           /* the peer owed nothing while the read waited */

/* the per-CPU `counts` array's only slot: one lookup per event covers counts and histogram,
 * and the losses this CPU has not reported in-band yet (n[OTW_CNT_LOST] counts them all) */
struct goread_counts {
    u64 n[OTW_CNT_SLOTS];
    u64 hist[OTW_HIST_SLOTS];
    u64 lost_pending;  /* records lost since this CPU last delivered one */
    u64 lost_since_ns; /* when the first of those was lost (meaningful while lost_pending) */
    u64 lost_until_ns; /* ...and the last */
};

/* the `verdicts` per-CPU hash: slow reads counted by process, socket role and verdict */
struct otw_vkey {
    u32 tgid;
    u8 role;           /* OTW_ROLE_* (bpf/water.h) */
    u8 verdict;        /* OTW_V_* */
    u16 _pad;
};

struct otw_vcount {
    u64 reads;         /* slow reads with this verdict */
    u64 recorded;      /* of those, put on the ring buffer */
    u64 cut;           /* of those, kept off by a token bucket: the records' (OTW_CNT_CUT) or
                        * the socket's share of queue-delay slow reads (OTW_CNT_QSLOW_LIMITED) */
    u64 dur_sum_ns;    /* sum of their durations */
    u64 wait_sum_ns;   /* sum of their verdict's wait (peer: wait_peer, runtime: wait_run,
                        * consumer-lagging: queue delay, idle: wait_idle, unknown: duration) */
    u64 last_dur_ns;   /* the last one's duration and wait (the histogram slots are taken from */
    u64 last_wait_ns;  /*   these, reloaded: the verifier's precision tracking stops there) */
    u64 dur_hist[OTW_HIST_SLOTS];   /* log2 buckets as goread_counts.hist */
    u64 wait_hist[OTW_HIST_SLOTS];
};

/* The request a recorded slow read served: its goroutine's profiler labels (runtime/pprof),
 * which tracing libraries set to the request's trace and span ids. Read in the kernel, only
 * for reads that go on the ring buffer (otw_read_links, bpf/goverdict.c); Python decodes. */
#define OTW_LABELS_SLICE 0x8000   /* goread_proc.links: labels are a slice of {key, value} */
#define OTW_LABEL_KEY_MAX 32      /* bytes of a label key compared (longer keys: refused) */
#define OTW_LABEL_VAL_MAX 64      /* bytes of a label value kept (a W3C traceparent is 55) */
#define OTW_LABELS_SCAN 16        /* labels looked at: slice entries, or map slots (2 buckets) */
#define OTW_LINK_LABELS 1         /* links: the goroutine carries labels */
#define OTW_LINK_FOUND0 2         /*   the first key (trace id, or traceparent) was found */
#define OTW_LINK_FOUND1 4         /*   the second key (span id) was found */
#define OTW_LINK_MORE 8           /*   more labels than were looked at */
#define OTW_LINK_UNREADABLE 16    /*   the labels could not be read (or a map mid-growth) */

/* the label keys (link_keys array, written by Python at load) */
struct otw_link_keys {
    u8 len[2];                     /* 0: that key is not looked for */
    u8 _pad[6];
    u8 key[2][OTW_LABEL_KEY_MAX];  /* zero-padded */
};

/* one blocked read on the ring buffer */
struct goread_event {
    u64 ts_start_ns;   /* CLOCK_MONOTONIC: first read(2) attempt / uprobe entry */
    u64 ts_end_ns;     /* the data-returning read(2)'s exit / the return site */
    u64 goid;          /* goroutine id; valid when has_goid */
    u64 sock_key;      /* bpf/sockkey.h, 0 when unknown */
    s64 returned;      /* bytes, or a negative errno (tracepoint) */
    u64 requested;     /* bytes asked for */
    u64 caller_ip;     /* uprobe: return address at [rsp] (frame-pointer walks skip it); 0 */
    u64 arrival_ns;    /* parked reads: the first arrival on the socket after the park began
                        * (the water probe's sk_data_ready); 0 when unknown */
    u64 queue_delay_ns; /* how long the oldest byte returned stood in the queue (OTW_EV_QDELAY) */
    u64 lost_since_ns; /* lost_before > 0: when the first of those records was lost */
    u64 lost_until_ns; /*   ...and the last */
    u64 send_ns;       /* our last send on the socket before the arrival that woke the read
                        * (before its return when none did); 0 when none or unknown */
    u64 prev_arrival_ns; /* parked reads: the newest arrival before the park began (0: none) */
    u64 ips[OTW_STACK_DEPTH]; /* user stack, innermost first */
    u32 stack_len;     /* valid entries in ips */
    u32 pid;           /* tgid */
    u32 tid;
    s32 fd;            /* -1 when unknown */
    u32 lost_before;   /* records this CPU could not put on the ring buffer since it last
                        * delivered one: the loss travels in-band, with the next record */
    u16 rport;         /* the peer's port (0 unknown) */
    u8 source;         /* OTW_SOURCE_* */
    u8 has_goid;
    u8 parked;         /* 1: the read found the queue empty and waited (-EAGAIN first) */
    u8 evidence;       /* OTW_EV_* bits: what the water probe told about this read */
    u8 role;           /* OTW_ROLE_* of its socket (bpf/water.h) */
    u8 kverdict;       /* OTW_V_*: the kernel's verdict */
    u8 raddr[16];      /* the peer's address, IPv6 form (IPv4 as ::ffff:a.b.c.d); 0 unknown */
    char comm[16];
    u8 links;          /* OTW_LINK_* */
    u8 lbl_len[2];     /* the two label values' lengths (may exceed OTW_LABEL_VAL_MAX) */
    u8 _pad[1];
    u64 go_start;      /* the goroutine's start function (runtime.g.startpc), 0 unknown */
    u8 lbl[2][OTW_LABEL_VAL_MAX]; /* the two label values' first bytes */
};

/* what the water probe tells the read sampler about the read in flight (struct otw_read_ev,
 * goread_event.evidence); only when both run in one program (the watch) */
#define OTW_EV_SOCKET 1        /* the read was on a socket the water probe watches */
#define OTW_EV_QDELAY 2        /* queue_delay_ns is known */
#define OTW_EV_EXACT 4         /* ...exactly (else a lower bound: the byte came before the
                                * arrivals remembered) */
#define OTW_EV_QSLOW_OK 8      /* a queue-delay slow read within its socket's records a second */
#define OTW_EV_PARKED 16       /* the reader parked (a -EAGAIN on the socket) before this read */

/* tracepoint sampler: one entry per watched process in the `procs` hash, written by Python */
struct goread_proc {
    u32 slot;          /* index of this process's row in the `parks` array */
    u32 gen;           /* bumped by Python when the slot is given to another process */
    u32 goid_off;      /* runtime.g.goid offset, 0 when not Go (no goid) */
    u32 links;         /* where a recorded read finds its request (otw_read_links): the low
                        * 16 bits runtime.g.labels' offset | OTW_LABELS_SLICE (Go 1.24+: a
                        * slice, before: a map), the high 16 runtime.g.startpc's; 0: not read */
};

/* tracepoint sampler: a read parked on (process, fd), reused in place */
struct goread_park {
    u64 start_ns;      /* enter of the first -EAGAIN read; 0 when nothing is parked */
    u64 g;             /* R14 at the park: the *g that parked */
    u32 gen;           /* struct goread_proc.gen when written */
    u32 _pad;
};

/* tracepoint sampler: per-thread state, task-local storage, made at the thread's first read
 * once the pid filter let it through (a copy of the process's goread_proc: no `procs` lookup
 * per read afterwards) */
struct goread_task {
    u64 enter_ns;      /* alone: sys_enter_read time of this thread's read in flight, 0 when none */
    struct goread_proc proc;
};

/* uprobe sampler: in-flight read per (tgid, *g), reused in place */
struct goread_key {
    u64 g;             /* R14: the goroutine's g (stable for its life; goid read only when needed) */
    u32 tgid;
    u32 _pad;
};

struct goread_inflight {
    u64 start_ns;      /* entry time; 0 when no Read is in flight */
    u64 conn;          /* receiver *conn (RAX at entry) */
    u64 requested;     /* len(b) (RCX at entry) */
};

/* uprobe sampler: the Go facts of a traced binary, written by Python (one program serves
 * every binary: nothing here is a -D macro). In `up_procs` by tgid (the processes Python
 * knows), and in `up_exes` by executable, where a process Python has not entered yet (started
 * since its last /proc scan) finds them. Read only where a read needs them: at a blocked
 * read's return (in the watch: at every return, for the fd's socket evidence). */
struct goread_gofacts {
    u32 goid_off;      /* runtime.g.goid */
    u32 links;         /* as goread_proc.links (otw_read_links); 0: labels not read */
    u32 conn_fd;       /* net.conn.fd: the *netFD in the receiver */
    u32 netfd_sysfd;   /* net.netFD.pfd + internal/poll.FD.Sysfd: the int fd in the netFD */
};

/* uprobe sampler: an executable as the kernel names it: task->mm->exe_file->f_inode's
 * i_sb->s_dev (MKDEV: major << 20 | minor) and i_ino */
struct goread_exe {
    u64 dev;
    u64 ino;
};


/* ---- kernel-side helpers shared by both samplers (layout.py reads only the structs and
 * defines above; include bpf/sockkey.h before this file) ---- */
#ifdef OTELWATER_SOCKKEY_H

/* what the water probe knows of the read in flight (the watch), handed to the tracepoint
 * sampler inside the same sock_recv_length hit; all zero when the socket is not watched */
struct otw_read_ev {
    u64 sock_key;
    u64 qdelay_ns;         /* queue delay of the oldest byte returned (OTW_EV_QDELAY) */
    u64 empty_arrival_ns;  /* the socket's last arrival onto an empty queue */
    u64 send_ns;           /* goread_event.send_ns */
    u64 prev_arrival_ns;   /* goread_event.prev_arrival_ns */
    u8 raddr[16];          /* the socket's peer (water_state.raddr), 0 unknown */
    u32 flags;             /* OTW_EV_* */
    u16 rport;
    u8 role;               /* OTW_ROLE_* */
    u8 _pad;
};

#define OTW_AF_INET 2
#define OTW_AF_INET6 10
#define OTW_IPPROTO_TCP 6

/* The struct sock of the current task's fd: task->files->fdt->fd[fd]->private_data (struct
 * socket) ->sk, every offset from BTF (otw_fd_sock_key: its socket key). Returns 0, or -1 when
 * the fd is not a TCP/IP socket:
 * the struct socket must point back at the same file (so private_data of a pipe or a
 * regular file is never taken for a socket), its sk must be AF_INET/AF_INET6 and TCP. */
static __always_inline int otw_fd_sock(long fd, const char **skp)
{
    if (fd < 0)
        return -1;
    const char *task = (const char *)bpf_get_current_task();
    const char *files = 0, *fdt = 0, *file = 0, *sock = 0, *sk = 0, *back = 0;
    const char **fdarr = 0;
    u32 max_fds = 0;
    bpf_probe_read_kernel(&files, sizeof(files), task + OFF_TASK_FILES);
    if (!files)
        return -1;
    bpf_probe_read_kernel(&fdt, sizeof(fdt), files + OFF_FILES_FDT);
    if (!fdt)
        return -1;
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + OFF_FDT_MAX_FDS);
    if ((u64)fd >= max_fds)
        return -1;
    bpf_probe_read_kernel(&fdarr, sizeof(fdarr), fdt + OFF_FDT_FD);
    if (!fdarr)
        return -1;
    bpf_probe_read_kernel(&file, sizeof(file), fdarr + fd);
    if (!file)
        return -1;
    bpf_probe_read_kernel(&sock, sizeof(sock), file + OFF_FILE_PRIVATE_DATA);
    if (!sock)
        return -1;
    bpf_probe_read_kernel(&back, sizeof(back), sock + OFF_SOCKET_FILE);
    if (back != file)
        return -1;
    bpf_probe_read_kernel(&sk, sizeof(sk), sock + OFF_SOCKET_SK);
    if (!sk)
        return -1;
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, SIZE_SK_PROTOCOL, sk + OFF_SK_PROTOCOL);
    if (proto != OTW_IPPROTO_TCP)
        return -1;
    *skp = sk;
    return 0;
}

static __always_inline int otw_fd_sock_key(long fd, u64 *key)
{
    const char *sk = 0;
    if (otw_fd_sock(fd, &sk) < 0)
        return -1;
    struct otw_tuple t = {};
    if (otw_sock_tuple(sk, &t) < 0)
        return -1;
    *key = otw_sock_key(&t);
    return 0;
}

/* Losses located in-band (the water probe's records and both samplers'): a record that
 * cannot be reserved at `now` is counted by the caller (its exact total) and kept pending in
 * this CPU's slot; the next record this CPU reserves carries how many were lost, the time of
 * the first and of the last (otw_lost_take), so user space marks only what overlaps them.
 * Only the first loss of a run sets since: the atomic add tells which one that is, also when
 * a softirq program nests inside a process-context one on the same CPU. */
static __always_inline void otw_lost_note(u64 *pending, u64 *since, u64 *until, u64 now)
{
    *until = now;   /* first: a record taking the run in between still spans this loss */
    if (__sync_fetch_and_add(pending, 1) == 0)
        *since = now;
}

/* A record was reserved on this CPU: hand it the losses pending here and take them off. The
 * plain load keeps the common case (nothing lost) free of atomics; the exchange keeps a nested
 * program from handing the same losses to two records. since is read before the exchange and
 * until after it, so a loss landing in between still lies inside the span the record reports
 * (at worst the span is a little wider). */
static __always_inline void otw_lost_take(u64 *pending, u64 *since, u64 *until, u32 *before,
                                          u64 *before_since, u64 *before_until)
{
    *before = 0;
    *before_since = 0;
    *before_until = 0;
    if (!*pending)
        return;
    u64 s = *since;
    u64 n = __sync_lock_test_and_set(pending, 0);
    if (!n)
        return;
    *before_until = *until;
    if (n > 0xffffffffULL) {   /* what a u32 cannot say stays pending for the next record */
        __sync_fetch_and_add(pending, n - 0xffffffffULL);
        n = 0xffffffffULL;
    }
    *before = (u32)n;
    *before_since = s;
}

/* log2 bucket of a latency: 0 for 0 ns, else floor(log2(ns)) + 1, capped */
static __always_inline u32 otw_hist_slot(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { v >>= 1; r += 1; }
    r += (u32)v;
    return r < OTW_HIST_SLOTS ? r : OTW_HIST_SLOTS - 1;
}

#ifndef OTW_THRESHOLD_NS
#define OTW_THRESHOLD_NS 1000000ULL /* a read this long is a blocked read (loader: -D) */
#endif

/* Count one completed read with its latency; returns 1 when it is a blocked read. */
static __always_inline int otw_count_read(struct goread_counts *c, u64 dur)
{
    c->n[OTW_CNT_READS] += 1;
    c->n[OTW_CNT_SUM_NS] += dur;
    u32 slot = otw_hist_slot(dur);
    if (slot < OTW_HIST_SLOTS)
        c->hist[slot] += 1;
    if (dur < OTW_THRESHOLD_NS)
        return 0;
    c->n[OTW_CNT_BLOCKED] += 1;
    return 1;
}

#ifndef OTW_RUN_NS
#define OTW_RUN_NS OTW_THRESHOLD_NS   /* runtime-starved: data waited this long for the reader */
#endif
#ifndef OTW_RECORD_INTERVAL_NS
#define OTW_RECORD_INTERVAL_NS 0      /* record token bucket: one slow read on the ring buffer
                                       * per this many ns on average; 0: all of them */
#endif
#ifndef OTW_RECORD_BURST
#define OTW_RECORD_BURST 64           /* ...and at most this many at once */
#endif
#ifndef OTW_IDLE_RECORDS
#define OTW_IDLE_RECORDS 0            /* 1: idle slow reads are recorded too */
#endif
#ifndef OTW_ROLE_ACCEPTED
#define OTW_ROLE_DIALED 1
#define OTW_ROLE_ACCEPTED 2
#endif

/* The verdict of a slow read, by the rules of otelwater/correlate/rules.py (kept equal by
 * tests/integration/test_kernel_verdicts.py): `role` and the send/arrival stamps split a
 * parked read's wait into idle (the peer owed nothing) and waiting for the peer.
 *   accepted socket: idle when we sent during the park (our response: what comes next is a new
 *     request) or our last send came after the newest arrival before the park (we had
 *     answered); else the peer was mid-message: all of it is waiting for the peer.
 *   dialed socket: idle until our send when we sent during the park (our request went out
 *     then), waiting for the peer from then on.
 * runtime-starved first (wait to run >= OTW_RUN_NS), then peer-starved when the peer's part
 * alone is slow (>= OTW_THRESHOLD_NS), then idle when the idle part is the larger.
 * *wait: the figure the verdict rests on (its `verdicts` histogram). */
static __always_inline u8 otw_kverdict(u8 parked, u8 role, u64 start, u64 end, u64 arrival,
                                       u64 send, u64 prev_arrival, u32 evf, u64 qd, u64 *wait)
{
    if (end < start) {
        *wait = 0;
        return OTW_V_UNKNOWN;
    }
    u64 dur = end - start;
    *wait = dur;
    if (!parked) {
        if ((evf & OTW_EV_QDELAY) && qd >= OTW_THRESHOLD_NS) {
            *wait = qd;
            return OTW_V_LAG;
        }
        return OTW_V_UNKNOWN;
    }
    int answered = role == OTW_ROLE_ACCEPTED && (send > start || send >= prev_arrival);
    if (!arrival || arrival < start || arrival > end) {
        /* no data woke it (EOF, deadline, close): idle only when the peer owed nothing */
        return answered ? OTW_V_IDLE : OTW_V_UNKNOWN;
    }
    u64 run = end - arrival, idle = 0, peer = arrival - start;
    if (answered) {
        idle = peer;
        peer = 0;
    } else if (role == OTW_ROLE_DIALED && send > start && send <= arrival) {
        idle = send - start;
        peer = arrival - send;
    }
    if (run >= OTW_RUN_NS) {
        *wait = run;
        return OTW_V_RUN;
    }
    if (peer < OTW_THRESHOLD_NS && idle > peer) {
        *wait = idle;
        return OTW_V_IDLE;
    }
    *wait = peer;
    return OTW_V_PEER;
}

/* Add a slow read to its `verdicts` slot (the samplers look the slot up: BCC rewrites map
 * calls in a program's own file only) */
static __always_inline void otw_vcount_add(struct otw_vcount *v, u64 dur, u64 wait, int recorded,
                                           int cut)
{
    v->reads += 1;
    v->recorded += recorded;
    v->cut += cut;
    v->dur_sum_ns += dur;
    v->wait_sum_ns += wait;
    /* an index computed from dur and wait directly would make the verifier track their exact
     * values back through every branch of otw_kverdict, and it could no longer prune: slots
     * come from the copies in the map value instead */
    v->last_dur_ns = dur;
    v->last_wait_ns = wait;
    u32 s = otw_hist_slot(*(volatile u64 *)&v->last_dur_ns);
    if (s < OTW_HIST_SLOTS)
        v->dur_hist[s] += 1;
    s = otw_hist_slot(*(volatile u64 *)&v->last_wait_ns);
    if (s < OTW_HIST_SLOTS)
        v->wait_hist[s] += 1;
}


#endif /* OTELWATER_SOCKKEY_H */

#endif
