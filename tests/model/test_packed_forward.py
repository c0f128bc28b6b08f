"""Packed rows (position ids restart per document, document-causal mask) give each document exactly
what it gets alone: logits, LM loss and the MTP loss (no MTP target crosses a document)."""

from __future__ import annotations

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.data import pack_pretraining

CFG = CompassConfig.from_preset("tiny", vocab_size=264, max_seq_len=32, aux_loss_coef=0.0, z_loss_coef=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CompassForCausalLM(CFG.replace(dtype="float32")).double().eval()


def test_packed_equals_separate(model):
    torch.manual_seed(1)
    docs = [torch.randint(0, 259, (n,)).tolist() for n in (7, 11, 5)]          # one row of 23 + padding
    b = pack_pretraining(docs, seq_len=32, pad_id=256)
    assert b.input_ids.shape[0] == 1
    out = model(b.input_ids, b.labels, position_ids=b.position_ids, attention_mask=b.attention_mask())
    o = 0
    lm_sum, lm_n, mtp_sum, mtp_n = 0.0, 0, 0.0, 0
    for d in docs:
        ids = torch.tensor([d])
        labels = torch.tensor([d[1:] + [-100]])
        alone = model(ids, labels)
        torch.testing.assert_close(out.logits[:, o:o + len(d)], alone.logits, rtol=1e-9, atol=1e-9)
        lm_sum += alone.losses["lm"].item() * (len(d) - 1)
        lm_n += len(d) - 1
        mtp_sum += alone.losses["mtp"].item() * (len(d) - 2)
        mtp_n += len(d) - 2
        o += len(d)
    assert out.losses["lm"].item() == pytest.approx(lm_sum / lm_n, rel=1e-6)  # the CE is fp32
    assert out.losses["mtp"].item() == pytest.approx(mtp_sum / mtp_n, rel=1e-6)  # the CE is fp32


def test_position_ids_out_of_range(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 40]]))
