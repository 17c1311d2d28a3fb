"""Image decoding in processes that can be stopped.

A C decoder (libjpeg, libpng, libtiff...) cannot be interrupted from Python: a thread that runs
a scan bomb (a progressive JPEG whose scans repeat thousands of times) or a decompression bomb
keeps running, and keeps its thread, long after its request got a 504. So every image that is
not a tiny grey PNG is decoded in a pool of worker processes (pebble, forked from a server
process that has imported app.preprocess once: Pillow and numpy, no torch, about 30 MB): a
decode that outlives its request's deadline is cancelled, which stops its process, and pebble
starts a fresh one in its place. Each process also has an address-space limit, so a file that
decodes to more memory than its pixel count allows ends as a 413 instead of an out-of-memory
kill of the worker that serves everyone.

There are more decoder processes than cores (twice the cores, at least 4 and at most 16):
while bombs run until their deadline, an ordinary photo still finds a process, and the
kernel shares the cores between them instead of the photo queueing behind the bombs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
from collections.abc import Callable

import numpy as np
import pebble

from app.exceptions import ComputeTimeout, ImageTooLarge, UndecodableImage
from app.preprocess import Preprocess, files_to_grays

Decode = Callable[[list[bytes], int, Preprocess], np.ndarray]
# Bytes of address space a decode may add per pixel of VAE_MAX_IMAGE_PIXELS: RGBA (4), grey (1) and
# the float and int16 working copies of preprocessing (about 20), with room; and a floor for small limits.
BYTES_PER_PIXEL = 48
MIN_MEMORY = 512 * 1024 * 1024


def default_processes(cpus: int | None = None) -> int:
    return min(16, max(4, 2 * (cpus or os.cpu_count() or 1)))


def memory_budget(max_pixels: int) -> int:
    return max(MIN_MEMORY, BYTES_PER_PIXEL * max_pixels)


def _limit_memory(budget: int) -> None:
    """In each decoder process, once: its address space may grow by `budget` bytes beyond what the
    fork server's imports (Pillow, numpy and its BLAS) already map."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["app.preprocess"])


class DecoderPool:
    """`decode(blobs, prep)` -> uint8 [B, 28, 28], run in a process, within `timeout_s`."""

    def __init__(self, max_pixels: int, timeout_s: float, processes: int | None = None,
                 decode: Decode = files_to_grays) -> None:
        self.max_pixels, self.timeout_s, self.decode_fn = max_pixels, timeout_s, decode
        self.processes = processes or default_processes()
        self.pool = pebble.ProcessPool(max_workers=self.processes, initializer=_limit_memory,
                                       initargs=(memory_budget(max_pixels),), context=_context)

    def start(self) -> asyncio.Future[np.ndarray]:
        """Start the fork server and the processes now, not on the first upload (a second or more):
        they start in the background, and the returned future is done once one has decoded."""
        return asyncio.wrap_future(self.pool.schedule(self.decode_fn, ([], self.max_pixels, Preprocess())))

    async def decode(self, blobs: list[bytes], prep: Preprocess) -> np.ndarray:
        future = self.pool.schedule(self.decode_fn, (blobs, self.max_pixels, prep))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            future.cancel()  # pebble stops the process that runs it and starts another
            raise ComputeTimeout(f"images not decoded within {self.timeout_s:g} s (VAE_REQUEST_TIMEOUT_S)") from None
        except pebble.ProcessExpired as e:  # killed from outside, or a crash in a C decoder
            raise UndecodableImage(f"the decoder process ended ({e}) on this image") from e
        except MemoryError as e:  # over the process's budget anywhere in preprocessing, not only in Pillow
            raise ImageTooLarge("preprocessing this image needs more memory than a decoder process may use "
                                "(VAE_MAX_IMAGE_PIXELS sets both)") from e

    def close(self) -> None:
        """Stop every process now, running decodes included: nothing waits for a bomb to finish."""
        self.pool.stop()
        self.pool.join(5)
