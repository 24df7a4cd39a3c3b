"""Which S3 client moves the sync's workload faster: obstore (async) or boto3 (threads).

The workload is the sync's: 1 MiB objects, `--concurrency` at once (8 by default, the
sync's), PUT then GET, against moto's standalone server on loopback (started here). Both
clients run in the same process and the same run, alternating rounds; the figure is the
median of the rounds, and the ratio obstore / boto3.

Run: .venv/bin/python -m bench.s3_client [--objects 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import obstore
from obstore.store import S3Store

from tests.sync.s3 import CREDENTIALS, MotoServer

MiB = 1 << 20


async def with_obstore(store: S3Store, blobs: list[bytes], concurrency: int,
                       prefix: str) -> tuple[float, float]:
    gate = asyncio.Semaphore(concurrency)

    async def put(i: int, blob: bytes) -> None:
        async with gate:
            await obstore.put_async(store, f"{prefix}/{i}", blob)

    async def get(i: int) -> None:
        async with gate:
            await (await obstore.get_async(store, f"{prefix}/{i}")).bytes_async()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for i, blob in enumerate(blobs):
            tasks.create_task(put(i, blob))
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for i in range(len(blobs)):
            tasks.create_task(get(i))
    return put_s, time.perf_counter() - start


def with_boto3(client: object, bucket: str, blobs: list[bytes], concurrency: int,
               prefix: str) -> tuple[float, float]:
    s3 = client
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(lambda ib: s3.put_object(  # type: ignore[attr-defined]
            Bucket=bucket, Key=f"{prefix}/{ib[0]}", Body=ib[1]), enumerate(blobs)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(lambda i: s3.get_object(  # type: ignore[attr-defined]
            Bucket=bucket, Key=f"{prefix}/{i}")["Body"].read(), range(len(blobs))))
    return put_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    server = MotoServer()
    try:
        bucket = server.bucket("roam-clients")
        blobs = [os.urandom(MiB) for _ in range(args.objects)]
        store = S3Store(bucket, endpoint=server.endpoint, client_options={"allow_http": True})
        client = boto3.client("s3", endpoint_url=server.endpoint)
        total = args.objects * MiB / 1e6
        rates: dict[str, list[tuple[float, float]]] = {"obstore": [], "boto3": []}
        for r in range(args.rounds):
            put_s, get_s = asyncio.run(with_obstore(store, blobs, args.concurrency, f"o{r}"))
            rates["obstore"].append((total / put_s, total / get_s))
            put_s, get_s = with_boto3(client, bucket, blobs, args.concurrency, f"b{r}")
            rates["boto3"].append((total / put_s, total / get_s))
        medians = {name: (statistics.median(p for p, _ in runs),
                          statistics.median(g for _, g in runs))
                   for name, runs in rates.items()}
        for name, (put, get) in medians.items():
            print(f"{name:8} PUT {put:7.1f} MB/s  GET {get:7.1f} MB/s")
        (op, og), (bp, bg) = medians["obstore"], medians["boto3"]
        print(f"obstore / boto3: PUT {op / bp:.2f}, GET {og / bg:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
