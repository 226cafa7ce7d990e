"""Run configs shipped with the package (the demo) and what every config field means.

`demo.py` is the embedded default, so that an installed wheel runs the demo without the
repository's `experiments/` folder (`rare-jax-run --workdir=runs/demo`); the research configs
in `experiments/configs/` build on it. `fields.MEANINGS` gives each field's one-line meaning
(`rare-jax-run --help` prints them).
"""
