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
