"""A finished run in a notebook: :func:`show_run` displays its report (headline, settings, curves,
predictions, confusion matrix, worst-classified images)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..runs import load_run

__all__ = ["show_run"]


def show_run(path: Union[str, Path]) -> None:
    """Display run directory ``path``'s report.md and plots in the current Jupyter notebook."""
    from IPython.display import Image, Markdown, display
    run = load_run(path)
    report = run.path / "report.md"
    if not report.is_file():
        raise ValueError(f"{run.path}: no report.md (the run has not finished)")
    # report.md's image links are relative to the run directory: show those files directly instead.
    text = "\n".join(line for line in report.read_text().splitlines() if not line.startswith("!["))
    sections = text.split("\n## ")
    display(Markdown(sections[0]))
    for section in sections[1:]:
        title, _, rest = section.partition("\n")
        display(Markdown("## " + title))
        image = {"Curves": "curves.png", "Predictions": "predictions.png", "Confusion matrix": "confusion.png",
                 "Worst-classified test images": "top_losses.png"}.get(title)
        if image and (run.path / image).is_file():
            display(Image(filename=str(run.path / image)))
        if rest.strip():
            display(Markdown(rest))
