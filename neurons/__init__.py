"""Processes: miner, validator, generator and the local subnet; wiring only."""
