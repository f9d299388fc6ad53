/* empty_water.c: the cost floor for bench/water_overhead.py. Empty programs on the same six
 * attach points as bpf/water.c, so "empty" minus "off" is what merely having a BPF program on
 * these tracepoints costs (the tracepoint's static key, the BPF trampoline into the program,
 * BCC's argument struct for TRACEPOINT_PROBE), and "water" minus "empty" is water.c's own work.
 * OTW_HAVE_KFREE_SKB_RX_SK: attach raw kfree_skb only where water.c would (kernel.py decides).
 */
TRACEPOINT_PROBE(sock, sk_data_ready) { return 0; }
TRACEPOINT_PROBE(sock, sock_recv_length) { return 0; }
TRACEPOINT_PROBE(sock, inet_sock_set_state) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_destroy_sock) { return 0; }
#if OTW_HAVE_KFREE_SKB_RX_SK
RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }
#endif
RAW_TRACEPOINT_PROBE(sock_rcvqueue_full) { return 0; }
