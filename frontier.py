"""Accuracy against decoding speed: checkpoints decoded by confidence at one grid of thresholds, beside AR.

    python frontier.py --split=valid --stages=rl --choose=True   # the table's threshold t*, chosen on validation
    python frontier.py                                           # test: naive, CFT, OPD, RL at every threshold
    python frontier.py --tau_slots="(0.9, 0.8)"                  # + the list slots at 0.9, 0.8, the rest at 0.3

--choose=True writes results/tstar.json (results/cpu/ without CUDA): the fastest threshold at which the first
stage's validation R@1 is within PARITY_MARGIN of AR's with validity >= MIN_VALIDITY (choose_tstar says what
happens where none is); run.sh decodes every diffusion row of the tables there. Otherwise it writes frontier.json (one row per stage and threshold: R@1, N@3,
validity, tokens per forward, copy share, R@1 over the valid outputs only) and frontier.png (R@1 against tokens
per forward, AR and the floor as lines, thresholds with invalid outputs marked), and per stage its parity TPF:
the most tokens per forward at which its test R@1 is within PARITY_TPF_MARGIN of AR's with validity >= 0.99.
A stage name is its checkpoint out/<name>.pt; `naive` is the AR teacher (out/ar.pt) block decoded.
With --tau_slots, each stage is also decoded with two thresholds: a list slot (a judgement, an answer item)
commits at each of tau_slots, every other token at --rest_tau (FINDINGS.md: the judgements, not the sums, are
what goes wrong when a block commits at a low threshold); t* is then the fastest setting of either kind.
"""
import os
from dataclasses import dataclass

import numpy as np

from common import (parse_config, decoding_problem, threshold_label, device_problem, print_config, pick_device,
                    device_name, git_commit, write_json, results_path, results_problem, command_line, Timer,
                    project_path)
from checkpoints import load_checkpoint, weights_digest, CheckpointError
from data_beauty import DataError
from diffusion import convert
from evaluation import Decoding, evaluate, load_data_for

GRID = (0.97, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
MIN_VALIDITY = 0.99
PARITY_MARGIN = 0.005      # t*: on validation, within this of AR's R@1 (the protocol's parity margin, item 8)
PARITY_TPF_MARGIN = 0.01   # a stage's parity TPF on test: within this of AR's R@1


@dataclass
class FrontierConfig:
    split: str = 'test'
    stages: str = 'naive,cft,opd,rl'  # comma-separated; each out/<name>.pt (naive: out/ar.pt)
    taus: tuple = GRID
    tau_slots: tuple = ()       # the list slots' thresholds of the two-threshold settings (every other token: rest_tau)
    rest_tau: float = 0.3
    choose: bool = False        # valid: write tstar.json for the first stage instead of the frontier
    block: int = 16             # naive's block (a trained stage decodes at its own)
    data_dir: str = 'data/beauty'
    batch_size: int = 64
    device: str = 'auto'

    def settings(self):
        """(tau, tau_slot) of every decoding: the grid (tau_slot None: every token at tau), then the slots' own."""
        return [(t, None) for t in self.taus] + [(self.rest_tau, s) for s in self.tau_slots]

    def problem(self):
        if self.split not in ('valid', 'test'):
            return f"--split={self.split!r}: valid (to choose t*) or test (the frontier)"
        if self.choose and self.split != 'valid':
            return "--choose=True picks the threshold on validation: add --split=valid"
        if not self.stages.strip(',') or not self.taus:
            return f"--stages={self.stages} --taus={self.taus}: name at least one of each"
        return (device_problem(self.device) or results_problem()
                or next(filter(None, (decoding_problem(self.block, t, 0, s or 0.0) for t, s in self.settings())), None))


def load_stage(name, cfg, device):
    """The model, its data, block and weights digest for a stage name (naive: the AR teacher converted)."""
    path = 'out/ar.pt' if name == 'naive' else f'out/{name}.pt'
    try:
        model, ck = load_checkpoint(path, device=device)
        data = load_data_for(ck, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    if ck['stage'] == 'ar':
        if name != 'naive':
            raise SystemExit(f"error: {path} is the AR teacher; name it 'naive' to decode it by blocks")
        convert(model, data.vocab)
    block = cfg.block if ck['stage'] == 'ar' else ck['run_cfg']['block']
    return model, data, block, path, weights_digest(model)


def row_of(res, **known):
    """One frontier row from an evaluation (evaluation.evaluate)."""
    pu = res['per_user']
    valid, ranks = np.asarray(pu['valid'], bool), np.asarray(pu['rank'])
    return dict(known, n=res['n'], **{'R@1': res['metrics']['R@1'], 'N@3': res['metrics']['N@3']},
                validity=res['validity'], tokens_per_forward=res.get('tokens_per_forward', 1.0),
                copy_share=res['copy_share'],
                R1_valid_only=float((ranks[valid] == 1).mean()) if valid.any() else None)


def fastest_at_parity(rows, ar_r1, margin):
    """The row with the most tokens per forward whose R@1 is within `margin` of AR's and whose validity is at
    least MIN_VALIDITY, or None."""
    ok = [r for r in rows if r['validity'] >= MIN_VALIDITY and r['R@1'] >= ar_r1 - margin - 1e-9]
    return max(ok, key=lambda r: r['tokens_per_forward']) if ok else None


def choose_tstar(rows, ar_r1):
    """t* and how it was found: the fastest threshold at parity; where none is, the fastest within
    PARITY_TPF_MARGIN (the test's bar); then the most accurate of those valid >= MIN_VALIDITY; then the most
    valid. The way it was found is recorded beside it: a miss is said, never hidden."""
    for margin, how in ((PARITY_MARGIN, 'parity'), (PARITY_TPF_MARGIN, f'no threshold at parity: the fastest '
                                                                      f'within {PARITY_TPF_MARGIN} of AR')):
        best = fastest_at_parity(rows, ar_r1, margin)
        if best:
            return best, how
    valid = [r for r in rows if r['validity'] >= MIN_VALIDITY]
    if valid:
        return max(valid, key=lambda r: (r['R@1'], r['tokens_per_forward'])), 'none within it: the best R@1 valid enough'
    return max(rows, key=lambda r: r['validity']), 'no threshold valid enough: the most valid'


def plot(rows, ar, floor, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage, two in dict.fromkeys((r['stage'], bool(r.get('tau_slot'))) for r in rows):
        mine = sorted((r for r in rows if r['stage'] == stage and bool(r.get('tau_slot')) == two),
                      key=lambda r: r['tokens_per_forward'])
        x, y = [r['tokens_per_forward'] for r in mine], [r['R@1'] for r in mine]
        line, = ax.plot(x, y, marker='s' if two else 'o', ls='--' if two else '-',
                        label=f"{stage}, slots apart (rest at {mine[0]['tau']})" if two else stage)
        bad = [r for r in mine if r['validity'] < MIN_VALIDITY]  # invalid outputs: a hollow ring, their share
        ax.scatter([r['tokens_per_forward'] for r in bad], [r['R@1'] for r in bad], s=140, facecolors='none',
                   edgecolors=line.get_color(), lw=1.2)
        for r in mine:
            note = f"{r['tau_slot'] or r['tau']}" + (f" ({1 - r['validity']:.0%} inv.)" if r['validity'] < MIN_VALIDITY
                                                     else "")
            ax.annotate(note, (r['tokens_per_forward'], r['R@1']), fontsize=6, xytext=(3, -8),
                        textcoords='offset points')
    ax.axhline(ar, color='k', lw=1, label=f'AR ({ar:.4f})')
    ax.axhline(ar - PARITY_TPF_MARGIN, color='k', lw=0.6, ls=':', label=f'AR - {PARITY_TPF_MARGIN}')
    ax.axhline(floor, color='gray', lw=1, ls='--', label=f'floor ({floor:.4f})')
    ax.set_xlabel('tokens per forward')
    ax.set_ylabel('R@1')
    ax.set_title(f"R@1 against tokens per forward (test, n={rows[0]['n']}; ring: validity < {MIN_VALIDITY})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    cfg = parse_config(FrontierConfig)
    print_config(cfg)
    device, timer = pick_device(cfg.device), Timer()
    try:
        teacher, ck = load_checkpoint('out/ar.pt', stages=['ar'], device=device)
        data = load_data_for(ck, cfg.data_dir)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    ar = evaluate(teacher, data, cfg.split, Decoding(block=0, batch_size=cfg.batch_size), device)[0]
    ar_r1, floor = ar['metrics']['R@1'], ar['floor']['R@1']
    print(f"AR {cfg.split} R@1 {ar_r1:.4f} (floor {floor:.4f}, n={ar['n']})")
    named = [s for s in cfg.stages.split(',') if s]
    stages = [s for s in named if s == 'naive' or os.path.exists(project_path(f'out/{s}.pt'))]
    for s in sorted(set(named) - set(stages)):
        print(f"note: out/{s}.pt not found; {s} left out")
    rows, parity = [], {}
    for stage in stages[:1] if cfg.choose else stages:
        model, data, block, path, weights = load_stage(stage, cfg, device)
        mine = []
        for tau, tau_slot in cfg.settings():
            how = Decoding(block=block, tau=tau, tau_slot=tau_slot or 0.0, batch_size=cfg.batch_size)
            res = evaluate(model, data, cfg.split, how, device)[0]
            mine.append(row_of(res, stage=stage, ckpt=path, weights=weights, tau=tau, tau_slot=tau_slot))
            r = mine[-1]
            print(f"{stage} {threshold_label(r)}: R@1 {r['R@1']:.4f} validity {r['validity']:.4f} "
                  f"tokens/forward {r['tokens_per_forward']:.2f} copy share {r['copy_share']:.3f}")
        rows += mine
        top = fastest_at_parity(mine, ar_r1, PARITY_TPF_MARGIN)
        parity[stage] = top and {'tau': top['tau'], 'tau_slot': top['tau_slot'],
                                 'tokens_per_forward': top['tokens_per_forward']}
    record = {'split': cfg.split, 'n': ar['n'], 'ar_R@1': ar_r1, 'ar_copy_share': ar['copy_share'], 'floor_R@1': floor,
              'rows': rows, 'device': device_name(device), 'command': command_line(), 'commit': git_commit(),
              'seconds': round(timer(), 1)}
    if cfg.choose:
        chosen, how = choose_tstar(rows, ar_r1)
        record.update(tau=chosen['tau'], tau_slot=chosen['tau_slot'], stage=stages[0], found_by=how,
                      rule=f"the fastest threshold with validation R@1 >= AR's - {PARITY_MARGIN} and validity "
                           f">= {MIN_VALIDITY}")
        write_json(results_path('tstar.json'), record)
        print(f"t* = {threshold_label(chosen)} ({how}; {stages[0]} R@1 {chosen['R@1']:.4f} against AR's {ar_r1:.4f}, "
              f"validity {chosen['validity']:.4f}, tokens/forward {chosen['tokens_per_forward']:.2f})")
        return
    record.update(parity_tpf=parity, parity_rule=f"the most tokens per forward with test R@1 >= AR's - "
                                                 f"{PARITY_TPF_MARGIN} and validity >= {MIN_VALIDITY}")
    write_json(results_path('frontier.json'), record)
    plot(rows, ar_r1, floor, results_path('frontier.png'))
    for stage, p in parity.items():
        print(f"parity TPF {stage}: " + (f"{p['tokens_per_forward']:.2f} ({threshold_label(p)})" if p else "none"))


if __name__ == '__main__':
    main()
