"""The run's outcome for machines (``report.json``) and for people (``report.md``, PNG plots).

Torch-free on purpose: the report stage also runs on device machines (design.md section 1).
"""

from xpdeploy.report.markdown import render_markdown, write_markdown
from xpdeploy.report.plots import plot_latency
from xpdeploy.report.schema import (
    REPORT_SCHEMA_VERSION,
    build_report,
    validate_report,
    write_report_json,
)

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "build_report",
    "plot_latency",
    "render_markdown",
    "validate_report",
    "write_markdown",
    "write_report_json",
]
