"""Reading models and run directories: model summaries, plots and report.md (trains nothing)."""
from .summary import ModelSummary, SummaryRow, summary

__all__ = ["ModelSummary", "SummaryRow", "summary"]
