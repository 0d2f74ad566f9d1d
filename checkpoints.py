"""What a stage writes and what a later one reads back: checkpoints (weights and their record, written atomically),
the resume state of an interrupted run, and the checks that a file is the checkpoint a caller expects."""
import dataclasses
import hashlib
import os

import torch

from common import git_commit, project_path, write_json
from model import GPT, GPTConfig


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path, model, run_cfg, stage, parent=None, step=0, metrics=None, extra=None):
    """Write tensors and plain values only, atomically (temp file, then rename), and beside it the same record
    without the weights as readable JSON (out/ar.pt -> out/ar.json: stage, parent, configs, metrics, commit)."""
    path = project_path(path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    ckpt = {
        'model': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'model_cfg': dataclasses.asdict(model.config),
        'run_cfg': dataclasses.asdict(run_cfg) if dataclasses.is_dataclass(run_cfg) else dict(run_cfg),
        'stage': stage,
        'parent': parent,
        'step': step,
        'metrics': metrics or {},
        'extra': extra or {},
    }
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    meta = {k: v for k, v in ckpt.items() if k != 'model'}
    write_json(os.path.splitext(path)[0] + '.json', dict(meta, commit=git_commit(), weights=os.path.basename(path)))


def load_checkpoint(path, stages=None, device='cpu'):
    """Load a checkpoint written by save_checkpoint; `stages` lists the stages this caller accepts."""
    path = project_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found: run the stage that writes it first "
                              f"(see README: train_ar.py -> train_cft.py -> train_opd.py -> train_rl.py)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated or foreign file; torch's own text runs to lines of unpickling advice
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it and rerun "
                              f"its stage") from e
    if not isinstance(ckpt, dict) or 'stage' not in ckpt or 'model_cfg' not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project; delete it and rerun its stage")
    if stages is not None and ckpt['stage'] not in stages:
        raise CheckpointError(f"{path} holds a '{ckpt['stage']}' checkpoint, expected one of {list(stages)}")
    model = GPT(GPTConfig(**ckpt['model_cfg']))
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # weights of another shape than the recorded config (an edited or mixed-up file)
        raise CheckpointError(f"{path}: its weights do not match its recorded model config "
                              f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                              f"delete it and rerun its stage") from e
    return model.to(device), ckpt


def weights_digest(model):
    """A short digest of a model's weights: which model a result belongs to, whatever file it was read from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_data_matches(ckpt, run_cfg, path):
    """Two checkpoints read together (OPD's teacher and student, show.py's pair) must have been trained on the
    same data: the same protocol settings (where the data came from aside) and, where recorded, the same digests
    of the split and the lists. `run_cfg`: the other checkpoint's record."""
    mine, theirs = ckpt['run_cfg'].get('data', {}), run_cfg.get('data', {})
    for key in sorted(set(mine) & set(theirs) - {'data_dir', 'raw_dir', 'cache_dir'}):
        if mine[key] != theirs[key]:
            raise CheckpointError(f"{path} was trained with data {key}={mine[key]!r}, the other checkpoint with "
                                  f"{theirs[key]!r}: pass checkpoints of one run (or retrain {path} on that data)")
    a, b = ckpt['run_cfg'].get('data_digests'), run_cfg.get('data_digests')
    if a and b and a != b:
        raise CheckpointError(f"{path} was trained on other data than the other checkpoint (digests {a} against "
                              f"{b}): pass checkpoints of one run (or retrain {path} on that data)")


def save_resume(out, model, opt, run_cfg, step, state):
    """Training state at an evaluation point (weights, optimizer, step, selection state, RNG), written
    atomically beside the checkpoint, so that an interrupted run continues where it was when rerun."""
    out = project_path(out)
    tmp = out + '.resume.tmp'
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict(), 'run_cfg': resume_key(run_cfg), 'step': step,
                'state': state, 'torch_rng': torch.get_rng_state()}, tmp)
    os.replace(tmp, out + '.resume')


def load_resume(out, model, opt, run_cfg):
    """The saved state of an interrupted run of this same configuration, loaded into model and opt, or None."""
    path = project_path(out) + '.resume'
    if not os.path.exists(path):
        set_aside_other_run(out, run_cfg)
        return None
    try:
        saved = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # cut short by a full disk or a killed machine
        saved = None
    if not isinstance(saved, dict) or not {'model', 'opt', 'run_cfg', 'step', 'state', 'torch_rng'} <= saved.keys():
        raise SystemExit(f"error: {path} is not a resume state this stage wrote (damaged or another file); "
                         f"delete it to start the run afresh")
    if saved['run_cfg'] != resume_key(run_cfg):
        set_aside_other_run(out, run_cfg, force=True)
        return None
    model.load_state_dict(saved['model'])
    opt.load_state_dict(saved['opt'])
    torch.set_rng_state(saved['torch_rng'])
    print(f"resuming from {path} at step {saved['step']}")
    return saved


def set_aside_other_run(out, run_cfg, force=False):
    """A run of another configuration left its files at `out` (checkpoint, its .json record, resume state):
    rename them to <name>.prev.<ext> so that the new run mixes nothing with them and loses nothing. `force`:
    the resume state is known to be another configuration's."""
    out = project_path(out)
    stem = os.path.splitext(out)[0]
    if not force:
        if not os.path.exists(out):
            return
        try:
            recorded = torch.load(out, map_location='cpu', weights_only=True)['run_cfg']
        except Exception:
            return  # not ours to judge: load_checkpoint names the problem when a stage reads it
        if resume_key(recorded) == resume_key(run_cfg):
            return
    moved = []
    for src, dst in ((out, stem + '.prev.pt'), (stem + '.json', stem + '.prev.json'),
                     (out + '.resume', stem + '.prev.pt.resume')):
        if os.path.exists(src):
            os.replace(src, dst)
            moved.append(os.path.basename(dst))
    if moved:
        print(f"note: {out} was written by another configuration of this stage; set aside as {', '.join(moved)}")


def finish_resume(out):
    out = project_path(out)
    if os.path.exists(out + '.resume'):
        os.remove(out + '.resume')


def resume_key(run_cfg):
    """What must match for a resume: everything but how long we are willing to wait."""
    d = dataclasses.asdict(run_cfg) if dataclasses.is_dataclass(run_cfg) else dict(run_cfg)
    return {k: v for k, v in d.items() if k not in ('time_limit', 'device')}
