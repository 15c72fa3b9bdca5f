"""``tokenclean run`` as a subprocess a test can disturb: started from a config, watched for the marker a fault
writes (``tests.faults``), and finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def start_run(cfg: dict, tmp_path: Path, env: dict) -> tuple[subprocess.Popen, list[str]]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tokenclean.cli", "run", str(path)]
    return subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True), cmd


def wait_for_marker(marker: Path, proc: subprocess.Popen, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            return json.loads(marker.read_text())
        if proc.poll() is not None:
            pytest.fail(f"run ended before the fault fired: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("the fault never fired")


def finish_run(proc: subprocess.Popen, timeout: float = 900) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
