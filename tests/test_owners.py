"""Judging whether the process that owns a run or a model version still lives (what `cnnpipe gc` acts on)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import psutil

from cnnpipe.tracking import HOST_TAG, PID_TAG, STARTED_TAG, owner_alive, owner_tags


def tags_of(process: psutil.Process) -> dict[str, str]:
    return {PID_TAG: str(process.pid), HOST_TAG: socket.gethostname(), STARTED_TAG: f"{process.create_time():.2f}"}


def test_this_process_is_alive_and_another_machines_is_not_judged():
    assert owner_alive(owner_tags()) is True
    assert owner_alive(owner_tags() | {HOST_TAG: "elsewhere"}) is None
    assert owner_alive({}) is None


def test_a_reused_pid_is_dead():
    assert owner_alive(owner_tags() | {STARTED_TAG: "1.00"}) is False


def test_a_killed_process_not_yet_reaped_is_dead():
    # a SIGKILLed process stays a zombie until its parent reaps it: here, until wait()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    process = psutil.Process(child.pid)
    tags = tags_of(process)
    deadline = time.time() + 30
    while process.status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the child never ended"
        time.sleep(0.01)
    try:
        assert owner_alive(tags) is False
    finally:
        child.wait()
    assert owner_alive(tags) is False  # reaped: gone
