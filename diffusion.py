"""Block diffusion on top of the AR model: conversion, training loss, block-parallel sampler, replay, and the
permutation-validity and distillation losses. The math of the paper lives here; optimizers do not.

Layout: [prompt][response], the response cut into blocks of B tokens. Attention is block-causal (bidirectional
inside a block, causal across blocks; every prompt token is a block of its own). The AR token shift is kept:
the hidden state at column j-1 predicts token j, so a block's first token is predicted from the last clean
position of the previous block (the AR distribution), and with B = 1 everything here is the AR model.
References: BD3-LM (Arriola et al. 2025), MDLM (Sahoo et al. 2024), Fast-dLLM (Wu et al. 2025), TraceRL (2025).
"""
import torch
import torch.nn.functional as F

from model import CachedForward, at_least_fp32, positions


@torch.no_grad()
def convert(model, vocab):
    """AR -> block diffusion: same weights; the mask token starts as the mean input embedding (a neutral
    'unknown' input). Block-causal attention and the kept token shift live in the functions below."""
    model.wte.weight[vocab.mask] = model.wte.weight.mean(0)
    return model


# ----------------------------------------------------------------------------- training (BD3-LM, vectorised)

def bd3_columns(pad, P, R, block):
    """Position ids and attention mask for one forward over [prompt ; noised response ; clean response].

    A noised block sees the prompt, the clean copies of earlier blocks and itself; a clean block sees the
    prompt and clean blocks up to itself (block-causal); clean copies reuse the noised copy's positions."""
    dev = pad.device
    S = P + 2 * R
    col = torch.arange(S, device=dev)
    kind = torch.where(col < P, 0, torch.where(col < P + R, 1, 2))      # 0 prompt, 1 noised, 2 clean
    j = torch.where(kind == 1, col - P, col - P - R)                    # response index (prompt: negative)
    rblk = torch.div(j, block, rounding_mode='floor')
    q_kind, k_kind = kind[:, None], kind[None, :]
    q_blk, k_blk = rblk[:, None], rblk[None, :]
    prompt_key = (k_kind == 0) & ((q_kind != 0) | (col[None, :] <= col[:, None]))
    noised_key = (k_kind == 1) & (q_kind == 1) & (k_blk == q_blk)
    clean_key = (k_kind == 2) & (((q_kind == 1) & (k_blk < q_blk)) | ((q_kind == 2) & (k_blk <= q_blk)))
    m = (prompt_key | noised_key | clean_key)[None] & (col[None, None, :] >= pad[:, None, None])  # (B, S, S)
    m = m | torch.eye(S, dtype=torch.bool, device=dev)
    pos_resp = torch.arange(R, device=dev)
    pos = torch.cat([positions(pad, P), (P - pad)[:, None] + pos_resp, (P - pad)[:, None] + pos_resp], 1)  # (B, S)
    return pos, m


def predicting_columns(P, R, block, device):
    """For response index j, the column whose hidden state predicts token j in the bd3 layout: the noised
    column j-1 inside a block; for a block's first token the clean copy of the previous block's last token
    (or the last prompt token). A plain shift over the concatenation would be wrong for these 1/B tokens."""
    j = torch.arange(R, device=device)
    first = (j % block) == 0
    return torch.where(first, torch.where(j == 0, P - 1, P + R + j - 1), P + j - 1)


def bd3_hidden(model, prompt, pad, xt, x0, block):
    """Hidden states that predict every response token of the noised response xt, given clean x0: (B, R, C)."""
    P, R = prompt.shape[1], x0.shape[1]
    pos, mask = bd3_columns(pad, P, R, block)
    h = model(torch.cat([prompt, xt, x0], 1), pos, mask, start=P - pad)
    return h[:, predicting_columns(P, R, block, prompt.device)]


def loss_region(resp, resp_len, block):
    """Response positions that are trained: everything up to the end of the block holding the first <eos>
    (the sampler fills that block; later blocks are never decoded). With B = 1: up to and including <eos>."""
    R = resp.shape[1]
    end = torch.div(resp_len - 1, block, rounding_mode='floor') * block + block
    return torch.arange(R, device=resp.device)[None, :] < end[:, None]


def noise_blocks(resp, block, mask_id, generator=None, t_min=0.05, suffix_share=0.0):
    """Mask each position with probability t, one t ~ U(t_min, 1) per block (BD3-LM). With suffix_share > 0, that
    share of the blocks is instead masked from a random cut to its end: tokens left of the cut known, the rest
    masked, the state in which threshold decoding mostly goes wrong and which random masks almost never draw
    for a long block (FINDINGS.md: an addition to random masks, not a substitute)."""
    B, R = resp.shape
    t = torch.rand(B, R // block, device=resp.device, generator=generator) * (1 - t_min) + t_min
    t = t.repeat_interleave(block, dim=1)                               # (B, R)
    masked = torch.rand(B, R, device=resp.device, generator=generator) < t
    if suffix_share > 0:
        per_block = lambda z: z.repeat_interleave(block, dim=1)
        shape = (B, R // block)
        suffix = torch.rand(shape, device=resp.device, generator=generator) < suffix_share
        cut = (torch.rand(shape, device=resp.device, generator=generator) * block).long()  # 0 .. block-1
        offset = torch.arange(R, device=resp.device) % block
        masked = torch.where(per_block(suffix), offset[None, :] >= per_block(cut), masked)
    return masked


def diffusion_loss(model, batch, block, mask_id, weights, masked=None, complementary=True, validity_weight=0.0,
                   vocab=None, generator=None, suffix_share=0.0, certainty_weight=0.0, certain_at=None):
    """Masked-token cross-entropy of the block-diffusion model (plain mean over masked tokens, Fast-dLLM v2),
    with complementary masks (each example also with the opposite mask: every token supervised once), each token
    weighted by `weights` (B, R) (what the trace makes of its tokens: reasoning.loss_weights), plus optionally the
    permutation-validity loss on the answer positions of the rows whose decision is trained (weight > 0), plus
    optionally the certainty term: the entropy of the prediction at the masked positions the model already gets
    right (argmax = target), so that it grows sure where it is right and the threshold rule commits those
    tokens together (dParallel's certainty forcing; LLaDA 2.0's CAP), at the positions `certain_at` (B, R) marks
    (default: all). Returns (loss, parts dict).

    The output head runs only at the masked positions of the trained region: they are all the loss reads (a
    revealed answer position enters the validity loss as one-hot on its token)."""
    prompt, resp, pad = batch['prompt'], batch['resp'], batch['pad']
    region = loss_region(resp, batch['resp_len'], block)
    if masked is None:
        masked = noise_blocks(resp, block, mask_id, generator, suffix_share=suffix_share)
    kind, cands = batch['kind'], batch['cands']
    certain_at = torch.ones_like(masked) if certain_at is None else certain_at
    if complementary:
        prompt, pad, resp, kind, region, cands, weights, certain_at = (
            torch.cat([z, z]) for z in (prompt, pad, resp, kind, region, cands, weights, certain_at))
        masked = torch.cat([masked, ~masked])
    xt = torch.where(masked, mask_id, resp)
    h = bd3_hidden(model, prompt, pad, xt, resp, block)
    at = masked & region
    logits = at_least_fp32(model.head(h[at]))                         # (M, V) at the supervised positions
    w = weights[at]
    ce_loss = (F.cross_entropy(logits, resp[at], reduction='none') * w).sum() / w.sum().clamp(min=1)
    parts = {'ce': ce_loss.detach()}
    loss = ce_loss
    if certainty_weight > 0:
        right = (logits.argmax(-1) == resp[at]).float() * (w > 0) * certain_at[at]
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        certainty = (entropy * right).sum() / right.sum().clamp(min=1)
        parts['entropy_right'] = certainty.detach()
        loss = loss + certainty_weight * certainty
    if validity_weight > 0:
        mass = candidate_mass(logits, at, resp, cands)
        # a row whose decision carries no loss (reasoning.loss_weights' `reject`) carries no validity loss either:
        # its revealed answer spells out the target, and the coverage term would teach the rejected decision
        decided = ((kind == 2) & (weights > 0)).any(1)
        v = validity_from_mass(mass, answer_positions(resp, kind, vocab) & decided[:, None])
        parts['validity_loss'] = v.detach()
        loss = loss + validity_weight * v
    return loss, parts


def answer_positions(resp, kind, vocab):
    return ((kind == 1) | (kind == 2)) & vocab.is_slot(resp)           # (B, R) the N ranked positions


def candidate_mass(logits_at, at, resp, cands):
    """(B, R, N): probability of each candidate at each response position; a position not in `at` (revealed)
    is one-hot on its token, a position in `at` the model's distribution (logits_at: (at.sum(), V))."""
    mass = (resp[..., None] == cands[:, None, :]).to(logits_at.dtype)   # revealed: one-hot
    rows, cols = at.nonzero(as_tuple=True)
    probs = logits_at.softmax(-1).gather(1, cands[rows])                # (M, N)
    return mass.index_put((rows, cols), probs)


def validity_from_mass(mass, answer):
    """Penalise (a) probability mass outside the candidate set at the answer positions and (b) candidates whose
    expected count over the answer positions is not one (duplicates, drops). Predicting an already revealed
    candidate again is a duplicate. Zero exactly on a one-hot permutation of the candidates."""
    mass = mass * answer[..., None]
    n_pos = answer.sum(1).clamp(min=1)
    outside = ((1 - mass.sum(2)) * answer).sum(1) / n_pos               # (B,)
    coverage = ((mass.sum(1) - 1) ** 2).mean(1)                         # (B,)
    has = answer.any(1).float()
    return ((outside + coverage) * has).sum() / has.sum().clamp(min=1)


def permutation_validity_loss(logits, resp, masked, cands, kind, vocab):
    """The permutation-validity loss from full logits (B, R, V): diffusion_loss computes the same from the
    logits at the masked positions only."""
    return validity_from_mass(candidate_mass(logits[masked], masked, resp, cands), answer_positions(resp, kind, vocab))


# ----------------------------------------------------------------------------- sampler

def choose_tokens(logits, temperature, generator):
    """Greedy (temperature 0) or sampled tokens and their confidence (probability of the chosen token), fp32."""
    if temperature <= 0:
        probs = logits.softmax(-1)
        conf, tok = probs.max(-1)
        return tok, conf
    probs = (logits / temperature).softmax(-1)
    flat = probs.reshape(-1, probs.size(-1))
    tok = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


def commit_rule(conf, masked, tau, k, from_left=False):
    """Which masked positions to commit this step: every one with confidence >= tau (a number, or one per
    position) and at least the most confident (Fast-dLLM threshold rule), or the k most confident (static k).

    from_left: commit in position order instead: the run of positions with confidence >= tau that starts at the
    leftmost masked position, or that position alone (static k: the k leftmost). The threshold rule commits any
    confident token, even right of an unsure one; here an unsure position stops the run, so a judgement after it
    waits until the entries it judges are written (FINDINGS.md: why the CPU student copied)."""
    c = torch.where(masked, conf, -1.0)
    if from_left:
        pos = torch.arange(masked.size(1), device=masked.device)
        first = masked.float().argmax(1, keepdim=True)                 # the leftmost masked position
        if k > 0:
            return masked & (pos >= first) & (pos < first + k)
        run = ((c >= tau) | (pos < first)).long().cumprod(1).bool()     # confident from `first` on, unbroken
        return masked & (run | (pos == first))                          # at least the leftmost
    if k > 0:
        top = c.topk(min(k, c.size(1)), dim=1).indices
        commit = torch.zeros_like(masked).scatter_(1, top, True)
    else:
        commit = c >= tau
        commit.scatter_(1, c.argmax(1, keepdim=True), True)
    return commit & masked


@torch.no_grad()
def generate_ar(model, prompt, pad, max_new, vocab, runner=None):
    """Greedy AR decoding with the KV cache; head and softmax in fp32. Returns tokens (B, max_new), lengths."""
    B, P = prompt.shape
    run = runner or CachedForward(model, pad, P, max_new, 1)
    col = torch.arange(P + max_new, device=prompt.device).expand(B, -1)   # every row writes column P + j at step j
    h = run(prompt, col[:, :P], P)
    logits = model.head(h[:, -1], fp32=True)
    out = torch.full((B, max_new), vocab.eos, dtype=torch.long, device=prompt.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for j in range(max_new):
        logits[:, vocab.mask] = -float('inf')
        tok = torch.where(done, vocab.eos, logits.argmax(-1))
        out[:, j] = tok
        done |= tok == vocab.eos
        if j == max_new - 1 or bool(done.all()):  # one host sync per step
            break
        h = run(tok[:, None], col[:, P + j:P + j + 1], P + j + 1)
        logits = model.head(h[:, -1], fp32=True)
    return out, first_eos_lengths(out, vocab)


def predicting_hidden(run, first_h, cur, cols, flushed, n_keys, block):
    """The hidden states that predict a block's tokens (n, block, C), and the new first_h (what predicts offset 0).

    The token shift: offset 0 is predicted by the previous block's last column, offset j by column j - 1, so a
    forward returns only those columns' hidden states (rows=). `flushed`: (tokens, columns, which rows) of
    finished blocks, cached by this very forward as [finished block ; this block]; the rows with nothing to flush
    feed their own block twice (both copies write the same keys and values; the first is not read)."""
    if flushed is not None:
        h = run(torch.cat([flushed[0], cur], 1), torch.cat([flushed[1], cols], 1), n_keys,
                rows=slice(block - 1, 2 * block - 1))
        first_h = torch.where(flushed[2], h[:, 0], first_h)
        return torch.cat([first_h[:, None], h[:, 1:]], 1), first_h
    if block > 1:
        return torch.cat([first_h[:, None], run(cur, cols, n_keys, rows=slice(0, block - 1))], 1), first_h
    return first_h[:, None], first_h                                    # B = 1, first block: the prefill predicted it


@torch.no_grad()
def generate_block(model, prompt, pad, max_resp, vocab, block, tau=0.9, k=0, temperature=0.0, generator=None,
                   runner=None, from_left=False, tau_slot=0.0):
    """Block-by-block decoding over a KV cache of the prompt and finished blocks, each row at its own pace.

    Inside a block, each step predicts every masked position at once and commits some of them (commit_rule; with
    tau_slot > 0 a prediction that is a list slot, a judgement or an answer item, needs tau_slot, not tau). A
    finished block's keys/values are written by one more pass, fused with the next block's first step. A row's
    block is done once every position left of a committed <eos> is committed (the rest stays masked); the row
    then moves to its next block at the next step, whatever the other rows are doing, and a row whose <eos> block
    is done leaves the batch: it writes what it writes decoded alone.

    Returns tokens (B, R), lengths (up to <eos>), steps (B, R: the 1-based step of its block at which each token
    was committed; 0 = not decoded), logp (its log-probability then), per-row forward and token counts (total,
    trace blocks, answer blocks), and `carried`: the forwards the batch ran while each row was in it (under CUDA
    graphs those after its end too): their sum is what the batch paid for."""
    (B, P), R, dev = prompt.shape, max_resp, prompt.device
    assert R % block == 0, "the response length must be a multiple of the block size"
    run = runner or CachedForward(model, pad, P, R, block)              # the KV cache (and CUDA graphs)
    first_h = run(prompt, torch.arange(P, device=dev).expand(B, -1), P)[:, -1]   # predicts response token 0
    conf_dtype = torch.promote_types(first_h.dtype, torch.float32)      # fp32, fp64 in the gradient checks
    out = dict(tokens=torch.full((B, R), vocab.mask, dtype=torch.long, device=dev),
               steps=torch.zeros((B, R), dtype=torch.long, device=dev),
               conf=torch.zeros((B, R), device=dev, dtype=conf_dtype),  # each token's probability when committed
               carried=torch.ones(B, dtype=torch.long, device=dev))     # forwards that carried the row (prefill: 1)
    # per row still decoding: its output row; its block's columns, tokens, commit steps, confidences, masked
    # positions left of any <eos>, and the steps taken in it
    row, cols = torch.arange(B, device=dev), P + torch.arange(block, device=dev).expand(B, -1)
    cur = torch.full((B, block), vocab.mask, dtype=torch.long, device=dev)
    cur_steps, cur_conf = torch.zeros_like(cur), torch.zeros((B, block), device=dev, dtype=conf_dtype)
    open_, step = torch.ones_like(cur, dtype=torch.bool), torch.zeros((B, 1), dtype=torch.long, device=dev)
    flushed, forwards, n_keys = None, 0, P + block                      # n_keys: no query sees past its own block
    while True:
        pred, first_h = predicting_hidden(run, first_h, cur, cols, flushed, n_keys, block)
        forwards += flushed is not None or block > 1
        flushed, logits = None, model.head(pred, fp32=True)             # (n, block, V)
        logits[..., vocab.mask] = -float('inf')
        tok, conf = choose_tokens(logits, temperature, generator)
        at = torch.where(vocab.is_slot(tok), tau_slot, tau) if tau_slot else tau  # each prediction's bar
        commit = commit_rule(conf, open_, at, k, from_left)
        step += 1
        cur, cur_steps, cur_conf = (torch.where(commit, new, old) for new, old in
                                    ((tok, cur), (step, cur_steps), (conf, cur_conf)))
        is_eos = cur == vocab.eos
        open_ = (cur == vocab.mask) & (is_eos.cumsum(1) == 0)
        done = ~open_.any(1)
        if not bool(done.any()):                                        # a host sync (a second one below)
            continue
        # some row finished its block: the block goes to the output (an unfinished one's is rewritten when done);
        # the row moves to its next block, or ends
        for key, value in (('tokens', cur), ('steps', cur_steps), ('conf', cur_conf)):
            out[key][row[:, None], cols - P] = value
        ends = done & (is_eos.any(1) | (cols[:, -1] == P + R - 1))
        flush = done & ~ends
        next_cols = cols + flush[:, None] * block
        n_ended, any_flush, n_keys = torch.stack([ends.sum(), flush.any(), next_cols.max() + 1]).tolist()
        if any_flush:
            flushed, cols = (cur, cols, flush[:, None]), next_cols
            cur = torch.where(flush[:, None], vocab.mask, cur)
            cur_steps, cur_conf = (torch.where(flush[:, None], 0, z) for z in (cur_steps, cur_conf))
            open_ = open_ | flush[:, None]
        step = step * ~done[:, None]
        # rows that ended leave the batch; under CUDA graphs, which fix the batch's shape, they idle until every row
        # has (an idle row ends again at every step, so n_ended counts it). n_keys still bounds the rows that stay.
        if n_ended and (n_ended == len(cur) or not run.graphs):
            still = open_.any(1)
            out['carried'][row[~still]] = forwards + 1
            if n_ended == len(cur):
                break
            stay = still.nonzero().squeeze(1)
            run.keep(stay)
            row, cols, cur, cur_steps, cur_conf, open_, step, first_h = (
                z[stay] for z in (row, cols, cur, cur_steps, cur_conf, open_, step, first_h))
            if flushed is not None:
                flushed = tuple(z[stay] for z in flushed)
    return block_outputs(out, block, vocab)


def block_outputs(out, block, vocab):
    """generate_block's result from its output tensors: lengths, log-probabilities, forward and token counts."""
    tokens, steps = out['tokens'], out['steps']
    B, R = tokens.shape
    lengths = first_eos_lengths(tokens, vocab)
    live = torch.arange(R, device=tokens.device)[None, :] < lengths[:, None]
    block_steps = (steps * live).view(B, R // block, block).amax(2)     # each step commits a live token of its block
    forwards = 1 + block_steps.sum(1) - int(block == 1)                 # the prefill; at B = 1 it predicts token 0
    return dict(tokens=tokens, lengths=lengths, steps=steps, logp=out['conf'].clamp(min=1e-30).log() * (steps > 0),
                carried=out['carried'],
                **count_by_kind(tokens, lengths, block_steps, forwards, block, vocab))


def first_eos_lengths(x, vocab):
    """Tokens up to and including the first <eos> (all of them if there is none)."""
    is_eos = x == vocab.eos
    return torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(x[:, 0], x.shape[1]))


def count_by_kind(x, lengths, block_steps, forwards, block, vocab):
    """Tokens (up to <eos>) and forwards per row, split into trace blocks and answer blocks (a block holding
    <answer> or anything after it is an answer block)."""
    B, R = x.shape
    j = torch.arange(R, device=x.device)
    is_ans = x == vocab.answer
    ans_at = torch.where(is_ans.any(1), is_ans.float().argmax(1), torch.zeros_like(lengths))  # direct: all answer
    blk_first = torch.arange(0, R, block, device=x.device)
    answer_block = (blk_first[None, :] + block - 1) >= ans_at[:, None]                 # (B, nblk)
    live = (j[None, :] < lengths[:, None]).view(B, -1, block).sum(2)                    # tokens per block
    return {'n_tokens': lengths, 'n_forwards': forwards,
            'trace_tokens': (live * ~answer_block).sum(1), 'trace_forwards': (block_steps * ~answer_block).sum(1),
            'answer_tokens': (live * answer_block).sum(1), 'answer_forwards': (block_steps * answer_block).sum(1)}


# ----------------------------------------------------------------------------- replay (OPD and RL)

def replay_hidden(model, prompt, pad, tokens, steps, block, mask_id):
    """Recompute, with gradients, the hidden state that predicted each committed token at the state in which
    the sampler committed it: at step s of a block, tokens committed before s revealed, the rest masked.
    The step states are stacked along the batch (one bd3 forward per step index), each over the clean
    prefix. Returns (B, R, C); which positions got committed is not part of the computation."""
    n_steps = int(steps.max())
    B, R = tokens.shape
    states = []
    for s in range(1, n_steps + 1):
        states.append(torch.where((steps >= s) | (steps == 0), mask_id, tokens))
    xt = torch.cat(states)                                              # (n_steps * B, R)
    rep = lambda z: z.repeat(n_steps, *([1] * (z.dim() - 1)))
    h = bd3_hidden(model, rep(prompt), rep(pad), xt, rep(tokens), block)  # (n_steps * B, R, C)
    h = h.view(n_steps, B, R, -1)
    pick = (steps.clamp(min=1) - 1)                                     # (B, R) which state predicted token j
    return h.gather(0, pick[None, :, :, None].expand(1, B, R, h.size(-1))).squeeze(0)


def chosen_offsets(block, offsets, device):
    """(block,) 1 at each of `offsets` within a block, else 0."""
    chosen = torch.zeros(block, dtype=torch.long, device=device)
    chosen[torch.as_tensor(offsets, device=device)] = 1
    return chosen


def left_to_right_steps(steps, block, offsets=None):
    """Commit steps of a left-to-right decoding of the same tokens (offset j of a block at step j + 1). Replayed at
    these steps, each token is predicted with the tokens left of it in its block revealed and the rest masked:
    the state an AR-style formula conditions on (one stacked state per offset: B states per block).
    `offsets`: only these offsets of each block get a state of their own (offset j at step 1 + the number of
    chosen offsets <= j), so a replay costs len(offsets) + 1 states instead of B; the chosen offsets' tokens
    are predicted at the same l2r state as with all of them, the others are not (mask them out of the loss)."""
    offset = torch.arange(steps.shape[1], device=steps.device) % block
    step = offset + 1 if offsets is None else chosen_offsets(block, offsets, steps.device).cumsum(0)[offset] + 1
    return torch.where(steps > 0, step[None, :], 0)


def at_offsets(R, block, offsets, device):
    """(1, R) which response positions sit at one of `offsets` within their block."""
    return chosen_offsets(block, offsets, device).bool()[torch.arange(R, device=device) % block][None, :]


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token) under the sampling temperature used by the rollouts."""
    return (at_least_fp32(logits) / max(temperature, 1e-6)).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def forward_kl(teacher_logits, student_logits, weight):
    """KL(teacher || student) over the full vocabulary at each weighted position, averaged (on-policy distillation)."""
    t = at_least_fp32(teacher_logits).log_softmax(-1)
    s = at_least_fp32(student_logits).log_softmax(-1)
    kl = torch.where(torch.isfinite(t), t.exp() * (t - s), 0.0).sum(-1)  # tokens neither may emit add 0
    return (kl * weight).sum() / weight.sum().clamp(min=1)


def live_tokens(res):
    """Committed tokens up to and including <eos>: the ones that carry log-probs and losses."""
    R = res['tokens'].shape[1]
    return (res['steps'] > 0) & (torch.arange(R, device=res['tokens'].device)[None, :] < res['lengths'][:, None])


def replay_logits(model, prompt, pad, res, block, vocab, live):
    """Student logits (fp32, mask token excluded) at the commit state of every live token: (n_live, V)."""
    h = replay_hidden(model, prompt, pad, res['tokens'], res['steps'], block, vocab.mask)
    logits = model.head(h[live], fp32=True)
    logits[:, vocab.mask] = -float('inf')
    return logits
