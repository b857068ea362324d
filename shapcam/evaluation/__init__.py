"""Evaluating maps: which classes to explain (:mod:`.targets`), the paper's metrics
(:mod:`.metrics`), the field's metrics checked against Quantus (:mod:`.field_metrics`) and the
evaluation loop with its tables (:mod:`.evaluate`)."""
