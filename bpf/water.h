/* water.h: the layouts the water-level probe shares with Python. Defined once: BCC compiles
 * this file into bpf/water.c, and otelwater/events/layout.py builds its ctypes types from this
 * same text. Fixed-width fields, largest first, explicit padding, no packing.
 * tests/unit/test_layout.py pins sizes and offsets.
 */
#ifndef OTELWATER_WATER_H
#define OTELWATER_WATER_H

/* why a snapshot was taken */
#define OTW_TRIGGER_ARRIVAL 1  /* rain: sock:sk_data_ready */
#define OTW_TRIGGER_READ 2     /* drain: sock:sock_recv_length */
#define OTW_TRIGGER_OVERFLOW 3 /* drop: skb:kfree_skb with rx_sk, sock:sock_rcvqueue_full */
#define OTW_TRIGGER_CLOSE 4    /* water left at close: TCP_CLOSE / tcp:tcp_destroy_sock */
#define OTW_TRIGGER_PERIODIC 5 /* the user-space sweep of the socket table */
#define OTW_TRIGGER_STANDING 6 /* water found in the kernel's socket table (sock_diag), no event yet */

#define OTW_ARRIVALS 8         /* arrivals remembered per socket, for the queue delay of reads */

/* a socket's role (water_state.role): who opened the connection */
#define OTW_ROLE_UNKNOWN 0
#define OTW_ROLE_DIALED 1      /* we connected (SYN_SENT; or its local port is not a listener's) */
#define OTW_ROLE_ACCEPTED 2    /* the peer connected: accepted from a listener (SYN_RECV; or its
                                * local port is a listener's in the same network namespace) */

/* TCP states (the kernel's enum, include/net/tcp_states.h: stable for decades; the loader
 * checks each against the running kernel's BTF before loading) */
#define OTW_TCP_ESTABLISHED 1
#define OTW_TCP_SYN_SENT 2
#define OTW_TCP_SYN_RECV 3
#define OTW_TCP_FIN_WAIT1 4
#define OTW_TCP_FIN_WAIT2 5
#define OTW_TCP_TIME_WAIT 6
#define OTW_TCP_CLOSE 7
#define OTW_TCP_CLOSE_WAIT 8
#define OTW_TCP_LAST_ACK 9
#define OTW_TCP_LISTEN 10
#define OTW_TCP_CLOSING 11

/* per-socket state: one entry per watched socket in the `socks` map, updated in place on every
 * arrival, read, drop and state change; the sweep in Python reads it */
struct water_state {
    u64 sock_key;      /* bpf/sockkey.h */
    u64 ino;           /* socket inode (socket:[ino] in /proc/PID/fd), 0 if orphaned */
    u64 last_ts_ns;    /* CLOCK_MONOTONIC of the last event that read the clock: every
                        * event with Go readers traced, else the last record, drop or close
                        * (an arrival or read that says nothing reads no clock) */
    u64 last_emit_ns;  /* last ring-buffer event for this socket */
    u64 changes;       /* events seen on this socket; the sweep reports sockets whose count moved */
    u64 empty_arrival_ns; /* the last arrival that found the queue empty (all read): a reader
                           * parked on this socket was woken by it */
    u8 laddr[16];      /* IPv6 form, IPv4 as ::ffff:a.b.c.d */
    u8 raddr[16];
    u32 pid;           /* tgid of the last process that read the socket, 0 before its first read */
    u32 netns;         /* network namespace inode */
    u32 level;         /* water level: sk_receive_queue.qlen (skbs) */
    u32 volume;        /* water volume: sk_rmem_alloc (bytes charged, ss -tm "r") */
    u32 capacity;      /* sk_rcvbuf (ss -tm "rb") */
    u32 backlog;       /* sk_backlog.len: bytes waiting for the socket lock */
    u32 drops;         /* sk_drops, the kernel's own counter */
    u32 rcv_nxt;       /* tcp_sock.rcv_nxt: sequence of the next byte to arrive */
    u32 copied_seq;    /* tcp_sock.copied_seq: next byte to be read; rcv_nxt - copied_seq = unread */
    u32 peak_volume;   /* highest volume since the water last fell below low water */
    u32 drop_events;   /* overflow events otelwater saw on this socket */
    u32 drop_reason;   /* enum skb_drop_reason value of the last drop (BTF gives the names) */
    u32 generation;    /* filter generation under which `watched` was decided */
    u16 lport;
    u16 rport;
    u8 watched;        /* 1 watched, 0 filtered out (negative cache) */
    u8 above;          /* 1 while the volume is above high water */
    u8 tcp_state;      /* TCP state at the last state change we saw (0 unknown) */
    u8 last_trigger;
    char comm[16];     /* of the last reader */
    u8 fin;            /* the peer's FIN arrived (SOCK_DONE): rcv_nxt counts it, unread bytes do not */
    u8 role;           /* OTW_ROLE_* */
    u8 _pad[2];
};

/* the last OTW_ARRIVALS arrivals of a socket: TCP delivers bytes in order, so the arrival that
 * brought the oldest byte a read returns is the first whose seq (rcv_nxt after it) lies beyond
 * that byte, and the read's queue delay is now minus its time */
struct water_arrivals {
    u64 ts_ns[OTW_ARRIVALS];   /* when (sk_data_ready) */
    u64 qslow_tat_ns;          /* queue-delay slow reads recorded: the token bucket's
                                * theoretical arrival time (GCRA, OTW_QSLOW_PER_S a second) */
    /* request/response, without payload: our sends against the peer's arrivals (watch with a
     * Go reader only: sock:sock_send_length) */
    u64 last_send_ns;          /* our last send (sendmsg/write that queued bytes) */
    u64 arrival_send_ns;       /* last_send_ns when the last arrival onto an empty queue came */
    u64 park_arrival_ns;       /* the newest arrival before the park began (0: none seen) */
    u64 ev_send_ns;            /* (uprobe sampler) the last read's send, as in the event */
    u64 ev_prev_arrival_ns;    /*   ...and park_arrival_ns of its park */
    /* the last read of the socket, for the Go read sampler (with Go readers only) */
    u64 park_ns;               /* first -EAGAIN read since the last read that returned */
    u64 park_g;                /* the watch's Go reader: the goroutine (*g) that parked then */
    u64 ev_read_ns;            /* when the last read that returned data (or EOF) did */
    u64 ev_arrival_ns;         /* it had parked: the arrival that woke it (0: unknown) */
    u64 ev_qdelay_ns;          /* the queue delay of the oldest byte it returned */
    u32 seq[OTW_ARRIVALS];     /* rcv_nxt after it */
    u32 from[OTW_ARRIVALS];    /* rcv_nxt before it when the queue was empty then, else = seq:
                                * a byte in [from, seq) arrived exactly then */
    u32 head;                  /* arrivals pushed so far; slot head % OTW_ARRIVALS is next */
    u32 reader_host_tgid;      /* a pod build (bpf/pidns.h): the last reader's tgid as the
                                * host numbers it; its pod tgid (the state's pid) is asked again
                                * only when this changes */
    u32 ev_flags;              /* OTW_EV_* (bpf/goread.h) of that last read */
    /* the watch's tracepoint read sampler: is this socket's reader a traced process? Asked of
     * its table once per socket and reader, again when the table changed (its generation) */
    u32 go_tgid;               /* the reader asked about */
    u32 go_gen;                /* the table's generation then */
    u32 go_slot;               /* its struct goread_proc (bpf/goread.h), field for field: */
    u32 go_slot_gen;           /*   slot, gen, goid_off, links */
    u32 go_goid_off;
    u32 go_links;
    u32 go_known;              /* 1 when the reader is traced */
};

/* the `socks` map's value: the state (copied into snapshots) and the arrival ring (kernel-only) */
struct water_sock {
    struct water_state s;
    struct water_arrivals a;
};

/* one snapshot on the ring buffer */
struct water_event {
    struct water_state s;
    u64 ts_ns;         /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
    u64 lost_since_ns; /* lost_before > 0: when the first of those records was lost */
    u64 lost_until_ns; /*   ...and the last */
    u32 tid;           /* thread in whose context the event ran (the sender's, for loopback rain) */
    u32 lost_before;   /* records this CPU could not put on the ring buffer since it last
                        * delivered one: the loss travels in-band, with the next record */
    u8 trigger;        /* OTW_TRIGGER_* */
    u8 _pad[7];
};

/* the per-CPU `lost` array's only slot: ring-buffer records this CPU could not deliver. Touched
 * only when a record is emitted: a failed reserve counts (total) and keeps the loss pending;
 * the next record this CPU reserves carries pending, since_ns and until_ns and takes them off. */
struct water_lost {
    u64 total;         /* lost since load (exact; Python sums the CPUs) */
    u64 pending;       /* lost since this CPU last delivered a record */
    u64 since_ns;      /* when the first of those was lost (meaningful while pending) */
    u64 until_ns;      /* ...and the last */
};

/* run-time knobs the loader writes into the `cfg` array (slot 0) */
struct water_cfg {
    u64 generation;    /* bumped when the pid/inode filter sets change */
};

#endif
