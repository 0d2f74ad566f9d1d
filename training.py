"""What every training stage shares: the optimizer and its schedule, one guarded optimizer step, validation
with checkpoint keeping (and what an on-policy run holds: OPD, RL), the end-of-stage record, and CFT's loss
settings (which OPD's anchor reuses).
"""
import math
from dataclasses import dataclass, asdict

import torch

from common import (JsonlLog, save_checkpoint, plot_curves, git_commit, is_better, command_line, write_json, results_path,
                    device_name, load_resume, save_resume)
from diffusion import diffusion_loss
from evaluation import Decoding, evaluate
from reasoning import loss_weights, token_roles, ROLES, roles_named
from tqdm import tqdm


def lr_at(step, total, cfg):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    # a Python float: the optimizer state holds it, and the resume file is read back with weights_only=True
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))))


def make_optimizer(model, lr, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def optimizer_step(model, opt, loss, grad_clip, step, lr):
    """Backward, clip, step; a non-finite loss stops the run and says what to change."""
    if not torch.isfinite(loss):
        raise SystemExit(f"error: loss is {loss.item()} at step {step}; lower --lr (now {lr})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


@dataclass
class CFTLoss:
    """The block-diffusion loss's settings (diffusion.diffusion_loss) as CFT trains with them: its config
    inherits these fields, every checkpoint records them, and OPD's anchor reads them back (cft_loss_settings)."""
    validity_weight: float = 0.25  # permutation-validity loss weight (0 = ablation); at 1 it kept validity 0.995
                                   # and cost the trace's scores (0.897 right against 0.951 at 0.25: FINDINGS)
    complementary: bool = True   # each example also with the opposite mask
    suffix_share: float = 0.0    # share of blocks masked from a random cut to the end (diffusion.noise_blocks)
    certainty_weight: float = 0.5  # entropy of the right predictions at masked positions (diffusion_loss)
    certainty_skip: str = 'judgement'  # roles (reasoning.ROLES) the certainty term leaves out (cft_loss)
    w_trace: float = 0.5
    w_answer: float = 1.0
    w_choice: float = 1.0        # the first ranked item
    w_judge: float = 2.0         # the trace's judgements: at 0.5 the student's matches were right 0.895, at 2 0.922
                                 # (FINDINGS, "One score per entry"); train_ar's 5 cost validity on a CPU
    w_score: float = None        # the trace's evidence scores, the one trace token that adds; None: as w_trace. At 2
                                 # the student's sums rose and its judgements fell (FINDINGS, "the first two entries")
    reject: bool = True          # no decision loss where the trace concludes elsewhere (reasoning.loss_weights)


WEIGHTING = ('w_trace', 'w_answer', 'w_choice', 'w_judge', 'w_score', 'reject')
MASKING = ('complementary', 'suffix_share', 'validity_weight', 'certainty_weight')
SETTINGS = WEIGHTING + MASKING + ('certainty_skip',)


def cft_loss_settings(run_cfg, keys=SETTINGS):
    """diffusion_loss's settings of a CFT run (its config or the dict a checkpoint records), CFTLoss's defaults
    where an older record lacks a field: one list, read by training, validation and OPD's anchor."""
    d = run_cfg if isinstance(run_cfg, dict) else asdict(run_cfg)
    if 'certainty_judgements' in d and 'certainty_skip' not in d:  # a record from before certainty_skip
        d = {**d, 'certainty_skip': '' if d['certainty_judgements'] else 'judgement'}
    if 'w_trace' in d and 'w_score' not in d:  # a record from before w_score: its scores weighed as the trace
        d = {**d, 'w_score': d['w_trace']}
    return {k: d.get(k, getattr(CFTLoss, k)) for k in keys}


def cft_loss(model, batch, block, vocab, settings, generator=None):
    """diffusion_loss with a CFT run's settings (cft_loss_settings): the per-token weights from the trace's token
    kinds (reasoning.loss_weights), then the masking and the extra terms among `settings`. The certainty term
    leaves out the roles named in `certainty_skip` (by default the judgements, the matches' winners and the
    conclusion: with the scores they compare still masked a first step guesses "the left one wins", right on most
    matches, and sureness from that prior would be rewarded wherever the guess is right; FINDINGS.md)."""
    weights = loss_weights(batch, **{k: settings[k] for k in WEIGHTING}, vocab=vocab)
    extra = {k: settings[k] for k in MASKING if k in settings}
    return diffusion_loss(model, batch, block, vocab.mask, weights, vocab=vocab, generator=generator,
                          certain_at=certainty_positions(batch, vocab, settings.get('certainty_skip', '')), **extra)


def certainty_positions(batch, vocab, skip):
    """(B, R) the response positions the certainty term covers: all but those of the roles in `skip`
    (comma-separated names from reasoning.ROLES), or None where none is skipped."""
    skipped = [ROLES.index(name) for name in roles_named(skip)]
    if not skipped:
        return None  # diffusion_loss: every position
    role = token_roles(batch['resp'], batch['kind'], vocab)
    return ~torch.isin(role, torch.tensor(skipped, device=role.device))


def validate(model, data, cfg, device, block=0, tau=0.9, k=0, split='valid', from_left=False):
    dcfg = Decoding(block=block, tau=tau, k=k, from_left=from_left, batch_size=cfg.eval_batch, limit=cfg.eval_n,
                        seed=cfg.seed)
    res, _ = evaluate(model, data, split, dcfg, device)
    return res


DECODING = ('tau', 'k', 'from_left', 'eval_n', 'eval_batch', 'seed', 'data_digests')  # what a validation depends on
VALIDATION = ('R@1', 'R@3', 'R@5', 'N@3', 'N@5', 'MRR', 'validity', 'tokens_per_forward', 'floor_R@1')  # its record


def parent_validation(parent_ck, run_cfg, block):
    """The parent checkpoint's kept validation record where it was decoded exactly as this run decodes (the same
    block, rule, users, batches, seed and data): the starting model's evaluation, which need not run again."""
    recorded, default = parent_ck['run_cfg'], {'k': 0, 'from_left': False}
    setting = lambda cfg, key: cfg.get(key, default.get(key))
    same = recorded.get('block') == block and all(setting(recorded, key) == setting(run_cfg, key) for key in DECODING)
    record = (parent_ck.get('metrics') or {}).get('valid') if same else None
    return {key: value for key, value in record.items() if key in VALIDATION} if record else None


def validate_and_keep(model, data, cfg, device, log, step, best, run_cfg, stage, parent=None, block=0, known=None):
    """Decode validation with the run's decoding settings (or take `known`, the same model's record from an
    identical decoding: parent_validation), log it, and write the checkpoint if it is the best so far
    (common.is_better). Returns the best record."""
    reused = known is not None
    if not reused:
        res = validate(model, data, cfg, device, block=block, tau=getattr(cfg, 'tau', 0.9), k=getattr(cfg, 'k', 0),
                       from_left=getattr(cfg, 'from_left', False))
        known = {**res['metrics'], 'validity': res['validity'], 'tokens_per_forward': res.get('tokens_per_forward'),
                 'floor_R@1': res['floor']['R@1']}
    row = dict(known, step=step)
    log.write(step=step, val_R1=row['R@1'], val_N3=row['N@3'], val_validity=row['validity'],
              val_tok_per_fwd=row.get('tokens_per_forward'))
    floor = f" (floor R@1 {row['floor_R@1']:.4f})" if 'floor_R@1' in row else ""  # records before it lack it
    tqdm.write(f"step {step}: valid R@1 {row['R@1']:.4f} N@3 {row['N@3']:.4f} validity {row['validity']:.4f} "
               f"tokens/forward {row.get('tokens_per_forward') or 0:.2f}{floor}"
               + (" (the parent's record: the same model, decoded the same way)" if reused else ""))
    if is_better(row, best, cfg.min_validity):
        best = row
        save_checkpoint(cfg.out, model, run_cfg, stage=stage, parent=parent, step=step, metrics={'valid': best})
    return best


def finish(cfg, name, title, log, best, timer, device, keys, **extra):
    """The end of every stage: curves, and results/train_<name>.json with the kept model's validation record."""
    print(f"best valid R@1 {best['R@1']:.4f} validity {best['validity']:.4f} at step {best['step']}; saved {cfg.out} "
          f"({timer():.0f}s)")
    plot_curves(log.path, results_path(f"curves_{name}.png"), keys, title)
    write_json(results_path(f"train_{name}.json"), {'name': name, 'valid': best, 'seconds': round(timer(), 1),
                                              'device': device_name(device), 'command': command_line(),
                                              'commit': git_commit(), 'config': asdict(cfg), **extra})


class Keeper:
    """validate_and_keep for one run: keeper(step) evaluates, saves the model if it is the best so far, and holds
    that record in keeper.best."""

    def __init__(self, model, data, cfg, device, log, run_cfg, stage, parent, block):
        self.validate = lambda step, best, known: validate_and_keep(model, data, cfg, device, log, step, best,
                                                                    run_cfg, stage, parent, block, known)
        self.best = None

    def __call__(self, step, known=None):
        self.best = self.validate(step, self.best, known)


class OnPolicyRun:
    """What OPD and RL share: the log, the optimizer, the generators (`gen` for the rollouts, and any the stage
    adds), and the keeper, which has already evaluated the starting model (step 0: a stage that only hurts keeps
    its parent). An interrupted run of the same config resumes: weights, optimizer, generators, the kept record
    and the log as they were at `start` (common.load_resume); save(step) writes that state."""

    def __init__(self, model, data, cfg, device, ck, block, stage, parent, weight_decay, **generators):
        self.opt = make_optimizer(model, cfg.lr, weight_decay)
        self.gens = {'gen': torch.Generator(device=device).manual_seed(cfg.seed), **generators}
        self.gen = self.gens['gen']
        run_cfg = {**asdict(cfg), 'block': block, 'data': ck['run_cfg']['data'],
                   'data_digests': ck['run_cfg'].get('data_digests')}
        resumed = load_resume(cfg.out, model, self.opt, run_cfg)
        self.log = JsonlLog(f"out/log_{cfg.name}.jsonl", keep=resumed['state']['log_lines'] if resumed else None)
        self.keeper = Keeper(model, data, cfg, device, self.log, run_cfg, stage, parent, block)
        self.save = lambda step: save_resume(cfg.out, model, self.opt, run_cfg, step, {
            'best': self.keeper.best, 'log_lines': self.log.lines(),
            'gens': {k: g.get_state() for k, g in self.gens.items()}})
        if resumed:
            self.start, self.keeper.best = resumed['step'], resumed['state']['best']
            for k, g in self.gens.items():
                g.set_state(resumed['state']['gens'][k])
        else:
            self.start = 0
            self.keeper(0, parent_validation(ck, run_cfg, block))
            self.save(0)
