"""`bitmind-arena`: benchmark detectors on datasets — metrics, robustness sweeps, leaderboard and plots."""
