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

/* ---- the request a recorded read served: its goroutine's profiler labels ----
 * runtime.g.labels points at runtime/pprof's labelMap: before Go 1.24 a map[string]string
 * (labels -> *hmap), from 1.24 a struct whose first member is a []{key, value string}. The
 * two keys Python asks for (link_keys) are looked for among the first OTW_LABELS_SCAN labels
 * and their values' first bytes copied into the record; nothing is written, and a read that is
 * not recorded pays nothing (docs/go.md). */
BPF_ARRAY(link_keys, struct otw_link_keys, 1);
/* scratch for the reads (the BPF stack is near its 512 bytes inside the water probe) */
struct otw_link_scratch {
    u64 w[OTW_LABEL_KEY_MAX / 8];   /* a key's bytes */
    u64 kv[4];                      /* a label's key and value string headers */
    u64 hdr[4];                     /* a slice header, or an hmap's first words */
};
BPF_PERCPU_ARRAY(link_scratch, struct otw_link_scratch, 1);

#define OTW_HMAP_BUCKETS 16        /* hmap: count int; flags, B u8; noverflow u16; hash0 u32; */
#define OTW_HMAP_OLDBUCKETS 24     /*   buckets, oldbuckets unsafe.Pointer (amd64, 1.19-1.23) */
#define OTW_BMAP_SIZE 272          /* bmap of string -> string: tophash [8]u8, keys [8]string, */
#define OTW_BMAP_KEYS 8            /*   elems [8]string, overflow pointer */
#define OTW_BMAP_ELEMS 136
#define OTW_MIN_TOPHASH 5          /* tophash below this: an empty or evacuated slot */

/* one label (its key's and value's string headers): is it one of the keys asked for? */
static __always_inline void otw_link_label(struct goread_event *e,
                                           const struct otw_link_keys *keys,
                                           struct otw_link_scratch *sc)
{
    u64 kptr = sc->kv[0], klen = sc->kv[1], vptr = sc->kv[2], vlen = sc->kv[3];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        u8 found = j ? OTW_LINK_FOUND1 : OTW_LINK_FOUND0;
        if (!keys->len[j] || klen != keys->len[j] || (e->links & found))
            continue;
        u64 *w = sc->w;
        w[0] = w[1] = w[2] = w[3] = 0;
        u64 n = klen;
        asm volatile("" : "+r"(n));   /* compare and pass one register (else: size unbounded) */
        if (n > OTW_LABEL_KEY_MAX)
            continue;
        if (bpf_probe_read_user(w, n, (void *)kptr))
            continue;
        const u64 *want = (const u64 *)keys->key[j];
        if (w[0] != want[0] || w[1] != want[1] || w[2] != want[2] || w[3] != want[3])
            continue;
        u64 m = vlen < OTW_LABEL_VAL_MAX ? vlen : OTW_LABEL_VAL_MAX;
        asm volatile("" : "+r"(m));
        if (m > OTW_LABEL_VAL_MAX)
            continue;
        if (m && bpf_probe_read_user(e->lbl[j], m, (void *)vptr))
            continue;
        e->lbl_len[j] = vlen < 255 ? vlen : 255;
        e->links |= found;
    }
}

static __always_inline void otw_read_links(struct goread_event *e, u64 g, u32 links)
{
    e->links = 0;
    e->go_start = 0;
    e->lbl_len[0] = e->lbl_len[1] = 0;
    u32 labels_off = links & (OTW_LABELS_SLICE - 1), startpc_off = links >> 16;
    if (!g)
        return;
    if (startpc_off)
        bpf_probe_read_user(&e->go_start, sizeof(e->go_start), (void *)(g + startpc_off));
    u64 lm = 0;
    if (!labels_off || bpf_probe_read_user(&lm, sizeof(lm), (void *)(g + labels_off)) || !lm)
        return;
    e->links = OTW_LINK_LABELS;
    u32 zero = 0;
    struct otw_link_keys *keys = link_keys.lookup(&zero);
    struct otw_link_scratch *sc = link_scratch.lookup(&zero);
    if (!keys || !sc)
        return;
    if (links & OTW_LABELS_SLICE) {
        u64 *list = sc->hdr;    /* the slice's array and length */
        if (bpf_probe_read_user(list, 16, (void *)lm)) {
            e->links |= OTW_LINK_UNREADABLE;
            return;
        }
        if (list[1] > OTW_LABELS_SCAN)
            e->links |= OTW_LINK_MORE;
        for (int i = 0; i < OTW_LABELS_SCAN; i++) {
            if (i >= list[1])
                break;
            /* key ptr, len; value ptr, len */
            if (bpf_probe_read_user(sc->kv, sizeof(sc->kv), (void *)(list[0] + 32 * i)))
                break;
            otw_link_label(e, keys, sc);
        }
        return;
    }
    u64 h = 0, *hdr = sc->hdr;   /* *labelMap = *hmap: count, flags|B, buckets, oldbuckets */
    if (bpf_probe_read_user(&h, sizeof(h), (void *)lm) || !h
            || bpf_probe_read_user(hdr, sizeof(sc->hdr), (void *)h)) {
        e->links |= OTW_LINK_UNREADABLE;
        return;
    }
    u32 nb = 1u << ((hdr[1] >> 8) & 0xff);
    if (hdr[OTW_HMAP_OLDBUCKETS / 8] || !hdr[OTW_HMAP_BUCKETS / 8]) {
        if (hdr[0])   /* growing (not all moved yet), or entries with no buckets */
            e->links |= OTW_LINK_UNREADABLE;
        return;
    }
    if (nb * 8 > OTW_LABELS_SCAN)
        e->links |= OTW_LINK_MORE;
    for (int i = 0; i < OTW_LABELS_SCAN; i++) {
        u32 b = i / 8, slot = i % 8;
        if (b >= nb)
            break;
        u64 base = hdr[OTW_HMAP_BUCKETS / 8] + (u64)b * OTW_BMAP_SIZE;
        u8 top = 0;
        if (bpf_probe_read_user(&top, 1, (void *)(base + slot)) || top < OTW_MIN_TOPHASH)
            continue;
        if (bpf_probe_read_user(sc->kv, 16, (void *)(base + OTW_BMAP_KEYS + 16 * slot))
                || bpf_probe_read_user(&sc->kv[2], 16,
                                       (void *)(base + OTW_BMAP_ELEMS + 16 * slot)))
            continue;
        otw_link_label(e, keys, sc);
    }
}
