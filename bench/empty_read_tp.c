/* empty_read_tp.c: the cost floor of the tracepoint Go read sampler (bpf/goread_tp.c), for
 * bench/goread_cost.py. Empty programs on the same two attach points, system-wide (no pid
 * filter): "empty" minus "off" is what merely having a BPF program on the read syscall's
 * entry and exit costs (static key, BPF trampoline, BCC's argument struct), and the sampler
 * minus "empty" is goread_tp.c's own work.
 * Kernels: any with syscall tracepoints (CONFIG_FTRACE_SYSCALLS); measured on 6.18 x86_64.
 */
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return 0; }
