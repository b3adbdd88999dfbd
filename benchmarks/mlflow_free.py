"""Bundle overrides that leave MLflow out of a training or evaluation config, for the benchmarks.

A GPU machine may lack an MLflow install (or a writable store); the benchmarks then run the bundle's
own engines, data and handlers with only the MLflow parts taken out: the run handler of the
trainer and the evaluator, the tracking store's check at start, the config copy and the run summary.
"""

from __future__ import annotations


def mlflow_free_overrides(parser) -> dict:
    """``{id: value}`` for a ``monai.bundle.ConfigParser`` of train.json (and more): the handler lists
    and expression lists without their MLflow entries."""
    out = {}
    for path in ("train#handlers", "validate#handlers"):
        if path in parser:
            out[path] = [h for h in parser[path] if "mlflow" not in str(h).lower()]
    for path, drop in (("training", ("tracking.", "reporting.")), ("initialize", ("@tracking_store",))):
        if path in parser:
            out[path] = [x for x in parser[path] if not any(d in str(x) for d in drop)]
    return out
