"""A tiny synthetic 5-core data set written in the real file format, and a tiny model, for CPU tests."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_beauty import DataConfig, BeautyData  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from reasoning import trace_entries  # noqa: E402


def write_synthetic(folder, n_users=120, n_items=40, n_attrs=12, seed=0):
    """Users walk mostly along item chains (so co-occurrence finds their next item), items have 1-4 attributes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(5, 12))
        start = int(rng.integers(1, n_items + 1))
        items, cur = [], start
        while len(items) < n:
            if cur not in items:
                items.append(cur)
            cur = (cur % n_items) + 1 if rng.random() < 0.7 else int(rng.integers(1, n_items + 1))
        lines.append(f"{u} " + ' '.join(map(str, items)))
    with open(os.path.join(folder, 'Beauty.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    attrs = {str(i): sorted(set(int(a) for a in rng.integers(1, n_attrs + 1, size=int(rng.integers(1, 5)))))
             for i in range(1, n_items + 1)}
    with open(os.path.join(folder, 'Beauty_item2attributes.json'), 'w') as f:
        json.dump(attrs, f)
    return folder


@pytest.fixture(scope='session')
def tiny_dir(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp('beauty')))


@pytest.fixture(scope='session')
def tiny_data(tiny_dir, tmp_path_factory):
    return BeautyData(DataConfig(data_dir=tiny_dir, cache_dir=str(tmp_path_factory.mktemp('cache'))))


def tiny_model(vocab, seed=0, n_layer=2, n_embd=32, full_head=False, n_resp_pos=40, entries=True):
    """A tiny GPT over the vocabulary, with the response-sized output head the stages use (or the full one),
    response-index embeddings (fewer than a response's tokens: the clamp at the last index is exercised too) and
    candidate-entry embeddings, large enough to move the argmax, so that the equivalence tests see them."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab.size, n_out=0 if full_head else vocab.n_out, n_layer=n_layer, n_head=2,
                    n_embd=n_embd, dropout=0.0, n_resp_pos=n_resp_pos, slot0=vocab.slot0,
                    n_slots=vocab.n_cand if entries else 0,
                    trace_entries=tuple(trace_entries(vocab.n_cand)) if entries else ())
    model = GPT(cfg).eval()
    if entries:
        torch.nn.init.normal_(model.wee.weight, std=0.5)
    return model
