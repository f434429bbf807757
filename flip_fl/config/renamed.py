"""Keys renamed in flip-fl 0.2: an old key is one line naming its new place (exit 2), for one release.

0.2 gave each word one meaning (`training.*` for local training, `roles.*` for client classes,
`flip_defense.*` for the FLIP defense, `flip_labels.*` for the FLIP label attack) and moved each defense's
parameters into its own section, `defense.<name>.*`.
"""

from __future__ import annotations

from typing import Any

from flip_fl.errors import ConfigError

RENAMED = {
    "client": "training",
    "clients": "roles",
    "clients.benign": "roles.benign",
    "attack.client": "roles.malicious",
    "flip": "flip_defense",
    "labels": "flip_labels",
    "defense.num_malicious": "defense.<name>.num_malicious (krum, multikrum, bulyan, rlr)",
    "defense.multikrum_select": "defense.multikrum.num_selected",
    "defense.bulyan_selection": "defense.bulyan.selection",
    "defense.trim_beta": "defense.trimmed_mean.beta",
    "defense.clip_norm": "defense.norm_clip.clip_norm or defense.weak_dp.clip_norm",
    "defense.noise_std": "defense.weak_dp.noise_std",
    "defense.rfa_iters": "defense.rfa.iters",
    "defense.foolsgold_features": "defense.foolsgold.features",
    "defense.foolsgold_confidence": "defense.foolsgold.confidence",
    "defense.rlr_threshold": "defense.rlr.threshold",
    "defense.root_size": "defense.fltrust.root_size",
    "defense.flame_lambda": "defense.flame.noise_lambda",
}
"""Old key path -> its new place."""


def check_renamed(raw: dict[str, Any]) -> None:
    """A ConfigError naming the first old key in a raw config and its new place (deepest key first)."""
    for old in sorted(RENAMED, key=lambda k: -k.count(".")):
        node: Any = raw
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"{old}: renamed to {RENAMED[old]} in flip-fl 0.2 (docs/CONFIG.md)")
