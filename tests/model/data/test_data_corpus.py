"""Corpus generator: determinism, coverage of languages / currencies / document kinds, noise."""

import re

import pytest

from compass_model.data import corpus as C


def test_same_seed_same_corpus_other_seed_differs():
    a = C.generate_corpus(C.CorpusConfig(seed=7, n_docs=100))
    b = C.generate_corpus(C.CorpusConfig(seed=7, n_docs=100))
    c = C.generate_corpus(C.CorpusConfig(seed=8, n_docs=100))
    assert a == b
    assert a != c


def test_every_language_currency_and_kind_appears():
    docs = C.generate_corpus(C.CorpusConfig(seed=0, n_docs=300))
    assert {d["lang"] for d in docs} == set(C.LANGS)
    assert {d["kind"] for d in docs} == set(C.DOC_KINDS)
    text = "\n".join(d["text"] for d in docs if d["kind"] == "listing")
    for code, cur in C.CURRENCIES.items():
        assert cur.symbol in text, f"{code} ({cur.symbol}) never appears in listings"
    assert {d["domain"] for d in docs} == {"ecommerce", "general"}


def test_scripts_and_noise_present():
    docs = C.generate_corpus(C.CorpusConfig(seed=1, n_docs=400, noise=0.5))
    text = "\n".join(d["text"] for d in docs)
    assert re.search("[\u0e00-\u0e7f]", text), "no Thai script"
    assert re.search("[ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ]", text), "no Vietnamese diacritics"
    assert any(e in text for e in C.EMOJI), "no emoji"
    # inconsistent units: the same families written both as ml and L (or g and kg)
    assert re.search(r"\d(ml|ML| ml)\b", text) and re.search(r"\d(\.\d+)?(L|l| liter)\b", text)


def test_zero_noise_is_clean():
    docs = C.generate_corpus(C.CorpusConfig(seed=2, n_docs=100, noise=0.0))
    # reviews keep their star rating (⭐ is a rating there, not noise)
    assert not any(e in d["text"] for d in docs if d["kind"] != "review" for e in C.EMOJI)


@pytest.mark.parametrize("code,amount,want", [("IDR", 125000, "Rp 125.000"), ("THB", 1290, "฿1,290.00"),
                                              ("VND", 1250000, "1.250.000₫"), ("MYR", 49.9, "RM49.90"),
                                              ("PHP", 1299, "₱1,299.00"), ("BRL", 89.9, "R$ 89,90"),
                                              ("SGD", 12.5, "S$12.50")])
def test_format_amount(code, amount, want):
    assert C.format_amount(amount, code) == want


def test_config_validation():
    with pytest.raises(ValueError, match="langs"):
        C.CorpusConfig(langs=("xx",))
    with pytest.raises(ValueError, match="noise"):
        C.CorpusConfig(noise=1.5)
    with pytest.raises(ValueError, match="n_docs"):
        C.CorpusConfig(n_docs=-1)
    assert C.LANG_CURRENCY.keys() == set(C.LANGS)
