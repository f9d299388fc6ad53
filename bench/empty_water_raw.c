/* empty_water_raw.c: the raw-tracepoint floor for bench/water_overhead.py. bpf/water.c attaches
 * to raw tracepoints (the program gets the tracepoint's arguments as they are, with no perf
 * record filled first), so its own work is "water" minus this; empty_water.c keeps the floor of
 * the classic tracepoints, what any TRACEPOINT_PROBE program on these points costs.
 * OTW_SEND_FLOOR: also sock_send_length, which the watch attaches when it traces Go readers
 * (our last send on a socket splits a read's wait into idle and waiting for the peer).
 */
RAW_TRACEPOINT_PROBE(sk_data_ready) { return 0; }
RAW_TRACEPOINT_PROBE(sock_recv_length) { return 0; }
RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }
RAW_TRACEPOINT_PROBE(tcp_destroy_sock) { return 0; }
#if OTW_HAVE_KFREE_SKB_RX_SK
RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }
#endif
RAW_TRACEPOINT_PROBE(sock_rcvqueue_full) { return 0; }
#if OTW_SEND_FLOOR
RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }
#endif
