"""Registered tools: each call in a process of its own, stopped for real at its timeout or on cancel."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from services.controller.agents.sandbox import ToolCancelled, run_tool_process
from services.controller.agents.tools import calculator

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_chain_of_powers_is_evaluated_once_per_operand() -> None:
    # 166 chained exponents: evaluating each exponent twice would take 2**166 steps.
    assert calculator({"expression": "**".join(["1"] * 166)}) == "1"
    with pytest.raises(ValueError, match="exponent too large"):
        calculator({"expression": "2**(3**4)"})


def test_a_tool_runs_in_its_own_process_and_returns_its_text() -> None:
    pids: list[int] = []
    assert run_tool_process("calculator", {"expression": "4.2*4"}, 30, on_start=pids.append) == "16.8"
    assert pids and pids[0] != os.getpid() and not _alive(pids[0])
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_tool_process("always-fails", {"message": "disk on fire"}, 30)


def test_a_tool_past_its_timeout_is_stopped() -> None:
    pids: list[int] = []
    with pytest.raises(TimeoutError, match=r"took over 0\.5s"):
        run_tool_process("spin", {"seconds": "600"}, 0.5, on_start=pids.append)
    assert not _alive(pids[0])  # killed, not left computing


def test_a_cancelled_tool_is_stopped() -> None:
    pids: list[int] = []
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(ToolCancelled):
        run_tool_process("spin", {"seconds": "600"}, 600, cancelled=cancel.is_set, on_start=pids.append)
    assert not _alive(pids[0])
