/* The socket key, shared by every otelwater BPF program. The same function is in
 * otelwater/sockkey.py; tests/unit/test_sockkey.py and tests/integration pin both.
 *
 *   sock_key = FNV-1a-64 over 40 bytes:
 *     netns u32 LE | lport u16 LE | rport u16 LE | laddr[16] | raddr[16]
 *   addresses as IPv6, IPv4 as ::ffff:a.b.c.d; ports as host-order values.
 *
 * otw_sock_tuple() reads those fields from a struct sock with offsets the loader took from
 * the running kernel's BTF and passed as -D flags:
 *   OFF_SKC_FAMILY OFF_SKC_NUM OFF_SKC_DPORT OFF_SKC_DADDR OFF_SKC_RCV_SADDR
 *   OFF_SKC_V6_DADDR OFF_SKC_V6_RCV_SADDR OFF_SKC_NET OFF_NET_NS_INUM
 * Kernels: any with BTF; tested on 6.18 x86_64.
 */
#ifndef OTELWATER_SOCKKEY_H
#define OTELWATER_SOCKKEY_H

struct otw_tuple {
    u8 laddr[16];
    u8 raddr[16];
    u32 netns;
    u16 lport;
    u16 rport;
    u16 family;
    u16 _pad[3];
};

#define OTW_FNV64_OFFSET 0xcbf29ce484222325ULL
#define OTW_FNV64_PRIME 0x100000001b3ULL

static __always_inline u64 otw_fnv_u8(u64 h, u8 b)
{
    return (h ^ b) * OTW_FNV64_PRIME;
}

static __always_inline u64 otw_sock_key(const struct otw_tuple *t)
{
    u64 h = OTW_FNV64_OFFSET;
    u8 hdr[8];
    *(u32 *)&hdr[0] = t->netns; /* x86-64 and arm64 BPF are little-endian */
    *(u16 *)&hdr[4] = t->lport;
    *(u16 *)&hdr[6] = t->rport;
#pragma unroll
    for (int i = 0; i < 8; i++)
        h = otw_fnv_u8(h, hdr[i]);
#pragma unroll
    for (int i = 0; i < 16; i++)
        h = otw_fnv_u8(h, t->laddr[i]);
#pragma unroll
    for (int i = 0; i < 16; i++)
        h = otw_fnv_u8(h, t->raddr[i]);
    return h;
}

/* The inode of the socket's network namespace (sk->sk_net->ns.inum), 0 if unreadable. */
static __always_inline u32 otw_sock_netns(const void *sk)
{
    void *net = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SKC_NET);
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_NS_INUM);
    return inum;
}

/* Fill *t from a kernel struct sock pointer. Returns 0, or -1 for a family we do not key. */
static __always_inline int otw_sock_tuple(const void *sk, struct otw_tuple *t)
{
    u16 family = 0, dport_be = 0, num = 0;
    bpf_probe_read_kernel(&family, sizeof(family), (const char *)sk + OFF_SKC_FAMILY);
    bpf_probe_read_kernel(&num, sizeof(num), (const char *)sk + OFF_SKC_NUM);
    bpf_probe_read_kernel(&dport_be, sizeof(dport_be), (const char *)sk + OFF_SKC_DPORT);
    t->family = family;
    t->lport = num;
    t->rport = __builtin_bswap16(dport_be);
    if (family == 2 /* AF_INET */) {
        u32 s = 0, d = 0;
        bpf_probe_read_kernel(&s, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(&d, 4, (const char *)sk + OFF_SKC_DADDR);
        __builtin_memset(t->laddr, 0, 16);
        __builtin_memset(t->raddr, 0, 16);
        t->laddr[10] = 0xff; t->laddr[11] = 0xff;
        t->raddr[10] = 0xff; t->raddr[11] = 0xff;
        *(u32 *)&t->laddr[12] = s;
        *(u32 *)&t->raddr[12] = d;
    } else if (family == 10 /* AF_INET6 */) {
        bpf_probe_read_kernel(t->laddr, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(t->raddr, 16, (const char *)sk + OFF_SKC_V6_DADDR);
    } else {
        return -1;
    }
    t->netns = otw_sock_netns(sk);
    return 0;
}

#endif
