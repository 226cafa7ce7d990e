"""The embedded default: the demo config shipped with the package (rare_jax/configs/demo.py).

    python -m rare_jax.run --config=experiments/configs/demo.py --workdir=runs/demo

It lives in the package so that an installed wheel runs the demo without this folder
(`rare-jax-run --workdir=runs/demo` uses it by default); the configs here import it from this
module as before (`from experiments.configs import demo`).
"""

from rare_jax.configs.demo import get_config

__all__ = ["get_config"]
