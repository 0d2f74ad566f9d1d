"""The AR model: masks, cache, batch/padding invariance, learning, checkpoints."""
import dataclasses
import os

import pytest
import torch

from checkpoints import save_checkpoint, load_checkpoint, CheckpointError
from conftest import tiny_model
from data_beauty import collate
from diffusion import generate_ar
from evaluation import trace_agreement
from model import attention_mask, column_blocks, positions
from reasoning import ROLES, token_roles, trace_entries
from train_ar import ar_response_loss
from training import make_optimizer


def test_block_causal_mask_equals_dense_reference():
    pad = torch.tensor([0, 2, 5])
    P, R, block = 6, 8, 3
    blk, valid = column_blocks(pad, P, R, block)
    cols = torch.arange(P + R)
    m = attention_mask(blk, valid, cols)
    for b in range(3):
        for q in range(P + R):
            for k in range(P + R):
                if q == k:
                    want = True
                elif k < pad[b]:
                    want = False
                elif q < P:
                    want = k <= q                      # the prompt is causal
                elif k < P:
                    want = True                        # the response sees the whole prompt
                else:
                    want = (k - P) // block <= (q - P) // block
                assert bool(m[b, q, k]) == want, (b, q, k)


def full_logits(model, prompt, pad, resp):
    P, R = prompt.shape[1], resp.shape[1]
    x = torch.cat([prompt, resp], 1)
    blk, valid = column_blocks(pad, P, R, 1)
    h = model(x, positions(pad, P + R), attention_mask(blk, valid, torch.arange(P + R)), start=P - pad)
    return model.head(h, fp32=True)


def test_cached_ar_decoding_matches_recomputation(tiny_data):
    d = tiny_data
    model = tiny_model(d.vocab)
    batch = collate(d.splits['test'], range(6), d.vocab)
    out, lengths = generate_ar(model, batch['prompt'], batch['pad'], 20, d.vocab)
    logits = full_logits(model, batch['prompt'], batch['pad'], out)
    P = batch['prompt'].shape[1]
    logits[..., d.vocab.mask] = -float('inf')
    pred = logits[:, P - 1:P - 1 + 20].argmax(-1)
    for r in range(6):
        L = int(lengths[r])
        assert torch.equal(pred[r, :L], out[r, :L])


def test_results_do_not_depend_on_batch_or_padding(tiny_data):
    d = tiny_data
    model = tiny_model(d.vocab)
    sp = d.splits['test']
    order = sorted(range(len(sp)), key=lambda i: len(sp.prompts[i]))
    idx = [order[0], order[-1]]  # the shortest prompt gets the most left padding
    both = collate(sp, idx, d.vocab)
    out2, len2 = generate_ar(model, both['prompt'], both['pad'], 15, d.vocab)
    for r, i in enumerate(idx):
        one = collate(sp, [i], d.vocab)
        out1, len1 = generate_ar(model, one['prompt'], one['pad'], 15, d.vocab)
        assert torch.equal(out1[0, :int(len1[0])], out2[r, :int(len2[r])])
        a = full_logits(model, one['prompt'], one['pad'], one['resp'])[0, -one['resp'].shape[1]:]
        b = full_logits(model, both['prompt'], both['pad'], both['resp'][:, :one['resp'].shape[1]])[r]
        b = b[-one['resp'].shape[1]:]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_padding_gives_no_nan(tiny_data):
    d = tiny_data
    model = tiny_model(d.vocab)
    batch = collate(d.splits['test'], range(8), d.vocab)
    assert (batch['pad'] > 0).any()
    logits = full_logits(model, batch['prompt'], batch['pad'], batch['resp'])
    assert torch.isfinite(logits).all()


def test_tiny_model_overfits_a_batch(tiny_data):
    d = tiny_data
    model = tiny_model(d.vocab, n_embd=64)
    model.train()
    batch = collate(d.splits['train'], range(4), d.vocab)
    opt = make_optimizer(model, 3e-3, 0.0)
    first = None
    for _ in range(150):
        loss = ar_response_loss(model, batch)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_checkpoint_round_trip_and_errors(tiny_data, tmp_path):
    d = tiny_data
    model = tiny_model(d.vocab)
    path = str(tmp_path / 'ar.pt')
    save_checkpoint(path, model, {'data': dataclasses.asdict(d.cfg)}, stage='ar', step=3)
    loaded, ckpt = load_checkpoint(path, stages=['ar'])
    batch = collate(d.splits['test'], range(3), d.vocab)
    a = full_logits(model, batch['prompt'], batch['pad'], batch['resp'])
    b = full_logits(loaded.eval(), batch['prompt'], batch['pad'], batch['resp'])
    assert torch.equal(a, b) and ckpt['step'] == 3
    import json
    meta = json.load(open(tmp_path / 'ar.json'))  # the readable record beside the weights
    assert (meta['stage'], meta['step'], meta['weights']) == ('ar', 3, 'ar.pt') and 'model' not in meta
    with pytest.raises(CheckpointError, match='not found.*train_ar'):
        load_checkpoint(str(tmp_path / 'missing.pt'))
    with pytest.raises(CheckpointError, match="'ar' checkpoint, expected"):
        load_checkpoint(path, stages=['cft'])
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint(str(tmp_path / 'junk.pt'))
    ck = torch.load(path, weights_only=True)
    ck['model_cfg'] = dict(ck['model_cfg'], n_embd=2 * ck['model_cfg']['n_embd'])  # weights of another model
    torch.save(ck, str(tmp_path / 'mixed.pt'))
    with pytest.raises(CheckpointError, match='do not match its recorded model config.*delete it'):
        load_checkpoint(str(tmp_path / 'mixed.pt'))


def test_a_resumed_log_keeps_each_row_once(tmp_path):
    """JsonlLog(keep=n), as a resumed stage opens its log: the rows after the saved state's n are cut (the
    resumed run writes them again); without `keep` a run starts a fresh log."""
    from common import JsonlLog, read_jsonl
    path = str(tmp_path / 'log.jsonl')
    log = JsonlLog(path)
    for step in range(5):
        log.write(step=step)
    assert log.lines() == 5
    assert [r['step'] for r in read_jsonl(JsonlLog(path, keep=3).path)] == [0, 1, 2]
    assert not os.path.exists(JsonlLog(path).path)


def test_choice_accuracy_equals_a_dense_reference(tiny_data):
    """choice_accuracy reads the decision's own position: the argmax over the candidates of the teacher-forced
    logits there, from a full forward; the neighbouring positions score otherwise on this model, so a shifted
    read would fail."""
    from model import response_hidden
    from evaluation import choice_accuracy
    d = tiny_data
    model = tiny_model(d.vocab, seed=1, entries=False)  # at their test scale they make neighbours agree
    sp = d.splits['valid']
    n = min(len(sp), 64)
    b = collate(sp, range(n), d.vocab)
    with torch.no_grad():
        logits = model.head(response_hidden(model, b['prompt'], b['pad'], b['resp']))
    at = (b['kind'] == 2).float().argmax(1)
    picks = lambda offset: logits[torch.arange(n), at + offset].gather(1, b['cands']).argmax(1)
    assert not torch.equal(picks(0), picks(-1)) and not torch.equal(picks(0), picks(1))
    expected = float((picks(0) == b['target']).float().mean())
    assert choice_accuracy(model, sp, d.vocab, torch.device('cpu'), n=n) == pytest.approx(expected)


def test_trace_agreement_by_hand(tiny_data):
    v, sp = tiny_data.vocab, tiny_data.splits['test']
    texts = [[int(t) for t in r] for r in sp.responses[:4]]
    at = texts[0].index(v.best) + 1                                      # the conclusion's slot (fixed-length trace)
    for t in texts:
        t[t.index(v.answer) + 1] = t[at]                                  # every answer starts with its conclusion
    roles = token_roles(torch.as_tensor(sp.responses[0][:at + 1]), torch.as_tensor(sp.kinds[0][:at + 1]), v)
    n_role = {r: int((roles == ROLES.index(r)).sum()) for r in ('weight', 'score', 'marker', 'judgement')}
    agree = trace_agreement(texts, sp, v)
    assert agree.pop('roles') == {r: 1.0 for r in n_role}
    assert agree == {'trace': 1.0, 'conclusion': 1.0, 'follows': 1.0}
    texts[1][0] = v.lead                                                  # a trace token off (a weight starts it)
    texts[2][at] = v.slot(0) if texts[2][at] != v.slot(0) else v.slot(1)  # another conclusion, not followed
    texts[3] = texts[3][:at]                                              # cut before the conclusion
    agree = trace_agreement(texts, sp, v)
    assert agree.pop('roles') == pytest.approx({'weight': 1 - 1 / (4 * n_role['weight']), 'score': 1.0,
                                                'marker': 1.0, 'judgement': 1 - 2 / (4 * n_role['judgement'])})
    assert agree == {'trace': 0.25, 'conclusion': 0.5, 'follows': 0.5}


def test_trace_report_by_hand(tiny_data, monkeypatch):
    """trace_report's shares from planted predictions: the gold token everywhere, sure (p > 0.99), except every
    weight of the first list (wrong), the first match's winner of the second (wrong), and every trace token
    of the third predicted right but unsure. Each share is then a count by hand over the gold responses."""
    import evaluation
    v, sp = tiny_data.vocab, tiny_data.splits['valid']
    n = 6
    resp = [[int(t) for t in sp.responses[i]] for i in range(n)]
    is_weight = lambda t: v.bucket0['weight'] <= t <= v.bucket0['weight'] + 16
    first_match = resp[1].index(v.lead) + 1

    def planted(model, b, vocab, block=1):
        r = b['resp']
        logits = torch.full((*r.shape, vocab.n_out), -20.0).scatter(-1, r[..., None], 20.0)
        for j, t in enumerate(resp[0]):
            if is_weight(t):
                logits[0, j] = logits[0, j].roll(1)                      # argmax on the next token id
        logits[1, first_match] = logits[1, first_match].roll(1)
        trace3 = torch.tensor([k in (0, 3) for k in sp.kinds[2]] + [False] * (r.shape[1] - len(resp[2])))
        logits[2, trace3] = logits[2, trace3] / 20 * 0.1                  # right, but nowhere near 0.99
        return logits

    monkeypatch.setattr(evaluation, 'teacher_forced_logits', planted)
    rep = evaluation.trace_report(torch.nn.Identity(), sp, v, 'cpu', n=n, batch=n)
    weights = [sum(map(is_weight, r)) for r in resp]
    trace = [sum(k in (0, 3) for k in sp.kinds[i]) for i in range(n)]
    assert rep['weight_accuracy'] == pytest.approx(1 - weights[0] / sum(weights))
    assert rep['match_accuracy'] == pytest.approx(1 - 1 / sum(r.count(v.lead) for r in resp))
    assert rep['score_accuracy'] == rep['conclusion_accuracy'] == 1.0
    # unsure: the third list's trace; wrong (so not p > 0.99): the first list's weights, the second's match
    assert rep['trace_p99_share'] == pytest.approx(1 - (trace[2] + weights[0] + 1) / sum(trace))


def test_checkpoints_of_other_data_are_not_read_together():
    """check_data_matches: one protocol setting or one digest apart is refused, naming the checkpoint; where the
    data lies is not part of it."""
    from checkpoints import check_data_matches
    mine = {'run_cfg': {'data': {'n_cand': 10, 'trace': True, 'data_dir': 'a'}, 'data_digests': {'split': 'x'}}}
    check_data_matches(mine, {'data': {'n_cand': 10, 'trace': True, 'data_dir': 'b'}, 'data_digests': {'split': 'x'}},
                       'out/ar.pt')
    with pytest.raises(CheckpointError, match='out/ar.pt was trained with data n_cand=10'):
        check_data_matches(mine, {'data': {'n_cand': 20, 'trace': True}}, 'out/ar.pt')
    with pytest.raises(CheckpointError, match='out/ar.pt was trained on other data'):
        check_data_matches(mine, {'data': {'n_cand': 10}, 'data_digests': {'split': 'y'}}, 'out/ar.pt')


def test_a_run_of_another_config_is_set_aside(tiny_data, tmp_path):
    """A stage started with another configuration than the run whose files sit at its --out: the old checkpoint,
    record and resume state are renamed to <name>.prev.*, nothing is deleted; the same configuration leaves
    them in place (it resumes or overwrites its own run)."""
    from checkpoints import load_resume, save_resume
    from training import make_optimizer
    model = tiny_model(tiny_data.vocab)
    opt = make_optimizer(model, 1e-3, 0.0)
    out = str(tmp_path / 'cft.pt')
    save_checkpoint(out, model, {'lr': 1.0}, stage='cft')
    assert load_resume(out, model, opt, {'lr': 1.0}) is None and os.path.exists(out)      # its own run
    save_resume(out, model, opt, {'lr': 1.0}, 3, {})
    assert load_resume(out, model, opt, {'lr': 2.0}) is None                              # another config
    assert sorted(os.listdir(tmp_path)) == ['cft.prev.json', 'cft.prev.pt', 'cft.prev.pt.resume']


def test_a_candidates_prompt_fields_and_its_trace_entry_share_one_embedding(tiny_data):
    """With the entry embedding, the tokens of candidate 3's prompt entry (from its slot up to the next one) and
    the trace tokens of its entry (reasoning.trace_entries) get one learned vector, and no other token does: read
    from a model without layers, where each output is that token's own input embedding."""
    v, sp = tiny_data.vocab, tiny_data.splits['test']
    b = collate(sp, [0], v)
    x = torch.cat([b['prompt'], b['resp']], 1)
    P, S = b['prompt'].shape[1], x.shape[1]
    model = tiny_model(v, n_layer=0)
    blk, valid = column_blocks(b['pad'], P, S - P, 1)
    forward = lambda: model(x, positions(b['pad'], S), attention_mask(blk, valid, torch.arange(S)), start=P - b['pad'])
    with torch.no_grad():
        model.wee.weight.zero_()
        base = forward()
        model.wee.weight[3] = 1.0
        moved = ((forward() - base).abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
    prompt = x[0, :P].tolist()
    in_prompt = list(range(prompt.index(v.slot(2)), prompt.index(v.slot(3))))
    in_trace = [P + j for j, e in enumerate(trace_entries(v.n_cand)) if e == 3]
    assert moved == in_prompt + in_trace and len(in_trace) == 5
