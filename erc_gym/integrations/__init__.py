"""Adapters that add Entropy Ratio Clipping to other training engines (optional extras).

* :mod:`erc_gym.integrations.trl` -- ``ERCGRPOConfig`` / ``ERCGRPOTrainer`` on TRL's
  ``GRPOTrainer`` (install with ``pip install "erc-gym[trl]"``).
* :mod:`erc_gym.integrations.verl` -- ERC policy losses registered as a verl plugin
  (``pip install "erc-gym[verl]"``).

Each adapter imports its engine only when it is itself imported; this package imports neither,
so ``import erc_gym.integrations`` is cheap and works without TRL or verl installed. Both
adapters call :func:`erc_gym.losses` pieces and :mod:`erc_gym.entropy`; see ``docs/scale_out.md``.
"""
