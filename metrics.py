"""The protocol's scoring (README, "The protocol"): parse an answer, rank the target (an invalid answer is
scored as the pre-ranker's order, the floor), R@k / N@k / MRR, and the paired bootstrap that every comparison
states."""
import numpy as np

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


def first_is_floor_first(ranking):
    """The output puts the pre-ranker's first candidate first; an invalid output (None) counts, since it is
    scored as the pre-ranker's order."""
    return ranking is None or ranking[0] == 0


def copy_share(first_floor, target):
    """The share of outputs whose first item is the pre-ranker's first, on the users where that item is wrong
    (the target is elsewhere): how often a ranker keeps the floor's mistake."""
    wrong = np.asarray(target) != 0
    return float(np.asarray(first_floor, dtype=bool)[wrong].mean()) if wrong.any() else 0.0


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
    return bootstrap_mean(a - b, n_boot, seed)


def bootstrap_mean(per_user, n_boot=10000, seed=0):
    """The mean of a per-user quantity with a 95% interval from resampling users."""
    d = np.asarray(per_user, float)
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
