"""Operational visibility for the long-running processes, one module per job:

- `heartbeat`: the JSON status file (and `python -m bitmind.monitoring check FILE`, in `__main__`);
- `metrics`: Prometheus metrics in a per-process registry and the endpoint serving them;
- `watchdog`: exits a hung process so pm2 restarts it;
- `wandb_run`: optional Weights & Biases logging;
- `monitor`: all of them built from a neuron's flags (`Monitor`, `add_monitoring_args`).
"""
