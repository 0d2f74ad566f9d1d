"""Block diffusion: B = 1 is the AR model, masks match a dense reference, cached = uncached (replay), sampler
properties, the validity loss, the distillation loss."""
import math

import pytest
import torch

from conftest import tiny_model
from data_beauty import collate
from diffusion import (generate_ar, bd3_columns, bd3_hidden, commit_rule, convert, diffusion_loss, generate_block,
                       first_eos_lengths, loss_region, noise_blocks, replay_hidden, left_to_right_steps,
                       token_logprobs, permutation_validity_loss, forward_kl, predicting_columns)
from reasoning import loss_weights
from train_ar import ar_response_loss


def setup(tiny_data, n=5, block=4, seed=0, entries=True):
    d = tiny_data
    model = convert(tiny_model(d.vocab, seed=seed, entries=entries), d.vocab)
    batch = collate(d.splits['test'], range(n), d.vocab, block=block)
    return d, model, batch


def test_bd3_mask_equals_dense_reference():
    pad = torch.tensor([0, 3])
    P, R, block = 5, 6, 2
    pos, m = bd3_columns(pad, P, R, block)
    kind = lambda c: 0 if c < P else (1 if c < P + R else 2)
    rb = lambda c: ((c - P) if kind(c) == 1 else (c - P - R)) // block
    for b in range(2):
        for q in range(P + 2 * R):
            for k in range(P + 2 * R):
                if q == k:
                    want = True
                elif k < pad[b]:
                    want = False
                elif kind(k) == 0:
                    want = kind(q) != 0 or k <= q
                elif kind(k) == 1:
                    want = kind(q) == 1 and rb(k) == rb(q)
                else:
                    want = (kind(q) == 1 and rb(k) < rb(q)) or (kind(q) == 2 and rb(k) <= rb(q))
                assert bool(m[b, q, k]) == want, (b, q, k)
        assert pos[b, P] == P - pad[b] and pos[b, P + R] == P - pad[b]  # clean copy reuses positions


def test_block_one_loss_equals_ar_loss(tiny_data):
    d, model, batch = setup(tiny_data, block=1)
    everything = torch.ones_like(batch['resp'], dtype=torch.bool)
    weights = loss_weights(batch, w_trace=0.5, w_answer=3.0, w_judge=2.0)
    diff, _ = diffusion_loss(model, batch, 1, d.vocab.mask, weights, masked=everything, complementary=False)
    ar = ar_response_loss(model, batch, w_trace=0.5, w_answer=3.0, w_judge=2.0)
    torch.testing.assert_close(diff, ar, atol=1e-5, rtol=1e-5)


def test_block_one_sampler_equals_ar_decoding(tiny_data):
    d, model, batch = setup(tiny_data, block=1)
    ar, ar_len = generate_ar(model, batch['prompt'], batch['pad'], 24, d.vocab)
    res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=1, tau=0.9)
    for r in range(ar.shape[0]):
        assert int(ar_len[r]) == int(res['lengths'][r])
        assert torch.equal(ar[r, :int(ar_len[r])], res['tokens'][r, :int(ar_len[r])])
    assert torch.equal(res['n_forwards'], res['n_tokens'])  # one forward per token, prefill included


def test_first_token_of_a_block_gets_the_ar_distribution(tiny_data):
    """It is predicted from the clean previous block, so the noised block's content cannot change it."""
    d, model, batch = setup(tiny_data, block=4)
    resp = batch['resp']
    h_all = bd3_hidden(model, batch['prompt'], batch['pad'], torch.full_like(resp, d.vocab.mask), resp, 4)
    h_none = bd3_hidden(model, batch['prompt'], batch['pad'], resp, resp, 4)
    firsts = torch.arange(0, resp.shape[1], 4)
    torch.testing.assert_close(h_all[:, firsts], h_none[:, firsts])
    assert not torch.allclose(h_all[:, firsts + 1], h_none[:, firsts + 1])


def test_cached_sampler_equals_uncached_replay(tiny_data):
    """Log-probs the sampler computed with its KV cache equal an uncached recomputation at the recorded state."""
    d, model, batch = setup(tiny_data, block=4)
    g = torch.Generator().manual_seed(1)
    res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.3, temperature=1.0,
                         generator=g)
    h = replay_hidden(model, batch['prompt'], batch['pad'], res['tokens'], res['steps'], 4, d.vocab.mask)
    logits = model.head(h, fp32=True)
    logits[..., d.vocab.mask] = -float('inf')
    lp = token_logprobs(logits, res['tokens'], 1.0)
    live = res['steps'] > 0
    assert live.sum() > 10
    torch.testing.assert_close(lp[live], res['logp'][live], atol=1e-4, rtol=1e-4)


def test_teacher_forced_diffusion_logits_are_at_the_left_to_right_state(tiny_data):
    """evaluation.teacher_forced_logits (what trace_report scores) with block B predicts each token with its block's
    tokens left of it revealed and the rest masked: equal to a plain bd3 forward per position; and trace_report
    counts the lists whose trace concludes elsewhere than c1."""
    from evaluation import teacher_forced_logits, trace_report
    d, model, _ = setup(tiny_data)
    sp, v, B = d.splits['valid'], d.vocab, 4
    b = collate(sp, range(6), v, block=B)
    logits = teacher_forced_logits(model, b, v, block=B)
    cols = torch.arange(b['resp'].shape[1])
    for r in range(6):
        for j in range(0, int(b['resp_len'][r]), 3):
            start = j - j % B
            xt = torch.where((cols >= j) & (cols < start + B), v.mask, b['resp'][r])[None]
            h = bd3_hidden(model, b['prompt'][r:r + 1], b['pad'][r:r + 1], xt, b['resp'][r:r + 1], B)[0, j]
            ref = model.head(h, fp32=True)
            ref[v.mask] = -float('inf')
            torch.testing.assert_close(logits[r, j], ref, atol=1e-5, rtol=1e-5)
    rep = trace_report(model, sp, v, torch.device('cpu'), n=len(sp), block=B)
    concluded = [int(r[list(r).index(v.best) + 1]) for r in sp.responses]
    assert rep['departures'] == sum(c != v.slot(0) for c in concluded) > 0


def test_left_to_right_state_equals_masking_the_rest_of_the_block(tiny_data):
    """Replayed at left_to_right_steps, token j is predicted with its block's tokens left of j revealed and
    j onwards masked: equal to a plain bd3 forward with exactly that noised input."""
    d, model, batch = setup(tiny_data, block=4)
    res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.3, temperature=1.0,
                         generator=torch.Generator().manual_seed(1))
    tokens, steps = res['tokens'], res['steps']
    h = replay_hidden(model, batch['prompt'], batch['pad'], tokens, left_to_right_steps(steps, 4), 4, d.vocab.mask)
    offset = torch.arange(tokens.shape[1]) % 4
    live = steps > 0
    for o in range(4):
        xt = torch.where((offset >= o)[None, :] | ~live, d.vocab.mask, tokens)
        ref = bd3_hidden(model, batch['prompt'], batch['pad'], xt, tokens, 4)
        at = live & (offset == o)[None, :]
        torch.testing.assert_close(h[at], ref[at], atol=1e-5, rtol=1e-5)
        if o in (1, 3):  # a replay of two chosen offsets predicts them at the same states, in 3 stacked states
            few = left_to_right_steps(steps, 4, offsets=[1, 3])
            assert int(few.max()) == 3
            h2 = replay_hidden(model, batch['prompt'], batch['pad'], tokens, few, 4, d.vocab.mask)
            torch.testing.assert_close(h2[at], ref[at], atol=1e-5, rtol=1e-5)


def commits_per_step(steps, block):
    """For each row and block, how many positions each step committed: [[count of step 1, 2, ...], ...]."""
    out = []
    for row in steps:
        for blk in row.view(-1, block):
            st = blk[blk > 0].tolist()
            out.append([st.count(s) for s in range(1, max(st, default=0) + 1)])
    return out


def test_sampler_properties(tiny_data):
    """Each setting: greedy decoding needs no generator, sampling repeats for a fixed one; the prompt is never
    touched; no mask is left; every position is committed at exactly one step of its block, each step commits at
    least one (a static k exactly k but the last), tau = 0 commits a whole block at once, and under the threshold
    rule a step commits either only tokens of confidence >= tau or the single most confident one."""
    d, model, batch = setup(tiny_data, block=4)
    prompt = batch['prompt'].clone()
    for kw in (dict(tau=0.9), dict(tau=0.0), dict(k=2), dict(tau=0.5, temperature=1.0),
               dict(tau=0.5, temperature=1.0, from_left=True), dict(k=2, from_left=True)):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, generator=g1, **kw)
        b = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4,
                           generator=g2 if 'temperature' in kw else None, **kw)
        assert torch.equal(a['tokens'], b['tokens']) and torch.equal(a['steps'], b['steps'])
        assert torch.equal(batch['prompt'], prompt)                       # the prompt is never touched
        decoded = a['steps'] > 0
        assert not (a['tokens'][decoded] == d.vocab.mask).any()           # finished: no mask left
        counts = commits_per_step(a['steps'], 4)
        assert sum(map(sum, counts)) == decoded.sum() and all(all(c > 0 for c in cs) for cs in counts)
        if kw.get('k'):
            assert all(all(c == 2 for c in cs[:-1]) and cs[-1] <= 2 for cs in counts)
        if kw.get('tau') == 0.0:
            assert all(len(cs) <= 1 for cs in counts)
        if kw.get('tau') == 0.9:  # greedy: logp is the log-confidence of each committed token
            conf = a['logp'].exp()
            for row in range(len(conf)):
                for blk in range(6):
                    st, cf = a['steps'][row, 4 * blk:4 * blk + 4], conf[row, 4 * blk:4 * blk + 4]
                    for s_ in range(1, int(st.max()) + 1):
                        at = st == s_
                        assert at.sum() == 1 or (cf[at] >= 0.9 - 1e-6).all()
    s1 = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.5, temperature=1.0,
                        generator=torch.Generator().manual_seed(1))
    s2 = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.5, temperature=1.0,
                        generator=torch.Generator().manual_seed(2))
    assert not torch.equal(s1['tokens'], s2['tokens'])


def test_commit_rule_from_left_commits_a_run_from_the_leftmost_masked():
    masked = torch.tensor([[False, True, True, True, True]] * 3)
    conf = torch.tensor([[0.99, 0.50, 0.95, 0.20, 0.99],    # leftmost below tau: only it
                         [0.99, 0.95, 0.95, 0.20, 0.99],    # a run of two, stopped by 0.20
                         [0.10, 0.95, 0.95, 0.95, 0.95]])   # the whole masked rest
    left = commit_rule(conf, masked, 0.9, 0, from_left=True)
    assert left.tolist() == [[False, True, False, False, False], [False, True, True, False, False],
                             [False, True, True, True, True]]
    # the threshold rule commits out of order, ahead of a masked position to the left
    assert commit_rule(conf, masked, 0.9, 0)[0].tolist() == [False, False, True, False, True]
    assert commit_rule(conf, masked, 0.9, 2, from_left=True)[0].tolist() == [False, True, True, False, False]


def test_sampler_from_left_commits_in_position_order(tiny_data):
    """Inside every block the commit step never decreases left to right (positions after <eos> are never decoded);
    k = 1 takes one position per step."""
    d, model, batch = setup(tiny_data, block=4)
    for kw, one_per_step in ((dict(tau=0.3, temperature=1.0), False), (dict(k=1), True)):
        res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, from_left=True,
                             generator=torch.Generator().manual_seed(0), **kw)
        steps = res['steps'].view(len(res['steps']), -1, 4)                 # (rows, blocks, offset)
        decoded = steps[..., 0] > 0
        assert decoded.any()
        s = steps[decoded]                                                   # 0: after <eos>, never decoded
        assert ((s[:, 1:] >= s[:, :-1]) | (s[:, 1:] == 0)).all() and ((s[:, :-1] > 0) | (s[:, 1:] == 0)).all()
        if one_per_step:
            assert ((s == torch.arange(1, 5)) | (s == 0)).all()


def test_sampler_spends_no_step_after_eos(tiny_data):
    """A row's forwards are the prefill plus, per block, the step that committed its last live token: no step
    is spent on positions after <eos> (they stay uncommitted), so the count compares fairly with AR's."""
    d, model, batch = setup(tiny_data, n=6, block=4)
    head = model.head
    model.head = lambda h, fp32=False: head(h, fp32).index_add(  # an untrained model that often ends early
        -1, torch.tensor([d.vocab.eos]), torch.full((*h.shape[:-1], 1), 4.0))
    for kw in (dict(tau=0.3, temperature=1.0), dict(tau=0.9), dict(k=1, from_left=True)):
        res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4,
                             generator=torch.Generator().manual_seed(0), **kw)
        assert ((res['lengths'] < 24) & (res['lengths'] % 4 != 0)).any()     # some row ends inside a block
        live = torch.arange(24)[None, :] < res['lengths'][:, None]
        per_block = (res['steps'] * live).view(len(live), -1, 4).amax(2)
        assert torch.equal(res['n_forwards'], 1 + per_block.sum(1))


def test_list_slots_commit_at_their_own_threshold(tiny_data):
    """With tau_slot, a step that commits several tokens commits a list slot (a judgement, an answer item) only at
    confidence >= tau_slot and any other token at >= tau; tau_slot = tau decodes as the one-threshold rule."""
    d, model, batch = setup(tiny_data, n=6, block=4)
    model, head, slots = reads_its_prompt(model), model.head, torch.tensor(d.vocab.slots[:1])
    model.head = lambda h, fp32=False: head(h, fp32).index_add(  # an untrained model that writes a list slot
        -1, slots, 3.0 * (h[..., :1] > 0))                           # at about half of the positions
    plain = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.3)
    same = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.3, tau_slot=0.3)
    assert torch.equal(plain['tokens'], same['tokens']) and torch.equal(plain['steps'], same['steps'])
    res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.02, tau_slot=0.1)
    conf, slot, seen = res['logp'].exp(), d.vocab.is_slot(res['tokens']), {'slot': 0, 'other below': 0}
    for row in range(len(conf)):
        for blk in range(6):
            cols = slice(4 * blk, 4 * blk + 4)
            st, cf, sl = res['steps'][row, cols], conf[row, cols], slot[row, cols]
            for s_ in range(1, int(st.max()) + 1):
                at = st == s_
                if at.sum() > 1:  # not the step's one forced commit
                    assert (cf[at & sl] >= 0.1 - 1e-6).all() and (cf[at & ~sl] >= 0.02 - 1e-6).all()
                    seen['slot'] += int((at & sl).sum())
                    seen['other below'] += int((at & ~sl & (cf < 0.1)).sum())
    assert seen['slot'] > 0 and seen['other below'] > 0   # both bars were met in a step of several commits


def reads_its_prompt(model, strength=6.0):
    """An untrained model barely reads its prompt, so every row of a batch would decode alike: add to its hidden
    states a signal of each row's prompt length and each token's position (a function of the row alone), so that
    rows end in different blocks and finish blocks at different steps."""
    forward = model.forward
    direction = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))

    def hooked(idx, pos, mask, cache=None, cols=None, start=None, rows=None):
        h = forward(idx, pos, mask, cache, cols, start, rows)
        p = pos if rows is None else pos[:, rows]
        return h + strength * torch.sin(1.3 * start[:, None].float() + 0.7 * p.float())[..., None] * direction
    model.forward = hooked
    return model


def test_batched_rows_decode_as_they_do_alone(tiny_data):
    """Each row of a batch moves on at its own pace (its own block, its own step in it) and writes exactly the
    tokens, commit steps and log-probs it writes decoded alone, with padding, rows that end in different blocks
    and rows that finish blocks at different steps; its forwards are the prefill plus one per step of each of
    its blocks, and the batch pays for no row waiting on another."""
    d, model, _ = setup(tiny_data, block=4)
    model = reads_its_prompt(model)
    sp = d.splits['test']
    order = sorted(range(len(sp)), key=lambda i: len(sp.prompts[i]))
    idx = order[:3] + order[-3:]                                          # short prompts get left padding
    batch = collate(sp, idx, d.vocab, block=4)
    for kw in (dict(tau=0.02), dict(tau=0.5), dict(k=2), dict(tau=0.02, from_left=True),
               dict(tau=0.02, tau_slot=0.3)):
        res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, **kw)
        for r, i in enumerate(idx):
            one = collate(sp, [i], d.vocab, block=4)
            alone = generate_block(model, one['prompt'], one['pad'], 24, d.vocab, block=4, **kw)
            assert torch.equal(alone['carried'], alone['n_forwards'])
            assert torch.equal(alone['tokens'][0], res['tokens'][r]) and torch.equal(alone['steps'][0], res['steps'][r])
            torch.testing.assert_close(alone['logp'][0], res['logp'][r], atol=1e-5, rtol=1e-5)
            assert int(alone['n_forwards'][0]) == int(res['n_forwards'][r])
        live = torch.arange(24)[None, :] < res['lengths'][:, None]
        per_block = (res['steps'] * live).view(len(idx), -1, 4).amax(2)   # steps each row spent in each block
        assert torch.equal(res['n_forwards'], 1 + per_block.sum(1))
        assert torch.equal(res['carried'], res['n_forwards'])             # no row was carried idle
        if kw == dict(tau=0.02):  # the case described: rows out of step with one another, several tokens a step
            assert len(set(res['lengths'].tolist())) > 2 and (per_block[:, :2] != per_block[:1, :2]).any()
            assert (res['n_forwards'] < res['lengths']).all()
            waiting = len(idx) * (1 + (per_block * (per_block > 0).any(0)).amax(0).sum())
            assert int(res['carried'].sum()) < waiting                     # a batch that moves block by block


def test_validity_loss_leaves_out_the_rows_whose_decision_is_rejected(tiny_data):
    """A row whose decision carries no loss (weight 0 at kind 2: `reject`) adds nothing to the validity loss: its
    revealed answer tokens spell out the target, and the coverage term would teach the decision that the reject
    rule drops (the student then wrote c1 wherever the trace departed from it, FINDINGS.md)."""
    d, model, batch = setup(tiny_data, n=4, block=4)
    v = d.vocab
    masked = noise_blocks(batch['resp'], 4, v.mask, torch.Generator().manual_seed(3))
    w = torch.ones(batch['resp'].shape)
    rejected = w.clone()
    rejected[0] = torch.where(batch['kind'][0] == 2, 0.0, 1.0)
    loss = lambda weights, rows=slice(None): diffusion_loss(
        model, {k: x[rows] for k, x in batch.items()}, 4, v.mask, weights[rows], masked=masked[rows],
        complementary=False, vocab=v, validity_weight=1.0)[1]['validity_loss']
    torch.testing.assert_close(loss(rejected), loss(w, slice(1, None)))
    assert not torch.allclose(loss(w), loss(w, slice(1, None)))


def test_validity_loss_by_hand(tiny_data):
    """The permutation-validity loss on a 3-candidate answer, worked out by hand: (a) the mass outside the
    candidates per answer position plus (b) the mean over candidates of (expected count - 1)^2. The decision
    (kind 2) is one of the answer positions, and a revealed position counts as one-hot on its token, so
    predicting it again is a duplicate."""
    v = tiny_data.vocab
    c = v.slots[:3]
    cands = torch.tensor([c])
    resp = torch.tensor([[v.answer, c[1], c[0], c[2], v.eos]])
    kind = torch.tensor([[0, 2, 1, 1, 1]])                         # the decision, then the rest of the answer

    def loss_for(rows, masked):
        logits = torch.full((1, 5, v.size), -30.0)
        for j, tok in rows.items():
            logits[0, j, tok] = 30.0
        logits.requires_grad_(True)
        loss = permutation_validity_loss(logits, resp, torch.tensor([masked]), cands, kind, v)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        return loss.item()

    every = [False, True, True, True, False]
    assert loss_for({1: c[1], 2: c[0], 3: c[2]}, every) == pytest.approx(0.0, abs=1e-6)      # a permutation
    assert loss_for({1: c[1], 2: c[1], 3: c[2]}, every) == pytest.approx(2 / 3, abs=1e-6)    # counts 0, 2, 1
    assert loss_for({1: c[1], 2: v.item(7), 3: c[2]}, every) == pytest.approx(2 / 3, abs=1e-6)  # 1/3 out, 0 1 1
    assert loss_for({1: c[0], 2: c[0], 3: c[2]}, every) == pytest.approx(2 / 3, abs=1e-6)    # the decision counts
    revealed = [False, False, True, True, False]                   # the decision revealed (c2), the rest predicted
    assert loss_for({2: c[1], 3: c[2]}, revealed) == pytest.approx(2 / 3, abs=1e-6)          # c2 again: a duplicate
    assert loss_for({2: c[0], 3: c[2]}, revealed) == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_by_hand():
    """forward_kl is KL(teacher || student): teacher (0.9, 0.1), student (0.5, 0.5) gives 0.9 ln 1.8 + 0.1 ln 0.2
    = 0.3681, where the reverse direction would give 0.5108; zero for equal distributions."""
    teacher = torch.tensor([[[0.9, 0.1]]]).log()
    student = torch.tensor([[[0.5, 0.5]]]).log()
    w = torch.ones(1, 1)
    assert forward_kl(teacher, student, w).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-6)
    assert forward_kl(student, teacher, w).item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5), abs=1e-6)
    a = torch.randn(2, 3, 11)
    assert forward_kl(a, a, torch.ones(2, 3)).abs() < 1e-6


def test_predicting_columns():
    cols = predicting_columns(P=5, R=6, block=3, device='cpu')
    assert cols.tolist() == [4, 5, 6, 5 + 6 + 2, 8, 9]


def test_loss_at_masked_positions_equals_full_head(tiny_data):
    """diffusion_loss runs the head only where the loss reads it; the result equals the full-head reference."""
    from diffusion import noise_blocks, loss_region
    from reasoning import kind_weights
    d, model, batch = setup(tiny_data, block=4)
    v, resp = d.vocab, batch['resp']
    masked = noise_blocks(resp, 4, v.mask, torch.Generator().manual_seed(0))
    loss, parts = diffusion_loss(model, batch, 4, v.mask, loss_weights(batch, 0.5, 1.0, w_judge=5.0),
                                 masked=masked, complementary=False, validity_weight=1.0, vocab=v)
    logits = model.head(bd3_hidden(model, batch['prompt'], batch['pad'], torch.where(masked, v.mask, resp), resp, 4))
    at = masked & loss_region(resp, batch['resp_len'], 4)
    assert (batch['kind'][at] == 3).any()                             # the judgements' weight is exercised
    w = kind_weights(batch['kind'], 0.5, 1.0, 5.0) * at
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), resp, reduction='none')
    torch.testing.assert_close(parts['ce'], (ce * w).sum() / w.sum())
    want_v = permutation_validity_loss(logits, resp, at, batch['cands'], batch['kind'], v)
    assert want_v > 0
    torch.testing.assert_close(parts['validity_loss'], want_v)


def test_suffix_masks_hide_a_block_from_a_cut_to_its_end():
    from diffusion import noise_blocks
    resp = torch.zeros(64, 24, dtype=torch.long)
    g = lambda: torch.Generator().manual_seed(0)
    masked = noise_blocks(resp, 8, 1, g(), suffix_share=1.0).view(64, 3, 8)
    first = masked.float().argmax(2, keepdim=True)                     # the cut: first masked offset
    offset = torch.arange(8)[None, None, :]
    assert masked.any(2).all()                                           # every block keeps something to learn
    assert torch.equal(masked, offset >= first)                          # ... and it is a suffix
    assert len(first.unique()) == 8                                      # cuts anywhere in the block
    mixed = noise_blocks(resp, 8, 1, g(), suffix_share=0.5).view(64, 3, 8)
    is_suffix = (mixed == (offset >= mixed.float().argmax(2, keepdim=True))).all(2)
    assert 0.3 < is_suffix.float().mean() < 0.9                          # random masks are rarely suffixes
    assert torch.equal(noise_blocks(resp, 8, 1, g()), noise_blocks(resp, 8, 1, g(), suffix_share=0.0))


def test_response_head_decodes_as_the_full_head_restricted_to_response_tokens(tiny_data):
    """The response-sized head (ids < n_out) gives the same tokens as the full head with every item and attribute
    logit removed, at B = 1 and B = 32: the small head changes the cost, not the decoder."""
    d = tiny_data
    v = d.vocab
    full = convert(tiny_model(v, seed=3, full_head=True), v)
    small = convert(tiny_model(v, seed=3), v)
    small.load_state_dict(full.state_dict())
    h = torch.randn(4, 7, full.config.n_embd)
    torch.testing.assert_close(small.head(h), full.head(h)[..., :v.n_out])
    assert small.head(h).shape[-1] == v.n_out < v.size

    full_head = full.head
    def restricted(h, fp32=False, full=False):  # the full head, items and attributes never chosen
        logits = full_head(h, fp32=fp32)
        logits[..., v.n_out:] = -float('inf')
        return logits
    full.head = restricted
    batch = collate(d.splits['test'], range(6), v, block=32)
    for block in (1, 32):
        a = generate_block(full, batch['prompt'], batch['pad'], 64, v, block=block, tau=0.7)
        b = generate_block(small, batch['prompt'], batch['pad'], 64, v, block=block, tau=0.7)
        assert torch.equal(a['tokens'], b['tokens']) and torch.equal(a['steps'], b['steps'])
        torch.testing.assert_close(a['logp'], b['logp'])


def test_certainty_term_is_the_entropy_where_the_prediction_is_right(tiny_data):
    """diffusion_loss's certainty term equals the mean entropy over the masked positions whose argmax is the
    target, from a dense reference; the wrong ones add nothing. One block covers the response, so a masked
    position's prediction does not depend on the targets at masked positions: half of them are set to the
    model's own argmax, so both cases occur (on the model without entry embeddings: with them at test scale, no
    judgement is right under CFT's own mask below, and the skip would not be seen)."""
    d, model, batch = setup(tiny_data, block=4, entries=False)
    v, R = d.vocab, batch['resp'].shape[1]
    masked = noise_blocks(batch['resp'], R, v.mask, torch.Generator().manual_seed(1))
    xt = torch.where(masked, v.mask, batch['resp'])
    with torch.no_grad():
        logits = model.head(bd3_hidden(model, batch['prompt'], batch['pad'], xt, batch['resp'], R)).float()
    at = masked & (torch.arange(R)[None, :] < batch['resp_len'][:, None])
    half = at & (torch.rand(at.shape, generator=torch.Generator().manual_seed(2)) < 0.5)
    batch = dict(batch, resp=torch.where(half, logits.argmax(-1), batch['resp']))
    right = at & (logits.argmax(-1) == batch['resp'])
    assert right.any() and (at & ~right).any()
    logp = logits.log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1)[right].mean()
    w = loss_weights(batch, 1.0, 1.0)
    loss0, parts0 = diffusion_loss(model, batch, R, v.mask, w, masked=masked, complementary=False, vocab=v)
    loss1, parts1 = diffusion_loss(model, batch, R, v.mask, w, masked=masked, complementary=False, vocab=v,
                                   certainty_weight=2.0)
    torch.testing.assert_close(parts1['entropy_right'], expected)
    torch.testing.assert_close(loss1, loss0 + 2.0 * expected, atol=1e-4, rtol=1e-5)
    judged = batch['kind'] == 3  # CFT's loss leaves the judgements out of the term (training.cft_loss)
    assert (right & judged).any() and (right & ~judged).any()
    _, parts2 = diffusion_loss(model, batch, R, v.mask, w, masked=masked, complementary=False, vocab=v,
                               certainty_weight=2.0, certain_at=~judged)
    torch.testing.assert_close(parts2['entropy_right'], -(logp.exp() * logp).sum(-1)[right & ~judged].mean())
    from training import CFTLoss, cft_loss, cft_loss_settings  # CFT's loss leaves the judgements out
    settings = cft_loss_settings(CFTLoss())
    got = cft_loss(model, batch, R, v, settings, torch.Generator().manual_seed(5))[1]['entropy_right']
    weights = loss_weights(batch, settings['w_trace'], settings['w_answer'], True, settings['w_judge'])
    want = [diffusion_loss(model, batch, R, v.mask, weights, vocab=v, generator=torch.Generator().manual_seed(5),
                           certainty_weight=0.5, certain_at=at, validity_weight=1.0)[1]['entropy_right']
            for at in (~judged, None)]
    torch.testing.assert_close(got, want[0])
    assert want[0] != want[1]  # leaving the judgements in would change it


def test_complementary_masks_supervise_each_token_once(tiny_data):
    """With complementary masks (CFT's default) the loss is the weighted mean over the union of the two
    single-mask losses: each example once with its mask and once with the opposite one, so every token of the
    trained region is supervised exactly once."""
    d, model, batch = setup(tiny_data, block=4)
    v = d.vocab
    masked = noise_blocks(batch['resp'], 4, v.mask, torch.Generator().manual_seed(3))
    region = loss_region(batch['resp'], batch['resp_len'], 4)
    w = loss_weights(batch, 0.5, 2.0)
    single = []
    for m in (masked, ~masked):
        loss, _ = diffusion_loss(model, batch, 4, v.mask, w, masked=m, complementary=False)
        single.append((loss, w[m & region].sum()))
    both, _ = diffusion_loss(model, batch, 4, v.mask, w, masked=masked, complementary=True)
    (l1, w1), (l2, w2) = single
    assert (l1 - l2).detach().abs() > 1e-3                                   # the two halves differ, so the test can fail
    torch.testing.assert_close(both, (l1 * w1 + l2 * w2) / (w1 + w2), atol=1e-5, rtol=1e-5)


def test_count_by_kind_splits_trace_and_answer_blocks_by_hand(tiny_data):
    """Tokens and forwards per row: a block holding <answer> or anything after it is an answer block; tokens
    after the first <eos> do not count; a response without <answer> (a direct model) is all answer."""
    from diffusion import count_by_kind
    v = tiny_data.vocab
    s, c = v.slot(0), v.slot(1)
    x = torch.tensor([[s, s, s, s, s, v.answer, c, v.eos],             # trace block, then an answer block
                      [c, s, v.eos, v.mask, v.mask, v.mask, v.mask, v.mask]])  # a direct answer, 3 tokens
    lengths = first_eos_lengths(x, v)
    got = count_by_kind(x, lengths, torch.tensor([[3, 2], [2, 0]]), torch.tensor([6, 3]), 4, v)
    assert {k: t.tolist() for k, t in got.items()} == {
        'n_tokens': [8, 3], 'n_forwards': [6, 3], 'trace_tokens': [4, 0], 'trace_forwards': [3, 0],
        'answer_tokens': [4, 3], 'answer_forwards': [2, 2]}
