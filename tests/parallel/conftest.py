import sys
from pathlib import Path

# `launch` (torchrun helpers) and `worker.py` live next to these tests; with --import-mode=importlib the test
# directory is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).parent))
