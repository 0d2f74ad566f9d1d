"""Decode and evaluate any checkpoint on validation or test under the fixed protocol.

    python decode.py --ckpt=out/ar.pt --name=ar                           # AR teacher, greedy, test
    python decode.py --ckpt=out/cft.pt --name=cft --block=16 --tau=0.9    # block diffusion, threshold rule
    python decode.py --ckpt=out/ar.pt --name=naive --block=16 --tau=0.9   # naive conversion of the AR model
    python decode.py --ckpt=out/cft.pt --name=cft_left --block=16 --from_left=True  # commit in position order
    python decode.py --ckpt=out/cft.pt --block=16 --split=valid --limit=512 --teacher_forced=True
                                         # + the trace's judgements scored on the gold traces (trace_report)
    python decode.py --ckpt=out/cft.pt --block=16 --split=valid --limit=512 --first_step=True
                                         # + what one step commits with the whole block masked, by role

Writes results/eval_<name>.json: metrics, validity, floor, decode settings, and per-user ranks in user order
(invalid output scored as the pre-ranker's order), so any two systems can be compared by a paired bootstrap.
"""
from dataclasses import dataclass

from common import (parse_config, decoding_problem, device_problem, print_config, pick_device, device_name, write_json,
                    git_commit, command_line, results_path, results_problem)
from checkpoints import load_checkpoint, CheckpointError, weights_digest
from data_beauty import DataError
from diffusion import convert
from evaluation import evaluate, first_step_report, load_data_for, trace_report


@dataclass
class DecodeConfig:
    ckpt: str = 'out/ar.pt'
    name: str = ''              # results/eval_<name>.json; empty: only print
    split: str = 'test'
    data_dir: str = 'data/beauty'
    block: int = 0              # 0: autoregressive decoding; B >= 1: block diffusion with blocks of B tokens
    tau: float = 0.9            # diffusion: commit every masked position with confidence >= tau (at least one)
    tau_slot: float = 0.0       # diffusion, > 0: a list slot (a judgement, an answer item) needs this instead of tau
    k: int = 0                  # diffusion: if > 0, commit exactly the k most confident per step instead
    from_left: bool = False     # diffusion: commit in position order from the leftmost masked (diffusion.commit_rule)
    teacher_forced: bool = False  # also score the trace's judgements on the gold traces (trace_report; slow on a CPU)
    first_step: bool = False    # diffusion: also what one step commits with its block masked (first_step_report)
    batch_size: int = 256
    limit: int = 0              # > 0: only the first `limit` instances (quick looks)
    seed: int = 0               # the chain's seed, recorded with the evaluation (decoding is greedy)
    device: str = 'auto'

    def problem(self):
        if self.split not in ('train', 'valid', 'test'):
            return f"--split={self.split!r}: use valid (selection) or test (the reported tables)"
        if self.limit < 0 or self.batch_size < 1:
            return f"--limit={self.limit} --batch_size={self.batch_size}: limit >= 0 (0 = all), batch_size >= 1"
        return (device_problem(self.device) or decoding_problem(self.block, self.tau, self.k, self.tau_slot)
                or (results_problem() if self.name else None))


def main():
    cfg = parse_config(DecodeConfig)
    print_config(cfg)
    device = pick_device(cfg.device)
    try:
        model, ckpt = load_checkpoint(cfg.ckpt, device=device)
        data = load_data_for(ckpt, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    weights = weights_digest(model)  # the checkpoint's own weights (bench.py attaches this file's accuracy by them)
    trained = ckpt['run_cfg'].get('block')
    if ckpt['stage'] != 'ar' and cfg.block != trained:  # an AR checkpoint decodes at any block: the naive conversion
        raise SystemExit(f"error: {cfg.ckpt} is a {ckpt['stage']} model trained at block {trained}: decode it with "
                         f"--block={trained}")
    if ckpt['stage'] == 'ar' and cfg.block > 0:  # the naive conversion: the teacher's weights, CFT's starting point
        convert(model, data.vocab)
    res, texts = evaluate(model, data, cfg.split, cfg, device)
    if cfg.teacher_forced:
        res['teacher_forced'] = trace_report(model, data.splits[cfg.split], data.vocab, device,
                                             n=cfg.limit or len(data.splits[cfg.split]), block=max(cfg.block, 1))
        print("teacher-forced: " + ', '.join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in res['teacher_forced'].items()))
    if cfg.first_step and cfg.block > 0:
        res['first_step'] = first_step_report(model, data.splits[cfg.split], data.vocab, device, cfg.block, cfg.tau,
                                              n=cfg.limit or len(data.splits[cfg.split]))
        print("first step of a block, by role (right / sure / sure and wrong): " + ', '.join(
            f"{k} {v['right']:.2f}/{v['sure']:.2f}/{v['sure_wrong']:.2f}" for k, v in res['first_step'].items()))
    res.update(name=cfg.name, ckpt=cfg.ckpt, weights=weights, stage=ckpt['stage'], seed=cfg.seed,
               device=device_name(device), command=command_line(), commit=git_commit())
    m = res['metrics']
    print(f"{cfg.split} n={res['n']} validity {res['validity']:.4f} " + ' '.join(f"{k} {v:.4f}" for k, v in m.items()))
    print("floor       " + ' '.join(f"{k} {v:.4f}" for k, v in res['floor'].items()))
    if 'tokens_per_forward_trace' in res:  # block decoding (AR commits one token per forward by construction)
        print(f"tokens per forward {res['tokens_per_forward']:.2f} (trace {res['tokens_per_forward_trace']:.2f}, "
              f"answer {res.get('tokens_per_forward_answer', 0):.2f})")
    if res['trace_agreement']:
        agree = dict(res['trace_agreement'])
        roles = agree.pop('roles')
        print("follows the data's trace: " + ', '.join(f"{k} {v:.3f}" for k, v in agree.items()) +
              "; by role: " + ', '.join(f"{k} {v:.3f}" for k, v in roles.items()))
    print("example: " + data.vocab.decode(texts[0]))
    if cfg.name:
        write_json(results_path(f"eval_{cfg.name}.json"), res)


if __name__ == '__main__':
    main()
