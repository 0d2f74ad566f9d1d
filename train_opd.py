"""OPD: on-policy distillation of the block-diffusion student from the frozen AR teacher.

    python train_opd.py                                     # one GPU: out/cft.pt + out/ar.pt -> out/opd.pt
    python train_opd.py       # without CUDA: the CPU setting (CPU_SETTING: 8 prompts x 2, 300 steps), ~8 min
    python train_opd.py --rollouts=teacher --state=l2r --out=out/opd_offpolicy.pt --name=opd_offpolicy  # control

Per prompt the student decodes G' rollouts of its own (4; 2 in the CPU setting; temperature sampling, block B,
at the fast end's threshold tau = 0.6, where parallel commits write what the student gets wrong);
the teacher scores each rollout once by teacher forcing (it conditions on the rollout's prefix o<j); the loss is
the forward KL(teacher || student) over the full vocabulary at every committed token up to <eos>.
The student's distribution is taken at one of two states (`--state`):
  commit  the block as the sampler saw it when it committed the token (replay of the recorded steps): the
          student is corrected exactly where its parallel decoding acted, but the teacher conditions on
          tokens the student had still masked, so with B > 1 the KL cannot reach zero;
  l2r     the tokens left of it in its block revealed, the rest masked: what the teacher's conditioning
          matches, so the KL can reach zero (B stacked states per block: more memory per rollout).
With B = 1 both are the AR distillation loss, zero when student = teacher. commit is the default: at tau 0.6 it
lifted validation validity from 0.82 to 0.97 within 50 steps, while l2r, which trains states the fast sampler
never visits, did nothing and then lowered it (at tau 0.9 it was the other way round; FINDINGS.md, "OPD at the
fast end"). `--cft_weight` adds the student's CFT loss as an anchor.
`--rollouts=teacher` is the off-policy control: the same loss on the teacher's own AR samples, so what OPD adds
over distilling on the teacher's trajectories is measured, not assumed.
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from common import (StageSettings, start_stage, same_file_problem, autocast, load_checkpoint, CheckpointError,
                    check_data_matches, Interrupt, finish_resume)
from data_beauty import DataError, collate
from evaluation import load_data_for
from diffusion import (live_tokens, replay_logits, forward_kl, left_to_right_steps, at_offsets,
                       rollout_answer_validity)
from model import response_hidden
from rollouts import chunks, rollouts, score_rollouts
from training import cft_loss, cft_loss_settings, lr_at, finish, OnPolicyRun


@dataclass
class TrainOPDConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    student: str = 'out/cft.pt'
    teacher: str = 'out/ar.pt'
    out: str = 'out/opd.pt'
    name: str = 'opd'
    data_dir: str = 'data/beauty'
    n_prompts: int = 16          # prompts per step
    group: int = 4               # G': student rollouts per prompt
    temperature: float = 1.0     # rollouts sample; evaluation is greedy
    tau: float = 0.6             # the rollouts' threshold rule and the validation's: the fast end
    k: int = 0
    from_left: bool = False      # the evaluation's commit order, also used for rollouts
    rollouts: str = 'student'    # who samples the trajectories: student (on-policy) or teacher (the control)
    state: str = 'commit'        # the student's state for the KL: commit or l2r (see the docstring)
    l2r_states: int = 0          # l2r: > 0 distils only this many offsets of each block per step, drawn afresh
                                 # (len + 1 stacked states per replay instead of B: cheaper on a CPU); 0 = every one
                                 # (unused at the commit state, which distils each token at its own state)
    max_steps: int = 100
    micro_batch: int = 16        # rollouts per replay forward (memory: l2r stacks B states per rollout)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 10
    grad_clip: float = 1.0
    eval_every: int = 20
    cft_weight: float = 0.0      # > 0: add the CFT loss (the student's own weights) on each step's prompts
    validity_weight: float = 0.0  # > 0: + the permutation-validity loss of the rollouts' answers at the KL's state
    # without CUDA: 16 rollouts a step, the CFT anchor (at l2r, e.g. the off-policy control, run.sh distils 4 offsets
    # of each block: 5 replay states, not 24);
    # each step kept or not on every validation user (a step's gain is a few users: on 1,024 RL kept a loser);
    # lr 3e-5: at 1e-4 validation validity fell to 0.80 at step 50 (FINDINGS, OPD)
    CPU_SETTING = dict(n_prompts=8, group=2, cft_weight=1.0, lr=3e-5, max_steps=300, eval_every=50,
                       eval_n=0, eval_batch=128)

    def problem(self):
        if self.rollouts not in ('student', 'teacher'):
            return f"--rollouts={self.rollouts}: use student (OPD) or teacher (the off-policy control)"
        if self.rollouts == 'teacher' and self.state != 'l2r':
            return "--rollouts=teacher needs --state=l2r (the teacher's samples have no block commit steps)"
        if self.state not in ('commit', 'l2r'):
            return f"--state={self.state}: use commit or l2r"
        if self.l2r_states < 0:
            return f"--l2r_states={self.l2r_states}: 0 (every offset) or a count of offsets"
        return (same_file_problem('student', self.student, self.out)
                or same_file_problem('teacher', self.teacher, self.out) or super().problem())


def size_note(teacher_ck, student_ck, path):
    """A note when the teacher is not the student's size (allowed: a larger teacher distils as well), else None."""
    size = lambda ck: {k: ck['model_cfg'].get(k) for k in ('n_layer', 'n_head', 'n_embd')}
    if size(teacher_ck) != size(student_ck):
        return f"note: the teacher {path} is {size(teacher_ck)}, the student {size(student_ck)}"
    return None


def load_student_and_teacher(cfg, device, student_stages):
    """The student (a diffusion checkpoint), its block size and data, and the frozen AR teacher."""
    try:
        student, sck = load_checkpoint(cfg.student, stages=student_stages, device=device)
        teacher, tck = load_checkpoint(cfg.teacher, stages=['ar'], device=device)
        data = load_data_for(sck, cfg.data_dir)
        check_data_matches(tck, sck['run_cfg'], cfg.teacher)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    note = size_note(tck, sck, cfg.teacher)
    if note:
        print(note)
    teacher.eval().requires_grad_(False)
    return student, sck, teacher, data


def distilled_tokens(res, block, offsets=None):
    """The tokens the KL covers: every live one, or only those at the chosen offsets of their blocks."""
    live = live_tokens(res)
    return live if offsets is None else live & at_offsets(live.shape[1], block, offsets, live.device)


def opd_kl(student, teacher, batch, res, block, vocab, rows=slice(None), state='l2r', offsets=None,
           validity_weight=0.0):
    """Mean KL(teacher || student) over the distilled tokens of rollouts `rows`: the teacher teacher-forced on
    the rollout, the student replayed at the left-to-right state (l2r; only at `offsets` if given) or at the
    state in which it committed each token (commit); + validity_weight x the permutation-validity loss of the
    rollouts' answers at that state (diffusion.rollout_answer_validity)."""
    part = {k: v[rows] for k, v in res.items()}
    live = distilled_tokens(part, block, offsets)
    if state == 'l2r':
        part['steps'] = left_to_right_steps(part['steps'], block, offsets)
    prompt, pad = batch['prompt'][rows], batch['pad'][rows]
    with torch.no_grad():
        t_logits = teacher.head(response_hidden(teacher, prompt, pad, part['tokens'])[live], fp32=True)
        t_logits[:, vocab.mask] = -float('inf')
    s_logits = replay_logits(student, prompt, pad, part, block, vocab, live)
    kl = forward_kl(t_logits, s_logits, torch.ones(len(t_logits), device=t_logits.device))
    if validity_weight > 0:
        kl = kl + validity_weight * rollout_answer_validity(s_logits, live, part['tokens'], batch['cands'][rows], vocab)
    return kl


def main():
    cfg, _, device, timer = start_stage(TrainOPDConfig)
    student, sck, teacher, data = load_student_and_teacher(cfg, device, ['cft', 'opd'])
    block, vocab, train = sck['run_cfg']['block'], data.vocab, data.splits['train']
    if cfg.state == 'commit' and cfg.l2r_states:
        print(f"note: --l2r_states={cfg.l2r_states} is unused at the commit state")
    if cfg.l2r_states > block:
        raise SystemExit(f"error: --l2r_states={cfg.l2r_states} exceeds the student's block of {block}")
    print(f"student {cfg.student} (B = {block}), teacher {cfg.teacher}; {cfg.n_prompts} prompts x {cfg.group} "
          f"rollouts of the {cfg.rollouts}")
    sampler, sample_block = (teacher, 1) if cfg.rollouts == 'teacher' else (student, block)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the rollouts' generator stays as it was
    run = OnPolicyRun(student, data, cfg, device, sck, block, 'opd', cfg.student, cfg.weight_decay, noise=noise_gen)
    log, opt, gen, keeper = run.log, run.opt, run.gen, run.keeper
    cft_settings = cft_loss_settings(sck['run_cfg'])
    pbar = tqdm(range(run.start, cfg.max_steps), desc='opd', dynamic_ncols=True, initial=run.start,
                total=cfg.max_steps)
    interrupt = Interrupt()
    for step in pbar:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.max_steps, cfg)
        rng = np.random.default_rng([cfg.seed, step])  # prompts depend on the step only: a resumed run sees the same
        idx = rng.integers(0, len(train), cfg.n_prompts)
        batch, res, rows = rollouts(sampler, data, idx, cfg.group, block, cfg, gen, device, sample_block)
        sample = cfg.l2r_states and cfg.state == 'l2r'
        offsets = sorted(rng.choice(block, cfg.l2r_states, replace=False).tolist()) if sample else None
        live = distilled_tokens(res, block, offsets)
        n_live = live.sum()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for sl in chunks(len(live), cfg.micro_batch):
            with autocast(device):
                loss = (opd_kl(student, teacher, batch, res, block, vocab, sl, cfg.state, offsets,
                               cfg.validity_weight) * live[sl].sum() / n_live)
            loss.backward()
            total += loss.item()
        extra = {}
        if cfg.cft_weight > 0:  # off-policy anchor: the denoising states that the KL's replay never visits
            gold = collate(train, idx, vocab, block=block, device=device)
            with autocast(device):
                cft, _ = cft_loss(student, gold, block, vocab, cft_settings, noise_gen)
            (cfg.cft_weight * cft).backward()
            extra['cft_loss'] = cft.item()
        if not np.isfinite(total + extra.get('cft_loss', 0.0)):  # the anchor is checked with the KL
            raise SystemExit(f"error: KL {total}, CFT loss {extra.get('cft_loss')} at step {step}; "
                             f"lower --lr (now {cfg.lr})")
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
        pbar.set_postfix(kl=f"{total:.3f}")
        log.write(step=step + 1, kl=total, rollout_validity=score_rollouts(res, data, rows)[1].mean(),
                  rollout_len=res['lengths'].float().mean().item(),
                  tok_per_fwd=(res['n_tokens'].sum() / res['n_forwards'].sum()).item(), **extra)
        evaluate_now, stop = cfg.evaluation_due(step, timer)
        if evaluate_now:
            keeper(step + 1)
            run.save(step + 1)
        interrupt.stop_if_asked(lambda: run.save(step + 1), cfg.out, step + 1)
        if stop:
            break
    finish_resume(cfg.out)
    finish(cfg, cfg.name, f"OPD ({cfg.name})", log, keeper.best, timer, device,
           ['kl', 'rollout_validity', 'tok_per_fwd', 'val_R1', 'val_validity'])


if __name__ == '__main__':
    main()
