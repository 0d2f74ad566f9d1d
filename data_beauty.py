"""Amazon Beauty (5-core) as a re-ranking task: split, pre-ranker, candidate lists, reasoning traces, metrics.

    python data_beauty.py                                  # real data from ../shared/data/beauty (~1 min, cached after)
    python data_beauty.py --data_dir=path/to/folder        # any folder with Beauty.txt + Beauty_item2attributes.json
    python data_beauty.py --raw_dir=path/to/raw            # build that format from the raw Amazon dump
                                                           # (reviews_Beauty_5.json.gz + meta_Beauty.json.gz)

Protocol (SPEC "Evaluation protocol"): leave-one-out; a co-occurrence pre-ranker hands the re-ranker its top
N = 10; a user is an instance iff the target is in that list. Every statistic comes from the train part, and a
window predicting position t never sees the user's own interactions at positions >= t-1, so the target's own
transition cannot inflate its score (the same rule at test, where the validation item is not in the stats).
"""
import gzip
import hashlib
import json
import os
import ast
import inspect
from collections import defaultdict
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DataConfig:
    data_dir: str = '../shared/data/beauty'
    name: str = 'Beauty'
    raw_dir: str = ''           # if set: build <name>.txt + <name>_item2attributes.json there from the raw Amazon files
    n_cand: int = 10            # N, the re-ranked list length
    max_hist: int = 10          # history items shown in the prompt (most recent last)
    cooc_window: int = 5        # pre-ranker: pairs (a then b) up to this many steps apart count ...
    cooc_decay: float = 0.7     # ... with weight decay^(gap-1)
    hist_items: int = 3         # pre-ranker scores from the last m history items ...
    hist_decay: float = 0.5     # ... weighted decay^k, k = 0 for the last one
    evidence_hist: int = 5      # the trace's 'prev' evidence: co-occurrence with history items 2..this (decayed alike)
    link_window: int = 3        # attribute transitions (an item's attributes then a later one's) up to this gap ...
    link_prior: float = 10.0    # ... smoothed toward no link with this many pseudo-transitions
    pop_weight: float = 1e-3    # log-popularity tie-break
    trace: bool = True          # False: the direct model (prompt -> answer)
    cache_dir: str = 'out/cache'


class DataError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- loading

def load_5core(data_dir, name='Beauty'):
    """Read `<name>.txt` (user item item ... in time order) and `<name>_item2attributes.json`."""
    seq_path = os.path.join(data_dir, f'{name}.txt')
    attr_path = os.path.join(data_dir, f'{name}_item2attributes.json')
    how = (f"Point --data_dir at a folder with {name}.txt and {name}_item2attributes.json (the 5-core files as "
           f"preprocessed for S3-Rec), or build them with --raw_dir=<folder with reviews_{name}_5.json.gz and "
           f"meta_{name}.json.gz>.")
    for p in (seq_path, attr_path):
        if not os.path.isfile(p):
            raise DataError(f"missing data file {p}. {how}")
    seqs = []
    with open(seq_path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                items = [int(x) for x in parts[1:]]
            except ValueError:
                raise DataError(f"{seq_path}:{lineno} is malformed (expected integers 'user item item ...'). {how}")
            if len(items) < 3:
                raise DataError(f"{seq_path}:{lineno}: a user needs >= 3 items for a leave-one-out split")
            seqs.append(np.array(items, dtype=np.int64))
    try:
        with open(attr_path) as f:
            raw = json.load(f)
        item_attrs = {int(k): list(dict.fromkeys(int(a) for a in v)) for k, v in raw.items()}  # no repeats
    except (ValueError, AttributeError, TypeError) as e:
        raise DataError(f"{attr_path} is malformed ({e}): expected {{item: [attribute ids]}}. {how}")
    n_items = max(int(max(s.max() for s in seqs)), max(item_attrs, default=0))
    n_attrs = max((a for v in item_attrs.values() for a in v), default=0)
    attrs = [item_attrs.get(i, []) for i in range(n_items + 1)]  # index 0 unused
    return seqs, attrs, n_items, n_attrs


def build_from_raw(raw_dir, out_dir, name='Beauty'):
    """Best effort S3-Rec preprocessing: 5-core user/item filter, time order, ids by first appearance,
    attributes = brand + category path (the top category, shared by every item, dropped)."""
    reviews = os.path.join(raw_dir, f'reviews_{name}_5.json.gz')
    meta = os.path.join(raw_dir, f'meta_{name}.json.gz')
    for p in (reviews, meta):
        if not os.path.isfile(p):
            raise DataError(f"missing raw file {p} (Amazon product data, McAuley et al. 2014)")
    events = []
    with gzip.open(reviews, 'rt') as f:
        for line in f:
            r = json.loads(line)
            events.append((r['reviewerID'], r['asin'], int(r['unixReviewTime'])))
    while True:  # k-core: repeat until every user and item has >= 5 interactions
        uc, ic = defaultdict(int), defaultdict(int)
        for u, i, _ in events:
            uc[u] += 1
            ic[i] += 1
        kept = [e for e in events if uc[e[0]] >= 5 and ic[e[1]] >= 5]
        if len(kept) == len(events):
            break
        events = kept
    by_user = defaultdict(list)
    for u, i, t in events:
        by_user[u].append((t, i))
    user_ids, item_ids = {}, {}
    lines = []
    for u in by_user:  # users in first-appearance order
        items = [i for _, i in sorted(by_user[u], key=lambda x: x[0])]
        user_ids[u] = len(user_ids) + 1
        for i in items:
            item_ids.setdefault(i, len(item_ids) + 1)
        lines.append(f"{user_ids[u]} " + ' '.join(str(item_ids[i]) for i in items))
    attr_ids, item2attr = {}, {}
    with gzip.open(meta, 'rt') as f:
        for line in f:
            m = ast.literal_eval(line)  # the 2014 dump is python-literal, not JSON
            if m.get('asin') not in item_ids:
                continue
            names = ([f"brand:{m['brand']}"] if m.get('brand') else [])
            for path in m.get('categories', [])[:1]:
                names += [f"cat:{c}" for c in path[1:]]
            item2attr[str(item_ids[m['asin']])] = [attr_ids.setdefault(a, len(attr_ids) + 1) for a in names]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{name}.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(out_dir, f'{name}_item2attributes.json'), 'w') as f:
        json.dump(item2attr, f)


# ----------------------------------------------------------------------------- vocabulary

SCORE_MAX = 4  # the running evidence score is clipped to [-4, 4] (the sums on Beauty stay within [-3.75, 3.5])

BUCKETS = {  # evidence token families: name -> upper edges of the buckets (the last bucket is open)
    'last': [0, 1, 2, 4, 8, 16],         # co-occurrence with the last history item
    'prev': [0, 1, 2, 4, 8, 16],         # co-occurrence with the history items before the last one
    'link': [0, 0.5, 1, 1.5, 2, 2.5, 3, 4],  # attribute link to the last history item (log lift, link_evidence)
    'pop': [1, 3, 7, 15, 31, 63, 127],   # train interactions (log buckets)
    'score': [x / 4 for x in range(-4 * SCORE_MAX, 4 * SCORE_MAX)],  # running evidence score: -4 .. 4 in quarters
}
SPECIALS = ['<eos>', '<bos>', '<mask>', '<cands>', '<think>', '<answer>', '<best>', '<lead>']


class Vocab:
    """One token space: specials, list slots, evidence buckets, attributes, items (items last).

    The slots c1..cN name the N places of the pre-ranker's list, as [1]..[N] do in LLM list re-rankers: the
    prompt shows each candidate as `c_i item ...`, and the answer is a permutation of slots. Writing `c4` then
    copying the item that follows `c4` in the prompt is a plain induction pattern; copying a raw item id from
    a 12k-token space without the slot was the slowest skill for a small model to learn here."""

    def __init__(self, n_items, n_attrs, n_cand=10):
        self.n_items, self.n_attrs, self.n_cand = n_items, n_attrs, n_cand
        self.names = list(SPECIALS)
        self.slot0 = len(self.names)
        self.names += [f"c{i + 1}" for i in range(n_cand)]
        self.bucket0 = {}
        for fam, edges in BUCKETS.items():
            self.bucket0[fam] = len(self.names)
            self.names += [f"{fam}{i}" if fam != 'score' else f"s{(i - 4 * SCORE_MAX) / 4:+.2f}"  # its value
                           for i in range(len(edges) + 1)]
        self.attr0 = len(self.names) - 1   # attribute ids start at 1
        self.item0 = self.attr0 + n_attrs  # item ids start at 1
        self.size = self.item0 + n_items + 1
        self.eos, self.bos, self.mask, self.cands, self.think, self.answer, self.best, self.lead = range(8)

    @property
    def slots(self):
        """The N slot tokens: the answer's alphabet (a ranking is a permutation of them)."""
        return list(range(self.slot0, self.slot0 + self.n_cand))

    def slot(self, i):
        return self.slot0 + int(i)

    def is_slot(self, tok):
        return (tok >= self.slot0) & (tok < self.slot0 + self.n_cand)

    def item(self, i):
        return self.item0 + int(i)

    def attr(self, a):
        return self.attr0 + int(a)

    def bucket(self, fam, value):
        return self.bucket0[fam] + int(np.searchsorted(BUCKETS[fam], value, side='left'))

    def token_str(self, t):
        t = int(t)
        if t < len(self.names):
            return self.names[t]
        if t > self.item0:
            return f"i{t - self.item0}"
        return f"a{t - self.attr0}"

    def decode(self, toks):
        return ' '.join(self.token_str(t) for t in toks)


# ----------------------------------------------------------------------------- statistics and pre-ranker

def cooc_matrix(seqs, n_items, window, decay):
    """C[a, b] = sum over train pairs 'a then b' within `window` steps of decay^(gap-1)."""
    C = np.zeros((n_items + 1, n_items + 1), dtype=np.float32)
    for s in seqs:
        for g in range(1, min(window, len(s) - 1) + 1):
            np.add.at(C, (s[:-g], s[g:]), np.float32(decay ** (g - 1)))
    return C


def windows_of(seqs):
    """All (user, t) windows: train windows t = 1..n-3, validation t = n-2, test t = n-1."""
    users, ts, split = [], [], []
    for u, s in enumerate(seqs):
        n = len(s)
        for t in range(1, n):
            users.append(u)
            ts.append(t)
            split.append(0 if t <= n - 3 else (1 if t == n - 2 else 2))
    return np.array(users), np.array(ts), np.array(split)


def prerank(seqs, C, pop, users, ts, cfg, batch=1024, leave_out=True):
    """Top-N candidates for each window with leave-out statistics (SPEC item 7).

    Returns cands (n, N) item ids in the pre-ranker's order, and leave-out evidence for them: co-occurrence with
    the last history item, with the `evidence_hist` - 1 items before it (decayed as the pre-ranker's), popularity."""
    n, N, m = len(users), cfg.n_cand, cfg.hist_items
    E = max(m, cfg.evidence_hist)
    w = np.array([cfg.hist_decay ** k for k in range(m)], dtype=np.float32)
    w_prev = np.array([cfg.hist_decay ** (k - 1) for k in range(1, cfg.evidence_hist)], dtype=np.float32)
    cands = np.zeros((n, N), np.int64)
    ev_last, ev_prev, ev_pop = (np.zeros((n, N), np.float32) for _ in range(3))
    for b0 in range(0, n, batch):
        b1 = min(n, b0 + batch)
        R = []  # R[k]: (nb, I) leave-out co-occurrence rows of the k-th most recent history item
        for k in range(E):
            h = np.array([seqs[u][t - 1 - k] if t - 1 - k >= 0 else 0 for u, t in zip(users[b0:b1], ts[b0:b1])])
            Rk = C[h].copy()
            Rk[h == 0] = 0
            R.append(Rk)
        popb = np.broadcast_to(pop, (b1 - b0, len(pop))).copy()
        for r, (u, t) in enumerate(zip(users[b0:b1], ts[b0:b1])):
            if not leave_out:
                break
            s, L = seqs[u], len(seqs[u]) - 2           # the user's train part is s[:L]
            q = np.arange(max(t - 1, 0), L)           # train positions >= t-1: left out of the statistics
            popb[r, s[q]] -= 1
            for k in range(E):
                p = t - 1 - k
                if p < 0 or p >= L:
                    continue  # no history item, or one outside the train part (nothing of it in C)
                gap = q - p
                ok = (gap >= 1) & (gap <= cfg.cooc_window)
                R[k][r, s[q[ok]]] -= cfg.cooc_decay ** (gap[ok] - 1)
        cooc = sum(w[k] * R[k] for k in range(m))
        score = cooc + cfg.pop_weight * np.log1p(np.maximum(popb, 0))
        score[:, 0] = -np.inf
        for r, (u, t) in enumerate(zip(users[b0:b1], ts[b0:b1])):
            score[r, seqs[u][:t]] = -np.inf             # never return a history item
        top = np.argpartition(-score, N, axis=1)[:, :N]
        top_score = np.take_along_axis(score, top, 1)
        order = np.lexsort((top, -top_score), axis=1)    # score desc, then item id: deterministic
        top = np.take_along_axis(top, order, 1)
        rows = np.arange(b1 - b0)[:, None]
        cands[b0:b1] = top
        ev_last[b0:b1] = np.maximum(R[0][rows, top], 0)
        ev_prev[b0:b1] = np.maximum(sum(w_prev[k - 1] * R[k][rows, top] for k in range(1, cfg.evidence_hist)), 0)
        ev_pop[b0:b1] = np.maximum(popb[rows, top], 0)
    return cands, ev_last, ev_prev, ev_pop


def attr_transitions(seqs, attrs, n_attrs, window):
    """A[a, b] = how often an item with attribute a is followed within `window` steps by one with attribute b."""
    A = np.zeros((n_attrs + 1, n_attrs + 1))
    for s in seqs:
        for g in range(1, window + 1):
            for x, y in zip(s[:-g], s[g:]):
                A[np.ix_(attrs[x], attrs[y])] += 1
    return A


def link_evidence(seqs, attrs, A, users, ts, cands, cfg, leave_out=True):
    """(n, N) attribute link of each candidate to the last history item: the largest log lift
    log P(next has b | has a) / P(b) over its attributes b and the last item's attributes a. It generalises the
    item co-occurrence to rare items through their brand and category. P is smoothed toward P(b) with
    `link_prior` pseudo-transitions; the window's own transitions from positions >= t-1 are left out (SPEC 7)."""
    row, col, total = A.sum(1), A.sum(0), A.sum()
    out = np.zeros(cands.shape, np.float32)
    for j, (u, t) in enumerate(zip(users, ts)):
        s = seqs[u]
        last = attrs[s[t - 1]]
        if not last:
            continue
        own, own_row, own_col, own_total = defaultdict(float), defaultdict(float), defaultdict(float), 0.0
        L = len(s) - 2 if leave_out else 0  # the user's train part is s[:len - 2]; its positions >= t-1 come out
        for q2 in range(max(t - 1, 1), L):
            for q1 in range(max(0, q2 - cfg.link_window), q2):
                ax, ay = attrs[s[q1]], attrs[s[q2]]
                own_total += len(ax) * len(ay)
                for a in ax:
                    own_row[a] += len(ay)
                    for b in ay:
                        own[a, b] += 1
                for b in ay:
                    own_col[b] += len(ax)
        for i, c in enumerate(cands[j]):
            lifts = []
            for b in attrs[c]:
                base = (col[b] - own_col[b]) / (total - own_total)
                for a in last:
                    p = (A[a, b] - own[a, b] + cfg.link_prior * base) / (row[a] - own_row[a] + cfg.link_prior)
                    lifts.append(np.log(p / base) if base > 0 else 0.0)
            out[j, i] = max(lifts, default=0.0)
    return out


# ----------------------------------------------------------------------------- traces and encoding

EVIDENCE = ('last', 'prev', 'link', 'pop')  # the rows of an instance's `ev` (4, N): its candidates' statistics


def evidence_buckets(ev):
    """(4, N) bucket index of each candidate's statistic in each EVIDENCE family."""
    return np.stack([np.searchsorted(BUCKETS[fam], ev[f], side='left') for f, fam in enumerate(EVIDENCE)])


def stat_tokens(ev, i, vocab):
    """Candidate i's leave-out statistics as bucket tokens: co-occurrence with the last history item and with the
    items before it, attribute link to the last item, popularity."""
    return [vocab.bucket(fam, ev[f][i]) for f, fam in enumerate(EVIDENCE)]


def evidence_features(ev):
    """(N, F) what a candidate's trace entry adds up: one-hot buckets of its statistics (EVIDENCE), then its position
    in the pre-ranker's list. (Attribute-share counts were tried as well: their fitted weights were within 0.11 of
    zero, and dropping them left the conclusion's validation R@1 where it was.)"""
    b = evidence_buckets(ev)
    N = b.shape[1]
    onehots = [np.eye(len(BUCKETS[fam]) + 1, dtype=np.float32)[b[f]] for f, fam in enumerate(EVIDENCE)]
    return np.concatenate(onehots + [np.eye(N, dtype=np.float32)], 1)


def fit_evidence_weights(features, target, steps=500, lr=0.03, weight_decay=1e-3):
    """Weights of an additive evidence score, fitted on TRAIN windows only: a conditional logit over each list
    (softmax over its N candidates), rounded to quarters so that the trace's running sums are exact on the grid of
    its score tokens. It plays the part of GR2's larger teacher LLM, whose traces end in a judgement: the trace
    states each candidate's score and concludes with the best one, all computable from the prompt without the
    target. features (n, N, F), target (n,) -> (F,) weights."""
    X, y = torch.as_tensor(features), torch.as_tensor(target)
    w = torch.zeros(X.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):  # full batch from zeros: deterministic
        loss = F.cross_entropy(X @ w, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.round(w.detach().numpy().astype(np.float64) * 4) / 4


def running_scores(ev, score_w):
    """(N, 4) each candidate's running evidence score after each of its statistics: it starts at the weight of the
    candidate's list position and adds one statistic's weight per step (clipped to the score tokens' range), so
    every score token the trace writes is the last one plus the weight of the bucket token just before it, a
    one-step lookup; a single token for the whole sum (ten terms) was right about half the time for a 2-layer
    model. Weights are quarters and the sums exact."""
    b = evidence_buckets(ev)
    start = np.cumsum([0] + [len(BUCKETS[fam]) + 1 for fam in EVIDENCE])  # each family's block in evidence_features
    score = score_w[start[-1]:start[-1] + b.shape[1]]  # the position weights come last
    steps = []
    for f in range(len(EVIDENCE)):
        score = np.clip(score + score_w[start[f] + b[f]], -SCORE_MAX, SCORE_MAX)
        steps.append(score)
    return np.stack(steps, 1)


def conclusion(score_buckets):
    """The trace's conclusion: the first candidate (pre-ranker order) among those with the highest score bucket,
    so that it follows from the score tokens the trace has just written."""
    return int(np.argmax(score_buckets))


def encode(hist, cands, target_idx, ev, attrs, vocab, score_w, trace=True):
    """Prompt, response and per-token kind (0 trace, 1 answer, 2 the choice: the first ranked item, the one token
    that moves the ranking, 3 the trace's judgements: the slot of each running leader and of the conclusion) for
    one instance.

    prompt   = <bos> (item attrs..)*history <cands> (slot last prev link pop item attrs..)*N <think>|<answer>
    trace    = per candidate: its slot, then each of its statistics (EVIDENCE) followed by the running evidence
               score (running_scores), then the running leader `<lead> slot score` (the best so far: a comparison
               of two score tokens per step, where an argmax over ten far-apart tokens was the step small models
               failed); then the conclusion <best> slot (the last leader). The statistics come with the prompt,
               as retrieved item facts do in an LLM re-ranker's prompt (a small model cannot recall pair counts
               it never sees), right after the slot, so the trace reads them at a fixed offset from it; the
               item id is not restated (copying a 12k-way id is what a small model got wrong most, and a wrong
               copy derailed the rest of the entry)
    answer   = <answer> the target's slot, then the other slots in the pre-ranker's order, <eos>
    The trace reads only the prompt, leave-out statistics and the train-fitted `score_w`; `target_idx` only
    shapes the answer."""
    prompt = [vocab.bos]
    for h in hist:
        prompt += [vocab.item(h)] + [vocab.attr(a) for a in attrs[h]]
    prompt.append(vocab.cands)
    for i, c in enumerate(cands):  # each candidate: its retrieved statistics, the item and its attributes
        prompt += [vocab.slot(i)] + stat_tokens(ev, i, vocab) + [vocab.item(c)] + [vocab.attr(a) for a in attrs[c]]
    prompt.append(vocab.think if trace else vocab.answer)
    response, kind = [], []
    if trace:
        steps = [[vocab.bucket('score', x) for x in row] for row in running_scores(ev, score_w)]
        score_tok = [row[-1] for row in steps]
        for i in range(len(cands)):
            response.append(vocab.slot(i))
            for stat, score in zip(stat_tokens(ev, i, vocab), steps[i]):
                response += [stat, score]
            lead = conclusion(score_tok[:i + 1])
            response += [vocab.lead, vocab.slot(lead), score_tok[lead]]
        response += [vocab.best, vocab.slot(conclusion(score_tok)), vocab.answer]
        kind = [3 if prev in (vocab.lead, vocab.best) else 0 for prev in [None] + response[:-1]]
    order = [target_idx] + [i for i in range(len(cands)) if i != target_idx]
    answer = [vocab.slot(i) for i in order] + [vocab.eos]
    return prompt, response + answer, kind + [2] + [1] * (len(answer) - 1)


def kind_weights(kind, w_trace, w_answer, w_choice, w_judge=None):
    """Per-token loss weights from the token kinds of encode() (the judgements weigh as the trace by default)."""
    w_judge = w_trace if w_judge is None else w_judge
    return torch.tensor([w_trace, w_answer, w_choice, w_judge], device=kind.device)[kind]


def loss_weights(batch, w_trace, w_answer, w_choice, reject=False, w_judge=None):
    """(B, R) loss weights by token kind. With `reject`, the decision (the first ranked slot) of a window whose
    trace concludes on another candidate than its target carries no loss: GR2 kept only the teacher traces that
    reach the target (rejection sampling). Here the programmatic trace is sound reasoning either way, so its
    tokens still teach, and so does the rest of the answer (writing out the permutation); only the decision that
    contradicts the trace is dropped. Without it the decision is learnt from a weak signal: the conclusion differs
    from the first candidate on 11% of train windows and is then the target 30% of the time.
    `w_judge` weighs the trace's judgements (kind 3): a running leader changes about once a list, so a model
    that always repeats the last leader is right 98% of the time at the trace's weight, and a small one did
    exactly that (it concluded c1 on 99% of lists where the trace concludes elsewhere on 16%)."""
    w = kind_weights(batch['kind'], w_trace, w_answer, w_choice, w_judge)
    if reject:
        w = w * ((batch['kind'] != 2) | batch['follows'][:, None])
    return w


class Split:
    """Instances of one split as ragged token arrays plus their candidates, target and user."""

    def __init__(self, prompts, responses, kinds, cands, target, users, ts):
        self.prompts, self.responses, self.kinds = prompts, responses, kinds
        self.cands, self.target, self.users, self.ts = cands, target, users, ts

    def __len__(self):
        return len(self.prompts)

    def subset(self, idx):
        idx = list(idx)
        return Split([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                     [self.kinds[i] for i in idx], self.cands[idx], self.target[idx], self.users[idx], self.ts[idx])


def collate(split, idx, vocab, block=1, device='cpu'):
    """Left-pad prompts to P, right-pad responses with <eos> to R (a multiple of `block`).

    Left padding puts every response at the same columns, so a block covers the same columns in every row."""
    idx = list(idx)
    P = max(len(split.prompts[i]) for i in idx)
    R = max(len(split.responses[i]) for i in idx)
    R = -(-R // block) * block
    prompt = torch.full((len(idx), P), vocab.eos, dtype=torch.long)
    resp = torch.full((len(idx), R), vocab.eos, dtype=torch.long)
    kind = torch.ones((len(idx), R), dtype=torch.long)
    pad = torch.zeros(len(idx), dtype=torch.long)
    resp_len = torch.zeros(len(idx), dtype=torch.long)
    for r, i in enumerate(idx):
        p, x, k = split.prompts[i], split.responses[i], split.kinds[i]
        pad[r] = P - len(p)
        prompt[r, P - len(p):] = torch.as_tensor(p)
        resp[r, :len(x)] = torch.as_tensor(x)
        kind[r, :len(k)] = torch.as_tensor(k)
        resp_len[r] = len(x)
    cands = torch.as_tensor(vocab.slots).repeat(len(idx), 1)  # the answer's alphabet, per row
    # does the trace conclude (the slot after <best>) on the target (the first ranked slot)? loss_weights' `reject`
    at_best = resp == vocab.best
    concluded = resp.gather(1, (at_best.long().argmax(1, keepdim=True) + 1).clamp(max=R - 1))
    chosen = resp.gather(1, (kind == 2).long().argmax(1, keepdim=True))
    follows = ~at_best.any(1) | (concluded == chosen).squeeze(1)  # a direct model has no trace to contradict
    return dict(prompt=prompt.to(device), pad=pad.to(device), resp=resp.to(device), kind=kind.to(device),
                resp_len=resp_len.to(device), cands=cands.to(device), follows=follows.to(device),
                target=torch.as_tensor(split.target[idx]).to(device))


# ----------------------------------------------------------------------------- the data set

def cached(path, build):
    """torch.load(path) if it exists, else build() saved there atomically (plain containers only)."""
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    blob = build()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # two scripts building the same cache at once each write their own
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return blob


class BeautyData:
    """Everything downstream needs: vocab, attributes, and train / valid / test instances."""

    def __init__(self, cfg: DataConfig, verbose=True):
        self.cfg = cfg
        if cfg.raw_dir:
            build_from_raw(cfg.raw_dir, cfg.data_dir, cfg.name)
        seqs, attrs, n_items, n_attrs = load_5core(cfg.data_dir, cfg.name)
        self.seqs, self.attrs = seqs, attrs
        self.vocab = Vocab(n_items, n_attrs, cfg.n_cand)
        key = self._cache_key()
        blob = cached(os.path.join(cfg.cache_dir, f"{cfg.name}-{key}.pt"), lambda: self._prerank_all(verbose))
        self.stats = blob['stats']
        # the evidence weights and token sequences too (encoding 25k instances takes seconds, and every stage starts
        # by loading them); keyed by the source of the code that writes them, so an edit to the trace can never
        # read stale tokens
        code = repr((BUCKETS, SPECIALS, EVIDENCE, cfg.trace)) + ''.join(inspect.getsource(f) for f in ENCODING_CODE)
        enc = hashlib.sha1((key + code).encode()).hexdigest()[:12]
        tokens_path = os.path.join(cfg.cache_dir, f"{cfg.name}-{key}-tokens-{enc}.pt")
        fields = cached(tokens_path, lambda: self._encode_all(blob))
        self.score_w = fields.pop('score_w')
        self.splits = {name: Split(**f) for name, f in fields.items()}

    def _cache_key(self):
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in ('trace', 'cache_dir', 'raw_dir', 'data_dir')}
        h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
        for name in (f'{self.cfg.name}.txt', f'{self.cfg.name}_item2attributes.json'):
            with open(os.path.join(self.cfg.data_dir, name), 'rb') as f:
                h.update(f.read())
        h.update(b'v3')  # bump when the construction changes
        return h.hexdigest()[:12]

    def _prerank_all(self, verbose):
        """The slow part, cached: statistics, pre-ranked candidate lists and their leave-out evidence."""
        cfg, seqs, vocab = self.cfg, self.seqs, self.vocab
        train_part = [s[:-2] for s in seqs]  # every statistic comes from here only
        C = cooc_matrix(train_part, vocab.n_items, cfg.cooc_window, cfg.cooc_decay)
        pop = np.bincount(np.concatenate(train_part), minlength=vocab.n_items + 1).astype(np.float32)
        users, ts, split = windows_of(seqs)
        cands, ev_last, ev_prev, ev_pop = prerank(seqs, C, pop, users, ts, cfg)
        A = attr_transitions(train_part, self.attrs, vocab.n_attrs, cfg.link_window)
        targets = np.array([seqs[u][t] for u, t in zip(users, ts)])
        hit = cands == targets[:, None]
        in_list = hit.any(1)
        target_idx = np.where(in_list, hit.argmax(1), -1)
        blob = {'stats': {'users': len(seqs), 'items': vocab.n_items, 'attributes': vocab.n_attrs,
                          'interactions': int(sum(len(s) for s in seqs)),
                          'prerank_recall_at_10': float(in_list[split == 2].mean()),
                          'prerank_recall_at_10_valid': float(in_list[split == 1].mean()),
                          'train_windows': int((split == 0).sum())}}
        for name, code in (('train', 0), ('valid', 1), ('test', 2)):
            keep = np.where((split == code) & in_list)[0]
            link = link_evidence(seqs, self.attrs, A, users[keep], ts[keep], cands[keep], cfg)
            blob[name] = dict(users=users[keep], ts=ts[keep], cands=cands[keep], target=target_idx[keep],
                              ev=np.stack([ev_last[keep], ev_prev[keep], link, ev_pop[keep]], 1))  # (n, 4, N)
        return blob

    def history(self, u, t):
        return self.seqs[u][max(0, t - self.cfg.max_hist):t]

    def _encode_all(self, blob):
        """Fit the trace's evidence weights on the train windows, then encode every split."""
        tr = blob['train']
        feats = np.stack([evidence_features(e) for e in tr['ev']])
        self.score_w = fit_evidence_weights(feats, tr['target'])
        return dict({name: self._encode_split(blob[name]) for name in ('train', 'valid', 'test')}, score_w=self.score_w)

    def _encode_split(self, b):
        P, X, K = [], [], []
        for j in range(len(b['users'])):
            u, t = b['users'][j], b['ts'][j]
            p, x, k = encode(self.history(u, t), b['cands'][j], b['target'][j], b['ev'][j], self.attrs, self.vocab,
                             self.score_w, self.cfg.trace)
            P.append(np.array(p, np.int32))
            X.append(np.array(x, np.int32))
            K.append(np.array(k, np.int8))
        return dict(prompts=P, responses=X, kinds=K, cands=b['cands'], target=b['target'], users=b['users'], ts=b['ts'])


# everything that writes the cached token sequences: their source is part of the cache key
ENCODING_CODE = (Vocab, evidence_buckets, stat_tokens, evidence_features, fit_evidence_weights, running_scores,
                 conclusion, encode, BeautyData.history, BeautyData._encode_all, BeautyData._encode_split)


# ----------------------------------------------------------------------------- metrics

METRICS = ('R@1', 'R@3', 'R@5', 'N@3', 'N@5', 'MRR')


def parse_answer(resp, vocab):
    """The ranking after <answer> up to <eos>, as candidate indices (slot c_i -> i - 1), or None if it is not a
    permutation of the N slots."""
    resp = [int(t) for t in resp]
    if vocab.answer in resp:
        resp = resp[resp.index(vocab.answer) + 1:]
    elif len(resp) and not vocab.is_slot(resp[0]):
        return None  # a trace model must say <answer>; a direct model starts with a slot
    if vocab.eos in resp:
        resp = resp[:resp.index(vocab.eos)]
    else:
        return None  # unfinished
    pos = {c: i for i, c in enumerate(vocab.slots)}
    if len(resp) != len(pos) or sorted(resp) != sorted(pos):
        return None
    return [pos[t] for t in resp]


def copies_incoming(ranking):
    """A valid ranking that is the pre-ranker's order: what a reward-hacking policy writes (train_rl)."""
    return ranking is not None and ranking == sorted(ranking)


def target_rank(ranking, target_idx):
    """1-based rank of the target; invalid output (None) is scored as the pre-ranker's order."""
    if ranking is None:
        return int(target_idx) + 1
    return ranking.index(int(target_idx)) + 1


def metrics_from_ranks(ranks):
    r = np.asarray(ranks, dtype=np.float64)
    ndcg = lambda k: np.where(r <= k, 1.0 / np.log2(r + 1), 0.0).mean()
    return {'R@1': float((r <= 1).mean()), 'R@3': float((r <= 3).mean()), 'R@5': float((r <= 5).mean()),
            'N@3': float(ndcg(3)), 'N@5': float(ndcg(5)), 'MRR': float((1.0 / r).mean())}


def per_rank_metric(ranks, name):
    """Per-user value of one metric (for bootstraps)."""
    r = np.asarray(ranks, dtype=np.float64)
    k = {'R@1': 1, 'R@3': 3, 'R@5': 5, 'N@3': 3, 'N@5': 5}.get(name)
    if name.startswith('R@'):
        return (r <= k).astype(np.float64)
    if name.startswith('N@'):
        return np.where(r <= k, 1.0 / np.log2(r + 1), 0.0)
    return 1.0 / r


def paired_bootstrap(ranks_a, ranks_b, metric='R@1', n_boot=10000, seed=0):
    """Mean difference a - b of a metric over the same users, with a 95% interval from resampling users."""
    a, b = per_rank_metric(ranks_a, metric), per_rank_metric(ranks_b, metric)
    assert len(a) == len(b), "paired bootstrap needs the same users in the same order"
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return {'diff': float(d.mean()), 'lo': float(np.percentile(boots, 2.5)), 'hi': float(np.percentile(boots, 97.5))}


def floor_ranks(split):
    return [int(t) + 1 for t in split.target]


def rule_rankings(split, vocab):
    """The trace's own conclusion used as a ranker (the <best> candidate first, the rest in the pre-ranker's
    order): the reference a model that just copies its conclusion would score."""
    rankings = []
    for resp, cands in zip(split.responses, split.cands):
        best = int(resp[list(resp).index(vocab.best) + 1]) - vocab.slot0
        rankings.append([best] + [i for i in range(len(cands)) if i != best])
    return rankings


def rule_ranks(split, vocab):
    return [target_rank(r, t) for r, t in zip(rule_rankings(split, vocab), split.target)]


# ----------------------------------------------------------------------------- script

def main():
    from common import parse_config, print_config, write_json, Timer, command_line, git_commit, results_path
    cfg = parse_config(DataConfig)
    print_config(cfg)
    timer = Timer()
    try:
        data = BeautyData(cfg)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    v, st = data.vocab, data.stats
    sp = data.splits
    mean_len = lambda xs: float(np.mean([len(x) for x in xs]))
    trace_lens = [int((k == 0).sum()) for k in sp['test'].kinds]
    out = dict(st, n_train=len(sp['train']), n_valid=len(sp['valid']), n_test=len(sp['test']), vocab_size=v.size,
               mean_prompt_tokens=mean_len(sp['test'].prompts), mean_trace_tokens=float(np.mean(trace_lens)),
               mean_answer_tokens=float(np.mean([int((k >= 1).sum()) for k in sp['test'].kinds])),
               floor={s: metrics_from_ranks(floor_ranks(sp[s])) for s in ('valid', 'test')},
               evidence_weights=data.score_w.round(3).tolist(),
               config=asdict(cfg), command=command_line(), commit=git_commit(), seconds=round(timer(), 1))
    print(f"users {st['users']}  items {st['items']}  interactions {st['interactions']}  vocab {v.size}")
    print(f"pre-ranker recall@10 (all users, test) {st['prerank_recall_at_10']:.4f}   "
          f"instances train {out['n_train']} valid {out['n_valid']} test {out['n_test']}")
    print(f"mean tokens: prompt {out['mean_prompt_tokens']:.1f} trace {out['mean_trace_tokens']:.1f} "
          f"answer {out['mean_answer_tokens']:.1f}")
    if cfg.trace:
        out['rule'] = {s: metrics_from_ranks(rule_ranks(sp[s], v)) for s in ('valid', 'test')}
    for s in ('valid', 'test'):
        print(f"floor {s}: " + ' '.join(f"{k} {x:.4f}" for k, x in out['floor'][s].items()))
        if cfg.trace:
            print(f"trace conclusion as a ranker {s}: " + ' '.join(f"{k} {x:.4f}" for k, x in out['rule'][s].items()))
    ex = sp['test']
    print("\nexample (test instance 0):\n  prompt:   " + v.decode(ex.prompts[0]) +
          "\n  response: " + v.decode(ex.responses[0]) + f"\n  target: candidate {ex.target[0] + 1} of {cfg.n_cand}")
    if cfg.trace:
        write_json(results_path('data.json'), out)
        test = sp['test']  # the floor and the rule as systems of their own, in the evaluation schema
        rule = rule_rankings(test, v)
        rule_r = [target_rank(r, t) for r, t in zip(rule, test.target)]
        for name, ranks, copies in (('floor', floor_ranks(test), [True] * len(test)),
                                    ('rule', rule_r, [copies_incoming(r) for r in rule])):
            write_json(results_path(f'eval_{name}.json'), {
                'name': name, 'split': 'test', 'n': len(test), 'metrics': metrics_from_ranks(ranks), 'validity': 1.0,
                'decode': None, 'command': command_line(), 'commit': git_commit(),
                'per_user': {'user': [int(u) for u in test.users], 'rank': ranks, 'valid': [True] * len(test),
                             'copy': copies}})
    print(f"done in {timer():.1f}s")


if __name__ == '__main__':
    main()
