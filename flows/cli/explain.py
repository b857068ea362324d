"""One-process commands: ``explain`` images, ``evaluate`` a dataset with the paper's protocols
(the plain loop), ``demo`` on the bundled photos, ``setup`` of the offline weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from shapcam.methods import METHODS
from shapcam.methods.shapcam import DEFAULT_PERMUTATIONS
from tasks.config import ALL_METHODS, DEFAULT_MODEL, DEFAULT_WEIGHTS, ModelSpec, RunConfig

from . import app
from .common import (
    AutoDevice,
    BatchImages,
    Causal,
    DecodeThreads,
    Metrics,
    PgClass,
    Precision,
    Preset,
    Protocol,
    Seed,
    Settings,
    default_device,
    offline_weights,
    user_errors,
)

Model = Annotated[str, typer.Option(
    help="torchvision classifier name, or timm:NAME (e.g. timm:convnext_tiny).")]
Weights = Annotated[str, typer.Option(
    help="Weight enum name (IMAGENET1K_V1, DEFAULT; timm: pretrained), a state-dict path, or "
         "'random'.")]
Layer = Annotated[str | None, typer.Option(help="Target layer (default per model).")]


def _save(result: Any, i: int, photo: np.ndarray, stem: str, method: str, out: Path,
          lm: Any) -> None:
    """``STEM.METHOD.npz`` (map, raw map, target and, for Shap-CAM, its extras) and the
    ``STEM.METHOD.png`` overlay."""
    from dashboards.render import save_overlay_figure

    target, prob = int(result.targets[i]), float(result.probabilities[i])
    arrays: dict[str, Any] = {
        "map": result.maps[i].float().cpu().numpy(), "raw": result.raw[i].float().cpu().numpy(),
        "target": np.int64(target), "class_name": np.str_(lm.class_name(target)),
        "probability": np.float32(prob)}
    title = f"{method}: {lm.class_name(target)} (p={prob:.3f})"
    if method == "shapcam":
        ex = result.extras
        arrays.update(
            stderr=ex["stderr"][i].cpu().numpy(), v_empty=np.float32(ex["v_empty"][i]),
            v_full=np.float32(ex["v_full"][i]), permutations=np.int64(ex["permutations"][i]),
            evaluations=np.int64(ex["evaluations"][i]), seed=np.int64(ex["seed"][i]))
        title += f", K={int(ex['permutations'][i])}"
    np.savez_compressed(out / f"{stem}.{method}.npz", **arrays)
    save_overlay_figure(photo, arrays["map"], out / f"{stem}.{method}.png", title)


def explain_images(paths: list[Path], lm: Any, cam: Any, target: int | None, out: Path,
                   images_per_batch: int = 8, seed: int = 0) -> list[tuple[Path, str]]:
    """Explain ``paths`` with ``cam`` and write ``<stem>.<method>.{png,npz}``; an unreadable
    image is skipped and returned with the reason."""
    import torch
    from tqdm import tqdm

    from shapcam.data.images import load_image, to_tensor
    from shapcam.errors import ShapCAMError

    out.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[Path, str]] = []
    stems: dict[str, int] = {}
    bar = tqdm(total=len(paths), desc=f"{cam.name} on {lm.name}", unit="img",
               disable=len(paths) < 2)
    for start in range(0, len(paths), images_per_batch):
        batch = []
        for p in paths[start:start + images_per_batch]:
            try:
                img = load_image(p)
                batch.append((p, np.asarray(img), to_tensor(img, lm.input_size)))
            except ShapCAMError as exc:
                failures.append((p, str(exc)))
                bar.update(1)
        if not batch:
            continue
        x = torch.stack([t for _, _, t in batch]).to(lm.device)
        result = cam(x, target, **({"seeds": seed} if cam.name == "shapcam" else {}))
        for i, (p, photo, _) in enumerate(batch):
            n = stems[p.stem] = stems.get(p.stem, -1) + 1  # two inputs, one stem: keep both
            _save(result, i, photo, p.stem if n == 0 else f"{p.stem}-{n}", cam.name, out, lm)
            bar.update(1)
    bar.close()
    return failures


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: Model = DEFAULT_MODEL, weights: Weights = DEFAULT_WEIGHTS, layer: Layer = None,
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(METHODS)}.")] = "shapcam",
    permutations: Annotated[int, typer.Option(
        "--permutations", "-k", help="Shap-CAM orders per image (cost ~ K * positions).")
    ] = DEFAULT_PERMUTATIONS,
    antithetic: Annotated[bool, typer.Option(help="Pair each order with its reverse.")] = False,
    block: Annotated[int | None, typer.Option(help="Group positions into b x b tiles.")] = None,
    value: Annotated[str, typer.Option(help="probability (paper) or logit.")] = "probability",
    baseline: Annotated[str, typer.Option(help="zero (paper) or mean.")] = "zero",
    target: Annotated[str | None, typer.Option(
        help="Class index or name to explain (default: the predicted class).")] = None,
    seed: Annotated[int, typer.Option(help="Per-image seed of the permutations.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Coalitions per head call.")] = 1024,
    device: AutoDevice = "", out: Annotated[Path, typer.Option(help="Output folder.")
                                        ] = Path("runs/explain"),
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="Method option METHOD.KEY=VALUE (or KEY=VALUE for the chosen method), "
        "repeatable: e.g. --set rise.n_masks=500, --set mask.iterations=100.")] = None,
) -> None:
    """Explain images: writes `STEM.METHOD.png` (overlay) and `STEM.METHOD.npz`."""
    from shapcam.methods import build_method
    from shapcam.zoo.models import load_model, resolve_target
    from tasks.config import parse_settings

    with user_errors():
        options: dict[str, Any] = {}
        if method == "shapcam":
            options = {"permutations": permutations, "antithetic": antithetic, "block": block,
                       "value": value, "baseline": baseline, "batch_size": batch_size,
                       "seed": seed}
        if method in METHODS:
            options.update(parse_settings(settings, [method]).get(method, {}))
        lm = load_model(model, weights, target_layer=layer, device=device or default_device())
        cam = build_method(method, lm, options)
        failures = explain_images(images, lm, cam, resolve_target(target, lm), out, seed=seed)
    for path, why in failures:
        typer.secho(f"skipped {path}: {why}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {len(images) - len(failures)} explanation(s) to {out}")
    if failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option(
        help="sample, imagenet, voc, folder or manifest (docs/datasets.md).")] = "sample",
    root: Annotated[str | None, typer.Option(
        help="Dataset folder, manifest, or their fsspec URL (sample: where to assemble it; "
             "default ~/.cache/shapcam).")] = None,
    boxes: Annotated[Path | None, typer.Option(help="COCO instances JSON of boxes.")] = None,
    class_map: Annotated[Path | None, typer.Option(
        help="JSON {label name: class index or name}.")] = None,
    input_size: Annotated[int | None, typer.Option(
        help="Input side in pixels (default: what the model declares, else 224).")] = None,
    split: Annotated[str, typer.Option(help="VOC split file (test, val, trainval).")] = "test",
    model: Model = DEFAULT_MODEL, weights: Weights = DEFAULT_WEIGHTS, layer: Layer = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")
                       ] = ",".join(ALL_METHODS),
    n_images: Annotated[int | None, typer.Option(
        help="Deterministic random sample of N images (the paper: 2000).")] = None,
    seed: Seed = 0, protocol: Protocol = "scorecam",
    target: Annotated[str, typer.Option(
        help="predicted (paper), label, topk:K (the K most probable classes, each explained) "
             "or present (every annotated class: VOC's multi-label case).")] = "predicted",
    causal: Causal = True, metrics: Metrics = "", pg_class: PgClass = "target",
    batch_images: BatchImages = None, decode_threads: DecodeThreads = None,
    precision: Precision = "fp32",
    preset: Preset = "paper", settings: Settings = None, device: AutoDevice = "",
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the table and per-image rows as JSON.")] = None,
) -> None:
    """Evaluate methods with the paper's protocols and print its table (methods as columns)."""
    from tqdm import tqdm

    from dashboards.render import markdown
    from shapcam.evaluation.evaluate import evaluate_records, rows_as_dicts, summary_table
    from shapcam.zoo.models import load_model
    from tasks.plan import read_dataset
    from tasks.reports import paper_table

    with user_errors():
        config = RunConfig.build(dataset=dataset, root=root, split=split, methods=methods,
                                 models=(ModelSpec(model, weights, layer, input_size),),
                                 boxes=boxes, class_map=class_map, n_images=n_images,
                                 seed=seed, protocol=protocol, causal=causal, preset=preset,
                                 pg_class=pg_class, settings=settings, precision=precision,
                                 metrics=metrics)
        records = read_dataset(config)
        lm = load_model(model, weights, target_layer=layer, device=device or default_device(),
                        input_size=input_size)
        with tqdm(total=len(records), desc="evaluate", unit="img") as bar:
            rows = evaluate_records(lm, records, config.methods, protocol=protocol,
                                    target=target, method_options=config.method_options,
                                    batch_images=batch_images, threads=decode_threads,
                                    precision=precision, causal=causal,
                                    causal_step=config.causal_step, seed=seed,
                                    metrics=config.metrics,
                                    pg_class=pg_class, progress=bar.update)
    table = summary_table(rows, config.methods)
    done = min(table["images"].values())
    if max(table["explanations"].values()) > done:
        target = f"{target} ({min(table['explanations'].values())} image-class pairs)"
    caption = (f"{dataset} ({done} images, seed {seed}), {model} ({weights}), protocol "
               f"`{protocol}`, target: {target} class, pointing game on the {pg_class} "
               "class's box")
    typer.echo(markdown(paper_table(table, caption)))
    for image_id, why in {r.image_id: r.error for r in rows if r.error}.items():
        typer.secho(f"failed {image_id}: {why}", fg=typer.colors.YELLOW, err=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"caption": caption, "table": table,
                                         "rows": rows_as_dicts(rows)}, indent=1))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    permutations: Annotated[int, typer.Option("--permutations", "-k")] = DEFAULT_PERMUTATIONS,
    device: AutoDevice = "",
) -> None:
    """Explain the bundled photos with the real MobileNetV2 (offline)."""
    from shapcam.data.photos import bundled_photo_paths

    offline_weights()
    explain(bundled_photo_paths(), model=DEFAULT_MODEL, weights=DEFAULT_WEIGHTS, layer=None,
            method="shapcam", permutations=permutations, antithetic=False, block=None,
            value="probability", baseline="zero", target=None, seed=0, batch_size=1024,
            device=device, out=out, settings=[])


@app.command()
def setup() -> None:
    """Put the offline MobileNetV2 checkpoint where torchvision finds it (sha256 checked)."""
    from shapcam.zoo.weights import install_offline_weights

    offline_weights()
    typer.echo(f"MobileNetV2 ImageNet weights ready at {install_offline_weights()}")
