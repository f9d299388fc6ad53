/* The current task's process and thread ids as otelwater's user space numbers them.
 *
 * bpf_get_current_pid_tgid() gives the ids of the host's (the initial) pid namespace. An
 * agent in a pod whose containers share one pid namespace (a sidecar) sees another
 * numbering in its /proc: the service may be pid 7 there and pid 48213 on the host, and
 * nothing in that pod can learn the host's number. There the loader passes the namespace
 * its /proc numbers processes in (the device and inode of its ns/pid file) as OTW_PIDNS_DEV
 * and OTW_PIDNS_INO, and every id the programs read, key maps by or report comes from
 * bpf_get_ns_current_pid_tgid in that namespace (one helper call, ~106 ns here: the water
 * probe's reads keep the answer per socket, water.c otw_reader_tgid). A task whose own
 * pid namespace is another one (another pod's, the host's, softirq work run on a foreign
 * task) reads 0: no process of the agent's. Without those macros (the host's namespace:
 * a DaemonSet with hostPID, a systemd unit) it is bpf_get_current_pid_tgid, nothing more.
 * Same layout either way: tgid in the upper 32 bits, the thread id in the lower.
 */
#ifndef OTELWATER_PIDNS_H
#define OTELWATER_PIDNS_H

static __always_inline u64 otw_pid_tgid(void)
{
#ifdef OTW_PIDNS_INO
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(OTW_PIDNS_DEV, OTW_PIDNS_INO, &ns, sizeof(ns)))
        return 0;
    return (u64)ns.tgid << 32 | ns.pid;
#else
    return bpf_get_current_pid_tgid();
#endif
}

#endif
