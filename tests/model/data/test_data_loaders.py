"""JSONL loaders: good files load completely; every bad record names the file and line."""

import json

import pytest

from compass_model.data import loaders as L


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


def test_good_files_load(tmp_path):
    p = _write(tmp_path, [json.dumps({"text": "Halo 🔥 สวัสดี", "id": 1}), "", json.dumps({"text": "x"})])
    recs = L.load_text_jsonl(p)
    assert [r.text for r in recs] == ["Halo 🔥 สวัสดี", "x"]
    assert recs[1].source == f"{p}:3"
    p = _write(tmp_path, [json.dumps({"prompt": "a", "response": "b", "domain": "general"})], "s.jsonl")
    assert L.load_sft_jsonl(p)[0] == L.SFTRecord("a", "b", "general", f"{p}:1")
    p = _write(tmp_path, [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})], "p.jsonl")
    assert L.load_preference_jsonl(p)[0].rejected == "c"


def test_write_read_round_trip(tmp_path):
    rows = [{"text": "Giày đen size 42 ₫"}, {"text": "รองเท้า"}]
    L.write_jsonl(tmp_path / "w.jsonl", rows)
    assert [r.text for r in L.load_text_jsonl(tmp_path / "w.jsonl")] == [r["text"] for r in rows]


GOOD_SFT = json.dumps({"prompt": "a", "response": "b", "domain": "ecommerce"})


@pytest.mark.parametrize("loader,bad,msg", [
    (L.load_text_jsonl, "{not json", "invalid JSON"),
    (L.load_text_jsonl, "[1, 2]", "expected a JSON object"),
    (L.load_text_jsonl, json.dumps({"txt": "a"}), "missing field 'text'"),
    (L.load_text_jsonl, json.dumps({"text": 3}), "must be a string"),
    (L.load_text_jsonl, json.dumps({"text": "  "}), "is empty"),
    (L.load_text_jsonl, b"\xff\xfe", "not valid UTF-8"),
    (L.load_sft_jsonl, json.dumps({"prompt": "a", "response": "b"}), "missing field 'domain'"),
    (L.load_sft_jsonl, json.dumps({"prompt": "a", "response": "b", "domain": "shop"}), "must be one of"),
    (L.load_preference_jsonl, json.dumps({"prompt": "a", "chosen": "b"}), "missing field 'rejected'"),
    (L.load_preference_jsonl, json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}), "identical"),
])
def test_bad_record_names_file_and_line(tmp_path, loader, bad, msg):
    good = {L.load_text_jsonl: json.dumps({"text": "ok"}), L.load_sft_jsonl: GOOD_SFT,
            L.load_preference_jsonl: json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})}[loader]
    p = _write(tmp_path, [good, "", good, bad, good])
    with pytest.raises(L.DataError, match=msg) as e:
        loader(p)
    assert str(e.value).startswith(f"{p}:4:")


def test_missing_file(tmp_path):
    with pytest.raises(L.DataError, match="no such file"):
        L.load_text_jsonl(tmp_path / "nope.jsonl")


def test_generated_tasks_through_loader_and_packing(tmp_path):
    """Tasks -> SFT JSONL -> loader -> byte tokens -> packed rows whose response labels decode to the gold."""
    from compass_model.data import (
        ByteTokenizer,
        check,
        make_tasks,
        pack_sft,
        prompt_weight_for,
    )

    tasks = make_tasks(10, seed=0, n_items=3)
    L.write_jsonl(tmp_path / "sft.jsonl", [t.to_sft() for t in tasks])
    recs = L.load_sft_jsonl(tmp_path / "sft.jsonl")
    tok = ByteTokenizer()
    samples = [(tok.encode(r.prompt), tok.encode(r.response), prompt_weight_for(r.domain)) for r in recs]
    b = pack_sft(samples, seq_len=1024, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    for r in range(b.input_ids.shape[0]):
        for d in b.doc_ids[r].unique().tolist():
            if d == 0:
                continue
            sel = (b.doc_ids[r] == d) & b.response_mask[r]
            text = tok.decode(b.labels[r][sel].tolist())
            assert any(check(t, text) for t in tasks)
