"""Test-wide settings: bittensor must not write to the home folder, and nothing may reach the network."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("READ_ONLY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
if "BITMIND_CACHE_DIR" not in os.environ:  # exported ONNX trunks: one folder per run, shared with child processes
    os.environ["BITMIND_CACHE_DIR"] = tempfile.mkdtemp(prefix="bitmind-cache-")
    atexit.register(shutil.rmtree, os.environ["BITMIND_CACHE_DIR"], ignore_errors=True)


import logging  # noqa: E402

import pytest  # noqa: E402

_OUR_LOGGERS = ("bitmind", "base_miner", "validator", "neurons")


@pytest.fixture(autouse=True)
def _our_loggers_enabled():
    """bittensor's logging machine sets every logger that exists at some of its state changes to CRITICAL
    (`before_enable_default`); in one pytest process that silences our loggers for the tests that follow, and
    their `caplog` assertions would depend on test order. Reset them before each test."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0].split("-")[0] in _OUR_LOGGERS:
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
    yield
