"""CFT: conversion fine-tuning of the AR teacher into a block-diffusion re-ranker (block-causal, B = 16).

    python train_cft.py                                    # one GPU: out/ar.pt -> out/cft.pt (run.sh caps it at 60 s)
    python train_cft.py --validity_weight=0 --out=out/cft_novalid.pt     # ablation without the validity loss
    python train_cft.py --parent=out/cft.pt --out=out/cft_more.pt --time_limit=450  # more CFT (OPD's control)
    python train_cft.py       # without CUDA: the CPU setting (CPU_SETTING: batch 32), ~19 min on 2 cores

The model learns to denoise its own trace and answer block by block (BD3-LM loss over [noised ; clean]) and,
through the permutation-validity loss, to land its answer on a valid permutation of the candidates without
any constrained decoder. Keeps the checkpoint with the best validation R@1 under the evaluation's decoding.
`--certainty_weight` adds the entropy of the predictions it already gets right at masked positions
(diffusion_loss), so that the threshold rule can commit them together; `decode.py --first_step=True` shows,
by role, what one denoising step gets right and commits. What each setting gave on the CPU: FINDINGS.md.
"""
from dataclasses import dataclass, asdict

import numpy as np
import torch
from tqdm import tqdm

from common import (StageSettings, start_stage, same_file_problem, autocast, device_name, load_checkpoint,
                    JsonlLog, write_json, CheckpointError, save_resume, load_resume, finish_resume, results_path,
                    git_commit, Interrupt)
from data_beauty import DataError, collate
from evaluation import load_data_for, trace_report
from diffusion import convert
from reasoning import ROLES, drill_decisions, roles_named
from training import (CFTLoss, WEIGHTING, cft_loss, cft_loss_settings, make_optimizer, optimizer_step, lr_at,
                      validate, validate_and_keep, finish)


@dataclass
class TrainCFTConfig(StageSettings, CFTLoss):  # + the shared flags, and the loss's (training.CFTLoss)
    parent: str = 'out/ar.pt'    # an AR teacher (converted here) or a CFT model (training continues)
    out: str = 'out/cft.pt'
    name: str = 'cft'
    data_dir: str = 'data/beauty'
    block: int = 16              # B: tokens per block (16: the answer opens a block of its own)
    block_warmup: int = 0        # > 0: train with B through the divisors of `block` over these first steps
    drill: float = 0.0           # share of windows answered from a random decision (reasoning.drill_decisions)
    max_steps: int = 1000        # on the CPU, validation R@1 holds from step 600 on while tokens per forward rise
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 50
    grad_clip: float = 1.0
    tau: float = 0.9             # evaluation decoding (greedy, threshold rule)
    k: int = 0
    from_left: bool = False      # evaluation commits in position order (diffusion.commit_rule)
    judge: bool = True           # at each evaluation, score the trace's judgements teacher-forced
    judge_n: int = 512           # on this many validation lists (evaluation.trace_report: `block` forwards each, slow
                                 # on a CPU)
    sweep: bool = True           # at the end: validation R@1 and speed by confidence and from the left
    eval_every: int = 200
    # without CUDA: batch 32 (about 19 minutes on 2 cores with the sweep; at batch 16 the student stayed 0.005
    # under its teacher on validation: FINDINGS), selection on the first 1,024 validation users
    CPU_SETTING = dict(batch_size=32, judge=False, eval_n=1024, eval_batch=128)

    def problem(self):
        if self.block < 1:
            return "--block must be >= 1 (1: AR decoding with the CFT loss)"
        if not 0 <= self.drill < 1:
            return f"--drill={self.drill}: a share of the windows, in [0, 1)"
        if not 0 <= self.suffix_share <= 1:
            return f"--suffix_share={self.suffix_share}: a share of the blocks, in [0, 1]"
        unknown = [r for r in roles_named(self.certainty_skip) if r not in ROLES]
        if unknown:
            return f"--certainty_skip: unknown roles {unknown}; use names from {', '.join(ROLES)} (comma-separated)"
        return same_file_problem('parent', self.parent, self.out) or super().problem()


def block_at(step, cfg):
    """The training block size at a step. With a warm-up, B climbs through the divisors of cfg.block from 1 (the
    AR loss exactly) to cfg.block in equal stretches of it (the last one already at cfg.block; for 32: 1, 2, 4,
    8, 16, 32), so the weights leave the AR solution one step of parallelism at a time (the analogue of the
    attention-mask annealing used when adapting AR models to diffusion). Evaluation always uses cfg.block; every
    stage's size divides it, and so the batch padding."""
    if step >= cfg.block_warmup:
        return cfg.block
    sizes = [b for b in range(1, cfg.block + 1) if cfg.block % b == 0]
    return sizes[step * len(sizes) // cfg.block_warmup]


@torch.no_grad()
def validation_loss(model, data, cfg, device, n=256, batch=64):
    """The block-diffusion loss (cross-entropy part, the training weights) on the first n validation instances
    under fixed masks: the same number at every evaluation, so its curve shows what CFT learns beyond the
    decoded metrics (before training, it measures the naive conversion)."""
    sp, gen, total = data.splits['valid'], torch.Generator(device=device).manual_seed(0), 0.0
    n = min(n, len(sp))
    for a in range(0, n, batch):
        b = collate(sp, range(a, min(n, a + batch)), data.vocab, block=cfg.block, device=device)
        with autocast(device):
            _, parts = cft_loss(model, b, cfg.block, data.vocab, cft_loss_settings(cfg, WEIGHTING), gen)
        total += parts['ce'].item() * len(b['pad'])
    return total / n


# (tau, k, from_left): the threshold rule, and committing from the left. One token per step (k = 1) is left out:
# it costs as much as all the rest on a CPU and read the same R@1 as tau 0.9 (FINDINGS, "The tau sweep").
SWEEP = ((0.97, 0, False), (0.9, 0, False), (0.8, 0, False), (0.6, 0, False), (0.4, 0, False), (0.9, 0, True))


def sweep_decoding(cfg, data, device):
    """The kept model decoded on validation at each SWEEP setting: R@1 and validity against tokens per forward
    (results/sweep_<name>.json and .png), CFT's own curve (the tables' threshold is chosen after RL: frontier.py)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model, _ = load_checkpoint(cfg.out, device=device)
    rows = []
    for tau, k, left in SWEEP:
        res = validate(model, data, cfg, device, block=cfg.block, tau=tau, k=k, from_left=left)
        rows.append({'tau': tau if k == 0 else None, 'k': k or None, 'from_left': left, 'R@1': res['metrics']['R@1'],
                     'validity': res['validity'], 'tokens_per_forward': res.get('tokens_per_forward'),
                     'tokens_per_forward_trace': res.get('tokens_per_forward_trace'),
                     'tokens_per_forward_answer': res.get('tokens_per_forward_answer'),
                     'conclusion': (res['trace_agreement'] or {}).get('conclusion')})
        print(f"valid tau={tau} k={k} from_left={left}: R@1 {rows[-1]['R@1']:.4f} validity {rows[-1]['validity']:.4f} "
              f"tokens/forward {rows[-1]['tokens_per_forward']:.2f}")
    by_tau = [r for r in rows if r['tau'] is not None and not r['from_left']]
    write_json(results_path(f"sweep_{cfg.name}.json"), {'split': 'valid', 'n': res['n'], 'block': cfg.block,
                                                        'floor_R@1': res['floor']['R@1'], 'rows': rows,
                                                        'device': device_name(device), 'commit': git_commit()})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key in zip(axes, ('R@1', 'validity')):
        ax.plot([r['tokens_per_forward'] for r in by_tau], [r[key] for r in by_tau], marker='o')
        for r in by_tau:
            ax.annotate(f"{r['tau']}", (r['tokens_per_forward'], r[key]), fontsize=7)
        if key == 'R@1':
            ax.axhline(res['floor']['R@1'], color='gray', ls='--', lw=0.8, label='floor')
            ax.legend(fontsize=7)
        ax.set_xlabel('tokens per forward')
        ax.set_title(f"{key} by tau (valid, n={res['n']})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results_path(f"sweep_{cfg.name}.png"), dpi=90)
    plt.close(fig)


def load_parent(cfg, device):
    """The model CFT starts from: an AR teacher, converted here, or a CFT model at this run's block."""
    try:
        model, ckpt = load_checkpoint(cfg.parent, stages=['ar', 'cft'], device=device)
        data = load_data_for(ckpt, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    if ckpt['stage'] == 'ar':
        convert(model, data.vocab)
        print(f"converted AR teacher {cfg.parent} to block diffusion with B = {cfg.block}")
    elif ckpt['run_cfg'].get('block') != cfg.block:
        raise SystemExit(f"error: {cfg.parent} was trained with block {ckpt['run_cfg'].get('block')}, "
                         f"this run asks for --block={cfg.block}")
    return model, ckpt, data


def log_judgements(model, data, cfg, device, log, step):
    """The trace's judgements teacher-forced at the left-to-right state (evaluation.trace_report): the matches,
    the scores, and the decision where the conclusion is not c1, logged and printed."""
    judged = trace_report(model, data.splits['valid'], data.vocab, device, n=cfg.judge_n, block=cfg.block)
    log.write(step=step, val_match=judged['match_accuracy'], val_score=judged['score_accuracy'],
              val_departure=judged['departure_accuracy'])
    tqdm.write(f"step {step}: teacher-forced at the left-to-right state: matches {judged['match_accuracy']:.3f}, "
               f"scores {judged['score_accuracy']:.3f}, the decision where the conclusion is not c1 "
               f"{judged['departure_accuracy']:.3f} (of {judged['departures']})")
    return judged


def main():
    cfg, _, device, timer = start_stage(TrainCFTConfig)
    model, ckpt, data = load_parent(cfg, device)
    train, vocab = data.splits['train'], data.vocab
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    run_cfg = {**asdict(cfg), 'data': asdict(data.cfg), 'data_digests': data.fingerprint()}
    resumed = load_resume(cfg.out, model, opt, run_cfg)  # an interrupted run of this config continues
    if resumed:
        gen.set_state(resumed['state']['gen'])
    log = JsonlLog(f"out/log_{cfg.name}.jsonl", keep=resumed['state'].get('log_lines') if resumed else None)
    save = lambda step, best: save_resume(cfg.out, model, opt, run_cfg, step,
                                          {'best': best, 'gen': gen.get_state(), 'log_lines': log.lines()})

    def evaluate_and_keep(step, best):
        log.write(step=step, val_loss=validation_loss(model, data, cfg, device))
        best = validate_and_keep(model, data, cfg, device, log, step, best, run_cfg, 'cft', cfg.parent, cfg.block)
        if cfg.judge:
            judged = log_judgements(model, data, cfg, device, log, step)
            if best['step'] == step:  # the kept model's record carries them too
                best.update(judged)
        save(step, best)
        return best

    model.eval()  # dropout stays off: the sampler and the loss must see the same network
    if resumed:
        start, best = resumed['step'], resumed['state']['best']
    else:
        start, best = 0, (evaluate_and_keep(0, None) if ckpt['stage'] == 'cft' else None)
        if ckpt['stage'] == 'ar':
            log.write(step=0, val_loss=validation_loss(model, data, cfg, device))  # the naive conversion
            if cfg.judge:
                log_judgements(model, data, cfg, device, log, 0)
    pbar = tqdm(range(start, cfg.max_steps), desc='cft', dynamic_ncols=True, initial=start, total=cfg.max_steps)
    interrupt = Interrupt()
    for step in pbar:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.max_steps, cfg)
        rng = np.random.default_rng([cfg.seed, step])  # batches depend on the step only: a resumed run sees the same
        batch = collate(train, rng.integers(0, len(train), cfg.batch_size), vocab, block=cfg.block, device=device)
        if cfg.drill > 0:
            batch = drill_decisions(batch, cfg.drill, rng, vocab)
        with autocast(device):
            loss, parts = cft_loss(model, batch, block_at(step, cfg), vocab, cft_loss_settings(cfg), gen)
        optimizer_step(model, opt, loss, cfg.grad_clip, step, cfg.lr)
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        log.write(step=step + 1, loss=loss.item(), **{k: v.item() for k, v in parts.items()})
        evaluate_now, stop = cfg.evaluation_due(step, timer)
        if evaluate_now:
            best = evaluate_and_keep(step + 1, best)
        interrupt.stop_if_asked(lambda: save(step + 1, best), cfg.out, step + 1)
        if stop:
            break
    finish_resume(cfg.out)
    if cfg.sweep:
        sweep_decoding(cfg, data, device)
    finish(cfg, cfg.name, f"CFT ({cfg.name})", log, best, timer, device,
           ['loss', 'validity_loss', 'entropy_right', 'val_loss', 'val_R1', 'val_validity', 'val_departure'])


if __name__ == '__main__':
    main()
