"""Voucher-code retrieval tasks: they fit their context, hold exactly one needle, the prompt asks
with the needle's words, and the checker takes the code only."""

from __future__ import annotations

import pytest

from compass_model.data import ByteTokenizer
from compass_model.data.passkey import NEEDLE, check_passkey, make_passkey_tasks

TOK = ByteTokenizer()


@pytest.mark.parametrize("context", [128, 256, 1024])
def test_tasks_fit_and_hold_one_needle(context):
    tasks = make_passkey_tasks(14, seed=3, context=context)
    depths = []
    for t in tasks:
        n = len(TOK.encode(t.prompt)) + len(TOK.encode(t.answer)) + 2       # [BOS] prompt answer [EOS]
        assert context - 90 < n <= context                                  # filled, never over
        assert t.prompt.count(NEEDLE) == 2 and t.prompt.endswith(NEEDLE)   # the needle, then the question
        assert NEEDLE + t.answer + "\n" in t.prompt and t.answer.isdigit()
        assert check_passkey(t, t.answer) and check_passkey(t, " " + t.answer + "\nmore")
        depths.append(t.meta["depth"])
    assert min(depths) < 0.3 and max(depths) > 0.7                          # needles all over the context
    assert len({t.lang for t in tasks}) == 7


def test_checker_rejects_other_codes_and_is_deterministic():
    t = make_passkey_tasks(1, seed=0, context=256)[0]
    assert not check_passkey(t, t.answer + "7") and not check_passkey(t, "") and not check_passkey(t, "x" + t.answer)
    assert make_passkey_tasks(3, seed=0, context=256) == make_passkey_tasks(3, seed=0, context=256)
    with pytest.raises(ValueError, match="context"):
        make_passkey_tasks(1, seed=0, context=32)
