/* goverdict.c: the kernel's verdict counts, shared by both Go read samplers (bpf/goread_tp.c,
 * bpf/goread_uprobe.c). A file of its own, inlined by the loader (otelwater/probes/loader.py
 * main_source), because BCC rewrites map calls only in a program's main text: a map used from
 * an included header would not compile into a map access. The rules and the value layout are
 * in bpf/goread.h (otw_kverdict, struct otw_vcount).
 */
/* slow reads counted by process, socket role and the kernel's verdict (bpf/goread.h) */
BPF_PERCPU_HASH(verdicts, struct otw_vkey, struct otw_vcount, 4096);
BPF_ARRAY(verdicts_zero, struct otw_vcount, 1);   /* never written: where a new key starts */

static __always_inline void otw_count_verdict(u32 tgid, u8 role, u8 verdict, u64 dur, u64 wait,
                                              int recorded, int cut)
{
    struct otw_vkey k = {.tgid = tgid, .role = role, .verdict = verdict};
    struct otw_vcount *v = verdicts.lookup(&k);
    if (!v) {
        u32 zero = 0;
        struct otw_vcount *z = verdicts_zero.lookup(&zero);
        if (!z)
            return;
        verdicts.update(&k, z);
        v = verdicts.lookup(&k);
        if (!v)
            return;
    }
    otw_vcount_add(v, dur, wait, recorded, cut);
}

/* The record token bucket (GCRA), one for all CPUs: 1 when a slow read may go on the ring
 * buffer, evenly spread (no per-second reset that spends a second's share in its first
 * milliseconds). Its one "theoretical arrival time" is read and written without a lock: two
 * CPUs may take the same token now and then (a sample a little over the rate), which costs
 * nothing that matters, where a per-CPU share would starve the CPU the reads land on. */
BPF_ARRAY(record_tb, u64, 1);

static __always_inline int otw_record_token(u64 now)
{
    if (!OTW_RECORD_INTERVAL_NS)
        return 1;
    u32 zero = 0;
    u64 *tatp = record_tb.lookup(&zero);
    if (!tatp)
        return 1;
    u64 tat = *tatp > now ? *tatp : now;
    if (tat - now > (OTW_RECORD_BURST - 1) * (u64)OTW_RECORD_INTERVAL_NS)
        return 0;
    *tatp = tat + OTW_RECORD_INTERVAL_NS;
    return 1;
}

/* A slow read (blocked >= the threshold, or its bytes waited that long: `blocked` says which)
 * gets the kernel's verdict and is counted in `verdicts`; returns that verdict when the read
 * goes on the ring buffer, else 0. Not recorded: idle reads (unless OTW_IDLE_RECORDS),
 * queue-delay slow reads beyond their socket's share (OTW_QSLOW_PER_S), and what the record
 * token bucket cuts. Both samplers decide with this, after their own timing. */
static __always_inline u8 otw_judge(struct goread_counts *c, u32 tgid, int blocked, u8 parked,
                                    u8 role, u64 start, u64 end, u64 arrival, u64 send,
                                    u64 prev_arrival, u32 evf, u64 qd)
{
    u64 wait = 0;
    u8 v = otw_kverdict(parked, role, start, end, arrival, send, prev_arrival, evf, qd, &wait);
    int record = 1, cut = 0;
    if (v == OTW_V_IDLE) {
        c->n[OTW_CNT_IDLE] += 1;
        record = OTW_IDLE_RECORDS;
    }
    if (record && !blocked) {
        if (!(evf & OTW_EV_QSLOW_OK)) {    /* beyond its socket's share: cut too */
            c->n[OTW_CNT_QSLOW_LIMITED] += 1;
            record = 0;
            cut = 1;
        } else {
            c->n[OTW_CNT_QSLOW] += 1;
        }
    }
    if (record && !otw_record_token(end)) {
        c->n[OTW_CNT_CUT] += 1;
        record = 0;
        cut = 1;
    }
    otw_count_verdict(tgid, role, v, end - start, wait, record, cut);
    return record ? v : 0;
}
