"""A model of a run: its name (torchvision, ``timm:NAME`` or your factory's import path),
weights, target layer and input size, parsed from ``--models`` items."""

from __future__ import annotations

from dataclasses import dataclass

from shapcam.errors import ShapCAMError
from shapcam.zoo.factory import is_import_path
from shapcam.zoo.preprocessing import check_input_size
from shapcam.zoo.timm_models import PREFIX as TIMM_PREFIX

DEFAULT_MODEL = "mobilenet_v2"
#: The ImageNet weights that ship offline (``shapcam setup``): the default everywhere.
DEFAULT_WEIGHTS = "IMAGENET1K_V1"


@dataclass(frozen=True)
class ModelSpec:
    """A model to explain: torchvision name, ``timm:NAME`` or the import path of your factory
    (``package.module:function``), weights (enum name, ``pretrained`` for timm, ``factory``
    for a factory, state-dict path or ``random``), target layer (None: the model's default)
    and input size (None: what the model declares, else 224)."""

    name: str = DEFAULT_MODEL
    weights: str = DEFAULT_WEIGHTS
    layer: str | None = None
    input_size: int | None = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            check_input_size(self.input_size, f"--input-size of {self.name}")

    @classmethod
    def parse(cls, text: str, input_size: int | None = None) -> ModelSpec:
        """``NAME`` or ``NAME:WEIGHTS`` (e.g. ``vgg16:/w/vgg16.pth``,
        ``timm:resnet50.a1_in1k:random``, ``mypkg.nets:build:/w/best.pt``)."""
        text = text.strip()
        prefix = TIMM_PREFIX if text.startswith(TIMM_PREFIX) else ""
        name, _, weights = text.removeprefix(prefix).partition(":")
        own, _, own_weights = weights.partition(":")
        if not prefix and own and is_import_path(f"{name}:{own}") and not _torchvision(name):
            name, weights = f"{name}:{own}", own_weights or FACTORY_WEIGHTS
        name = prefix + name if name else ""
        if not name:
            raise ShapCAMError(f"--models: empty model name in {text!r}; use NAME or "
                               "NAME:WEIGHTS, comma-separated")
        return cls(name, weights or DEFAULT_WEIGHTS, input_size=input_size)


#: The weights spec of a factory's model as it built it.
FACTORY_WEIGHTS = "factory"


def _torchvision(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)
