import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

DATA_DIR = Path(os.environ.get("HAWQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAVE_DATA = (DATA_DIR / "cifar10.npz").is_file()

needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"shared data not found at {DATA_DIR}")


@pytest.fixture
def data_dir() -> Path:
    if not HAVE_DATA:
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR
