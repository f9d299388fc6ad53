"""The alert rules (docs/design.md, Alerts), their hysteresis, and the read-latency tail watch:
pure.

    water_level   level (skbs queued) > 100                                    severity warn
    fill_ratio    volume / capacity > 0.8                                      severity warn
    surge         population variance of the level over the last 3 samples > 50   warn
    read_skew     a process's read-latency tail (p99, or p90, of the last 5 s) rose above 3x
                  its own baseline (the level it usually stays under, learnt over minutes) and
                  5 ms more, for 4 s running; clears after 10 s below       severity warn

Hysteresis of the snapshot rules: a rule fires when its value goes above `threshold` and clears
only when the value falls to `threshold * clear_fraction` or below (default 0.75), so a value
wobbling around the threshold fires once. (`Hysteresis` also keeps ascending bands, one state
per band: it moves up to the highest band whose threshold the value exceeds, and down out of
band k only at `clear_fraction * band_k` or below.) With `hold_ns` a rule stays at least that
long in a band before it may move down or clear.

read_skew (`TailWatch`) is a change detector, not a shape test: read latency is skewed by nature
(a lognormal, a power law, a fast path and a slow one), so any rule on the shape of a steady
distribution (skewness, p99/p50) fires all the time on a healthy process. It compares the
process with itself, in time (fire_after_s, clear_after_s) and in count (min_samples,
min_tail, min_baseline): TailWatch's docstring has the rule, tests/unit/test_alerts_tail.py
the steady streams it stays quiet on and the avalanches it catches.

Note on water_level: TCP coalesces segments, so a loopback queue holding 60 kB may be 2 skbs;
the level rule fires only when many small segments stand unread (a peer writing small messages
to a reader that stopped, with a large receive buffer), while volume and fill ratio catch
standing water of any shape.

`AlertRules` is the per-snapshot interface the live view used before the alert stage
(otelwater.alerts.stage.AlertStage) existed; it runs the same `Hysteresis`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from otelwater.config import AlertConfig
from otelwater.sockkey import format_key

Thresholds = AlertConfig  # the old name: same fields (water_level, fill_ratio, ...)

SEVERITIES = ("warn", "high", "avalanche")


class Hysteresis:
    """One rule's state over ascending thresholds (a plain rule has one): band 0 is quiet,
    band k means the value went above thresholds[k-1] and has not fallen to
    clear_fraction * thresholds[k-1] since."""

    __slots__ = ("band", "since_ns")

    def __init__(self):
        self.band = 0
        self.since_ns = 0

    def step(self, value: float, ts_ns: int, thresholds: tuple[float, ...],
             clears: tuple[float, ...], hold_ns: int = 0) -> int | None:
        """Take one value; return the band it left when the band changed, else None.
        `clears` are the clear levels of the bands (see clear_levels)."""
        up = 0
        for i, limit in enumerate(thresholds):
            if value > limit:
                up = i + 1
        new = self.band
        if up > new:
            new = up
        elif new and ts_ns - self.since_ns >= hold_ns:
            while new and value <= clears[new - 1]:
                new -= 1
        if new == self.band:
            return None
        old, self.band, self.since_ns = self.band, new, ts_ns
        return old


def clear_levels(thresholds: tuple[float, ...], fraction: float) -> tuple[float, ...]:
    """fraction * threshold for each band, to 12 significant digits, so 0.75 * 1.2 clears at
    0.9 and not at the float product 0.8999999999999999."""
    return tuple(float(f"{fraction * t:.12g}") for t in thresholds)


def level_variance(levels) -> float:
    """Population variance of integer levels, from exact integer sums."""
    n = len(levels)
    s1 = sum(levels)
    return (n * sum(x * x for x in levels) - s1 * s1) / (n * n)


# ---- read_skew: the tail of read latency against its own baseline ----

BUCKETS_PER_DOUBLING = 16   # latency histogram resolution: 2^(1/16), 4.4% a bucket
SLOTS = 10                  # the window is kept in SLOTS slots and judged once a slot
WORST = 5                   # the slowest reads an alert names
RATE_GUARD = 3.0            # reads above the limit must be this many times their usual share
PSEUDO_READS = 2.0          # ... counted as if this many more usual reads had been above it
WARMUP_WINDOWS = 6          # the baseline learns freely this many windows before it judges
BASE_QUANTILE = 0.9         # the baseline: the level the windows' tails stay under 90% of the time
SPREAD_SLOTS = 4            # the reads above the limit lie in this many slots (not one burst)
WARM_KEPT = 4096            # tails kept while warming up (the latest)


def service_latency(rec) -> int | None:
    """The service's own part of a read's latency, from the kernel's stamps on it: for a read
    that parked, from the arrival that woke it to its return (waiting to run); for one that
    found data waiting, how long its oldest byte stood in the queue (parked False, or not
    stamped: the bytes stood that long either way). None when the read carries neither stamp
    (a park no data ended, a read without evidence). The time a read waits for its peer is the
    peer's, not the service's, and is left out."""
    if rec.parked is True:
        arrival = rec.ts_arrival_ns
        if arrival is None:
            return None
        return rec.ts_end_ns - min(max(arrival, rec.ts_start_ns), rec.ts_end_ns)
    qd = rec.queue_delay_ns
    return None if qd is None else max(0, qd)


def read_latency(rec, kind: str = "service") -> int | None:
    """The latency read_skew watches (alerts.read_skew.latency): "service" (service_latency)
    or "duration" (ts_end_ns - ts_start_ns, the peer's wait included)."""
    if kind == "duration":
        return max(0, rec.ts_end_ns - rec.ts_start_ns)
    return service_latency(rec)


def bucket(ns: int) -> int:
    """The histogram bucket of a latency: floor(log2(ns) * 16); -1 for 0."""
    return int(math.log2(ns) * BUCKETS_PER_DOUBLING) if ns >= 1 else -1


def bucket_value(b: int) -> float:
    """The geometric middle of a bucket (within 2.2% of every latency in it)."""
    return 0.0 if b < 0 else 2.0 ** ((b + 0.5) / BUCKETS_PER_DOUBLING)


def quantile(items: list[tuple[int, int]], n: int, q: float) -> float:
    """The q-quantile (nearest rank) of a histogram given as sorted (bucket, count)."""
    rank = max(1, math.ceil(q * n - 1e-9))
    seen = 0
    for b, c in items:
        seen += c
        if seen >= rank:
            return bucket_value(b)
    return bucket_value(items[-1][0]) if items else 0.0


def read_brief(rec, latency: int) -> dict:
    """A read as an alert names it."""
    if rec is None:
        return {"latency_ns": latency}
    return {"ts_end_ns": rec.ts_end_ns, "pid": rec.pid, "tid": rec.tid, "goid": rec.goid,
            "fd": rec.fd, "sock_key": format_key(rec.sock_key), "latency_ns": latency}


class _Slot:
    __slots__ = ("index", "counts", "n", "worst")

    def __init__(self, index: int):
        self.index = index
        self.counts: dict[int, int] = {}
        self.n = 0
        self.worst: list = []       # min-heap of (latency, ts, seq, read): the WORST slowest


class _Judge:
    """One watched quantile: its baseline, and what the last window said of it."""

    __slots__ = ("q", "warm", "log_base", "judged_base", "tail", "limit", "above", "usual",
                 "over")

    def __init__(self, q: float):
        self.q = q
        self.warm: list[float] = []         # log tails while warming up
        self.log_base: float | None = None  # then the baseline, log ns
        self.judged_base: float | None = None  # the baseline the last window was judged by
        self.tail = self.limit = self.usual = 0.0
        self.above = 0
        self.over = False

    @property
    def baseline(self) -> float | None:
        if self.log_base is not None:
            return math.exp(self.log_base)
        return math.exp(self._warm_base()) if self.warm else None

    def _warm_base(self) -> float:
        w = sorted(self.warm)
        return w[min(len(w) - 1, int(BASE_QUANTILE * len(w)))]

    def learn(self, ready: bool, step: float) -> None:
        x = math.log(max(self.tail, 1.0))
        if self.log_base is None and not ready:
            self.warm.append(x)
            if len(self.warm) > WARM_KEPT:
                del self.warm[0]
            return
        if self.log_base is None:
            self.log_base = self._warm_base() if self.warm else x
            self.warm = []
        self.log_base += step * ((x > self.log_base) - (1.0 - BASE_QUANTILE))

    def figures(self) -> dict:
        base = self.judged_base
        return {"quantile": self.q, "tail_ms": round(self.tail / 1e6, 3),
                "baseline_ms": None if base is None else round(base / 1e6, 3),
                "limit_ms": round(self.limit / 1e6, 3), "tail_reads": self.above,
                "usual_share_above": round(self.usual, 6), "over": self.over}


class TailWatch:
    """read_skew on one process (or socket): the tail of its read latency now against the tail
    it usually has. Pure; feed it reads in time order with add(ts, latency, read).

    Every slot (window_s / 10) the window of the last window_s is judged, its reads in a log
    histogram (4.4% buckets), for each watched quantile q (`quantile` 0.99: a tail that
    stretches; `spread_quantile` 0.9: a slowdown that spreads to more reads):
      tail      the window's q-quantile
      baseline  the level the windows' tails usually stay under: the 90th percentile of the
                windows' tails over time, learnt by stochastic approximation in log space with
                time constant baseline_s (300 s): each judgement moves it up by 0.9 x step when
                the tail is above it, down by 0.1 x step when not (step = slot / baseline_s /
                0.1). A tail above it for 10 s raises it by 35% at most; after a lasting change
                (10x for good) the limit reaches the new tail in about 40 s, and the alert
                clears clear_after_s later. It starts as the 90th
                percentile of the tails seen while warming up.
      limit     max(factor x baseline, baseline + margin)              (3x, and 5 ms more)
      above     the window's reads slower than the limit
    A quantile is over when the baseline is ready (min_baseline reads learnt, over at least
    WARMUP_WINDOWS windows), the window holds min_samples reads, and `above` is:
      - at least min_tail reads, lying in at least SPREAD_SLOTS (4) of the window's 10 slots
        (one burst shorter than a slot or two is not a change of the tail);
      - more than (1 - q) of the window (its q-quantile is above the limit);
      - at least RATE_GUARD (3) x the share of the baseline's own reads above the limit (a
        histogram of the reads learnt, decayed with baseline_s, plus PSEUDO_READS): a steady
        mode of slow reads (1% of them at 100 ms behind a 2 ms body makes the windows' p99 jump
        between the two modes) is usual, not a change.
    The rule fires when a quantile has been over for fire_after_s running, and clears when none
    has been over for clear_after_s (a window with fewer than min_samples
    reads is not judged: it stops a pending fire and does not clear). A window is judged before
    it is learnt from; the histogram learns each slot as it leaves the window, without its
    reads above the limits if the rule is pending or firing then.
    """

    __slots__ = ("cfg", "slot_ns", "window_ns", "tau_ns", "margin_ns", "fire_ns", "clear_ns",
                 "slots", "judges", "hist", "hist_n", "base_reads", "new_reads", "first_eval",
                 "last_eval", "pending_since", "calm_since", "fired_at", "band", "lead", "value",
                 "limit", "detail", "_seq")

    def __init__(self, cfg):
        self.cfg = cfg
        self.window_ns = max(SLOTS, int(cfg.window_s * 1e9))
        self.slot_ns = self.window_ns // SLOTS
        self.tau_ns = cfg.baseline_s * 1e9
        self.margin_ns = cfg.margin_ms * 1e6
        self.fire_ns = int(cfg.fire_after_s * 1e9)
        self.clear_ns = int(cfg.clear_after_s * 1e9)
        self.slots: deque[_Slot] = deque()
        qs = [cfg.quantile] + ([cfg.spread_quantile] if cfg.spread_quantile else [])
        self.judges = [_Judge(q) for q in qs]
        self.lead = self.judges[0]              # the quantile the figures are of
        self.hist: dict[int, float] = {}        # the reads the baseline learnt, decayed
        self.hist_n = 0.0
        self.base_reads = 0                     # reads the baseline has learnt from
        self.new_reads = 0                      # reads since it last learnt
        self.first_eval: int | None = None
        self.last_eval: int | None = None
        self.pending_since: int | None = None   # over since (not firing yet)
        self.calm_since: int | None = None      # not over since (firing)
        self.fired_at = 0
        self.band = 0                           # 1 while firing (as Hysteresis.band)
        self.value = 0.0                        # the last judged window's tail, ms
        self.limit = 0.0                        # and its limit, ms (0: no baseline yet)
        self.detail: dict | None = None         # what the last transition said
        self._seq = 0

    @property
    def baseline_ns(self) -> float | None:
        """The baseline of the tail quantile."""
        return self.judges[0].baseline

    def add(self, ts: int, latency: int, rec=None) -> str | None:
        """Take one read (its end time and latency, ns); "fired" or "cleared" when the read
        began a slot whose judgement changed the state, else None."""
        index = ts // self.slot_ns
        slots = self.slots
        out = None
        if not slots or index > slots[-1].index:
            if slots:
                out = self._judge(ts, index)
            slots.append(_Slot(index))
        slot = slots[-1]            # a read a little late counts in the newest slot
        latency = max(0, int(latency))
        b = bucket(latency)
        slot.counts[b] = slot.counts.get(b, 0) + 1
        slot.n += 1
        self.new_reads += 1
        self._seq += 1
        item = (latency, ts, self._seq, rec)
        if len(slot.worst) < WORST:
            heapq.heappush(slot.worst, item)
        elif latency > slot.worst[0][0]:
            heapq.heapreplace(slot.worst, item)
        return out

    def reset(self) -> None:
        """Cleared from outside (close, idle, evicted): quiet again, baseline kept."""
        self.band = 0
        self.pending_since = self.calm_since = None

    # -- inside --------------------------------------------------------------------------------
    def _share_above(self, limit: float) -> float:
        """The baseline's usual share of reads above a limit (with PSEUDO_READS)."""
        high = sum(c for b, c in self.hist.items() if bucket_value(b) > limit)
        return (high + PSEUDO_READS) / max(self.hist_n, 1.0)

    def _spread(self, limit: float) -> int:
        """How many of the window's slots hold a read above the limit."""
        return sum(1 for s in self.slots
                   if any(bucket_value(b) > limit for b in s.counts))

    def _judge(self, now: int, index: int) -> str | None:
        cfg = self.cfg
        slots = self.slots
        if slots and slots[0].index < index - SLOTS:
            # slots leaving the window: the histogram learns their reads, but while the rule
            # is pending or firing not those above a limit (an avalanche is not the usual)
            cut = math.inf
            if self.band or self.pending_since is not None:
                cut = min((j.limit for j in self.judges if j.limit), default=math.inf)
            while slots and slots[0].index < index - SLOTS:
                self._learn_slot(slots.popleft(), cut)
        counts: dict[int, int] = {}
        n = 0
        for s in slots:
            n += s.n
            for b, c in s.counts.items():
                counts[b] = counts.get(b, 0) + c
        if n < cfg.min_samples:
            self.pending_since = None   # too few reads to judge: no fire, no learning
            return None
        items = sorted(counts.items())
        if self.first_eval is None:
            self.first_eval = now
        ready = (self.base_reads >= cfg.min_baseline
                 and now - self.first_eval >= WARMUP_WINDOWS * self.window_ns)
        for j in self.judges:
            j.tail = quantile(items, n, j.q)
            base = j.judged_base = j.baseline
            j.above, j.over, j.limit, j.usual = 0, False, 0.0, 0.0
            if base is None:
                continue
            j.limit = max(cfg.factor * base, base + self.margin_ns)
            for b, c in reversed(items):
                if bucket_value(b) <= j.limit:
                    break
                j.above += c
            j.usual = self._share_above(j.limit)
            j.over = (ready and j.above >= cfg.min_tail and j.above > (1.0 - j.q) * n
                      and j.above >= RATE_GUARD * j.usual * n
                      and self._spread(j.limit) >= SPREAD_SLOTS)
        over = [j for j in self.judges if j.over]
        self._learn(now, ready)
        if not self.band:
            self.lead = over[0] if over else self.judges[0]
        lead = self.lead            # while firing: the quantile that fired
        self.value, self.limit = lead.tail / 1e6, lead.limit / 1e6
        if not self.band:
            if not over:
                self.pending_since = None
                return None
            if self.pending_since is None:
                self.pending_since = now
            if now - self.pending_since < self.fire_ns:
                return None
            self.band, self.calm_since, self.fired_at = 1, None, now
            self.detail = self._detail(n, lead, held_s=(now - self.pending_since) / 1e9)
            return "fired"
        if over:
            self.calm_since = None
            return None
        if self.calm_since is None:
            self.calm_since = now
        if now - self.calm_since < self.clear_ns:
            return None
        self.band, self.pending_since = 0, None
        self.detail = self._detail(n, lead, fired_s=(now - self.fired_at) / 1e9)
        return "cleared"

    def _learn_slot(self, slot: _Slot, cut: float) -> None:
        hist = self.hist
        for b, c in slot.counts.items():
            if bucket_value(b) <= cut:
                hist[b] = hist.get(b, 0.0) + c
                self.hist_n += c

    def _learn(self, now: int, ready: bool) -> None:
        """The baseline learns from the window just judged: each quantile's tail; the histogram
        decays (it learns each slot as it leaves the window)."""
        dt = self.slot_ns if self.last_eval is None else min(now - self.last_eval,
                                                             self.window_ns)
        dt = max(dt, 0)
        keep = math.exp(-dt / self.tau_ns)
        step = dt / self.tau_ns / (1.0 - BASE_QUANTILE)
        for j in self.judges:
            j.learn(ready, step)
        hist = self.hist
        for b in list(hist):
            c = hist[b] * keep
            if c < 1e-3:
                del hist[b]
            else:
                hist[b] = c
        self.hist_n *= keep
        self.base_reads += self.new_reads
        self.new_reads = 0
        self.last_eval = now

    def _detail(self, n: int, lead: _Judge, **extra) -> dict:
        cfg = self.cfg
        worst = heapq.nlargest(WORST, (x for s in self.slots for x in s.worst))
        d = {"latency": cfg.latency, "window_s": cfg.window_s, "reads": n,
             "baseline_reads": self.base_reads}
        d.update(lead.figures())
        d.update(extra)
        d["quantiles"] = [j.figures() for j in self.judges]
        d["worst"] = [read_brief(rec, lat) for lat, _ts, _seq, rec in worst]
        return d


@dataclass
class _SocketAlerts:
    levels: deque
    rules: dict = field(default_factory=dict)


class AlertRules:
    """Feed snapshots per socket; `active(sock_key)` names the rules firing now, and
    `update` returns (rule, "fired"|"cleared", value) transitions."""

    def __init__(self, thresholds: AlertConfig = AlertConfig()):
        self.t = thresholds
        self._socks: dict[int, _SocketAlerts] = {}

    def update(self, sock_key: int, level: int, volume: int, capacity: int,
               closed: bool = False, ts_ns: int = 0) -> list[tuple[str, str, float]]:
        st = self._socks.get(sock_key)
        if st is None:
            st = self._socks[sock_key] = _SocketAlerts(deque(maxlen=self.t.surge_window))
        st.levels.append(level)
        values = {"water_level": float(level),
                  "fill_ratio": volume / capacity if capacity else 0.0}
        if len(st.levels) == st.levels.maxlen:
            values["surge"] = level_variance(st.levels)
        limits = {"water_level": self.t.water_level, "fill_ratio": self.t.fill_ratio,
                  "surge": self.t.surge_variance}
        changes = []
        for rule, value in values.items():
            h = st.rules.setdefault(rule, Hysteresis())
            limit = (limits[rule],)
            if h.step(value, ts_ns, limit, clear_levels(limit, self.t.clear_fraction),
                      self.t.hold_ns) is not None:
                changes.append((rule, "fired" if h.band else "cleared", value))
        if closed:
            for rule in sorted(r for r, h in st.rules.items() if h.band):
                changes.append((rule, "cleared", 0.0))
            del self._socks[sock_key]
        return changes

    def active(self, sock_key: int) -> frozenset[str]:
        st = self._socks.get(sock_key)
        return frozenset(r for r, h in st.rules.items() if h.band) if st else frozenset()
