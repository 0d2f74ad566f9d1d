"""Train the AR reasoning re-ranker (the GR2 teacher): optional mid-training, then SFT on prompt -> trace -> answer.

    python train_ar.py                                   # one GPU: d256 L6 -> out/ar.pt (run.sh caps it at 80 s)
    python train_ar.py --trace=False --out=out/ar_direct.pt   # the ablation: same model, answers directly
    python train_ar.py        # without CUDA: the CPU setting (CPU_SETTING: d128 L2, 1,500 steps), ~19 min on 2 cores

Mid-training (GR2 mid-trains an LLM before SFT) is here the analogue: next-item prediction over users' train
sequences written as in the prompt (item, then its attributes), which also aligns items with attributes.
SFT weighs reasoning and answer tokens separately. Keeps the checkpoint with the best validation R@1.
"""
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (StageSettings, start_stage, autocast, device_name, load_checkpoint, JsonlLog, save_resume,
                    load_resume, finish_resume, Interrupt)
from data_beauty import DataConfig, BeautyData, DataError, collate
from reasoning import drill_decisions, loss_weights, trace_entries
from evaluation import skip_report, trace_report
from training import make_optimizer, optimizer_step, lr_at, validate_and_keep, finish
from model import GPT, GPTConfig, response_hidden


@dataclass
class TrainARConfig(StageSettings):  # + min_validity, eval_n, eval_batch, time_limit, seed, device
    data_dir: str = 'data/beauty'
    data_name: str = 'Beauty'    # the S3-Rec files <data_name>.txt and <data_name>_item2attributes.json
    trace: bool = True           # False: prompt -> answer (the no-reasoning ablation)
    out: str = 'out/ar.pt'
    name: str = ''               # results/train_<name>.json and curves_<name>.png; default ar / ar_direct
    # model
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    n_resp_pos: int = 192        # learned response-index embeddings (model.GPT.forward); 0 = rotary positions only
    entry_embedding: bool = True  # prompt and trace tokens learn the candidate entry they are in (model.GPT.forward)
    full_softmax: bool = True    # SFT's cross-entropy over every token, items and attributes too (FINDINGS)
    # optimisation
    mid_steps: int = 300         # mid-training steps (0 = skip)
    max_steps: int = 2000        # SFT steps (about 12 epochs at batch 128: later steps overfit the choice)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    w_trace: float = 0.5         # loss weight of reasoning tokens
    w_answer: float = 5.0        # loss weight of answer tokens (the skip after the decision is learnt one decision
                                 # at a time; at 1.0 some decisions stayed unlearnt on two seeds of three: FINDINGS)
    w_choice: float = 5.0        # loss weight of the first ranked item (the decision: one token, learnt last)
    w_judge: float = 5.0         # loss weight of the trace's match winners and conclusion (reasoning.loss_weights)
    trace_sample: float = 1.0    # share of trace tokens that carry the loss each step (ar_response_loss); at 0.25
                                 # (a speed choice) the CPU teacher wrote 4% of its scores wrong (FINDINGS)
    reject: bool = True          # no decision loss where the trace concludes elsewhere (reasoning.loss_weights)
    drill: float = 0.5           # share of windows whose answer goes on from a random decision (drill_answers)
    grad_clip: float = 1.0
    # evaluation
    eval_every: int = 250
    # without CUDA (common.parse_config): d128 L2, 1,500 steps at batch 32, about 19 minutes on 2 cores (at 1,000 the
    # scores were still being learnt: free-decoded 0.981 right against 0.997, FINDINGS)
    CPU_SETTING = dict(n_layer=2, n_embd=128, n_head=4, batch_size=32, mid_steps=0, max_steps=1500, eval_every=500,
                       eval_n=600, eval_batch=300)

    def problem(self):
        if self.n_embd % self.n_head:
            return f"--n_embd={self.n_embd} is not divisible by --n_head={self.n_head}"
        if self.n_embd // self.n_head % 2:
            hs = self.n_embd // self.n_head
            return (f"--n_embd={self.n_embd} / --n_head={self.n_head} = {hs} channels a head: rotary positions turn "
                    f"channel pairs, so a head needs an even number (e.g. --n_embd={self.n_head * (hs + 1)})")
        if not 0 <= self.dropout < 1:
            return f"--dropout={self.dropout}: a probability, in [0, 1)"
        if self.n_resp_pos < 0:
            return f"--n_resp_pos={self.n_resp_pos}: a number of response positions, >= 0 (0 = none)"
        weights = {'w_trace': self.w_trace, 'w_answer': self.w_answer, 'w_choice': self.w_choice,
                   'w_judge': self.w_judge}
        for name, w in weights.items():
            if w < 0:
                return f"--{name}={w}: a loss weight is >= 0 (0 trains nothing on those tokens)"
        if not any(weights.values()):
            return "every loss weight is 0 (--w_trace, --w_answer, --w_choice, --w_judge): give one a positive weight"
        if not 0 <= self.drill <= 1:
            return f"--drill={self.drill}: a share of the windows, in [0, 1]"
        if not 0 < self.trace_sample <= 1:
            return f"--trace_sample={self.trace_sample}: a share of the trace tokens, in (0, 1]"
        return super().problem()


def ar_response_loss(model, batch, w_trace=1.0, w_answer=1.0, w_choice=1.0, trace_sample=1.0, generator=None,
                     reject=False, w_judge=None, full_softmax=False):
    """Teacher-forced AR cross-entropy over the response up to its first <eos>, weighted by token kind.

    The output head runs only where a loss is taken: on every answer token and judgement and on a random
    `trace_sample` share of the other trace tokens, whose weight is divided by that share so the expected loss
    is unchanged. The answer (the decision and the copying
    of the list) is what is slow to learn; the trace is long and mostly easy. `reject`: see
    reasoning.loss_weights; `w_judge` defaults to the trace's weight before that division. `full_softmax`: the
    cross-entropy over every token (model.head's full=True); decoding reads the response head either way, and
    its argmax is the same wherever the full head's is a response token."""
    resp = batch['resp']
    B, R = resp.shape
    live = torch.arange(R, device=resp.device)[None, :] < batch['resp_len'][:, None]
    w_judge = w_trace if w_judge is None else w_judge
    w = loss_weights(batch, w_trace / trace_sample, w_answer, w_choice, reject, w_judge) * live
    if trace_sample < 1.0:
        keep = torch.rand(B, R, device=resp.device, generator=generator) < trace_sample
        w = w * (keep | (batch['kind'] > 0))
    h = response_hidden(model, batch['prompt'], batch['pad'], resp)
    at = w > 0
    labels = batch.get('labels', resp)  # what each position should predict, where the drill wrote another input
    ce = F.cross_entropy(model.head(h[at], full=full_softmax).float(), labels[at], reduction='none')
    return (ce * w[at]).sum() / w[at].sum()


def drill_answers(batch, share, rng, vocab):
    """reasoning.drill_decisions for the causal teacher: a drilled row's answer goes on from a random decision,
    while the decision itself, predicted from the trace before it is written, keeps the target as its label and
    its loss (a block decoder sees the rest of its block when it predicts the decision, so train_cft drops that
    loss instead). So a drilled share leaves no decision untaught; drilling every row was worse, the rest of the
    answer then never seeing the decisions it follows at test time (FINDINGS, "The answer's skip")."""
    drilled = drill_decisions(batch, share, rng, vocab)['resp']
    return {**batch, 'resp': drilled, 'labels': torch.where(batch['kind'] == 2, batch['resp'], drilled)}


def history_lm_batches(data, batch_size, rng, max_items=20):
    """Mid-training batches: <bos> (item attrs..)* over a user's train part, loss on every next token."""
    v = data.vocab
    while True:
        users = rng.integers(0, len(data.seqs), batch_size)
        rows = []
        for u in users:
            toks = [v.bos]
            for i in data.seqs[u][:-2][-max_items:]:
                toks += [v.item(i)] + [v.attr(a) for a in data.attrs[i]]
            rows.append(toks)
        T = max(len(r) for r in rows)
        x = torch.full((batch_size, T), v.eos, dtype=torch.long)
        live = torch.zeros((batch_size, T), dtype=torch.bool)
        for r, toks in enumerate(rows):
            x[r, :len(toks)] = torch.as_tensor(toks)
            live[r, :len(toks)] = True
        yield x, live


def lm_loss(model, x, live):
    B, T = x.shape
    pos = torch.arange(T, device=x.device).expand(B, -1)
    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, -1, -1)
    logits = model.head(model(x[:, :-1], pos[:, :-1], mask[:, :-1, :-1]), full=True)  # items and attributes too
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction='none')
    w = live[:, 1:].reshape(-1).float()
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def choice_accuracy(model, split, vocab, device, n=1024, batch=64):
    """Teacher-forced R@1 of the decision alone: at the first answer position (full gold trace as context),
    the most probable of the N candidate tokens. Separates 'cannot point at a candidate yet' from 'points at the
    wrong one' while validity is still low. The floor (always the first candidate) scores R@1 of the floor."""
    model.eval()
    hits, total = 0, 0
    for a in range(0, min(n, len(split)), batch):
        idx = range(a, min(n, len(split), a + batch))
        b = collate(split, idx, vocab, device=device)
        with autocast(device):
            h = response_hidden(model, b['prompt'], b['pad'], b['resp'])
        at = (b['kind'] == 2).float().argmax(1)                               # the choice token's position
        logits = model.head(h[torch.arange(len(at), device=device), at], fp32=True)  # (B, V)
        pick = logits.gather(1, b['cands']).argmax(1)
        hits += int((pick == b['target']).sum())
        total += len(at)
    return hits / max(total, 1)


def mid_train(model, data, cfg, rng, device, log):
    """Mid-training: next-token prediction over users' train histories (items and attributes), logged at negative
    steps so that SFT's curve starts at 0."""
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    batches = history_lm_batches(data, cfg.batch_size, rng)
    pbar = tqdm(range(cfg.mid_steps), desc='mid-train', dynamic_ncols=True)
    for step in pbar:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.mid_steps, cfg)
        x, live = next(batches)
        with autocast(device):
            loss = lm_loss(model, x.to(device), live.to(device))
        optimizer_step(model, opt, loss, cfg.grad_clip, step, cfg.lr)
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        log.write(step=step - cfg.mid_steps, mid_loss=loss.item())


def main():
    cfg, rng, device, timer = start_stage(TrainARConfig)
    try:
        data = BeautyData(DataConfig(data_dir=cfg.data_dir, name=cfg.data_name, trace=cfg.trace))
    except DataError as e:
        raise SystemExit(f"error: {e}")
    train = data.splits['train']
    mcfg = GPTConfig(vocab_size=data.vocab.size, n_out=data.vocab.n_out, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, n_resp_pos=cfg.n_resp_pos,
                     slot0=data.vocab.slot0, n_slots=data.vocab.n_cand if cfg.entry_embedding else 0,
                     trace_entries=tuple(trace_entries(data.vocab.n_cand)) if cfg.entry_embedding and cfg.trace else ())
    model = GPT(mcfg).to(device)
    print(f"model {model.num_params() / 1e6:.2f}M parameters on {device_name(device)}; "
          f"{len(train)} train instances, trace={cfg.trace}")
    name = cfg.name or ('ar' if cfg.trace else 'ar_direct')
    run_cfg = {**asdict(cfg), 'data': asdict(data.cfg), 'data_digests': data.fingerprint()}
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    resumed = load_resume(cfg.out, model, opt, run_cfg)  # an interrupted run of this config continues
    log = JsonlLog(f"out/log_{name}.jsonl", keep=resumed['state'].get('log_lines') if resumed else None)
    save = lambda step: save_resume(cfg.out, model, opt, run_cfg, step, {'best': best, 'log_lines': log.lines()})

    if cfg.mid_steps > 0 and resumed is None:
        mid_train(model, data, cfg, rng, device, log)
        opt = make_optimizer(model, cfg.lr, cfg.weight_decay)  # fresh moments for SFT

    start = resumed['step'] if resumed else 0
    best = resumed['state']['best'] if resumed else None
    pbar = tqdm(range(start, cfg.max_steps), desc='sft', dynamic_ncols=True, initial=start, total=cfg.max_steps)
    interrupt = Interrupt()
    for step in pbar:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, cfg.max_steps, cfg)
        rng = np.random.default_rng([cfg.seed, step])  # batches depend on the step only: a resumed run sees the same
        model.train()
        idx = rng.integers(0, len(train), cfg.batch_size)
        batch = collate(train, idx, data.vocab, device=device)
        if cfg.drill > 0:
            batch = drill_answers(batch, cfg.drill, rng, data.vocab)
        with autocast(device):
            loss = ar_response_loss(model, batch, cfg.w_trace, cfg.w_answer, cfg.w_choice, cfg.trace_sample,
                                    reject=cfg.reject, w_judge=cfg.w_judge, full_softmax=cfg.full_softmax)
        optimizer_step(model, opt, loss, cfg.grad_clip, step, cfg.lr)
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        log.write(step=step, loss=loss.item(), lr=opt.param_groups[0]['lr'])
        evaluate_now, stop = cfg.evaluation_due(step, timer)
        if evaluate_now:
            best = validate_and_keep(model, data, cfg, device, log, step + 1, best, run_cfg, 'ar')
            choice = choice_accuracy(model, data.splits['valid'], data.vocab, device)
            log.write(step=step + 1, val_choice_R1=choice)
            tqdm.write(f"step {step + 1}: teacher-forced choice R@1 {choice:.4f} (valid, first 1024)")
            save(step + 1)
        interrupt.stop_if_asked(lambda: save(step + 1), cfg.out, step + 1)
        if stop:
            break
    finish_resume(cfg.out)
    if cfg.trace:
        best_model, _ = load_checkpoint(cfg.out, device=device)
        best.update(trace_report(best_model, data.splits['valid'], data.vocab, device))
        best['skip_by_decision'] = skip_report(best_model, data.splits['valid'], data.vocab, device)
        print("the trace, teacher-forced on validation: share of tokens predicted with p > 0.99 {trace_p99_share:.3f}; "
              "accuracy of the weights {weight_accuracy:.3f}, the scores {score_accuracy:.3f}, the matches "
              "{match_accuracy:.3f}, the conclusion {conclusion_accuracy:.3f}, the decision where the conclusion is "
              "not c1 {departure_accuracy:.3f} (of {departures})".format(**best))
        print("the answer's rest after each decision c1 .. cN, teacher-forced (rows exactly right): "
              + ' '.join(f"{share:.2f}" for share in best['skip_by_decision']))
    finish(cfg, name, f"AR teacher ({name})", log, best, timer, device,
           ['mid_loss', 'loss', 'val_R1', 'val_choice_R1', 'val_validity'],
           params=model.num_params())


if __name__ == '__main__':
    main()
