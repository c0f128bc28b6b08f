"""Byte tokenizer round trips and packing masks (document ids, positions, SFT mixed-loss weights)."""


import pytest
import torch

from compass_model.data import packing as P
from compass_model.data.corpus import CorpusConfig, generate_corpus
from compass_model.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from compass_model.losses import IGNORE_INDEX, mixed_loss_mask

TEXTS = ["Giày thể thao nữ — giá 125.000₫ 🔥", "รองเท้าผ้าใบ ราคา ฿1,290 ✨", "Sepatu murah Rp 99.000 😍",
         "Tênis feminino R$ 89,90 👟", "🇮🇩🇹🇭🇻🇳 ẩm ướt ỹ ố ặ", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_byte_tokenizer_corpus_round_trip_and_edges():
    tok = load_tokenizer(None)
    assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
    for d in generate_corpus(CorpusConfig(seed=0, n_docs=200)):
        assert tok.decode(tok.encode(d["text"])) == d["text"]
    assert tok.decode(tok.encode("🔥")[:-1]) == "\ufffd"          # cut mid-emoji: replaced, no raise
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    t = tokenizers.Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "halo": 2, "[UNK]": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<pad>", "</s>"])
    t.save(str(tmp_path / "tok.json"))
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.encode("halo", eos=True) == [2, 1] and tok.pad_id == 0 and tok.decode([2, 1]) == "halo"


def test_hf_tokenizer_missing_package_or_file(tmp_path):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tokenizers"):
            HFTokenizer(tmp_path / "tok.json")
    else:
        with pytest.raises(FileNotFoundError, match="tok.json"):
            HFTokenizer(tmp_path / "tok.json")


def test_pack_pretraining_labels_positions_docs():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]     # the 7-token doc is cut at seq_len 5
    b = P.pack_pretraining(docs, seq_len=5, pad_id=0)
    # first fit in order: [1,2,3 | 4,5], [6..10], [11,12 | 13 | pad pad]
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 0, 0]]
    assert b.labels.tolist() == [[2, 3, -100, 5, -100], [7, 8, 9, 10, -100], [12, -100, -100, -100, -100]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    assert b.doc_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [1, 1, 2, 0, 0]]
    assert torch.equal(b.loss_mask() > 0, b.labels != IGNORE_INDEX)
    # every non-pad token appears exactly once: nothing dropped
    assert sorted(b.input_ids[b.doc_ids > 0].tolist()) == list(range(1, 14))


def test_document_causal_mask():
    doc = torch.tensor([[1, 1, 2, 2, 0]])
    m = P.document_causal_mask(doc)[0]
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
                        dtype=torch.bool)
    assert torch.equal(m, want)
    # usable by SDPA: a masked-out document cannot change another document's output
    q = torch.randn(1, 1, 5, 8)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m)
    q2 = q.clone()
    q2[..., :2, :] = torch.randn(2, 8)
    out2 = torch.nn.functional.scaled_dot_product_attention(q2, q2, q2, attn_mask=m)
    assert torch.isfinite(out).all() and torch.allclose(out[..., 2:4, :], out2[..., 2:4, :])


def test_pack_sft_masks_and_mixed_loss():
    BOS, EOS, PAD = 257, 258, 256
    samples = [([10, 11], [20, 21, 22], 1.0),   # e-commerce: full-sequence loss
               ([12, 13, 14], [23], 0.0)]       # general: answer-only loss
    b = P.pack_sft(samples, seq_len=16, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert b.input_ids.shape == (1, 16)
    row = b.input_ids[0].tolist()
    assert row[:13] == [BOS, 10, 11, 20, 21, 22, EOS, BOS, 12, 13, 14, 23, EOS] and set(row[13:]) == {PAD}
    # by prediction position: labels[i] = row[i + 1] inside a sample
    lab = b.labels[0].tolist()
    assert lab[:13] == [10, 11, 20, 21, 22, EOS, -100, 12, 13, 14, 23, EOS, -100] and set(lab[13:]) == {-100}
    pm, rm = b.prompt_mask[0].tolist(), b.response_mask[0].tolist()
    assert [i for i, x in enumerate(pm) if x] == [0, 1, 7, 8, 9]         # predicting 10, 11 and 12, 13, 14
    assert [i for i, x in enumerate(rm) if x] == [2, 3, 4, 5, 10, 11]    # 20, 21, 22, EOS and 23, EOS
    m = b.loss_mask()[0].tolist()
    assert m[:13] == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0] and sum(m[13:]) == 0
    assert torch.equal(b.loss_mask(), mixed_loss_mask(b.prompt_mask, b.response_mask, b.prompt_weight))
    assert b.position_ids[0, :13].tolist() == list(range(7)) + list(range(6))


def test_pack_sft_with_tokenizer_and_errors():
    tok = ByteTokenizer()
    p, r = tok.encode("Harga? ฿1,290 -10%"), tok.encode("Answer: 1161.00 THB")
    b = P.pack_sft([(p, r, P.prompt_weight_for("general"))] * 3, seq_len=64, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, eos_id=tok.eos_id)
    assert b.input_ids.shape[0] == 3                       # 41 tokens each: two do not fit in 64
    resp = b.labels[b.response_mask]
    assert tok.decode(resp.tolist()) == "Answer: 1161.00 THB" * 3
    assert b.loss_mask()[b.prompt_mask].sum() == 0
    with pytest.raises(ValueError, match="SFT sample 1 is .* > seq_len 8"):
        P.pack_sft([([1], [2], 1.0), ([1] * 10, [2], 1.0)], seq_len=8, pad_id=0, bos_id=None, eos_id=3)
    with pytest.raises(ValueError, match="empty response"):
        P.pack_sft([([1], [], 1.0)], seq_len=8, pad_id=0, bos_id=None, eos_id=3)
    with pytest.raises(ValueError, match="domain"):
        P.prompt_weight_for("shop")
    with pytest.raises(ValueError, match="document 0 is empty"):
        P.pack_pretraining([[]], seq_len=4, pad_id=0)
    assert P.pack_pretraining([], seq_len=4, pad_id=0).input_ids.shape == (0, 4)
