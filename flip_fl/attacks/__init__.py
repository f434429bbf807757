"""Backdoor attacks: what malicious clients do to their data, labels and updates.

- `triggers`: the trigger library (pixel pattern, DBA, blended, sinusoidal, Turner, fixed pixels) and
  `build_trigger`, the configured trigger shared by attackers and the server's ASR evaluation;
- `poisoning`: batch poisoning, model-replacement scaling and L2 projection of updates;
- `flip_labels`: the FLIP label-only attack (Jha, Hayase & Oh, NeurIPS 2023): experts, trajectory
  matching, label flips, user models and the stages an attacker runs (the resumable pipeline of
  `sim.py labels` is `flip_fl.experiments.labels_pipeline`). Not to be confused
  with the FLIP *defense* (Zhang et al., ICLR 2023) in `flip_fl.defenses.flip_defense`.

The client classes that use them are in the top-level `clients` package.
"""
