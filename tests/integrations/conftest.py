"""transformers integration tests: skipped without transformers; single-threaded (tiny shapes)."""

import pytest

pytest.importorskip("transformers", minversion="5")

from helpers import one_thread  # noqa: E402,F401  (an autouse fixture)
