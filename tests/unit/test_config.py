"""The configuration: precedence, and one line naming the key for every bad input."""

from pathlib import Path

import pytest
import yaml

from otelwater.config import (CONFIG_ENV, KEYS, Config, env_name, flag_name, load_config,
                              read_file)
from otelwater.errors import UsageError

EXAMPLE = Path(__file__).parents[2] / "examples" / "otelwater.yaml"


def write(tmp_path, text, name="otelwater.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_without_any_source():
    assert load_config(env={}) == Config()
    c = Config()
    assert (c.correlate.window_ns, c.correlate.threshold_ns, c.alerts.hold_ns) == (
        5_000_000, 1_000_000, 0)


def test_the_example_file_lists_every_key_with_its_default():
    assert set(read_file(str(EXAMPLE))) == set(KEYS)
    assert load_config(str(EXAMPLE), env={}) == Config()


def test_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, "alerts:\n  fill_ratio: 0.9\n  water_level: 50\n"
                           "  read_skew: {window_s: 10}\ncorrelate:\n  window_ms: 7\n")
    env = {"OTELWATER_ALERTS_FILL_RATIO": "0.95", "OTELWATER_CORRELATE_WINDOW_MS": "8"}
    c = load_config(path, env=env, flags={"correlate.window_ms": 9, "alerts.hold_ms": None})
    assert c.alerts.water_level == 50            # file
    assert c.alerts.read_skew.window_s == 10     # file, nested
    assert c.alerts.fill_ratio == 0.95           # env over file
    assert c.correlate.window_ms == 9.0          # flag over env over file
    assert c.alerts.hold_ms == 0                 # a flag not given (None) changes nothing


def test_config_file_from_the_environment(tmp_path):
    path = write(tmp_path, "rainwater: {samples: 10}\n")
    assert load_config(env={CONFIG_ENV: path}).rainwater.samples == 10
    other = write(tmp_path, "rainwater: {samples: 20}\n", "other.yaml")
    assert load_config(other, env={CONFIG_ENV: path}).rainwater.samples == 20  # --config wins


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n"), env={}) == Config()


@pytest.mark.parametrize("text, words", [
    ("alerts:\n  fill: 0.9\n", ["unknown key alerts.fill", "did you mean alerts.fill_ratio"]),
    ("alert:\n  fill_ratio: 0.9\n", ["unknown section alert", "did you mean alerts"]),
    ("alerts:\n  fill_ratio: high\n", ["alerts.fill_ratio = 'high'", "not a number"]),
    ("alerts:\n  fill_ratio: -0.1\n", ["alerts.fill_ratio", "must not be negative"]),
    ("alerts:\n  fill_ratio: .nan\n", ["alerts.fill_ratio", "not a finite number"]),
    ("correlate:\n  window_ms: .inf\n", ["correlate.window_ms", "not a finite number"]),
    ("alerts:\n  water_level: true\n", ["alerts.water_level", "expected a number"]),
    ("alerts:\n  read_skew:\n    min_tail: 2.5\n", ["alerts.read_skew.min_tail", "integer"]),
    ("alerts:\n  read_skew:\n    window_s: 0.05\n", ["alerts.read_skew.window_s",
                                                       "at least 0.1"]),
    ("alerts:\n  read_skew:\n    quantile: 1\n", ["alerts.read_skew.quantile", "at most 0.9999"]),
    ("alerts:\n  read_skew:\n    factor: 1\n", ["alerts.read_skew.factor", "above 1"]),
    ("alerts:\n  read_skew:\n    margin_ms: -1\n", ["alerts.read_skew.margin_ms",
                                                      "must not be negative"]),
    ("alerts:\n  read_skew:\n    latency: wall\n", ["alerts.read_skew.latency",
                                                      "service, duration"]),
    ("alerts:\n  read_skew:\n    scope: thread\n", ["alerts.read_skew.scope", "process, socket"]),
    ("alerts:\n  clear_fraction: 1.5\n", ["alerts.clear_fraction", "at most 1"]),
    ("alerts:\n  clear_fraction: 0\n", ["alerts.clear_fraction", "above 0"]),
    ("alerts:\n  read_skew:\n    high: 3\n", ["alerts.read_skew.high", "is retired",
                                               "alerts.read_skew.factor"]),
    ("alerts:\n  read_skew:\n    window: 64\n", ["alerts.read_skew.window", "is retired",
                                                  "window_s"]),
    ("alerts:\n  read_skew: {min_tail: 101}\n", ["min_tail 101 is above min_samples 100"]),
    ("alerts:\n  read_skew: {baseline_s: 5}\n", ["baseline_s 5 is not above window_s 5",
                                                  "alerts.read_skew.baseline_s"]),
    ("alerts:\n  read_skew: {spread_quantile: 0.99}\n", ["spread_quantile 0.99 is not below "
                                                         "quantile 0.99"]),
    ("links:\n  span_key: ''\n", ["links.span_key is empty with encoding hex",
                                    "only encoding traceparent"]),
    ("links:\n  trace_key: ''\n", ["links.trace_key", "printable ASCII"]),
    ("links:\n  trace_key: " + "k" * 33 + "\n", ["links.trace_key", "1-32"]),
    ("links:\n  encoding: base64\n", ["links.encoding", "hex, decimal, traceparent"]),
    ("alerts: 3\n", ["alerts", "is a section"]),
    ("- 1\n- 2\n", ["expected sections"]),
    ("alerts:\n\tfill_ratio: 0.9\n", ["line 2 column 1", "fix the YAML syntax"]),
    ("alerts:\n  fill_ratio: {a: 1}\n", ["alerts.fill_ratio", "expected a number"]),
])
def test_a_bad_file_is_one_line_naming_key_and_file(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load_config(path, env={})
    line = e.value.one_line()
    assert "\n" not in line and e.value.exit_code == 2
    for w in words:
        assert w in line
    if "is above" not in line and "is not" not in line and "is empty with" not in line:
        assert path in line


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found.*--config or OTELWATER_CONFIG"):
        load_config(str(tmp_path / "nope.yaml"), env={})


@pytest.mark.parametrize("env, words", [
    ({"OTELWATER_ALERTS_FILL": "1"}, ["unknown environment variable OTELWATER_ALERTS_FILL",
                                      "did you mean OTELWATER_ALERTS_FILL_RATIO"]),
    ({"OTELWATER_ALERTS_FILL_RATIO": "nan"}, ["environment OTELWATER_ALERTS_FILL_RATIO",
                                              "not a finite number"]),
    ({"OTELWATER_ALERTS_FILL_RATIO": "inf"}, ["not a finite number"]),
    ({"OTELWATER_ALERTS_FILL_RATIO": "lots"}, ["not a number"]),
    ({"OTELWATER_CORRELATE_WINDOW_MS": "-5"}, ["correlate.window_ms", "must not be negative"]),
    ({"OTELWATER_ALERTS_MAX_SOCKETS": "1e3"}, ["alerts.max_sockets", "not an integer"]),
    ({"OTELWATER_ALERTS_READ_SKEW_WARN": "0.8"}, ["alerts.read_skew.warn", "is retired",
                                                  "environment OTELWATER_ALERTS_READ_SKEW_WARN"]),
    ({"OTELWATER_ALERTS_READ_SKEW_FACTOR": "0.5"}, ["alerts.read_skew.factor", "above 1"]),
])
def test_a_bad_environment_variable_is_named(env, words):
    with pytest.raises(UsageError) as e:
        load_config(env=env)
    for w in words:
        assert w in e.value.one_line()


def test_other_otelwater_variables_are_not_config_keys():
    assert load_config(env={"OTELWATER_BTF": "/x", "PATH": "/bin"}) == Config()


def test_a_bad_flag_names_the_flag():
    with pytest.raises(UsageError, match="flag --window-ms: must not be negative"):
        load_config(env={}, flags={"correlate.window_ms": -1.0})
    with pytest.raises(UsageError, match="flag --read-skew-window-s"):
        load_config(env={}, flags={"alerts.read_skew.window_s": 0})


def test_every_key_has_an_env_name_and_a_flag_name():
    assert env_name("alerts.read_skew.window_s") == "OTELWATER_ALERTS_READ_SKEW_WINDOW_S"
    assert flag_name("correlate.window_ms") == "--window-ms"
    assert flag_name("rainwater.samples") == "--rainwater-samples"
    for key, f in KEYS.items():
        text = str(f.default)
        assert load_config(env={env_name(key): text}) == Config()


def test_config_round_trips_through_yaml(tmp_path):
    c = load_config(env={"OTELWATER_ALERTS_READ_SKEW_SCOPE": "socket"})
    path = write(tmp_path, yaml.safe_dump(c.to_dict()))
    assert load_config(path, env={}) == c


def test_numbers_yaml_reads_as_strings_and_upper_bounds(tmp_path):
    # YAML 1.1 reads 1e3 as a string; a number written so is a number
    f = tmp_path / "c.yaml"
    f.write_text("alerts:\n  water_level: 1e3\n")
    assert load_config(str(f), env={}).alerts.water_level == 1000.0
    f.write_text("correlate:\n  window_ms: 1e23\n")
    with pytest.raises(UsageError, match="correlate.window_ms.*at most"):
        load_config(str(f), env={})


def test_traceparent_needs_no_span_key(tmp_path):
    cfg = load_config(write(tmp_path, "links:\n  trace_key: traceparent\n  span_key: ''\n"
                                      "  encoding: traceparent\n"), env={})
    assert (cfg.links.trace_key, cfg.links.span_key) == ("traceparent", "")
