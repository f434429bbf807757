"""flip-fl: a federated-learning backdoor attack-and-defense simulator on Flower.

Packages (see docs/ARCHITECTURE.md): `config` (schema, loading, validation), `data` (datasets and
partitions), `models`, `training` (the local SGD loop), `attacks` (triggers, poisoning, the FLIP label-only
attack), `defenses` (aggregation rules, the FLIP defense), `evaluation` (accuracy, ASR, detection),
`federation` (client contract, Flower apps, schedule, runtime), `experiments` (command line, runs, sweeps,
results). Client classes live in the top-level `clients` package, server strategies in `strategies`.
"""
