"""The CLI through click's test runner: help that teaches, usage errors, one-line failures."""

from click.testing import CliRunner

from otelwater.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("watch", "doctor", "locate"):
        assert cmd in r.output


def test_watch_help_has_examples_and_explains_columns():
    r = run("watch", "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and "otelwater watch -P 8080" in r.output
    assert "SIOCINQ" in r.output


def test_bad_values_are_usage_errors():
    assert run("watch", "--port", "0").exit_code == 2
    assert run("watch", "--interval", "0").exit_code == 2
    assert run("watch", "--bogus").exit_code == 2


def test_missing_pid_is_one_line_exit_4():
    r = run("watch", "--pid", str(2**22 + 11), "-d", "1")
    assert r.exit_code == 4
    assert r.output.strip().startswith("otelwater: no process with pid")
    assert "Traceback" not in r.output


def test_locate_bad_binary_is_one_line(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    r = run("locate", str(f))
    assert r.exit_code == 4
    assert len(r.output.strip().splitlines()) == 1
