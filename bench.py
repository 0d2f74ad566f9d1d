"""Decode throughput: the AR teacher with its KV cache against the block-diffusion model with its block KV cache.

    python bench.py                                     # CUDA: batches 1/16/128, CUDA graphs on and off
    python bench.py --device=cpu --batches="(1, 4)" --n_time=8 --graphs="(False,)"    # CPU, labelled as such

Both sides run decode.py's and diffusion.py's own decoding functions over the same CachedForward (same model
shape, kernels and dtype), time a fixed subset of test prompts (warm-up excluded, device synchronised, median
of repeats) and count tokens up to <eos>. Accuracy and validity of each setting come from the full test set
decoded with the same settings. Writes results/bench.json and results/bench.png (speedup against R@1).
"""
import os
import statistics
import time
from dataclasses import dataclass, asdict

import torch

from common import (parse_config, print_config, pick_device, autocast, device_name, load_checkpoint, write_json,
                    git_commit, command_line, CheckpointError, results_path)
from data_beauty import DataError, collate
from decode import DecodeConfig, evaluate, generate_ar, load_data_for
from diffusion import generate_block
from model import CachedForward


@dataclass
class BenchConfig:
    ar: str = 'out/ar.pt'
    diffusion: str = ''          # empty: the latest stage found (rl, opd, cft)
    data_dir: str = 'data/beauty'
    batches: tuple = (1, 16, 128)
    taus: tuple = (0.9, 0.6, 0.4)
    ks: tuple = (1, 2)
    left_taus: tuple = (0.97, 0.9, 0.8)  # the threshold rule committing in position order (diffusion.commit_rule)
    graphs: tuple = (True, False)
    n_time: int = 128            # test prompts timed per setting (batch 1 times the first n_time_b1)
    n_time_b1: int = 16
    repeats: int = 3
    max_resp: int = 192          # response columns (a multiple of the block size)
    accuracy: bool = True        # decode the full test set at each setting for R@1 and validity
    out: str = ''               # default: bench.json under results/ (common.results_path)
    device: str = 'auto'


def decode_batches(model, batches, vocab, max_resp, block, rule, runner):
    """Decode a list of same-shape batches with one reused runner; returns outputs and wall time per batch.
    rule: generate_block's commit settings (tau, k, from_left); block 0 decodes autoregressively."""
    outs, times = [], []
    for batch in batches:
        runner.set_pad(batch['pad'])
        if batch['prompt'].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(batch['prompt'].device):
            if block == 0:
                tokens, lengths = generate_ar(model, batch['prompt'], batch['pad'], max_resp, vocab, runner=runner)
                forwards = lengths.clone()
            else:
                res = generate_block(model, batch['prompt'], batch['pad'], max_resp, vocab, block=block, runner=runner,
                                     **rule)
                tokens, lengths, forwards = res['tokens'], res['lengths'], res['n_forwards']
        if batch['prompt'].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        outs.append((tokens, lengths, forwards))
    return outs, times


def time_setting(model, batches, vocab, max_resp, block, rule, graphs, repeats):
    runner = CachedForward(model, batches[0]['pad'], batches[0]['prompt'].shape[1], max_resp, block or 1, graphs)
    decode_batches(model, batches[:1], vocab, max_resp, block, rule, runner)  # warm-up (and graph capture)
    runs = [decode_batches(model, batches, vocab, max_resp, block, rule, runner) for _ in range(repeats)]
    outs = runs[0][0]
    total = statistics.median(sum(t) for _, t in runs)
    tokens = sum(int(l.sum()) for _, l, _ in outs)
    forwards = sum(int(f.sum()) for _, _, f in outs)
    n_req = sum(int(o[0].shape[0]) for o in outs)
    return outs, {'tok_per_s': tokens / total, 'forwards_per_token': forwards / tokens,
                  'ms_per_request': 1000 * total / len(batches), 'tokens': tokens, 'requests': n_req}


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for b in sorted({r['batch'] for r in rows}):
        pts = sorted((r['speedup'], r['R@1'], r['label']) for r in rows
                     if r['batch'] == b and r['mode'] == 'diffusion' and r['graphs'] == rows[0]['graphs']
                     and r['R@1'] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=f"batch {b}")
            for s, r1, lab in pts:
                ax.annotate(lab, (s, r1), fontsize=7)
    ar = [r for r in rows if r['mode'] == 'ar' and r['R@1'] is not None]
    if ar:
        ax.axhline(ar[0]['R@1'], color='gray', ls='--', label='AR R@1')
    ax.set_xlabel('decode speedup over AR (tokens/s)')
    ax.set_ylabel('test R@1')
    if ax.get_legend_handles_labels()[0]:                  # nothing to label without --accuracy
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    cfg = parse_config(BenchConfig)
    print_config(cfg)
    device = pick_device(cfg.device)
    path = cfg.diffusion or next((p for p in ('out/rl.pt', 'out/opd.pt', 'out/cft.pt') if os.path.exists(p)), '')
    try:
        ar, ack = load_checkpoint(cfg.ar, stages=['ar'], device=device)
        dm, dck = load_checkpoint(path or 'out/cft.pt', stages=['cft', 'opd', 'rl'], device=device)
        data = load_data_for(dck, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    ar.eval()
    dm.eval()
    block = dck['run_cfg']['block']
    vocab, test = data.vocab, data.splits['test']
    graphs = [g for g in cfg.graphs if not g or device.type == 'cuda']
    print(f"AR {cfg.ar} vs diffusion {path} (B = {block}) on {device_name(device)}")
    idx = list(range(min(cfg.n_time, len(test))))
    full = collate(test, idx, vocab, device=device)  # one common prompt width: every batch has the same shape
    settings = [('AR', 0, {})] + [(f"tau {t}", block, dict(tau=t)) for t in cfg.taus] + \
               [(f"k {k}", block, dict(k=k)) for k in cfg.ks] + \
               [(f"tau {t} left", block, dict(tau=t, from_left=True)) for t in cfg.left_taus]
    accuracy = {}
    for label, b, rule in settings:
        if cfg.accuracy:
            res, _ = evaluate(dm if b else ar, data, 'test', DecodeConfig(block=b, batch_size=512, **rule), device)
            accuracy[label] = (res['metrics']['R@1'], res['validity'])
            print(f"accuracy {label}: R@1 {res['metrics']['R@1']:.4f} validity {res['validity']:.4f}")
    rows = []
    for g in graphs:
        for bs in cfg.batches:
            n = cfg.n_time_b1 if bs == 1 else len(idx)
            batches = [{key: v[a:a + bs] for key, v in full.items()} for a in range(0, n - bs + 1, bs)]
            if not batches:
                continue
            base = None
            for label, b, rule in settings:
                _, t = time_setting(dm if b else ar, batches, vocab, cfg.max_resp, b, rule, g, cfg.repeats)
                base = base or t['tok_per_s']
                acc = accuracy.get(label, (None, None))
                rows.append({'mode': 'diffusion' if b else 'ar', 'label': label, 'batch': bs, 'block': b or None,
                             'tau': rule.get('tau'), 'k': rule.get('k'), 'from_left': rule.get('from_left', False),
                             'graphs': g, 'tok_per_s': t['tok_per_s'], 'forwards_per_token': t['forwards_per_token'],
                             'ms_per_request': t['ms_per_request'], 'speedup': t['tok_per_s'] / base,
                             'R@1': acc[0], 'validity': acc[1], 'requests': t['requests']})
                print(f"graphs={g!s:5} batch {bs:3d} {label:12s} {t['tok_per_s']:9.0f} tok/s  "
                      f"{t['forwards_per_token']:.3f} fwd/tok  {t['ms_per_request']:8.2f} ms/call  "
                      f"speedup {t['tok_per_s'] / base:5.2f}x")
    out = {'device': device_name(device), 'torch': torch.__version__, 'commit': git_commit(),
           'command': command_line(), 'ar': cfg.ar, 'diffusion': path, 'config': asdict(cfg), 'rows': rows,
           'note': 'ms_per_request is the wall time of the decode call that served the request (its latency)'}
    path = cfg.out or results_path('bench.json')
    write_json(path, out)
    plot(rows, os.path.splitext(path)[0] + '.png')


if __name__ == '__main__':
    main()
