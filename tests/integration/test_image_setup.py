"""The Containerfile's steps, run here: its COPY lines into a fresh directory, then its RUN line
(scripts/setup.sh in its agent mode), then the image's ENTRYPOINT from that directory. No
container engine is needed for that: what the image holds is what these steps make. The venv
comes from PyPI like the image's, so this takes a minute or two."""

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.services import free_port
from tests.unit.test_deploy import containerfile

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="scripts/setup.sh installs Debian packages: needs root")


def test_the_image_steps_install_an_agent_that_runs(tmp_path):
    image = tmp_path / "image"
    workdir = None
    run = entry = None
    for inst, args in containerfile():
        if inst == "WORKDIR":
            workdir = image / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif inst == "COPY":
            *sources, dest = shlex.split(args)
            for src in sources:        # a directory's contents into dest, a file into it
                into = workdir / dest
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, into, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    into.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / src, into / Path(src).name)
        elif inst == "RUN":
            run = args
        elif inst == "ENTRYPOINT":
            entry = json.loads(args)
    assert workdir is not None and run and entry
    # the RUN line's setup step (the rest: byte-compiling, apt's lists: not needed here)
    setup = next(part.strip() for part in run.split("&&") if "scripts/setup.sh" in part)
    r = subprocess.run(setup, shell=True, cwd=workdir, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    venv = workdir / ".venv"
    # the agent alone: no test dependencies, no Go toolchains or example programs
    assert subprocess.run([venv / "bin" / "python", "-c", "import pytest"],
                          capture_output=True).returncode != 0
    assert not (workdir / ".toolchains").exists() and not (workdir / "examples").exists()
    exe = entry[0].replace("/opt/otelwater", str(workdir))
    assert Path(exe).is_file(), entry
    port = free_port()
    agent = subprocess.Popen([exe, *entry[1:], "--listen", f"127.0.0.1:{port}", "-d", "60",
                              "--min-age", "0.5"], cwd="/", stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and agent.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    ready = resp.status
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        assert ready == 200, "the image's agent never became ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"otelwater_agent_processes" in resp.read()
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert [x["event"] for x in lines if x["event"].startswith("agent.")][-1] == "agent.stopped"
