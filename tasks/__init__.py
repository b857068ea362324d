"""Units of pipeline work that flows run as Prefect tasks, as plain functions over
:mod:`shapcam` and :mod:`storage`: the run configuration (:mod:`.config`), the explain
pipeline (:mod:`.pipeline`), reports (:mod:`.reports`) and the training tasks
(:mod:`.training`). They pass paths, configs and small summaries, never tensors."""
