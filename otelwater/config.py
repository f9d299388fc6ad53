"""One frozen configuration: alert thresholds, correlator windows, rain-water gauges.

Precedence, lowest to highest (a later source overrides an earlier one, key by key):

    1. defaults                 the dataclasses below
    2. a YAML file              --config FILE, else the file named by OTELWATER_CONFIG
    3. environment variables    OTELWATER_<SECTION>_<KEY>, e.g. OTELWATER_ALERTS_FILL_RATIO=0.9,
                                OTELWATER_ALERTS_READ_SKEW_FACTOR=4 (the dotted key, upper
                                case, dots as underscores)
    4. command-line flags       --window-ms 10 (see FLAG_NAMES)

The file nests keys by section (`examples/otelwater.yaml` lists every key with its default):

    alerts:
      fill_ratio: 0.9
      read_skew:
        factor: 4
    correlate:
      window_ms: 10

Every value is checked once, after the sources are merged and before anything is attached: an
unknown key (in the file or as an OTELWATER_* variable), a wrong type, a negative number, nan or
inf, or an inconsistent pair (read_skew's min_tail above min_samples, baseline_s not above
window_s) raises
`otelwater.errors.UsageError` with one line naming the key, where it came from and the fix.
Times are milliseconds or seconds in the file (what people type); the code reads them as integer
nanoseconds through the `*_ns` properties.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from otelwater.errors import UsageError

ENV_PREFIX = "OTELWATER_"
CONFIG_ENV = "OTELWATER_CONFIG"
# OTELWATER_* variables that are not configuration keys (anything else is a typo, and an error).
OTHER_ENV = frozenset({CONFIG_ENV, "OTELWATER_BTF", "OTELWATER_DEBUG", "OTELWATER_SETUP"})


def _num(default, *, minimum=0.0, above=None, maximum=None, doc=""):
    """A number field: `minimum` inclusive, `above` exclusive, `maximum` inclusive."""
    return field(default=default, metadata={"min": minimum, "above": above, "max": maximum,
                                            "doc": doc})


def _text(default, *, pattern, max_len, doc="", what=""):
    """A free text field (a label key): `pattern` (a regex, whole match) and at most
    `max_len` bytes; `what`: the form expected, for the error (default: printable ASCII)."""
    return field(default=default, metadata={"pattern": pattern, "max_len": max_len, "doc": doc,
                                            "what": what})


def _choice(default, choices, doc=""):
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


@dataclass(frozen=True)
class ReadSkewConfig:
    """read_skew: a process's read-latency tail against its own baseline (see
    otelwater.alerts.rules.TailWatch). It fires when the tail of the last window_s rose above
    factor x the baseline and margin_ms more, with min_tail reads above that, for fire_after_s
    running, and clears after clear_after_s below."""

    latency: str = _choice("service", ("service", "duration"),
                           doc="service: the service's part of each read (waiting to run, "
                               "queue delay); duration: the whole read, peer's wait included")
    quantile: float = _num(0.99, minimum=0.5, maximum=0.9999, doc="the tail watched")
    spread_quantile: float = _num(0.9, maximum=0.9999,
                                  doc="a lower quantile watched the same way, for a slowdown "
                                      "that spreads to more reads (0: off)")
    window_s: float = _num(5.0, minimum=0.1, maximum=3600, doc="the window judged, seconds")
    baseline_s: float = _num(300.0, minimum=1.0, maximum=86_400,
                             doc="time constant of the baseline tail, seconds")
    factor: float = _num(3.0, above=1.0, maximum=1_000_000,
                         doc="fires when the tail is above factor x the baseline ...")
    margin_ms: float = _num(5.0, maximum=3_600_000, doc="... and this much above it")
    min_samples: int = _num(100, minimum=1, maximum=10_000_000,
                            doc="reads in the window needed to judge it")
    min_tail: int = _num(5, minimum=1, maximum=10_000_000,
                         doc="reads above the limit needed to fire")
    min_baseline: int = _num(1000, minimum=1, maximum=1_000_000_000,
                             doc="reads the baseline has learnt from before it can fire")
    fire_after_s: float = _num(4.0, maximum=3600, doc="over the limit this long: fires")
    clear_after_s: float = _num(10.0, maximum=3600, doc="back under it this long: clears")
    scope: str = _choice("process", ("process", "socket"),
                         doc="one watch per process or per socket")


# Keys of the skewness rule read_skew used to be: said as such, not as typos.
RETIRED = {
    "alerts.read_skew.warn": "factor",
    "alerts.read_skew.high": "factor",
    "alerts.read_skew.avalanche": "factor",
    "alerts.read_skew.window": "window_s",
}


def _retired(key: str, source: str) -> UsageError:
    return UsageError(f"{key} in {source} is retired: read_skew no longer bands the skewness "
                      "of read latency, it compares the latency tail with its own baseline",
                      f"remove it (see alerts.read_skew.{RETIRED[key]} in "
                      "examples/otelwater.yaml)")


@dataclass(frozen=True)
class AlertConfig:
    """DESIGN part 5's rules. Field names match the old `alerts.rules.Thresholds`."""

    water_level: float = _num(100.0, doc="skbs queued")
    fill_ratio: float = _num(0.8, doc="volume / capacity")
    surge_variance: float = _num(50.0, doc="variance of the level over surge_window samples")
    surge_window: int = _num(3, minimum=2, maximum=1000,
                             doc="consecutive samples in the surge variance")
    clear_fraction: float = _num(0.75, above=0.0, maximum=1.0,
                                 doc="an alert clears at value <= clear_fraction * threshold "
                                     "(water_level, fill_ratio, surge)")
    hold_ms: float = _num(0.0, maximum=86_400_000,
                          doc="a fired alert stays at least this long (water_level, fill_ratio, "
                              "surge; read_skew has fire_after_s and clear_after_s)")
    idle_s: float = _num(600.0, above=0.0, maximum=31_536_000,
                         doc="forget a socket or process silent this long")
    max_sockets: int = _num(65536, minimum=1, maximum=16_777_216,
                            doc="sockets (and processes) kept at most")
    read_skew: ReadSkewConfig = field(default_factory=ReadSkewConfig)

    @property
    def hold_ns(self) -> int:
        return int(self.hold_ms * 1e6)

    @property
    def idle_ns(self) -> int:
        return int(self.idle_s * 1e9)


@dataclass(frozen=True)
class CorrelateConfig:
    window_ms: float = _num(5.0, maximum=60_000,
                            doc="a snapshot joins a read within this of its start or end")
    threshold_ms: float = _num(1.0, maximum=86_400_000,
                               doc="a read blocked, or its bytes waited, this long: slow")
    run_threshold_ms: float = _num(1.0, maximum=86_400_000,
                                   doc="waiting to run this long: runtime-starved")
    include_idle: bool = field(default=False, metadata={
        "doc": "idle reads (the peer owed nothing: think time, idle keep-alive) are slow reads "
               "too (verdicts, spans); else only counted"})
    record_rate: float = _num(1_000.0, maximum=10_000_000,
                              doc="slow reads a second put in full on the ring buffer (a token "
                                  "bucket, evenly); all are counted in the kernel; 0: all")

    @property
    def window_ns(self) -> int:
        return int(self.window_ms * 1e6)

    @property
    def threshold_ns(self) -> int:
        return int(self.threshold_ms * 1e6)

    @property
    def run_threshold_ns(self) -> int:
        return int(self.run_threshold_ms * 1e6)


@dataclass(frozen=True)
class RainWaterConfig:
    samples: int = _num(1024, minimum=3, maximum=1_000_000,
                        doc="last samples per socket the figure covers")
    series: str = _choice("unread_bytes", ("unread_bytes", "volume", "level"),
                          doc="which water series")


@dataclass(frozen=True)
class ExportConfig:
    span_rate: float = _num(500.0, maximum=1_000_000,
                            doc="spans a second at most (OTLP); 0: no limit")


@dataclass(frozen=True)
class LinksConfig:
    """Spans inside the service's own traces: the reading goroutine's runtime/pprof labels
    that carry its request's trace context (otelwater/events/links.py; README)."""

    enabled: bool = field(default=True, metadata={
        "doc": "read the labels of each recorded slow read's goroutine (only those: other "
               "reads pay nothing) and make its span a child of the request's span"})
    trace_key: str = _text("trace_id", pattern=r"[\x21-\x7e][\x20-\x7e]*", max_len=32,
                           doc="the label holding the trace id (or the traceparent)")
    span_key: str = _text("span_id", pattern=r"(?:[\x21-\x7e][\x20-\x7e]*)?", max_len=32,
                          doc="the label holding the request's span id (unused, and may be "
                              "empty, with encoding traceparent)")
    encoding: str = _choice("hex", ("hex", "decimal", "traceparent"),
                            doc="hex: 32/16 hex digits; decimal: unsigned 64-bit numbers; "
                                "traceparent: one label, a W3C traceparent")


@dataclass(frozen=True)
class AgentConfig:
    """`otelwater agent`, the long-running mode (otelwater/agent/run.py): which processes it
    traces, how it serves and logs."""

    min_age_s: float = _num(2.0, maximum=86_400,
                            doc="a process is traced once it has run this long (short-lived "
                                "tools are not); a restart of a binary already traced is "
                                "picked up at once")
    rescan_s: float = _num(0.5, minimum=0.05, maximum=60,
                           doc="how often the processes are scanned (new ones, exited ones)")
    max_processes: int = _num(256, minimum=1, maximum=65_536,
                                doc="processes traced at once at most (the rest are counted "
                                    "as failed, reason too-many)")
    probes: str = _choice("tracepoint", ("tracepoint", "uprobe"),
                          doc="how Go reads are traced (watch --probes)")
    listen: str = _text("127.0.0.1:9464", pattern=r"off|\[?[0-9A-Za-z:.\-]*\]?:[0-9]{1,5}",
                        max_len=64, what="not ADDRESS:PORT (or off)",
                        doc="ADDRESS:PORT of /metrics, /healthz and /readyz (off: none)")
    log_format: str = _choice("json", ("json", "text"), doc="the agent's log lines on stderr")


@dataclass(frozen=True)
class Config:
    alerts: AlertConfig = field(default_factory=AlertConfig)
    correlate: CorrelateConfig = field(default_factory=CorrelateConfig)
    rainwater: RainWaterConfig = field(default_factory=RainWaterConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the schema: dotted key -> field, derived from the dataclasses ----

def _leaves(cls, prefix="") -> dict[str, dataclasses.Field]:
    out = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not
                                    dataclasses.MISSING else None):
            out.update(_leaves(f.default_factory, key + "."))
        else:
            out[key] = f
    return out


KEYS: dict[str, dataclasses.Field] = _leaves(Config)
SECTIONS = frozenset(k.rsplit(".", 1)[0] for k in KEYS) | {
    k.split(".")[0] for k in KEYS}


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "_")


FLAGS_WITHOUT_SECTION = ("alerts", "correlate")


def flag_name(key: str) -> str:
    """alerts.fill_ratio -> --fill-ratio, alerts.read_skew.factor -> --read-skew-factor,
    correlate.window_ms -> --window-ms, rainwater.samples -> --rainwater-samples."""
    section, rest = key.split(".", 1)
    name = rest if section in FLAGS_WITHOUT_SECTION else key
    return "--" + name.replace(".", "-").replace("_", "-")


ENV_NAMES: dict[str, str] = {env_name(k): k for k in KEYS}
FLAG_NAMES: dict[str, str] = {k: flag_name(k) for k in KEYS} | {
    # the keys whose flag is not named after the key (watch and agent spell them the same)
    "correlate.threshold_ms": "--blocked-ms", "export.span_rate": "--otlp-span-rate",
    "agent.min_age_s": "--min-age", "agent.probes": "--probes", "agent.listen": "--listen",
    "agent.log_format": "--log-format"}


def _kind(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"did you mean {close[0]}?" if close else ""


def _check(key: str, value: Any, source: str, from_text: bool = False) -> Any:
    """The value of `key`, typed and in range, or a UsageError naming key, source and fix."""
    f = KEYS[key]
    kind, meta = _kind(f), f.metadata
    example = f"e.g. {key} = {f.default!r} (the default)"

    def bad(problem: str, fix: str):
        return UsageError(f"{key} = {value!r} in {source}: {problem}", fix)

    if kind == "bool":
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
        if isinstance(value, bool):
            return value
        raise bad("expected true or false", f"e.g. {key} = true")
    if kind == "str" and "pattern" in meta:
        if not isinstance(value, str):
            raise bad("expected text", f"e.g. {key} = {f.default}")
        import re

        if not re.fullmatch(meta["pattern"], value) or len(value.encode()) > meta["max_len"]:
            raise bad(meta.get("what") or
                      f"not 1-{meta['max_len']} printable ASCII characters",
                      f"e.g. {key} = {f.default}")
        return value
    if kind == "str":
        if not isinstance(value, str) or value not in meta["choices"]:
            raise bad("not one of " + ", ".join(meta["choices"]),
                      "use one of " + ", ".join(meta["choices"]))
        return value
    if from_text or (isinstance(value, str) and kind in ("int", "float")):
        # YAML 1.1 reads 1e3 (no dot, no sign) as a string: a number written so is a number
        text = value.strip() if isinstance(value, str) else str(value)
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise bad(f"not {'an integer' if kind == 'int' else 'a number'}", example) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"expected {'an integer' if kind == 'int' else 'a number'}", example)
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise bad("expected an integer", example)
            value = int(value)
    else:
        if not math.isfinite(value):
            raise bad("not a finite number", example)
        value = float(value)
    lo, above, hi = meta["min"], meta["above"], meta["max"]
    if above is not None and not value > above:
        raise bad(f"must be above {above:g}", example)
    if lo is not None and value < lo:
        raise bad("must not be negative" if lo == 0 else f"must be at least {lo:g}", example)
    if hi is not None and value > hi:
        raise bad(f"must be at most {hi:g}", example)
    return value


def _flatten(tree: Mapping, source: str, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        key = prefix + str(name)
        if isinstance(value, Mapping) and key not in KEYS:
            if key not in SECTIONS:
                raise UsageError(f"unknown section {key} in {source}",
                                 _suggest(key, SECTIONS) or "see examples/otelwater.yaml")
            out.update(_flatten(value, source, key + "."))
        elif key in KEYS:
            out[key] = value
        elif key in RETIRED:
            raise _retired(key, source)
        elif key in SECTIONS:
            raise UsageError(f"{key} in {source} is a section, not a value",
                             f"give its keys, e.g. {key}: {{...}}; see examples/otelwater.yaml")
        else:
            raise UsageError(f"unknown key {key} in {source}",
                             _suggest(key, KEYS) or "see examples/otelwater.yaml for every key")
    return out


def read_file(path: str) -> dict[str, Any]:
    """The dotted keys of a YAML config file, unchecked values."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found",
                         f"check the path given to --config or {CONFIG_ENV}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UsageError(f"cannot read config file {path}: {reason}",
                         "give a readable UTF-8 YAML file") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise UsageError(f"config file {path}{where}: {problem}",
                         "fix the YAML syntax; see examples/otelwater.yaml") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise UsageError(f"config file {path}: expected sections such as 'alerts:', got a "
                         f"{type(tree).__name__}", "see examples/otelwater.yaml")
    return _flatten(tree, f"config file {path}")


def load_config(config_file: str | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> Config:
    """Defaults < YAML file (`config_file`, else $OTELWATER_CONFIG) < OTELWATER_* < `flags`.

    `flags` maps dotted keys to values; None means the flag was not given. Raises UsageError.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = config_file or env.get(CONFIG_ENV) or None
    if path:
        for key, value in read_file(path).items():
            values[key] = _check(key, value, f"config file {path}")
            sources[key] = f"config file {path}"
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        key = ENV_NAMES.get(name)
        retired = next((k for k in RETIRED if env_name(k) == name), None)
        if retired is not None:
            raise _retired(retired, f"environment {name}")
        if key is None:
            raise UsageError(f"unknown environment variable {name}",
                             _suggest(name, ENV_NAMES) or "unset it; see examples/otelwater.yaml")
        values[key] = _check(key, text, f"environment {name}", from_text=True)
        sources[key] = f"environment {name}"
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in KEYS:
            raise UsageError(f"unknown configuration key {key}", _suggest(key, KEYS))
        values[key] = _check(key, value, f"flag {FLAG_NAMES[key]}")
        sources[key] = f"flag {FLAG_NAMES[key]}"
    cfg = _build(Config, values)
    _check_together(cfg, sources)
    return cfg


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
                f.default_factory):
            kwargs[f.name] = _build(f.default_factory, values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def _check_together(cfg: Config, sources: Mapping[str, str]) -> None:
    def src(*keys):
        given = [f"{k} ({sources[k]})" for k in keys if k in sources]
        return ", ".join(given) if given else "the defaults"

    ln = cfg.links
    if not ln.span_key and ln.encoding != "traceparent":
        keys = ("links.span_key", "links.encoding")
        raise UsageError(f"links.span_key is empty with encoding {ln.encoding}; set by "
                         f"{src(*keys)}", "name the label holding the span id, e.g. "
                         "links.span_key = span_id (only encoding traceparent needs none)")
    s = cfg.alerts.read_skew
    if s.min_tail > s.min_samples:
        keys = ("alerts.read_skew.min_tail", "alerts.read_skew.min_samples")
        raise UsageError(f"alerts.read_skew.min_tail {s.min_tail} is above min_samples "
                         f"{s.min_samples}; set by {src(*keys)}",
                         "make min_tail at most min_samples")
    if s.spread_quantile and not s.spread_quantile < s.quantile:
        keys = ("alerts.read_skew.spread_quantile", "alerts.read_skew.quantile")
        raise UsageError(f"alerts.read_skew.spread_quantile {s.spread_quantile:g} is not below "
                         f"quantile {s.quantile:g}; set by {src(*keys)}",
                         "make it a lower quantile (e.g. 0.9 under 0.99), or 0 for none")
    if not s.baseline_s > s.window_s:
        keys = ("alerts.read_skew.baseline_s", "alerts.read_skew.window_s")
        raise UsageError(f"alerts.read_skew.baseline_s {s.baseline_s:g} is not above window_s "
                         f"{s.window_s:g}; set by {src(*keys)}",
                         "make the baseline slow against the window, e.g. baseline_s 300, "
                         "window_s 5")
