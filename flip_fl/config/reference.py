"""The config reference page (docs/CONFIG.md), generated from the schema."""

from __future__ import annotations

from flip_fl.config.schema import document
from flip_fl.config.sections import Config


def config_reference_markdown() -> str:
    """The config reference page (docs/CONFIG.md), generated from the schema."""
    lines = ["# Configuration reference", "",
             "Generated from `flip_fl/config/sections.py` and each defense's `Params` (`strategies/<name>.py`) by "
             "`python sim.py config-docs`; do not edit by hand.",
             "Every key is optional; the default is used when it is absent. Unknown keys are errors.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for path, tp, default, doc in document(Config):
        if tp in ("section", "sections"):
            lines.append(f"| **{path}** | {tp} | | {doc.replace('|', '&#124;')} |")
        else:
            lines.append(f"| `{path}` | {tp.replace('|', '&#124;')} | `{default}` | {doc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"
