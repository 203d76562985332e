"""TensorFlow, imported without its start-up lines on stderr.

Importing TensorFlow 2.21 writes "oneDNN custom operations are on ..." through absl before absl's
logging is initialised (plus a line saying so), twice, whatever ``TF_CPP_MIN_LOG_LEVEL`` says.
``TF_ENABLE_ONEDNN_OPTS=0`` would silence it only by turning oneDNN's kernels off, which would slow
the peers the benchmark compares with. So the import runs with file descriptor 2 captured, and
every captured line but those is written back to stderr.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def import_tensorflow() -> None:
    """Import TensorFlow once, quietly; nothing happens if it is absent or already imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's later C++ log lines
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(noise in line for noise in NOISE)))
