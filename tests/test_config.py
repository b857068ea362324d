"""The typed run configuration: one place for defaults and validation, the dict round trip of
Prefect parameters and store attributes, stores written before it, one ``--set`` syntax."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shapcam.errors import ShapCAMError
from tasks.config import (
    ALL_METHODS,
    DistillSpec,
    FinetuneSpec,
    ModelSpec,
    RunConfig,
    parse_settings,
)

#: The ``config`` attribute exactly as stores of the previous version wrote it.
OLD_CONFIG = {"dataset": "sample", "root": "/data/sample", "split": "test", "n_images": 2,
              "seed": 0, "shard_size": 2,
              "models": [{"name": "mobilenet_v2", "weights": "random", "layer": None}],
              "methods": ["gradcam"], "method_options": {}, "protocol": "scorecam",
              "causal": False, "causal_step": 224, "preset": "paper", "device": "cpu",
              "torch_threads": 1}


def test_round_trip_through_json():
    config = RunConfig.build(methods="rise,shapcam", models="mobilenet_v2,resnet18:random",
                             preset="quick", settings=["shapcam.permutations=64"],
                             n_images=20, shard_size=4, threads=2)
    assert config.models == (ModelSpec("mobilenet_v2", "IMAGENET1K_V1"),
                             ModelSpec("resnet18", "random"))
    assert config.method_options == {"rise": {"n_masks": 500},
                                     "shapcam": {"permutations": 64}}
    assert config.causal_step == 1792 and config.causal_pixels == 1792
    d = json.loads(json.dumps(config.to_dict()))
    assert RunConfig.from_dict(d) == config and RunConfig.from_dict(d).to_dict() == d
    assert config.hash() == RunConfig.from_dict(d).hash()
    assert config.replace(causal=False).causal_pixels is None


def test_defaults_are_stated_once():
    config = RunConfig()
    assert config.methods == ALL_METHODS == ("mask", "rise", "gradcam", "gradcampp",
                                             "scorecam", "shapcam")
    assert config.models == (ModelSpec("mobilenet_v2", "IMAGENET1K_V1", None),)
    assert (config.protocol, config.device, config.threads) == ("scorecam", "cpu", None)


def test_old_configs_are_read_with_todays_names():
    config = RunConfig.from_dict(OLD_CONFIG)
    assert config.threads == 1 and "torch_threads" not in config.to_dict()
    # keys added since: their defaults are what those stores were made with
    added = {"pg_class": "target", "precision": "fp32", "metrics": [], "target": "predicted"}
    assert config.map_options() == {k: OLD_CONFIG.get(k, added.get(k)) for k in RunConfig.MAP_KEYS}
    assert config.pg_class == "target"  # stores made before --pg-class used the target's box
    spec = DistillSpec.from_dict({"dataset": "digits", "orders": 8})
    assert spec.permutations == 8
    with pytest.raises(ShapCAMError, match="unknown key.*colour"):
        RunConfig.from_dict({**OLD_CONFIG, "colour": "red"})


@pytest.mark.parametrize(("fields", "message"), [
    ({"protocol": "paper"}, "unknown protocol 'paper'"),
    ({"shard_size": 0}, "--shard-size must be >= 1"),
    ({"dataset": "coco"}, "unknown dataset 'coco'"),
    ({"methods": ("gradcam", "lime")}, "unknown method 'lime'"),
    ({"methods": ("gradcam",), "method_options": {"gradcam": {"n_masks": 3}}},
     "bad option for gradcam"),
    ({"n_images": 0}, "--n-images must be >= 1"),
    ({"pg_class": "box"}, "unknown --pg-class 'box'; use one of target, label"),
    ({"precision": "fp8"}, "unknown precision 'fp8'; use one of fp32, bf16, fp16"),
    ({"batch_images": 0}, "--batch-images must be >= 1"),
    ({"decode_threads": -1}, "--decode-threads must be >= 0"),
    ({"forward_batch": 0}, "--forward-batch must be >= 1"),
    ({"resources": {"GPU": 0}}, "--task-resources: GPU=0 is not NAME=AMOUNT"),
])
def test_validation_in_one_place(fields, message):
    with pytest.raises(ShapCAMError, match=message):
        RunConfig(**fields)


def test_specs_validate():
    with pytest.raises(ShapCAMError, match="--root is required for cifar10"):
        DistillSpec()
    with pytest.raises(ShapCAMError, match="unknown configuration 'xx'"):
        DistillSpec(dataset="digits", variants="ce,xx")
    spec = FinetuneSpec(root="/voc", epochs=5)
    assert FinetuneSpec.from_dict(spec.to_dict()) == spec


def test_one_set_syntax():
    got = parse_settings(["rise.n_masks=500", "shapcam.antithetic=true", "mask.lr=0.05",
                          "scorecam.max_channels=none"], ["rise", "shapcam", "mask", "scorecam"])
    assert got == {"rise": {"n_masks": 500}, "shapcam": {"antithetic": True},
                   "mask": {"lr": 0.05}, "scorecam": {"max_channels": None}}
    # The short form only where the method is unambiguous.
    assert parse_settings(["n_masks=8"], ["rise"]) == {"rise": {"n_masks": 8}}
    with pytest.raises(ShapCAMError, match="--set n_masks: use METHOD.KEY=VALUE"):
        parse_settings(["n_masks=8"], ["rise", "gradcam"])
    with pytest.raises(ShapCAMError, match="--set expects METHOD.KEY=VALUE"):
        parse_settings(["oops"], ["rise"])
    with pytest.raises(ShapCAMError, match="bad option for rise.*'masks'.*n_masks=8000"):
        parse_settings(["rise.masks=8"], ["rise"])


def test_run_refuses_a_bad_config_in_one_line(tmp_path):
    from flows.cli import app

    res = CliRunner().invoke(app, ["run", "--store", str(tmp_path), "--methods", "gradcam",
                                   "--set", "rise.n_masks=4"])
    assert res.exit_code == 2 and "--set rise.n_masks" in res.output
    assert "Traceback" not in res.output and not any(tmp_path.iterdir())


def test_a_store_written_before_the_typed_config_opens_and_resumes(tmp_path):
    """A run whose stored config has the old key names resumes (nothing recomputed) and
    reports; its dashboard titles fall back to method names."""
    import zarr

    from dashboards import data
    from storage import Run
    from tasks.pipeline import aggregate, evaluate_shard, explain_shard, plan_run

    config = RunConfig.from_dict({**OLD_CONFIG, "root": str(tmp_path / "data")})
    run_dir = str(tmp_path / "run")
    plan = plan_run(run_dir, "old", config)
    for k, records in enumerate(plan["shards"]):
        explain_shard(run_dir, config, config.models[0], k, records)
        evaluate_shard(run_dir, config, config.models[0], k, records)
    group = zarr.open_group(f"{run_dir}/maps.zarr", mode="r+")
    group.attrs["config"] = {**OLD_CONFIG, "root": str(tmp_path / "data")}
    del group.attrs["method_titles"]  # not written by the old version
    stored = RunConfig.from_dict(dict(group.attrs["config"]))
    plan = plan_run(run_dir, "old", stored)  # the resume check accepts it
    assert all(explain_shard(run_dir, stored, stored.models[0], k, r)["skipped"]
               for k, r in enumerate(plan["shards"]))
    tables = aggregate(run_dir, stored)
    assert tables["mobilenet_v2"]["columns"] == ["Grad-CAM"]
    assert data.method_titles(Run(run_dir)) == {"gradcam": "gradcam"}
