"""Retrieval on held-out synthetic documents: scoring against fakes whose accuracy is known,
then end to end through ``python -m eval task=retrieval`` on a tiny checkpoint."""

import pytest
import torch

from eval import retrieval

TASKS = {"passkey": {"min_filler_chars": 0, "max_filler_chars": 200},
         "mqar": {"min_filler_chars": 0, "max_filler_chars": 100, "kwargs": {"num_pairs": 6, "num_queries": 3}},
         "copy": {"min_filler_chars": 20, "max_filler_chars": 80}}


class LookAheadLM:
    """Predicts from the true next token: ``shift`` 0 is always right, 1 always wrong; with
    ``wrong_digits`` it is wrong exactly where the next token is a digit."""

    def __init__(self, tokenizer, shift=0, wrong_digits=False):
        self.tokenizer, self.shift, self.wrong_digits = tokenizer, shift, wrong_digits
        self.device, self.max_length = torch.device("cpu"), 10_000
        self.digits = {tokenizer.encode(str(d))[-1] for d in range(10)}

    def encode(self, text, bos=None):
        return [self.tokenizer.bos_id] + list(self.tokenizer.encode(text))

    def logits(self, x):
        nxt = torch.cat([x[:, 1:], x[:, -1:]], 1)
        tgt = (nxt + self.shift) % self.tokenizer.vocab_size
        if self.wrong_digits:
            is_digit = torch.tensor([[int(t) in self.digits for t in row] for row in nxt])
            tgt = torch.where(is_digit, (nxt + 1) % self.tokenizer.vocab_size, tgt)
        return torch.nn.functional.one_hot(tgt, self.tokenizer.vocab_size).float()


@pytest.fixture
def tok(tiny_lm):
    return tiny_lm.tokenizer


def test_scores_follow_the_predictions(tok):
    cfg = {"tasks": TASKS, "num_documents": 6, "seed": 3, "num_buckets": 2}
    right, _ = retrieval.run_retrieval(LookAheadLM(tok), cfg, progress=False)
    wrong, records = retrieval.run_retrieval(LookAheadLM(tok, shift=1), cfg, progress=False)
    for t in TASKS:
        assert right[t]["exact"] == right[t]["token_acc"] == right[t]["doc_exact"] == 1.0
        assert wrong[t]["exact"] == wrong[t]["token_acc"] == 0.0
        assert sum(b["documents"] for b in right[t]["by_length"]) == 6
    assert right["mqar"]["answers"] == 6 * 3 and right["passkey"]["answers"] == 6
    assert len(records) == 18 and {r["task"] for r in records} == set(TASKS)
    # wrong on digits only: passkey answers are all digits, MQAR and copy answers (words) have none;
    # with symbols="chars" MQAR values are digits again and copy sequences mix words and numbers
    digits, _ = retrieval.run_retrieval(LookAheadLM(tok, wrong_digits=True), cfg, progress=False)
    assert digits["passkey"]["token_acc"] == 0.0 and digits["mqar"]["exact"] == digits["copy"]["exact"] == 1.0
    chars = {t: {**c, "kwargs": {**c.get("kwargs", {}), "symbols": "chars"}} for t, c in TASKS.items() if t != "passkey"}
    digits, _ = retrieval.run_retrieval(LookAheadLM(tok, wrong_digits=True), {**cfg, "tasks": chars}, progress=False)
    assert digits["mqar"]["token_acc"] == 0.0
    assert 0.0 < digits["copy"]["token_acc"] < 1.0 and digits["copy"]["exact"] == 0.0
    md = retrieval.results_markdown(right)
    assert md.startswith("# Retrieval") and "## copy: by document length" in md


def test_labelled_variants_of_one_generator(tok):
    """A task entry may carry its own label (``task`` names the generator): the same generator twice,
    on words and on single characters, each scored under its label from documents of its own seed;
    an unlabelled entry draws exactly the documents it drew before labels existed."""
    cfg = {"num_documents": 4, "seed": 3, "tasks": {
        "copy": TASKS["copy"], "copy_chars": {**TASKS["copy"], "task": "copy", "kwargs": {"symbols": "chars"}}}}
    res, records = retrieval.run_retrieval(LookAheadLM(tok, wrong_digits=True), cfg, progress=False)
    assert list(res) == ["copy", "copy_chars"] and {r["task"] for r in records} == {"copy", "copy_chars"}
    assert res["copy"]["exact"] == 1.0 and res["copy_chars"]["exact"] == 0.0  # numbers only in the chars variant
    plain = retrieval.documents("copy", 2, 20, 80, seed=3)
    assert [d.text for d in plain] == [d.text for d in retrieval.documents("copy", 2, 20, 80, seed=3, label="copy")]
    assert plain[0].text != retrieval.documents("copy", 2, 20, 80, seed=3, label="copy_words")[0].text
    with pytest.raises(ValueError, match="unknown retrieval task 'nope'"):
        retrieval.run_retrieval(LookAheadLM(tok), {"tasks": {"x": {"task": "nope"}}}, progress=False)


def test_answer_tokens_are_located_exactly(tok):
    """Whole-text tokens, and exactly the answer's: decoding them gives the answer (up to the
    leading space a piece may carry), and the tokens around it are not part of it."""
    lm = LookAheadLM(tok)
    for task, n_answers in (("passkey", 1), ("copy", 1), ("mqar", 3)):
        for doc in retrieval.documents(task, 4, 20, 80, seed=1, kwargs=TASKS[task].get("kwargs")):
            ids, spans = retrieval.tokenize(lm, doc)
            assert ids == lm.encode(doc.text) and ids[0] == tok.bos_id and len(spans) == n_answers
            for (s, e), ans in zip(spans, doc.answers, strict=True):
                assert tok.decode(ids[s:e]).strip() == ans
                assert ans not in tok.decode(ids[s + 1:e]) and ans not in tok.decode(ids[s:e - 1])


def test_one_token_lookup():
    """The ideal one-token look-up: token p is predicted as the one after the latest earlier
    occurrence (before p - 1) of token p - 1."""
    ids = [1, 5, 6, 7, 9, 5, 6, 7, 6, 8]
    # 5 after 9: no earlier 9; 6 after 5 (pos 1 -> 6); 7 after 6 (pos 2 -> 7); 6 after 7 (pos 3 -> 9): wrong
    assert retrieval.one_token_lookup(ids, [(5, 9)]) == [(2, 4)]
    # 8 after 6: the latest earlier 6 is at pos 6, followed by 7: wrong
    assert retrieval.one_token_lookup(ids, [(2, 4), (9, 10)]) == [(0, 2), (0, 1)]


def test_depth_range_places_the_needle(tok):
    docs = retrieval.documents("passkey", 8, 300, 400, seed=2, min_depth=0.0, max_depth=0.1)
    assert all(0.0 <= d.depth <= 0.1 for d in docs)
    assert all(d.text.index("The pass key is") < 0.25 * len(d.text) for d in docs)
    with pytest.raises(ValueError, match="min_depth"):
        retrieval.documents("passkey", 1, 10, 20, seed=0, min_depth=0.5, max_depth=0.2)


def test_bad_settings(tok):
    lm = LookAheadLM(tok)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        retrieval.run_retrieval(lm, {"tasks": {"nope": {}}}, progress=False)
    with pytest.raises(ValueError, match="unknown keys"):
        retrieval.run_retrieval(lm, {"tasks": {"passkey": {"depth": 1}}}, progress=False)
    lm.max_length = 20
    with pytest.raises(ValueError, match="max_length"):
        retrieval.run_retrieval(lm, {"tasks": {"passkey": {}}}, progress=False)


def test_cli_task_on_a_checkpoint(tiny_runs, tmp_path):
    from eval.app import run_task
    from tests.eval.test_app import check_outputs, compose

    out = run_task(compose(["task=retrieval", f"checkpoint_path={tiny_runs['full']}", f"out_root={tmp_path}",
                            "progress=false", "retrieval.num_documents=3", "retrieval.num_buckets=1",
                            "retrieval.tasks.passkey.max_filler_chars=100", "retrieval.tasks.mqar.max_filler_chars=50",
                            "retrieval.tasks.copy.max_filler_chars=100"]))
    doc, rows = check_outputs(out, "retrieval", ["exact.png"])
    assert set(doc["results"]) == {"passkey", "mqar", "copy"} and len(rows) == 9
    assert all(0.0 <= r["exact"] <= 1.0 for r in doc["results"].values())


class _Layer:
    """Stands in for an NSA layer after a forward: its config and its kept selection."""

    def __init__(self, selection, **cfg):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(select_len=4, num_init=1, num_local=1, **cfg)
        self.last_selection = selection


def test_selection_of_sources_by_hand():
    """Blocks of 4 tokens, 1 initial + 1 local forced. Answer tokens 16..17 (queries 15, 16 in
    block 3). Token 16's latest occurrence before the answer is at 9 (block 2, not forced); token
    17's at 2 (block 0, forced); a token never seen before has no source."""
    ids = [0, 5, 7, 5, 9, 9, 9, 9, 9, 6, 9, 9, 9, 9, 9, 9, 6, 7, 8]
    sel = torch.full((1, len(ids), 2, 3), -1)
    sel[0, 15, 0] = torch.tensor([0, 2, 3])   # head 0 selects block 2 for query 15, head 1 does not
    sel[0, 15, 1] = torch.tensor([0, 1, 3])
    out = retrieval.selection_of_sources([_Layer(sel)], ids, [(16, 19)])
    assert out[0] == {"forced": False, "selected": [[True, False]]}
    assert out[1]["forced"] is True
    assert out[2] is None
    summary = retrieval.selection_summary([(True, out[0]), (False, out[1]), (False, None)])
    assert summary["tokens"] == 2 and summary["source_forced"] == 0.5 and summary["not_forced"] == 1
    assert summary["selected_when_right"] == [[1.0, 0.0]] and summary["selected_when_wrong"] is None


def test_own_head_selection_is_the_group_selection_for_identical_heads():
    """Each query head's own top-n against nsa.select_blocks: when the G heads of a KV group have the
    same query, their group sum is G times one head's probabilities, so every head's own selection
    must be the group's; with different queries it must be the selection of a group of that head
    alone (a model with as many KV heads as query heads). T = 150 is not a multiple of any block."""
    from types import SimpleNamespace

    import nsa

    g = torch.Generator().manual_seed(0)
    cfg = SimpleNamespace(block_len=16, stride=8, select_len=32, num_select=3, num_init=1, num_local=1)
    blk = {k: getattr(cfg, k) for k in vars(cfg)}
    T, Hkv, G, D = 150, 2, 3, 16
    k_cmp = torch.randn(1, (T - 16) // 8 + 1, Hkv, D, generator=g)
    q1 = torch.randn(1, T, Hkv, D, generator=g)
    layer = SimpleNamespace(cfg=cfg, scale=D ** -0.5, last_selection_inputs=(q1.repeat_interleave(G, 2), k_cmp))
    own = retrieval.own_head_selection(layer)  # [T, H, n]
    group = nsa.select_blocks(q1.repeat_interleave(G, 2), k_cmp, scale=D ** -0.5, **blk)[0]  # [T, Hkv, n]
    assert own.shape == (T, Hkv * G, cfg.num_select)
    assert torch.equal(own, group.repeat_interleave(G, 1).to(own.dtype))
    q = torch.randn(1, T, Hkv * G, D, generator=g)
    layer.last_selection_inputs = (q, k_cmp)
    alone = nsa.select_blocks(q, k_cmp.repeat_interleave(G, 2), scale=D ** -0.5, **blk)[0]
    assert torch.equal(retrieval.own_head_selection(layer), alone)
    assert not torch.equal(alone.view(T, Hkv, G, -1)[:, :, 0], alone.view(T, Hkv, G, -1)[:, :, 1])
    assert retrieval.own_head_selection(SimpleNamespace(cfg=cfg)) is None


def test_nsa_checkpoint_reports_selection(tiny_lm):
    """A real NSA model: every task gets per-layer selection rates in [0, 1], per KV head for the
    model's selection and per query head for each head's own."""
    res, _ = retrieval.run_retrieval(tiny_lm, {"tasks": TASKS, "num_documents": 3, "seed": 1}, progress=False)
    layers = retrieval.selecting_layers(tiny_lm.model)
    n_layers, H, Hkv = len(layers), layers[0].cfg.num_heads, layers[0].cfg.num_kv_heads
    for r in res.values():
        sel = r["selection"]
        for key, heads in (("selected_when_right", Hkv), ("selected_when_wrong", Hkv),
                           ("head_selected_when_right", H), ("head_selected_when_wrong", H)):
            rates = sel[key]
            assert rates is None or (len(rates) == n_layers and all(len(row) == heads for row in rates)
                                     and all(0 <= x <= 1 for row in rates for x in row))
    assert all(m.last_selection is None or not m.keep_selection for m in retrieval.selecting_layers(tiny_lm.model))
