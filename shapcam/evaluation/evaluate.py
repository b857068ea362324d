"""The paper's evaluation as a plain loop: methods x images -> per-image rows and a table.

The orchestration layer runs the same functions shard by shard; this module only needs torch.
Rows carry the protocol variant, so tables of different variants are never mixed.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..data.records import ImageRecord, pointing_status
from ..data.stream import decode_threads, decoded_batches, image_batch, stack
from ..errors import ShapCAMError
from ..methods import METHOD_TITLES, CAMMethod, build_method
from ..runtime.precision import autocast
from ..zoo.models import LoadedModel
from .field_metrics import (
    MPRT_DEPTHS,
    check_metrics,
    field_scores,
    mprt_depths,
    randomisable_layers,
    randomised_copy,
)
from .metrics import confidence_metrics, deletion_insertion, energy_pointing_game, step_in_frame
from .targets import TargetSpec

#: Table rows: (row label, column of the per-image rows, how to aggregate).
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Average Drop % (lower is better)", "avg_drop", "mean"),
    ("Increase in Confidence % (higher)", "increase", "percent"),
    ("Proportion % (energy pointing game, higher)", "proportion", "percent"),
    ("Deletion AUC (lower)", "deletion", "mean"),
    ("Insertion AUC (higher)", "insertion", "mean"),
)
#: Rows of the field metrics (:mod:`shapcam.evaluation.field_metrics`), shown when a run
#: computed them.
FIELD_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Sparseness (Gini, higher: sparser)", "sparseness", "mean"),
    ("Complexity (entropy, lower: simpler)", "complexity", "mean"),
    ("Relevance rank accuracy (higher)", "rank_accuracy", "mean"),
    ("Relevance mass accuracy (higher)", "mass_accuracy", "mean"),
    ("ROAD MoRF accuracy % (lower)", "road_morf", "percent"),
    ("ROAD LeRF accuracy % (higher)", "road_lerf", "percent"),
    ("MPRT Spearman (lower: passes the sanity check)", "mprt_spearman", "mean"),
    ("MPRT SSIM (lower: passes the sanity check)", "mprt_ssim", "mean"),
)

#: Image counts of the pointing game under the table: (row label, key of the summary table).
POINTING_COUNTS: tuple[tuple[str, str], ...] = (
    ("Pointing game: images scored (one box, < 50%)", "proportion_images"),
    ("Pointing game: left out, no box of the class", "pointing_no_box"),
)

#: Whose box the pointing game uses: the explained class (the paper) or the ground truth.
PG_CLASSES = ("target", "label")


def image_seed(seed: int, image_id: str) -> int:
    """The seed of one image (Shap-CAM's orders, deletion/insertion tie-breaking): fixed by the
    run seed and the image id alone, so results do not depend on sharding or batching."""
    return (seed * 1_000_003 + zlib.crc32(image_id.encode())) % 2**31


def stored_precision(maps: torch.Tensor) -> torch.Tensor:
    """Maps as the saliency store keeps them (float16), so metrics computed by the plain loop and
    by the pipeline from the store are identical."""
    return maps.half().float()


@dataclass
class MetricRow:
    """One image explained by one method."""

    image_id: str
    method: str
    protocol: str
    target: int = -1
    label: int = -1
    y: float = math.nan
    o: float = math.nan
    avg_drop: float = math.nan
    increase: float = math.nan
    proportion: float = math.nan  # NaN unless the image passes the localisation filter
    pointing: str = ""  # pointing-game status (records.POINTING_STATUSES); "" not evaluated
    deletion: float = math.nan
    insertion: float = math.nan
    sparseness: float = math.nan  # the field metrics: NaN unless asked for (--metrics)
    complexity: float = math.nan
    rank_accuracy: float = math.nan
    mass_accuracy: float = math.nan
    road_morf: float = math.nan
    road_lerf: float = math.nan
    mprt_spearman: float = math.nan
    mprt_ssim: float = math.nan
    seconds: float = math.nan
    error: str | None = None


def evaluate_records(
    lm: LoadedModel,
    records: Sequence[ImageRecord],
    methods: Sequence[str],
    *,
    protocol: str = "scorecam",
    target: str = "predicted",
    method_options: dict[str, dict[str, Any]] | None = None,
    batch_images: int | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    causal: bool = True,
    causal_step: int = 224,
    seed: int = 0,
    pg_class: str = "target",
    metrics: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> list[MetricRow]:
    """Explain and evaluate ``records`` with each method; per-image failures become rows with
    ``error`` set and the run goes on. ``pg_class``: whose box the pointing game uses.

    ``batch_images``: images per compute batch (default: 8 on CPU, 64 on GPU); ``threads``:
    image decoder threads working ahead of the compute (default: 1 on CPU, up to 8 on GPU;
    0 decodes inline). Neither changes the results. ``precision``: autocast of every forward
    and backward (:mod:`shapcam.runtime.precision`; ``fp32`` is exact). ``metrics``: field metrics
    (:data:`~shapcam.evaluation.field_metrics.FIELD_METRICS`) next to the paper's.
    ``metrics`` is checked as the CLI checks it (``all`` expands; an unknown name is an
    error). ``causal_step``: pixels per deletion/insertion step at 224 x 224, scaled to the
    model's input frame. ``target``: :mod:`shapcam.evaluation.targets` (``predicted``, ``label``,
    ``topk:K``, ``present``); with several classes per image each gets its own rows (their
    ``target`` column)."""
    spec = TargetSpec.parse(target)
    check_pg_class(pg_class)
    metrics = check_metrics(metrics)
    options = method_options or {}
    cams: dict[str, CAMMethod] = {m: build_method(m, lm, options.get(m)) for m in methods}
    random_models = randomised_models(lm) if "mprt" in metrics else []
    randomised = {m: randomised_methods(random_models, m, options.get(m)) for m in methods}
    rows: list[MetricRow] = []
    device = lm.device
    batches = decoded_batches(records, image_batch(str(device), batch_images),
                              decode_threads(str(device), threads), size=lm.input_size)
    step = step_in_frame(causal_step, lm.input_size) if causal else None
    for batch in batches:
        ok = [(d.record, d.x, d.boxes) for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                rows += [MetricRow(d.record.image_id, m, protocol, label=d.record.label,
                                   error=d.error) for m in methods]
        if ok:
            x = stack(batch, device)
            slots, failed = target_slots(spec, lm, [r for r, _, _ in ok], x, precision)
            rows += [MetricRow(ok[i][0].image_id, m, protocol, label=ok[i][0].label, error=why)
                     for i, why in failed for m in methods]
            for pos, targets in slots:
                sub, x_sub = [ok[i] for i in pos], x[pos] if len(pos) < len(ok) else x
                for name, cam in cams.items():
                    with autocast(device, precision):
                        rows += _evaluate_batch(cam, name, lm, sub, x_sub, targets, protocol,
                                                step, seed,
                                                pg_class, metrics, randomised.get(name, []))
        if progress is not None:
            progress(len(batch))
    return rows


def target_slots(spec: TargetSpec, lm: LoadedModel, records: Sequence[ImageRecord],
                 x: torch.Tensor, precision: str = "fp32"
                 ) -> tuple[list[tuple[list[int], torch.Tensor | None]], list[tuple[int, str]]]:
    """The batch split by target slot: ``([(positions, targets or None), ...], [(position,
    reason), ...])``. Slot ``j`` holds the images with a ``j``-th class to explain; the
    predicted class needs no extra forward (targets None: the method picks it)."""
    if spec.kind == "predicted":
        return [(list(range(len(records))), None)], []
    with torch.no_grad(), autocast(x.device, precision):
        logits = lm.model(x).float()
    classes = spec.classes(logits, records)
    failed = [(i, c) for i, c in enumerate(classes) if isinstance(c, str)]
    lists = [c if isinstance(c, list) else [] for c in classes]
    slots = []
    for j in range(max((len(c) for c in lists), default=0)):
        pos = [i for i, c in enumerate(lists) if len(c) > j]
        slots.append((pos, torch.tensor([lists[i][j] for i in pos], device=x.device)))
    return slots, failed


def _evaluate_batch(cam: CAMMethod, name: str, lm: LoadedModel, ok, x: torch.Tensor,
                    targets: torch.Tensor | None, protocol: str, causal_step: int | None,
                    seed: int, pg_class: str, metrics: Sequence[str] = (),
                    randomised: Sequence[CAMMethod] = ()) -> list[MetricRow]:
    t0 = time.perf_counter()
    kwargs = method_call_options(name, seed, [r.image_id for r, _, _ in ok])
    try:
        result = cam(x, targets, **kwargs)
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / x.shape[0]
        random_maps = randomised_maps(randomised, x, result.targets, kwargs)
    except (ShapCAMError, RuntimeError) as exc:  # e.g. out of memory: record, go on
        return [MetricRow(r.image_id, name, protocol, label=r.label, error=f"{name}: {exc}")
                for r, _, _ in ok]
    return score_maps(lm.model, x, stored_precision(result.maps), result.targets,
                      [(r, b) for r, _, b in ok], name, protocol, causal_step, seconds,
                      seed=seed, pg_class=pg_class, metrics=metrics, randomised=random_maps)


def method_call_options(name: str, seed: int, image_ids: Sequence[str]) -> dict[str, Any]:
    """Per-call options of a method on a batch: Shap-CAM's seeds per image."""
    return {"seeds": [image_seed(seed, i) for i in image_ids]} if name == "shapcam" else {}


def randomised_models(lm: LoadedModel, depths: Sequence[float] = MPRT_DEPTHS
                      ) -> list[LoadedModel]:
    """Copies of the model randomised down to each MPRT checkpoint
    (:func:`~shapcam.evaluation.field_metrics.randomised_copy`), one per checkpoint for every
    method."""
    n = len(randomisable_layers(lm.model))
    return [dataclasses.replace(lm, model=randomised_copy(lm.model, d))
            for d in mprt_depths(n, depths)]


def randomised_methods(models: Sequence[LoadedModel], name: str,
                       options: dict[str, Any] | None) -> list[CAMMethod]:
    """Method ``name`` built on each randomised model (:func:`randomised_models`)."""
    return [build_method(name, m, options) for m in models]


def randomised_maps(cams: Sequence[CAMMethod], x: torch.Tensor, targets: torch.Tensor,
                    kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
    """The maps of the randomised models for the same images and classes (None: no MPRT)."""
    if not cams:
        return None
    return [stored_precision(c(x, targets, **kwargs).maps) for c in cams]


def score_maps(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor,
               targets: torch.Tensor,
               examples: Sequence[tuple[ImageRecord, dict[int, torch.Tensor]]],
               method: str, protocol: str, causal_step: int | None,
               seconds: float, *, seed: int = 0, pg_class: str = "target",
               batch_size: int | None = None, metrics: Sequence[str] = (),
               randomised: Sequence[torch.Tensor] | None = None) -> list[MetricRow]:
    """Every metric of one batch of maps; ``examples`` pairs each record with its boxes per
    class in the input frame (as :func:`~shapcam.data.load_example` returns them).
    ``causal_step``: pixels per deletion/insertion step (None: no causal metrics); ``seed``:
    the run seed (deletion/insertion ties, per image); ``pg_class``: whose box the pointing
    game uses, the explained class (``"target"``) or the ground truth (``"label"``);
    ``batch_size``: images per forward of the metrics (default: per device); ``metrics``: the
    field metrics to add (:func:`~shapcam.evaluation.field_metrics.field_scores`),
    ``randomised``: for
    MPRT, the maps of the randomised models (:func:`randomised_maps`)."""
    check_pg_class(pg_class)
    metrics = check_metrics(metrics)
    conf = confidence_metrics(model, x, maps, targets, protocol, batch_size)
    classes = [int(t) if pg_class == "target" else rec.label
               for (rec, _), t in zip(examples, targets.tolist(), strict=True)]
    boxes = [b.get(c, torch.zeros(0, 4)) for (_, b), c in zip(examples, classes, strict=True)]
    energy = energy_pointing_game(maps, boxes)
    seeds = [image_seed(seed, rec.image_id) for rec, _ in examples]
    di = (deletion_insertion(model, x, maps, targets, step=causal_step, batch_size=batch_size,
                             seeds=seeds) if causal_step is not None else None)
    field = field_scores(maps, boxes, metrics, model=model, x=x, targets=targets, seeds=seeds,
                         randomised=randomised, batch_size=batch_size) if metrics else {}
    rows = []
    for i, (rec, _) in enumerate(examples):
        t = int(targets[i])
        status = pointing_status(rec, classes[i])
        rows.append(MetricRow(
            rec.image_id, method, protocol, target=t, label=rec.label,
            y=float(conf["y"][i]), o=float(conf["o"][i]), avg_drop=float(conf["avg_drop"][i]),
            increase=float(conf["increase"][i]),
            proportion=float(energy[i]) if status == "scored" else math.nan, pointing=status,
            deletion=float(di["deletion"][i]) if di else math.nan,
            insertion=float(di["insertion"][i]) if di else math.nan, seconds=seconds,
            **{k: float(v[i]) for k, v in field.items()}))
    return rows


def summary_table(rows: Sequence[MetricRow], methods: Sequence[str]) -> dict[str, Any]:
    """The paper's table shape: one row per metric, one column per method (plus counts)."""
    table: dict[str, Any] = {"columns": [METHOD_TITLES.get(m, m) for m in methods], "rows": []}
    computed = {k for _, k, _ in FIELD_ROWS
                if any(r.method in methods and not math.isnan(getattr(r, k)) for r in rows)}
    for label, key, how in TABLE_ROWS + tuple(f for f in FIELD_ROWS if f[1] in computed):
        values = []
        for m in methods:
            vals = [getattr(r, key) for r in rows if r.method == m and r.error is None]
            vals = [v for v in vals if not math.isnan(v)]
            if not vals:
                values.append(None)
            elif how == "percent":
                values.append(100 * sum(vals) / len(vals))
            else:
                values.append(sum(vals) / len(vals))
        table["rows"].append({"metric": label, "values": values})
    table["images"] = {m: len({r.image_id for r in rows if r.method == m and r.error is None})
                       for m in methods}
    # (image, class) pairs explained: the images times their classes with --target topk/present
    table["explanations"] = {m: sum(1 for r in rows if r.method == m and r.error is None)
                             for m in methods}
    table["failed"] = {m: sum(1 for r in rows if r.method == m and r.error) for m in methods}
    table["proportion_images"] = {
        m: sum(1 for r in rows if r.method == m and not math.isnan(r.proportion))
        for m in methods}
    table["pointing_no_box"] = {  # explained images left out: no box of the game's class
        m: sum(1 for r in rows if r.method == m and r.error is None and r.pointing == "no box")
        for m in methods}
    table["seconds_per_image"] = {
        m: (sum(r.seconds for r in rows if r.method == m and r.error is None)
            / max(1, table["images"][m])) for m in methods}
    return table


def check_pg_class(pg_class: str) -> None:
    if pg_class not in PG_CLASSES:
        raise ShapCAMError(f"pg_class must be one of {', '.join(PG_CLASSES)}, got {pg_class!r}")


def rows_as_dicts(rows: Sequence[MetricRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
