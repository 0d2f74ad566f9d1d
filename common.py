"""Small helpers every script shares: config parsing, device, Ctrl-C, checkpoint selection, logs, plots,
result files. (Checkpoint files themselves: checkpoints.py.)"""
import ast
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class StageSettings:
    """Flags every training stage shares: checkpoint selection, evaluation size, time box, seed, device."""
    min_validity: float = 0.95   # checkpoint selection: see is_better
    eval_n: int = 0              # validation instances decoded at each evaluation (0 = all)
    eval_batch: int = 512
    time_limit: float = 0.0      # seconds; > 0: stop training early (then evaluate and save as usual)
    seed: int = 0
    device: str = 'auto'
    out: str = 'out/model.pt'    # each stage names its own
    max_steps: int = 100
    eval_every: int = 20

    def evaluation_due(self, step, timer):
        """After 0-based training step `step`: (evaluate now, stop after it). Every `eval_every` steps, at the
        last step, and once `time_limit` seconds are spent, which also ends the run."""
        out_of_time = self.time_limit > 0 and timer() > self.time_limit
        if out_of_time:
            tqdm.write(f"time limit {self.time_limit:.0f}s reached at step {step + 1}: a last evaluation, then stop")
        return (step + 1) % self.eval_every == 0 or step == self.max_steps - 1 or out_of_time, out_of_time

    def problem(self):
        """What is wrong with the flags, or None: counts >= 1, amounts >= 0, the device, a writable --out, and a
        decoding setting (block, tau, k) checked as decode.py's. Checked before any data is loaded."""
        values = dataclasses.asdict(self)
        for key in COUNTS:
            if key in values and values[key] < 1:
                return f"--{key}={values[key]}: must be >= 1"
        for key in AMOUNTS:
            if key in values and values[key] < 0:
                return f"--{key}={values[key]}: must be >= 0"
        if 'lr' in values and not values['lr'] > 0:
            return f"--lr={values['lr']}: the learning rate must be > 0"
        if not 0 <= self.min_validity <= 1:
            return f"--min_validity={self.min_validity}: a share, in [0, 1]"
        return (device_problem(self.device) or writable_problem('out', values['out']) or results_problem()
                or decoding_problem(values.get('block', 0), values.get('tau', 0.9), values.get('k', 0)))


COUNTS = ('max_steps', 'eval_every', 'batch_size', 'eval_batch', 'n_prompts', 'group', 'micro_batch', 'n_layer',
          'n_head', 'n_embd')
AMOUNTS = ('mid_steps', 'warmup', 'block_warmup', 'eval_n', 'time_limit', 'weight_decay', 'validity_weight',
           'certainty_weight', 'cft_weight', 'kl_weight', 'format_weight', 'l2r_states')


def device_problem(name):
    """What is wrong with a --device value here, or None."""
    if name in ('auto', 'cpu'):
        return None
    if name == 'cuda' or name.startswith('cuda:'):
        return None if torch.cuda.is_available() else f"--device={name}: CUDA is not available here; use --device=cpu"
    if name == 'mps':
        mps = getattr(torch.backends, 'mps', None)
        return None if mps is not None and mps.is_available() else "--device=mps: MPS is not available here"
    return f"--device={name!r}: use auto, cpu, cuda (cuda:N) or mps"


def unwritable(folder):
    """Why `folder` cannot take a new file (created if missing), or None: found before any work, not after it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        return e.strerror
    return None


def writable_problem(flag, path):
    """Whether the folder of an output file can be written."""
    folder = os.path.dirname(project_path(path)) or '.'
    why = unwritable(folder)
    return why and f"--{flag}={path}: cannot write to {folder} ({why}); choose another --{flag}"


def results_problem():
    """Whether the results folder (results_path) can be written: a stage's record and curves go there after
    training, an evaluation's file after decoding."""
    folder = os.path.dirname(results_path('-'))
    why = unwritable(folder)
    return why and f"cannot write results to {folder} ({why}): set RESULTS_DIR to a writable folder"


def same_file_problem(flag, path, out):
    """A stage must never overwrite the checkpoint it starts from."""
    if os.path.realpath(project_path(path)) == os.path.realpath(project_path(out)):
        return f"--{flag}={path} is also --out: the run would overwrite its own parent; pass another --out"
    return None


def parse_config(cls, argv=None):
    """Build a dataclass from `--key=value` flags (values parsed with ast.literal_eval), reject unknown keys.
    Where the device is not CUDA, a stage's CPU_SETTING (a small model and short runs that fit a 2-core CPU) fills
    in the flags not given, so `python train_ar.py` and each later stage run the CPU recipe there as they are."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise SystemExit(f"bad argument {arg!r}: use --key=value (keys: {', '.join(fields)})")
        key, raw = arg[2:].split('=', 1)
        if key not in fields:
            raise SystemExit(f"unknown option --{key}; known: {', '.join(fields)}")
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else None
        if isinstance(default, str):
            value = raw  # strings are taken as written
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise SystemExit(f"--{key}: cannot read {raw!r} as a Python literal")
        if isinstance(default, bool) and not isinstance(value, bool):
            raise SystemExit(f"--{key} takes True or False, got {raw!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise SystemExit(f"--{key} expects {type(default).__name__}, got {raw!r}")
        values[key] = value
    small = getattr(cls, 'CPU_SETTING', None)
    device = values.get('device', fields['device'].default) if small else None
    if small and not device_problem(device) and pick_device(device).type != 'cuda':
        filled = ' '.join(f'--{k}={v}' for k, v in small.items() if k not in values)
        print(f"no CUDA device: the CPU setting ({filled}; a flag given on the command line wins)")
        values = {**small, **values}
    cfg = cls(**values)
    problem = cfg.problem() if hasattr(cfg, 'problem') else None  # a config may check its values' ranges
    if problem:
        raise SystemExit(f"error: {problem}")
    return cfg


def start_stage(cls):
    """The first lines of every training stage: its flags (checked and printed), the seeded generators (torch's
    global one and a numpy one for batch order), the device and the stage's timer."""
    signal.signal(signal.SIGINT, stopped_before_training)  # until the stage's own handler (Interrupt) takes over
    cfg = parse_config(cls)
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    return cfg, np.random.default_rng(cfg.seed), pick_device(cfg.device), Timer()


def stopped_before_training(signum, frame):
    raise SystemExit("interrupted while the stage was starting (before its first training step); "
                     "rerun the same command to start it")


def threshold_label(setting):
    """A decoding threshold in words, from a record with 'tau' and perhaps 'tau_slot': 'tau 0.9', or 'tau 0.3,
    slots 0.9' where the list slots commit at a threshold of their own."""
    return f"tau {setting['tau']}" + (f", slots {setting['tau_slot']}" if setting.get('tau_slot') else '')


def decoding_problem(block, tau, k, tau_slot=0.0):
    """What is wrong with a decoding setting, or None: B >= 0 (0 = AR), k >= 0, and for the threshold rule
    0 < tau <= 1 (tau > 1 would commit one token per step: say --k=1) and 0 <= tau_slot <= 1 (0: the slots too
    at tau)."""
    if block < 0 or k < 0:
        return f"--block={block} --k={k}: both must be >= 0 (block 0 decodes autoregressively)"
    if k == 0 and not 0 < tau <= 1:
        return f"--tau={tau}: the confidence threshold lies in (0, 1]; one token per step is --k=1"
    if not 0 <= tau_slot <= 1 or (tau_slot and k):
        return f"--tau_slot={tau_slot}: a threshold in (0, 1] for the threshold rule (--k=0), or 0 for none"
    return None


def print_config(cfg):
    print(f"{type(cfg).__name__}: " + ' '.join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))


# ----------------------------------------------------------------------------- device

def pick_device(name='auto'):
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def autocast(device):
    """bf16 autocast on CUDA, exact fp32 elsewhere."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return nullcontext()


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- a training run: Ctrl-C, selection

class Interrupt:
    """Ctrl-C during a resumable stage's training: the first one lets the step in flight finish, and the stage
    then saves its resume state and exits (`stop_if_asked`); rerunning the same command continues from there.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.asked = False
        signal.signal(signal.SIGINT, self._ask)

    def _ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        tqdm.write("interrupted: finishing this step, then saving (Ctrl-C again to stop at once)")

    def stop_if_asked(self, save, out, step):
        """After a training step: if Ctrl-C was pressed, save() the resume state and exit."""
        if self.asked:
            save()
            raise SystemExit(f"interrupted after step {step}: state saved to {project_path(out)}.resume; "
                             f"rerun the same command to continue")


def is_better(new, best, min_validity):
    """Checkpoint selection on validation. A model at or above the validity bar beats one below it; above the
    bar R@1 (then N@3) decides, below it validity does. (Invalid output is scored as the pre-ranker's order,
    so a mostly invalid model scores about the floor and would otherwise win over a valid model just below it,
    and be useless as a teacher.)"""
    key = lambda r: ((True, r['R@1'], r['N@3']) if r['validity'] >= min_validity else (False, r['validity'], 0.0))
    return best is None or key(new) > key(best)


# ----------------------------------------------------------------------------- logs, plots, results

class JsonlLog:
    """Append one JSON object per line; every scalar of a run ends up here. A resumed run passes the number of
    lines the log had when its state was saved (`keep`): the rows written after it, which the resumed run
    writes again, are cut, so every step appears once."""

    def __init__(self, path, keep=None):
        path = project_path(path)
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        self.path = path
        if keep is None and os.path.exists(path):
            os.remove(path)
        elif keep is not None and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()[:keep]
            with open(path, 'w') as f:
                f.writelines(lines)

    def lines(self):
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for _ in f)

    def write(self, **row):
        with open(self.path, 'a') as f:
            f.write(json.dumps({k: (float(v) if hasattr(v, 'item') else v) for k, v in row.items()}) + '\n')


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(jsonl_path, png_path, keys, title):
    """One panel per key, x = step; rows that lack a key are skipped for that panel."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = read_jsonl(jsonl_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r['step'], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='.' if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png_path) or '.', exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def git_commit():
    """The checkout's commit (-dirty with uncommitted code: results/, which the run rewrites, and docs aside);
    GIT_COMMIT names it where there is no .git (a copy of the tree on another machine)."""
    if os.environ.get('GIT_COMMIT'):
        return os.environ['GIT_COMMIT']
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=CODE)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.', ':(exclude)results',
                                ':(exclude)*.md'], capture_output=True, text=True, timeout=5, cwd=CODE).stdout.strip()
        return out.stdout.strip() + ('-dirty' if dirty else '') if out.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


CODE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.environ.get('WORK_DIR') or CODE  # WORK_DIR moves every relative path elsewhere (the tests' scratch runs)


def project_path(path):
    """A relative path is the project's (data/beauty, out/ar.pt, results/...), wherever the script is run from."""
    return path if os.path.isabs(path) else os.path.join(PROJECT, path)


def results_path(name):
    """Where a result file goes: RESULTS_DIR, else the setting's folder: results/cpu/ on a machine without CUDA
    (the CPU setting), results/ with it, so a CPU run never mixes with the GPU numbers."""
    folder = os.environ.get('RESULTS_DIR') or ('results' if torch.cuda.is_available() else 'results/cpu')
    return project_path(os.path.join(folder, name))


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def command_line():
    return 'python ' + ' '.join(sys.argv)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self):
        return time.time() - self.t0
