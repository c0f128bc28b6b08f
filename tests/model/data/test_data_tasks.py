"""Generated tasks: determinism, coverage, and checkers that accept gold and reject corrupted answers."""

import json
import re

import pytest

from compass_model.data import tasks as T
from compass_model.data.corpus import LANGS


def test_deterministic_and_covering():
    a = T.make_tasks(70, seed=3)
    assert a == T.make_tasks(70, seed=3)
    assert a != T.make_tasks(70, seed=4)
    assert {(t.family, t.lang) for t in a} == {(f, x) for f in T.FAMILIES for x in LANGS}


def test_every_gold_answer_checks():
    tasks = T.make_tasks(1400, seed=0)
    bad = [t for t in tasks if not T.check(t, t.answer)]
    assert not bad, bad[:3]


def _corrupt_number(answer: str) -> str:
    """Shift the final answer by a couple of currency units."""
    v = T.parse_answer_number(answer)
    return re.sub(r"Answer:.*", f"Answer: {v + 2:.2f}", answer)


@pytest.mark.parametrize("family", T.FAMILIES)
def test_checkers_reject_corrupted(family):
    for t in T.make_tasks(70, seed=5, families=(family,)):
        assert T.check(t, t.answer)
        assert not T.check(t, "")
        if family == "extract":
            gold = json.loads(t.answer)
            for key, wrong in (("brand", "Acme"), ("color", "magenta"), ("size", "999 g")):
                assert not T.check(t, json.dumps({**gold, key: wrong})), key
            assert not T.check(t, json.dumps({k: v for k, v in gold.items() if k != "size"}))
            assert not T.check(t, t.answer[:-1])                     # broken JSON
        elif family in ("classify", "relevance"):
            labels = list(T.CATEGORIES) if family == "classify" else ["relevant", "irrelevant"]
            assert all(not T.check(t, x) for x in labels if x != t.answer)
        else:
            assert not T.check(t, _corrupt_number(t.answer))
            assert not T.check(t, t.answer.replace("Answer:", "Result:"))


def test_checkers_accept_equivalent_forms():
    ext = T.make_tasks(7, seed=1, families=("extract",))[0]
    gold = json.loads(ext.answer)
    assert T.check(ext, json.dumps({k: str(v).upper() if k != "size" else v for k, v in gold.items()}))
    assert T.canonical_size("0.5L") == T.canonical_size("500 ml") == "500 ml"
    assert T.canonical_size("EU42") == T.canonical_size("size 42") == "42 EU"
    assert T.canonical_size("lots") is None
    price = T.make_tasks(1, seed=2, families=("price",))[0]
    v = T.parse_answer_number(price.answer)
    assert T.check(price, f"some working\nAnswer: {v:,.2f}")                  # thousands commas are fine
    assert T.parse_answer_number("Answer: 1\nAnswer: 2") == 2.0               # the last answer counts


def test_retrieve_length_scales_and_answer_is_in_catalogue():
    short = T.make_tasks(7, seed=0, families=("retrieve",), n_items=10)
    long = T.make_tasks(7, seed=0, families=("retrieve",), n_items=40)
    assert all(len(lt.prompt) > 3 * len(st.prompt) for st, lt in zip(short, long))
    for t in long:
        pid = t.prompt.rsplit("Price of ", 1)[1].rstrip("?")
        assert sum(line.startswith(pid) for line in t.prompt.splitlines()) == 1


def test_price_reasoning_is_consistent():
    for t in T.make_tasks(200, seed=9, families=("price",)):
        assert "Answer:" in t.answer and "\n" in t.answer    # worked reasoning, then the answer line


def test_bad_arguments():
    with pytest.raises(ValueError, match="families"):
        T.make_tasks(1, families=("poetry",))
    with pytest.raises(ValueError, match="languages"):
        T.make_tasks(1, langs=("de",))
    with pytest.raises(ValueError, match="family"):
        T.check(T.Task("poetry", "en", "p", "a"), "a")
