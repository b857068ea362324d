"""Saliency store: write throughput (1 and 2 processes), compressed size, selective reads.

    .venv/bin/python benchmarks/bench_storage.py [--images 4000] [--shard 100]

Maps are realistic, not noise: a random 7x7 grid upsampled bilinearly to 224x224 and min-max
normalised, like a CAM (noise would not compress and would understate what users get).
Each image also gets its float32 7x7 raw map. Selective reads are verified by counting the chunk
keys the Zarr store is asked for while a class is loaded through the query API.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import zoom

from storage import SaliencyStore, TableSpec, open_run

D, M = "bench", "model"


def cam_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, 7, 7)).astype(np.float32)
    up = zoom(np.maximum(raw, 0), (1, 32, 32), order=1)
    lo = up.min((1, 2), keepdims=True)
    hi = up.max((1, 2), keepdims=True)
    return ((up - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float16), raw


def write(root: str, shards: list[int], shard_size: int, ready, go, done) -> None:
    st = SaliencyStore(root)
    data = {k: cam_like(shard_size, k) for k in shards}  # generated before the clock starts
    ready.set()
    go.wait()
    for k in shards:
        maps, raw = data[k]
        st.write_shard(D, M, k, {"target": np.zeros(shard_size), "probability":
                                 np.ones(shard_size)},
                       {"shapcam": {"maps": maps, "raw": raw, "stderr": raw}})
    done.put(k)


def run_writers(root: str, groups: list[list[int]], shard_size: int) -> float:
    """Wall time of the writer processes writing their shard groups concurrently (from a
    common start signal, after each has generated its data)."""
    ctx = mp.get_context("spawn")
    go, done = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in groups]
    procs = [ctx.Process(target=write, args=(root, g, shard_size, r, go, done))
             for g, r in zip(groups, readies, strict=True)]
    for p in procs:
        p.start()
    for r in readies:
        r.wait()
    t = time.perf_counter()
    go.set()
    for _ in procs:
        done.get(timeout=600)
    elapsed = time.perf_counter() - t
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"writer exited with {p.exitcode}")
    return elapsed


def fresh(root: Path, n: int, shard_size: int, labels: np.ndarray) -> None:
    if root.exists():
        shutil.rmtree(root)
    st = SaliencyStore.create(root, "bench")
    st.init_table(D, M, [f"img{i:06d}" for i in range(n)], labels.tolist(),
                  TableSpec(n, shard_size, (224, 224), {"shapcam": (7, 7)}))


def count_chunk_reads(root: Path, **select) -> tuple[int, int]:
    """(chunk keys of shapcam/maps fetched, images) while loading a selection."""
    import zarr.storage

    seen: set[str] = set()
    original = zarr.storage.LocalStore.get

    async def counting(self, key, *args, **kwargs):
        if "shapcam/maps/c/" in key:
            seen.add(key)
        return await original(self, key, *args, **kwargs)

    zarr.storage.LocalStore.get = counting
    try:
        da = open_run(root).maps(D, M, "shapcam", **select).load()
    finally:
        zarr.storage.LocalStore.get = original
    return len(seen), da.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard", type=int, default=100)
    args = parser.parse_args()
    n, s = args.images, args.shard
    shards = list(range(n // s))
    tmp = Path(tempfile.mkdtemp(prefix="shapcam-bench-"))
    # Labels in blocks of one shard, 4 classes: class 0 owns a quarter of the shards.
    labels = (np.arange(n) // s) % 4
    root = tmp / "run"
    fresh(root, n, s, labels)
    t1 = run_writers(str(root), [shards], s)
    fresh(root, n, s, labels)
    t2 = run_writers(str(root), [shards[0::2], shards[1::2]], s)
    maps_dir = root / "maps.zarr" / D / M / "shapcam" / "maps"
    size = sum(p.stat().st_size for p in maps_dir.rglob("*") if p.is_file())
    raw_bytes = n * 224 * 224 * 2
    read_t = time.perf_counter()
    chunks, images = count_chunk_reads(root, labels=[0])
    read_t = time.perf_counter() - read_t
    ids = [f"img{i:06d}" for i in np.random.default_rng(0).choice(n, 50, replace=False)]
    chunks_ids, _ = count_chunk_reads(root, ids=ids)
    touched = len({int(i[3:]) // s for i in ids})
    rows = [
        f"| images | {n} ({n // s} shards of {s}) |",
        f"| write, 1 process | {n / t1:.0f} maps/s ({t1:.1f} s) |",
        f"| write, 2 processes | {n / t2:.0f} maps/s ({t2:.1f} s): **{t1 / t2:.2f}x** |",
        f"| float16 maps on disk | {size / 1e6 / n * 1000:.1f} MB per 1,000 maps "
        f"(raw {raw_bytes / 1e6 / n * 1000:.1f} MB: ratio {raw_bytes / size:.1f}x) |",
        f"| load class 0 ({images} maps) | {read_t:.2f} s; chunks fetched {chunks} of "
        f"{n // s} (class 0 lives in {len(shards) // 4}) |",
        f"| load 50 random ids | chunks fetched {chunks_ids}; shards holding them {touched} |",
    ]
    print("| what | result |\n|---|---|\n" + "\n".join(rows))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
