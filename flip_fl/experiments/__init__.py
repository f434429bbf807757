"""Running experiments and reporting them: the command line, one run, sweeps, result files, plots.

- `cli`: the `flip-fl` / `sim.py` command line;
- `run`: one simulation end to end (data, model, evaluator, strategy, federation, output files);
- `results`: a run's output directory (config, metrics.jsonl, summary, model);
- `grid`, `sweep`, `report`: sweep files, running their points, the comparison tables and plots;
- `plots`: PNG figures of a run and of a sweep.
"""
