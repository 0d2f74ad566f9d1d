"""A small GPT with one attention path: the caller passes the mask (causal, block-causal, anything).

Pre-norm transformer, rotary positions from per-example position ids (left padding shifts them),
tied input/output embeddings, and a static KV cache written at explicit columns, so the same forward serves
training, autoregressive decoding and block-diffusion decoding (and can be captured in a CUDA graph).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 12837     # input tokens: the data sets it (train_ar.py), 12,837 for Beauty
    n_out: int = 0              # output tokens: ids 0 .. n_out - 1 (0 = all); the response's alphabet (Vocab.n_out)
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0
    n_resp_pos: int = 0         # learned embeddings of the response index 0 .. n-1 (0 = none; see GPT.forward)
    slot0: int = 0              # the first list-slot token (Vocab.slot0) and the number of slots: with n_slots > 0
    n_slots: int = 0            # each prompt token gets an embedding of the candidate entry it is in (GPT.forward)
    trace_entries: tuple = ()   # the candidate entry (1 .. n_slots, 0 = none) of each response index, so that
                                # trace tokens get their entry's embedding too (reasoning.trace_entries)


class KVCache:
    """Per-layer keys and values over a fixed number of columns; forward writes the columns it is given."""

    def __init__(self, cfg, batch, n_cols, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, n_cols, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


def at_least_fp32(x):
    """x in at least float32: bf16 is raised, float64 kept (the gradient checks in tests/ run in it)."""
    return x if x.dtype == torch.float64 else x.float()


def rotary(pos, head_dim, base=10000.0):
    """The rotary angles of position ids (B, T) as unit complex numbers, one per channel pair: (B, 1, T, head_dim / 2).

    Rotary positions (not learned absolute ones): attention scores then depend on the distance between query and
    key, so 'the token just before', 'the candidate two entries up' are one pattern wherever they sit; measured
    here, a small model learned to copy candidates from the prompt about twice as fast as with learned positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angle = pos[:, None, :, None].float() * inv_freq
    return torch.polar(torch.ones_like(angle), angle)


def rotate(x, rot):
    """Rotate each channel pair (x1, x2) by its angle, (x1 cos - x2 sin, x1 sin + x2 cos), as one complex product:
    the textbook form in two operations instead of a dozen (at batch 1 a forward's time is its operation count)."""
    pairs = torch.view_as_complex(at_least_fp32(x).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, mask, rope, cache=None, layer=0, cols=None, rows=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        q, k = rotate(q, rope), rotate(k, rope)  # keys enter the cache already rotated by their own position
        if cache is not None:
            # write this forward's keys/values at each row's columns (B, T), then attend over the first S cached
            # columns, S the mask's width: the columns past every query's block are not read at all
            at = cols[:, None, :, None].expand(B, self.n_head, T, C // self.n_head)
            cache.k[layer].scatter_(2, at, k.to(cache.k.dtype))
            cache.v[layer].scatter_(2, at, v.to(cache.v.dtype))
            S = mask.shape[-1]
            k, v = cache.k[layer][:, :, :S].to(q.dtype), cache.v[layer][:, :, :S].to(q.dtype)
        if rows is not None:  # every row's keys and values are written; only these rows' queries are wanted
            q, mask = q[:, :, rows], mask[:, rows]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, q.shape[2], C)  # (B, T or len(rows), C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, rope, cache, layer, cols, rows=None):
        a = self.attn(self.ln1(x), mask, rope, cache, layer, cols, rows)
        x = (x if rows is None else x[:, rows]) + a
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wre = nn.Embedding(cfg.n_resp_pos + 1, cfg.n_embd) if cfg.n_resp_pos else None  # row 0: the prompt
        self.wee = nn.Embedding(cfg.n_slots + 1, cfg.n_embd) if cfg.n_slots else None  # row 0: outside the list
        # the entry of each `at` (forward): 0 the prompt, j + 1 trace index j, the last row (0) past the trace
        self.register_buffer('resp_entry', torch.tensor([0, *cfg.trace_entries, 0]), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith('proj.weight'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, pos, mask, cache=None, cols=None, start=None, rows=None):
        """Hidden states (B, T, C). idx, pos: (B, T); mask: (B, T, S) bool, True = may attend, where S = T
        without a cache and with one the cache's first S columns (then `cols` (B, T) says where each row's tokens
        go: rows of a batch may decode different blocks);
        start (B,): the position id of each row's first response token (its prompt's length). rows (a slice of T):
        only these positions' hidden states are returned, and the last layer computes the others only as far as
        its keys and values (the cache needs them, nothing reads their outputs).

        With n_resp_pos, a response token also gets an embedding of its index in the response. The trace's
        layout is fixed (index j is always, say, the third weight of the second entry), but rotary positions
        only tell distances: a fully masked block of a diffusion model otherwise has to count its way from
        `<think>` to know what each position holds, and decoded its first block nearly one token per step.

        With n_slots, a prompt token also gets an embedding of the candidate entry it is in (the last slot token
        before it; the prompt lists c1 .. cN in order), and a trace token the same embedding of the entry it
        writes (`trace_entries`, one layout for every instance). The trace writes each statistic's weight, a
        lookup of that candidate's statistic in the prompt: the shared embedding lets a trace token find its
        candidate's fields without a slot token in the trace naming it. Without the embedding, a 2-layer model
        found its place from slot tokens and took a neighbour's statistic for 1.4% of the weights; with no slot
        tokens and no embedding it lost its place (FINDINGS, "One score per entry")."""
        x = self.wte(idx)
        at = torch.zeros_like(pos) if start is None else (pos - start[:, None] + 1).clamp(min=0)
        if self.wre is not None:  # start None: no response (mid-training's item sequences), every token row 0
            x = x + self.wre(at.clamp(max=self.config.n_resp_pos))
        if self.wee is not None:  # a forward that holds prompt tokens holds the whole prompt (the prefill)
            slot = idx - self.config.slot0 + 1
            entry = torch.where((slot >= 1) & (slot <= self.config.n_slots), slot, 0).cummax(1).values
            x = x + self.wee(torch.where(at == 0, entry, self.resp_entry[at.clamp(max=len(self.resp_entry) - 1)]))
        rope = rotary(pos, self.config.n_embd // self.config.n_head)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, cache, i, cols, rows if i == len(self.blocks) - 1 else None)
        return self.ln_f(x)

    def head(self, h, fp32=False, full=False):
        """Logits over the output tokens (ids < n_out, tied to their input embeddings), or over every token with
        full=True (mid-training's next-item prediction). A response holds only specials, slots and evidence
        buckets, ~100 of the 12.8k input tokens: projecting onto items and attributes it never writes would cost
        as much as the body at this size, and a block step would cost 3x an AR step on a CPU instead of 1.5x.
        Decoding asks for fp32 so that confidences are not bf16-rounded."""
        w = self.wte.weight if full or not self.config.n_out else self.wte.weight[:self.config.n_out]
        if fp32:
            with torch.autocast(h.device.type, enabled=False):
                return F.linear(at_least_fp32(h), at_least_fp32(w))
        return F.linear(h, w)

    def new_cache(self, batch, n_cols, device, dtype=torch.float32):
        return KVCache(self.config, batch, n_cols, device, dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


class CachedForward:
    """Model forwards over one static KV cache for a batch of left-padded prompts (P columns) and responses
    (R columns) in blocks of `block`. A call names each row's query columns (B, T), so rows may decode different
    blocks, and how many leading columns its queries can see at most (`n_keys`): attention reads no column past
    it. Which column may see which is fixed by the padding and the blocks, so set_pad() tabulates it once per batch
    and a call only looks it up. With graphs=True (CUDA) each input width is captured once as a CUDA graph and
    replayed (at this model size kernel-launch overhead, not arithmetic, sets decode time); a graph has fixed
    shapes, so it attends over every column and its rows never leave (keep). A runner can be reused for another
    batch of the same shape (set_pad; every column is rewritten before it is read)."""

    def __init__(self, model, pad, P, R, block, graphs=False):
        self.model, self.graphs, self.captured = model, graphs, {}
        self.P, self.R, self.block = P, R, block
        self.dtype = torch.bfloat16 if pad.device.type == 'cuda' else None  # bf16 on CUDA, exact fp32 elsewhere
        self.cache = None
        self.set_pad(pad)

    def set_pad(self, pad):
        """Start a batch: its padding fixes each column's position and what each column's query may see."""
        n = self.P + self.R
        blk, valid = column_blocks(pad, self.P, self.R, self.block)
        table = dict(sees=attention_mask(blk, valid, torch.arange(n, device=pad.device)),  # (B, n, n)
                     pos=positions(pad, n), start=self.P - pad, rows=torch.arange(len(pad), device=pad.device))
        if self.graphs and self.cache is not None:  # the captured graphs read these very tensors: overwrite them
            for key, value in table.items():
                getattr(self, key).copy_(value)
            return
        self.__dict__.update(table)
        if self.cache is None or self.cache.k.shape[1] != len(pad):
            self.cache = self.model.new_cache(len(pad), n, pad.device, dtype=self.dtype or torch.float32)

    def keep(self, rows):
        """Only these rows (indices into the current batch) decode on: the others leave the cache and the work."""
        assert not self.graphs, "a captured graph has a fixed batch"
        self.cache.k, self.cache.v = self.cache.k[:, rows], self.cache.v[:, rows]
        self.sees, self.pos, self.start = self.sees[rows], self.pos[rows], self.start[rows]
        self.rows = torch.arange(len(rows), device=rows.device)

    def run(self, idx, qcols, n_keys, rows=None):
        # No autocast weight cache under graphs: the cache's bf16 weight copies are freed when the caller's autocast
        # ends, so a graph captured reading them replays on memory that is reused or, after the next capture
        # empties CUDA's cache, released (bench captures every runner before it replays any).
        ctx = (torch.autocast('cuda', dtype=self.dtype, cache_enabled=not self.graphs) if self.dtype is not None
               else nullcontext())
        with ctx:
            mask = self.sees[self.rows[:, None], qcols, :n_keys]       # (B, T, n_keys)
            return self.model(idx, self.pos.gather(1, qcols), mask, self.cache, qcols, self.start, rows)

    def __call__(self, idx, qcols, n_keys=None, rows=None):
        """Hidden states of idx (B, T) written at columns qcols (B, T), at `rows` (a slice of T; None: all); their
        queries see at most the first n_keys columns (None: all)."""
        if not self.graphs:
            return self.run(idx, qcols, n_keys or self.P + self.R, rows)
        key = (idx.shape[1], None if rows is None else (rows.start, rows.stop))  # a slice is not hashable
        if key not in self.captured:
            static_idx, static_cols = idx.clone(), qcols.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: same inputs, so the cache writes are what the real step writes
                    self.run(static_idx, static_cols, self.P + self.R, rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.run(static_idx, static_cols, self.P + self.R, rows)
            self.captured[key] = (graph, static_idx, static_cols, out)
        graph, static_idx, static_cols, out = self.captured[key]
        static_idx.copy_(idx)
        static_cols.copy_(qcols)
        graph.replay()
        return out


def attention_mask(blk, valid, q_cols):
    """Block-causal attention over columns: a query may see a key iff the key's block <= the query's block and
    the key is real (not padding). blk, valid: (B, S) per column (see column_blocks); q_cols: (T,) the query
    columns. With one token per block (every prompt token is a block of its own) this is causal attention.
    A query always sees itself, so padded rows stay finite. Returns (B, T, S)."""
    S = blk.shape[1]
    m = (blk[:, None, :] <= blk[:, q_cols, None]) & valid[:, None, :]
    return m | (torch.arange(S, device=blk.device)[None, None, :] == q_cols[None, :, None])


def column_blocks(pad, P, R, block):
    """Block ids and validity of the columns of [left-padded prompt (P) ; response (R)]: prompt column c is block
    c, response column P + j is block P + j // block. Returns (block_id (B, P+R), valid (B, P+R))."""
    B = pad.shape[0]
    col = torch.arange(P + R, device=pad.device)
    blk = torch.where(col < P, col, P + (col - P) // block).expand(B, -1)
    valid = col[None, :] >= pad[:, None]
    return blk, valid


def response_hidden(model, prompt, pad, resp):
    """Causal (AR) hidden states that predict each response token given the prompt and the tokens before it:
    (B, R, C). Column P-1+j predicts response token j (the AR token shift)."""
    B, P = prompt.shape
    R = resp.shape[1]
    x = torch.cat([prompt, resp[:, :-1]], 1)                       # (B, P+R-1)
    blk, valid = column_blocks(pad, P, R - 1, 1)
    h = model(x, positions(pad, P + R - 1), attention_mask(blk, valid, torch.arange(P + R - 1, device=x.device)),
              start=P - pad)
    return h[:, P - 1:]


def positions(pad, n_cols):
    """Per-example position ids: left padding shifts them so that every prompt starts at 0."""
    col = torch.arange(n_cols, device=pad.device)
    return (col[None, :] - pad[:, None]).clamp(min=0)
