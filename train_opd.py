"""OPD: on-policy distillation of the block-diffusion student from the frozen AR teacher.

    python train_opd.py                                     # one GPU: out/cft.pt + out/ar.pt -> out/opd.pt
    python train_opd.py       # without CUDA: the CPU setting (CPU_SETTING: 8 prompts x 2, 300 steps)
    python train_opd.py --rollouts=teacher --state=l2r --out=out/opd_offpolicy.pt   # the off-policy control

Per prompt the student samples G' rollouts of its own at the fast end's threshold (tau 0.6, where parallel
commits write what it gets wrong); the teacher scores each once by teacher forcing (conditioned on the rollout's
prefix), and the loss is the forward KL(teacher || student) over the full vocabulary at every committed token up
to <eos>, with the student's distribution taken at one of two states (`--state`):
  commit  the block as the sampler saw it when it committed the token (replay of the recorded steps): corrected
          where its parallel decoding acted, though the teacher conditions on tokens the student had still masked
          (so with B > 1 the KL cannot reach zero). At tau 0.6 it lifted validation validity from 0.82 to 0.97 in
          50 steps; l2r did nothing, then lowered it (FINDINGS.md, "OPD at the fast end").
  l2r     the tokens left of it in its block revealed, the rest masked: the teacher's conditioning, so the KL can
          reach zero (B stacked states per block).
With B = 1 both are the AR distillation loss. `--cft_weight` adds the student's CFT loss as an anchor;
`--rollouts=teacher` (the control) distils on the teacher's own samples instead.
"""
from dataclasses import dataclass

import torch

from common import StageSettings, start_stage, same_file_problem, autocast
from checkpoints import load_checkpoint, CheckpointError, check_data_matches
from data_beauty import collate
from diffusion import live_tokens, replay_logits, forward_kl, left_to_right_steps, at_offsets
from model import response_hidden
from rollouts import chunks, rollouts, score_rollouts
from training import Stage, cft_loss, cft_loss_settings, load_parent


@dataclass
class TrainOPDConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    student: str = 'out/cft.pt'
    teacher: str = 'out/ar.pt'
    out: str = 'out/opd.pt'
    data_dir: str = 'data/beauty'
    n_prompts: int = 16          # prompts per step
    group: int = 4               # G': student rollouts per prompt
    temperature: float = 1.0     # rollouts sample; evaluation is greedy
    tau: float = 0.6             # the rollouts' threshold rule and the validation's: the fast end
    rollouts: str = 'student'    # who samples the trajectories: student (on-policy) or teacher (the control)
    state: str = 'commit'        # the student's state for the KL: commit or l2r (see the docstring)
    l2r_states: int = 0          # l2r: > 0 distils only this many offsets of each block per step, drawn afresh
                                 # (len + 1 stacked states per replay instead of B: cheaper on a CPU); 0 = every one
    max_steps: int = 100
    micro_batch: int = 16        # rollouts per replay forward (memory: l2r stacks B states per rollout)
    lr: float = 2e-4
    warmup: int = 10
    eval_every: int = 20
    cft_weight: float = 0.0      # > 0: add the CFT loss (the student's own weights) on each step's prompts
    # without CUDA: 16 rollouts a step, the CFT anchor, each step kept or not on every validation user (on 1,024 RL
    # kept a loser), lr 3e-5 (at 1e-4 validation validity fell to 0.80 at step 50: FINDINGS, OPD)
    CPU_SETTING = dict(n_prompts=8, group=2, cft_weight=1.0, lr=3e-5, max_steps=300, eval_every=50,
                       eval_n=0, eval_batch=128)

    def problem(self):
        if self.rollouts not in ('student', 'teacher') or self.state not in ('commit', 'l2r'):
            return (f"--rollouts={self.rollouts} --state={self.state}: rollouts student (OPD) or teacher (the "
                    f"off-policy control), state commit or l2r")
        if self.rollouts == 'teacher' and self.state != 'l2r':
            return "--rollouts=teacher needs --state=l2r (the teacher's samples have no block commit steps)"
        if self.l2r_states < 0 or (self.l2r_states and self.state != 'l2r'):
            return f"--l2r_states={self.l2r_states}: 0 (every offset) or a count of offsets, at --state=l2r only"
        return (same_file_problem('student', self.student, self.out)
                or same_file_problem('teacher', self.teacher, self.out) or super().problem())


def size_note(teacher_ck, student_ck, path):
    """A note when the teacher is not the student's size (allowed: a larger teacher distils as well), else None."""
    size = lambda ck: {k: ck['model_cfg'].get(k) for k in ('n_layer', 'n_head', 'n_embd')}
    return None if size(teacher_ck) == size(student_ck) else \
        f"note: the teacher {path} is {size(teacher_ck)}, the student {size(student_ck)}\n"


def load_teacher(cfg, student_ck, device):
    """The frozen AR teacher, trained on the student's data."""
    try:
        teacher, tck = load_checkpoint(cfg.teacher, stages=['ar'], device=device)
        check_data_matches(tck, student_ck['run_cfg'], cfg.teacher)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    print(size_note(tck, student_ck, cfg.teacher) or '', end='')
    return teacher.eval().requires_grad_(False)


def distilled_tokens(res, block, offsets=None):
    """The tokens the KL covers: every live one, or only those at the chosen offsets of their blocks."""
    live = live_tokens(res)
    return live & at_offsets(live.shape[1], block, offsets, live.device) if offsets else live


def opd_kl(student, teacher, batch, res, block, vocab, rows=slice(None), state='l2r', offsets=None):
    """Mean KL(teacher || student) over the distilled tokens of rollouts `rows`: the teacher teacher-forced on
    the rollout, the student replayed at the left-to-right state (l2r; only at `offsets` if given) or at the
    state in which it committed each token (commit)."""
    part = {k: v[rows] for k, v in res.items()}
    live = distilled_tokens(part, block, offsets)
    if state == 'l2r':
        part['steps'] = left_to_right_steps(part['steps'], block, offsets)
    prompt, pad = batch['prompt'][rows], batch['pad'][rows]
    with torch.no_grad():
        t_logits = teacher.head(response_hidden(teacher, prompt, pad, part['tokens'])[live], fp32=True)
        t_logits[:, vocab.mask] = -float('inf')
    s_logits = replay_logits(student, prompt, pad, part, block, vocab, live)
    return forward_kl(t_logits, s_logits, torch.ones(len(t_logits), device=t_logits.device))


def main():
    cfg, _, device, timer = start_stage(TrainOPDConfig)
    student, sck, data, block = load_parent(cfg.student, ['cft', 'opd'], cfg.data_dir, device, block=0)
    teacher, vocab, train = load_teacher(cfg, sck, device), data.vocab, data.splits['train']
    if cfg.l2r_states > block:
        raise SystemExit(f"error: --l2r_states={cfg.l2r_states} exceeds the student's block of {block}")
    print(f"student {cfg.student} (B={block}), teacher {cfg.teacher}: {cfg.n_prompts}x{cfg.group} rollouts")
    sampler, sample_block = (teacher, 1) if cfg.rollouts == 'teacher' else (student, block)
    gen, noise_gen = (torch.Generator(device=device).manual_seed(cfg.seed + i) for i in (0, 1))  # rollouts, masks
    run = Stage(cfg, student, data, device, timer, 'opd', parent=cfg.student, block=block,
                gens={'gen': gen, 'noise': noise_gen}, start_from=sck)
    cft_settings = cft_loss_settings(sck['run_cfg'])
    for step, rng in run:
        idx = rng.integers(0, len(train), cfg.n_prompts)
        batch, res, rows = rollouts(sampler, data, idx, cfg.group, block, cfg, gen, device, sample_block)
        offsets = sorted(rng.choice(block, cfg.l2r_states, replace=False).tolist()) if cfg.l2r_states else None
        live = distilled_tokens(res, block, offsets)
        run.opt.zero_grad(set_to_none=True)
        kl = 0.0
        for sl in chunks(len(live), cfg.micro_batch):  # the token mean over every rollout, a micro-batch at a time
            with autocast(device):
                loss = opd_kl(student, teacher, batch, res, block, vocab, sl, cfg.state, offsets) * live[sl].sum()
                loss = loss / live.sum()
            loss.backward()
            kl += loss.item()
        anchor = {}
        if cfg.cft_weight > 0:  # off-policy anchor: the denoising states that the KL's replay never visits
            with autocast(device):
                cft, _ = cft_loss(student, collate(train, idx, vocab, block=block, device=device), block, vocab,
                                  cft_settings, noise_gen)
            (cfg.cft_weight * cft).backward()
            anchor['cft_loss'] = cft.item()
        run.step_accumulated(kl + anchor.get('cft_loss', 0.0))
        run.show(kl=kl)
        run.log.write(step=step + 1, kl=kl, rollout_validity=score_rollouts(res, data, rows)[1].mean(),
                      tok_per_fwd=(res['n_tokens'].sum() / res['n_forwards'].sum()).item(), **anchor)
    run.finish('OPD', ['kl', 'rollout_validity', 'tok_per_fwd', 'val_R1', 'val_validity'])


if __name__ == '__main__':
    main()
