"""Read results/ and print the paper's two tables (accuracy, speed) with bootstrap intervals and paired stage gains.

    python report.py                # the setting's results (results/cpu/ on a CPU, or RESULTS_DIR): tables.md
    python report.py results/cpu    # the same for another results folder

Intervals: 95% bootstrap over test users (10,000 resamples). Stage gains: paired bootstrap of the R@1 and
N@3 difference between a stage and its predecessor on the same users (protocol items 6-7), and each system's gap to
the AR teacher the same way. With seed folders
<folder>/seeds/<seed>/ present, the mean and spread over seeds are reported too.
"""
import glob
import json
import os
import sys

import numpy as np

from common import results_path, threshold_label, write_json
from metrics import copy_share, per_rank_metric, paired_bootstrap, bootstrap_mean, metrics_from_ranks

ROWS = [  # (file name, label, predecessor for the paired gain)
    ('floor', 'pre-rank floor', None),
    ('rule', "the trace's conclusion as a ranker (no model)", 'floor'),
    ('ar', 'AR teacher (GR2-style)', 'floor'),
    ('ar_direct', 'AR without trace', 'ar'),
    ('ar_noreject', 'AR, decision taught on every window', 'ar'),
    ('ar_rl', 'AR + RL', 'ar'),
    ('naive', 'naive diffusion (the AR weights, block decoded)', 'ar'),
    ('cft_novalid', '+ CFT, no validity loss', 'naive'),
    ('cft', '+ CFT', 'naive'),
    ('cft_left', '+ CFT, committed from the left (same weights)', 'cft'),
    ('cft_more', "+ CFT, more, for OPD's wall time (control)", 'opd'),
    ('cft_warmup', '+ CFT, block size warmed up from 1', 'cft'),
    ('cft_suffix', '+ CFT, half the blocks suffix-masked', 'cft'),
    ('opd', '+ CFT + OPD', 'cft'),
    ('opd_offpolicy', "+ CFT + OPD on the teacher's samples (control)", 'opd'),
    ('rl', '+ CFT + OPD + RL', 'opd'),
    ('rl_kl', '+ CFT + OPD + RL, KL penalty to OPD', 'rl'),
]
METRICS = ('R@1', 'R@3', 'R@5', 'N@3', 'N@5')
HEADLINE = ('floor', 'ar', 'ar_direct', 'naive', 'cft', 'opd', 'rl', 'ar_rl')  # the paper's table, in its order


def headline(summary, evals, bench):
    """The paper's form: per system R@1 and N@3 with their intervals, validity, tokens per forward (1 for AR
    decoding), the batch-1 speedup over AR from bench.json where that checkpoint was timed (a stage that kept its
    parent's weights has its parent's), and n; with the copy share beside them, since a re-ranker can reach the
    floor's numbers by handing the pre-ranker's order back."""
    speed = {r['accuracy_from']: r['speedup'] for r in bench['rows'] if r['batch'] == 1}
    for stage, parent in bench.get('same_weights_as', {}).items():
        if f"eval_{parent}.json" in speed:
            speed[f"eval_{stage}.json"] = speed[f"eval_{parent}.json"]
    lines = ['| system | R@1 [95% CI] | N@3 [95% CI] | validity | tokens/forward | speedup (batch 1) | copy share '
             '| n |', '|---' * 8 + '|']
    for row in summary['accuracy']:
        if row['name'] not in HEADLINE:
            continue
        e, m, ci = evals[row['name']], row['metrics'], row['ci95']
        mode = (e.get('decode') or {}).get('mode')  # None: no model (the floor)
        tpf = '1.00' if mode == 'ar' else f"{e['tokens_per_forward']:.2f}" if mode else ''
        up = speed.get(f"eval_{row['name']}.json")
        lines.append(f"| {row['label']} | " + ' | '.join(f"{m[k]:.4f} [{ci[k][0]:.4f}, {ci[k][1]:.4f}]"
                                                        for k in ('R@1', 'N@3')) +
                     f" | {row['validity']:.3f} | {tpf} | {'' if up is None else f'{up:.2f}x'} | "
                     f"{share(row['copy_share'])} | {row['n']} |")
    return lines


def frontier_lines(folder):
    """The threshold the tables decode at (tstar.json) and the frontier (frontier.json): each stage's R@1,
    validity and tokens per forward at each threshold of the grid, and its parity TPF."""
    lines = []
    path = os.path.join(folder, 'tstar.json')
    if os.path.exists(path):
        with open(path) as f:
            t = json.load(f)
        pick = next(r for r in t['rows'] if setting_of(r) == setting_of(t))
        lines += [f"t* = {threshold_label(t)}: {t['rule']} ({t['found_by']}); {t['stage']} on validation "
                  f"(n={t['n']}): R@1 {pick['R@1']:.4f} against AR's {t['ar_R@1']:.4f}, validity {pick['validity']:.3f}, "
                  f"{pick['tokens_per_forward']:.2f} tokens per forward; commit {t['commit']}", '']
    path = os.path.join(folder, 'frontier.json')
    if not os.path.exists(path):
        return lines
    with open(path) as f:
        fr = json.load(f)
    taus = sorted({setting_of(r) for r in fr['rows']},    # the grid, then the settings with the slots' own bar
                  key=lambda s: (s[1] is not None, -s[0], -(s[1] or 0)))
    lines += [f"test, n={fr['n']}, each cell R@1 / validity / tokens per forward; AR R@1 {fr['ar_R@1']:.4f}, copy "
              f"share {fr['ar_copy_share']:.3f}; floor {fr['floor_R@1']:.4f}; commit {fr['commit']}", '',
              '| stage | ' + ' | '.join(threshold_label(dict(tau=t, tau_slot=s)) for t, s in taus) + ' | parity TPF |',
              '|---' * (len(taus) + 2) + '|']
    for stage, parity in fr['parity_tpf'].items():
        cells = {setting_of(r): r for r in fr['rows'] if r['stage'] == stage}
        at_parity = 'none' if parity is None else f"{parity['tokens_per_forward']:.2f} ({threshold_label(parity)})"
        lines.append(f"| {stage} | " + ' | '.join(
            f"{cells[t]['R@1']:.4f} / {cells[t]['validity']:.3f} / {cells[t]['tokens_per_forward']:.2f}"
            if t in cells else '' for t in taus) + f" | {at_parity} |")
    lines += ['', f"parity TPF: {fr['parity_rule']}"]
    return lines


def setting_of(record):
    """(tau, tau_slot) of a frontier row or of t*: tau_slot None where every token commits at tau."""
    return record['tau'], record.get('tau_slot') or None


def share(x):
    """A share to three places, blank where there is none."""
    return '' if x is None else f"{x:.3f}"


def interval(ranks, metric):
    b = bootstrap_mean(per_rank_metric(ranks, metric))
    return [b['lo'], b['hi']]


def copy_share_of(e, floor):
    """metrics.copy_share of an eval file's outputs, the users' targets read from the floor's ranks (the floor
    ranks the target at its list place): None for files without the record."""
    if floor is None or 'first_is_floor_first' not in e['per_user']:
        return None
    place = dict(zip(floor['per_user']['user'], floor['per_user']['rank']))
    return copy_share(e['per_user']['first_is_floor_first'], [place[u] - 1 for u in e['per_user']['user']])


def test_evals(folder):
    """name -> the test evaluation file results/eval_<name>.json."""
    evals = {}
    for path in glob.glob(os.path.join(folder, 'eval_*.json')):
        with open(path) as f:
            e = json.load(f)
        if e.get('split') == 'test':
            evals[os.path.basename(path)[5:-5]] = e
    return evals


def paired_users(e, other):
    """The first n users both files decoded (a limited run covers the first n in user order), or 0."""
    a, b = e['per_user'], other['per_user']
    n = min(len(a['rank']), len(b['rank']))
    return n if a['user'][:n] == b['user'][:n] else 0


def over_seeds(folder):
    """Rows for the systems every seed folder <folder>/seeds/<seed>/ holds: the mean and spread of R@1 and N@3
    over seeds, the mean and lowest validity, and the mean over seeds of the paired difference to the predecessor
    (protocol item 8) and to AR (the stage table's bar is read against the teacher)."""
    seeds = [test_evals(d) for d in sorted(glob.glob(os.path.join(folder, 'seeds', '*', '')))]
    rows = []
    for key, label, prev in ROWS if seeds else []:
        if not all(key in ev for ev in seeds):
            continue
        row = {'name': key, 'label': label, 'seeds': len(seeds)}
        for k in ('R@1', 'N@3'):
            vals = [metrics_from_ranks(ev[key]['per_user']['rank'])[k] for ev in seeds]
            row[k] = {'mean': float(np.mean(vals)), 'std': float(np.std(vals))}
        validity = [np.mean(ev[key]['per_user']['valid']) for ev in seeds]
        row['validity'] = {'mean': float(np.mean(validity)), 'min': float(np.min(validity))}
        if prev and (gain := mean_paired_diffs(seeds, key, prev)):
            row['vs'] = prev
            row.update({f'{k}_diff_mean': d for k, d in gain.items()})
        if key != 'ar' and (gap := mean_paired_diffs(seeds, key, 'ar')):
            row.update({f'{k}_vs_ar_mean': d for k, d in gap.items()})
            if (ci := seed_mean_interval(seeds, key, 'ar')):
                row.update({f'{k}_vs_ar_ci95': lo_hi for k, lo_hi in ci.items()})
        rows.append(row)
    return rows


def paired_diff(ev, key, vs, k):
    """Per user, metric k of `key` minus that of `vs`, over the users both files decoded."""
    n = paired_users(ev[key], ev[vs])
    return per_rank_metric(ev[key]['per_user']['rank'][:n], k) - per_rank_metric(ev[vs]['per_user']['rank'][:n], k)


def mean_paired_diffs(seeds, key, vs):
    """{metric: mean over seeds of the paired R@1 / N@3 difference key - vs}, or None where a seed lacks a pair."""
    if not all(vs in ev and paired_users(ev[key], ev[vs]) for ev in seeds):
        return None
    return {k: float(np.mean([paired_diff(ev, key, vs, k).mean() for ev in seeds])) for k in ('R@1', 'N@3')}


def seed_mean_interval(seeds, key, vs):
    """{metric: 95% interval of the mean over seeds of the paired difference key - vs}, from resampling users (the
    same users in every seed: the split is fixed), or None where the seeds' users differ. It is the interval of
    these runs on these users: the seeds are fixed, not drawn."""
    users = [ev[key]['per_user']['user'][:paired_users(ev[key], ev[vs])] for ev in seeds]
    if any(u != users[0] for u in users):
        return None
    out = {}
    for k in ('R@1', 'N@3'):
        b = bootstrap_mean(np.mean([paired_diff(ev, key, vs, k) for ev in seeds], axis=0))
        out[k] = [b['lo'], b['hi']]
    return out


def gap_to_ar(row, k):
    """A seeds row's mean paired difference to AR, with its interval where there is one."""
    if f'{k}_vs_ar_mean' not in row:
        return ''
    ci = row.get(f'{k}_vs_ar_ci95')
    return f"{row[f'{k}_vs_ar_mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else '')


def seed_commits(folder):
    """Which commit ran each seed folder (its run.json), said beside the table: `run.sh cpu seeds` reruns only the
    seeds, so a folder can predate the run whose tables it sits beside."""
    def commit(d):
        try:
            with open(os.path.join(d, 'run.json')) as f:
                return json.load(f).get('commit', '?')
        except (OSError, ValueError):
            return 'no run.json'
    runs = sorted(glob.glob(os.path.join(folder, 'seeds', '*', '')))
    return 'commits: ' + ', '.join(f"seed {os.path.basename(d.rstrip(os.sep))} {commit(d)}" for d in runs) + \
        f"; this run: {commit(folder)}"


def accuracy_table(evals, summary):
    """The accuracy table's lines, one row per evaluated system; fills summary's accuracy rows and each stage's
    paired gains (over the stage before it, and its gap to AR)."""
    lines = ['| system | R@1 | R@3 | R@5 | N@3 | N@5 | validity | tokens/forward | copy share | conclusion | n |',
             '|---' * 11 + '|']
    for key, label, prev in ROWS:
        if key not in evals:
            continue
        e = evals[key]
        ranks = e['per_user']['rank']
        m = metrics_from_ranks(ranks)
        ci = {k: interval(ranks, k) for k in ('R@1', 'N@3')}
        row = {'name': key, 'label': label, 'n': len(ranks), 'metrics': m, 'validity': e.get('validity', 1.0),
               'ci95': ci, 'copy_share': copy_share_of(e, evals.get('floor')),
               'trace_agreement': e.get('trace_agreement'), 'device': e.get('device'),
               'commit': e.get('commit')}
        summary['accuracy'].append(row)
        agree = '' if not row['trace_agreement'] else share(row['trace_agreement']['conclusion'])
        tpf = '' if e.get('tokens_per_forward_trace') is None else f"{e['tokens_per_forward']:.2f}"
        lines.append(f"| {label} | " + ' | '.join(f"{m[k]:.4f}" for k in METRICS) +
                     f" | {row['validity']:.3f} | {tpf} | {share(row['copy_share'])} | {agree} | {len(ranks)} |")
        for vs in dict.fromkeys(v for v in (prev, 'ar') if v and v != key):  # the stage's gain, then its gap to AR
            n = paired_users(e, evals[vs]) if vs in evals else 0
            if n:
                g = {'name': key, 'vs': vs, 'n': n}
                for k in ('R@1', 'N@3'):
                    g[k] = paired_bootstrap(ranks[:n], evals[vs]['per_user']['rank'][:n], k)
                summary['gains'].append(g)
    return lines


def gain_table(gains):
    lines = ['| stage | vs | n | R@1 diff [95% CI] | N@3 diff [95% CI] |', '|---|---|---|---|---|']
    for g in gains:
        lines.append(f"| {g['name']} | {g['vs']} | {g['n']} | " + ' | '.join(
            f"{g[k]['diff']:+.4f} [{g[k]['lo']:+.4f}, {g[k]['hi']:+.4f}]" for k in ('R@1', 'N@3')) + ' |')
    return lines


def speed_table(bench):
    """The speed table's lines from bench.json."""
    lines = [f"device: {bench['device']}, torch {bench['torch']}, {bench.get('threads', '?')} threads, "
             f"commit {bench['commit']}; forward_cost_ratio {bench['forward_cost_ratio']:.2f} at B = "
             f"{bench['block']} (one forward over B new tokens / over one)", '',
             '| decoding | checkpoint | batch | R@1 | validity | tok/s | tokens/forward (row / batch) | '
             'ms per step (bare forward) | step overhead | speedup [range over repeats] |',
             '|---' * 10 + '|']
    for r in bench['rows']:
        r1 = '' if r['R@1'] is None else f"{r['R@1']:.4f}"
        val = '' if r['validity'] is None else f"{r['validity']:.3f}"
        how = 'AR' if r['mode'] == 'ar' else f"B = {r['block']}, {threshold_label(r)}"
        lo, hi = r.get('speedup_range', (r['speedup'], r['speedup']))
        step = (f"{r['ms_per_step']:.3f} ({r['forward_ms']:.3f}) | {r['step_overhead']:.2f}"
                if 'step_overhead' in r else ' |')
        lines.append(f"| {how} | {r['ckpt']} | {r['batch']} | {r1} | {val} | {r['tok_per_s']:.0f} | "
                     f"{r['tokens_per_forward']:.2f} / {r.get('batch_tokens_per_forward', 0):.2f} | {step} | "
                     f"{r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] |")
    for stage, parent in bench.get('same_weights_as', {}).items():
        lines.append(f"| | {stage}: the same weights as {parent} | | | | | | | | |")
    return lines


def seed_table(seed_rows):
    lines = ['| system | seeds | R@1 mean (sd) | N@3 mean (sd) | validity mean (min) | vs | R@1 diff, mean | '
             'N@3 diff, mean | R@1 - AR, mean [95% CI] | N@3 - AR, mean [95% CI] |', '|---' * 10 + '|']
    for r in seed_rows:
        diff = (f"| {r['vs']} | {r['R@1_diff_mean']:+.4f} | {r['N@3_diff_mean']:+.4f} |" if 'vs' in r else '| | | |')
        diff += f" {gap_to_ar(r, 'R@1')} | {gap_to_ar(r, 'N@3')} |"
        lines.append(f"| {r['label']} | {r['seeds']} | " + ' | '.join(
            f"{r[k]['mean']:.4f} ({r[k]['std']:.4f})" for k in ('R@1', 'N@3')) +
            f" | {r['validity']['mean']:.3f} ({r['validity']['min']:.3f}) {diff}")
    return lines


def main(folder=None):
    folder = folder or os.path.dirname(results_path('summary.json'))  # RESULTS_DIR, else the setting's folder
    evals = test_evals(folder)
    if not evals and not glob.glob(os.path.join(folder, 'seeds', '*', 'eval_*.json')):
        where = 'does not exist' if not os.path.isdir(folder) else 'holds no test evaluation (eval_*.json)'
        raise SystemExit(f"error: {folder} {where}: name a results folder (python report.py results/cpu), or "
                         f"decode a checkpoint into it first (python decode.py --ckpt=out/ar.pt --name=ar)")
    summary = {'accuracy': [], 'gains': [], 'speed': []}
    lines = accuracy_table(evals, summary)
    bench, bench_path = {'rows': []}, os.path.join(folder, 'bench.json')
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            bench = json.load(f)
        summary['speed'] = bench['rows']
    summary['seeds'] = over_seeds(folder)
    note = ("copy share: share of outputs whose first item is the pre-ranker's first (invalid ones count), on the "
            "users where that item is wrong; conclusion: share of outputs whose decoded <best> is the data's trace's "
            "(blank: no trace, or a file from before the record)")
    text = '\n'.join(['## Headline (test)', ''] + headline(summary, evals, bench) +
                     ['', '## Accuracy (test)', ''] + lines +
                     ['', note, '', '## Stage gains and gaps to AR (paired bootstrap)', ''] +
                     gain_table(summary['gains']) +
                     (['', f'## Over seeds (seeds/<seed>/ beside these files; {seed_commits(folder)})', '']
                      + seed_table(summary['seeds']) if summary['seeds'] else []) +
                     (['', '## Speed', ''] + speed_table(bench) if bench['rows'] else []) +
                     (['', '## The threshold and the frontier', ''] + fl if (fl := frontier_lines(folder)) else [])
                     ) + '\n'
    print(text)
    write_json(os.path.join(folder, 'summary.json'), summary)
    with open(os.path.join(folder, 'tables.md'), 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main(*sys.argv[1:2])
