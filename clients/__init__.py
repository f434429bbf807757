"""Client classes selectable from a config by dotted path (e.g. `clients.BenignClient`)."""

from clients.benign import BenignClient
from clients.flip_defense import FlipDefenseClient
from clients.flip_labels import FlipLabelClient
from clients.neurotoxin import NeurotoxinClient
from clients.poison import ModelReplacementClient, NormBoundedClient, PoisonClient

__all__ = ["BenignClient", "FlipDefenseClient", "FlipLabelClient", "PoisonClient", "ModelReplacementClient",
           "NormBoundedClient", "NeurotoxinClient"]
