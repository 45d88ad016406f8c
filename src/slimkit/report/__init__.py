"""Reports: what a verb did (``sk.report(result)``, the package is callable for it) and the
self-contained HTML page of an artifact (``sk.report_html(dir)``, ``slimkit report DIR``).

``sk.report(model)`` stays the verb's report (``slimkit.core.verbs.report``); this package only
adds the HTML, so importing it (which binds ``slimkit.report`` to the package) keeps that call
working. Nothing heavy is imported here: matplotlib and jinja2 load when a page is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimkit.core.verbs import make_callable

make_callable(__name__, "slimkit.core.verbs:report")

if TYPE_CHECKING:  # pragma: no cover
    from slimkit.report.html import report_html, try_report

__all__ = ["report_html", "try_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from slimkit.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'slimkit.report' has no attribute {name!r}")
