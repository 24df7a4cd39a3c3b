"""Runs inside the guest: the busy workload of issue 5 and its verifier, in one process.

Rewrites random 4 KiB pages of a 64 MiB buffer at about 20 MiB/s; each page holds
(sequence, page index, checksum of the rest). Every second it checks every written page
and that no page's sequence went back since the previous pass; prints one line per pass,
"ok PASS SEQ" or "FAIL why" (then exits).
"""

import random
import struct
import sys
import time
import zlib

PAGE = 4096
PAGES = 64 * 1024 * 1024 // PAGE
RATE = 20 * 1024 * 1024 // PAGE  # pages per second
HEAD = struct.Struct("<QQI")

buf = bytearray(PAGES * PAGE)
view = memoryview(buf)
seen = [0] * PAGES
seq = 0
passes = 0
rng = random.Random()


def write_page(idx: int) -> None:
    global seq
    seq += 1
    body = rng.randbytes(PAGE - HEAD.size)
    view[idx * PAGE:(idx + 1) * PAGE] = HEAD.pack(seq, idx, zlib.crc32(body)) + body


def check() -> None:
    global passes
    for idx in range(PAGES):
        page = view[idx * PAGE:(idx + 1) * PAGE]
        s, i, crc = HEAD.unpack_from(page)
        if s == 0:
            continue
        if i != idx or zlib.crc32(page[HEAD.size:]) != crc:
            print(f"FAIL page {idx}: index {i}, checksum mismatch", flush=True)
            sys.exit(1)
        if s < seen[idx]:
            print(f"FAIL page {idx}: sequence went back {seen[idx]} -> {s}", flush=True)
            sys.exit(1)
        seen[idx] = s
    passes += 1
    print(f"ok {passes} {seq}", flush=True)


start = time.monotonic()
next_check = start + 1.0
written = 0
while True:
    now = time.monotonic()
    due = int((now - start) * RATE) - written
    for _ in range(min(due, RATE // 10)):
        write_page(rng.randrange(PAGES))
        written += 1
    if now >= next_check:
        check()
        next_check = time.monotonic() + 1.0
        start, written = time.monotonic(), 0  # no catching up after a check (or a pause)
    time.sleep(0.005)
