"""The protocol: split, leave-out statistics, pre-ranker, traces, metrics, bootstrap, errors."""
import numpy as np
import pytest

from data_beauty import (DataConfig, BeautyData, DataError, cooc_matrix, prerank, windows_of, load_5core,
                         attr_transitions, link_evidence, top_n, digest, pre_rank_windows, UNIT)
from metrics import parse_answer, target_rank, metrics_from_ranks, paired_bootstrap
from reasoning import (Vocab, encode, fit_evidence_weights, BUCKETS, EVIDENCE, evidence_features, evidence_buckets,
                       evidence_scores, knockout, trace_entries)


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(DataError, match='Beauty.txt.*--data_dir'):
        BeautyData(DataConfig(data_dir=str(tmp_path / 'nowhere'), cache_dir=str(tmp_path)))


def test_malformed_file_is_named(tmp_path):
    (tmp_path / 'Beauty.txt').write_text('1 2 x 4\n')
    (tmp_path / 'Beauty_item2attributes.json').write_text('{}')
    with pytest.raises(DataError, match='malformed'):
        load_5core(str(tmp_path))


@pytest.mark.parametrize('text,says', [
    ('', 'is empty'),
    ('1 2 3 4\n2 5 6 52', 'ends mid-line'),
    ('1 2 3 4\n\n2 5 6 7\n', ':2 is blank'),
    ('1 2 0 4\n', 'item id 0'),
    ('1 2 -7 4\n', 'item id -7'),
    ('1 2 3\n', 'needs >= 3 items'),
])
def test_bad_sequence_files_are_refused_with_the_line(tmp_path, text, says):
    (tmp_path / 'Beauty.txt').write_text(text)
    (tmp_path / 'Beauty_item2attributes.json').write_text('{}')
    with pytest.raises(DataError, match=says):
        load_5core(str(tmp_path))


def test_split_and_instances(tiny_data):
    d = tiny_data
    for name, offset in (('valid', 2), ('test', 1)):
        sp = d.splits[name]
        assert len(set(sp.users.tolist())) == len(sp)  # one instance per user
        for u, t in zip(sp.users, sp.ts):
            assert t == len(d.seqs[u]) - offset
    tr = d.splits['train']
    for u, t in zip(tr.users, tr.ts):
        assert t <= len(d.seqs[u]) - 3  # no validation or test target is a train window's target
    for sp in d.splits.values():  # kept iff the target is in the list; target index points at it
        for i in range(len(sp)):
            assert sp.cands[i][sp.target[i]] == d.seqs[sp.users[i]][sp.ts[i]]


def test_prerank_never_returns_history_and_is_deterministic(tiny_data, tmp_path):
    d = tiny_data
    for sp in d.splits.values():
        for i in range(len(sp)):
            hist = set(d.seqs[sp.users[i]][:sp.ts[i]].tolist())
            assert not hist & set(sp.cands[i].tolist())
            assert len(set(sp.cands[i].tolist())) == d.cfg.n_cand
    again = BeautyData(DataConfig(data_dir=d.cfg.data_dir, cache_dir=str(tmp_path)))  # rebuilt, not re-read
    assert np.array_equal(again.splits['test'].cands, d.splits['test'].cands)
    assert again.digests() == d.digests()


def leave_out_reference(seqs, u, t, n_items, cfg):
    """Statistics rebuilt from scratch without user u's train positions >= t-1."""
    train = [s[:-2] for s in seqs]
    train[u] = train[u][:max(t - 1, 0)]
    C = cooc_matrix(train, n_items, cfg.cooc_window, cfg.cooc_decay)
    pop = np.bincount(np.concatenate([x for x in train if len(x)]), minlength=n_items + 1).astype(np.float32)
    return C, pop


def test_leave_out_statistics_equal_a_rebuild(tiny_data):
    """The window's candidates and evidence equal those from statistics rebuilt without the user's
    interactions at positions >= t-1 (co-occurrence and popularity), for train, valid and test windows."""
    d, cfg = tiny_data, tiny_data.cfg
    seqs, n_items = d.seqs, d.vocab.n_items
    train = [s[:-2] for s in seqs]
    C = cooc_matrix(train, n_items, cfg.cooc_window, cfg.cooc_decay)
    pop = np.bincount(np.concatenate(train), minlength=n_items + 1).astype(np.float32)
    users, ts, _ = windows_of(seqs)
    for j in list(range(0, len(users), max(1, len(users) // 25))):
        u, t = users[j:j + 1], ts[j:j + 1]
        got = prerank(seqs, C, pop, u, t, cfg)
        C2, pop2 = leave_out_reference(seqs, u[0], t[0], n_items, cfg)
        want = prerank(seqs, C2, pop2, u, t, cfg, leave_out=False)
        assert np.array_equal(got[0], want[0]), (u, t)
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_link_evidence_leaves_out_like_a_rebuild(tiny_data):
    """The attribute link of a window equals the one computed from transitions rebuilt without the user's train
    positions >= t-1, and a link seen only in the user's own target transition is left out."""
    d, cfg = tiny_data, tiny_data.cfg
    train = [s[:-2] for s in d.seqs]
    A = attr_transitions(train, d.attrs, d.vocab.n_attrs, cfg.link_window)
    for sp in d.splits.values():
        for j in range(0, len(sp), max(1, len(sp) // 10)):
            u, t = sp.users[j:j + 1], sp.ts[j:j + 1]
            got = link_evidence(d.seqs, d.attrs, A, u, t, sp.cands[j:j + 1], cfg)
            rebuilt = [s if v != u[0] else s[:max(t[0] - 1, 0)] for v, s in enumerate(train)]
            A2 = attr_transitions(rebuilt, d.attrs, d.vocab.n_attrs, cfg.link_window)
            want = link_evidence(d.seqs, d.attrs, A2, u, t, sp.cands[j:j + 1], cfg, leave_out=False)
            np.testing.assert_allclose(got, want, atol=1e-5)
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([4, 5, 1, 6, 2])]  # attribute 3 -> 4 only in user 0, 3 then 4
    attrs = [[], [1], [2], [3], [4], [1], [2]]
    A = attr_transitions([s[:-2] for s in seqs], attrs, 4, 1)
    cfg1 = DataConfig(link_window=1)
    own = link_evidence(seqs, attrs, A, np.array([0]), np.array([3]), np.array([[4]]), cfg1)
    kept = link_evidence(seqs, attrs, A, np.array([0]), np.array([3]), np.array([[4]]), cfg1, leave_out=False)
    assert A[3, 4] == 1 and kept[0, 0] > 0 and own[0, 0] == 0


def test_target_own_transition_left_out():
    """A pair seen only in the user's own target transition gives the target no co-occurrence."""
    seqs = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([8, 9, 10, 11, 12])]
    cfg = DataConfig(cooc_window=1, n_cand=9)  # every item outside the history is a candidate, the target too
    train = [s[:-2] for s in seqs]
    C = cooc_matrix(train, 12, 1, 1.0)
    pop = np.bincount(np.concatenate(train), minlength=13).astype(np.float32)
    cands, ev_last, _, ev_pop = prerank(seqs, C, pop, np.array([0]), np.array([3]), cfg)  # predict item 4 after 3
    assert C[3, 4] == UNIT and pop[4] == 1  # one pair, weight 1 in units of 1e-4; one interaction
    i = list(cands[0]).index(4)
    assert ev_last[0, i] == 0 and ev_pop[0, i] == 0


def test_trace_does_not_depend_on_target(tiny_data):
    """Prompt and trace are identical whichever candidate is the target; only the answer moves it first."""
    d = tiny_data
    sp = d.splits['test']
    hist = d.seqs[sp.users[0]][:sp.ts[0]][-d.cfg.max_hist:]
    ev = np.ones((len(EVIDENCE), d.cfg.n_cand))
    outs = [encode(hist, sp.cands[0], ti, ev, d.attrs, d.vocab, d.score_w) for ti in range(d.cfg.n_cand)]
    n_answer = d.cfg.n_cand + 1
    for p, r, k in outs:
        assert p == outs[0][0] and r[:-n_answer] == outs[0][1][:-n_answer]
    for ti, (p, r, k) in enumerate(outs):
        assert r[-n_answer] == d.vocab.slot(ti) and r[-1] == d.vocab.eos
        assert k[-n_answer] == 2 and k[-n_answer - 1] == 0 and set(k[-n_answer + 1:]) == {1}  # the choice token


def test_evidence_weights_recover_a_planted_signal():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10, 3)).astype(np.float32)
    y = (2.0 * X[..., 1]).argmax(1)  # the target is the candidate with the largest feature 1
    w = fit_evidence_weights(X, y)
    assert w[1] > 5 * max(abs(w[0]), abs(w[2]))


def test_evidence_weights_never_see_validation_or_test(tiny_dir, tmp_path):
    """Changing every user's last two items (the validation and test targets) leaves the fitted weights as they
    are: they come from train windows only."""
    import shutil
    other = str(tmp_path / 'other')
    shutil.copytree(tiny_dir, other)
    lines = open(f"{other}/Beauty.txt").read().split('\n')
    changed = []
    for line in filter(None, lines):
        ids = line.split()
        ids[-2:] = ids[-1:-3:-1]  # swap the validation and test items
        changed.append(' '.join(ids))
    open(f"{other}/Beauty.txt", 'w').write('\n'.join(changed) + '\n')
    a = BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path / 'c1')))
    b = BeautyData(DataConfig(data_dir=other, cache_dir=str(tmp_path / 'c2')))
    assert any(not np.array_equal(x, y) for x, y in zip(a.seqs, b.seqs))
    np.testing.assert_array_equal(a.score_w, b.score_w)


def test_knockout_finds_the_first_best_in_pairwise_matches():
    """The knockout's matches on hand-made scores: ties go to the earlier candidate, so its last winner is
    np.argmax's; 9 matches for 10 candidates (every candidate but the winner loses once)."""
    assert knockout([2, 2, 1, 3, 3]) == [(1, 0), (3, 3), (3, 3), (4, 3)]
    assert knockout([0, 1, 2]) == [(1, 1), (2, 2)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores = rng.integers(0, 4, 10)
        matches = knockout(scores)
        assert len(matches) == 9 and matches[-1][1] == int(np.argmax(scores))
        assert [after for after, _ in matches] == sorted(after for after, _ in matches)


def test_encode_writes_its_docstring_on_a_hand_made_instance():
    """Three candidates with hand-set statistics and weights: the whole prompt and response, token by token,
    worked out by hand from encode's docstring (each entry's weights and score, the knockout's two matches, the
    conclusion, the answer led by the target), the token kinds, and the entry of each trace token."""
    v = Vocab(n_items=5, n_attrs=2, n_cand=3)
    ev = np.array([[0, 1, 3], [0, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=float)  # last, prev, link, pop per candidate
    w = np.zeros(7 + 7 + 9 + 8 + 3)
    w[:4] = [-1, 0.25, 0.5, 1.0]  # `last` buckets 0..3
    w[7] = -0.25                  # `prev` bucket 0
    w[-3] = 0.5                   # list position 1
    attrs = {1: [1], 2: [], 3: [2], 4: [], 5: [1, 2]}
    prompt, resp, kind = encode([1, 2], [3, 4, 5], 1, ev, attrs, v, w)
    assert v.decode(prompt) == ('<bos> i1 a1 i2 <cands> c1 last0 prev0 link0 pop0 i3 a2 c2 last1 prev0 link0 pop0 i4 '
                                'c3 last3 prev0 link0 pop0 i5 a1 a2 <think>')
    assert v.decode(resp) == (
        'w-1.00 w-0.25 w+0.00 w+0.00 s-0.75 '     # c1: 0.5 (position) - 1 - 0.25
        'w+0.25 w-0.25 w+0.00 w+0.00 s+0.00 '     # c2: 0 + 0.25 - 0.25
        '<lead> c2 s+0.00 '                       # c1 against c2
        'w+1.00 w-0.25 w+0.00 w+0.00 s+0.75 '     # c3
        '<lead> c3 s+0.75 <best> c3 <answer> '    # c2 against c3; the conclusion
        'c2 c1 c3 <eos>')                         # the target (c2), then list order
    assert trace_entries(3) == [1] * 5 + [2] * 5 + [0] * 3 + [3] * 5 + [0] * 3 and resp[21] == v.best
    judged = [j for j, k in enumerate(kind) if k == 3]
    assert [v.token_str(resp[j - 1]) for j in judged] == ['<lead>', '<lead>', '<best>']
    assert kind[len(resp) - 4:] == [2, 1, 1, 1] and set(kind[:len(resp) - 4]) <= {0, 3}
    _, direct, direct_kind = encode([1, 2], [3, 4, 5], 1, ev, attrs, v, w, trace=False)
    assert v.decode(direct) == 'c2 c1 c3 <eos>' and direct_kind == [2, 1, 1, 1]


def test_conclusion_follows_the_score_tokens(tiny_data):
    """Every match `<lead> slot score` names the better of two earlier winners, with its score as the entry
    (trace_entries) wrote it, and <best> names the last winner, the first candidate with the highest score: all
    computable from the trace. Those slots, and only those, are the trace's judgements (kind 3)."""
    v = tiny_data.vocab
    sp = tiny_data.splits['valid']
    n = tiny_data.cfg.n_cand
    entry = np.array(trace_entries(n))
    for i in range(len(sp)):
        r = list(sp.responses[i])
        final = [r[np.flatnonzero(entry == c + 1)[-1]] for c in range(n)]  # each entry's last token: its score
        assert all(v.bucket0['score'] <= t <= v.bucket0['score'] + len(BUCKETS['score']) for t in final)
        at = [j for j, t in enumerate(r) if t == v.lead]
        assert len(at) == n - 1
        for j in at:
            winner = r[j + 1] - v.slot0
            assert r[j + 2] == final[winner] and r[j - 1] in final + [r[k + 2] for k in at]
        assert r[r.index(v.best) + 1] == v.slot(int(np.argmax(final)))
        judged = [j for j, k in enumerate(sp.kinds[i]) if k == 3]  # the judgements weighed by w_judge
        assert judged == [j + 1 for j in at] + [r.index(v.best) + 1]


def test_evidence_scores_add_up_the_position_and_each_statistic():
    """A candidate's score is the weight of its list position plus the weight of each statistic's bucket (no clip
    reached here), on the quarter grid of the score tokens; a sum past the range is clipped to its end."""
    rng = np.random.default_rng(0)
    ev = np.stack([rng.integers(0, 20, 10), rng.integers(0, 20, 10), rng.uniform(0, 5, 10), rng.integers(0, 200, 10)])
    F_ = evidence_features(ev).shape[1]
    w = np.round(rng.normal(0, 0.2, F_) * 4) / 4
    scores = evidence_scores(ev, w)
    b = evidence_buckets(ev)
    start = np.cumsum([0] + [len(BUCKETS[fam]) + 1 for fam in EVIDENCE])
    by_hand = w[F_ - 10:] + sum(w[start[f] + b[f]] for f in range(len(EVIDENCE)))
    np.testing.assert_array_equal(scores, by_hand)
    assert np.all(scores * 4 == np.round(scores * 4))  # quarters: every value is one score token
    assert np.all(evidence_scores(ev, w + 3.0) == 4.0)  # far past the top


def test_trace_length_and_no_target_in_prompt(tiny_data):
    d = tiny_data
    sp = d.splits['train']
    v = d.vocab
    for i in range(len(sp)):
        assert (sp.kinds[i] == 0).sum() >= 40  # per-candidate evidence, no filler
        assert v.answer not in sp.prompts[i][:-1]


def test_metrics_by_hand():
    m = metrics_from_ranks([1, 2, 4])
    assert m['R@1'] == pytest.approx(1 / 3) and m['R@3'] == pytest.approx(2 / 3) and m['R@5'] == 1
    assert m['N@3'] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert m['N@5'] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(5)) / 3)
    assert m['MRR'] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)


def test_parse_answer_and_invalid_scored_as_floor():
    v = Vocab(n_items=20, n_attrs=5, n_cand=3)
    c1, c2, c3 = v.slots
    ok = [v.think, v.best, c3, v.answer, c3, c1, c2, v.eos]
    assert parse_answer(ok, v) == [2, 0, 1]
    assert parse_answer([c2, c1, c3, v.eos], v) == [1, 0, 2]       # a direct model starts with a slot
    assert target_rank([2, 0, 1], 0) == 2
    for bad in ([v.answer, c3, c3, c2, v.eos],                      # duplicate
                [v.answer, c3, c1, v.eos],                          # drop
                [v.answer, c3, c1, v.item(2), v.eos],               # out of set
                [v.answer, c3, c1, c2],                             # unfinished
                [v.think, c3, c1, c2, v.eos]):                      # no <answer> after reasoning
        assert parse_answer(bad, v) is None
    assert target_rank(None, 1) == 2  # the pre-ranker's order


def test_paired_bootstrap_by_hand():
    a, b = [1] * 50 + [2] * 50, [2] * 100
    res = paired_bootstrap(a, b, 'R@1', n_boot=2000, seed=0)
    assert res['diff'] == pytest.approx(0.5)
    assert 0.38 < res['lo'] < 0.5 < res['hi'] < 0.62
    same = paired_bootstrap(b, b, 'R@1', n_boot=100)
    assert same == {'diff': 0.0, 'lo': 0.0, 'hi': 0.0}


def test_build_from_raw_amazon_files(tmp_path):
    """The raw reviews + meta dump becomes the 5-core format: time order, k-core filter, brand + categories."""
    import gzip
    import json
    from data_beauty import build_from_raw
    raw = tmp_path / 'raw'
    raw.mkdir()
    reviews = []
    for u in range(6):            # 6 users x 5 items each: a 5-core; user 'x' has too few and is dropped
        for t, i in enumerate(range(5)):
            reviews.append({'reviewerID': f'u{u}', 'asin': f'A{(i + u) % 5}', 'unixReviewTime': 100 * t + u})
    reviews.append({'reviewerID': 'x', 'asin': 'A0', 'unixReviewTime': 5})
    with gzip.open(raw / 'reviews_Beauty_5.json.gz', 'wt') as f:
        f.write('\n'.join(json.dumps(r) for r in reviews))
    metas = [{'asin': f'A{i}', 'brand': f'B{i % 2}', 'categories': [['Beauty', 'Makeup', f'C{i}']]} for i in range(5)]
    with gzip.open(raw / 'meta_Beauty.json.gz', 'wt') as f:
        f.write('\n'.join(repr(m) for m in metas))  # the 2014 dump writes python literals
    build_from_raw(str(raw), str(tmp_path / 'out'))
    seqs, attrs, n_items, n_attrs = load_5core(str(tmp_path / 'out'))
    assert len(seqs) == 6 and n_items == 5 and all(len(s) == 5 for s in seqs)
    assert seqs[0].tolist() == [1, 2, 3, 4, 5]          # ids by first appearance, in time order
    assert all(len(attrs[i]) == 3 for i in range(1, 6))  # brand, Makeup, C<i>
    assert attrs[1][0] != attrs[2][0] and attrs[1][0] == attrs[3][0]  # B0 / B1 brands


def test_reject_drops_only_the_answers_that_contradict_the_trace(tiny_data):
    """With `reject`, a window whose trace concludes on another candidate than its target loses the loss of its
    decision (the first ranked slot) and keeps every other; a window whose conclusion is the target keeps all."""
    import torch
    from data_beauty import collate
    from reasoning import loss_weights
    sp, v = tiny_data.splits['train'], tiny_data.vocab
    b = collate(sp, range(len(sp)), v)
    concl = torch.tensor([int(r[list(r).index(v.best) + 1]) for r in sp.responses])
    assert torch.equal(b['concluded'], concl)
    assert torch.equal(b['follows'], concl == torch.as_tensor(v.slots)[b['target']])
    assert b['follows'].any() and not b['follows'].all()
    keep, drop = loss_weights(b, 0.5, 2.0), loss_weights(b, 0.5, 2.0, reject=True)
    decision = b['kind'] == 2
    assert torch.equal(keep[~decision], drop[~decision])
    assert torch.equal(drop[b['follows']], keep[b['follows']])
    assert (drop[decision & ~b['follows'][:, None]] == 0).all() and (keep[decision] == 2.0).all()


def test_drilled_answers_go_on_from_a_random_decision(tiny_data):
    """drill_decisions: a drilled row's answer is the picked slot, then every other slot in list order (a valid
    permutation); its trace and every other row are untouched."""
    import torch
    from data_beauty import collate
    from reasoning import drill_decisions
    sp, v = tiny_data.splits['train'], tiny_data.vocab
    b = collate(sp, range(8), v)
    d = drill_decisions(b, 0.5, np.random.default_rng(3), v)
    rng = np.random.default_rng(3)  # the same draws: which rows, then which slots
    rows, picks = rng.random(8) < 0.5, rng.integers(0, v.n_cand, 8)
    assert rows.any() and not rows.all()
    answer = (b['kind'] >= 1) & (b['kind'] <= 2) & v.is_slot(b['resp'])
    for r in range(8):
        got = [v.token_str(t) for t in d[r][answer[r]].tolist()]
        if rows[r]:
            p = int(picks[r])
            assert got == [f"c{p + 1}"] + [f"c{i + 1}" for i in range(v.n_cand) if i != p]
        else:
            assert torch.equal(d[r], b['resp'][r])
    assert torch.equal(d[~answer], b['resp'][~answer])


def test_skip_report_scores_the_answer_after_each_decision(tiny_data):
    """evaluation.skip_report on a stand-in model that writes the list without leaving anything out (each slot is
    followed by the next, the last by <eos>): right after decision c1 only, where nothing needs leaving out."""
    import torch
    from evaluation import skip_report
    v = tiny_data.vocab

    class NextSlot(torch.nn.Module):
        def forward(self, idx, pos, mask, cache=None, cols=None, start=None):
            last = v.slot0 + v.n_cand - 1
            nxt = torch.where(v.is_slot(idx) & (idx < last), idx + 1, v.eos)
            return torch.nn.functional.one_hot(nxt, v.n_out).float()

        def head(self, h, fp32=False):
            return h

    report = skip_report(NextSlot(), tiny_data.splits['valid'], v, torch.device('cpu'), n=8)
    assert report == [1.0] + [0.0] * (v.n_cand - 1)


def test_a_direct_answer_has_no_conclusion_to_contradict(tiny_dir, tmp_path):
    """Without a trace, collate's `concluded` is -1 and every decision `follows` (`reject` drops nothing)."""
    from data_beauty import BeautyData, DataConfig, collate
    d = BeautyData(DataConfig(data_dir=tiny_dir, trace=False, cache_dir=str(tmp_path)))
    b = collate(d.splits['train'], range(len(d.splits['train'])), d.vocab)
    assert (b['concluded'] == -1).all() and b['follows'].all()


def test_top_n_breaks_ties_by_the_smaller_column():
    """The N largest keys, largest first, equal keys by column: by hand, and against a full stable sort on keys
    with many ties (np.argpartition alone resolves ties at the N-th place differently on different CPUs)."""
    key = np.array([[5, 3, 3, 3, 9, 3], [1, 1, 1, 1, 1, 1], [0, 2, 2, 7, 2, 2]])
    assert top_n(key, 3).tolist() == [[4, 0, 1], [0, 1, 2], [3, 1, 2]]
    rng = np.random.default_rng(0)
    key = rng.integers(0, 4, (200, 40))
    want = np.argsort(-key, axis=1, kind='stable')[:, :5]
    assert np.array_equal(top_n(key, 5), want)


def test_protocol_is_the_same_for_any_thread_count(tiny_dir, tmp_path):
    """Built afresh with one thread and with the default, the split, lists and traces are identical."""
    import torch
    threads = torch.get_num_threads()
    a = BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path / 'a'))).digests()
    torch.set_num_threads(1)
    try:
        b = BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path / 'b'))).digests()
    finally:
        torch.set_num_threads(threads)
    assert a == b


# the shipped Beauty's validation and test instances and lists, as results/cpu/data.json records them
PINNED = {'valid': {'split': '8fe0f725ab26012c', 'lists': 'e4ce654e952fa4c1'},
          'test': {'split': '321f4c92a0c005ff', 'lists': '2522f094cc692ec3'}}


def test_shipped_data_gives_the_pinned_protocol():
    """The protocol every number stands on: the shipped data's validation and test instances and candidate lists
    hash to the pinned digests (exact integer statistics and explicit tie-breaks make them machine-independent),
    and results/cpu/data.json records the same."""
    import json
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seqs, _, n_items, _ = load_5core(os.path.join(root, 'data', 'beauty'))
    users, ts, split = windows_of(seqs)
    sel = split >= 1                                       # validation and test windows (train ones take minutes)
    cands, target, _ = pre_rank_windows(seqs, n_items, users[sel], ts[sel], DataConfig())
    recorded = json.load(open(os.path.join(root, 'results', 'cpu', 'data.json')))['digests_by_split']
    for name, code in (('valid', 1), ('test', 2)):
        keep = (split[sel] == code) & (target >= 0)
        got = {'split': digest([users[sel][keep], ts[sel][keep], target[keep]]), 'lists': digest([cands[keep]])}
        assert got == PINNED[name]
        assert {k: recorded[name][k] for k in got} == PINNED[name]


def test_a_bad_cache_is_refused_with_the_fix(tiny_dir, tmp_path):
    """The cache loads without running code: a planted pickle and a truncated file are refused, naming the file
    and saying to delete it."""
    BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path)))
    path = sorted(tmp_path.glob('*.npz'))[0]
    with open(path, 'wb') as f:
        np.savez(f, stats=np.array([{'planted': 1}], dtype=object))  # needs pickle to load
    with pytest.raises(DataError, match='delete it'):
        BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path)))
    path.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(DataError, match=f'{path.name}.*delete it'):
        BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path)))


def test_a_typed_history_is_encoded_as_its_test_window(tiny_data):
    """Nothing of a test window is left out (its user's train part ends before it), so typing in a test user's
    history gives that window's prompt, list and trace exactly; a typed list keeps its order; bad input is named."""
    d, v, test = tiny_data, tiny_data.vocab, tiny_data.splits['test']
    for i in (0, len(test) // 2, len(test) - 1):
        u, t = int(test.users[i]), int(test.ts[i])
        typed = d.typed_instance([int(x) for x in d.seqs[u][:t]])
        assert np.array_equal(typed.prompts[0], test.prompts[i]) and np.array_equal(typed.cands[0], test.cands[i])
        end = list(test.responses[i]).index(v.answer)
        assert np.array_equal(typed.responses[0][:end], test.responses[i][:end])  # the trace; the answer has no target
    hist, order = [int(x) for x in d.seqs[0][:3]], [c for c in range(1, v.n_items + 1) if c not in d.seqs[0][:3]]
    mine = order[::-1][:d.cfg.n_cand]
    assert list(d.typed_instance(hist, mine).cands[0]) == mine
    for bad_hist, bad_list in (([], None), ([v.n_items + 1], None), (hist, mine[:-1]), (hist, [hist[0]] + mine[1:])):
        with pytest.raises(DataError):
            d.typed_instance(bad_hist, bad_list)
