"""The local subnet (`bitmind-localnet`): a chain, miners, a validator and the generator as real processes on
127.0.0.1. `neurons/localnet.py` wires these modules together:

    errors.py    LocalnetError, the one error type
    flags.py     the command's flags and the demo's defaults
    miners.py    the --miners list -> one spec per miner process
    network.py   the run: register, seed the caches, start the children in order (each with the command an
                 operator would type), wait, watch, stop
    report.py    what the terminal and --summary show: the board with its per-kind lines
"""
