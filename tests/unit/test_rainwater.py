"""Rain water: the two-pointer figure against an O(n^2) brute force, plain and time-weighted,
and the per-socket ring."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otelwater.analysis.rainwater import RainGauge, RainGauges, trapped
from otelwater.events.model import WaterSnapshot


def brute(heights, ts=None):
    """sum_i (min(max(h[:i+1]), max(h[i:])) - h[i]) * d_i, straight from the definition."""
    total = 0
    n = len(heights)
    for i, v in enumerate(heights):
        sky = min(max(heights[: i + 1]), max(heights[i:]))
        d = 1 if ts is None else (ts[i + 1] - ts[i] if i + 1 < n else 0)
        total += (sky - v) * d
    return total


heights = st.lists(st.integers(0, 1 << 20), max_size=80)
# few distinct values: plateaus and ties, where two-pointer off-by-ones live
plateaus = st.lists(st.sampled_from([0, 3, 3, 7, 7, 7]), max_size=80)


def with_times(draw_heights):
    return draw_heights.flatmap(lambda h: st.tuples(
        st.just(h), st.lists(st.integers(0, 10**9), min_size=len(h), max_size=len(h))
        .map(lambda gaps: [sum(gaps[: i + 1]) for i in range(len(gaps))])))


@given(st.one_of(heights, plateaus))
def test_two_pointer_equals_brute_force_per_sample(h):
    assert trapped(h) == brute(h)


@given(with_times(st.one_of(heights, plateaus)))
def test_two_pointer_equals_brute_force_time_weighted(case):
    h, ts = case
    assert trapped(h, ts) == brute(h, ts)


@given(st.one_of(heights, plateaus))
def test_reversal_and_monotone_series(h):
    assert trapped(h[::-1]) == trapped(h)
    assert trapped(sorted(h)) == 0 == trapped(sorted(h, reverse=True))


@pytest.mark.parametrize("h, want", [
    ([], 0), ([5], 0), ([5, 0], 0), ([5, 0, 5], 5), ([0, 0, 0], 0), ([7, 7, 7, 7], 0),
    ([3, 0, 0, 3], 6), ([0, 1, 0, 2, 1, 0, 1, 3, 2, 1, 2, 1], 6), ([4, 2, 0, 3, 2, 5], 9),
])
def test_known_series(h, want):
    assert trapped(h) == want == brute(h)


def test_time_weighting_counts_how_long_the_valley_lasted():
    # surge, 1 s drained to 0, surge: 100 bytes held below the skyline for 1 s
    # (each sample holds until the next one)
    assert trapped([100, 0, 100], [0, 1, 1_000_000_001]) == 100 * 10**9
    # the same valley reported 10 times as often (e.g. --follow) is the same area
    ts = [0] + [1 + 100_000_000 * k for k in range(10)] + [1_000_000_001]
    assert trapped([100] + [0] * 10 + [100], ts) == 100 * 10**9


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5000)), max_size=200),
       st.integers(1, 40))
def test_gauge_ring_equals_brute_force_over_its_last_samples(samples, size):
    g = RainGauge(size)
    ts, hs, t = [], [], 0
    for gap, h in samples:
        t += gap
        g.add(t, h)
        ts.append(t)
        hs.append(h)
    f = g.figure()
    last_t, last_h = ts[-size:], hs[-size:]
    assert f.samples == len(last_h)
    assert f.rain_water == brute(last_h, last_t)
    assert f.standing == sum(h * (last_t[i + 1] - last_t[i]) for i, h in enumerate(last_h[:-1]))
    assert f.envelope == f.rain_water + f.standing
    assert f.peak == max(last_h, default=0)


def test_gauge_drops_late_samples():
    g = RainGauge(8)
    g.add(10, 5)
    g.add(5, 100)
    assert (len(g), g.late) == (1, 1)


def snap(ts, key, unread, trigger="periodic"):
    return WaterSnapshot(ts, key, 1, "svc", 1, 0, "127.0.0.1", 80, "127.0.0.1", 5000, 1,
                         unread, unread, 1 << 20, 0, 0, 0, "", 0, 0, trigger, "ESTABLISHED", 1)


def test_gauges_per_socket_bounded_and_final_figure_at_close():
    gauges = RainGauges(samples=4, max_sockets=2)
    for ts, u in ((0, 100), (10, 0), (20, 100)):
        assert gauges.add(snap(ts, 1, u)) is None
    gauges.add(snap(5, 2, 7))
    gauges.add(snap(6, 3, 7))  # a third socket: the least recently fed (1) is forgotten
    assert gauges.figure(1) is None and gauges.evicted == 1 and len(gauges) == 2
    gauges.add(snap(30, 2, 0))
    final = gauges.add(snap(40, 2, 50, trigger="close"))
    # samples (5, 7), (30, 0), (40, 50): the 0 stands 10 ns below the skyline min(7, 50)
    assert (final.rain_water, final.standing, final.samples) == (7 * 10, 7 * 25, 3)
    assert final.drained_share == pytest.approx(70 / 245)
    assert gauges.figure(2) is None and len(gauges) == 1
