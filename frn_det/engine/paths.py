"""Where a source checkout keeps what the run logic refers to (configs, tools)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
TOOLS = os.path.join(REPO, "tools")
