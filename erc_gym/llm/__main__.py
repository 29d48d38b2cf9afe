"""``python -m erc_gym.llm`` is ``erc-gym llm``."""

from erc_gym.llm.cli import main

main()
