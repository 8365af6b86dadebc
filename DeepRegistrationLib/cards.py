"""Model-card wording shared by ``deepreg methods`` and the Slicer module's method panel.

No torch here: the Slicer module reads model cards before its dependencies are installed.
"""
from __future__ import annotations

from typing import Dict, Optional


def lineage_steps_text(training: Optional[Dict]) -> Optional[str]:
    """'11350 steps over 3 runs, 4.6 h of training' for a model card's ``training`` section when the weights
    continue earlier runs (the trainer's lineage totals; 'at least' when an earlier run's record
    is incomplete); None for a single run or a card without totals. One wording for
    ``deepreg methods`` and the Slicer module's method panel."""
    training = training or {}
    total, runs = training.get("total_iterations"), training.get("runs")
    if not isinstance(total, int) or not isinstance(runs, int) or runs < 2:
        return None
    text = f"{total} steps over {runs} runs"
    if isinstance(training.get("total_wall_time_seconds"), (int, float)):
        text += f", {training['total_wall_time_seconds'] / 3600:.1f} h of training"
    if not training.get("lineage_complete", True):
        text += " (at least: an earlier run's record is incomplete)"
    return text
