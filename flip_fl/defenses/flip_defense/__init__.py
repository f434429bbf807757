"""The FLIP defense (Zhang et al., ICLR 2023), run by benign clients (`clients.FlipDefenseClient`).

- `inversion`: batched Neural-Cleanse-style trigger inversion from the global model;
- `hardening`: stamping inverted triggers on batches whose labels stay the true ones;
- `cache`: `TriggerCache`, a partition's trigger sizes and triggers, kept across rounds;
- `round`: `FlipRound`, what one client round's inversions and hardening steps share;
- `official`, `fast`: the two schedules (`flip_defense.schedule`): the official code's per-batch schedule, and one
  budgeted batched inversion per round whose triggers harden every batch.

Server side, FLIP adds low-confidence rejection at evaluation (`defense.threshold`, `flip_fl.evaluation`).
"""
