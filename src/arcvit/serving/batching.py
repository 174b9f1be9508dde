"""Dynamic batching: requests that arrive within ``max_wait_ms`` of each other run as one mixed-task batch.

One background coroutine collects queued items (an image tensor and its task) until the batch is full or the
wait is over, then runs the batch on a single worker thread, so that the event loop keeps accepting requests
while the backbone runs and at most one batch uses the CPU at a time.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Item:
    image: torch.Tensor
    task: str
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects items into batches of at most ``max_batch`` and hands each batch to ``run``.

    ``run(images, tasks)`` returns one output per item: a result, or an exception that fails only that item.
    """

    def __init__(self, run: Callable[[list[torch.Tensor], list[str]], list], max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[Item] | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arcvit-batch")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Called after the server has finished its in-flight requests: nothing is left waiting."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, image: torch.Tensor, task: str):
        """The logits of ``image`` under ``task``, computed in whatever batch it joins."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(Item(image, task, future))
        return await future

    async def _collect(self) -> list[Item]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self.run, [i.image for i in batch], [i.task for i in batch])
            except Exception as e:  # noqa: BLE001  a failed batch fails its requests, never the server
                outputs = [e] * len(batch)
            for item, out in zip(batch, outputs):
                if item.future.done():  # the client went away
                    continue
                if isinstance(out, Exception):
                    item.future.set_exception(out)
                else:
                    item.future.set_result(out)
