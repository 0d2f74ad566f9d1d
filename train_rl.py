"""RL on the re-ranking reward: trajectory-level GRPO with TraceRL-style replay, from the OPD policy.

    python train_rl.py                                              # one GPU: out/opd.pt -> out/rl.pt
    python train_rl.py --policy=out/ar.pt --block=1 --out=out/ar_rl.pt       # the RL-tuned AR reference
    python train_rl.py        # without CUDA: the CPU setting (CPU_SETTING: 16 prompts x 8, 200 steps)

Per prompt, G = 8 rollouts sampled with block B at the fast end's threshold (tau 0.6, as OPD). Reward =
(rank before - rank after) / N + 0.2 x format, the format reward paid only when the target's rank improved or
it stays first (otherwise copying the incoming order pays: GR2's reward hacking); invalid output gets -1 and
stays in its group. The kept model is the most valid one until one clears --min_validity.
Advantages are group-normalised; zero-variance groups are dropped. A trajectory's log-probability is the sum
over its committed tokens at the states in which they were committed (replay); pi_old is that replay before
the update, without gradients; the ratio is clipped at 0.2 per token (one update per batch of rollouts).
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch

from common import StageSettings, start_stage, same_file_problem, autocast
from diffusion import live_tokens, replay_logits, token_logprobs
from rollouts import chunks, rollouts, score_rollouts
from training import Stage, load_parent


@dataclass
class TrainRLConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    policy: str = 'out/opd.pt'   # start policy: a diffusion checkpoint, or out/ar.pt with --block=1
    block: int = 0               # 0: the policy's own block size
    out: str = 'out/rl.pt'
    data_dir: str = 'data/beauty'
    n_prompts: int = 16
    group: int = 8               # G
    temperature: float = 1.0
    tau: float = 0.6             # the rollouts' and the validation's threshold: the fast end (OPD's)
    clip: float = 0.2
    format_weight: float = 0.2
    kl_weight: float = 0.0       # > 0: a per-token KL penalty to the start policy (GRPO's beta; 0: off)
    max_steps: int = 60
    micro_batch: int = 32
    lr: float = 5e-5
    warmup: int = 5
    eval_every: int = 10
    # without CUDA: 200 steps at lr 1e-5 (at 5e-5 validation R@1 fell 0.007 in 50 steps), kept or not on every
    # validation user (train_opd), validity first up to 0.99 (FINDINGS, "RL at the fast end")
    CPU_SETTING = dict(n_prompts=16, lr=1e-5, min_validity=0.99, max_steps=200, eval_every=50, eval_n=0,
                       eval_batch=128)

    def problem(self):
        return same_file_problem('policy', self.policy, self.out) or super().problem()


def rank_reward(rank_before, rank_after, valid, n_cand, format_weight=0.2):
    """(before - after) / N, + format_weight if valid and (improved or still first); invalid: -1."""
    before, after = np.asarray(rank_before, float), np.asarray(rank_after, float)
    valid = np.asarray(valid, bool)
    fmt = valid & ((after < before) | (after == 1))
    return np.where(valid, (before - after) / n_cand + format_weight * fmt, -1.0)


def group_advantages(rewards, group):
    """Group-normalised advantages (n_prompts * G,) and which groups carry signal (non-zero variance)."""
    r = np.asarray(rewards, float).reshape(-1, group)
    std = r.std(1, keepdims=True)
    keep = std[:, 0] > 1e-8
    adv = np.where(keep[:, None], (r - r.mean(1, keepdims=True)) / np.maximum(std, 1e-8), 0.0)
    return adv.reshape(-1), np.repeat(keep, group)


def kl_to_reference(new, ref):
    """Per-token KL(policy || start) estimate at the policy's own samples (k3: exp(d) - d - 1 with d = ref - new):
    non-negative, zero where the log-probs agree, and its gradient pulls the policy back to the start."""
    d = ref - new
    return d.exp() - d - 1


def micro_batches(batch, res, kept, adv, size):
    """The kept rollouts (row indices) in micro-batches: prompts, padding, live tokens, trajectory (tokens, commit
    steps, sampler log-probs) and advantages."""
    live = live_tokens(res)
    for sl in chunks(len(kept), size):
        rows = torch.as_tensor(kept[sl], device=live.device)
        yield dict(prompt=batch['prompt'][rows], pad=batch['pad'][rows], live=live[rows], traj={k: v[rows] for k, v
                   in res.items()}, adv=torch.as_tensor(adv[kept[sl]], dtype=torch.float32, device=live.device))


def clipped_gradient(policy, reference, pieces, cfg, block, vocab, device):
    """The clipped policy-gradient objective's gradient on the micro-batches of kept rollouts: pi_old and the
    start policy replayed once (no gradient), then one pass with the token-level mean of DAPO over all of them and
    the optional KL penalty to the start policy. Returns the step's stats: the KL to the start policy, the largest
    gap between the sampler's log-probs and the replay's (0 when the replay is exact), the loss."""
    n_live = sum(p['live'].sum() for p in pieces)  # the token mean over every live token
    logprobs = lambda model, p: token_logprobs(replay_logits(model, p['prompt'], p['pad'], p['traj'], block, vocab,
                                                             p['live']), p['traj']['tokens'][p['live']],
                                               cfg.temperature)
    with torch.no_grad(), autocast(device):  # pi_old (and the start policy) from the replay path
        old = [logprobs(policy, p) for p in pieces]
        ref = [logprobs(reference, p) for p in pieces]
    old_all, sampled = torch.cat(old), torch.cat([p['traj']['logp'][p['live']] for p in pieces])
    stats = {'kl_to_start': (old_all - torch.cat(ref)).mean().item(),
             'replay_gap': (old_all - sampled).abs().max().item()}
    policy.zero_grad(set_to_none=True)
    total = 0.0
    for p, old_p, ref_p in zip(pieces, old, ref):
        with autocast(device):
            new = logprobs(policy, p)
        a = p['adv'][:, None].expand_as(p['live'])[p['live']]   # each token gets its rollout's advantage
        ratio = (new - old_p).exp()
        obj = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
        loss = -obj.sum() / n_live                                # token-level mean (DAPO)
        if cfg.kl_weight > 0:
            loss = loss + cfg.kl_weight * kl_to_reference(new, ref_p).sum() / n_live
        loss.backward()
        total += loss.item()
    stats['loss'] = total
    return stats


def main():
    cfg, _, device, timer = start_stage(TrainRLConfig)
    policy, ck, data, block = load_parent(cfg.policy, ['ar', 'cft', 'opd', 'rl'], cfg.data_dir, device, cfg.block)
    vocab, train, N = data.vocab, data.splits['train'], data.cfg.n_cand
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the start policy: the KL we log (and penalise)
    print(f"policy {cfg.policy} (B = {block}); {cfg.n_prompts} prompts x {cfg.group} rollouts")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the rollouts
    run = Stage(cfg, policy, data, device, timer, 'rl', parent=cfg.policy, block=block, gens={'gen': gen},
                start_from=ck)
    for step, rng in run:
        idx = rng.integers(0, len(train), cfg.n_prompts)
        batch, res, rows = rollouts(policy, data, idx, cfg.group, block, cfg, gen, device)
        ranks, valid, copies = score_rollouts(res, data, rows)
        before = train.target[rows] + 1
        rewards = rank_reward(before, ranks, valid, N, cfg.format_weight)
        adv, keep = group_advantages(rewards, cfg.group)
        stats = dict(step=step + 1, reward=rewards.mean(), validity=valid.mean(), rank_change=(before - ranks).mean(),
                     copy_share=float(copies[before > 1].mean()) if (before > 1).any() else None,
                     groups_kept=keep.reshape(-1, cfg.group)[:, 0].mean())
        if keep.any():
            pieces = list(micro_batches(batch, res, np.where(keep)[0], adv, cfg.micro_batch))
            stats.update(clipped_gradient(policy, reference, pieces, cfg, block, vocab, device))
            run.step_accumulated(stats['loss'])
        run.show(reward=rewards.mean(), valid=valid.mean())
        run.log.write(**stats)
    run.finish('RL', ['reward', 'validity', 'rank_change', 'copy_share', 'kl_to_start', 'val_R1'])


if __name__ == '__main__':
    main()
