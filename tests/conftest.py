import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

import smlm_tfdiff as st  # noqa: E402


@pytest.fixture
def paper():
    return st.SimulationConfig.preset("paper")
