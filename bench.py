"""Decode throughput: the AR teacher with its KV cache against every block-diffusion stage with its block KV cache.

    python bench.py                      # whatever the machine is: CPU-sized work on a CPU, CUDA graphs on a GPU
    python bench.py --batches="(1,)" --n_b1=16 --repeats=3 --accuracy=False   # a quick look

Both sides run diffusion.py's own decoding functions over the same CachedForward (same model code, kernels and
dtype) on the same random sample of test prompts, each batch padded to its own longest prompt (one shape for all
under CUDA graphs), in one process: every setting is timed `repeats` times, the repeats interleaved between the
settings (so a slow minute of a shared machine hits all of them); the median is kept and the spread over repeats
reported. Tokens are counted up to <eos>. Each diffusion checkpoint found (CFT,
OPD, RL) is timed at its own decoding setting and at `taus`; one whose weights are those of an earlier stage
(RL that kept its start) is not timed again. R@1 and validity of a row come from the full test set decoded with
the same settings: an eval_*.json of decode.py that records these very weights, else decoded here.

Per row, besides tokens/s and the speedup over AR at the same batch:
  tokens_per_forward        tokens over the forwards each row took part in (its own pace)
  batch_tokens_per_forward  tokens over the row-forwards the batch paid for (a row carried idle counts)
  ms_per_step               decode wall time over the batch's forwards (the prefill is one)
  forward_ms                the same forwards alone: each call's shape (rows, width, columns read) replayed bare
                            over a cache holding the prompt, once in every repeat right after the decodes, its
                            median time averaged over the decode's calls (shared by checkpoints of one architecture)
  step_overhead             ms_per_step / forward_ms: what the sampler costs around its forwards
forward_cost_ratio: one forward over a block of B new tokens (and the head over them) divided by one forward
over one new token, batch 1, same cache length: the price of a block step against an AR step. Block decoding
beats AR once it commits more tokens per forward than that (plus the sampler's own work).
Writes bench.json and bench.png (speedup against R@1) under the results folder.
"""
import glob
import json
import os
import statistics
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

from common import (parse_config, threshold_label, device_problem, print_config, pick_device, autocast, device_name,
                    write_json, git_commit, command_line, results_path, project_path, Timer)
from checkpoints import load_checkpoint, CheckpointError, weights_digest
from data_beauty import DataError, collate
from evaluation import Decoding, evaluate, load_data_for
from diffusion import generate_ar, generate_block
from model import CachedForward


@dataclass
class BenchConfig:
    ar: str = 'out/ar.pt'
    diffusion: tuple = ('out/cft.pt', 'out/opd.pt', 'out/rl.pt')  # those that exist are timed
    data_dir: str = 'data/beauty'
    batches: tuple = ()          # () = (1, 16, 64) on a CPU, (1, 16, 128) with CUDA
    taus: tuple = ()             # besides each checkpoint's own tau; () = (0.6, 0.4) with CUDA, none on a CPU
    tau_slot: float = 0.0        # > 0: at `taus`, a list slot (judgement, answer item) commits at this threshold
    n_b1: int = 64               # requests timed at batch 1
    n_batched: int = 128         # requests timed at every larger batch (the largest batch takes at least one)
    repeats: int = 5
    seed: int = 0                # which test users are sampled
    graphs: bool = True          # CUDA graphs on CUDA (ignored elsewhere)
    cost_reps: int = 50          # forwards timed per width for forward_cost_ratio
    accuracy: bool = True        # R@1 and validity of each row on the full test set
    device: str = 'auto'

    def problem(self):
        if min(self.repeats, self.n_b1, self.n_batched, self.cost_reps) < 1:
            return "--repeats, --n_b1, --n_batched and --cost_reps must be >= 1"
        if any(b < 1 for b in self.batches):
            return f"--batches={self.batches}: batch sizes are >= 1"
        if any(not 0 < t <= 1 for t in self.taus) or not 0 <= self.tau_slot <= 1:
            return f"--taus={self.taus} --tau_slot={self.tau_slot}: thresholds lie in (0, 1] (tau_slot 0: none)"
        return device_problem(self.device)


class RecordingForward(CachedForward):
    """A CachedForward that notes the shape of every call (rows, width, columns read, returned rows, prompt
    width), so that the same forwards can be timed bare afterwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def __call__(self, idx, qcols, n_keys=None, rows=None):
        kept = None if rows is None else (rows.start, rows.stop)       # a slice is not hashable
        self.calls.append((idx.shape[0], idx.shape[1], n_keys or self.P + self.R, kept, self.P))
        return super().__call__(idx, qcols, n_keys, rows)


def decode_once(model, batch, vocab, max_resp, block, rule, runner):
    """One timed decode call of a batch, AR (block 0) or block diffusion with generate_block's commit `rule`
    (tau, k, from_left). Returns tokens, lengths (up to <eos>), forwards per row, row-forwards the batch paid
    for, and seconds."""
    runner.set_pad(batch['pad'])
    sync = torch.cuda.synchronize if batch['prompt'].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(batch['prompt'].device):
        if block == 0:
            tokens, lengths = generate_ar(model, batch['prompt'], batch['pad'], max_resp, vocab, runner=runner)
            forwards = carried = lengths                                # one forward per token, prefill included
        else:
            res = generate_block(model, batch['prompt'], batch['pad'], max_resp, vocab, block=block, runner=runner,
                                 **rule)
            tokens, lengths, forwards, carried = res['tokens'], res['lengths'], res['n_forwards'], res['carried']
    sync()
    seconds = time.perf_counter() - t0
    paid = len(lengths) * int(lengths.max()) if block == 0 else int(carried.sum())  # AR: every row rides every step
    return tokens, lengths, forwards, paid, seconds


class BareForwards:
    """The forwards of the timed decodes replayed alone: each call's shape (rows, width, columns read, returned
    rows, prompt width) run with the head over a cache holding the prompts (of that width), nothing around it.
    A shape's cost is the architecture's, not the weights' (keyed by the model's config and block), so that two
    checkpoints of one architecture share it. time_each() times every shape added so far once (after one untimed
    call, which warms its cache as a decode's previous step does); bench calls it in every repeat right after the
    decodes, so that a slow minute of a shared machine hits both alike."""

    def __init__(self, chunks, max_resp):
        self.by_width = {c['prompt'].shape[1]: c for c in chunks}       # a chunk of each prompt width
        self.max_resp, self.runners, self.shapes, self.seconds = max_resp, {}, {}, {}

    @staticmethod
    def key(model, block, call):
        return repr(model.config), block, call

    def add(self, model, block, calls):
        for call in set(calls):
            self.shapes.setdefault(self.key(model, block, call), (model, block, call))

    def runner(self, model, block, n, P):
        """A runner over the first n prompts of width P, its cache filled with them (one per architecture)."""
        key = (repr(model.config), block, n, P)
        if key not in self.runners:
            batch = self.by_width[P]
            self.runners[key] = CachedForward(model, batch['pad'][:n], P, self.max_resp, block)
            self.runners[key](batch['prompt'][:n], torch.arange(P, device=batch['pad'].device).expand(n, -1), P)
        return self.runners[key]

    @torch.no_grad()
    def time_each(self):
        for key, (model, block, (n, width, n_keys, kept, P)) in self.shapes.items():
            run, dev = self.runner(model, block, n, P), self.by_width[P]['pad'].device
            if width == P and n_keys == P:                              # the prefill itself
                idx, cols = self.by_width[P]['prompt'][:n], torch.arange(P, device=dev).expand(n, -1)
            else:
                idx = torch.full((n, width), 3, device=dev)             # any token: same cost
                cols = torch.arange(n_keys - width, n_keys, device=dev).expand(n, -1)
            rows = None if kept is None else slice(*kept)
            sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
            with autocast(dev):
                model.head(run(idx, cols, n_keys, rows), fp32=True)
                sync()
                t0 = time.perf_counter()
                model.head(run(idx, cols, n_keys, rows), fp32=True)
                sync()
                self.seconds.setdefault(key, []).append(time.perf_counter() - t0)

    def ms(self, model, block, calls):
        """Mean over a decode's calls of each shape's median time, in ms."""
        median = {call: statistics.median(self.seconds[self.key(model, block, call)]) for call in set(calls)}
        return 1000 * sum(median[call] for call in calls) / len(calls)


@torch.no_grad()
def forward_cost_ratio(model, batch, block, max_resp, reps):
    """Median time of one forward over `block` new tokens (body and head) over that over one new token, batch 1,
    after the same prompt in the cache; and the same for the fused step's 2 * block tokens."""
    prompt, pad = batch['prompt'][:1], batch['pad'][:1]
    P, dev = prompt.shape[1], prompt.device
    run = CachedForward(model, pad, P, max_resp, block)
    run(prompt, torch.arange(P, device=dev)[None], P)
    widths = (1, block, 2 * block)
    times = {w: [] for w in widths}
    for _ in range(reps):  # interleaved, so that a slow moment hits every width
        for w in widths:
            cols = torch.arange(P, P + w, device=dev)[None]
            t0 = time.perf_counter()
            model.head(run(torch.full((1, w), 3, device=dev), cols), fp32=True)  # any token: same cost
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            times[w].append(time.perf_counter() - t0)
    ms = {w: 1000 * statistics.median(t) for w, t in times.items()}
    return {'forward_cost_ratio': ms[block] / ms[1], 'fused_forward_cost_ratio': ms[2 * block] / ms[1],
            'forward_ms': {str(w): m for w, m in ms.items()}}


def commit_settings(setting):
    """generate_block's commit rule of a bench setting: the threshold rule, committed by confidence."""
    return {'tau': setting['tau'], 'tau_slot': setting['tau_slot']} if setting['block'] else {}


def matching_eval(setting, weights, n_test):
    """The R@1 and validity of an eval_*.json that decoded these weights on the whole test set with this setting
    (decode.py), or None. A file is matched by the weights it records, not by its checkpoint's path: a newer
    model in the same place is not the one the file scored."""
    for path in glob.glob(results_path('eval_*.json')):
        r = json.load(open(path))
        d = r.get('decode') or {}
        if (r.get('weights') == weights and r.get('split') == 'test' and r.get('n') == n_test
                and (d.get('block') or 0) == setting['block'] and not d.get('from_left') and not d.get('k')
                and (setting['block'] == 0
                     or (d.get('tau'), d.get('tau_slot')) == (setting['tau'], setting['tau_slot']))):
            return r['metrics']['R@1'], r['validity'], os.path.basename(path)
    return None


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for bs in sorted({r['batch'] for r in rows}):
        pts = sorted((r['speedup'], r['R@1'], f"{r['stage']} {threshold_label(r)}") for r in rows
                     if r['batch'] == bs and r['mode'] == 'diffusion' and r['R@1'] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o', label=f"batch {bs}")
            for s, r1, lab in pts:
                ax.annotate(lab, (s, r1), fontsize=7)
    ar = [r for r in rows if r['mode'] == 'ar' and r['R@1'] is not None]
    if ar:
        ax.axhline(ar[0]['R@1'], color='gray', ls='--', label='AR R@1')
    ax.axvline(1.0, color='gray', lw=0.5)
    ax.set_xlabel('decode speedup over AR (tokens/s, same batch)')
    ax.set_ylabel('test R@1')
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_models(cfg, device):
    """The AR teacher and every diffusion checkpoint of cfg.diffusion that exists ({path: (model, checkpoint)}),
    and the data they were trained on."""
    models = {}
    try:
        models[cfg.ar] = load_checkpoint(cfg.ar, stages=['ar'], device=device)
        for path in cfg.diffusion:
            if os.path.exists(project_path(path)):
                models[path] = load_checkpoint(path, stages=['cft', 'opd', 'rl'], device=device)
        if len(models) == 1:
            raise CheckpointError(f"none of {list(cfg.diffusion)} exists: train a diffusion stage first "
                                  f"(python train_cft.py)")
        data = load_data_for(models[cfg.ar][1], cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    for m, _ in models.values():
        m.eval()
    return models, data


def accuracy_of(setting, model, weights, data, device):
    """(R@1, validity, where from) of a setting on the full test set: an eval file of these weights (their digest),
    else decoded here."""
    found = matching_eval(setting, weights, len(data.splits['test']))
    if found is None:
        dcfg = Decoding(block=setting['block'], tau=setting['tau'] or 0.9, tau_slot=setting['tau_slot'] or 0.0,
                        batch_size=64)
        res, _ = evaluate(model, data, 'test', dcfg, device)
        found = (res['metrics']['R@1'], res['validity'], 'decoded here')
    print(f"accuracy {setting['stage']} {threshold_label(setting)}: R@1 {found[0]:.4f} validity {found[1]:.4f} "
          f"({found[2]})")
    return found


def time_batch_size(models, settings, chunks, vocab, max_resp, cfg, cuda):
    """Per setting: the seconds of each repeat over the same chunks (the repeats interleaved between settings),
    tokens, forwards per row, row-forwards paid, and the ms of its forwards replayed bare (BareForwards, timed in
    each repeat after the decodes). Each chunk has a runner of its own, made before the clock starts (under CUDA
    graphs the chunks share one shape and one runner)."""
    graphs = cfg.graphs and cuda
    make = lambda s, c: RecordingForward(models[s['ckpt']][0], c['pad'], c['prompt'].shape[1], max_resp,
                                         s['block'] or 1, graphs=graphs)
    runners = [[make(s, chunks[0])] * len(chunks) if graphs else [make(s, c) for c in chunks] for s in settings]
    decode = lambda s, run, c: decode_once(models[s['ckpt']][0], c, vocab, max_resp, s['block'],
                                           commit_settings(s), run)
    for s, runs in zip(settings, runners):  # warm-up (and graph capture)
        decode(s, runs[0], chunks[0])
    seconds, counts, bare = [[] for _ in settings], [None] * len(settings), BareForwards(chunks, max_resp)
    for _ in range(cfg.repeats):
        for i, (s, runs) in enumerate(zip(settings, runners)):
            for run in runs:
                run.calls = []
            out = [decode(s, run, c) for run, c in zip(runs, chunks)]
            seconds[i].append(sum(o[4] for o in out))
            calls = [call for run in dict.fromkeys(runs) for call in run.calls]
            counts[i] = dict(tokens=sum(int(o[1].sum()) for o in out), forwards=sum(int(o[2].sum()) for o in out),
                             paid=sum(o[3] for o in out), calls=calls)
            bare.add(models[s['ckpt']][0], s['block'] or 1, calls)
        bare.time_each()
    for s, c in zip(settings, counts):
        c['forward_ms'] = bare.ms(models[s['ckpt']][0], s['block'] or 1, c['calls'])
    return seconds, counts


def timed_settings(ar_path, models, digests, taus, tau_slot=0.0):
    """The settings to time: AR, then each diffusion checkpoint at its own tau and at `taus`, except one whose
    weights are an earlier checkpoint's (RL that kept its start): its speed is that one's, timed once."""
    settings, same_as = [{'ckpt': ar_path, 'stage': 'ar', 'block': 0, 'tau': None, 'tau_slot': None}], {}
    for path, (_, ck) in list(models.items())[1:]:
        earlier = [p for p in list(models)[1:list(models).index(path)] if digests[p] == digests[path]]
        if earlier:
            same_as[ck['stage']] = models[earlier[0]][1]['stage']
            print(f"{ck['stage']}: the same weights as {same_as[ck['stage']]}, not timed again")
            continue
        own = (ck['run_cfg'].get('tau', 0.9), None)
        for tau, slot in dict.fromkeys((own,) + tuple((t, tau_slot or None) for t in taus)):
            settings.append({'ckpt': path, 'stage': ck['stage'], 'block': ck['run_cfg']['block'], 'tau': tau,
                             'tau_slot': slot})
    return settings, same_as


def batch_rows(settings, seconds, counts, accuracy, batch, requests, repeats):
    """One bench.json row per setting at one batch size (time_batch_size's seconds and counts), printed."""
    rows, ar_rate = [], [counts[0]['tokens'] / t for t in seconds[0]]  # AR's tokens/s in each repeat
    for s, sec, c, acc in zip(settings, seconds, counts, accuracy):
        t = statistics.median(sec)
        speedups = [c['tokens'] / x / a for x, a in zip(sec, ar_rate)]  # each repeat against AR's same repeat
        ms_step = 1000 * t / len(c['calls'])
        r = dict(s, mode='diffusion' if s['block'] else 'ar', batch=batch, requests=requests, repeats=repeats,
                 tok_per_s=c['tokens'] / t, tokens_per_forward=c['tokens'] / c['forwards'],
                 batch_tokens_per_forward=c['tokens'] / c['paid'], ms_per_request=1000 * t / requests,
                 speedup=c['tokens'] / t / statistics.median(ar_rate), speedup_range=[min(speedups), max(speedups)],
                 seconds_range=[min(sec), max(sec)], ms_per_step=ms_step, forward_ms=c['forward_ms'],
                 step_overhead=ms_step / c['forward_ms'], **dict(zip(('R@1', 'validity', 'accuracy_from'), acc)))
        print(f"batch {batch:3d} {r['stage']:4s} {threshold_label(r):18s} {r['tok_per_s']:8.0f} tok/s "
              f"{r['tokens_per_forward']:5.2f} tok/fwd (batch {r['batch_tokens_per_forward']:5.2f}) "
              f"{r['ms_per_step']:6.3f} ms/step = {r['step_overhead']:4.2f} x bare {r['forward_ms']:6.3f} "
              f"speedup {r['speedup']:5.2f}x [{r['speedup_range'][0]:.2f}, {r['speedup_range'][1]:.2f}]")
        rows.append(r)
    return rows


def main():
    cfg = parse_config(BenchConfig)
    print_config(cfg)
    device, timer = pick_device(cfg.device), Timer()
    models, data = load_models(cfg, device)
    cuda = device.type == 'cuda'
    batches = cfg.batches or ((1, 16, 128) if cuda else (1, 16, 64))
    taus = cfg.taus or ((0.6, 0.4) if cuda else ())
    vocab, test = data.vocab, data.splits['test']
    digests = {path: weights_digest(m) for path, (m, _) in models.items()}
    settings, same_as = timed_settings(cfg.ar, models, digests, taus, cfg.tau_slot)
    block = max(s['block'] for s in settings)
    max_resp = -(-(max(len(r) for r in test.responses) + block) // block) * block
    n = min(len(test), max(cfg.n_b1, cfg.n_batched, max(batches)))
    sample = np.random.default_rng(cfg.seed).choice(len(test), n, replace=False).tolist()  # random test users
    full = collate(test, sample, vocab, device=device)  # one prompt width (forward_cost_ratio, CUDA graphs)
    print(f"on {device_name(device)}: batches {batches}, {cfg.n_b1} random test users at batch 1 and "
          f"{cfg.n_batched} at the others, {cfg.repeats} interleaved repeats, each checkpoint at its own tau"
          f"{' and ' + str(taus) if taus else ''}{' (CUDA graphs)' if cuda and cfg.graphs else ''}")
    accuracy = [accuracy_of(s, models[s['ckpt']][0], digests[s['ckpt']], data, device) if cfg.accuracy
                else (None, None, None) for s in settings]
    costs = {path: forward_cost_ratio(m, full, block, max_resp, cfg.cost_reps) for path, (m, _) in models.items()}
    for path, c in costs.items():
        print(f"{path}: forward_cost_ratio {c['forward_cost_ratio']:.2f} at B = {block} "
              f"(fused step, 2B tokens: {c['fused_forward_cost_ratio']:.2f}); ms {c['forward_ms']}")
    rows = []
    for bs in batches:
        count = max(min(cfg.n_b1 if bs == 1 else cfg.n_batched, n), bs)
        starts = range(0, count - bs + 1, bs)
        if cuda and cfg.graphs:   # one shape for every batch: the graphs are captured once
            chunks = [{k: v[a:a + bs] for k, v in full.items()} for a in starts]
        else:                     # each batch padded to its own longest prompt, as a server would
            chunks = [collate(test, sample[a:a + bs], vocab, device=device) for a in starts]
        if not chunks:
            print(f"batch {bs}: fewer than {bs} test prompts, skipped")
            continue
        seconds, counts = time_batch_size(models, settings, chunks, vocab, max_resp, cfg, cuda)
        rows += batch_rows(settings, seconds, counts, accuracy, bs, len(chunks) * bs, cfg.repeats)
    out = {'device': device_name(device), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
           'commit': git_commit(), 'command': command_line(), 'config': asdict(cfg), 'block': block,
           'users': sample, 'weights': digests, 'same_weights_as': same_as, 'forward_cost': costs,
           'forward_cost_ratio': costs[settings[-1]['ckpt']]['forward_cost_ratio'],  # the students' shape
           'rows': rows, 'seconds': round(timer(), 1),
           'note': 'speedup: tokens/s over AR at the same batch (median of the repeats; speedup_range: each '
                   'repeat against AR in the same repeat); ms_per_request: wall time of the decode calls over '
                   'requests (at batch > 1 a request waits for its whole batch); a stage in same_weights_as has '
                   'the speed and accuracy of the one it names'}
    path = results_path('bench.json')
    write_json(path, out)
    plot(rows, os.path.splitext(path)[0] + '.png')
    print(f"wrote {path} ({timer():.0f}s)")


if __name__ == '__main__':
    main()
