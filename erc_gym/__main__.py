"""``python -m erc_gym`` is the ``erc-gym`` command."""

from erc_gym.cli import main

main()
