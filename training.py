"""What every training stage shares: the stage loop (`Stage`: the optimizer and its schedule, resume and Ctrl-C,
the evaluation rhythm, keeping the best checkpoint, the log and the record), validation, and CFT's loss settings
(which OPD's anchor reuses).

A stage script reads as its method: its config, its starting model, and one loop whose body is the step,

    run = Stage(cfg, model, data, device, timer, 'cft', parent=cfg.parent, block=cfg.block)
    for step, rng in run:                  # the lr of this step set; rng: this step's own draws
        loss = ...                         # the stage's math, in its own file
        run.optimize(loss)
        run.log.write(step=step + 1, loss=loss.item())
    run.finish('CFT', ['loss', 'val_R1'])

and the loop does the rest after each body: evaluate and keep the best model every `eval_every` steps, at the
last step and when `time_limit` runs out; save the resume state there; stop cleanly on Ctrl-C.
"""
import math
import os
from dataclasses import dataclass, asdict

import numpy as np
import torch
from tqdm import tqdm

from common import (JsonlLog, plot_curves, git_commit, is_better, command_line, write_json, results_path, device_name,
                    Interrupt)
from checkpoints import save_checkpoint, load_resume, save_resume, finish_resume, load_checkpoint, CheckpointError
from data_beauty import DataError
from diffusion import convert, diffusion_loss
from evaluation import Decoding, evaluate, load_data_for
from reasoning import loss_weights, token_roles, ROLES

GRAD_CLIP = 1.0  # every stage clips its gradient norm here


def lr_at(step, total, cfg):
    """Linear warm-up over cfg.warmup steps, then cosine decay to zero at `total`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    # a Python float: the optimizer state holds it, and the resume file is read back with weights_only=True
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))))


def make_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def clip_and_step(model, opt, total, step, lr):
    """The optimizer step after the backward passes of losses summing to `total`; a non-finite loss stops the run
    and says what to change."""
    if not np.isfinite(total):
        raise SystemExit(f"error: loss is {total} at step {step}; lower --lr (now {lr})")
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()


def optimizer_step(model, opt, loss, step, lr):
    """Backward, clip, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(model, opt, loss.item(), step, lr)


# ----------------------------------------------------------------------------- CFT's loss

@dataclass
class CFTLoss:
    """The block-diffusion loss's settings (diffusion.diffusion_loss) as CFT trains with them: its config
    inherits these fields, every checkpoint records them, and OPD's anchor reads them back (cft_loss_settings).
    Each example is trained with complementary masks, and the certainty term leaves out the judgements (the
    matches' winners and the conclusion: with the scores they compare still masked a first step guesses "the left
    one wins", right on most matches, and sureness from that prior would be rewarded wherever the guess is right;
    FINDINGS.md). The decision (the first ranked slot) weighs as the rest of the answer, and carries no loss where
    the trace concludes elsewhere (reasoning.loss_weights' `reject`)."""
    validity_weight: float = 0.25  # permutation-validity loss weight (0 = ablation); at 1 it kept validity 0.995
                                   # and cost the trace's scores (0.897 right against 0.951 at 0.25: FINDINGS)
    suffix_share: float = 0.0    # share of blocks masked from a random cut to the end (diffusion.noise_blocks)
    certainty_weight: float = 0.5  # entropy of the right predictions at masked positions (diffusion_loss)
    w_trace: float = 0.5
    w_answer: float = 1.0
    w_judge: float = 2.0         # the trace's judgements: at 0.5 the student's matches were right 0.895, at 2 0.922
                                 # (FINDINGS, "One score per entry"); train_ar's 5 cost validity on a CPU


SETTINGS = ('w_trace', 'w_answer', 'w_judge', 'suffix_share', 'validity_weight', 'certainty_weight')


def cft_loss_settings(run_cfg):
    """diffusion_loss's settings of a CFT run: its config, or the dict a checkpoint records."""
    d = run_cfg if isinstance(run_cfg, dict) else asdict(run_cfg)
    return {k: d[k] for k in SETTINGS}


def cft_loss(model, batch, block, vocab, settings, generator=None):
    """diffusion_loss with a CFT run's settings (cft_loss_settings): the per-token weights from the trace's token
    kinds (reasoning.loss_weights), complementary masks, the validity and certainty terms."""
    weights = loss_weights(batch, settings['w_trace'], settings['w_answer'], reject=True, w_judge=settings['w_judge'])
    judged = token_roles(batch['resp'], batch['kind'], vocab) == ROLES.index('judgement')
    return diffusion_loss(model, batch, block, vocab.mask, weights, complementary=True, vocab=vocab,
                          generator=generator, suffix_share=settings['suffix_share'],
                          validity_weight=settings['validity_weight'], certainty_weight=settings['certainty_weight'],
                          certain_at=~judged)


# ----------------------------------------------------------------------------- validation and keeping

DECODING = ('tau', 'eval_n', 'eval_batch', 'data_digests')  # what a validation depends on, beside the block
VALIDATION = ('R@1', 'R@3', 'R@5', 'N@3', 'N@5', 'MRR', 'validity', 'tokens_per_forward', 'floor_R@1')  # its record


def parent_validation(parent_ck, run_cfg, block):
    """The parent checkpoint's kept validation record where it was decoded exactly as this run decodes (the same
    block, threshold, users, batches and data): the starting model's evaluation, which need not run again."""
    recorded = parent_ck['run_cfg']
    same = recorded.get('block') == block and all(recorded.get(key) == run_cfg.get(key) for key in DECODING)
    record = (parent_ck.get('metrics') or {}).get('valid') if same else None
    return {key: value for key, value in record.items() if key in VALIDATION} if record else None


def load_parent(path, stages, data_dir, device, block=None):
    """A stage's starting checkpoint (one of `stages`), its model, the data it was trained on and, for a stage
    that decodes in blocks (`block` given; 0: the checkpoint's own), its block size: an AR checkpoint is converted
    there (diffusion.convert: the naive conversion, or block 1 for the RL-tuned AR reference), a diffusion one
    must have been trained at that block. A missing or foreign file or other data ends the run in one line that
    names the fix."""
    try:
        model, ck = load_checkpoint(path, stages=stages, device=device)
        data = load_data_for(ck, data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    if block is None:
        return model, ck, data
    trained = ck['run_cfg'].get('block')
    if ck['stage'] == 'ar':
        if block <= 0:
            raise SystemExit(f"error: {path} is an AR model; pass --block=1 (the RL-tuned AR reference) or "
                             f"--block=16 (naive conversion)")
        convert(model, data.vocab)
        print(f"converted the AR model {path} to block diffusion with B = {block}")
    elif block and block != trained:
        raise SystemExit(f"error: {path} was trained with block {trained}, this run asks for --block={block}")
    return model, ck, data, block or trained


def stage_name(out):
    """A stage's name, from its checkpoint's: out/cft_more.pt -> cft_more (its log, record and curves)."""
    return os.path.splitext(os.path.basename(out))[0]


class Stage:
    """One training stage's loop over a model (see the module's docstring). The checkpoint records the run's
    flags, its block and its data (what a resume must match); `gens` are the stage's own torch generators, saved
    and restored with the weights, the optimizer and the log; `extras(step, log)` logs the stage's own diagnostics at
    each evaluation. With `start_from` (the
    parent's checkpoint) a fresh run first evaluates the starting model as step 0, reusing the parent's record
    where it was decoded the same way, so that a stage that only hurts keeps its parent."""

    def __init__(self, cfg, model, data, device, timer, stage, parent=None, block=0, weight_decay=0.0, gens=None,
                 extras=None, start_from=None):
        self.cfg, self.model, self.data, self.device, self.timer = cfg, model, data, device, timer
        self.stage, self.parent, self.block = stage, parent, block
        self.run_cfg = run_cfg = {**asdict(cfg), 'block': block, 'data': asdict(data.cfg),
                                  'data_digests': data.fingerprint()}
        self.name, self.gens, self.extras = stage_name(cfg.out), gens or {}, extras
        self.opt = make_optimizer(model, cfg.lr, weight_decay)
        resumed = load_resume(cfg.out, model, self.opt, run_cfg)  # an interrupted run of this config continues
        self.resumed = resumed is not None
        self.log = JsonlLog(f"out/log_{self.name}.jsonl", keep=resumed['state']['log_lines'] if resumed else None)
        self.best, self.start, self.step, self.shown = None, 0, 0, None
        if resumed:
            self.start, self.best = resumed['step'], resumed['state']['best']
            for k, g in self.gens.items():
                g.set_state(resumed['state']['gens'][k])
        elif start_from is not None:
            self.evaluate(0, parent_validation(start_from, run_cfg, block))

    def evaluate(self, step, known=None):
        """Decode validation (or take `known`, this model's record from an identical decoding), log it, keep the
        model if it is the best so far (common.is_better), log the stage's extras, save the resume state."""
        cfg, reused = self.cfg, known is not None
        if not reused:  # the run's own decoding (block 0: AR, which has no threshold)
            decoding = Decoding(block=self.block, tau=getattr(cfg, 'tau', 0.9), batch_size=cfg.eval_batch,
                                limit=cfg.eval_n)
            res, _ = evaluate(self.model, self.data, 'valid', decoding, self.device)
            known = {**res['metrics'], 'validity': res['validity'], 'tokens_per_forward': res.get('tokens_per_forward'),
                     'floor_R@1': res['floor']['R@1']}
        row = dict(known, step=step)
        self.log.write(step=step, val_R1=row['R@1'], val_N3=row['N@3'], val_validity=row['validity'],
                       val_tok_per_fwd=row.get('tokens_per_forward'))
        tqdm.write(f"step {step}: valid R@1 {row['R@1']:.4f} N@3 {row['N@3']:.4f} validity {row['validity']:.4f} "
                   f"tokens/forward {row.get('tokens_per_forward') or 0:.2f} (floor R@1 {row['floor_R@1']:.4f})"
                   + (" (the parent's record: the same model, decoded the same way)" if reused else ""))
        if is_better(row, self.best, cfg.min_validity):
            self.best = row
            save_checkpoint(cfg.out, self.model, self.run_cfg, stage=self.stage, parent=self.parent, step=step,
                            metrics={'valid': row})
        if self.extras:
            self.extras(step, self.log)  # the log: a parent's evaluation in __init__ runs before the stage is bound
        self.save(step)

    def save(self, step):
        save_resume(self.cfg.out, self.model, self.opt, self.run_cfg, step,
                    {'best': self.best, 'log_lines': self.log.lines(),
                     'gens': {k: g.get_state() for k, g in self.gens.items()}})

    def __iter__(self):
        """(step, rng) for each step from where the run stands: the lr set, and a numpy generator of the step's own
        (its batch or prompts depend on the step only, so a resumed run draws what the whole run would)."""
        cfg = self.cfg
        pbar = tqdm(range(self.start, cfg.max_steps), desc=self.name, dynamic_ncols=True, initial=self.start,
                    total=cfg.max_steps)
        interrupt = Interrupt()
        for step in pbar:
            for g in self.opt.param_groups:
                g['lr'] = lr_at(step, cfg.max_steps, cfg)
            self.step = step
            yield step, np.random.default_rng([cfg.seed, step])
            if self.shown:
                pbar.set_postfix(self.shown)
            evaluate_now, stop = cfg.evaluation_due(step, self.timer)
            if evaluate_now:
                self.evaluate(step + 1)
            interrupt.stop_if_asked(lambda: self.save(step + 1), cfg.out, step + 1)
            if stop:
                break
        finish_resume(cfg.out)

    def optimize(self, loss):
        """One optimizer step on this step's loss (backward, clip, step)."""
        optimizer_step(self.model, self.opt, loss, self.step, self.cfg.lr)

    def step_accumulated(self, total):
        """The optimizer step after the caller's own backward passes (micro-batches), whose losses sum to `total`."""
        clip_and_step(self.model, self.opt, total, self.step, self.cfg.lr)

    def show(self, **values):
        """Values for the progress bar after this step."""
        self.shown = {k: f"{v:.3f}" for k, v in values.items()}

    def finish(self, title, keys, **extra):
        """The end of the stage: curves, and results/train_<name>.json with the kept model's validation record."""
        cfg, best = self.cfg, self.best
        print(f"best valid R@1 {best['R@1']:.4f} validity {best['validity']:.4f} at step {best['step']}; saved "
              f"{cfg.out} ({self.timer():.0f}s)")
        plot_curves(self.log.path, results_path(f"curves_{self.name}.png"), keys, f"{title} ({self.name})")
        write_json(results_path(f"train_{self.name}.json"), {
            'name': self.name, 'valid': best, 'seconds': round(self.timer(), 1), 'device': device_name(self.device),
            'command': command_line(), 'commit': git_commit(), 'config': asdict(cfg), **extra})
