"""The server's batch writes once a disk stalled: in a thread, and never outlived by the transfer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from engine.server import _Session


class _Incoming:
    """Stands in for storage.Incoming: a write that takes 0.3 s, and an abort that must wait for it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.writing = threading.Event()

    def writev(self, views: list[memoryview]) -> None:
        self.events.append("write starts")
        self.writing.set()
        time.sleep(0.3)
        self.events.append("write ends")

    def abort(self) -> None:
        self.events.append("abort")


def test_a_cancelled_write_is_waited_out_however_often_cancelled() -> None:
    """A stopping server and a failing worker may both cancel the session while its write runs in a
    thread: run()'s abort (which closes the .part's descriptor) must still come after the write."""

    async def main() -> list[str]:
        session = object.__new__(_Session)  # only what _write uses
        session.loop = asyncio.get_running_loop()
        session.slow_disk, session.busy_here, session.last_rx, session.label = True, False, 0.0, "t"
        with concurrent.futures.ThreadPoolExecutor(1) as writers:
            session.server = type("S", (), {"writers": writers})()  # type: ignore[assignment]
            incoming = _Incoming()

            async def transfer() -> None:
                try:
                    await session._write(incoming, [memoryview(b"x")])  # type: ignore[arg-type]
                finally:
                    incoming.abort()

            task = asyncio.ensure_future(transfer())
            await asyncio.get_running_loop().run_in_executor(None, incoming.writing.wait, 5)
            task.cancel()
            await asyncio.sleep(0.05)
            task.cancel()  # a second cancel while the first waits for the write
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled()
            return incoming.events

    assert asyncio.run(main()) == ["write starts", "write ends", "abort"]
