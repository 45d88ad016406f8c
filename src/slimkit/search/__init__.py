"""Constraint-driven compression: constraints, the planner, and the multi-objective search.

::

    import slimkit as sk
    res = sk.compress("zoo:digits_cnn", sk.Constraints(latency_ms=0.05, max_drop=0.01),
                      out="small/", time_budget_s=300)

``slimkit compress MODEL --max-size 5MB --max-latency 10ms --max-drop 1% --out DIR`` is the same
call on the command line. Optuna loads only when a search runs.
"""

from slimkit.search.compress import CompressResult, compress
from slimkit.search.constraints import Constraints

__all__ = ["CompressResult", "Constraints", "compress"]
