"""The bundled photos: real photos that ship inside installed packages (scikit-image,
scikit-learn, matplotlib).

They are the input of ``shapcam demo``, the real-photo tests, and the source of the ``sample``
dataset (:mod:`shapcam.data.sample_dataset`). Boxes are
``(xmin, ymin, xmax, ymax)`` in pixels of the original photo, annotated by hand for this project.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BundledPhoto:
    name: str
    package: str  # importable package that ships the file
    relpath: str  # path inside that package
    description: str
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"sample photo {self.name!r} needs the package "
                                    f"{self.package!r}; pip install it")
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        if not path.is_file():
            raise FileNotFoundError(f"sample photo {self.name!r} not found at {path}")
        return path


BUNDLED_PHOTOS: tuple[BundledPhoto, ...] = (
    BundledPhoto("chelsea", "skimage", "data/chelsea.png", "a tabby cat's face",
                {"cat": (0, 0, 405, 300)}),
    BundledPhoto("coffee", "skimage", "data/coffee.png", "an espresso cup on a saucer",
                {"cup": (170, 15, 410, 310), "espresso": (75, 60, 480, 390)}),
    BundledPhoto("rocket", "skimage", "data/rocket.jpg", "a rocket on its launch pad"),
    BundledPhoto("astronaut", "skimage", "data/astronaut.png", "portrait of an astronaut"),
    BundledPhoto("motorcycle_left", "skimage", "data/motorcycle_left.png", "a motorcycle"),
    BundledPhoto("china", "sklearn", "datasets/images/china.jpg", "a Chinese temple"),
    BundledPhoto("flower", "sklearn", "datasets/images/flower.jpg", "a flower"),
    BundledPhoto("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                "portrait of Grace Hopper in uniform"),
)


def bundled_photo(name: str) -> BundledPhoto:
    for photo in BUNDLED_PHOTOS:
        if photo.name == name:
            return photo
    raise KeyError(f"no sample photo {name!r}; choose from "
                   f"{', '.join(p.name for p in BUNDLED_PHOTOS)}")


def bundled_photo_paths() -> list[Path]:
    return [p.path for p in BUNDLED_PHOTOS]
