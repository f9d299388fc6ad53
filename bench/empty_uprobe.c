/* empty_uprobe.c: the cost floor of the uprobe Go read sampler (bpf/goread_uprobe.c), for
 * bench/goread_cost.py. The loader attaches otw_empty_entry at net.(*conn).Read+0 and
 * otw_empty_return at every `ret` inside it (never a uretprobe: it kills Go programs), for one
 * pid, exactly where the sampler attaches. "empty" minus "off" is the uprobe trap itself
 * (breakpoint, single-step out of line, BPF program dispatch); the sampler minus "empty" is
 * goread_uprobe.c's own work.
 * Kernels: any with CONFIG_UPROBES; measured on 6.18 x86_64, Go 1.19 amd64.
 */
int otw_empty_entry(struct pt_regs *ctx) { return 0; }
int otw_empty_return(struct pt_regs *ctx) { return 0; }
