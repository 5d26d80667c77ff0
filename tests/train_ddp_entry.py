"""torchrun entry of test_distributed's config-trainer test: every process runs `run_training(CONFIG.yaml)`."""
import importlib
import sys

from peftkit.train import run_training

if __name__ == "__main__":
    importlib.import_module("tests.train_models")  # registers the tiny models the config names
    run_training(sys.argv[1])
