"""The consolidated metrics table of a run: one Parquet file per protocol variant.

    <run>/metrics-<protocol>.parquet     every row of <run>/metrics/**/shard-*-<protocol>.parquet

The per-shard files stay the unit of resume and repair (a task writes its shard's file); the
consolidated file is what readers scan: one file instead of one per shard, method and model
(4,692 files at 50,000 images x 6 methods in shards of 64), so a query over a run reads one
footer instead of thousands. It is written at the end of a run (:func:`consolidate`, after
its last shard), and removed by every writer of a shard file of its protocol before that
writes, so a consolidated file that exists covers every shard file of its protocol. Its
metadata records the shard files it was made from (count and a fingerprint of their names and
sizes): readers compare the count with their listing, ``shapcam verify`` the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .errors import StorageError
from .location import Location
from .tables import METRICS_SCHEMA, PARTITIONS, _atomic_write, consolidated_name

SHARD_FILE = re.compile(r"metrics/dataset=(?P<dataset>[^/]+)/model=(?P<model>[^/]+)/"
                        r"method=(?P<method>[^/]+)/shard-(?P<shard>\d+)-(?P<protocol>[^/]+)"
                        r"\.parquet$")
#: Metadata keys of a consolidated file.
SOURCES, FINGERPRINT = b"shapcam.sources", b"shapcam.fingerprint"


def full_schema() -> pa.Schema:
    """The metrics rows with their partition columns (what readers see)."""
    return pa.schema(list(METRICS_SCHEMA) + [pa.field(p, pa.string()) for p in PARTITIONS])


def shard_files(loc: Location, sizes: bool = True) -> dict[str, dict[str, int]]:
    """The finished per-shard metrics files by protocol: ``{protocol: {relative path: size}}``
    (one listing of ``metrics/``; writers' temporary files are not listed). ``sizes=False``
    skips the sizes (0), which a local listing then never stats: what readers need to count
    the files (37,500 files at shards of 8: 0.1 s instead of 0.6 s)."""
    if not loc.isdir("metrics"):
        return {}
    base = loc.path()
    if loc.local and not sizes:
        found = {f"{top}/{name}": 0 for top, _, names in os.walk(loc.path("metrics"))
                 for name in names}
    else:
        found = {p: int(info.get("size") or 0) for p, info in
                 loc.fresh().find(loc.path("metrics"), detail=True).items()
                 if info.get("type", "file") == "file"}
    out: dict[str, dict[str, int]] = {}
    for path, size in found.items():
        rel = path[len(base):].lstrip("/")
        m = SHARD_FILE.search(rel)
        if m:
            out.setdefault(m["protocol"], {})[rel] = size
    return out


def fingerprint(files: dict[str, int]) -> str:
    """What a consolidated file is made of: a hash of the shard files' names and sizes."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()


def shard_dataset(loc: Location, files: Iterable[str]) -> pads.Dataset:
    """The per-shard files ``files`` (relative paths) as one dataset with partition columns."""
    part = pads.partitioning(pa.schema([(p, pa.string()) for p in PARTITIONS]), flavor="hive")
    fs = None if loc.local else loc.fs
    return pads.dataset([loc.path(f) for f in files], format="parquet", partitioning=part,
                        partition_base_dir=loc.path("metrics"), schema=full_schema(),
                        filesystem=fs)


def consolidate(root: str | os.PathLike[str], protocol: str) -> str | None:
    """(Re)write ``metrics-<protocol>.parquet`` from the shard files of ``protocol``; None
    when there are none. Rows are sorted by dataset, model, method, shard and image."""
    loc = Location(root)
    files = shard_files(loc).get(protocol, {})
    if not files:
        return None
    made_of = sources(loc, protocol) if loc.exists(consolidated_name(protocol)) else None
    if made_of == (len(files), fingerprint(files)):
        return loc.path(consolidated_name(protocol))  # current: a resumed finished run
    try:
        table = shard_dataset(loc, files).to_table()
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0].split(". ")[0][:300]
        raise StorageError(f"a metrics file of {loc.url} is damaged ({reason}): `shapcam "
                           "verify` names it, `shapcam run --run-id ID --repair` recomputes "
                           "its shard") from None
    table = table.sort_by([(c, "ascending") for c in
                           ("dataset", "model", "method", "shard", "image_id", "target")])
    table = table.replace_schema_metadata({SOURCES: str(len(files)).encode(),
                                           FINGERPRINT: fingerprint(files).encode()})
    return _atomic_write(table, root, consolidated_name(protocol))


def sources(loc: Location, protocol: str) -> tuple[int, str] | None:
    """``(number of shard files, fingerprint)`` that the consolidated file of ``protocol``
    records; None when it has none (or is unreadable: ``verify`` reports that)."""
    try:
        meta = pq.read_metadata(loc.path(consolidated_name(protocol)),
                                filesystem=None if loc.local else loc.fs).metadata or {}
    except (OSError, ValueError):
        return None
    if SOURCES not in meta or FINGERPRINT not in meta:
        return None
    return int(meta[SOURCES]), meta[FINGERPRINT].decode()


def metrics_dataset(loc: Location) -> pads.Dataset:
    """Every metrics row of the run: each protocol's consolidated file where it is current
    (it exists and records as many shard files as there are), its shard files otherwise
    (a run in progress)."""
    parts: list[pads.Dataset] = []
    fs = None if loc.local else loc.fs
    for protocol, files in sorted(shard_files(loc, sizes=False).items()):
        have = sources(loc, protocol) if loc.exists(consolidated_name(protocol)) else None
        if have is not None and have[0] == len(files):
            parts.append(pads.dataset(loc.path(consolidated_name(protocol)), format="parquet",
                                      schema=full_schema(), filesystem=fs))
        else:
            parts.append(shard_dataset(loc, files))
    if not parts:
        return pads.dataset(pa.table({f.name: pa.array([], f.type) for f in full_schema()}))
    return parts[0] if len(parts) == 1 else pads.dataset(parts)
