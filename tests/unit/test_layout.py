"""The kernel→user layouts come from bpf/*.h; pin them so drift fails loudly (the integration
tests check BCC compiles the same header into the same sizes)."""

import ctypes

import pytest

from otelwater.events.layout import Header, header


def offsets(struct):
    return {name: getattr(struct, name).offset for name, _ in struct._fields_}


def test_water_state_layout_is_pinned():
    s = header("water.h").structs["water_state"]
    assert ctypes.sizeof(s) == 160
    assert offsets(s) == {
        "sock_key": 0, "ino": 8, "last_ts_ns": 16, "last_emit_ns": 24, "changes": 32,
        "empty_arrival_ns": 40, "laddr": 48, "raddr": 64, "pid": 80, "netns": 84, "level": 88,
        "volume": 92, "capacity": 96, "backlog": 100, "drops": 104, "rcv_nxt": 108,
        "copied_seq": 112, "peak_volume": 116, "drop_events": 120, "drop_reason": 124,
        "generation": 128, "lport": 132, "rport": 134, "watched": 136, "above": 137,
        "tcp_state": 138, "last_trigger": 139, "comm": 140, "fin": 156, "role": 157,
        "_pad": 158}
    a = header("water.h").structs["water_arrivals"]
    n = header("water.h").defines["OTW_ARRIVALS"]
    assert ctypes.sizeof(a) == 8 * n + 11 * 8 + 4 * n * 2 + 10 * 4
    # the go_* fields are a struct goread_proc, field for field (water.c casts them)
    go = [f for f, _ in a._fields_]
    assert go[go.index("go_slot"):go.index("go_known") + 1] == [
        "go_slot", "go_slot_gen", "go_goid_off", "go_links", "go_known"]
    assert [f for f, _ in header("goread.h").structs["goread_proc"]._fields_] == [
        "slot", "gen", "goid_off", "links"]
    assert ctypes.sizeof(header("water.h").structs["water_sock"]) == 160 + ctypes.sizeof(a)


def test_water_event_layout_is_pinned():
    e = header("water.h").structs["water_event"]
    assert ctypes.sizeof(e) == 200
    assert offsets(e) == {"s": 0, "ts_ns": 160, "lost_since_ns": 168, "lost_until_ns": 176,
                          "tid": 184, "lost_before": 188, "trigger": 192, "_pad": 193}
    lost = header("water.h").structs["water_lost"]
    assert ctypes.sizeof(lost) == 32
    assert offsets(lost) == {"total": 0, "pending": 8, "since_ns": 16, "until_ns": 24}


def test_every_struct_is_padded_explicitly():
    # no implicit padding: the sum of the fields is the size, so C and Python cannot disagree
    for name in ("water.h", "goread.h"):
        try:
            h = header(name)
        except FileNotFoundError:
            continue
        for sname, s in h.structs.items():
            total = sum(ctypes.sizeof(t) for _, t in s._fields_)
            assert total == ctypes.sizeof(s), f"{name}: struct {sname} has implicit padding"


def test_triggers_defined_once():
    assert header("water.h").defines_with_prefix("OTW_TRIGGER_") == {
        "ARRIVAL": 1, "READ": 2, "OVERFLOW": 3, "CLOSE": 4, "PERIODIC": 5, "STANDING": 6}


def test_parser_rejects_what_it_does_not_understand():
    with pytest.raises(ValueError, match="cannot parse"):
        Header("struct x { union { u32 a; } u; };")
    h = Header("#define N 4\nstruct a { u32 v[N]; u8 c; u8 _p[3]; };\nstruct b { struct a x; };")
    assert ctypes.sizeof(h.structs["b"]) == 20


def test_goread_layouts_are_pinned():
    h = header("goread.h")
    e = h.structs["goread_event"]
    assert ctypes.sizeof(e) == 560
    assert offsets(e) == {
        "ts_start_ns": 0, "ts_end_ns": 8, "goid": 16, "sock_key": 24, "returned": 32,
        "requested": 40, "caller_ip": 48, "arrival_ns": 56, "queue_delay_ns": 64,
        "lost_since_ns": 72, "lost_until_ns": 80, "send_ns": 88, "prev_arrival_ns": 96,
        "ips": 104, "stack_len": 360, "pid": 364, "tid": 368, "fd": 372, "lost_before": 376,
        "rport": 380, "source": 382, "has_goid": 383, "parked": 384, "evidence": 385,
        "role": 386, "kverdict": 387, "raddr": 388, "comm": 404, "links": 420, "lbl_len": 421,
        "_pad": 423, "go_start": 424, "lbl": 432}
    assert ctypes.sizeof(h.structs["goread_proc"]) == 16
    assert offsets(h.structs["goread_proc"]) == {"slot": 0, "gen": 4, "goid_off": 8, "links": 12}
    keys = h.structs["otw_link_keys"]    # written by Python (goread.py _set_link_keys)
    assert offsets(keys) == {"len": 0, "_pad": 2, "key": 8} and ctypes.sizeof(keys) == 72
    assert offsets(h.structs["goread_park"]) == {"start_ns": 0, "g": 8, "gen": 16, "_pad": 20}
    # the uprobe sampler's Go facts of a binary and its executable's key (written by Python:
    # goread.py _bind_uprobe), one program for every binary
    facts = h.structs["goread_gofacts"]
    assert ctypes.sizeof(facts) == 16
    assert offsets(facts) == {"goid_off": 0, "links": 4, "conn_fd": 8, "netfd_sysfd": 12}
    assert ctypes.sizeof(h.structs["goread_exe"]) == 16
    assert offsets(h.structs["goread_exe"]) == {"dev": 0, "ino": 8}
    assert h.defines["OTW_CNT_UNKNOWN"] == h.defines["OTW_CNT_SLOTS"] - 1
    counts = h.structs["goread_counts"]
    assert ctypes.sizeof(counts) == 8 * (
        h.defines["OTW_CNT_SLOTS"] + h.defines["OTW_HIST_SLOTS"] + 3)
    assert [f for f, _ in counts._fields_][-3:] == ["lost_pending", "lost_since_ns",
                                                    "lost_until_ns"]
    # the kernel's verdict counts: one key per (process, role, verdict)
    assert ctypes.sizeof(h.structs["otw_vkey"]) == 8
    assert ctypes.sizeof(h.structs["otw_vcount"]) == 8 * (7 + 2 * h.defines["OTW_HIST_SLOTS"])
    assert h.defines_with_prefix("OTW_V_") == {"PEER": 1, "RUN": 2, "LAG": 3, "UNKNOWN": 4,
                                               "IDLE": 5}


def test_tcp_states_defined_once():
    from otelwater.events.model import TCP_STATES

    assert TCP_STATES[1] == "ESTABLISHED" and TCP_STATES[7] == "CLOSE"
    assert TCP_STATES[10] == "LISTEN" and len(TCP_STATES) == 11
