"""What each training stage reads: deterministic micro-batches as a function of (seed, stage, step).

Batches are drawn afresh for every step from a seeded RNG keyed by the step, so a resumed run sees
exactly the batches an uninterrupted one would, with no data cursor to save.

Sources per stage kind (``StageConfig.data``):
  general        generated corpus, mostly general text, some commerce (SEA languages + English)
  ecommerce      generated corpus, mostly commerce, plus task texts (prompt + answer as plain text)
  reasoning      price tasks with worked reasoning, plus commerce corpus
  long_context   long catalogues (``retrieve`` with many items) at the stage's context, plus corpus
  sft            generated tasks (e-commerce: full-sequence loss) + general instructions (answer-only)
A ``--data FILE`` replaces the generated source: ``{"text"}`` records for pretraining stages,
``{"prompt","response","domain"}`` for SFT, ``{"prompt","chosen","rejected"}`` for align; ``--data
STAGE=FILE`` gives one stage its own file (``data_files_for``). ``check_stage_data`` reads and
checks every stage's file before the first step, so a bad file fails the run at once, not hours in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from compass_model.data import (
    LANGS,
    CorpusConfig,
    PackedBatch,
    generate_corpus,
    load_preference_jsonl,
    load_sft_jsonl,
    load_text_jsonl,
    make_tasks,
    pack_pretraining,
    pack_sft,
    prompt_weight_for,
)
from compass_model.data.corpus import GENERAL
from compass_model.data.passkey import curriculum_contexts, make_passkey_tasks, passkey_task

PRETRAIN_KINDS = ("general", "ecommerce", "reasoning", "long_context")
SFT_KIND = "sft"
# Task-seed offsets keep the splits apart: training draws tasks from seed + 1, alignment prompts from
# seed + 2, evaluation from seed + 1000 (compass_model.train.evaluate).
TRAIN_TASK_SEED, ALIGN_TASK_SEED, EVAL_TASK_SEED = 1, 2, 1000


def catalogue_items(context: int) -> int:
    """Catalogue lines of a ``retrieve`` task that fits ``context`` byte tokens (~90 bytes a line
    with the prompt, answer and specials; measured on the generator's widest scripts)."""
    return max(1, (context - 110) // 90)


def general_instructions(n: int, seed: int) -> list:
    """General (non-commerce) SFT samples: repeat or count words of a sentence. Answer-only loss."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lang = LANGS[i % len(LANGS)]
        text = " ".join(rng.sample(GENERAL[lang], k=rng.randint(1, 2)))
        if rng.random() < 0.5:
            out.append({"prompt": f"Repeat exactly:\n{text}\n", "response": text, "domain": "general"})
        else:
            out.append({"prompt": f"How many words?\n{text}\n", "response": str(len(text.split())),
                        "domain": "general"})
    return out


def _task_text(t) -> str:
    return f"{t.prompt}\n{t.answer}"


@dataclass
class StageData:
    """Micro-batches for one stage. ``rows``: rows per micro-batch; ``seq_len``: row length."""
    kind: str
    tokenizer: object
    seq_len: int
    rows: int
    seed: int = 0
    data_file: str | None = None
    pool_size: int = 2000
    retrieval_rows: int = 0         # rows of the extra voucher-code micro-batch (0: none)
    retrieval_seq_len: int = 0      # its row length (0: seq_len); codes at the curriculum lengths up to
                                    # seq_len, or, for longer rows, at those above seq_len
    retrieval_every: int = 1        # on steps where step % retrieval_every == 0

    def __post_init__(self):
        if self.kind not in (*PRETRAIN_KINDS, SFT_KIND):
            raise ValueError(f"stage data kind must be one of {(*PRETRAIN_KINDS, SFT_KIND)}, got {self.kind!r}")
        if self.rows < 1 or self.seq_len < 2:
            raise ValueError(f"need rows >= 1 and seq_len >= 2, got {self.rows}, {self.seq_len}")
        tok = self.tokenizer
        if self.kind == SFT_KIND:
            records = (load_sft_jsonl(self.data_file) if self.data_file else self._generated_sft())
            self.samples = []
            for r in records:
                get = (lambda k, r=r: getattr(r, k)) if not isinstance(r, dict) else r.get
                self.samples.append((tok.encode(get("prompt")), tok.encode(get("response")),
                                     prompt_weight_for(get("domain"))))
            fits = lambda smp: len(smp[0]) + len(smp[1]) + 2 <= self.seq_len  # noqa: E731
            if not self.data_file:          # generated: draw again rather than cut (a few per thousand)
                self.samples = [smp for smp in self.samples if fits(smp)]
            too_long = [i for i, smp in enumerate(self.samples) if not fits(smp)]
            if too_long:
                raise ValueError(f"{len(too_long)} SFT samples exceed seq_len {self.seq_len} (first: #{too_long[0]}); "
                                 "raise the stage's seq_len")
        else:
            texts = ([r.text for r in load_text_jsonl(self.data_file)] if self.data_file else self._generated_text())
            self.docs = [tok.encode(t, bos=True, eos=True) for t in texts]
        if not (self.samples if self.kind == SFT_KIND else self.docs):
            raise ValueError(f"stage {self.kind!r} has no data")
        self.retrieval_seq_len = self.retrieval_seq_len or self.seq_len
        if self.retrieval_rows < 0 or self.retrieval_every < 1 or (self.retrieval_rows and self.retrieval_seq_len < 64):
            raise ValueError(f"need retrieval_rows >= 0, retrieval_every >= 1 and retrieval_seq_len >= 64 (or 0); "
                             f"got {self.retrieval_rows}, {self.retrieval_every}, {self.retrieval_seq_len}")
        lengths = curriculum_contexts(self.retrieval_seq_len) if self.retrieval_rows else []
        self.retrieval_lengths = [c for c in lengths if c > self.seq_len] or lengths

    # ---- generated sources ----------------------------------------------------------------------

    def _generated_text(self) -> list:
        n, s = self.pool_size, self.seed
        if self.kind == "general":
            return [d["text"] for d in generate_corpus(CorpusConfig(seed=s, n_docs=n, general_fraction=0.7))]
        corpus = [d["text"] for d in generate_corpus(CorpusConfig(seed=s, n_docs=n // 2, general_fraction=0.1))]
        if self.kind == "ecommerce":
            tasks = make_tasks(n // 2, seed=s + TRAIN_TASK_SEED, families=("extract", "classify", "relevance"))
        elif self.kind == "reasoning":
            tasks = make_tasks(n // 2, seed=s + TRAIN_TASK_SEED, families=("price",))
            # retrieval up to the base context: the skill the long-context stages carry to 4x
            return corpus + [_task_text(t) for t in tasks] + self._passkey_texts(n)
        else:  # long_context: one voucher code hidden in catalogues up to the stage's context
            return corpus[: n // 4] + self._passkey_texts(n)
        return corpus + [_task_text(t) for t in tasks]

    def _passkey_texts(self, n: int) -> list:
        """``n`` retrieval documents read as ``prompt + answer`` (the prompt ends with the needle's
        words), in equal numbers at each ``curriculum_contexts(seq_len)`` length."""
        return [t.prompt + t.answer for t in self._passkey_tasks(n)]

    def _passkey_tasks(self, n: int) -> list:
        lengths = curriculum_contexts(self.seq_len)
        return [t for c in lengths for t in make_passkey_tasks(n // len(lengths), self.seed + TRAIN_TASK_SEED, c)]

    def _generated_sft(self) -> list:
        n, s = self.pool_size, self.seed
        tasks = make_tasks(n, seed=s + TRAIN_TASK_SEED, n_items=catalogue_items(self.seq_len))
        keys = self._passkey_tasks(n // 4)
        return [t.to_sft() for t in tasks + keys] + general_instructions(n // 4, s + TRAIN_TASK_SEED)

    # ---- batches --------------------------------------------------------------------------------

    def micro_batches(self, step: int, n_micro: int) -> list:
        """The ``n_micro`` micro-batches (``PackedBatch`` of ``rows`` x ``seq_len``) of optimizer step
        ``step``; a pure function of (seed, kind, step)."""
        rng = random.Random(f"{self.seed}/{self.kind}/{step}")
        out = [self._one(rng) for _ in range(n_micro)]
        if self.retrieval_rows and step % self.retrieval_every == 0:
            out.append(self._retrieval_batch(rng))
        return out

    def _retrieval_batch(self, rng: random.Random) -> PackedBatch:
        """``retrieval_rows`` rows of voucher-code tasks drawn afresh from the step's ``rng`` at
        ``retrieval_lengths`` (a fresh catalogue and code each time: a fixed pool lets the small model
        memorise codes instead of searching), as the stage reads text: SFT samples with the loss on the
        whole sequence, or pretraining documents."""
        tok = self.tokenizer

        def draw():
            t = passkey_task(rng, LANGS[rng.randrange(len(LANGS))], rng.choice(self.retrieval_lengths))
            if self.kind == SFT_KIND:
                return tok.encode(t.prompt), tok.encode(t.answer), prompt_weight_for("ecommerce")
            return tok.encode(t.prompt + t.answer, bos=True, eos=True)
        return self._packed(draw, self.retrieval_rows, self.retrieval_seq_len)

    def _one(self, rng: random.Random) -> PackedBatch:
        pool = self.samples if self.kind == SFT_KIND else self.docs
        return self._packed(lambda: pool[rng.randrange(len(pool))], self.rows, self.seq_len)

    def _packed(self, draw, rows: int, seq_len: int) -> PackedBatch:
        """``rows`` x ``seq_len`` filled with ``draw()``s (SFT samples ``(prompt, response, weight)``
        or documents, by the stage's kind), packed first-fit."""
        tok, sft = self.tokenizer, self.kind == SFT_KIND
        picked, used = [], 0
        while used < rows * seq_len:
            picked.append(draw())
            used += (len(picked[-1][0]) + len(picked[-1][1]) + 2) if sft else len(picked[-1])
        b = (pack_sft(picked, seq_len, tok.pad_id, tok.bos_id, tok.eos_id) if sft
             else pack_pretraining(picked, seq_len, tok.pad_id))
        return _take_rows(b, rows)


def _take_rows(b: PackedBatch, rows: int) -> PackedBatch:
    """The first ``rows`` rows (first-fit fills rows in order; later rows are the overflow)."""
    return PackedBatch(*(t[:rows] for t in (b.input_ids, b.labels, b.position_ids, b.doc_ids, b.prompt_mask,
                                            b.response_mask, b.prompt_weight)))


def data_files_for(data, stage_names: list) -> dict:
    """``{stage name: file}`` from ``data``: None (generated data everywhere), one path (every stage
    of the run), a ``{stage: path}`` dict, or a list of CLI values ``"FILE"`` / ``"STAGE=FILE"`` (a
    bare path covers the stages not named)."""
    from compass_model.train.stages import STAGES
    if data is None:
        return {}
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, (list, tuple)):
        items = []
        for v in data:
            stage, sep, path = str(v).partition("=")
            items.append((stage, path) if sep and stage in STAGES else (None, str(v)))
    else:
        items = [(None, data)]
    bare = [p for k, p in items if k is None]
    if len(bare) > 1:
        raise ValueError(f"--data: more than one file for all stages ({bare}); name the stage: --data STAGE=FILE")
    out = {}
    for stage, path in items:
        if stage is None:
            continue
        if stage not in stage_names:
            raise ValueError(f"--data {stage}={path}: this run does not train stage {stage!r} "
                             f"(--stages {','.join(stage_names)})")
        if stage in out:
            raise ValueError(f"--data: two files for stage {stage!r} ({out[stage]}, {path})")
        out[stage] = path
    for name in stage_names:
        if bare:
            out.setdefault(name, bare[0])
    return out


def stage_data(stage, tokenizer, seed: int = 0, data_file: str | None = None) -> StageData:
    """The ``StageData`` a ``StageConfig`` trains on (the generated retrieval micro-batch only without a
    data file: a user's own data is not mixed with generated tasks)."""
    rows = stage.retrieval_rows if data_file is None else 0
    return StageData(stage.data_kind, tokenizer, stage.seq_len, stage.rows, seed=seed, data_file=data_file,
                     retrieval_rows=rows, retrieval_seq_len=stage.retrieval_len, retrieval_every=stage.retrieval_every)


def check_stage_data(stages: list, tokenizer, files: dict, seed: int = 0) -> dict:
    """Load and check each stage's own file (``files``: ``data_files_for``) in the format its kind
    reads, before any training. Returns ``{stage name: StageData}`` for the pretraining / SFT
    stages with a file (the trainer reuses them); a bad file raises ``ValueError`` naming the stage."""
    out = {}
    for st in stages:
        path = files.get(st.name)
        if path is None:
            continue
        hint = ("; give each stage its own file with --data STAGE=FILE"
                if len(set(files.values())) == 1 and len(files) > 1 else "")
        try:
            if st.name == "align":
                n = len(load_preference_jsonl(path))
                if n <= st.eval_pairs:
                    raise ValueError(f"{path}: {n} records, need more than eval_pairs = {st.eval_pairs}")
            else:
                out[st.name] = stage_data(st, tokenizer, seed, data_file=path)
        except ValueError as e:
            raise ValueError(f"stage {st.name}: data file {path} is not usable: {e}{hint}") from e
    return out
