import pytest
from search_synth import make_specs


@pytest.fixture
def specs():
    return make_specs()
