"""CUDA graphs for decode steps: the one place graphs are captured and replayed.

Decode at small batch is launch-bound: a Llama layer is ~10 kernels, so a 32-layer model
issues ~350 launches per token. Replaying a captured graph issues them all at once. One
graph per padded batch size; every graph reads the same static input buffers (a graph
replays fixed addresses), padding rows write no KV (slot -1, sequence slot -1) and attend to
one position.
The attention grid is sized for `max_model_len`, so no replay needs a host sync.
"""
from __future__ import annotations

import torch

from bitfold.attention.base import AttentionMetadata
from bitfold.kernels import _triton
from bitfold.models.base import StepContext


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8, max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    return sorted({min(s, max_num_seqs) for s in sizes})


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, batch_sizes: list[int], max_model_len: int, block_size: int,
                 pdl_rows: int = 0):
        """`pdl_rows`: graphs of up to this many rows launch their Triton kernels with
        programmatic dependent launch (kernels/_triton.py; the caller checked support)."""
        self.model, self.pdl_rows = model, pdl_rows
        self.sizes = sorted(batch_sizes)
        n, dev = self.sizes[-1], next(model.parameters()).device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.seq_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs],
                                     self.cu_seqlens[: bs + 1], max_q_len=1, max_context_len=max_model_len,
                                     seq_slots=self.seq_slots[:bs])
            ctx = StepContext(self.positions[:bs], meta, kv_caches, backend)
            _triton.PDL = bs <= pdl_rows  # read at launch: the captured graph keeps it
            try:
                for _ in range(2):  # compile Triton kernels and warm cuBLAS outside the capture
                    model.compute_logits(model(self.input_ids[:bs], ctx))
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.logits[bs] = model.compute_logits(model(self.input_ids[:bs], ctx))
            finally:
                _triton.PDL = False
            pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Inputs as the eager path builds them (B rows; meta.block_tables [B, nb] with nb <= the
        static width); returns float32 logits [B, vocab] (a view valid until the next run)."""
        B = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slot_mapping[:B].copy_(meta.slot_mapping)
        self.slot_mapping[B:bs].fill_(-1)
        self.block_tables[:B, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.context_lens[:B].copy_(meta.context_lens)
        self.context_lens[B:bs].fill_(1)
        if meta.seq_slots is not None:
            self.seq_slots[:B].copy_(meta.seq_slots)
        self.seq_slots[B:bs].fill_(-1)
        self.graphs[bs].replay()
        return self.logits[bs][:B]
