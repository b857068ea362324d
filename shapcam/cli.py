"""Command line: ``shapcam explain``, ``shapcam demo``, ``shapcam setup``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from tqdm import tqdm

from .cpu import tune_allocator
from .images import load_image, to_tensor
from .methods import METHODS
from .methods.shapcam import DEFAULT_PERMUTATIONS
from .models import LoadedModel, ShapCAMError, load_model
from .presets import resolve_preset

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Shap-CAM saliency maps and their baselines.")


@app.callback()
def _main() -> None:
    """Shap-CAM saliency maps and their baselines."""
    tune_allocator()  # many large short-lived tensors: see shapcam.cpu


def _resolve_target(target: str | None, lm: LoadedModel) -> int | None:
    if target is None:
        return None
    if target.lstrip("-").isdigit():
        return int(target)
    lowered = [c.lower() for c in lm.categories]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    raise ShapCAMError(f"unknown class {target!r}: pass an index 0..{len(lm.categories) - 1} "
                       "or an exact class name such as "
                       f"{', '.join(repr(c) for c in lm.categories[:3])}")


def _build_method(method: str, lm: LoadedModel, options: dict[str, Any]):
    if method not in METHODS:
        raise ShapCAMError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    try:
        return METHODS[method](lm, **options)
    except TypeError as exc:  # an option this method does not take
        raise ShapCAMError(f"bad option for {method}: {exc}") from exc


def _save(result, i: int, image, stem: str, method: str, out: Path, lm: LoadedModel) -> None:
    target = int(result.targets[i])
    prob = float(result.probabilities[i])
    arrays: dict[str, Any] = {
        "map": result.maps[i].float().cpu().numpy(),
        "raw": result.raw[i].float().cpu().numpy(),
        "target": np.int64(target),
        "class_name": np.str_(lm.class_name(target)),
        "probability": np.float32(prob),
    }
    ex = result.extras
    if method == "shapcam":
        arrays.update(
            stderr=ex["stderr"][i].cpu().numpy(), v_empty=np.float32(ex["v_empty"][i]),
            v_full=np.float32(ex["v_full"][i]), permutations=np.int64(ex["permutations"][i]),
            evaluations=np.int64(ex["evaluations"][i]), seed=np.int64(ex["seed"][i]))
    np.savez_compressed(out / f"{stem}.{method}.npz", **arrays)
    from .visualise import save_overlay  # matplotlib only when writing figures

    title = f"{method}: {lm.class_name(target)} (p={prob:.3f})"
    if method == "shapcam":
        title += f", K={int(ex['permutations'][i])}"
    save_overlay(image, arrays["map"], out / f"{stem}.{method}.png", title)


def run_explain(paths: list[Path], lm: LoadedModel, method: str, options: dict[str, Any],
                target: str | None, out: Path, images_per_batch: int = 8,
                seed: int = 0) -> list[tuple[Path, str]]:
    """Explain ``paths`` and write ``<stem>.<method>.{png,npz}``; return the failures."""
    out.mkdir(parents=True, exist_ok=True)
    cam = _build_method(method, lm, options)
    target_index = _resolve_target(target, lm)
    failures: list[tuple[Path, str]] = []
    stems: dict[str, int] = {}
    bar = tqdm(total=len(paths), desc=f"{method} on {lm.name}", unit="img",
               disable=len(paths) < 2)
    for start in range(0, len(paths), images_per_batch):
        batch, ok = [], []
        for p in paths[start:start + images_per_batch]:
            try:
                img = load_image(p)
                batch.append((p, img, to_tensor(img)))
                ok.append(p)
            except ShapCAMError as exc:
                failures.append((p, str(exc)))
                bar.update(1)
        if not batch:
            continue
        x = torch.stack([t for _, _, t in batch]).to(lm.device)
        kwargs = {"seeds": seed} if method == "shapcam" else {}
        result = cam(x, target_index, **kwargs)
        for i, (p, img, _) in enumerate(batch):
            stem = p.stem
            if stem in stems:  # two inputs with one stem: keep both outputs
                stems[stem] += 1
                stem = f"{stem}-{stems[stem]}"
            else:
                stems[stem] = 0
            _save(result, i, img, stem, method, out, lm)
            bar.update(1)
    bar.close()
    return failures


def _parse_settings(items: list[str]) -> dict[str, Any]:
    """``["n_masks=500", "lr=0.05", "eps=1e-6"]`` -> typed constructor options."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ShapCAMError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set n_masks=500)")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
        options[key.replace("-", "_")] = value
    return options


def method_settings(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["rise.n_masks=2000"]`` -> ``{"rise": {"n_masks": 2000}}`` for the chosen methods."""
    per_method: dict[str, dict[str, Any]] = {}
    for key, value in _parse_settings(items).items():
        method, sep, option = key.partition(".")
        if not sep or method not in methods:
            raise ShapCAMError(f"--set {key}: use METHOD.KEY=VALUE with METHOD one of "
                               f"{', '.join(methods)}")
        per_method.setdefault(method, {})[option] = value
    return per_method


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: Annotated[str, typer.Option(help="torchvision classifier name.")] = "mobilenet_v2",
    weights: Annotated[str, typer.Option(
        help="Weight enum name (DEFAULT, IMAGENET1K_V1), a state-dict path, or 'random'.")
    ] = "DEFAULT",
    layer: Annotated[str | None, typer.Option(help="Target layer (default per model).")] = None,
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
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = (
        "cuda" if torch.cuda.is_available() else "cpu"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/explain"),
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="Method option KEY=VALUE, repeatable (e.g. --set n_masks=500 for rise, "
        "--set iterations=100 for mask, --set batch_size=32 for scorecam).")] = None,
) -> None:
    """Explain images: writes `STEM.METHOD.png` (overlay) and `STEM.METHOD.npz`."""
    try:
        lm = load_model(model, weights, target_layer=layer, device=device)
        options: dict[str, Any] = {}
        if method == "shapcam":
            options = {"permutations": permutations, "antithetic": antithetic, "block": block,
                       "value": value, "baseline": baseline, "batch_size": batch_size,
                       "seed": seed}
        options.update(_parse_settings(settings or []))
        failures = run_explain(images, lm, method, options, target, out, seed=seed)
    except ShapCAMError as exc:
        _fail(exc)
    for path, why in failures:
        typer.secho(f"skipped {path}: {why}", fg=typer.colors.YELLOW, err=True)
    done = len(images) - len(failures)
    typer.echo(f"wrote {done} explanation(s) to {out}")
    if failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Option(help="sample, imagenet or voc.")] = "sample",
    root: Annotated[Path | None, typer.Option(
        help="Dataset folder (sample: where to assemble it; default ~/.cache/shapcam).")] = None,
    split: Annotated[str, typer.Option(help="VOC split file (test, val, trainval).")] = "test",
    model: Annotated[str, typer.Option()] = "mobilenet_v2",
    weights: Annotated[str, typer.Option()] = "IMAGENET1K_V1",
    layer: Annotated[str | None, typer.Option()] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = ",".join(
        ["mask", "rise", "gradcam", "gradcampp", "scorecam", "shapcam"]),
    n_images: Annotated[int | None, typer.Option(
        help="Deterministic random sample of N images (the paper: 2000).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling and Shap-CAM seed.")] = 0,
    protocol: Annotated[str, typer.Option(help="scorecam (paper) or gradcampp.")] = "scorecam",
    target: Annotated[str, typer.Option(help="predicted (paper) or label.")] = "predicted",
    causal: Annotated[bool, typer.Option(
        help="Also compute deletion/insertion AUC (2 x 225 forwards per image and method with "
             "the paper preset).")
    ] = True,
    batch_images: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    preset: Annotated[str, typer.Option(
        help="paper (the paper's settings) or quick (about 7x cheaper, for a first look); "
             "--set overrides it.")] = "paper",
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="METHOD.KEY=VALUE, repeatable (e.g. rise.n_masks=2000).")] = None,
    device: Annotated[str, typer.Option()] = "cuda" if torch.cuda.is_available() else "cpu",
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write the table and per-image rows as JSON.")] = None,
) -> None:
    """Evaluate methods with the paper's protocols and print its table (methods as columns)."""
    import json

    from .data import open_dataset, sample_records
    from .evaluate import evaluate_records, format_table, rows_as_dicts, summary_table
    from .metrics import VARIANTS

    try:
        if protocol not in VARIANTS:
            raise ShapCAMError(f"unknown protocol {protocol!r}; use one of {', '.join(VARIANTS)}")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        per_method, step = resolve_preset(preset, names, method_settings(settings or [], names))
        if dataset == "sample":
            from .weights import install_offline_weights

            try:
                install_offline_weights()
            except RuntimeError as exc:
                raise ShapCAMError(str(exc)) from exc
        records = sample_records(open_dataset(dataset, root, split), n_images, seed)
        lm = load_model(model, weights, target_layer=layer, device=device)
        bar = tqdm(total=len(records), desc="evaluate", unit="img")
        rows = evaluate_records(lm, records, names, protocol=protocol, target=target,
                                method_options=per_method, batch_images=batch_images,
                                causal=causal, causal_step=step, seed=seed,
                                progress=bar.update)
        bar.close()
    except ShapCAMError as exc:
        _fail(exc)
    table = summary_table(rows, names)
    done = min(table["images"].values()) if names else 0
    caption = (f"{dataset} ({done} images, seed {seed}), {model} ({weights}), protocol "
               f"`{protocol}`, target: {target} class; Proportion over "
               f"{max(table['proportion_images'].values(), default=0)} images passing the "
               "localisation filter (one box of the class, < 50% of the image)")
    typer.echo(format_table(table, caption))
    failed = {r.image_id: r.error for r in rows if r.error}
    for image_id, why in failed.items():
        typer.secho(f"failed {image_id}: {why}", fg=typer.colors.YELLOW, err=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"caption": caption, "table": table,
                                         "rows": rows_as_dicts(rows)}, indent=1))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    permutations: Annotated[int, typer.Option("--permutations", "-k")] = DEFAULT_PERMUTATIONS,
    device: Annotated[str, typer.Option()] = "cuda" if torch.cuda.is_available() else "cpu",
) -> None:
    """Explain the bundled sample photos with the real MobileNetV2 (offline)."""
    from .samples import sample_paths
    from .weights import install_offline_weights

    try:
        install_offline_weights()
    except RuntimeError as exc:
        _fail(exc)
    explain(sample_paths(), model="mobilenet_v2", weights="IMAGENET1K_V1", layer=None,
            method="shapcam", permutations=permutations, antithetic=False, block=None,
            value="probability", baseline="zero", target=None, seed=0, batch_size=1024,
            device=device, out=out, settings=[])


@app.command()
def setup() -> None:
    """Put the offline MobileNetV2 checkpoint where torchvision finds it (sha256 checked)."""
    from .weights import install_offline_weights

    try:
        typer.echo(f"MobileNetV2 ImageNet weights ready at {install_offline_weights()}")
    except RuntimeError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry point alias
    app(sys.argv[1:])
