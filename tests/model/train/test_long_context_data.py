"""What the long-context stages and SFT train on matches what ``long_context_eval`` asks: the 4x
training samples read like the 4x eval prompts (same layout, same tokens up to the answer, the answer
inside the loss, nothing cut), at every curriculum length; the YaRN scaling of the trained model is
the one evaluated; SFT's extra long micro-batch keeps retrieval above the base context."""

from __future__ import annotations

import re

import pytest

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.data import ByteTokenizer
from compass_model.data.passkey import (
    CODE_DIGITS,
    NEEDLE,
    curriculum_contexts,
    make_passkey_tasks,
)
from compass_model.train.data import StageData, stage_data
from compass_model.train.evaluate import _prompt_ids
from compass_model.train.pipeline import extend_context
from compass_model.train.stages import StageConfig, demo_stages
from compass_model.train.state import load_model, save_checkpoint
from compass_model.train.trainer import make_optimizer

TOK = ByteTokenizer()
NEEDLE_IDS = TOK.encode(NEEDLE)


def _passkey_docs(data):
    head = [TOK.bos_id] + TOK.encode("Catalogue:\n")
    return [d for d in data.docs if d[:len(head)] == head]


def _find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def test_curriculum_contexts_halve_down_to_the_shortest():
    assert curriculum_contexts(1024) == [64, 128, 256, 512, 1024]
    assert curriculum_contexts(256) == [64, 128, 256] and curriculum_contexts(100) == [100]
    with pytest.raises(ValueError, match="context must be >= 64"):
        curriculum_contexts(32)


def test_4x_training_samples_have_the_eval_layout_and_fit_uncut():
    data = StageData("long_context", TOK, 1024, 2, seed=0, pool_size=100)
    docs = _passkey_docs(data)
    by_len = {}
    for d in docs:
        assert len(d) <= 1024 and d[-1] == TOK.eos_id               # whole: never cut by the packer
        q = _find(d, NEEDLE_IDS)
        assert len(q) == 2                                           # the needle, then the question
        ans = d[q[1] + len(NEEDLE_IDS):-1]
        assert len(ans) == CODE_DIGITS and d[q[0] + len(NEEDLE_IDS):q[0] + len(NEEDLE_IDS) + CODE_DIGITS] == ans
        by_len.setdefault(min(c for c in curriculum_contexts(1024) if len(d) <= c), []).append(d)
    assert set(by_len) == set(curriculum_contexts(1024))             # every curriculum length, 4x included
    # an eval prompt at 4x is exactly a training sample up to the answer: [BOS] prompt
    ev = make_passkey_tasks(4, seed=1000, context=1024)
    for t in ev:
        ids = _prompt_ids(TOK, t.prompt)
        assert 1024 - 90 < len(ids) + CODE_DIGITS + 1 <= 1024         # room for the code within the context
        assert ids[-len(NEEDLE_IDS):] == NEEDLE_IDS and len(_find(ids, NEEDLE_IDS)) == 2
    train_task = make_passkey_tasks(1, seed=1, context=1024)[0]
    assert TOK.encode(train_task.prompt + train_task.answer, bos=True, eos=True)[:-1 - CODE_DIGITS] == \
        _prompt_ids(TOK, train_task.prompt)


def test_the_loss_covers_the_answer_digits_in_4x_batches():
    data = StageData("long_context", TOK, 1024, 2, seed=0, pool_size=100)
    seen = 0
    for step in range(3):
        b = data.micro_batches(step, 1)[0]
        mask = b.loss_mask()
        for r in range(b.input_ids.shape[0]):
            row = b.input_ids[r].tolist()
            for q in _find(row, NEEDLE_IDS)[1::2]:                   # the question of each sample
                end = q + len(NEEDLE_IDS) - 1                        # predicts the first digit
                labels = b.labels[r, end:end + CODE_DIGITS].tolist()
                assert all(chr(x).isdigit() for x in labels) and bool((mask[r, end:end + CODE_DIGITS] == 1).all())
                seen += 1
    assert seen >= 2


def test_eval_uses_the_scaling_the_4x_stage_trained(tmp_path):
    """The checkpoint after the two YaRN phases carries factor 4 over 256 and a 1024 context, and that
    is what evaluation loads (``state.load_model``), the model the 4x stage trained."""
    m = CompassForCausalLM(CompassConfig.from_preset("tiny"))
    extend_context(m, 2.0)
    extend_context(m, 2.0)
    save_checkpoint(tmp_path, m, make_optimizer(m, 1e-3, 0.0), 1, done=True)
    c = load_model(tmp_path / "step-000001").config
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len, c.max_seq_len) == ("yarn", 4.0, 256, 1024)


def test_sft_retrieval_micro_batch_holds_longer_retrieval_every_nth_step():
    st = StageConfig("sft", steps=4, rows=2, seq_len=256, retrieval_rows=1, retrieval_seq_len=1024, retrieval_every=2)
    data = stage_data(st, TOK)
    b0, b1 = data.micro_batches(0, 1), data.micro_batches(1, 1)
    assert len(b0) == 2 and len(b1) == 1 and b0[0].input_ids.shape == (2, 256)
    long = b0[1]
    assert long.input_ids.shape == (1, 1024)
    row = long.input_ids[0].tolist()
    assert len(_find(row, NEEDLE_IDS)) >= 2 and int((long.doc_ids[0].bincount()[1:]).max()) > 256
    assert bool(long.response_mask.any())                            # the code is in the loss
    assert float(long.prompt_weight[long.prompt_mask].min()) == 1.0  # and the catalogue: the whole sequence
    again = data.micro_batches(0, 1)                                 # deterministic (resume)
    assert all(bool((a.input_ids == b.input_ids).all()) for a, b in zip(again, b0))
    assert data.retrieval_lengths == [512, 1024]                     # the base context's own samples cover <= 256
    # SFT's own passkey samples cover the curriculum up to its seq_len
    keys = [p for p, _, _ in data.samples if TOK.decode(p).startswith("Catalogue:")]
    assert min(len(p) for p in keys) < 64 and max(len(p) for p in keys) > 128


def test_pretraining_retrieval_rows_are_fresh_curriculum_documents_every_step():
    """reasoning with ``retrieval_rows``: every step adds that many rows of voucher-code documents at
    64/128/256 tokens, drawn afresh (no two steps share a code), deterministic per step."""
    st = StageConfig("reasoning", steps=4, rows=2, seq_len=256, retrieval_rows=3)
    data = stage_data(st, TOK)
    assert data.retrieval_lengths == [64, 128, 256]
    codes = []
    for step in range(4):
        micro = data.micro_batches(step, 1)
        assert len(micro) == 2 and micro[1].input_ids.shape == (3, 256)
        text = "".join(TOK.decode([t for t in r if t < 256]) for r in micro[1].input_ids.tolist())
        found = re.findall(r"Voucher code: (\d{4})", text)
        assert len(found) >= 6                                        # needle + question, several docs a row
        codes.append(set(found))
        assert bool((micro[1].input_ids == data.micro_batches(step, 1)[1].input_ids).all())
    assert all(not (a & b) for i, a in enumerate(codes) for b in codes[i + 1:])
    assert len(StageData("reasoning", TOK, 256, 2, pool_size=20).micro_batches(0, 1)) == 1   # default: off


def test_retrieval_rows_config_errors_name_the_field():
    with pytest.raises(ValueError, match="retrieval_rows needs a pretraining or sft stage"):
        StageConfig("align", steps=1, retrieval_rows=1)
    with pytest.raises(ValueError, match="retrieval_seq_len must be 0"):
        StageConfig("sft", steps=1, seq_len=256, retrieval_rows=1, retrieval_seq_len=32)
    with pytest.raises(ValueError, match="retrieval_every must be an int >= 1"):
        StageConfig("sft", steps=1, retrieval_every=0)
    with pytest.raises(ValueError, match="retrieval_every >= 1"):
        StageData("general", TOK, 64, 2, pool_size=20, retrieval_rows=1, retrieval_every=0)
    stages = {s.name: s for s in demo_stages()}
    assert stages["sft"].retrieval_rows >= 1 and stages["sft"].retrieval_len == 1024   # SFT keeps 4x retrieval
    assert stages["reasoning"].retrieval_rows >= 1 and stages["reasoning"].retrieval_len == 256   # the search forms


def test_sft_without_yarn_phases_or_with_a_file_trains_no_long_row(tmp_path, caplog):
    """general -> sft at a 256 context: the long row cannot fit and is dropped (logged), not an error;
    a user's SFT file gets no generated retrieval row."""
    from compass_model.train.pipeline import run_pipeline
    stages = [StageConfig("general", steps=1, rows=1, seq_len=64),
              StageConfig("sft", steps=1, rows=1, seq_len=256, retrieval_rows=1, retrieval_seq_len=1024)]
    with caplog.at_level("INFO"):
        run_pipeline(tmp_path / "o", CompassConfig.from_preset("tiny"), stages, TOK, progress=False, evaluate=False)
    assert "no retrieval rows" in caplog.text
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "Hi", "response": "Hello", "domain": "general"}\n' * 3)
    assert stage_data(stages[1], TOK, data_file=str(f)).micro_batches(0, 1)[1:] == []
