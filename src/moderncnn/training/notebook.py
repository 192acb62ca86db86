"""Training inside Jupyter: live curves redrawn in place after every evaluation, like d2l's Animator."""
from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from ..report.plots import draw_curves
from .callback import Callback

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["LiveCurves", "in_notebook"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a terminal IPython is not)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


class LiveCurves(Callback):
    """One figure of loss and accuracy, shown when the first evaluation ends and redrawn in place (one
    ``display_id``) after each later one: the epochs between evaluations do not redraw it."""

    def __init__(self):
        self.figure = Figure(figsize=(10, 3.8))
        self.handle = None

    def on_epoch_end(self, run: "TrainSetup", state, record):
        if not record.scored:
            return
        from IPython.display import Image, display
        draw_curves(self.figure, state.history, f"{run.cfg.model} on {run.cfg.dataset}",
                    run.cfg.label_smoothing or 0.0, state.best_epoch)
        image = Image(data=figure_png(self.figure), format="png")
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)
