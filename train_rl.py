"""RL on the re-ranking reward: trajectory-level GRPO with TraceRL-style replay, from the OPD policy.

    python train_rl.py                                              # one GPU: out/opd.pt -> out/rl.pt
    python train_rl.py --policy=out/ar.pt --block=1 --out=out/ar_rl.pt --name=ar_rl   # RL-tuned AR reference
    python train_rl.py        # without CUDA: the CPU setting (CPU_SETTING: 16 prompts x 8, 200 steps), ~4 min

Per prompt, G = 8 rollouts sampled with block B at the fast end's threshold (tau 0.6, as OPD). Reward =
(rank before - rank after) / N + 0.2 x format, the format reward paid only when the target's rank improved or
it stays first (otherwise copying the incoming order pays: GR2's reward hacking); invalid output gets -1 and
stays in its group. `--speed_weight` adds that weight x the rollout's tokens per forward / B where the format
reward is paid (LightningRL's speed term, gated on a valid output that lost no rank): at a fixed tau the policy
learns to commit more tokens per step. The kept model is the most valid one until one clears --min_validity.
Advantages are group-normalised; zero-variance groups are dropped. A trajectory's log-probability is the sum
over its committed tokens at the states in which they were committed (replay); pi_old is that replay before
the update, without gradients; the ratio is clipped at 0.2 per token. `--credit=differing` gives the advantage
only to the tokens in which a group's rollouts differ (differing_tokens); `--min_groups` draws more prompts
until that many groups carry signal (DAPO's dynamic sampling), so that one update averages over them.
`--trace_weight` adds a process reward to a valid rollout: that weight x the share of its trace tokens that
are the data's (reasoning.trace_hits). The trace is computed from the prompt, so this checks the reasoning
against the prompt, never the target: a verifier of the trace, where the rank reward judges only its answer.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common import (StageSettings, start_stage, same_file_problem, autocast, load_checkpoint, CheckpointError, Interrupt,
                    finish_resume)
from data_beauty import DataError
from evaluation import load_data_for
from diffusion import convert, live_tokens, replay_logits, token_logprobs
from rollouts import chunks, rollouts, score_rollouts
from training import lr_at, finish, OnPolicyRun


@dataclass
class TrainRLConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    policy: str = 'out/opd.pt'   # start policy: a diffusion checkpoint, or out/ar.pt with --block=1
    block: int = 0               # 0: the policy's own block size
    out: str = 'out/rl.pt'
    name: str = 'rl'
    data_dir: str = 'data/beauty'
    n_prompts: int = 16
    group: int = 8               # G
    temperature: float = 1.0
    tau: float = 0.6             # the rollouts' and the validation's threshold: the fast end (OPD's)
    k: int = 0
    from_left: bool = False      # the evaluation's commit order (diffusion.commit_rule)
    clip: float = 0.2
    format_weight: float = 0.2
    trace_weight: float = 0.0    # > 0: + this x the share of the trace written right (a process reward; 0: off)
    speed_weight: float = 0.0    # > 0: + this x tokens per forward / block where the format reward is paid
    kl_weight: float = 0.0       # > 0: a per-token KL penalty to the start policy (GRPO's beta; 0: off)
    credit: str = 'all'          # 'differing': the advantage only on tokens that differ within their group
    min_groups: int = 0          # > 0: draw n_prompts more until this many groups carry signal (DAPO's dynamic
    max_draws: int = 1           # sampling), at most max_draws draws a step; the defaults: one draw
    updates: int = 1             # policy updates per batch of rollouts
    max_steps: int = 60
    micro_batch: int = 32
    lr: float = 5e-5
    warmup: int = 5
    grad_clip: float = 1.0
    eval_every: int = 10
    # without CUDA: 16 prompts x 8 rollouts, 200 steps at lr 1e-5 (at 5e-5 validation R@1 fell 0.007 in 50 steps),
    # each step kept or not on every validation user (train_opd), validity first up to 0.99 (FINDINGS, "RL at the
    # fast end")
    CPU_SETTING = dict(n_prompts=16, lr=1e-5, min_validity=0.99, max_steps=200, eval_every=50, eval_n=0,
                       eval_batch=128)

    def problem(self):
        if self.max_draws < 1 or self.min_groups < 0:
            return f"--max_draws={self.max_draws} must be >= 1 and --min_groups={self.min_groups} >= 0"
        if self.min_groups and self.max_draws == 1:
            return f"--min_groups={self.min_groups} draws more prompts only with --max_draws > 1 (e.g. 16)"
        if self.trace_weight < 0 or self.speed_weight < 0:
            return (f"--trace_weight={self.trace_weight} --speed_weight={self.speed_weight}: both must be >= 0 "
                    f"(0: the rank and format reward only)")
        if self.credit not in ('all', 'differing'):
            return f"--credit={self.credit}: 'all' (every committed token) or 'differing'"
        return same_file_problem('policy', self.policy, self.out) or super().problem()


def rank_reward(rank_before, rank_after, valid, n_cand, format_weight=0.2, speed=0.0, speed_weight=0.0):
    """(before - after) / N, + format_weight if valid and (improved or still first); invalid: -1. With
    `speed` (each rollout's tokens per forward over the block size, in (0, 1]), + speed_weight x speed where the
    format reward is paid: a fast rollout earns only beside a rank it did not lose, so a fast invalid answer or a
    fast copy of the incoming order that leaves the target below first earns nothing for its speed."""
    before, after = np.asarray(rank_before, float), np.asarray(rank_after, float)
    valid = np.asarray(valid, bool)
    fmt = valid & ((after < before) | (after == 1))
    fast = speed_weight * fmt * np.asarray(speed, float)
    return np.where(valid, (before - after) / n_cand + format_weight * fmt + fast, -1.0)


def group_advantages(rewards, group):
    """Group-normalised advantages (n_prompts * G,) and which groups carry signal (non-zero variance)."""
    r = np.asarray(rewards, float).reshape(-1, group)
    std = r.std(1, keepdims=True)
    keep = std[:, 0] > 1e-8
    adv = np.where(keep[:, None], (r - r.mean(1, keepdims=True)) / np.maximum(std, 1e-8), 0.0)
    return adv.reshape(-1), np.repeat(keep, group)


def differing_tokens(tokens, group):
    """(rows, R) bool: where a rollout's token differs from another rollout of its prompt at the same position.
    A token all G rollouts share cannot explain their rewards' spread. Decoded left to right its gradients would
    cancel over the group (same state, advantages summing to zero); under parallel commits each rollout commits it
    in another state, so they do not, and what is left is noise on every token of the trace."""
    t = tokens.view(-1, group, tokens.shape[1])
    return (t != t[:, :1]).any(1, keepdim=True).expand_as(t).reshape(tokens.shape)


def kl_to_reference(new, ref):
    """Per-token KL(policy || start) estimate at the policy's own samples (k3: exp(d) - d - 1 with d = ref - new):
    non-negative, zero where the log-probs agree, and its gradient pulls the policy back to the start."""
    d = ref - new
    return d.exp() - d - 1


def load_policy(cfg, device):
    """The policy to tune, its data and block size: a diffusion checkpoint at its own block, or the AR teacher
    (block 1: the RL-tuned AR reference; block 16: its naive conversion)."""
    try:
        policy, ck = load_checkpoint(cfg.policy, stages=['ar', 'cft', 'opd', 'rl'], device=device)
        data = load_data_for(ck, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    block = cfg.block or ck['run_cfg'].get('block', 0)
    if ck['stage'] == 'ar':
        if block <= 0:
            raise SystemExit(f"error: {cfg.policy} is an AR model; pass --block=1 (the RL-tuned AR reference) "
                             f"or --block=16 (naive conversion)")
        convert(policy, data.vocab)
    elif block != ck['run_cfg'].get('block'):
        raise SystemExit(f"error: {cfg.policy} decodes with block {ck['run_cfg'].get('block')}, not {block}")
    return policy, ck, data, block


def micro_batches(batch, res, rows_kept, adv, cfg, device):
    """The rollouts of the groups kept from one draw, cut into micro-batches: each with its prompts, padding, live
    tokens, trajectory (tokens, commit steps, sampler log-probs), advantages and credited tokens."""
    sel = torch.as_tensor(rows_kept, device=device)
    live = live_tokens(res)[sel]
    credited = (differing_tokens(res['tokens'], cfg.group)[sel] if cfg.credit == 'differing'
                else torch.ones_like(live))
    A = torch.as_tensor(adv[rows_kept], dtype=torch.float32, device=device)
    prompt, pad, traj = batch['prompt'][sel], batch['pad'][sel], {k: v[sel] for k, v in res.items()}
    return [dict(prompt=prompt[sl], pad=pad[sl], live=live[sl], traj={k: v[sl] for k, v in traj.items()},
                 adv=A[sl], credited=credited[sl]) for sl in chunks(len(sel), cfg.micro_batch)]


def clipped_update(policy, reference, opt, pieces, cfg, block, vocab, device, step):
    """The clipped policy-gradient update on the micro-batches of kept rollouts (of one draw or several): pi_old
    and the start policy replayed once (no gradient), then `cfg.updates` passes with the token-level mean of
    DAPO over all of them and the optional KL penalty to the start policy. Returns the step's stats: the KL to
    the start policy, the share of live tokens credited, the largest gap between the sampler's log-probs and
    the replay's (0 when the replay is exact), the loss."""
    n_live = sum(p['live'].sum() for p in pieces)  # the token mean over every live token: --credit only drops terms
    logprobs = lambda model, p: token_logprobs(replay_logits(model, p['prompt'], p['pad'], p['traj'], block, vocab,
                                                             p['live']), p['traj']['tokens'][p['live']],
                                               cfg.temperature)
    with torch.no_grad(), autocast(device):  # pi_old (and the start policy) from the replay path
        old = [logprobs(policy, p) for p in pieces]
        ref = [logprobs(reference, p) for p in pieces]
    old_all, sampled = torch.cat(old), torch.cat([p['traj']['logp'][p['live']] for p in pieces])
    stats = {'kl_to_start': (old_all - torch.cat(ref)).mean().item(),
             'credited': torch.cat([p['credited'][p['live']] for p in pieces]).float().mean().item(),
             'replay_gap': (old_all - sampled).abs().max().item()}
    for _ in range(cfg.updates):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for p, old_p, ref_p in zip(pieces, old, ref):
            with autocast(device):
                new = logprobs(policy, p)
            a = (p['adv'][:, None] * p['credited'])[p['live']]    # each token gets its rollout's advantage
            ratio = (new - old_p).exp()
            obj = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
            loss = -obj.sum() / n_live                            # token-level mean (DAPO)
            if cfg.kl_weight > 0:
                loss = loss + cfg.kl_weight * kl_to_reference(new, ref_p).sum() / n_live
            loss.backward()
            total += loss.item()
        if not np.isfinite(total):
            raise SystemExit(f"error: loss is {total} at step {step}; lower --lr (now {cfg.lr})")
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
    stats['loss'] = total
    return stats


def main():
    cfg, _, device, timer = start_stage(TrainRLConfig)
    policy, ck, data, block = load_policy(cfg, device)
    vocab, train, N = data.vocab, data.splits['train'], data.cfg.n_cand
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the start policy: the KL we log (and penalise)
    print(f"policy {cfg.policy} (B = {block}); {cfg.n_prompts} prompts x {cfg.group} rollouts")
    run = OnPolicyRun(policy, data, cfg, device, ck, block, 'rl', cfg.policy, 0.0)
    log, opt, gen, keeper = run.log, run.opt, run.gen, run.keeper
    pbar = tqdm(range(run.start, cfg.max_steps), desc=cfg.name, dynamic_ncols=True, initial=run.start,
                total=cfg.max_steps)
    interrupt = Interrupt()
    for step in pbar:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.max_steps, cfg)
        pieces, scored = [], []
        for draw in range(cfg.max_draws):  # with --min_groups, draw prompts until that many groups carry signal
            # prompts depend on the step (and draw) only: a resumed run sees the same
            rng = np.random.default_rng([cfg.seed, step] + ([draw] if draw else []))
            idx = rng.integers(0, len(train), cfg.n_prompts)
            batch, res, rows = rollouts(policy, data, idx, cfg.group, block, cfg, gen, device)
            ranks, valid, copies, trace = score_rollouts(res, data, rows)
            before = train.target[rows] + 1
            speed = (res['n_tokens'] / res['n_forwards']).cpu().numpy() / block
            rewards = (rank_reward(before, ranks, valid, N, cfg.format_weight, speed, cfg.speed_weight)
                       + cfg.trace_weight * valid * trace)
            adv, keep = group_advantages(rewards, cfg.group)
            if keep.any():
                pieces += micro_batches(batch, res, np.where(keep)[0], adv, cfg, device)
            scored.append((before, ranks, valid, copies, trace, rewards, keep))
            if sum(k.sum() for *_, k in scored) >= cfg.min_groups * cfg.group:
                break
        before, ranks, valid, copies, trace, rewards, keep = map(np.concatenate, zip(*scored))
        stats = dict(step=step + 1, reward=rewards.mean(), validity=valid.mean(), rank_change=(before - ranks).mean(),
                     copy_share=float(copies[before > 1].mean()) if (before > 1).any() else None,
                     trace_right=trace.mean(), groups_kept=keep.reshape(-1, cfg.group)[:, 0].mean(), draws=len(scored))
        if pieces:
            stats.update(clipped_update(policy, reference, opt, pieces, cfg, block, vocab, device, step))
        log.write(**stats)
        pbar.set_postfix(reward=f"{rewards.mean():.3f}", valid=f"{valid.mean():.2f}")
        evaluate_now, stop = cfg.evaluation_due(step, timer)
        if evaluate_now:
            keeper(step + 1)
            run.save(step + 1)
        interrupt.stop_if_asked(lambda: run.save(step + 1), cfg.out, step + 1)
        if stop:
            break
    finish_resume(cfg.out)
    finish(cfg, cfg.name, f"RL ({cfg.name})", log, keeper.best, timer, device,
           ['reward', 'validity', 'rank_change', 'copy_share', 'trace_right', 'kl_to_start', 'val_R1'])


if __name__ == '__main__':
    main()
