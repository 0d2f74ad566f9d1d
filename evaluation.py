"""Evaluating a checkpoint under the fixed protocol: decoding a split (AR or block diffusion), its metrics and
per-user record, the teacher-forced reports (the trace's roles, what one denoising step commits), and the data
a checkpoint was trained on. decode.py, the training stages and bench.py all evaluate through here.
"""
from dataclasses import dataclass, fields

import numpy as np
import torch

from common import autocast, Timer
from checkpoints import CheckpointError
from data_beauty import DataConfig, BeautyData, collate
from reasoning import ROLES, answers_from, token_roles, trace_hits
from metrics import (parse_answer, target_rank, metrics_from_ranks, floor_ranks, copies_incoming, first_is_floor_first,
                     copy_share)
from diffusion import bd3_hidden, generate_ar, generate_block, replay_hidden, left_to_right_steps
from model import response_hidden


@dataclass
class Decoding:
    """How a split is decoded: AR (block 0) or block diffusion (block, threshold tau or static k, commit order),
    greedy; batch size and an optional limit on the instances. tau_slot > 0: a list slot (a judgement or an answer
    item) commits at this threshold, every other token at tau (diffusion.generate_block)."""
    block: int = 0
    tau: float = 0.9
    tau_slot: float = 0.0
    k: int = 0
    from_left: bool = False
    batch_size: int = 256
    limit: int = 0


def decode_split(model, data, split, cfg, device, max_new=None):
    """Decode every instance of a split; returns per-instance ranks, validity and decode statistics."""
    vocab = data.vocab
    n = len(split) if not cfg.limit else min(cfg.limit, len(split))
    order = sorted(range(n), key=lambda i: len(split.prompts[i]))  # less padding; results do not depend on it
    max_resp = max_new or (max(len(split.responses[i]) for i in range(n)) + 32)
    ranks, valid, copies, texts, firsts = [0] * n, [False] * n, [False] * n, [None] * n, [True] * n
    stats = {'n_tokens': 0, 'n_forwards': 0, 'trace_tokens': 0, 'trace_forwards': 0, 'answer_tokens': 0,
             'answer_forwards': 0}
    model.eval()
    for b0 in range(0, n, cfg.batch_size):
        idx = order[b0:b0 + cfg.batch_size]
        batch = collate(split, idx, vocab, device=device)
        with autocast(device):
            if cfg.block <= 0:
                out, lengths = generate_ar(model, batch['prompt'], batch['pad'], max_resp, vocab)
                stats['n_tokens'] += int(lengths.sum())
                stats['n_forwards'] += int(lengths.sum())  # one forward per token and sequence (prefill included)
            else:
                max_r = -(-max_resp // cfg.block) * cfg.block
                res = generate_block(model, batch['prompt'], batch['pad'], max_r, vocab, block=cfg.block,
                                     tau=cfg.tau, k=cfg.k, from_left=cfg.from_left, tau_slot=cfg.tau_slot)
                out, lengths = res['tokens'], res['lengths']
                for key in stats:
                    stats[key] += int(res[key].sum())
        out, lengths = out.cpu(), lengths.cpu()  # one copy per batch, not one sync per row
        for r, i in enumerate(idx):
            toks = out[r, :int(lengths[r])].tolist()
            ranking = parse_answer(toks, vocab)
            ranks[i] = target_rank(ranking, split.target[i])
            valid[i] = ranking is not None
            copies[i] = copies_incoming(ranking)
            firsts[i] = first_is_floor_first(ranking)
            texts[i] = toks
    return ranks, valid, copies, firsts, texts, stats


def trace_agreement(texts, split, vocab):
    """How far free decoding follows the data's trace (never the target: the trace is computed without it).
    trace: the whole trace is the data's, token for token; conclusion: the decoded <best> is the data's;
    follows: the answer starts with the decoded <best>; and per trace role (reasoning.ROLES: weights, scores,
    judgements, ...) the share of its positions that hold the data's token (the layout is fixed, so position j
    of every trace has the same role): where a free-decoded trace first goes wrong. Shares over all outputs (a
    missing part disagrees); None for a model trained without the trace."""
    if not texts or vocab.best not in split.responses[0]:
        return None
    counts, role_hits, role_n = np.zeros(3), np.zeros(len(ROLES)), np.zeros(len(ROLES))
    for toks, gold, kind in zip(texts, split.responses, split.kinds):
        gold = [int(t) for t in gold]
        end = gold.index(vocab.best)
        at = toks.index(vocab.best) + 1 if vocab.best in toks else len(toks)
        best = toks[at] if at < len(toks) else None
        answer = toks.index(vocab.answer) + 1 if vocab.answer in toks else len(toks)
        first = toks[answer] if answer < len(toks) else None
        same = trace_hits(toks, gold, vocab)
        counts += [same.all(), best == gold[end + 1], best is not None and first == best]
        roles = token_roles(torch.as_tensor(gold[:end + 2]), torch.as_tensor(kind[:end + 2]), vocab).numpy()
        np.add.at(role_hits, roles, same)
        np.add.at(role_n, roles, 1)
    out = dict(zip(('trace', 'conclusion', 'follows'), (counts / len(texts)).tolist()))
    out['roles'] = {ROLES[r]: float(role_hits[r] / role_n[r]) for r in range(len(ROLES)) if role_n[r]}
    return out


def evaluate(model, data, split_name, cfg, device, max_new=None):
    """Metrics and the per-user record for one split (the schema of results/eval_<name>.json)."""
    split = data.splits[split_name]
    timer = Timer()
    ranks, valid, copies, firsts, texts, stats = decode_split(model, data, split, cfg, device, max_new)
    n = len(ranks)
    out = {'split': split_name, 'n': n, 'metrics': metrics_from_ranks(ranks), 'validity': float(np.mean(valid)),
           'floor': metrics_from_ranks(floor_ranks(split)[:n]),
           'decode': {'mode': 'ar' if cfg.block <= 0 else 'diffusion', 'block': cfg.block or None,
                      'tau': cfg.tau if cfg.block > 0 and cfg.k <= 0 else None, 'k': cfg.k if cfg.block > 0 else None,
                      'tau_slot': cfg.tau_slot if cfg.block > 0 and cfg.k <= 0 and cfg.tau_slot else None,
                      'from_left': cfg.from_left if cfg.block > 0 else None, 'greedy': True},
           'copy_share': copy_share(firsts, split.target[:n]), 'seconds': round(timer(), 2),
           'per_user': {'user': [int(u) for u in split.users[:n]], 'rank': ranks, 'valid': valid, 'copy': copies,
                        'first_is_floor_first': firsts}}
    if stats['n_forwards']:
        out['tokens_per_forward'] = stats['n_tokens'] / stats['n_forwards']
    if stats['trace_forwards']:
        out['tokens_per_forward_trace'] = stats['trace_tokens'] / stats['trace_forwards']
    if stats['answer_forwards']:
        out['tokens_per_forward_answer'] = stats['answer_tokens'] / stats['answer_forwards']
    out['mean_response_tokens'] = stats['n_tokens'] / max(n, 1)
    out['trace_agreement'] = trace_agreement(texts, split, data.vocab)
    return out, texts


def teacher_forced_logits(model, b, vocab, block=1):
    """(B, R, V) fp32 logits of every token of the batch's gold responses: the AR forward, or with block > 1 (a
    diffusion model) the left-to-right state, the tokens left of each one in its block revealed and the rest
    masked (diffusion.left_to_right_steps): the context the AR teacher had, so the two read side by side."""
    with autocast(b['prompt'].device):
        if block == 1:
            h = response_hidden(model, b['prompt'], b['pad'], b['resp'])
        else:
            live = torch.arange(b['resp'].shape[1], device=b['resp'].device)[None, :] < b['resp_len'][:, None]
            steps = left_to_right_steps(live.long(), block)
            h = replay_hidden(model, b['prompt'], b['pad'], b['resp'], steps, block, vocab.mask)
    logits = model.head(h, fp32=True)
    logits[..., vocab.mask] = -float('inf')  # never an answer; a converted model has not learnt that yet
    return logits


@torch.no_grad()
def trace_report(model, split, vocab, device, n=512, batch=32, block=1):
    """Teacher-forced on the gold traces of a split: the share of trace tokens predicted with probability > 0.99
    (how much of the trace is near-certain restatement rather than inference; reported beside every result), the
    accuracy of each role of the trace (reasoning.ROLES: the weights it looks up, the scores it adds,
    the matches' winners), of the conclusion, and whether the decision (the first ranked slot) is the conclusion
    where that departs from the pre-ranker's first, c1 (the decision's rare case); for a diffusion model at the
    left-to-right state (teacher_forced_logits)."""
    model.eval()
    counts = {k: [0, 0] for k in ('p99', 'weight', 'score', 'match', 'best', 'depart')}
    batch = max(1, batch // block)  # a diffusion batch stacks one state per offset in the block
    for a in range(0, min(n, len(split)), batch):
        b = collate(split, range(a, min(n, len(split), a + batch)), vocab, block=block, device=device)
        resp, R = b['resp'], b['resp'].shape[1]
        live = torch.arange(R, device=device)[None, :] < b['resp_len'][:, None]
        logits = teacher_forced_logits(model, b, vocab, block)
        p = logits.softmax(-1).gather(-1, resp[..., None]).squeeze(-1)  # (B, R)
        pred = logits.argmax(-1)
        right = pred == resp
        before = torch.cat([torch.full_like(resp[:, :1], -1), resp[:, :-1]], 1)
        role = token_roles(resp, b['kind'], vocab)
        trace = ((b['kind'] == 0) | (b['kind'] == 3)) & live
        concluded = b['concluded'][:, None]  # -1 without a trace
        depart = (b['kind'] == 2) & (concluded >= 0) & (concluded != vocab.slot(0))
        for key, where, hit in (('p99', trace, p > 0.99), ('weight', role == ROLES.index('weight'), right),
                                ('score', trace & (role == ROLES.index('score')), right),
                                ('match', trace & (before == vocab.lead), right),
                                ('best', before == vocab.best, right), ('depart', depart, pred == concluded)):
            counts[key][0] += int((hit & where & live).sum())
            counts[key][1] += int((where & live).sum())
    share = {k: hits / max(total, 1) for k, (hits, total) in counts.items()}
    return {'trace_p99_share': share['p99'], 'weight_accuracy': share['weight'], 'score_accuracy': share['score'],
            'match_accuracy': share['match'], 'conclusion_accuracy': share['best'],
            'departure_accuracy': share['depart'], 'departures': counts['depart'][1]}


@torch.no_grad()
def choice_accuracy(model, split, vocab, device, n=1024, batch=64):
    """Teacher-forced R@1 of the decision alone: at the first answer position (full gold trace as context),
    the most probable of the N candidate tokens. Separates 'cannot point at a candidate yet' from 'points at the
    wrong one' while validity is still low. The floor (always the first candidate) scores R@1 of the floor."""
    model.eval()
    hits, total = 0, 0
    for a in range(0, min(n, len(split)), batch):
        idx = range(a, min(n, len(split), a + batch))
        b = collate(split, idx, vocab, device=device)
        with autocast(device):
            h = response_hidden(model, b['prompt'], b['pad'], b['resp'])
        at = (b['kind'] == 2).float().argmax(1)                               # the choice token's position
        logits = model.head(h[torch.arange(len(at), device=device), at], fp32=True)  # (B, V)
        pick = logits.gather(1, b['cands']).argmax(1)
        hits += int((pick == b['target']).sum())
        total += len(at)
    return hits / max(total, 1)


def teacher_report(model, data, device):
    """The kept teacher teacher-forced on validation: how it writes the trace, and the answer after each decision."""
    record = trace_report(model, data.splits['valid'], data.vocab, device)
    record['skip_by_decision'] = skip_report(model, data.splits['valid'], data.vocab, device)
    print("the trace, teacher-forced on validation: share of tokens predicted with p > 0.99 {trace_p99_share:.3f}; "
          "accuracy of the weights {weight_accuracy:.3f}, the scores {score_accuracy:.3f}, the matches "
          "{match_accuracy:.3f}, the conclusion {conclusion_accuracy:.3f}, the decision where the conclusion is "
          "not c1 {departure_accuracy:.3f} (of {departures})".format(**record))
    print("the answer's rest after each decision c1 .. cN, teacher-forced (rows exactly right): "
          + ' '.join(f"{share:.2f}" for share in record['skip_by_decision']))
    return record


@torch.no_grad()
def skip_report(model, split, vocab, device, n=256, batch=32, block=1):
    """Teacher-forced on the gold traces with each slot in turn written as the decision: per decision, the share of
    answers whose rest (the other slots in the pre-ranker's order, then <eos>) the model predicts exactly. The rest
    must leave out the slot written first; a teacher that learnt this only for the decisions it saw often writes
    an invalid ranking wherever it decides otherwise (FINDINGS, "The answer's skip")."""
    model.eval()
    right, total = torch.zeros(vocab.n_cand), 0
    for a in range(0, min(n, len(split)), batch):
        b = collate(split, range(a, min(n, len(split), a + batch)), vocab, block=block, device=device)
        live = torch.arange(b['resp'].shape[1], device=device)[None, :] < b['resp_len'][:, None]
        rest, every = (b['kind'] == 1) & live, torch.ones(len(live), dtype=torch.bool, device=device)
        for slot in range(vocab.n_cand):
            resp = answers_from(b['resp'], b['kind'], torch.full((len(live),), slot, device=device), every, vocab)
            pred = teacher_forced_logits(model, {**b, 'resp': resp}, vocab, block).argmax(-1)
            right[slot] += int(((pred == resp) | ~rest).all(1).sum())
        total += len(live)
    return (right / max(total, 1)).tolist()


@torch.no_grad()
def first_step_report(model, split, vocab, device, block, tau, n=512, batch=32):
    """What one denoising step can commit: every response token predicted with its whole block masked and the
    blocks before it clean (the state at the first step of each block), by role (reasoning.ROLES): the share
    right, the share predicted with confidence >= tau (what the threshold rule commits at once), and the share
    of those that are wrong."""
    model.eval()
    count = torch.zeros(len(ROLES), 4, dtype=torch.long)  # tokens, right, sure, sure and wrong
    for a in range(0, min(n, len(split)), batch):
        b = collate(split, range(a, min(n, len(split), a + batch)), vocab, block=block, device=device)
        resp, R = b['resp'], b['resp'].shape[1]
        live = torch.arange(R, device=device)[None, :] < b['resp_len'][:, None]
        with autocast(device):
            h = bd3_hidden(model, b['prompt'], b['pad'], torch.full_like(resp, vocab.mask), resp, block)
        logits = model.head(h[live], fp32=True)
        logits[:, vocab.mask] = -float('inf')
        conf, pred = logits.softmax(-1).max(-1)
        role, right, sure = token_roles(resp, b['kind'], vocab)[live], pred == resp[live], conf >= tau
        for column, hit in enumerate((torch.ones_like(right), right, sure, sure & ~right)):
            count[:, column] += torch.bincount(role[hit].cpu(), minlength=len(ROLES))
    total = count[:, 0].clamp(min=1)
    return {name: {'tokens': int(count[r, 0]), 'right': float(count[r, 1] / total[r]),
                   'sure': float(count[r, 2] / total[r]), 'sure_wrong': float(count[r, 3] / total[r])}
            for r, name in enumerate(ROLES)}


def load_data_for(ckpt, data_dir):
    """The data a checkpoint was trained on (same trace setting, same vocabulary). A checkpoint from before a
    change of the token vocabulary (a new evidence bucket, a new special token) cannot read today's data."""
    recorded = {**ckpt['run_cfg']['data'], 'data_dir': data_dir}
    unknown = sorted(set(recorded) - {f.name for f in fields(DataConfig)})
    if unknown:
        raise CheckpointError(f"the checkpoint was trained under an older data protocol (settings {unknown} are gone): "
                              f"retrain it from the AR stage (python train_ar.py, then the later stages)")
    data = BeautyData(DataConfig(**recorded))
    n_out = ckpt['model_cfg'].get('n_out', 0)
    if data.vocab.size != ckpt['model_cfg']['vocab_size'] or n_out not in (0, data.vocab.n_out):  # 0: a full head
        raise CheckpointError(f"the checkpoint has a vocabulary of {ckpt['model_cfg']['vocab_size']} tokens "
                              f"({n_out or 'all'} output) but the data in {data_dir} encodes {data.vocab.size} "
                              f"({data.vocab.n_out} output): pass the --data_dir it was trained on (it recorded "
                              f"{ckpt['run_cfg']['data'].get('data_dir')!r}), or retrain it on this data from the AR "
                              f"stage (python train_ar.py, then the later stages)")
    trained_on = ckpt['run_cfg'].get('data_digests')
    if trained_on and trained_on != data.fingerprint():
        raise CheckpointError(f"the checkpoint was trained on other data than {data_dir} gives now (digests "
                              f"{trained_on} against {data.fingerprint()}): pass the --data_dir it was trained on, "
                              f"or retrain it from the AR stage (python train_ar.py, then the later stages)")
    return data
