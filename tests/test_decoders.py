"""The decoder processes: the same pixels as decoding in-process, and a decode that outlives its
deadline costs its own request a 504 and nobody else anything (its process is stopped, a fresh one
takes its place)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from app.decoders import DecoderPool, default_processes
from app.exceptions import ComputeTimeout, ImageTooLarge
from app.imaging import file_to_tensor
from app.inputs import ImageReader
from app.preprocess import Preprocess
from tests.conftest import TEST_DATA
from tests.stub_decoders import pid_or_hang

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
PHOTO = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()


@pytest.mark.parametrize(("cpus", "expected"), [(None, 4), (1, 4), (2, 4), (3, 6), (8, 16), (64, 16)])
def test_twice_the_cores_decoder_processes_at_least_four_at_most_sixteen(monkeypatch, cpus, expected) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert default_processes() == expected


def test_files_decoded_in_a_process_give_the_pixels_of_decoding_in_process() -> None:
    reader = ImageReader(10**8, timeout_s=30)

    async def main() -> torch.Tensor:
        await reader.start()
        return await reader([PHOTO, DIGIT], Preprocess())  # a photo in the batch: all go to a process

    try:
        x = asyncio.run(main())
    finally:
        reader.close()
    assert torch.equal(x, torch.stack([file_to_tensor(PHOTO, 10**8, Preprocess()),
                                       file_to_tensor(DIGIT, 10**8, Preprocess())]))


def test_a_decode_past_its_deadline_is_a_504_and_its_process_is_replaced() -> None:
    pool = DecoderPool(10**6, timeout_s=0.5, processes=1, decode=pid_or_hang)

    async def main() -> tuple[int, float, int, float]:
        (first,) = await asyncio.wait_for(pool.decode([b"pid"], Preprocess()), 30)
        start = time.perf_counter()
        with pytest.raises(ComputeTimeout) as late:
            await pool.decode([b"hang"], Preprocess())
        answered = time.perf_counter() - start
        assert late.value.detail == "images not decoded within 0.5 s (VAE_REQUEST_TIMEOUT_S)"
        start = time.perf_counter()
        (second,) = await asyncio.wait_for(pool.decode([b"pid"], Preprocess()), 30)
        return int(first), answered, int(second), time.perf_counter() - start

    try:
        first, answered, second, next_one = asyncio.run(main())
    finally:
        pool.close()
    assert answered < 2.0  # at the deadline, not when the decode would end (600 s)
    assert second != first  # the one process the pool has was replaced...
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # ...and the hung one is gone, not left running
    assert next_one < 10.0


def test_a_decode_that_needs_more_memory_than_its_budget_is_a_413_in_its_own_process() -> None:
    pool = DecoderPool(10**6, timeout_s=30, processes=1, decode=pid_or_hang)

    async def main() -> None:
        with pytest.raises(ImageTooLarge):
            await pool.decode([b"allocate"], Preprocess())
        await pool.decode([b"pid"], Preprocess())  # and the process still serves

    try:
        asyncio.run(main())
    finally:
        pool.close()


def test_close_stops_a_running_decode_at_once() -> None:
    pool = DecoderPool(10**6, timeout_s=300, processes=1, decode=pid_or_hang)

    async def main() -> float:
        (pid,) = await pool.decode([b"pid"], Preprocess())
        hung = asyncio.ensure_future(pool.decode([b"hang"], Preprocess()))
        await asyncio.sleep(0.3)
        start = time.perf_counter()
        pool.close()
        took = time.perf_counter() - start
        with pytest.raises((asyncio.CancelledError, Exception)):
            await asyncio.wait_for(hung, 10)
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
        return took

    assert asyncio.run(main()) < 5.0
