"""The K-fold study of the external memory (`benchmarks/memory_study.py` is its command line).

- `variants`: the memory settings studied, by name, and the bounds;
- `statistics`: per-pass statistics, computed once per study run;
- `filling`: a fold's memory written from its training passes;
- `strength`: the fitted and confidence-following strengths;
- `predictor`: the ridge predictor of the correction (the predictability bound);
- `folds`: one variant through the folds, and the best-of-epochs analysis;
- `report`: study.csv, study.json and the console table.
"""
