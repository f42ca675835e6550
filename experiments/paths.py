"""The checkout the experiments run in (they are never installed)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
