"""Requests a careless or hostile client can send in one go, built byte by byte: what tests/test_hostile.py
sends to the service, and bench/soak.py mixes into its load."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from tests.conftest import TEST_DATA

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()  # 28x28 8-bit grey


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(png: bytes, extra: list[bytes]) -> bytes:
    """`png` with `extra` chunks right after its IHDR, where libpng reads (and inflates) them first."""
    ihdr_end = 8 + 25
    return png[:ihdr_end] + b"".join(extra) + png[ihdr_end:]


def text_bomb_png(chunks: int = 50, kind: bytes = b"zTXt", inflated: int = 9_000_000) -> bytes:
    """DIGIT followed by `chunks` compressed text chunks (or ICC profiles) of ~9 KB that inflate to 9 MB
    each: 50 of them make 0.44 MB, 1,000 make 8.8 MB."""
    packed = zlib.compress(b"\0" * inflated, 9)
    body = {b"zTXt": b"Comment\0\0" + packed, b"iTXt": b"Comment\0\1\0\0\0" + packed,
            b"iCCP": b"profile\0\0" + packed}[kind]
    return png_with_chunks(DIGIT, [chunk(kind, body)] * chunks)


def many_chunks_png(count: int = 600) -> bytes:
    """DIGIT with many small harmless chunks: too large for the event loop's fast path."""
    return png_with_chunks(DIGIT, [chunk(b"tEXt", b"k\0v")] * count)


def huge_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of width x height black pixels, compressed ~1000:1."""
    rows = zlib.compressobj(9)
    raw = rows.compress((b"\0" * (width + 1)) * height) + rows.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def ico_hiding(png: bytes, says: int = 256) -> bytes:
    """An ICO whose directory says says x says (0 = 256) but whose one image is `png`: Pillow's ICO plugin
    decodes the embedded PNG while it opens the file."""
    side = 0 if says >= 256 else says
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def scan_bomb_jpeg(side: int = 4000, repeats: int = 12_000) -> bytes:
    """A flat side x side progressive JPEG whose first AC scan is repeated `repeats` times: each repeat
    makes libjpeg walk every block again (4000 px, 12,000 repeats: 682 KiB, minutes of decoding)."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    scans = []  # (start of the SOS marker, end of its entropy-coded data)
    i = 2
    while i < len(data) - 1:
        assert data[i] == 0xFF, "not at a marker"
        marker = data[i + 1]
        if marker == 0xD9:  # EOI
            break
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        end = i + 2 + length
        if marker == 0xDA:  # SOS: entropy-coded data follows until the next marker
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((i, end))
        i = end
    start, end = scans[1]  # the first AC scan (the first is the DC scan)
    return data[:end] + data[start:end] * (repeats - 1) + data[end:]


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def many_latents_json(rows: int = 1_700_000, dim: int = 2) -> bytes:
    row = b"[" + b",".join([b"0"] * dim) + b"]"
    return b'{"z": [' + b",".join([row] * rows) + b"]}"


def many_pixels_json(images: int = 6000) -> bytes:
    image = b"[" + b",".join([b"[" + b",".join([b"0"] * 28) + b"]"] * 28) + b"]"
    return b'{"pixels": [' + b",".join([image] * images) + b"]}"


def many_numbers_infer_json(count: int = 1_000_000) -> bytes:
    return (b'{"inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "data": ['
            + b",".join([b"0"] * count) + b"]}]}")
