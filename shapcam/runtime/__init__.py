"""Runtime knobs: CPU allocator and batch sizes (:mod:`.cpu`), mixed precision and memory
layout (:mod:`.precision`), the cost model of a run (:mod:`.cost`) and the presets
(:mod:`.presets`)."""
