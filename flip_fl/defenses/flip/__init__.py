"""The FLIP defense (Zhang et al., ICLR 2023), run by benign clients (`clients.FlipDefenseClient`).

- `inversion`: batched Neural-Cleanse-style trigger inversion from the global model;
- `hardening`: stamping inverted triggers on true-label batches, and `TriggerCache`, the per-client cache
  of trigger sizes and triggers with its (source, target) pair schedule.

Server side, FLIP adds low-confidence rejection at evaluation (`defense.threshold`, `flip_fl.evaluation`).
"""
