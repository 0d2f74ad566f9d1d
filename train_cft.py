"""CFT: conversion fine-tuning of the AR teacher into a block-diffusion re-ranker (block-causal, B = 16).

    python train_cft.py                                    # one GPU: out/ar.pt -> out/cft.pt (run.sh caps it at 60 s)
    python train_cft.py --validity_weight=0 --out=out/cft_novalid.pt     # ablation without the validity loss
    python train_cft.py --parent=out/cft.pt --out=out/cft_more.pt --time_limit=450  # more CFT (OPD's control)
    python train_cft.py       # without CUDA: the CPU setting (CPU_SETTING: batch 32; its time: results/cpu/run.json)

The model learns to denoise its own trace and answer block by block (BD3-LM loss over [noised ; clean]) and,
through the permutation-validity loss, to land its answer on a valid permutation of the candidates without
any constrained decoder. Keeps the checkpoint with the best validation R@1 under the evaluation's decoding.
`--certainty_weight` adds the entropy of the predictions it already gets right at masked positions
(diffusion_loss), so that the threshold rule can commit them together; `decode.py --first_step=True` shows,
by role, what one denoising step gets right and commits. What each setting gave on the CPU: FINDINGS.md.
"""
from dataclasses import dataclass

import torch

from common import StageSettings, start_stage, same_file_problem, autocast
from data_beauty import collate
from training import CFTLoss, Stage, cft_loss, cft_loss_settings, load_parent


@dataclass
class TrainCFTConfig(StageSettings, CFTLoss):  # + the shared flags, and the loss's (training.CFTLoss)
    parent: str = 'out/ar.pt'    # an AR teacher (converted here) or a CFT model (training continues)
    out: str = 'out/cft.pt'
    data_dir: str = 'data/beauty'
    block: int = 16              # B: tokens per block (16: the answer opens a block of its own)
    block_warmup: int = 0        # > 0: train with B through the divisors of `block` over these first steps
    max_steps: int = 1000        # on the CPU, validation R@1 holds from step 600 on while tokens per forward rise
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 50
    tau: float = 0.9             # evaluation decoding (greedy, threshold rule)
    eval_every: int = 200
    # without CUDA: batch 32 (at batch 16 the student stayed 0.005 under its teacher on validation: FINDINGS),
    # selection on the first 1,024 validation users
    CPU_SETTING = dict(batch_size=32, eval_n=1024, eval_batch=128)

    def problem(self):
        if self.block < 1:
            return "--block must be >= 1 (1: AR decoding with the CFT loss)"
        if not 0 <= self.suffix_share <= 1:
            return f"--suffix_share={self.suffix_share}: a share of the blocks, in [0, 1]"
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


PLAIN_CE = dict(suffix_share=0.0, validity_weight=0.0, certainty_weight=0.0)  # the held-out loss: random masks only


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
            _, parts = cft_loss(model, b, cfg.block, data.vocab, {**cft_loss_settings(cfg), **PLAIN_CE}, gen)
        total += parts['ce'].item() * len(b['pad'])
    return total / n


def main():
    cfg, _, device, timer = start_stage(TrainCFTConfig)
    model, ckpt, data, _ = load_parent(cfg.parent, ['ar', 'cft'], cfg.data_dir, device, block=cfg.block)
    train, vocab = data.splits['train'], data.vocab
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the masks
    loss_settings = cft_loss_settings(cfg)

    def held_out_loss(step, log):  # the loss under fixed masks, logged beside each evaluation
        log.write(step=step, val_loss=validation_loss(model, data, cfg, device))

    model.eval()  # dropout stays off: the sampler and the loss must see the same network
    run = Stage(cfg, model, data, device, timer, 'cft', parent=cfg.parent, block=cfg.block,
                weight_decay=cfg.weight_decay, gens={'gen': gen}, extras=held_out_loss,
                start_from=ckpt if ckpt['stage'] == 'cft' else None)  # from AR: the naive conversion is not kept
    if ckpt['stage'] == 'ar' and not run.resumed:
        held_out_loss(0, run.log)  # the naive conversion's
    for step, rng in run:
        batch = collate(train, rng.integers(0, len(train), cfg.batch_size), vocab, block=cfg.block, device=device)
        with autocast(device):
            loss, parts = cft_loss(model, batch, block_at(step, cfg), vocab, loss_settings, gen)
        run.optimize(loss)
        run.show(loss=loss.item())
        run.log.write(step=step + 1, loss=loss.item(), **{k: v.item() for k, v in parts.items()})
    run.finish('CFT', ['loss', 'validity_loss', 'entropy_right', 'val_loss', 'val_R1', 'val_validity'])


if __name__ == '__main__':
    main()
