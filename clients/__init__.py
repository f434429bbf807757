"""Client classes selectable from a config by dotted path (e.g. `clients.BenignClient`)."""

from clients.benign import BenignClient
from clients.poison import ModelReplacementClient, NormBoundedClient, PoisonClient

__all__ = ["BenignClient", "PoisonClient", "ModelReplacementClient", "NormBoundedClient"]
