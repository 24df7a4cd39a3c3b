"""The agent and the host client over a socketpair: the whole protocol without QEMU."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roam.guest.agent import Agent
from roam.guest.client import GuestAgentError, GuestClient


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock: list[float] = []
        self.flag = tmp_path / "ready-flag"
        self.suspended = tmp_path / "suspended"
        self.agent = Agent(
            {
                # The "workload" is up once the flag file exists.
                "ready_command": [sys.executable, "-c",
                                  f"import os; print('UP' if os.path.exists({str(self.flag)!r}) "
                                  "else 'DOWN')"],
                "ready_expect": "UP",
                "ready_poll_interval": 0.05,
                "before_suspend": [["touch", str(self.suspended)]],
                "after_resume": [["true"]],
            },
            set_clock=self.clock.append,
        )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Harness, GuestClient]]:
    host_sock, guest_sock = socket.socketpair()
    harness = Harness(tmp_path)
    threads = [threading.Thread(target=harness.agent.serve, args=(guest_sock.fileno(),)),
               threading.Thread(target=harness.agent.watch_workload)]
    for thread in threads:
        thread.start()
    reader, writer = await asyncio.open_unix_connection(sock=host_sock)
    client = GuestClient(reader, writer)
    yield harness, client
    # Let the watcher finish and the agent see end of file before its fd is closed: a
    # closed fd number is soon reused by another test's socket.
    harness.flag.touch()
    await client.close()
    for thread in threads:
        await asyncio.to_thread(thread.join, 10)
    guest_sock.close()


async def test_handshake_then_ready_notification(pair: tuple[Harness, GuestClient]) -> None:
    harness, client = pair
    hello = await client.hello()
    assert hello["version"] == 1 and hello["ready"] is False
    with pytest.raises(GuestAgentError, match="not ready"):
        await client.wait_ready(0.3)
    harness.flag.touch()
    await client.wait_ready(5)
    assert client.ready


async def test_calls_before_hello_are_refused(pair: tuple[Harness, GuestClient]) -> None:
    _, client = pair
    with pytest.raises(GuestAgentError) as info:
        await client._call_once("ping", None, 5)
    assert info.value.code == "no_handshake"


async def test_client_shakes_hands_again_with_a_restarted_agent(
        pair: tuple[Harness, GuestClient]) -> None:
    _, client = pair  # no hello yet: what a restarted agent looks like to the client
    assert await client.ping() > 0


async def test_version_mismatch(pair: tuple[Harness, GuestClient]) -> None:
    _, client = pair
    with pytest.raises(GuestAgentError) as info:
        await client.call("hello", {"version": 99})
    assert info.value.code == "unsupported_version"


async def test_ping_exec_and_errors(pair: tuple[Harness, GuestClient]) -> None:
    _, client = pair
    await client.hello()
    assert await client.ping() > 0
    done = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.exit_code, done.stdout, done.stderr, done.timed_out) == (3, "out\n", "err\n",
                                                                          False)
    assert (await client.exec("cat", stdin="fed")).stdout == "fed"
    slow = await client.exec(["sleep", "10"], timeout=0.3)
    assert slow.timed_out and slow.exit_code is None
    with pytest.raises(GuestAgentError) as info:
        await client.exec(["/nonexistent/command"])
    assert info.value.code == "exec_failed"
    with pytest.raises(GuestAgentError) as info:
        await client.call("no_such_method")
    assert info.value.code == "unknown_method"


async def test_concurrent_calls_do_not_block_each_other(
        pair: tuple[Harness, GuestClient]) -> None:
    _, client = pair
    await client.hello()
    slow = asyncio.create_task(client.exec(["sleep", "1"]))
    await asyncio.wait_for(client.ping(), 0.5)
    assert (await slow).exit_code == 0


async def test_suspend_and_resume_hooks(pair: tuple[Harness, GuestClient]) -> None:
    harness, client = pair
    await client.hello()
    result = await client.before_suspend()
    assert harness.suspended.exists() and result["commands"][0]["exit_code"] == 0
    resumed = await client.after_resume(host_time=1_900_000_000.0)
    assert harness.clock == [1_900_000_000.0]
    assert resumed["clock_step"] > 0 and resumed["commands"][0]["exit_code"] == 0


async def test_call_times_out_and_closed_connection_fails_calls(tmp_path: Path) -> None:
    host_sock, silent = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host_sock)
    client = GuestClient(reader, writer)
    with pytest.raises(GuestAgentError) as info:
        await client.ping(timeout=0.2)
    assert info.value.code == "timeout"
    pending = asyncio.create_task(client.ping(timeout=5))
    await asyncio.sleep(0.05)
    silent.close()
    with pytest.raises(GuestAgentError) as info:
        await pending
    assert info.value.code == "closed"
    await client.close()


async def test_guest_to_host_requests(tmp_path: Path) -> None:
    host_sock, guest_sock = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=host_sock)
    client = GuestClient(reader, writer)

    async def host_time(params: dict[str, object]) -> dict[str, object]:
        return {"echo": params["x"]}

    client.handle("echo", host_time)
    guest = guest_sock.makefile("rwb")
    guest.write(b'{"id":"g1","method":"echo","params":{"x":5}}\n'
                b'{"id":"g2","method":"missing"}\n')
    guest.flush()
    replies = await asyncio.to_thread(lambda: [guest.readline(), guest.readline()])
    assert b'"result":{"echo":5}' in replies[0] and b'"unknown_method"' in replies[1]
    await client.close()
    guest_sock.close()
