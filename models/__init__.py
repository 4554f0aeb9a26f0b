"""EMNet's networks and their use.

enhancer.py (the plain network) and fast/ (how it runs fast); memory.py, query.py, refiner.py and
calibration.py (the external memory); loading.py (checkpoints); inference.py, evaluate.py and
frozen_pass.py (enhancing, scoring, cached passes); baselines.py. The scripts' flags
are the top-level options.py's.
"""
