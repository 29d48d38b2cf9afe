"""Optional integrations of erc_gym with other training frameworks (TRL, verl)."""
