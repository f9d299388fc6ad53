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
