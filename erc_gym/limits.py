"""Limits on seeds and grid sizes, shared by the trainers, the experiment grid and the CLI.

One neutral module, so that a trainer checks its settings without importing the command line and
the two seed ranges keep distinct names.
"""

from __future__ import annotations

__all__ = ["MAX_GRID_SEED", "MAX_GRID_SEEDS", "MAX_SEED"]

#: Largest seed of one training run: numpy's and torch's generators (and SB3's
#: ``set_random_seed``) take seeds below ``2**32``.
MAX_SEED = 2**32 - 1
#: Largest seed an experiment grid may list: the runner derives other seeds from it (an sb3 run's
#: evaluation env uses ``seed + 10000`` plus the env index), which must stay below
#: :data:`MAX_SEED`.
MAX_GRID_SEED = 2**31 - 1
#: Most seeds a grid may ask for by count (a typo such as ``--seeds 30000000`` must not start
#: expanding millions of runs).
MAX_GRID_SEEDS = 1000
