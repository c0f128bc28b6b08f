"""transformers integration tests run single-threaded (tiny shapes); each module skips itself
without transformers >= 5."""

from helpers import one_thread  # noqa: F401  (an autouse fixture)
