"""Plumbing below every wing: checkpoints (orbax), CSV files, sharding, distributed flags."""
