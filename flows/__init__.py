"""The top layer: Prefect flows (:mod:`.explain_dataset`, :mod:`.scheduled`, :mod:`.training`),
their Prefect/Dask set-up (:mod:`.runtime`) and the ``shapcam`` command (:mod:`.cli`)."""
