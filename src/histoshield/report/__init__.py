"""Study reports: tables, figures, report.md and a self-contained report.html from results.json."""

from histoshield.report.render import build_report, load_results

__all__ = ["build_report", "load_results"]
