"""Job sources and reporters: where jobs come from and where their updates go."""
