"""Train the AR reasoning re-ranker (the GR2 teacher): optional mid-training, then SFT on prompt -> trace -> answer.

    python train_ar.py                                   # one GPU: d256 L6 -> out/ar.pt (run.sh caps it at 80 s)
    python train_ar.py --trace=False --out=out/ar_direct.pt   # the ablation: same model, answers directly
    python train_ar.py        # without CUDA: the CPU setting (CPU_SETTING: d128 L2, 1,500 steps; results/cpu/run.json)

Mid-training (GR2's, before SFT) is here next-item prediction over users' train sequences written as in the
prompt (item, then its attributes). SFT weighs trace and answer tokens apart; the best validation R@1 is kept.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import StageSettings, start_stage, autocast, device_name
from checkpoints import load_checkpoint
from data_beauty import DataConfig, BeautyData, DataError, collate, history_lm_batches
from reasoning import drill_decisions, loss_weights, trace_entries
from evaluation import choice_accuracy, teacher_report
from training import Stage, make_optimizer, optimizer_step, lr_at
from model import GPT, GPTConfig, response_hidden


@dataclass
class TrainARConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    data_dir: str = 'data/beauty'
    data_name: str = 'Beauty'    # the S3-Rec files <data_name>.txt and <data_name>_item2attributes.json
    trace: bool = True           # False: prompt -> answer (the no-reasoning ablation)
    out: str = 'out/ar.pt'       # its name (ar) names the log, the record and the curves
    # model (and, fixed: 192 learned response-index embeddings and candidate-entry embeddings: model.GPT.forward)
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    # optimisation
    mid_steps: int = 300         # mid-training steps (0 = skip)
    max_steps: int = 2000        # SFT steps (about 12 epochs at batch 128: later steps overfit the choice)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    w_trace: float = 0.5         # loss weight of reasoning tokens
    w_answer: float = 5.0        # loss weight of answer tokens, the decision included (the skip after the decision
                                 # is learnt one decision at a time; at 1.0 some decisions stayed unlearnt on two
                                 # seeds of three: FINDINGS)
    w_judge: float = 5.0         # loss weight of the trace's match winners and conclusion (reasoning.loss_weights)
    reject: bool = True          # no decision loss where the trace concludes elsewhere (reasoning.loss_weights)
    drill: float = 0.5           # share of windows whose answer goes on from a random decision (drill_answers)
    # evaluation
    eval_every: int = 250
    # without CUDA (common.parse_config): d128 L2, 1,500 steps at batch 32 (at 1,000 the scores were still being
    # learnt: free-decoded 0.981 right against 0.997, FINDINGS)
    CPU_SETTING = dict(n_layer=2, n_embd=128, n_head=4, batch_size=32, mid_steps=0, max_steps=1500, eval_every=500,
                       eval_n=600, eval_batch=300)

    def problem(self):
        if self.n_embd % self.n_head:
            return f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}"
        if (hs := self.n_embd // self.n_head) % 2:  # rotary positions turn channel pairs
            return (f"--n_embd={self.n_embd} / --n_head={self.n_head} = {hs} channels a head: rotary positions turn "
                    f"channel pairs, so a head needs an even number (e.g. --n_embd={self.n_head * (hs + 1)})")
        weights = {'w_trace': self.w_trace, 'w_answer': self.w_answer, 'w_judge': self.w_judge}
        if min(weights.values()) < 0 or not any(weights.values()):
            return (f"loss weights {weights}: each >= 0 (0 trains nothing on those tokens), one of them positive")
        if not 0 <= self.drill <= 1:
            return f"--drill={self.drill}: a share of the windows, in [0, 1]"
        return super().problem()


def ar_response_loss(model, batch, w_trace=1.0, w_answer=1.0, reject=False, w_judge=None, full_softmax=False):
    """Teacher-forced AR cross-entropy over the response up to its first <eos>, weighted by token kind
    (reasoning.loss_weights); the output head runs only where a loss is taken. `full_softmax` (the teacher's
    SFT): over every token of the vocabulary, items and attributes too (decoding reads the response head, whose
    argmax is the same wherever the full head's is a response token)."""
    resp = batch['resp']
    live = torch.arange(resp.shape[1], device=resp.device)[None, :] < batch['resp_len'][:, None]
    w = loss_weights(batch, w_trace, w_answer, reject, w_judge) * live
    h = response_hidden(model, batch['prompt'], batch['pad'], resp)
    at = w > 0
    labels = batch.get('labels', resp)  # what each position should predict, where the drill wrote another input
    ce = F.cross_entropy(model.head(h[at], full=full_softmax).float(), labels[at], reduction='none')
    return (ce * w[at]).sum() / w[at].sum()


def drill_answers(batch, share, rng, vocab):
    """reasoning.drill_decisions for the causal teacher: a drilled row's answer goes on from a random decision,
    while the decision itself, predicted from the trace before it is written, keeps the target as its label. So
    no decision goes untaught; drilling every row was worse, the rest of the answer then never seeing the
    decisions it follows at test time (FINDINGS, "The answer's skip")."""
    drilled = drill_decisions(batch, share, rng, vocab)
    return {**batch, 'resp': drilled, 'labels': torch.where(batch['kind'] == 2, batch['resp'], drilled)}


def lm_loss(model, x, live):
    """Next-token cross-entropy over the live tokens of item sequences, items and attributes included."""
    B, T = x.shape
    mask = torch.ones(T - 1, T - 1, dtype=torch.bool, device=x.device).tril().expand(B, -1, -1)
    logits = model.head(model(x[:, :-1], torch.arange(T - 1, device=x.device).expand(B, -1), mask), full=True)
    ce = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction='none')
    return (ce * live[:, 1:].flatten()).sum() / live[:, 1:].sum()


def mid_train(model, data, cfg, rng, device, log):
    """Mid-training: next-token prediction over users' train histories (items and attributes), logged at negative
    steps so that SFT's curve starts at 0. Its optimizer is its own: SFT starts with fresh moments."""
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    batches = history_lm_batches(data, cfg.batch_size, rng)
    for step in tqdm(range(cfg.mid_steps), desc='mid-train', dynamic_ncols=True):
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.mid_steps, cfg)
        x, live = next(batches)
        with autocast(device):
            loss = lm_loss(model, x.to(device), live.to(device))
        optimizer_step(model, opt, loss, step, cfg.lr)
        log.write(step=step - cfg.mid_steps, mid_loss=loss.item())


def main():
    cfg, rng, device, timer = start_stage(TrainARConfig)
    try:
        data = BeautyData(DataConfig(data_dir=cfg.data_dir, name=cfg.data_name, trace=cfg.trace))
    except DataError as e:
        raise SystemExit(f"error: {e}")
    train, vocab = data.splits['train'], data.vocab
    model = GPT(GPTConfig(vocab_size=vocab.size, n_out=vocab.n_out, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, n_resp_pos=192, slot0=vocab.slot0, n_slots=vocab.n_cand,
                          trace_entries=tuple(trace_entries(vocab.n_cand)) if cfg.trace else ())).to(device)
    print(f"{model.num_params() / 1e6:.2f}M parameters, {device_name(device)}, {len(train)} windows, trace={cfg.trace}")
    choice = lambda step, log: log.write(  # the decision alone, teacher-forced, beside each evaluation
        step=step, val_choice_R1=choice_accuracy(model, data.splits['valid'], vocab, device))
    run = Stage(cfg, model, data, device, timer, 'ar', weight_decay=cfg.weight_decay, extras=choice)
    if cfg.mid_steps > 0 and not run.resumed:
        mid_train(model, data, cfg, rng, device, run.log)
    for step, rng in run:
        batch = collate(train, rng.integers(0, len(train), cfg.batch_size), vocab, device=device)
        if cfg.drill > 0:
            batch = drill_answers(batch, cfg.drill, rng, vocab)
        with autocast(device):
            loss = ar_response_loss(model, batch, cfg.w_trace, cfg.w_answer, cfg.reject, cfg.w_judge, True)
        run.optimize(loss)
        run.show(loss=loss.item())
        run.log.write(step=step, loss=loss.item(), lr=run.opt.param_groups[0]['lr'])
    if cfg.trace:
        run.best.update(teacher_report(load_checkpoint(cfg.out, device=device)[0], data, device))
    run.finish('AR teacher', ['mid_loss', 'loss', 'val_R1', 'val_choice_R1', 'val_validity'],
               params=model.num_params())


if __name__ == '__main__':
    main()
