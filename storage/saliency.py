"""The Zarr v3 saliency store of one run.

Layout (``docs/storage.md`` has the diagram)::

    <run>/maps.zarr/                     group; attrs: schema_version, run_id, config, ...
        <dataset>/<model>/               group; attrs: n_images, shard_size, methods, ...
            images/  image_id label target probability width height boxes
            <method>/  maps (N, H, W) float16   raw (N, h, w) float32   [stderr (N, h, w)]

Methods whose raw map is smaller than the map (``spec.derived``: every CAM method) have no
``maps`` array: readers derive it from ``raw`` (:mod:`storage.derive`). Methods whose raw
map is at map resolution (``spec.half_raw``: RISE) keep ``raw`` as float16 (schema version 2;
version-1 stores keep every map and float32 raw maps, and read as before).

With several classes per image (``--target topk:K`` or ``present``: ``n_targets = T > 1``)
``target`` and ``probability`` are ``(N, T)`` and every map array gains a ``class`` axis after
the image axis, ``maps (N, T, H, W)``: slot ``j`` is the image's ``j``-th class (``target``
``-1`` and NaN maps where an image has fewer).
    <run>/shards/<dataset>/<model>/shard-00003.json     completion record of one shard

Every per-image array is chunked ``shard_size`` images along its first axis, so one shard owns
whole chunks of every array and concurrent writers (processes) never touch the same chunk. A
shard is complete when its JSON record exists; the record is written (temp file + rename) only
after all its chunks. Reading a shard that is not complete raises
:class:`IncompleteShardError` instead of returning fill values.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .derive import maps_from_raw
from .errors import IncompleteShardError, SchemaVersionError, StorageError, storage_errors
from .location import Location
from .names import check_run_id, glob_literal

#: Bumped on any incompatible layout change; readers refuse versions they do not know.
SCHEMA_VERSION = 2
#: What this version reads: 1 (every map stored) and 2 (maps derived from small raw maps).
READABLE_VERSIONS = (1, 2)
MAX_BOXES = 16


def _compressors() -> tuple[Any, ...]:
    """zstd through Blosc with byte shuffle (the best size/speed trade-off measured for [0,1]
    float16), then a CRC-32C of the compressed chunk: a damaged chunk fails to read instead of
    reading as data (``shapcam verify`` finds them)."""
    return (zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
            zarr.codecs.Crc32cCodec())


@dataclass(frozen=True)
class TableSpec:
    """Sizes of one dataset x model table of the store."""

    n_images: int
    shard_size: int
    map_shape: tuple[int, int]
    raw_shapes: dict[str, tuple[int, int]]  # method -> layer resolution of its raw map
    stderr_methods: tuple[str, ...] = ("shapcam",)
    n_targets: int = 1  # classes per image (the class axis exists when > 1)
    derived: tuple[str, ...] = ()  # methods without a maps array: derived on read from raw
    half_raw: tuple[str, ...] = ()  # methods whose raw map is kept as float16

    @classmethod
    def compact(cls, n_images: int, shard_size: int, map_shape: tuple[int, int],
                raw_shapes: dict[str, tuple[int, int]], **kw: Any) -> TableSpec:
        """The layout runs write: maps derived from raw maps smaller than them, raw maps at
        map resolution kept as float16 (``docs/storage.md`` has the measured sizes)."""
        return cls(n_images, shard_size, map_shape, raw_shapes,
                   derived=tuple(m for m, hw in raw_shapes.items() if tuple(hw) != map_shape),
                   half_raw=tuple(m for m, hw in raw_shapes.items()
                                  if tuple(hw) == map_shape), **kw)

    @property
    def per_image(self) -> tuple[int, ...]:
        """The axes every per-image, per-class array has after the image axis."""
        return (self.n_targets,) if self.n_targets > 1 else ()

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_images / self.shard_size)

    def shard_slice(self, shard: int) -> slice:
        if not 0 <= shard < self.n_shards:
            raise StorageError(f"shard {shard} does not exist: this table has shards "
                               f"0..{self.n_shards - 1}")
        return slice(shard * self.shard_size, min(self.n_images, (shard + 1) * self.shard_size))


class SaliencyStore:
    """Create, fill and read a run's saliency store (a local folder or an fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        self.location = Location(root, **storage_options)
        self.root = self.location.url
        #: what zarr/xarray open: a local path or an fsspec URL
        self.zarr_path = self.location.url_of("maps.zarr")

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str], run_id: str,
               attributes: Mapping[str, Any] | None = None,
               **storage_options: Any) -> SaliencyStore:
        """Create the store (or open it if it exists with the same run id)."""
        check_run_id(run_id)
        store = cls(root, **storage_options)
        with storage_errors(store.zarr_path):
            store.location.makedirs()
            if store.location.exists("maps.zarr", "zarr.json"):
                existing = store.attrs
                if existing.get("run_id") != run_id:
                    raise StorageError(f"{store.zarr_path} belongs to run "
                                       f"{existing.get('run_id')!r}, not {run_id!r}")
                return store
            group = zarr.open_group(store.zarr_path, mode="w", zarr_format=3)
            group.attrs.update({"schema_version": SCHEMA_VERSION, "run_id": run_id,
                                **dict(attributes or {})})
        return store

    def init_table(self, dataset: str, model: str, image_ids: Sequence[str],
                   labels: Sequence[int], spec: TableSpec,
                   attributes: Mapping[str, Any] | None = None) -> None:
        """Create the arrays of one dataset x model table (idempotent for the same spec)."""
        if len(image_ids) != spec.n_images or len(labels) != spec.n_images:
            raise StorageError(f"{len(image_ids)} ids / {len(labels)} labels for "
                               f"n_images={spec.n_images}")
        path = f"{dataset}/{model}"
        with storage_errors(self.zarr_path):
            root = self._group(mode="a")
            if path in root and "spec" not in root[path].attrs:
                # its creation was interrupted (the layout is written last): nothing was
                # written into it (writers need the layout), so make it again
                del root[path]
            if path in root:
                old = dict(root[path].attrs)
                if old.get("spec") != _spec_json(spec):
                    raise StorageError(f"table {path} exists with another layout "
                                       f"{old.get('spec')}; use a new run id")
                return
            g = root.require_group(path)
            S, N = spec.shard_size, spec.n_images
            images = g.require_group("images")
            ids = images.create_array("image_id", shape=(N,), chunks=(N,), dtype=str,
                                      compressors=(zarr.codecs.Crc32cCodec(),),
                                      dimension_names=("image",))
            ids[:] = np.asarray(image_ids, dtype=str)
            lab = images.create_array("label", shape=(N,), chunks=(N,), dtype="int32",
                                      fill_value=-1, compressors=_compressors(),
                                      dimension_names=("image",))
            lab[:] = np.asarray(labels, dtype=np.int32)
            T, cls = spec.per_image, ("class",) if spec.per_image else ()
            for name, dtype, fill in (("target", "int32", -1), ("probability", "float32", np.nan)):
                images.create_array(name, shape=(N, *T), chunks=(S, *T), dtype=dtype,
                                    fill_value=fill, compressors=_compressors(),
                                    dimension_names=("image", *cls))
            for name in ("width", "height"):
                images.create_array(name, shape=(N,), chunks=(S,), dtype="int32", fill_value=-1,
                                    compressors=_compressors(), dimension_names=("image",))
            images.create_array("boxes", shape=(N, MAX_BOXES, 4), chunks=(S, MAX_BOXES, 4),
                                dtype="float32", fill_value=np.nan, compressors=_compressors(),
                                dimension_names=("image", "box", "coord"))
            H, W = spec.map_shape
            for method, (h, w) in spec.raw_shapes.items():
                m = g.require_group(method)
                if method not in spec.derived:
                    m.create_array("maps", shape=(N, *T, H, W), chunks=(S, *T, H, W),
                                   dtype="float16", compressors=_compressors(),
                                   fill_value=np.nan, dimension_names=("image", *cls, "y", "x"))
                m.create_array("raw", shape=(N, *T, h, w), chunks=(S, *T, h, w),
                               dtype="float16" if method in spec.half_raw else "float32",
                               compressors=_compressors(), fill_value=np.nan,
                               dimension_names=("image", *cls, "row", "col"))
                if method in spec.stderr_methods:
                    m.create_array("stderr", shape=(N, *T, h, w), chunks=(S, *T, h, w),
                                   dtype="float32", compressors=_compressors(),
                                   fill_value=np.nan,
                                   dimension_names=("image", *cls, "row", "col"))
            g.attrs.update({"spec": _spec_json(spec), "dataset": dataset, "model": model,
                            **dict(attributes or {})})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # consolidated metadata: not yet in the v3 spec
                zarr.consolidate_metadata(self.zarr_path)

    # -- writing -------------------------------------------------------------------------
    def write_shard(self, dataset: str, model: str, shard: int,
                    images: Mapping[str, np.ndarray],
                    methods: Mapping[str, Mapping[str, np.ndarray]],
                    record: Mapping[str, Any] | None = None) -> Path:
        """Write every array region of ``shard`` then its completion record. Idempotent.

        ``images``: ``target, probability`` (``(n,)``, or ``(n, T)`` with several classes),
        ``width, height`` (``(n,)``) and optional ``boxes`` (``(n, k, 4)``, NaN padded);
        ``methods[name]``: ``maps (n, H, W)`` (``(n, T, H, W)``) in [0, 1], ``raw``, and
        ``stderr`` where the table has it.
        """
        spec, g = self.table(dataset, model)
        sl = spec.shard_slice(shard)
        n = sl.stop - sl.start
        with storage_errors(self.zarr_path):
            for name in ("target", "probability", "width", "height"):
                if name in images:
                    arr = g["images"][name]
                    g["images"][name][sl] = _check(images[name], (n, *arr.shape[1:]),
                                                   f"images.{name}")
            if "boxes" in images:
                boxes = np.full((n, MAX_BOXES, 4), np.nan, dtype=np.float32)
                b = np.asarray(images["boxes"], dtype=np.float32)
                boxes[:, : min(MAX_BOXES, b.shape[1])] = b[:, :MAX_BOXES]
                g["images"]["boxes"][sl] = boxes
            for method, arrays in methods.items():
                if method not in spec.raw_shapes:
                    raise StorageError(f"method {method!r} is not in table {dataset}/{model} "
                                       f"(it has {', '.join(spec.raw_shapes)})")
                for name, value in arrays.items():
                    if name == "maps" and method in spec.derived:
                        continue  # derived from raw on read
                    arr = g[method][name]
                    arr[sl] = _check(value, (n, *arr.shape[1:]),
                                     f"{method}.{name}").astype(arr.dtype)
            done = self.location.write_bytes(
                record_bytes({"shard": shard, "images": n, **dict(record or {})}),
                *self._marker(dataset, model, shard))
        return Path(done) if self.location.local else done

    def update_attrs(self, attributes: Mapping[str, Any]) -> None:
        """Add or replace attributes of the run's root group (e.g. what a resume refreshed)."""
        with storage_errors(self.zarr_path):
            self._group(mode="a").attrs.update(dict(attributes))

    # -- reading -------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group(mode="r").attrs)

    def _group(self, mode: str = "r") -> zarr.Group:
        if not self.location.exists("maps.zarr", "zarr.json"):
            raise StorageError(f"{self.zarr_path} is not a saliency store (no zarr.json); "
                               "pass the run folder that holds maps.zarr")
        try:
            group = zarr.open_group(self.zarr_path, mode=mode, zarr_format=3)
        except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else \
                type(exc).__name__
            raise StorageError(f"{self.zarr_path}/zarr.json is damaged ({reason}); the run "
                               "cannot be read: start a new run id") from None
        version = group.attrs.get("schema_version")
        if version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise SchemaVersionError(
                f"{self.zarr_path} has schema version {version}, this shapcam reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: "
                + ("upgrade shapcam to read it" if newer else
                   "re-run it or read it with the shapcam that wrote it"))
        return group

    def tables(self) -> list[tuple[str, str]]:
        root = self._group()
        return sorted((d, m) for d, dg in root.groups() for m, _ in dg.groups())

    def table(self, dataset: str, model: str) -> tuple[TableSpec, zarr.Group]:
        root = self._group(mode="a")
        path = f"{dataset}/{model}"
        if path not in root:
            have = ", ".join(f"{d}/{m}" for d, m in self.tables()) or "none"
            raise StorageError(f"no table {path} in {self.zarr_path} (tables: {have})")
        g = root[path]
        if "spec" not in g.attrs:
            raise StorageError(f"table {path} in {self.zarr_path} was never finished (its "
                               "creation was interrupted): re-run the same run id to make it")
        spec = g.attrs["spec"]
        return TableSpec(spec["n_images"], spec["shard_size"], tuple(spec["map_shape"]),
                         {k: tuple(v) for k, v in spec["raw_shapes"].items()},
                         tuple(spec["stderr_methods"]), spec.get("n_targets", 1),
                         tuple(spec.get("derived", ())), tuple(spec.get("half_raw", ()))), g

    @staticmethod
    def _marker(dataset: str, model: str, shard: int) -> tuple[str, ...]:
        return ("shards", dataset, model, f"shard-{shard:05d}.json")

    def shard_status(self, dataset: str, model: str) -> dict[int, bool]:
        spec, _ = self.table(dataset, model)
        done = {p.rsplit("/", 1)[-1] for p in
                self.location.glob("shards", glob_literal(dataset), glob_literal(model),
                                   "shard-*.json")}
        return {k: f"shard-{k:05d}.json" in done for k in range(spec.n_shards)}

    def completed(self, dataset: str, model: str, shard: int) -> bool:
        return self.location.exists(*self._marker(dataset, model, shard))

    def shard_record(self, dataset: str, model: str, shard: int) -> dict[str, Any]:
        """The completion record of a shard (what its writer reported)."""
        if not self.completed(dataset, model, shard):
            raise IncompleteShardError(f"shard {shard} of {dataset}/{model} is not complete")
        marker = self._marker(dataset, model, shard)
        try:
            return check_record(self.location.fs.cat_file(self.location.path(*marker)))
        except StorageError as exc:
            raise StorageError(f"completion record {self.location.path(*marker)}: {exc}; "
                               "shapcam run --repair recomputes the shard") from None

    def read_shard(self, dataset: str, model: str, method: str, shard: int,
                   name: str = "maps") -> np.ndarray:
        """The ``name`` array of a completed shard; an incomplete shard is an error."""
        spec, g = self.table(dataset, model)
        sl = spec.shard_slice(shard)
        if not self.completed(dataset, model, shard):
            raise IncompleteShardError(
                f"shard {shard} of {dataset}/{model} (images {sl.start}..{sl.stop - 1}) was "
                "never completed: its writer stopped before the end. Re-run the same run id to "
                "resume it")
        if method not in g:
            raise StorageError(f"no method {method!r} in {dataset}/{model}")
        if name == "maps" and method in spec.derived:
            return maps_from_raw(g[method]["raw"][sl], spec.map_shape)
        return g[method][name][sl]


def record_bytes(record: Mapping[str, Any]) -> bytes:
    """A completion record as JSON with the CRC-32 of its own content (``crc32``), so that
    ``verify`` tells a damaged record from a good one."""
    body = json.dumps(dict(record), sort_keys=True)
    return json.dumps({**dict(record), "crc32": zlib.crc32(body.encode())}).encode()


def check_record(data: bytes) -> dict[str, Any]:
    """The record written by :func:`record_bytes`; a :class:`StorageError` saying what is wrong
    when it does not parse or its checksum does not match (records of older versions have
    none and are only parsed)."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"not a readable record ({exc})") from None
    if not isinstance(record, dict):
        raise StorageError("not a record (a JSON object)")
    want = record.pop("crc32", None)
    if want is not None and zlib.crc32(json.dumps(record, sort_keys=True).encode()) != want:
        raise StorageError("checksum mismatch (the record was changed after it was written)")
    return record


def _spec_json(spec: TableSpec) -> dict[str, Any]:
    return {"n_images": spec.n_images, "shard_size": spec.shard_size,
            "map_shape": list(spec.map_shape),
            "raw_shapes": {k: list(v) for k, v in spec.raw_shapes.items()},
            "stderr_methods": list(spec.stderr_methods),
            # written only with a class axis, so stores without one keep their exact spec
            **({"n_targets": spec.n_targets} if spec.n_targets > 1 else {}),
            **({"derived": list(spec.derived)} if spec.derived else {}),
            **({"half_raw": list(spec.half_raw)} if spec.half_raw else {})}


def _check(value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise StorageError(f"{what} has shape {arr.shape}, the shard needs {shape}")
    return arr
