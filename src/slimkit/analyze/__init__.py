"""Analysis: profile (params, MACs, bytes), hardware profiles, roofline, latency, sensitivity.

The package is also the verb: ``sk.analyze(model, x, hw="this")`` runs
:func:`slimkit.analyze.api.analyze` (imported on first call, so this package stays cheap).
"""

from slimkit.core.verbs import make_callable

make_callable(__name__, "slimkit.analyze.api:analyze")
