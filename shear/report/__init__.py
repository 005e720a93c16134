"""The HTML report of a pruning run: data gathered from the passes, rendered as one offline page.

Example:
    >>> small = shear.compile(model, passes, example_inputs=x, report="out/report.html")  # doctest: +SKIP
    >>> shear.report.write_html(small.shear_report.details, "again.html")              # doctest: +SKIP
"""

from shear.report.collect import ReportData, WidthRow, collect, layer_widths, pick_graph
from shear.report.html import SECTIONS, render, write_html

__all__ = [
    "ReportData",
    "WidthRow",
    "collect",
    "layer_widths",
    "pick_graph",
    "SECTIONS",
    "render",
    "write_html",
]
