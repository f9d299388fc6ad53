"""Default alert rules and their hysteresis."""

from hypothesis import given
from hypothesis import strategies as st

from otelwater.alerts.rules import AlertRules, Thresholds


def test_fill_ratio_fires_once_while_wobbling_and_clears_below_three_quarters():
    rules = AlertRules()
    events = []
    for volume in (50, 85, 79, 81, 70, 61, 59, 90):
        events += rules.update(1, level=1, volume=volume, capacity=100)
    assert [(r, what) for r, what, _ in events] == [
        ("fill_ratio", "fired"), ("fill_ratio", "cleared"), ("fill_ratio", "fired")]


def test_water_level_and_surge():
    rules = AlertRules()
    assert rules.update(1, 5, 0, 100) == []
    assert rules.update(1, 5, 0, 100) == []
    changes = rules.update(1, 101, 0, 100)  # level 101 and variance of (5, 5, 101)
    assert {r for r, what, _ in changes if what == "fired"} == {"water_level", "surge"}
    assert rules.active(1) == {"water_level", "surge"}
    assert rules.active(2) == frozenset()


def test_close_clears_everything():
    rules = AlertRules()
    rules.update(7, 200, 90, 100)
    cleared = rules.update(7, 0, 0, 100, closed=True)
    assert {r for r, what, _ in cleared if what == "cleared"} >= {"water_level", "fill_ratio"}
    assert rules.active(7) == frozenset()


@given(st.lists(st.integers(0, 200), min_size=1, max_size=60))
def test_alerts_alternate_and_never_flap_inside_the_band(levels):
    t = Thresholds()
    rules = AlertRules(t)
    history = []
    for lv in levels:
        for rule, what, value in rules.update(3, lv, 0, 100):
            if rule == "water_level":
                history.append((what, value))
    # fired/cleared strictly alternate, starting with fired
    assert [w for w, _ in history] == ["fired", "cleared"] * (len(history) // 2) + (
        ["fired"] if len(history) % 2 else [])
    for what, value in history:
        assert value > t.water_level if what == "fired" else value <= 75


# ---- the alert stage ----

import json  # noqa: E402

import pytest  # noqa: E402

from otelwater.alerts.rules import Hysteresis, clear_levels  # noqa: E402
from otelwater.alerts.stage import AlertStage, AlertTransition  # noqa: E402
from otelwater.config import AlertConfig  # noqa: E402
from otelwater.events.model import ReadRecord, WaterSnapshot  # noqa: E402

MS = 1_000_000


def snap(ts, key=1, level=1, volume=0, capacity=100, trigger="periodic", pid=42):
    return WaterSnapshot(ts, key, pid, "svc", pid, 0, "127.0.0.1", 80, "127.0.0.1", 5000,
                         level, volume, volume, capacity, 0, 0, 0, "", 0, 0, trigger,
                         "ESTABLISHED", 9)


def read(ts_end, latency, pid=42, key=1, returned=10):
    return ReadRecord(ts_end - latency, ts_end, pid, pid, 1, 3, key, 4096, returned, (),
                      "tracepoint", parked=False, queue_delay_ns=latency)


def transitions(stage, records):
    return [r for r in stage.feed(records) if isinstance(r, AlertTransition)]


def brief(ts, rule=None):
    return [(t.rule, t.state, t.severity) for t in ts if rule in (None, t.rule)]


@pytest.mark.parametrize("rule, quiet, fire, hold, clear, make", [
    ("water_level", 100, 101, 76, 75, lambda v: dict(level=v)),
    ("fill_ratio", 80, 81, 61, 60, lambda v: dict(volume=v)),
])
def test_rule_fires_above_threshold_and_clears_at_three_quarters(rule, quiet, fire, hold, clear,
                                                                 make):
    stage = AlertStage()
    ts = iter(range(0, 10**9, MS))
    assert transitions(stage, [snap(next(ts), **make(quiet))]) == []
    fired = transitions(stage, [snap(next(ts), **make(fire))])
    assert brief(fired, rule) == [(rule, "fired", "warn")]
    assert brief(transitions(stage, [snap(next(ts), **make(hold))]), rule) == []
    assert stage.active(1)[rule] == "warn"
    cleared = transitions(stage, [snap(next(ts), **make(clear))])
    assert brief(cleared, rule) == [(rule, "cleared", "warn")] and rule not in stage.active(1)


def test_surge_is_the_variance_of_three_consecutive_levels():
    stage = AlertStage()
    # (0, 0, 15): variance exactly 50, not above it
    assert transitions(stage, [snap(i * MS, level=lv) for i, lv in enumerate((0, 0, 15))]) == []
    stage = AlertStage()
    got = transitions(stage, [snap(i * MS, level=lv) for i, lv in enumerate((0, 0, 16, 8, 8))])
    assert [(t.rule, t.state, round(t.value, 2)) for t in got] == [
        ("surge", "fired", 56.89),    # (0, 0, 16)
        ("surge", "cleared", 14.22)]  # (0, 16, 8) is 42.67 > 37.5: still firing; (16, 8, 8)


@given(st.lists(st.floats(0.5, 1.5), min_size=1, max_size=80))
def test_stage_never_flaps_for_a_value_wobbling_around_the_threshold(ratios):
    """Fill ratio wobbling within +-50% of 0.8: fired/cleared alternate, each at its edge."""
    stage = AlertStage()
    got = transitions(stage, [snap(i, volume=round(80 * r)) for i, r in enumerate(ratios)])
    assert [t.state for t in got] == ["fired", "cleared"] * (len(got) // 2) + (
        ["fired"] if len(got) % 2 else [])
    for t in got:
        assert t.value > 0.8 if t.state == "fired" else t.value <= 0.6 + 1e-12


def test_hold_time_keeps_a_fired_alert_at_least_that_long():
    stage = AlertStage(AlertConfig(hold_ms=10))
    assert brief(transitions(stage, [snap(0, level=200)])) == [("water_level", "fired", "warn")]
    assert transitions(stage, [snap(5 * MS, level=0)]) == []  # low, but held
    got = [t for t in transitions(stage, [snap(10 * MS, level=0)]) if t.rule == "water_level"]
    assert brief(got) == [("water_level", "cleared", "warn")] and got[0].ts_ns == 10 * MS


def test_close_clears_its_alerts_and_forgets_the_socket():
    stage = AlertStage()
    transitions(stage, [snap(0, level=200, volume=90)])
    got = transitions(stage, [snap(MS, level=150, volume=90, trigger="close")])
    assert {(t.rule, t.state, t.reason) for t in got} == {
        ("water_level", "cleared", "close"), ("fill_ratio", "cleared", "close")}
    assert stage.active(1) == {} and len(stage) == 0


def test_idle_sockets_are_forgotten_and_memory_is_bounded():
    stage = AlertStage(AlertConfig(idle_s=1, max_sockets=3))
    transitions(stage, [snap(0, key=1, level=200)])
    got = transitions(stage, [snap(2 * 10**9, key=2)])
    assert brief(got) == [("water_level", "cleared", "warn")] and got[0].reason == "idle"
    assert got[0].sock_key == 1 and len(stage) == 1
    got = transitions(stage, [snap(2 * 10**9 + i, key=10 + i, level=200) for i in range(4)])
    evicted = [t for t in got if t.state == "cleared"]
    assert [(t.sock_key, t.reason) for t in evicted] == [(10, "evicted")] and len(stage) == 3


def test_a_late_snapshot_is_counted_not_evaluated():
    stage = AlertStage()
    transitions(stage, [snap(10, level=1)])
    assert transitions(stage, [snap(5, level=500)]) == [] and stage.late == 1


def test_transitions_follow_their_cause_and_serialize():
    stage = AlertStage()
    s = snap(7, key=0xAB, level=300)
    out = stage.feed([s])
    assert out[0] is s and isinstance(out[1], AlertTransition)
    d = json.loads(json.dumps(out[1].to_json()))
    assert d == {"type": "alert", "ts_ns": 7, "sock_key": "00000000000000ab", "pid": 42,
                 "rule": "water_level", "state": "fired", "severity": "warn", "value": 300.0,
                 "threshold": 100.0, "previous": "", "reason": ""}


# ---- banded hysteresis (Hysteresis keeps ascending bands; read_skew: test_alerts_tail.py) ----

BANDS = (0.8, 1.2, 2.0)
CLEARS = clear_levels(BANDS, 0.75)  # 0.6, 0.9, 1.5


def test_bands_move_up_and_down_with_hysteresis():
    h = Hysteresis()
    seen = []
    for v in (0.5, 0.81, 1.0, 1.3, 2.5, 1.6, 1.5, 1.0, 0.9, 0.7, 0.6, 0.9, 2.1):
        left = h.step(v, 0, BANDS, CLEARS)
        if left is not None:
            seen.append((v, left, h.band))
    assert seen == [(0.81, 0, 1), (1.3, 1, 2), (2.5, 2, 3),  # up one band at a time, then
                    (1.5, 3, 2),    # avalanche left at <= 1.5 (not at 1.6)
                    (0.9, 2, 1),    # high left at <= 0.9
                    (0.6, 1, 0),    # warn clears at <= 0.6
                    (0.9, 0, 1), (2.1, 1, 3)]  # and straight from warn to avalanche


@given(st.lists(st.floats(0, 3, allow_nan=False), max_size=100))
def test_bands_equal_three_independent_hysteresis_rules(values):
    """The banded rule is one hysteresis per band; severity is the highest band firing."""
    h = Hysteresis()
    on = [False] * 3
    for v in values:
        for k, limit in enumerate(BANDS):
            if not on[k] and v > limit:
                on[k] = True
            elif on[k] and v <= CLEARS[k]:
                on[k] = False
        h.step(v, 0, BANDS, CLEARS)
        assert h.band == sum(on) and on == sorted(on, reverse=True)


def test_reads_of_no_socket_or_that_failed_are_not_watched():
    stage = AlertStage()
    assert stage.feed([read(MS, MS, key=0), read(2 * MS, MS, returned=-11)]) == [
        read(MS, MS, key=0), read(2 * MS, MS, returned=-11)]
    assert len(stage) == 0 and stage.unmeasured == 0
    stage.feed([read(3 * MS, MS)])
    assert stage.tail_watch(42) is not None and stage.active_process(42) == {}


def test_an_exited_process_is_forgotten_at_once_not_idle_s_later():
    # Given process-scope state (read_skew by process) for two processes
    stage = AlertStage()
    stage.feed([read(10 * MS, MS, pid=42), read(11 * MS, MS, pid=43, key=2)])
    procs_before = len(stage._procs)
    # When the agent tells it that 42 exited
    stage.forget_process(42, 12 * MS)
    # Then 42's state is gone and 43's kept; an unknown pid is nothing to forget
    assert procs_before == 2 and set(stage._procs) == {43}
    assert stage.forget_process(99, 13 * MS) == []
