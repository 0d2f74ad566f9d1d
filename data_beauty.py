"""Amazon Beauty (5-core) as a re-ranking task: split, pre-ranker, candidate lists and their evidence, batches.
How an instance is written as tokens is reasoning.py; how an answer is scored, metrics.py.

    python data_beauty.py                                  # real data from data/beauty (~1 min, cached after)
    python data_beauty.py --data_dir=path/to/folder        # any folder with Beauty.txt + Beauty_item2attributes.json
    python data_beauty.py --raw_dir=path/to/raw            # build that format from the raw Amazon dump
                                                           # (reviews_Beauty_5.json.gz + meta_Beauty.json.gz)

Protocol (README, "The protocol"): leave-one-out; a co-occurrence pre-ranker hands the re-ranker its top
N = 10; a user is an instance iff the target is in that list. Every statistic comes from the train part, and a
window predicting position t never sees the user's own interactions at positions >= t-1, so the target's own
transition cannot inflate its score (the same rule at test, where the validation item is not in the stats).
"""
import gzip
import hashlib
import json
import math
import os
import ast
import inspect
from collections import defaultdict
from dataclasses import dataclass, asdict

import numpy as np
import torch
from tqdm import tqdm

from common import project_path
from metrics import (copies_incoming, copy_share, first_is_floor_first, floor_ranks, metrics_from_ranks, rule_rankings,
                     rule_ranks, target_rank)
from reasoning import (BUCKETS, EVIDENCE, SPECIALS, Vocab, conclusion, encode, evidence_buckets, evidence_features,
                       evidence_scores, fit_evidence_weights, knockout, stat_tokens,
                       statistic_weights)


@dataclass
class DataConfig:
    data_dir: str = 'data/beauty'   # relative paths are the project's (common.project_path)
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
           f"preprocessed for S3-Rec; another category's files by their name: --data_name, data_beauty.py's "
           f"--name), or build them with python data_beauty.py --name={name} --raw_dir=<folder with "
           f"reviews_{name}_5.json.gz and meta_{name}.json.gz>.")
    for p in (seq_path, attr_path):
        if not os.path.isfile(p):
            raise DataError(f"missing data file {p}. {how}")
    seqs = []
    with open(seq_path) as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{seq_path} is empty. {how}")
    if not text.endswith('\n'):  # a cut file would silently shorten its last user (item 5274 read as 5)
        raise DataError(f"{seq_path} ends mid-line: the file looks truncated; copy it again. {how}")
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            raise DataError(f"{seq_path}:{lineno} is blank: one user per line, no empty lines")
        try:
            items = [int(x) for x in parts[1:]]
        except ValueError:
            raise DataError(f"{seq_path}:{lineno} is malformed (expected integers 'user item item ...'). {how}")
        if len(items) < 3:
            raise DataError(f"{seq_path}:{lineno}: a user needs >= 3 items for a leave-one-out split")
        if min(items) < 1:
            raise DataError(f"{seq_path}:{lineno}: item id {min(items)}; ids start at 1 (0 is padding)")
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


# ----------------------------------------------------------------------------- statistics and pre-ranker

UNIT = 10_000  # statistics are integers in units of 1e-4: exact sums, so no tie depends on float rounding


def decay_units(decay, n):
    """decay^0 .. decay^(n-1) as integers in units of 1e-4 (exact for the defaults 0.7 and 0.5)."""
    return np.array([round(UNIT * decay ** k) for k in range(n)], dtype=np.int64)


def cooc_matrix(seqs, n_items, window, decay):
    """C[a, b] = sum over train pairs 'a then b' within `window` steps of decay^(gap-1), in units of 1e-4 (int32)."""
    C = np.zeros((n_items + 1, n_items + 1), dtype=np.int32)
    w = decay_units(decay, window).astype(np.int32)
    for s in seqs:
        for g in range(1, min(window, len(s) - 1) + 1):
            np.add.at(C, (s[:-g], s[g:]), w[g - 1])
    return C


def top_n(key, N):
    """(n, N) columns of the N largest keys of each row, largest first, equal keys by the smaller column.

    Exact on every machine: which of equal keys np.argpartition keeps at the N-th place is up to its kernel,
    which may differ between CPUs. On Beauty about one test list in 18 has a tie across that place, five with
    the target inside it: the test count moved between machines (FINDINGS.md, "The protocol on every machine")."""
    n, I = key.shape
    kth = np.partition(key, I - N, axis=1)[:, I - N]                   # the N-th largest value: unambiguous
    take = key > kth[:, None]
    tied = key == kth[:, None]
    need = N - take.sum(1)                                              # how many of the tied make the list
    split = np.where(tied.sum(1) > need)[0]                             # rows where a tie crosses the N-th place
    whole = np.setdiff1d(np.arange(n), split)
    take[whole] |= tied[whole]
    take[split] |= tied[split] & (np.cumsum(tied[split], 1) <= need[split, None])  # the smallest tied columns
    cols = np.nonzero(take)[1].reshape(n, N)                            # (n, N) in column order
    order = np.lexsort((cols, -np.take_along_axis(key, cols, 1)), axis=1)  # key desc, then column
    return np.take_along_axis(cols, order, 1)


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


def prerank(seqs, C, pop, users, ts, cfg, batch=1024, leave_out=True, progress=False, lists=None):
    """Top-N candidates for each window with leave-out statistics (the protocol, item 4); `lists` (n, N): the
    statistics of these candidates instead, in this order (a list typed in: show.py).

    The score is the co-occurrence with the last `hist_items` history items (decayed), popularity breaks its
    ties and the item id breaks theirs; all in integers, so the lists are the same on every machine. Returns
    cands (n, N) item ids in the pre-ranker's order, and leave-out evidence for them: co-occurrence with the
    last history item, with the `evidence_hist` - 1 items before it (decayed as the pre-ranker's), popularity."""
    n, N, m = len(users), cfg.n_cand, cfg.hist_items
    E = max(m, cfg.evidence_hist)
    w = decay_units(cfg.hist_decay, E)                                  # history weights, units of 1e-4
    gap_w = decay_units(cfg.cooc_decay, cfg.cooc_window).astype(np.int32)
    pop = np.asarray(pop, np.int64)
    scale = int(pop.max()) + 1                                          # key = co-occurrence * scale + popularity
    cands = np.zeros((n, N), np.int64)
    ev_last, ev_prev, ev_pop = (np.zeros((n, N), np.float32) for _ in range(3))
    for b0 in tqdm(range(0, n, batch), desc='pre-rank', disable=not progress, leave=False):
        b1 = min(n, b0 + batch)
        windows = list(zip(users[b0:b1], ts[b0:b1]))
        R = []  # R[k]: (nb, I) leave-out co-occurrence rows of the k-th most recent history item
        for k in range(E):
            h = np.array([seqs[u][t - 1 - k] if t - 1 - k >= 0 else 0 for u, t in windows])
            Rk = C[h]
            Rk[h == 0] = 0
            R.append(Rk)
        own = []  # per window: its train items at positions >= t-1, left out of every statistic
        for r, (u, t) in enumerate(windows):
            s = seqs[u]
            L = len(s) - 2 if leave_out else 0                          # the user's train part is s[:L]
            q = np.arange(max(t - 1, 0), L)
            own.append(s[q])
            for k in range(E):
                p = t - 1 - k
                if p < 0 or p >= L:
                    continue  # no history item, or one outside the train part (nothing of it in C)
                gap = q - p
                ok = (gap >= 1) & (gap <= cfg.cooc_window)
                np.subtract.at(R[k][r], s[q[ok]], gap_w[gap[ok] - 1])
        cooc = sum(w[k] * R[k] for k in range(m))                       # (nb, I) int64, units of 1e-8
        key = cooc * scale + pop
        for r, (u, t) in enumerate(windows):
            np.subtract.at(key[r], own[r], 1)                           # leave-out popularity
            key[r, seqs[u][:t]] = -1                                    # never return a history item
        key[:, 0] = -1
        top = top_n(key, N) if lists is None else np.asarray(lists[b0:b1])
        rows = np.arange(b1 - b0)[:, None]
        cands[b0:b1] = top
        ev_last[b0:b1] = R[0][rows, top] / UNIT
        ev_prev[b0:b1] = sum(w[k - 1] * R[k][rows, top] for k in range(1, cfg.evidence_hist)) / UNIT ** 2
        ev_pop[b0:b1] = key[rows, top] - cooc[rows, top] * scale
    return cands, ev_last, ev_prev, ev_pop


def pre_rank_windows(seqs, n_items, users, ts, cfg, progress=False):
    """Statistics from the users' train parts (all but their last two items), then each window's list (prerank)
    and the target's place in it (-1: not in the list, so not an instance). Returns cands, target_idx and the
    evidence (ev_last, ev_prev, ev_pop)."""
    train_part = [s[:-2] for s in seqs]  # every statistic comes from here only
    C = cooc_matrix(train_part, n_items, cfg.cooc_window, cfg.cooc_decay)
    pop = np.bincount(np.concatenate(train_part), minlength=n_items + 1)
    cands, *evidence = prerank(seqs, C, pop, users, ts, cfg, progress=progress)
    targets = np.array([seqs[u][t] for u, t in zip(users, ts)])
    hit = cands == targets[:, None]
    return cands, np.where(hit.any(1), hit.argmax(1), -1), evidence


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
    `link_prior` pseudo-transitions; the window's own transitions from positions >= t-1 are left out (protocol item 4)."""
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
                    lifts.append(math.log(p / base) if base > 0 else 0.0)
            out[j, i] = max(lifts, default=0.0)
    return out


# ----------------------------------------------------------------------------- batches

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
    concluded = resp.gather(1, (at_best.long().argmax(1, keepdim=True) + 1).clamp(max=R - 1)).squeeze(1)
    concluded = torch.where(at_best.any(1), concluded, -1)  # (B,) the conclusion's slot token; -1: no trace
    chosen = resp.gather(1, (kind == 2).long().argmax(1, keepdim=True)).squeeze(1)
    follows = (concluded < 0) | (concluded == chosen)  # a direct model has no trace to contradict
    return dict(prompt=prompt.to(device), pad=pad.to(device), resp=resp.to(device), kind=kind.to(device),
                resp_len=resp_len.to(device), cands=cands.to(device), concluded=concluded.to(device),
                follows=follows.to(device),
                target=torch.as_tensor(split.target[idx]).to(device))


def history_lm_batches(data, batch_size, rng, max_items=20):
    """Mid-training batches: <bos> (item attrs..)* over a user's train part, loss on every next token."""
    v = data.vocab
    while True:
        users = rng.integers(0, len(data.seqs), batch_size)
        rows = []
        for u in users:
            toks = [v.bos]
            for i in data.seqs[u][:-2][-max_items:]:
                toks += [v.item(i)] + [v.attr(a) for a in data.attrs[i]]
            rows.append(toks)
        T = max(len(r) for r in rows)
        x = torch.full((batch_size, T), v.eos, dtype=torch.long)
        live = torch.zeros((batch_size, T), dtype=torch.bool)
        for r, toks in enumerate(rows):
            x[r, :len(toks)] = torch.as_tensor(toks)
            live[r, :len(toks)] = True
        yield x, live


# ----------------------------------------------------------------------------- the data set

def save_arrays(path, tree):
    """Nested dicts of arrays, numbers and ragged lists of 1-d arrays as one .npz, written atomically. Loading it
    runs no code (allow_pickle=False), unlike a pickled cache: a planted file can only fail to load."""
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}/{k}" if prefix else k, v)
        elif isinstance(x, list):                                       # ragged rows: concatenated + offsets
            flat[prefix + ':rows'] = np.concatenate(x) if x else np.zeros(0, np.int32)
            flat[prefix + ':offsets'] = np.cumsum([0] + [len(r) for r in x])
        else:
            flat[prefix] = np.asarray(x)
    walk('', tree)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # two scripts building the same cache at once each write their own
    with open(tmp, 'wb') as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_arrays(path):
    """The tree save_arrays wrote (0-d arrays come back as Python numbers)."""
    tree = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            name, _, part = key.partition(':')
            *parents, leaf = name.split('/')
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            if part == 'rows':
                rows, offsets = z[key], z[name + ':offsets']
                node[leaf] = [rows[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            elif not part:
                value = z[key]
                node[leaf] = value.item() if value.ndim == 0 else value
    return tree


def cached(path, build):
    """load_arrays(path) if it exists, else build() saved there."""
    if os.path.exists(path):
        try:
            return load_arrays(path)
        except Exception as e:  # truncated, or not written by save_arrays
            raise DataError(f"the data cache {path} is unreadable ({type(e).__name__}: {e}); delete it and rerun "
                            f"(it is rebuilt from the data files)") from e
    blob = build()
    save_arrays(path, blob)
    return blob


def digest(arrays):
    """A short SHA-1 of integer arrays (shape and values): the same arrays give the same string on any machine."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


class BeautyData:
    """Everything downstream needs: vocab, attributes, and train / valid / test instances."""

    def __init__(self, cfg: DataConfig, verbose=True):
        self.cfg = cfg
        self.data_dir, cache_dir = project_path(cfg.data_dir), project_path(cfg.cache_dir)
        if cfg.raw_dir:
            build_from_raw(project_path(cfg.raw_dir), self.data_dir, cfg.name)
        seqs, attrs, n_items, n_attrs = load_5core(self.data_dir, cfg.name)
        self.seqs, self.attrs = seqs, attrs
        self.vocab = Vocab(n_items, n_attrs, cfg.n_cand)
        key = self._cache_key()
        blob = cached(os.path.join(cache_dir, f"{cfg.name}-{key}.npz"), lambda: self._prerank_all(verbose))
        self.stats = blob['stats']
        # the evidence weights and token sequences too (encoding 25k instances takes seconds, and every stage starts
        # by loading them); keyed by the source of the code that writes them, so an edit to the trace can never
        # read stale tokens
        code = repr((BUCKETS, SPECIALS, EVIDENCE, cfg.trace)) + ''.join(inspect.getsource(f) for f in ENCODING_CODE)
        enc = hashlib.sha1((key + code).encode()).hexdigest()[:12]
        tokens_path = os.path.join(cache_dir, f"{cfg.name}-{key}-tokens-{enc}.npz")
        fields = cached(tokens_path, lambda: self._encode_all(blob))
        self.score_w = fields.pop('score_w')
        self.splits = {name: Split(**f) for name, f in fields.items()}

    def _cache_key(self):
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in ('trace', 'cache_dir', 'raw_dir', 'data_dir')}
        h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
        for name in (f'{self.cfg.name}.txt', f'{self.cfg.name}_item2attributes.json'):
            with open(os.path.join(self.data_dir, name), 'rb') as f:
                h.update(f.read())
        h.update(b'v4')  # bump when the construction changes
        return h.hexdigest()[:12]

    def _prerank_all(self, verbose):
        """The slow part, cached: statistics, pre-ranked candidate lists and their leave-out evidence."""
        cfg, seqs, vocab = self.cfg, self.seqs, self.vocab
        users, ts, split = windows_of(seqs)
        cands, target_idx, (ev_last, ev_prev, ev_pop) = pre_rank_windows(seqs, vocab.n_items, users, ts, cfg, verbose)
        in_list = target_idx >= 0
        train_part = [s[:-2] for s in seqs]
        A = attr_transitions(train_part, self.attrs, vocab.n_attrs, cfg.link_window)
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

    def digests(self):
        """Fingerprints of the protocol, equal on every machine (tests/test_data.py pins them on the shipped data):
        the split (each instance's user, window and target place), the candidate lists, and the encoded prompts
        and responses (the traces), over the three splits and for each."""
        parts = {name: {'split': digest([s.users, s.ts, s.target]), 'lists': digest([s.cands]),
                        'tokens': digest(s.prompts + s.responses)} for name, s in self.splits.items()}
        whole = {f'{kind}_digest': digest([np.frombuffer(parts[s][kind].encode(), np.uint8) for s in parts])
                 for kind in ('split', 'lists', 'tokens')}
        return dict(whole, digests_by_split=parts)

    def fingerprint(self):
        """The whole-data digests (split, lists, tokens): every checkpoint records them, and a later stage or
        decode.py refuses a checkpoint whose data they do not match (evaluation.load_data_for)."""
        if not hasattr(self, '_fingerprint'):
            d = self.digests()
            self._fingerprint = {k: d[k] for k in ('split_digest', 'lists_digest', 'tokens_digest')}
        return self._fingerprint

    def typed_instance(self, history, cands=None):
        """A one-instance Split (user -1) for a history typed in (item ids, oldest first) and the pre-ranker's list
        for it, or a typed list of N items in its own order: the statistics from every user's train part, as for
        the data's windows (nothing to leave out: the history is nobody's). There is no target: the response's
        answer takes c1 for it (its trace holds no target). Builds the co-occurrence and attribute tables first
        (seconds)."""
        cfg, N = self.cfg, self.cfg.n_cand
        bad = [i for i in list(history) + list(cands or []) if not 1 <= i <= self.vocab.n_items]
        if not history or bad:
            raise DataError(f"items {bad or 'none'}: give item ids within 1..{self.vocab.n_items}")
        if cands is not None and (len(cands) != N or len(set(cands)) != N or set(cands) & set(history)):
            raise DataError(f"a typed list needs {N} distinct items that are not in the history")
        train_part = [s[:-2] for s in self.seqs]
        C = cooc_matrix(train_part, self.vocab.n_items, cfg.cooc_window, cfg.cooc_decay)
        pop = np.bincount(np.concatenate(train_part), minlength=self.vocab.n_items + 1)
        seqs, users, ts = [np.array(list(history) + [0])], np.array([0]), np.array([len(history)])
        lists, ev_last, ev_prev, ev_pop = prerank(seqs, C, pop, users, ts, cfg, leave_out=False,
                                                  lists=None if cands is None else np.array([cands]))
        A = attr_transitions(train_part, self.attrs, self.vocab.n_attrs, cfg.link_window)
        link = link_evidence(seqs, self.attrs, A, users, ts, lists, cfg, leave_out=False)
        ev = np.stack([ev_last, ev_prev, link, ev_pop], 1)[0]
        prompt, response, kind = encode(list(history)[-cfg.max_hist:], lists[0], 0, ev, self.attrs, self.vocab,
                                        self.score_w, cfg.trace)
        return Split([np.array(prompt, np.int32)], [np.array(response, np.int32)], [np.array(kind, np.int8)],
                     lists, np.zeros(1, np.int64), np.array([-1]), np.zeros(1, np.int64))

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
ENCODING_CODE = (Vocab, evidence_buckets, stat_tokens, evidence_features, fit_evidence_weights, statistic_weights,
                 evidence_scores, knockout,
                 conclusion, encode, BeautyData.history, BeautyData._encode_all, BeautyData._encode_split)


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
    restated = lambda r, k: float(np.mean([kind == 0 and v.restates(int(t)) for t, kind in zip(r, k)]))
    out = dict(st, n_train=len(sp['train']), n_valid=len(sp['valid']), n_test=len(sp['test']), vocab_size=v.size,
               mean_prompt_tokens=mean_len(sp['test'].prompts), mean_trace_tokens=float(np.mean(trace_lens)),
               mean_answer_tokens=float(np.mean([int((k >= 1).sum()) for k in sp['test'].kinds])),
               restated_share=float(np.mean([restated(r, k) for r, k in zip(sp['test'].responses, sp['test'].kinds)])),
               floor={s: metrics_from_ranks(floor_ranks(sp[s])) for s in ('valid', 'test')},
               evidence_weights=data.score_w.round(3).tolist(), **data.digests(),
               config=asdict(cfg), command=command_line(), commit=git_commit(), seconds=round(timer(), 1))
    print(f"users {st['users']}  items {st['items']}  interactions {st['interactions']}  vocab {v.size}")
    print(f"pre-ranker recall@10 (all users, test) {st['prerank_recall_at_10']:.4f}   "
          f"instances train {out['n_train']} valid {out['n_valid']} test {out['n_test']}")
    print(f"mean tokens: prompt {out['mean_prompt_tokens']:.1f} trace {out['mean_trace_tokens']:.1f} "
          f"answer {out['mean_answer_tokens']:.1f}; share of the response restating the prompt "
          f"{out['restated_share']:.3f}")
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
        for name, ranks, rankings in (('floor', floor_ranks(test), [list(range(cfg.n_cand))] * len(test)),
                                      ('rule', rule_r, rule)):
            firsts = [first_is_floor_first(r) for r in rankings]
            write_json(results_path(f'eval_{name}.json'), {
                'name': name, 'split': 'test', 'n': len(test), 'metrics': metrics_from_ranks(ranks), 'validity': 1.0,
                'decode': None, 'copy_share': copy_share(firsts, test.target), 'command': command_line(),
                'commit': git_commit(),
                'per_user': {'user': [int(u) for u in test.users], 'rank': ranks, 'valid': [True] * len(test),
                             'copy': [copies_incoming(r) for r in rankings], 'first_is_floor_first': firsts}})
    print(f"done in {timer():.1f}s")


if __name__ == '__main__':
    main()
