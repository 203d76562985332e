import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# tests/models.py and tests/reference.py are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
