"""Defenses against backdoors: server-side aggregation rules (one module each) and the FLIP defense.

Aggregation rules are pure numpy functions of the update matrix U (one row per client, local - global)
returning an `AggregationOutcome` (`common`); `updates` turns state dicts into those rows and holds the
server's update rule. One module per rule:

- `krum`: Krum / Multi-Krum (Blanchard et al., NeurIPS 2017);
- `bulyan`: Bulyan (El Mhamdi et al., ICML 2018);
- `median`, `trimmed_mean`: coordinate-wise median and trimmed mean (Yin et al., ICML 2018);
- `clipping`: norm clipping and weak DP (Sun et al. 2019);
- `rfa`: geometric median (Pillutla et al., IEEE TSP 2022);
- `foolsgold`: FoolsGold (Fung et al., RAID 2020);
- `rlr`: robust learning rate (Ozdayi et al., AAAI 2021);
- `fltrust`: FLTrust (Cao et al., NDSS 2021) and its root dataset;
- `flame`: FLAME (Nguyen et al., USENIX Security 2022).

`flip` is the client-side FLIP defense (Zhang et al., ICLR 2023): trigger inversion, hardening, the
per-client trigger cache and pair schedule. Not to be confused with the FLIP label-only *attack* in
`flip_fl.attacks.flip_labels`. The Flower strategies that apply the rules are in the top-level
`strategies` package; the FLIP client is `clients.FlipDefenseClient`.
"""
