"""Each stage runs end to end on the tiny setting, refuses wrong inputs clearly, and the RL pieces behave."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train_cft import TrainCFTConfig, block_at
from train_rl import rank_reward, group_advantages, kl_to_reference
from rollouts import score_rollouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'train_ar.py': ['--n_layer=1', '--n_embd=32', '--n_head=2', '--batch_size=8', '--max_steps=6', '--mid_steps=2',
                    '--eval_every=6'],
    'train_cft.py': ['--block=8', '--batch_size=4', '--max_steps=3', '--eval_every=3', '--block_warmup=2',
                     '--suffix_share=0.5'],
    'train_opd.py': ['--n_prompts=2', '--group=2', '--max_steps=2', '--eval_every=2', '--cft_weight=0.5'],
    'train_rl.py': ['--n_prompts=2', '--group=4', '--max_steps=2', '--eval_every=2', '--kl_weight=0.5'],
}


def run(script, cwd, *args):
    cmd = [sys.executable, os.path.join(ROOT, script), '--device=cpu', *args]
    env = dict(os.environ, WORK_DIR=cwd, RESULTS_DIR='results')  # the scratch run's out/ and results/
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope='module')
def pipeline(tiny_dir, tmp_path_factory):
    """The tiny recipe: AR -> CFT -> OPD -> RL -> evaluation, in a scratch folder."""
    cwd = str(tmp_path_factory.mktemp('run'))
    data = f'--data_dir={tiny_dir}'
    for script in ('train_ar.py', 'train_cft.py', 'train_opd.py', 'train_rl.py'):
        p = run(script, cwd, data, *TINY[script])
        assert p.returncode == 0, p.stderr[-3000:]
    p = run('decode.py', cwd, data, '--ckpt=out/rl.pt', '--name=rl', '--block=8')
    assert p.returncode == 0, p.stderr[-3000:]
    return cwd, data


def test_recipe_runs_end_to_end(pipeline):
    cwd, _ = pipeline
    for f in ('ar.pt', 'cft.pt', 'opd.pt', 'rl.pt'):
        assert os.path.exists(os.path.join(cwd, 'out', f))
    import json
    res = json.load(open(os.path.join(cwd, 'results', 'eval_rl.json')))
    assert res['n'] == len(res['per_user']['rank']) and res['decode']['block'] == 8
    assert res['per_user']['user'] == sorted(res['per_user']['user'])
    pu = res['per_user']
    assert len(pu['copy']) == res['n'] and all(v for v, c in zip(pu['valid'], pu['copy']) if c)  # a copy is valid
    ck = torch.load(os.path.join(cwd, 'out', 'rl.pt'), weights_only=True)
    assert ck['stage'] == 'rl' and ck['parent'] == 'out/opd.pt'
    trace = json.load(open(os.path.join(cwd, 'results', 'train_ar.json')))['valid']  # the trace's own diagnosis
    for key in ('trace_p99_share', 'weight_accuracy', 'score_accuracy', 'match_accuracy', 'conclusion_accuracy'):
        assert 0.0 <= trace[key] <= 1.0
    from metrics import metrics_from_ranks  # the summary is the per-user record's, invalid scored as the floor
    assert res['metrics'] == pytest.approx(metrics_from_ranks(np.array(pu['rank'])))
    assert res['validity'] == pytest.approx(np.mean(pu['valid']))


def test_show_prints_one_re_ranking_side_by_side(pipeline):
    """show.py: the prompt, the AR teacher's response and the block-decoded one with each token's commit step,
    and both outcomes; an unknown user is named with the fix."""
    cwd, data = pipeline
    p = run('show.py', cwd, data, '--diffusion=out/rl.pt', '--index=1', '--tau=0.5')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'prompt:' in p.stdout and 'AR teacher (out/ar.pt)' in p.stdout and 'RL (out/rl.pt), B = 8' in p.stdout
    block_part = p.stdout[p.stdout.index('RL (out/rl.pt)'):]
    assert re.search(r'\] \S+:\d+ \S+:\d+', block_part)                  # every token with its commit step
    assert p.stdout.count('the target at rank') + p.stdout.count('invalid (scored') == 2
    shown = re.search(r'test instance (\d+), user (\d+);', p.stdout)   # --user is the data file's id (from 1)
    p = run('show.py', cwd, data, '--diffusion=', f'--user={shown[2]}')
    assert p.returncode == 0 and shown[0] in p.stdout, p.stderr[-2000:]
    p = run('show.py', cwd, data, '--user=999999')
    assert p.returncode != 0 and 'user 999999 has no test instance' in p.stderr + p.stdout
    assert 'Traceback' not in p.stderr
    p = run('show.py', cwd, data, '--diffusion=', '--history=3 4 5')  # a typed-in history: no target to rank
    assert p.returncode == 0 and 'a typed-in history of 3 items' in p.stdout, p.stderr[-2000:]
    assert re.search(r'candidates: c1=i\d+', p.stdout) and 'the target at rank' not in p.stdout
    assert p.stdout.count('ranking c') + p.stdout.count('invalid (scored') == 1
    for bad, says in (('--history=3 x', 'item ids separated by spaces'), ('--cands=1 2', '--cands needs --history'),
                      ('--history=99999', 'give item ids within')):
        p = run('show.py', cwd, data, bad)
        assert p.returncode != 0 and says in p.stdout + p.stderr and 'Traceback' not in p.stderr, bad


def test_naive_conversion_decodes_the_model_cft_starts_from(pipeline):
    """decode.py on an AR checkpoint with a block size converts it as train_cft does (the mask token's
    embedding), so the naive row is CFT's step 0; --teacher_forced adds the trace's judgements."""
    import json
    from checkpoints import load_checkpoint
    from evaluation import Decoding, evaluate, load_data_for
    from diffusion import convert
    cwd, data = pipeline
    p = run('decode.py', cwd, data, '--ckpt=out/ar.pt', '--name=naive', '--block=8', '--split=valid',
            '--teacher_forced=True')
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(cwd, 'results', 'eval_naive.json')))
    model, ck = load_checkpoint(os.path.join(cwd, 'out', 'ar.pt'))
    d = load_data_for(ck, data.split('=', 1)[1])
    ref, _ = evaluate(convert(model, d.vocab), d, 'valid', Decoding(block=8), torch.device('cpu'))
    assert res['per_user'] == ref['per_user'] and res['validity'] == ref['validity']


def test_opd_runs_at_the_commit_state(pipeline):
    cwd, data = pipeline
    p = run('train_opd.py', cwd, data, *TINY['train_opd.py'], '--state=l2r', '--out=out/opd_l.pt')
    assert p.returncode == 0, p.stderr[-3000:]  # the pipeline's OPD ran at the default, the commit state
    p = run('train_opd.py', cwd, data, '--state=middle', '--max_steps=1')
    assert p.returncode != 0 and 'commit or l2r' in p.stderr + p.stdout
    p = run('train_opd.py', cwd, data, *TINY['train_opd.py'], '--state=l2r', '--l2r_states=2', '--out=out/opd_2.pt')
    assert p.returncode == 0, p.stderr[-3000:]
    for bad, says in (('--state=l2r --l2r_states=9', 'exceeds the student'), ('--l2r_states=-1', 'a count of offsets'),
                      ('--state=commit --l2r_states=2', 'at --state=l2r only')):
        p = run('train_opd.py', cwd, data, *bad.split(), '--max_steps=1', '--out=out/opd_bad.pt')
        assert p.returncode != 0 and says in p.stderr + p.stdout, bad


def test_the_off_policy_control_distils_on_the_teachers_own_samples(pipeline):
    cwd, data = pipeline
    p = run('train_opd.py', cwd, data, *TINY['train_opd.py'], '--rollouts=teacher', '--state=l2r',
            '--out=out/opd_off.pt')
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(line) for line in open(os.path.join(cwd, 'out', 'log_opd_off.jsonl')) if 'kl' in line]
    assert steps and all(s['tok_per_fwd'] == 1.0 for s in steps)  # AR samples: one token per forward
    for bad, says in (('--rollouts=both', 'student (OPD) or teacher'), ('--rollouts=teacher --state=commit', 'l2r')):
        p = run('train_opd.py', cwd, data, *bad.split(), '--max_steps=1', '--out=out/opd_bad.pt')
        assert p.returncode != 0 and says in p.stderr + p.stdout, bad


def test_a_stage_takes_its_parents_validation_where_decoded_the_same_way(pipeline):
    """OPD's step 0 is the CFT model it starts from: where CFT validated that model with the same decoding, its
    record is taken, not decoded again, and it equals a fresh decoding; at another tau the model is decoded."""
    from checkpoints import load_checkpoint
    from evaluation import Decoding, evaluate, load_data_for
    cwd, data = pipeline
    start = next(json.loads(line) for line in open(os.path.join(cwd, 'out', 'log_opd.jsonl')) if 'val_R1' in line)
    model, ck = load_checkpoint(os.path.join(cwd, 'out', 'cft.pt'))
    d = load_data_for(ck, data.split('=', 1)[1])
    fresh, _ = evaluate(model, d, 'valid', Decoding(block=8, tau=0.6), torch.device('cpu'))  # OPD's default tau
    assert start['step'] == 0 and start['val_R1'] == fresh['metrics']['R@1']
    assert start['val_validity'] == fresh['validity'] and start['val_tok_per_fwd'] == fresh['tokens_per_forward']
    # CFT validates on its CPU setting's first 1,024 users, OPD on every one: the same users only when asked
    args = (*TINY['train_opd.py'], '--max_steps=1', '--eval_n=1024', '--out=out/opd_1.pt')
    p = run('train_opd.py', cwd, data, *args, '--tau=0.9')  # CFT validates at 0.9
    assert p.returncode == 0 and "step 0: " in p.stdout and "the parent's record" in p.stdout, p.stderr[-2000:]
    p = run('train_opd.py', cwd, data, *args, '--tau=0.5')
    assert p.returncode == 0 and "step 0: " in p.stdout and "the parent's record" not in p.stdout, p.stderr[-2000:]


def test_cft_continues_from_a_cft_parent(pipeline):
    """run.sh's control "more CFT": CFT from a CFT checkpoint evaluates its parent as step 0 (inside Stage's
    constructor) and logs the held-out loss there too."""
    cwd, data = pipeline
    p = run('train_cft.py', cwd, data, *TINY['train_cft.py'], '--parent=out/cft.pt', '--out=out/cft_more.pt',
            '--max_steps=1', '--eval_every=1', '--block_warmup=0')
    assert p.returncode == 0, p.stderr[-2000:]
    log = [json.loads(line) for line in open(os.path.join(cwd, 'out', 'log_cft_more.jsonl'))]
    assert any(r['step'] == 0 and 'val_loss' in r for r in log) and any(r['step'] == 0 and 'val_R1' in r for r in log)


def test_wrong_or_missing_parent_is_refused(pipeline, tmp_path):
    cwd, data = pipeline
    p = run('train_cft.py', str(tmp_path), data, '--parent=out/nothing.pt')
    assert p.returncode != 0 and 'not found' in p.stderr + p.stdout and 'train_ar' in p.stderr + p.stdout
    p = run('train_opd.py', cwd, data, '--student=out/ar.pt')
    assert p.returncode != 0 and "'ar' checkpoint, expected" in p.stderr + p.stdout
    p = run('train_cft.py', cwd, data, '--parent=out/cft.pt', '--out=out/cft4.pt', '--block=4', '--max_steps=1')
    assert p.returncode != 0 and 'block' in p.stderr + p.stdout


def test_checkpoint_of_an_older_vocabulary_is_refused(pipeline):
    """A checkpoint written before a change of the trace's vocabulary names the fix instead of failing later."""
    from model import GPT, GPTConfig
    cwd, data = pipeline
    ck = torch.load(os.path.join(cwd, 'out', 'ar.pt'), weights_only=True)
    ck['model_cfg'] = dict(ck['model_cfg'], vocab_size=ck['model_cfg']['vocab_size'] + 3)
    ck['model'] = GPT(GPTConfig(**ck['model_cfg'])).state_dict()
    torch.save(ck, os.path.join(cwd, 'out', 'ar_old.pt'))
    for script, flag in (('decode.py', '--ckpt=out/ar_old.pt'), ('train_cft.py', '--parent=out/ar_old.pt')):
        p = run(script, cwd, data, flag)
        said = p.stderr + p.stdout
        assert p.returncode != 0 and 'vocabulary' in said and '--data_dir' in said and 'retrain' in said


def test_checkpoint_of_other_data_is_refused(pipeline):
    """Every checkpoint records the digests of the data it was trained on; decode.py and a later stage refuse it
    on data that gives other digests (here: a record altered as a changed data file would leave it)."""
    cwd, data = pipeline
    ck = torch.load(os.path.join(cwd, 'out', 'cft.pt'), weights_only=True)
    assert set(ck['run_cfg']['data_digests']) == {'split_digest', 'lists_digest', 'tokens_digest'}
    ck['run_cfg']['data_digests'] = dict(ck['run_cfg']['data_digests'], lists_digest='0' * 16)
    torch.save(ck, os.path.join(cwd, 'out', 'cft_other.pt'))
    for script, flags in (('decode.py', ['--ckpt=out/cft_other.pt', '--block=8']),
                          ('train_opd.py', ['--student=out/cft_other.pt'])):
        p = run(script, cwd, data, *flags)
        assert p.returncode != 0 and 'other data' in p.stderr + p.stdout and '--data_dir' in p.stderr + p.stdout


def test_another_category_is_read_by_its_name(tiny_dir, tmp_path):
    """--data_name reads <name>.txt and <name>_item2attributes.json (another Amazon category in the S3-Rec
    format), and the teacher's record carries it to the later stages."""
    import shutil
    other = tmp_path / 'toys'
    other.mkdir()
    shutil.copy(os.path.join(tiny_dir, 'Beauty.txt'), other / 'Toys.txt')
    shutil.copy(os.path.join(tiny_dir, 'Beauty_item2attributes.json'), other / 'Toys_item2attributes.json')
    p = run('train_ar.py', str(tmp_path), f'--data_dir={other}', '--data_name=Toys', *TINY['train_ar.py'][:4],
            '--max_steps=2', '--mid_steps=0', '--eval_every=2', '--eval_n=4')
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.load(tmp_path / 'out' / 'ar.pt', weights_only=True)['run_cfg']['data']['name'] == 'Toys'
    p = run('train_ar.py', str(tmp_path), f'--data_dir={other}', '--max_steps=2')
    said = p.stderr + p.stdout
    assert p.returncode != 0 and 'Beauty.txt' in said and 'Traceback' not in p.stderr
    assert '--data_name' in said and 'python data_beauty.py --name=Beauty --raw_dir=' in said  # a command that works


@pytest.mark.parametrize('content', ['random bytes', 'a bare state_dict'])
def test_a_damaged_or_foreign_resume_file_is_refused_with_its_fix(pipeline, tmp_path, content):
    cwd, data = pipeline
    out = tmp_path / 'cft.pt'
    if content == 'random bytes':
        out.with_suffix('.pt.resume').write_bytes(os.urandom(256))
    else:
        torch.save({'model': {}}, out.with_suffix('.pt.resume'))
    p = run('train_cft.py', cwd, data, *TINY['train_cft.py'], f'--out={out}')
    said = p.stderr + p.stdout
    assert p.returncode != 0 and 'Traceback' not in said and 'delete it' in said and str(out) in said


def test_an_unwritable_results_folder_is_refused_before_any_work(pipeline, tmp_path):
    cwd, data = pipeline
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    for script, args in (('train_ar.py', TINY['train_ar.py']), ('decode.py', ['--ckpt=out/ar.pt', '--name=x'])):
        env = dict(os.environ, WORK_DIR=cwd, RESULTS_DIR=str(blocker / 'results'))
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), '--device=cpu', data, *args], cwd=cwd,
                           capture_output=True, text=True, timeout=600, env=env)
        said = p.stderr + p.stdout
        assert p.returncode != 0 and 'set RESULTS_DIR' in said and 'Traceback' not in said, said[-2000:]
        assert 'step 0' not in said  # refused before training or decoding


def test_ctrl_c_while_a_stage_starts_exits_without_a_traceback(monkeypatch):
    import signal
    from common import start_stage
    from train_rl import TrainRLConfig
    monkeypatch.setattr(sys, 'argv', ['train_rl.py', '--device=cpu'])
    def default(*_):  # stands in for Python's own handler (a KeyboardInterrupt traceback), so a miss fails here
        raise AssertionError("start_stage left Ctrl-C to the default handler")
    before = signal.signal(signal.SIGINT, default)
    try:
        start_stage(TrainRLConfig)
        with pytest.raises(SystemExit, match='rerun the same command'):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_checkpoint_of_random_bytes_is_refused_in_one_line(pipeline, tmp_path):
    cwd, data = pipeline
    (tmp_path / 'junk.pt').write_bytes(os.urandom(512))
    p = run('decode.py', cwd, data, f'--ckpt={tmp_path}/junk.pt')
    said = p.stderr + p.stdout
    assert p.returncode != 0 and 'not a readable checkpoint' in said and 'weights_only' not in said
    assert len([line for line in p.stderr.splitlines() if line.strip()]) == 1


def test_missing_data_dir_is_refused(tmp_path):
    p = run('train_ar.py', str(tmp_path), f'--data_dir={tmp_path}/none', '--max_steps=1')
    assert p.returncode != 0 and 'missing data file' in p.stderr + p.stdout


def test_unknown_flag_is_refused(tmp_path):
    p = run('train_ar.py', str(tmp_path), '--no_such_flag=1')
    assert p.returncode != 0 and 'unknown option --no_such_flag' in p.stderr + p.stdout


@pytest.mark.parametrize('script,args,says', [
    ('decode.py', ['--split=validation'], 'use valid'),
    ('decode.py', ['--block=32', '--tau=0'], 'threshold lies in (0, 1]'),
    ('decode.py', ['--limit=-1'], 'limit >= 0'),
    ('train_cft.py', ['--block=0'], '--block must be >= 1'),
    ('train_cft.py', ['--suffix_share=2'], 'in [0, 1]'),
    ('train_opd.py', ['--state=left'], 'state commit or l2r'),
    ('train_opd.py', ['--l2r_states=4'], 'at --state=l2r only'),
])
def test_out_of_range_settings_are_refused_before_any_work(tmp_path, script, args, says):
    p = run(script, str(tmp_path), *args)  # no data, no checkpoint here: the check comes first
    assert p.returncode != 0 and says in p.stderr + p.stdout


@pytest.mark.parametrize('cls,args,says', [
    ('TrainARConfig', ['--batch_size=0'], '--batch_size=0: must be >= 1'),
    ('TrainARConfig', ['--max_steps=0'], '--max_steps=0: must be >= 1'),
    ('TrainARConfig', ['--max_steps=-1'], '--max_steps=-1: must be >= 1'),
    ('TrainARConfig', ['--eval_every=0'], '--eval_every=0: must be >= 1'),
    ('TrainARConfig', ['--n_embd=100', '--n_head=3'], 'not divisible by --n_head=3'),
    ('TrainARConfig', ['--n_embd=27', '--n_head=3'], 'a head needs an even number'),
    ('TrainARConfig', ['--drill=1.5'], '--drill=1.5: a share of the windows'),
    ('TrainARConfig', ['--w_trace=-1'], "'w_trace': -1.0"),
    ('TrainARConfig', ['--w_trace=0', '--w_answer=0', '--w_judge=0'], 'one of them positive'),
    ('TrainARConfig', ['--device=gpu'], "use auto, cpu, cuda"),
    ('TrainARConfig', ['--out=/proc/none/ar.pt'], 'cannot write to /proc/none'),
    ('TrainCFTConfig', ['--parent=out/cft.pt'], 'overwrite its own parent'),
    ('TrainOPDConfig', ['--student=out/x.pt', '--out=out/x.pt'], 'overwrite its own parent'),
    ('TrainRLConfig', ['--lr=0'], '--lr=0.0: the learning rate must be > 0'),
    ('TrainRLConfig', ['--kl_weight=-1'], '--kl_weight=-1.0: must be >= 0'),
    ('DecodeConfig', ['--device=tpu'], "use auto, cpu, cuda"),
    ('BenchConfig', ['--repeats=0'], '>= 1'),
])
def test_bad_flags_name_the_flag_and_the_fix(cls, args, says):
    """Every flag is checked when it is read, before data or a checkpoint is touched."""
    import bench
    import decode
    import train_ar
    import train_cft
    import train_opd
    import train_rl
    from common import parse_config
    owner = next(m for m in (train_ar, train_cft, train_opd, train_rl, decode, bench) if hasattr(m, cls))
    with pytest.raises(SystemExit, match=re.escape(says)):
        parse_config(getattr(owner, cls), args)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a machine without CUDA')
def test_cuda_without_cuda_is_refused():
    from common import parse_config
    from train_ar import TrainARConfig
    with pytest.raises(SystemExit, match='CUDA is not available here; use --device=cpu'):
        parse_config(TrainARConfig, ['--device=cuda'])


def test_without_cuda_a_stage_runs_its_cpu_setting():
    """`python train_ar.py` on a machine without CUDA trains the CPU recipe (run.sh cpu passes no size flags);
    a flag given on the command line wins over it; with CUDA the defaults stay the GPU setting's."""
    from common import parse_config
    from train_ar import TrainARConfig
    from train_cft import TrainCFTConfig
    cfg = parse_config(TrainARConfig, ['--device=cpu', '--max_steps=7'])
    assert (cfg.n_layer, cfg.n_embd, cfg.batch_size, cfg.max_steps) == (2, 128, 32, 7)
    assert parse_config(TrainCFTConfig, ['--device=cpu']).batch_size == 32
    expected = TrainARConfig.n_layer if torch.cuda.is_available() else 2
    assert parse_config(TrainARConfig, []).n_layer == expected


def test_a_diffusion_checkpoint_decodes_at_its_own_block(pipeline):
    """CFT trained at B = 8 is refused at 32 and 0, with the block it needs; the AR teacher decodes at any B."""
    cwd, data = pipeline
    for block in (32, 0):
        p = run('decode.py', cwd, data, '--ckpt=out/cft.pt', f'--block={block}', '--limit=4')
        assert p.returncode != 0 and 'decode it with --block=8' in p.stderr + p.stdout
        assert 'Traceback' not in p.stderr
    p = run('decode.py', cwd, data, '--ckpt=out/ar.pt', '--block=4', '--limit=4')
    assert p.returncode == 0, p.stderr[-2000:]


def test_block_warmup_climbs_from_ar_to_the_block_size():
    cfg = TrainCFTConfig(block=32, block_warmup=60)
    sizes = [block_at(step, cfg) for step in range(80)]                      # six stretches of 10 steps
    assert sizes[0] == 1 and sizes[49] == 16 and sizes[50:] == [32] * 30   # B = 1 first: the AR loss exactly
    assert sorted(set(sizes)) == [1, 2, 4, 8, 16, 32] and sizes == sorted(sizes)
    assert block_at(0, TrainCFTConfig(block=32)) == 32                      # off by default
    sizes = [block_at(step, TrainCFTConfig(block=24, block_warmup=80)) for step in range(80)]
    assert sorted(set(sizes)) == [1, 2, 3, 4, 6, 8, 12, 24] and sizes == sorted(sizes)  # each divides 24


def test_evaluations_fall_every_eval_every_steps_at_the_end_and_when_time_runs_out():
    cfg = TrainCFTConfig(max_steps=12, eval_every=5)
    due = [step for step in range(12) if cfg.evaluation_due(step, timer=lambda: 1e9)[0]]
    assert due == [4, 9, 11] and not any(cfg.evaluation_due(s, lambda: 1e9)[1] for s in range(12))  # no limit set
    cfg.time_limit = 60.0
    assert cfg.evaluation_due(2, timer=lambda: 30.0) == (False, False)
    assert cfg.evaluation_due(2, timer=lambda: 61.0) == (True, True)  # evaluate, save, then stop


def test_rank_reward_by_hand():
    before = [3, 1, 4, 2, 5]
    after = [1, 1, 4, 3, 5]
    valid = [True, True, True, True, False]
    r = rank_reward(before, after, valid, n_cand=10)
    np.testing.assert_allclose(r, [0.2 + 0.2, 0.0 + 0.2, 0.0, -0.1, -1.0])  # improved, stays 1st, same, worse, invalid


def test_score_rollouts_by_hand(tiny_data):
    """Rollouts planted from the data's responses: each one's rank and validity (a weight off leaves the answer
    valid; cut before the conclusion, there is none)."""
    v, sp = tiny_data.vocab, tiny_data.splits['train']
    rows = np.array([0, 0, 1, 1])
    texts = [[int(t) for t in sp.responses[i]] for i in rows]
    n_trace = texts[0].index(v.best) + 2                                  # up to and including the conclusion
    texts[1][0] = v.lead                                                  # a weight off
    texts[3] = texts[3][:n_trace - 1]                                     # no conclusion, no answer: invalid
    width = max(map(len, texts))
    res = {'tokens': torch.tensor([t + [v.eos] * (width - len(t)) for t in texts]),
           'lengths': torch.tensor([len(t) for t in texts])}
    ranks, valid, copies = score_rollouts(res, tiny_data, rows)
    assert ranks.tolist() == [1, 1, 1, int(sp.target[1]) + 1]            # the data's answer ranks the target first
    assert valid.tolist() == [True, True, True, False]


def test_group_advantages_drop_zero_variance():
    adv, keep = group_advantages([0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.5, 0.5], group=4)
    assert not keep[:4].any() and keep[4:].all()
    assert np.all(adv[:4] == 0)
    assert abs(adv[4:].mean()) < 1e-9 and adv[4] > 0 > adv[5]


def test_kl_to_reference_is_zero_at_the_start_and_pulls_back():
    ref = torch.tensor([-0.5, -1.0, -2.0])
    assert torch.equal(kl_to_reference(ref, ref), torch.zeros(3))
    new = torch.tensor([-0.3, -1.5, -2.0], requires_grad=True)
    kl = kl_to_reference(new, ref)
    assert (kl[:2] > 0).all() and kl[2] == 0
    kl.sum().backward()   # descending it moves each log-prob back towards the start policy's
    assert new.grad[0] > 0 > new.grad[1] and new.grad[2] == 0


@pytest.mark.parametrize('state,offsets', [('commit', None), ('l2r', None), ('l2r', [1, 3])])
def test_opd_gradient_matches_finite_differences(tiny_data, state, offsets):
    """The OPD loss's gradient (through the replay, with the teacher frozen) is the derivative of the KL: checked
    along a random direction in float64, so a detach or a masked-token NaN cannot hide."""
    from conftest import tiny_model
    from data_beauty import collate
    from diffusion import convert, generate_block
    from train_opd import opd_kl
    v = tiny_data.vocab
    teacher, student = tiny_model(v, seed=1).double(), convert(tiny_model(v, seed=0), v).double()
    batch = collate(tiny_data.splits['train'], range(4), v, block=4)
    with torch.no_grad():
        res = generate_block(student, batch['prompt'], batch['pad'], 24, v, block=4, tau=0.5, temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
    params = list(student.parameters())
    grads = torch.autograd.grad(opd_kl(student, teacher, batch, res, 4, v, state=state, offsets=offsets), params,
                                allow_unused=True)
    gen = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum((g * u).sum() for g, u in zip(grads, direction) if g is not None).item()
    eps, values = 1e-4, []
    with torch.no_grad():
        for sign in (1, -2):
            for p, u in zip(params, direction):
                p.add_(sign * eps * u)
            values.append(opd_kl(student, teacher, batch, res, 4, v, state=state, offsets=offsets).item())
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-4 and abs(analytic - numeric) < 0.05 * abs(numeric)


@pytest.mark.parametrize('state', ['commit', 'l2r'])
def test_opd_loss_is_zero_for_block_one_student_equal_to_teacher(tiny_data, state):
    from conftest import tiny_model
    from data_beauty import collate
    from diffusion import convert, generate_block
    from train_opd import opd_kl
    v = tiny_data.vocab
    teacher, student = tiny_model(v, seed=1), convert(tiny_model(v, seed=1), v)
    batch = collate(tiny_data.splits['train'], range(4), v, block=1)
    res = generate_block(student, batch['prompt'], batch['pad'], 24, v, block=1, tau=0.5, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert opd_kl(student, teacher, batch, res, 1, v, state=state).abs() < 1e-6
    assert opd_kl(convert(tiny_model(v, seed=2), v), teacher, batch, res, 1, v, state=state) > 1e-4


def test_the_teachers_drill_keeps_the_decisions_label_and_changes_what_follows_it(tiny_data):
    """train_ar.drill_answers: the decision is predicted before it is written, so a drilled row keeps the target as
    the decision's label while its input and the rest of the answer follow the drilled decision; the loss reads
    those labels."""
    from conftest import tiny_model
    from data_beauty import collate
    from train_ar import ar_response_loss, drill_answers
    v = tiny_data.vocab
    model = tiny_model(v, entries=False)
    batch = collate(tiny_data.splits['train'], range(8), v)
    drilled = drill_answers(batch, 1.0, np.random.default_rng(0), v)
    decision, rest = batch['kind'] == 2, batch['kind'] == 1
    assert torch.equal(drilled['labels'][decision], batch['resp'][decision])
    assert torch.equal(drilled['labels'][~decision], drilled['resp'][~decision])
    assert not torch.equal(drilled['resp'][rest], batch['resp'][rest])
    with torch.no_grad():
        assert not torch.allclose(ar_response_loss(model, drilled, w_answer=1.0),
                                  ar_response_loss(model, {**drilled, 'labels': drilled['resp']}, w_answer=1.0))


def test_rl_update_is_the_policy_gradient_at_ratio_one(tiny_data):
    """train_rl.clipped_gradient, where pi equals pi_old (ratio 1, nothing clipped), is the gradient of
    -sum_t A(rollout of t) log pi(token t) / (live tokens) over the rows kept: an SGD step on it equals -lr times
    that gradient, from an independent replay here (a flipped sign, an advantage on the wrong row, a per-row mean
    instead of DAPO's token mean each fail), whether the kept rows come in one list of micro-batches or two. Zero
    advantages move nothing; the start policy as reference logs KL 0, and the replay reproduces the sampler's
    log-probs."""
    import copy
    from conftest import tiny_model
    from data_beauty import collate
    from diffusion import convert, generate_block, live_tokens, replay_logits, token_logprobs
    from train_rl import TrainRLConfig, clipped_gradient, micro_batches
    d = tiny_data
    torch.manual_seed(0)
    model = convert(tiny_model(d.vocab), d.vocab)
    batch = collate(d.splits['train'], [0, 0, 1, 1], d.vocab, block=4)
    res = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=4, tau=0.5, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    adv, kept = np.array([1.0, -1.0, 0.5, -0.5]), [0, 1, 3]
    cfg = TrainRLConfig(micro_batch=2, kl_weight=0.0, group=2)
    lr = 0.05
    live = live_tokens(res)
    sel = torch.tensor(kept)
    reference = copy.deepcopy(model)
    expected = copy.deepcopy(model)
    lp = token_logprobs(replay_logits(expected, batch['prompt'][sel], batch['pad'][sel],
                                      {k: v[sel] for k, v in res.items()}, 4, d.vocab, live[sel]),
                        res['tokens'][sel][live[sel]], 1.0)
    a = torch.tensor(adv[kept], dtype=torch.float32)[:, None].expand_as(live[sel])[live[sel]]
    (-(a * lp).sum() / live[sel].sum()).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p -= lr * p.grad

    def sgd_step(m, pieces):
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        stats = clipped_gradient(m, reference, pieces, cfg, 4, d.vocab, torch.device('cpu'))
        opt.step()
        return stats

    two_lists = copy.deepcopy(model)  # the same rows cut into micro-batches twice: one token mean over both
    sgd_step(two_lists, [p for rows in ([0, 1], [3]) for p in micro_batches(batch, res, rows, adv, cfg.micro_batch)])
    stats = sgd_step(model, list(micro_batches(batch, res, kept, adv, cfg.micro_batch)))
    for p, q, r in zip(model.parameters(), expected.parameters(), two_lists.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(r, q, atol=1e-6, rtol=1e-4)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert stats['kl_to_start'] == 0.0 and stats['replay_gap'] < 1e-4
    frozen = copy.deepcopy(model)
    sgd_step(model, list(micro_batches(batch, res, kept, 0 * adv, cfg.micro_batch)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen.parameters()))


def test_bench_outputs_equal_decode(tiny_data):
    """The benchmark times the very decoding that evaluation uses: same tokens at the same settings, and it counts
    one forward per token for AR and for B = 1, and with blocks the prefill plus one per step of each block."""
    from bench import decode_once
    from conftest import tiny_model
    from data_beauty import collate
    from diffusion import generate_ar
    from diffusion import convert, generate_block
    from model import CachedForward
    d = tiny_data
    model = convert(tiny_model(d.vocab), d.vocab)
    full = collate(d.splits['test'], range(4), d.vocab)
    batches = [{k: v[a:a + 2] for k, v in full.items()} for a in (0, 2)]
    P = full['prompt'].shape[1]
    for block, rule in ((0, {}), (1, {}), (4, dict(tau=0.6)), (4, dict(k=2)), (4, dict(tau=0.6, from_left=True))):
        runner = CachedForward(model, batches[0]['pad'], P, 24, block or 1)
        for batch in batches:
            tokens, lengths, forwards, paid, seconds = decode_once(model, batch, d.vocab, 24, block, rule, runner)
            assert paid >= int(forwards.sum())                           # rows carried idle count too
            if block == 0:
                ref, ref_len = generate_ar(model, batch['prompt'], batch['pad'], 24, d.vocab)
            else:
                r = generate_block(model, batch['prompt'], batch['pad'], 24, d.vocab, block=block, **rule)
                ref, ref_len = r['tokens'], r['lengths']
            assert torch.equal(lengths, ref_len) and seconds > 0
            for row in range(2):
                assert torch.equal(tokens[row, :int(ref_len[row])], ref[row, :int(ref_len[row])])
            if block <= 1:
                assert torch.equal(forwards, lengths)
            if rule.get('k') == 2:  # two tokens a step inside a block: about half the forwards
                assert (forwards < lengths).all()
            if block > 1:  # the prefill, then one forward per step of each block (the finishing pass is fused)
                live = torch.arange(24)[None, :] < ref_len[:, None]
                per_block = (r['steps'] * live).view(2, -1, block).max(2).values
                assert torch.equal(forwards, 1 + per_block.sum(1))


def test_bench_reports_the_step_beside_its_bare_forward(pipeline):
    """bench.py on the tiny recipe: every row has its step time, the bare forwards it ran and their ratio, both
    tokens-per-forward figures and the spread over repeats; --taus with --tau_slot adds the two-threshold rows; a
    stage that kept its parent's weights is not timed again; and an eval file that names a timed checkpoint's path
    but scored other weights is not its accuracy."""
    import json
    cwd, data = pipeline
    planted = json.load(open(os.path.join(cwd, 'results', 'eval_rl.json')))
    planted.update(ckpt='out/cft.pt', weights='0' * 16, metrics=dict(planted['metrics'], **{'R@1': 0.999}))
    with open(os.path.join(cwd, 'results', 'eval_planted.json'), 'w') as f:
        json.dump(planted, f)
    p = run('bench.py', cwd, data, '--batches=(1, 2)', '--n_b1=2', '--n_batched=4', '--repeats=2', '--cost_reps=2',
            '--taus=(0.5,)', '--tau_slot=0.9')
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.load(open(os.path.join(cwd, 'results', 'bench.json')))
    assert {(r['stage'], r['tau'], r['tau_slot']) for r in out['rows'] if r['stage'] == 'cft'} >= {('cft', 0.5, 0.9)}
    stages = {r['stage'] for r in out['rows']}
    assert {'ar', 'cft'} <= stages and all(s in stages or s in out['same_weights_as'] for s in ('opd', 'rl'))
    assert not stages & set(out['same_weights_as'])                     # kept weights: no speed of their own
    for r in out['rows']:
        assert r['ms_per_step'] > 0 and r['forward_ms'] > 0
        assert r['step_overhead'] == pytest.approx(r['ms_per_step'] / r['forward_ms'])
        assert 0 < r['batch_tokens_per_forward'] <= r['tokens_per_forward'] + 1e-9
        assert r['speedup_range'][0] <= r['speedup_range'][1] and r['repeats'] == 2
        assert r['R@1'] != 0.999                                         # the planted file scored other weights
    cft = next(r for r in out['rows'] if r['stage'] == 'cft')
    assert cft['accuracy_from'] != 'eval_planted.json'                   # a file of its weights, or decoded


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_graphs_match_eager(tiny_data):
    """Graphed decoding replays what eager decoding computes, also when, as in bench.py, every runner captures its
    graphs before any replays: a capture empties CUDA's cache, so a graph that read memory freed since its own
    capture (such as autocast's cached bf16 weights) then reads released or overwritten memory."""
    from bench import decode_once
    from conftest import tiny_model
    from data_beauty import collate
    from diffusion import convert
    from model import CachedForward
    d = tiny_data
    model = convert(tiny_model(d.vocab), d.vocab).cuda()
    full = collate(d.splits['test'], range(4), d.vocab, device='cuda')
    settings = [(0, {}), (4, dict(tau=0.6))]  # AR, then block diffusion
    runner = lambda block, graphs: CachedForward(model, full['pad'], full['prompt'].shape[1], 24, block or 1,
                                                 graphs=graphs)
    eager = [decode_once(model, full, d.vocab, 24, block, rule, runner(block, False))[0] for block, rule in settings]
    graphed = [runner(block, True) for block, _ in settings]
    for (block, rule), run in zip(settings, graphed):  # every capture first, as bench.py's warm-up
        decode_once(model, full, d.vocab, 24, block, rule, run)
    scratch = [torch.full((1 << k,), float('nan'), device='cuda') for k in range(4, 18) for _ in range(8)]
    del scratch  # freed memory now holds NaN
    for (block, rule), run, tokens in zip(settings, graphed, eager):
        assert torch.equal(decode_once(model, full, d.vocab, 24, block, rule, run)[0], tokens)


def interrupt_and_rerun(script, args, whole, cut, out, log_name, loss_key):
    """Run `script` once whole; once with a Ctrl-C after a few training steps and again with the same command.
    Returns what the two runs left: their log rows and kept weights."""
    import json
    import signal
    import time
    assert run(script, whole, *args).returncode == 0
    env = dict(os.environ, WORK_DIR=cut, RESULTS_DIR='results')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), '--device=cpu', *args], cwd=cut,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(cut, 'out', log_name)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait until training is under way
        if os.path.exists(log) and sum(f'"{loss_key}"' in line for line in open(log)) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    o, e = proc.communicate(timeout=300)
    assert proc.returncode != 0 and 'interrupted after step' in e + o, (o + e)[-2000:]
    assert os.path.exists(os.path.join(cut, out + '.resume'))
    p = run(script, cut, *args)
    assert p.returncode == 0 and 'resuming from' in p.stdout, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(cut, out + '.resume'))
    rows = [[json.loads(line) for line in open(os.path.join(d, 'out', log_name))] for d in (whole, cut)]
    weights = [torch.load(os.path.join(d, out), weights_only=True)['model'] for d in (whole, cut)]
    return rows, weights


def test_ctrl_c_saves_and_the_rerun_ends_as_an_uninterrupted_run(tiny_dir, tmp_path):
    """Ctrl-C in the middle of train_ar's training: the step in flight finishes, the state is saved and the stage
    exits; the same command then continues and ends with the log (every step once, the same losses) and the
    weights of a run that was never interrupted."""
    args = [f'--data_dir={tiny_dir}', '--n_layer=1', '--n_embd=32', '--n_head=2', '--batch_size=8', '--mid_steps=0',
            '--max_steps=300', '--eval_every=150', '--eval_n=8']
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    os.makedirs(whole)
    os.makedirs(cut)
    (a, b), (wa, wb) = interrupt_and_rerun('train_ar.py', args, whole, cut, 'out/ar.pt', 'log_ar.jsonl', 'loss')
    assert a == b and [r['step'] for r in b if 'loss' in r] == list(range(300))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize('script,key', [('train_opd.py', 'kl'), ('train_rl.py', 'reward')])
def test_opd_and_rl_resume_as_if_never_interrupted(pipeline, tmp_path, script, key):
    """The on-policy stages resume too (training.OnPolicyRun): the rollout generators, the prompts of each step,
    the kept record and the log continue as in a run that was never interrupted, to the same weights."""
    import shutil
    cwd, data = pipeline
    whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
    for d in (whole, cut):
        shutil.copytree(os.path.join(cwd, 'out'), os.path.join(d, 'out'),
                        ignore=shutil.ignore_patterns('*.resume', 'log_*', 'rl*', 'opd_*'))
    name = script[6:-3]
    args = [data, '--n_prompts=2', '--group=2' if key == 'kl' else '--group=4', '--max_steps=20', '--eval_every=10',
            '--eval_n=8', f'--out=out/{name}_again.pt']
    (a, b), (wa, wb) = interrupt_and_rerun(script, args, whole, cut, f'out/{name}_again.pt',
                                           f'log_{name}_again.jsonl', key)
    assert a == b and [r['step'] for r in b if key in r] == list(range(1, 21))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_teacher_of_another_size_is_noted():
    from train_opd import size_note
    ck = lambda n_layer: {'model_cfg': {'n_layer': n_layer, 'n_head': 4, 'n_embd': 128}}
    assert size_note(ck(2), ck(2), 'out/ar.pt') is None
    assert "the teacher out/ar.pt is {'n_layer': 4" in size_note(ck(4), ck(2), 'out/ar.pt')


def test_opd_anchor_uses_the_students_own_cft_loss():
    """--cft_weight trains the student with the masks and weights it was trained with (its record's), so the
    anchor is the loss it was selected under."""
    from dataclasses import asdict
    from training import cft_loss_settings
    trained = asdict(TrainCFTConfig(suffix_share=0.5, validity_weight=0.0, w_judge=3.0))
    got = cft_loss_settings(trained)
    assert (got['suffix_share'], got['validity_weight'], got['w_judge']) == (0.5, 0.0, 3.0)


def test_flags_are_typed_by_their_defaults():
    from common import parse_config
    from train_ar import TrainARConfig
    cfg = parse_config(TrainARConfig, ['--data_name=123', '--lr=1', '--trace=False', '--data_dir=../x'])
    assert cfg.data_name == '123' and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.trace is False
    assert cfg.data_dir == '../x'
    for bad in (['--trace=1'], ['--max_steps=ten'], ['--max_steps=1.5']):
        with pytest.raises(SystemExit):
            parse_config(TrainARConfig, bad)


def test_report_pairs_a_limited_run_on_its_users(tmp_path):
    """A run evaluated on the first n test users is compared with the full floor on those n users only."""
    import json
    import report
    users, floor = list(range(10)), [1, 2, 3, 1, 1, 2, 5, 1, 1, 4]
    for name, ranks in (('floor', floor), ('ar', [1, 1, 1, 1, 1, 2])):
        with open(tmp_path / f'eval_{name}.json', 'w') as f:
            json.dump({'split': 'test', 'validity': 1.0,
                       'per_user': {'user': users[:len(ranks)], 'rank': ranks, 'valid': [True] * len(ranks)}}, f)
    report.main(str(tmp_path))
    summary = json.load(open(tmp_path / 'summary.json'))
    gap, gain = summary['gains']  # the floor's gap to AR, then AR's gain over the floor: the same users
    assert (gap['name'], gap['vs'], gain['name'], gain['vs']) == ('floor', 'ar', 'ar', 'floor')
    assert gain['n'] == gap['n'] == 6 and gain['R@1']['diff'] == pytest.approx((5 - 3) / 6)
    assert gap['R@1']['diff'] == pytest.approx(-gain['R@1']['diff'])
    assert [r['copy_share'] for r in summary['accuracy']] == [None, None]  # files without the copy record


def test_report_copy_share_counts_users_whose_target_is_not_first(tmp_path):
    """The copy share: outputs whose first item is the floor's, on the users where the floor's first is wrong."""
    import json
    import report
    users, floor = list(range(6)), [1, 2, 3, 1, 4, 2]
    first = [True, True, False, False, True, False]      # first item = the floor's; on users 1, 2, 4, 5: 2 of 4
    for name, extra in (('floor', {'first_is_floor_first': [True] * 6}), ('rl', {'first_is_floor_first': first})):
        with open(tmp_path / f'eval_{name}.json', 'w') as f:
            json.dump({'split': 'test', 'validity': 1.0,
                       'per_user': {'user': users, 'rank': floor, 'valid': [True] * 6, **extra}}, f)
    report.main(str(tmp_path))
    rows = {r['name']: r for r in json.load(open(tmp_path / 'summary.json'))['accuracy']}
    assert rows['floor']['copy_share'] == 1.0 and rows['rl']['copy_share'] == 0.5


def test_report_refuses_a_folder_without_evaluations(tmp_path):
    """report.py on a misspelled or empty folder says so and writes nothing, instead of empty tables."""
    for folder in (tmp_path / 'resluts', tmp_path):
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'report.py'), str(folder)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0 and 'Traceback' not in p.stderr
        assert ('does not exist' if folder != tmp_path else 'holds no test evaluation') in p.stderr
    assert not (tmp_path / 'resluts').exists() and not list(tmp_path.iterdir())


def test_report_averages_paired_differences_over_seeds(tmp_path):
    """The protocol (README, item 8) reads the mean over seeds of the paired difference, with an interval from resampling the users
    every seed shares; a system missing in one seed is left out."""
    import json
    import report
    users, floor = list(range(4)), [2, 2, 1, 3]
    ar = {'0': [1, 2, 1, 3], '1': [1, 1, 1, 3]}                # R@1 gain over the floor: 1/4 and 2/4
    for seed in ('0', '1'):
        folder = tmp_path / 'seeds' / seed
        folder.mkdir(parents=True)
        files = {'floor': floor, 'ar': ar[seed], **({'rl': floor} if seed == '0' else {})}
        for name, ranks in files.items():
            with open(folder / f'eval_{name}.json', 'w') as f:
                json.dump({'split': 'test', 'per_user': {'user': users, 'rank': ranks, 'valid': [True] * 4}}, f)
    report.main(str(tmp_path))
    rows = {r['name']: r for r in json.load(open(tmp_path / 'summary.json'))['seeds']}
    assert set(rows) == {'floor', 'ar'} and rows['ar']['vs'] == 'floor'
    assert rows['ar']['R@1']['mean'] == pytest.approx(0.625) and rows['ar']['R@1']['std'] == pytest.approx(0.125)
    assert rows['ar']['R@1_diff_mean'] == pytest.approx(0.375)
    assert rows['floor']['R@1_vs_ar_mean'] == pytest.approx(-0.375) and 'R@1_vs_ar_mean' not in rows['ar']
    # the interval resamples users, each with its mean difference over the seeds: -1, -0.5, 0, 0
    from metrics import bootstrap_mean
    expected = bootstrap_mean([-1, -0.5, 0, 0])
    assert rows['floor']['R@1_vs_ar_ci95'] == [expected['lo'], expected['hi']]
    # on 40 users the seeds' mean is resolved: seed 0 loses R@1 on users 0-9, seed 1 on users 0-19
    rec = lambda ranks: {'per_user': {'user': list(range(40)), 'rank': ranks}}
    seeds = [{'x': rec([2] * m + [1] * (40 - m)), 'ar': rec([1] * 40)} for m in (10, 20)]
    per_user = [-1.0] * 10 + [-0.5] * 10 + [0.0] * 20
    assert report.seed_mean_interval(seeds, 'x', 'ar')['R@1'] == [bootstrap_mean(per_user)[k] for k in ('lo', 'hi')]
    assert rows['ar']['validity'] == {'mean': 1.0, 'min': 1.0}
    assert 'Over seeds' in (tmp_path / 'tables.md').read_text()


def test_report_headline_reads_speed_from_the_same_checkpoints_batch_one_row(tmp_path):
    """The headline table in the paper's form: AR decodes 1 token per forward, a diffusion row shows its own
    tokens per forward, and the speedup is bench.json's batch-1 row of that evaluation (not batch 16's); the copy
    share sits beside them."""
    import json
    import report
    users = list(range(4))
    for name, decode, tpf in (('floor', None, None), ('ar', {'mode': 'ar'}, None), ('cft', {'mode': 'diffusion'}, 3.25),
                              ('rl', {'mode': 'diffusion'}, 3.25)):
        with open(tmp_path / f'eval_{name}.json', 'w') as f:
            json.dump({'split': 'test', 'decode': decode, 'tokens_per_forward': tpf,
                       'per_user': {'user': users, 'rank': [1, 2, 1, 3], 'valid': [True] * 4,
                                    'first_is_floor_first': [True, True, True, name not in ('cft', 'rl')]}}, f)
    rows = [{'accuracy_from': 'eval_cft.json', 'batch': b, 'speedup': up, 'block': 8, 'tau': 0.9, 'mode': 'diffusion',
             'ckpt': 'out/cft.pt', 'R@1': 0.5, 'validity': 1.0, 'tok_per_s': 1.0, 'tokens_per_forward': 3.25}
            for b, up in ((1, 2.5), (16, 0.4))]
    with open(tmp_path / 'bench.json', 'w') as f:
        json.dump({'device': 'cpu', 'torch': '-', 'commit': '-', 'forward_cost_ratio': 1.5, 'block': 8, 'rows': rows,
                   'same_weights_as': {'rl': 'cft'}}, f)  # RL kept its start: CFT's speed, not timed again
    report.main(str(tmp_path))
    text = (tmp_path / 'tables.md').read_text()
    head = text[text.index('## Headline'):text.index('## Accuracy')]
    assert '| AR teacher (GR2-style) | 0.5000 [' in head and '| 1.000 | 1.00 |  | 1.000 | 4 |' in head
    assert '| 1.000 | 3.25 | 2.50x | 0.500 | 4 |' in head and '0.40x' not in head  # users 1 and 3: the floor is wrong
    assert head.count('2.50x') == 2 and 'rl: the same weights as cft' in text


def test_frontier_decodes_each_stage_at_each_threshold_and_picks_tstar(pipeline):
    cwd, data = pipeline
    p = run('frontier.py', cwd, data, '--stages=naive,cft,rl,nothing', '--taus=(0.9, 0.5)', '--block=8')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'out/nothing.pt not found' in p.stdout
    fr = json.load(open(os.path.join(cwd, 'results', 'frontier.json')))
    assert [(r['stage'], r['tau']) for r in fr['rows']] == [(s, t) for s in ('naive', 'cft', 'rl') for t in (0.9, 0.5)]
    assert set(fr['parity_tpf']) == {'naive', 'cft', 'rl'} and os.path.exists(os.path.join(cwd, 'results', 'frontier.png'))
    for r in fr['rows']:
        assert r['n'] == fr['n'] and 0 <= r['validity'] <= 1 and r['tokens_per_forward'] > 0
    rl = [r for r in fr['rows'] if r['stage'] == 'rl']
    assert rl[0]['weights'] == rl[1]['weights'] and rl[0]['ckpt'] == 'out/rl.pt'
    same = json.load(open(os.path.join(cwd, 'results', 'eval_rl.json')))  # the pipeline decoded rl at tau 0.9
    assert abs(rl[0]['R@1'] - same['metrics']['R@1']) < 1e-12 and rl[0]['validity'] == same['validity']
    p = run('frontier.py', cwd, data, '--split=valid', '--stages=rl', '--taus=(0.9, 0.5)', '--choose=True')
    assert p.returncode == 0, p.stderr[-2000:]
    ts = json.load(open(os.path.join(cwd, 'results', 'tstar.json')))
    assert ts['tau'] in (0.9, 0.5) and ts['stage'] == 'rl' and len(ts['rows']) == 2 and ts['found_by']
    p = run('frontier.py', cwd, data, '--choose=True')
    assert p.returncode != 0 and '--split=valid' in p.stderr + p.stdout


def test_tstar_is_the_fastest_threshold_at_parity_and_a_miss_is_named():
    from frontier import choose_tstar, fastest_at_parity
    row = lambda tau, r1, valid, tpf: {'tau': tau, 'R@1': r1, 'validity': valid, 'tokens_per_forward': tpf}
    rows = [row(0.9, 0.372, 1.0, 8.0), row(0.7, 0.369, 0.995, 10.0), row(0.6, 0.371, 0.985, 11.0),
            row(0.5, 0.360, 0.999, 12.0)]
    assert choose_tstar(rows, ar_r1=0.373) == (rows[1], 'parity')      # 0.6 is not valid enough, 0.5 too far off
    assert fastest_at_parity(rows, 0.373, 0.02) == rows[3]
    chosen, how = choose_tstar(rows, ar_r1=0.378)                         # none at parity: within 0.01
    assert chosen == rows[1] and how.startswith('no threshold at parity: the fastest within')
    chosen, how = choose_tstar(rows, ar_r1=0.40)                          # none within 0.01: the best valid R@1
    assert chosen == rows[0] and 'best R@1 valid enough' in how
    chosen, how = choose_tstar([row(0.6, 0.37, 0.9, 11), row(0.7, 0.36, 0.95, 10)], ar_r1=0.37)
    assert chosen['tau'] == 0.7 and how.startswith('no threshold valid enough')


def test_the_stage_keeps_its_best_evaluation_not_its_last(tiny_data, tmp_path, monkeypatch):
    """training.Stage: the checkpoint on disk and the record are those of the best validation so far
    (common.is_better), not of the latest; a later, better one replaces them."""
    import common
    from common import Timer
    from conftest import tiny_model
    from train_cft import TrainCFTConfig
    from training import Stage
    monkeypatch.setattr(common, 'PROJECT', str(tmp_path))  # the stage's log and resume state go there
    record = lambda r1: {'R@1': r1, 'N@3': r1, 'validity': 1.0, 'tokens_per_forward': 4.0, 'floor_R@1': 0.1}
    run = Stage(TrainCFTConfig(out='out/kept.pt', block=4), tiny_model(tiny_data.vocab), tiny_data,
                torch.device('cpu'), Timer(), 'cft', block=4)
    on_disk = lambda: torch.load(tmp_path / 'out' / 'kept.pt', weights_only=True)['step']
    run.evaluate(1, known=record(0.5))
    run.evaluate(2, known=record(0.4))
    assert run.best['step'] == 1 and on_disk() == 1
    run.evaluate(3, known=record(0.6))
    assert run.best['step'] == 3 and on_disk() == 3
