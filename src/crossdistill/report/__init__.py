"""Reports: HTML pages with plots, result tables and the resolved config."""

from .html import write_report
from .tables import aggregate, format_table, pm

__all__ = ["aggregate", "format_table", "pm", "write_report"]
