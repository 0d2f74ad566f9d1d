"""What OPD and RL sample and score: the student's rollouts of training prompts, parsed into ranks.
"""
import numpy as np
import torch

from common import autocast
from data_beauty import collate
from diffusion import generate_block
from metrics import parse_answer, target_rank, copies_incoming


def rollouts(model, data, idx, group, block, cfg, gen, device, sample_block=None):
    """`group` sampled decodings of each prompt in idx (rows grouped prompt by prompt), `block` tokens a block
    (`sample_block` if given: 1 for the AR teacher's own rollouts, padded to `block`'s response length)."""
    sp = data.splits['train']
    rows = np.repeat(np.asarray(idx), group)
    batch = collate(sp, rows, data.vocab, block=block, device=device)
    max_r = -(-(batch['resp'].shape[1] + block) // block) * block
    model.eval()
    with torch.no_grad(), autocast(device):
        res = generate_block(model, batch['prompt'], batch['pad'], max_r, data.vocab, block=sample_block or block,
                             tau=cfg.tau, temperature=cfg.temperature, generator=gen)
    return batch, res, rows


def score_rollouts(res, data, rows):
    """Parse each rollout: its target rank after re-ranking (invalid = the pre-ranker's), validity, and whether a
    valid output copies the incoming order."""
    sp, vocab = data.splits['train'], data.vocab
    tokens, lengths = res['tokens'].cpu(), res['lengths'].cpu()  # one copy, not one sync per rollout
    ranks, valid, copies = [], [], []
    for r, i in enumerate(rows):
        ranking = parse_answer(tokens[r, :int(lengths[r])].tolist(), vocab)
        ranks.append(target_rank(ranking, sp.target[i]))
        valid.append(ranking is not None)
        copies.append(copies_incoming(ranking))
    return np.array(ranks), np.array(valid), np.array(copies)


def chunks(n, size):
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))
