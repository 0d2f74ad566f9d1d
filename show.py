"""See one re-ranking: a test user's prompt, then the trace and ranking that the AR teacher and a block-diffusion
checkpoint write for it, side by side, with the step of its block at which each block-decoded token was
committed.

    python show.py                                   # the first test user, out/ar.pt against out/cft.pt
    python show.py --user=42 --diffusion=out/rl.pt --tau=0.6    # --user: the id in Beauty.txt
    python show.py --index=7 --split=valid
    python show.py --history="120 431 87"           # a history typed in (item ids), the pre-ranker's list for it
    python show.py --history="120 431 87" --cands="5 9 12 40 41 77 300 301 302 999"   # and a list typed in

A block-decoded token is shown as `token:step`; a block's tokens with the same step were committed by one
forward. `*` marks the target's slot (the target is never in the prompt or the trace: it only scores); a typed-in
history has no target.
"""
import os
from dataclasses import dataclass

import torch

from common import parse_config, device_problem, decoding_problem, pick_device, project_path
from checkpoints import load_checkpoint, CheckpointError, check_data_matches
from data_beauty import DataError, collate
from diffusion import generate_ar, generate_block
from evaluation import load_data_for
from metrics import parse_answer, target_rank


@dataclass
class ShowConfig:
    ar: str = 'out/ar.pt'
    diffusion: str = 'out/cft.pt'   # '' : the AR teacher only
    user: int = -1                  # a user id of the data file (its first column); -1: --index
    index: int = 0
    split: str = 'test'
    history: str = ''               # item ids, oldest first: a typed-in history instead of a split's instance
    cands: str = ''                 # with --history: N item ids, the list to re-rank (default: the pre-ranker's)
    tau: float = 0.9
    data_dir: str = 'data/beauty'
    device: str = 'auto'

    def problem(self):
        if self.split not in ('train', 'valid', 'test'):
            return f"--split={self.split!r}: use train, valid or test"
        for name in ('history', 'cands'):
            if not all(w.isdigit() for w in getattr(self, name).split()):
                return f"--{name}={getattr(self, name)!r}: item ids separated by spaces, e.g. --{name}=\"120 431 87\""
        if self.cands and not self.history:
            return "--cands needs --history (the list is re-ranked for a history)"
        return device_problem(self.device) or decoding_problem(1, self.tau, 0)


def file_user_ids(data):
    """The user id of each line of the data file (its first column): the split numbers users by line, from 0."""
    path = os.path.join(project_path(data.cfg.data_dir), f'{data.cfg.name}.txt')
    with open(path) as f:
        return [int(row.split(maxsplit=1)[0]) for row in f]


def pick_instance(split, cfg, ids):
    if cfg.user >= 0:
        line = ids.index(cfg.user) if cfg.user in ids else -1
        found = [i for i, u in enumerate(split.users) if int(u) == line]
        if not found:
            raise SystemExit(f"error: user {cfg.user} has no {cfg.split} instance (its target is not in the "
                             f"pre-ranker's list, or the data file has no such user id); try --index=0")
        return found[0]
    if not 0 <= cfg.index < len(split):
        raise SystemExit(f"error: --index={cfg.index}: the {cfg.split} split has {len(split)} instances")
    return cfg.index


def show_tokens(vocab, toks, target_slot, steps=None, block=0):
    """One line per block of `block` tokens (one line per entry-sized chunk of 24 for AR), each `token[:step]`."""
    words = [vocab.token_str(t) + ('*' if t == target_slot else '') + (f":{steps[j]}" if steps is not None else '')
             for j, t in enumerate(toks)]
    width = block or 24
    return '\n'.join(f"  [{a:3d}] " + ' '.join(words[a:a + width]) for a in range(0, len(words), width))


def typed_split(data, cfg):
    """The typed-in history (and list) as a one-instance Split (BeautyData.typed_instance)."""
    split = data.typed_instance([int(w) for w in cfg.history.split()], [int(w) for w in cfg.cands.split()] or None)
    print("candidates: " + ' '.join(f"c{j + 1}=i{c}" for j, c in enumerate(split.cands[0])))
    return split


def outcome(vocab, toks, target):
    ranking = parse_answer(toks, vocab)
    if ranking is None:
        return "invalid (scored as the pre-ranker's order)"
    where = '' if target is None else f"; the target at rank {target_rank(ranking, target)}"
    return f"ranking {' '.join(f'c{i + 1}' for i in ranking)}{where}"


def main():
    cfg = parse_config(ShowConfig)
    device = pick_device(cfg.device)
    try:
        teacher, tck = load_checkpoint(cfg.ar, stages=['ar'], device=device)
        data = load_data_for(tck, cfg.data_dir)
        student, sck = (load_checkpoint(cfg.diffusion, stages=['cft', 'opd', 'rl'], device=device) if cfg.diffusion
                        else (None, None))
        if sck is not None:
            check_data_matches(sck, tck['run_cfg'], cfg.diffusion)
    except (CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")
    vocab = data.vocab
    if cfg.history:
        try:
            split, i = typed_split(data, cfg), 0
        except DataError as e:
            raise SystemExit(f"error: {e}")
        target_slot, target = None, None
        print(f"a typed-in history of {len(cfg.history.split())} items (no target)")
    else:
        split = data.splits[cfg.split]
        ids = file_user_ids(data)
        i = pick_instance(split, cfg, ids)
        target_slot, target = vocab.slot(split.target[i]), split.target[i]
        print(f"{cfg.split} instance {i}, user {ids[int(split.users[i])]}; the target is c{split.target[i] + 1}")
    batch = collate(split, [i], vocab, device=device)
    max_resp = len(split.responses[i]) + 48
    print("prompt:\n" + show_tokens(vocab, split.prompts[i].tolist(), target_slot))
    with torch.no_grad():
        out, length = generate_ar(teacher.eval(), batch['prompt'], batch['pad'], max_resp, vocab)
    ar = out[0, :int(length[0])].tolist()
    print(f"\nAR teacher ({cfg.ar}), {len(ar)} tokens, one forward each:\n" + show_tokens(vocab, ar, target_slot))
    print("  " + outcome(vocab, ar, target))
    if student is not None:
        block = sck['run_cfg']['block']
        with torch.no_grad():
            res = generate_block(student.eval(), batch['prompt'], batch['pad'], -(-max_resp // block) * block,
                                 vocab, block=block, tau=cfg.tau)
        n = int(res['lengths'][0])
        toks, steps = res['tokens'][0, :n].tolist(), res['steps'][0, :n].tolist()
        print(f"\n{sck['stage'].upper()} ({cfg.diffusion}), B = {block}, tau {cfg.tau}: {n} tokens in "
              f"{int(res['n_forwards'][0])} forwards ({n / int(res['n_forwards'][0]):.2f} per forward):\n"
              + show_tokens(vocab, toks, target_slot, steps, block))
        print("  " + outcome(vocab, toks, target))
        same = sum(a == b for a, b in zip(ar, toks))
        print(f"  {same} of {len(ar)} tokens as the AR teacher wrote them")


if __name__ == '__main__':
    main()
