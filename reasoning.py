"""The reasoning trace: the token vocabulary, the evidence a trace adds up, and how one instance is written as
prompt -> trace -> answer, with the per-token loss weights every stage trains with.

GR2's teacher LLM writes free-text reasoning; here the trace is programmatic (a small model learns it from
scratch): for each candidate the weights of its statistics and its evidence score, with a knockout of pairwise
matches between them, then the conclusion. Only the prompt, leave-out statistics and weights fitted on
train windows go into it, never the target. data_beauty.py computes the statistics and calls encode() for every instance.
"""
import numpy as np
import torch
import torch.nn.functional as F


SCORE_MAX = 4  # the evidence score is clipped to [-4, 4] (the scores on Beauty stay within [-3.75, 3.5])
WEIGHT_MAX = 2  # a statistic's weight, clipped to [-2, 2] (the fitted weights on Beauty lie within [-1.5, 1.5])

BUCKETS = {  # evidence token families: name -> upper edges of the buckets (the last bucket is open)
    'last': [0, 1, 2, 4, 8, 16],         # co-occurrence with the last history item
    'prev': [0, 1, 2, 4, 8, 16],         # co-occurrence with the history items before the last one
    'link': [0, 0.5, 1, 1.5, 2, 2.5, 3, 4],  # attribute link to the last history item (log lift, link_evidence)
    'pop': [1, 3, 7, 15, 31, 63, 127],   # train interactions (log buckets)
    'score': [x / 4 for x in range(-4 * SCORE_MAX, 4 * SCORE_MAX)],  # evidence score: -4 .. 4 in quarters
    'weight': [x / 4 for x in range(-4 * WEIGHT_MAX, 4 * WEIGHT_MAX)],  # one statistic's weight: -2 .. 2 in quarters
}
VALUES = {'score': ('s', SCORE_MAX), 'weight': ('w', WEIGHT_MAX)}  # value families: prefix, range
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
            self.names += [f"{fam}{i}" if fam not in VALUES else f"{VALUES[fam][0]}{i / 4 - VALUES[fam][1]:+.2f}"
                           for i in range(len(edges) + 1)]
        self.attr0 = len(self.names) - 1   # attribute ids start at 1
        self.item0 = self.attr0 + n_attrs  # item ids start at 1
        self.size = self.item0 + n_items + 1
        self.eos, self.bos, self.mask, self.cands, self.think, self.answer, self.best, self.lead = range(8)

    @property
    def n_out(self):
        """Tokens a response can hold (specials, slots, evidence buckets: every id below the attributes): the
        model's output head covers these only (model.GPT.head); items and attributes are input-only."""
        return len(self.names)

    @property
    def slots(self):
        """The N slot tokens: the answer's alphabet (a ranking is a permutation of them)."""
        return list(range(self.slot0, self.slot0 + self.n_cand))

    def slot(self, i):
        return self.slot0 + int(i)

    def is_slot(self, tok):
        return (tok >= self.slot0) & (tok < self.slot0 + self.n_cand)

    def restates(self, tok):
        """A token the prompt's candidate entries hold too (a slot, a statistic's bucket): in a trace, a restatement
        of the prompt rather than something computed."""
        stat = any(self.bucket0[f] <= tok <= self.bucket0[f] + len(BUCKETS[f]) for f in EVIDENCE)
        return stat or self.slot0 <= tok < self.slot0 + self.n_cand

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
    (softmax over its N candidates), rounded to quarters so that the trace's scores are exact on the grid of its
    score tokens. It plays the part of GR2's larger teacher LLM, whose traces end in a judgement: the trace
    states each candidate's score and concludes with the best one, all computable from the prompt without the
    target. features (n, N, F), target (n,) -> (F,) weights."""
    X, y = torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(target)
    w = torch.zeros(X.shape[-1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):  # full batch from zeros, in fp64: the rounding to quarters sees the same value anywhere
        loss = F.cross_entropy(X @ w, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return np.round(w.detach().numpy() * 4) / 4


def statistic_weights(ev, score_w):
    """(N, 5) what each candidate's evidence score adds up: the weight of its list position, then the weight of
    each of its statistics' buckets (EVIDENCE). Weights are quarters (fit_evidence_weights)."""
    b = evidence_buckets(ev)
    start = np.cumsum([0] + [len(BUCKETS[fam]) + 1 for fam in EVIDENCE])  # each family's block in evidence_features
    N = b.shape[1]
    position = score_w[start[-1]:start[-1] + N]  # the position weights come last
    return np.stack([position] + [score_w[start[f] + b[f]] for f in range(len(EVIDENCE))], 1)


def evidence_scores(ev, score_w):
    """(N,) each candidate's evidence score: the weight of its list position plus its statistics' weights, clipped
    to the score tokens' range. The trace writes it as one token after the four weights it adds up; running sums
    (one token per statistic) made every score wait for the one before it, which a block decoder cannot write
    in parallel, and the 2-layer teacher writes the whole sum in one token once its entries are in place
    (FINDINGS, "One score per entry")."""
    return np.clip(statistic_weights(ev, score_w).sum(1), -SCORE_MAX, SCORE_MAX)


def knockout(scores):
    """The matches of a knockout over the candidates in list order, as a binary counter plays them: after each
    candidate, while the two latest winners cover as many candidates each, they meet; at the end the remaining
    winners meet from the right. Each match is (left, right, winner), the winner the left one unless the right
    one scores higher, so the last winner is the first candidate with the highest score (np.argmax), found in
    ceil(log2 N) rounds of pairwise comparisons instead of a running leader across the whole list.
    Returns [(after_candidate, winner)] in the order the trace writes them."""
    stack, matches = [], []  # stack: (winner, candidates covered)
    def play():
        (left, n_left), (right, n_right) = stack[-2], stack[-1]
        stack[-2:] = [(left if scores[left] >= scores[right] else right, n_left + n_right)]
        matches.append((i, stack[-1][0]))
    for i in range(len(scores)):
        stack.append((i, 1))
        while len(stack) > 1 and stack[-1][1] == stack[-2][1]:
            play()
    while len(stack) > 1:
        play()
    return matches


def conclusion(scores):
    """The trace's conclusion: the first candidate (pre-ranker order) among those with the highest score, the
    knockout's last winner."""
    return int(np.argmax(scores))


def trace_entries(n_cand):
    """The candidate entry (1 .. n_cand) of each trace index encode() writes, 0 for the knockout's matches: one
    layout for every instance, since the matches fall after the same candidates whatever the scores."""
    after = [a for a, _ in knockout(np.zeros(n_cand))]
    index = []
    for i in range(n_cand):
        index += [i + 1] * (len(EVIDENCE) + 1) + [0] * 3 * after.count(i)
    return index


def encode(hist, cands, target_idx, ev, attrs, vocab, score_w, trace=True):
    """Prompt, response and per-token kind (0 trace, 1 answer, 2 the choice: the first ranked item, the one token
    that moves the ranking, 3 the trace's judgements: the winner of each match and the conclusion) for one
    instance.

    prompt   = <bos> (item attrs..)*history <cands> (slot last prev link pop item attrs..)*N <think>|<answer>
    trace    = per candidate an entry: the weight of each statistic (EVIDENCE), then the evidence score
               (evidence_scores); and, as soon as two winners cover as many candidates each, their match
               `<lead> winner score` (knockout); then the conclusion <best> slot (the last winner).
               An entry does not name its candidate: the layout is the same for every instance (trace_entries),
               and the model embeds each entry's place (model.GPT.forward). Every entry reads only its own
               candidate's prompt fields (no running leader crosses the list), and each match compares two score
               tokens already written, so a block decoder can write many entries at once: the longest chain of
               tokens that each need the one before is the four rounds of the knockout, not the whole list. The
               statistics come with the prompt, as retrieved item facts do in an LLM re-ranker's prompt (a small
               model cannot recall pair counts it never sees); the trace writes their weights, not the statistics
    answer   = <answer> the target's slot, then the other slots in the pre-ranker's order, <eos>
    With N = 10 the trace and `<best> c <answer>` are 80 tokens, five blocks of 16: at B = 16 (train_cft's
    default) the answer opens a block of its own, predicted from the clean blocks that hold the conclusion.
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
        weights, final = statistic_weights(ev, score_w)[:, 1:], evidence_scores(ev, score_w)
        matches = dict()
        for after, winner in knockout(final):
            matches.setdefault(after, []).append(winner)
        for i in range(len(cands)):
            response += [vocab.bucket('weight', w) for w in weights[i]] + [vocab.bucket('score', final[i])]
            for winner in matches.get(i, []):
                response += [vocab.lead, vocab.slot(winner), vocab.bucket('score', final[winner])]
        response += [vocab.best, vocab.slot(conclusion(final)), vocab.answer]
        kind = [3 if prev in (vocab.lead, vocab.best) else 0 for prev in [None] + response[:-1]]
    order = [target_idx] + [i for i in range(len(cands)) if i != target_idx]
    answer = [vocab.slot(i) for i in order] + [vocab.eos]
    return prompt, response + answer, kind + [2] + [1] * (len(answer) - 1)


def trace_hits(toks, gold, vocab):
    """(T,) bool: which of the data's trace tokens (`gold`'s, up to and including the conclusion's slot) a
    decoded response `toks` holds at the same position. The layout is fixed, so position j is the same role in
    every trace; the trace is computed from the prompt alone, so this checks the reasoning, not the target."""
    gold = [int(t) for t in gold]
    end = gold.index(vocab.best) + 2
    return np.array([j < len(toks) and toks[j] == g for j, g in enumerate(gold[:end])])


def drill_decisions(batch, share, rng, vocab):
    """The responses of the batch with the answers of a random `share` of the rows (numpy `rng`) rewritten as if
    their decision were a random slot: that slot, then the other slots in the pre-ranker's order. In a
    teacher-forced answer the slot written first is always the target, which a model can also guess from the
    prompt; a drilled row leaves the rest of the answer only one rule to learn, leaving out the slot just written,
    whatever it is (FINDINGS, "The teacher's lookups"; train_ar.drill_answers keeps the target as the decision's
    label)."""
    resp, kind = batch['resp'], batch['kind']
    rows = torch.as_tensor(rng.random(len(resp)) < share, device=resp.device) & (kind == 2).any(1)
    picks = torch.as_tensor(rng.integers(0, vocab.n_cand, len(resp)), device=resp.device)
    return answers_from(resp, kind, picks, rows, vocab)


def answers_from(resp, kind, picks, rows, vocab):
    """Responses whose answers, in `rows` (B,) bool, are rewritten as if their decision were the slot index in
    `picks` (B,): that slot, then the other slots in the pre-ranker's order."""
    N = vocab.n_cand
    rest = torch.arange(N - 1, device=resp.device)
    others = rest + (rest >= picks[:, None])                                     # (B, N-1) the list, less the pick
    order = vocab.slot0 + torch.cat([picks[:, None], others], 1)                 # (B, N) the rewritten answers
    cols = (kind == 2).long().argmax(1, keepdim=True) + torch.arange(N, device=resp.device)  # the N ranked places
    return torch.where(rows[:, None], resp.scatter(1, cols, order), resp)  # no boolean indexing: no host sync


ROLES = ('weight', 'score', 'marker', 'judgement', 'choice', 'answer')


def token_roles(resp, kind, vocab):
    """(B, R) each response token's role, an index into ROLES: a statistic's weight, an evidence score (the
    entries' and the matches'), a marker (<lead> <best> <answer>), a judgement (kind 3: a match's
    winner, the conclusion), the choice (kind 2), the rest of the answer up to <eos> (kind 1)."""
    in_family = lambda f: (resp >= vocab.bucket0[f]) & (resp <= vocab.bucket0[f] + len(BUCKETS[f]))
    trace = kind == 0
    role = torch.full_like(resp, ROLES.index('marker'))
    for name, where in (('weight', trace & in_family('weight')),
                        ('score', trace & in_family('score')), ('judgement', kind == 3), ('choice', kind == 2),
                        ('answer', kind == 1)):
        role = torch.where(where, ROLES.index(name), role)
    return role


def kind_weights(kind, w_trace, w_answer, w_judge=None):
    """Per-token loss weights from the token kinds of encode(): the trace, the answer (the decision weighs as the
    rest of it), the judgements (as the trace by default)."""
    w_judge = w_trace if w_judge is None else w_judge
    return torch.tensor([w_trace, w_answer, w_answer, w_judge], device=kind.device)[kind]


def loss_weights(batch, w_trace, w_answer, reject=False, w_judge=None):
    """(B, R) loss weights by token kind. With `reject`, the decision (the first ranked slot) of a window whose
    trace concludes on another candidate than its target carries no loss: GR2 kept only the teacher traces that
    reach the target (rejection sampling). Here the programmatic trace is sound reasoning either way, so its
    tokens still teach, and so does the rest of the answer (writing out the permutation); only the decision that
    contradicts the trace is dropped. Without it the decision is learnt from a weak signal: the conclusion differs
    from the first candidate on 11% of train windows and is then the target 30% of the time.
    `w_judge` weighs the trace's judgements (kind 3: the matches' winners and the conclusion), the few tokens
    that the decision hangs on: at the trace's weight a small model learnt to name the first candidate of a
    comparison whatever the scores said (FINDINGS.md)."""
    w = kind_weights(batch['kind'], w_trace, w_answer, w_judge)
    if reject:
        w = w * ((batch['kind'] != 2) | batch['follows'][:, None])
    return w
