"""Chunked prefill: a long prompt's K/V written to the paged cache a group of layers per iteration.

    prefill = ChunkedPrefill(net, engine_config)
    if prefill.applies(seq):                   # pending_append longer than prefill_chunk_tokens
        n, apply = prefill.chunk(seq, pool)    # the next group of layers (or whole blocks)
        apply()                                # -> seq.pending_append is None once all are done

The engine (engine/engine.py) runs one such chunk per scheduler iteration, beside the denoising
step of every other running sequence, so a 32k-token prompt no longer holds every stream's next
token for its whole prefill: the stall a running stream sees is one chunk, not the prompt.

Why groups of layers and not token ranges (vLLM's chunked prefill): in every family served here
the prompt is one bidirectional segment (model/diffusion.segment_ids: segment 0 attends to
itself both ways, in training and in model/sampling.generate). A token chunk [a, b) written
before [b, c) would see only earlier keys, which changes the K/V of the whole prompt and so every
later token. Layer l's keys of all prompt tokens depend only on layer l-1's hidden states of all
prompt tokens, so running layers lo..hi-1 over the whole prompt, keeping the hidden state
[1, n, d] between iterations, writes exactly the K/V of the one-pass prefill (tests/engine/
test_chunked_prefill.py pins logits and tokens). Each chunk runs k = max(1, chunk_tokens x
n_layers // n) layers, i.e. about prefill_chunk_tokens x n_layers token-layers, the same work as
a chunk_tokens-token chunk through every layer; the granularity stops at one layer, so the
stall drops by at most n_layers (5 for tiny-coder, 32 for an 8B model). The price is the hidden
state between chunks: n x d_model values (32k x 4096 bf16 = 256 MiB at 8B shapes).

The chunk is one row with no padding, so the paged context attends unmasked (PagedAttention's
`unmasked`): a masked [1, 1, n, n] call at n = 32k would cost 4.4 GB on the CPU. Families whose
blocks are aligned to position 0 (cfg.block_align "zero": LLaDA2.x, SDAR) attend their prompt
block-causally, so for them a chunk is a token range of whole blocks through every layer
(`token_chunk`: exact, and as fine-grained as prefill_chunk_tokens); a write that does not
start on a block boundary takes layer groups, keeping the same block-causal mask.
Tensor-parallel leaders (engine/tensor_parallel.TPLeader) forward only whole-model calls, and
writes whose logits are read (Fast-dLLM v2's block opener): both prefill in one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.kv_pool import PagedKVPool
from engine.sequence import Sequence
from model.lora import find_bank
from model.transformer import DiffusionTransformer


def layers_per_chunk(n_tokens: int, n_layers: int, chunk_tokens: int) -> int:
    """Layers one chunk runs over an n_tokens write: ~chunk_tokens x n_layers token-layers."""
    return max(1, min(n_layers, chunk_tokens * n_layers // max(n_tokens, 1)))


class ChunkedPrefill:
    def __init__(self, net: torch.nn.Module, econf: EngineConfig):
        self.net, self.econf = net, econf
        self.cfg = net.cfg
        self.device = next(net.parameters()).device
        # only our own network takes layers=(lo, hi); a TP leader forwards whole calls
        self.supported = isinstance(net, DiffusionTransformer)

    def applies(self, seq: Sequence) -> bool:
        """Whether seq's pending cache write goes in chunks (longer than prefill_chunk_tokens)."""
        chunk = self.econf.prefill_chunk_tokens
        if chunk is None or not self.supported or seq.pending_append is None:
            return False
        if seq.ar_position() is not None:  # its write must end in next-token logits (batch.py)
            return False
        start, end = seq.pending_append
        return end - start > chunk

    def token_chunk(self, seq: Sequence) -> int | None:
        """Tokens of the next chunk when it can be a token range: the family's prompt is
        block-causal (cfg.block_align "zero") and the write starts on a block boundary, so a
        chunk of whole blocks sees exactly the keys it sees in one pass. None: layer groups."""
        bl = seq.params.block_length
        start, _ = seq.pending_append
        if self.cfg.block_align != "zero" or start % bl or seq.prefill_layer:
            return None
        return max(bl, self.econf.prefill_chunk_tokens // bl * bl)

    def chunk(self, seq: Sequence, pool: PagedKVPool) -> tuple[int, Callable[[], None]]:
        """Run the next chunk of seq's pending write, storing its K/V: a group of layers over
        the whole write, or (token_chunk) the next whole blocks through every layer.
        -> (token-steps: the tokens x the fraction of layers run, apply). Computes first,
        applies after (engine/batch.py's contract): a retried chunk rewrites the same slots
        from the same hidden state."""
        if self.token_chunk(seq) is not None:
            return self._token_chunk(seq, pool, self.token_chunk(seq))
        dev = self.device
        start, end = seq.pending_append
        n, L = end - start, self.cfg.n_layers
        lo = seq.prefill_layer
        hi = min(L, lo + layers_per_chunk(n, L, self.econf.prefill_chunk_tokens))
        ids = torch.tensor([seq.append_ids()], dtype=torch.long, device=dev)  # [1, n]
        pos = (start + torch.arange(n, device=dev)).clamp(max=self.cfg.max_seq_len - 1)[None]
        valid = torch.ones(1, n, dtype=torch.bool, device=dev)
        # blocks aligned to position 0 (cfg.block_align "zero": LLaDA2.x, SDAR): the prompt's
        # whole blocks attend block-causally, as StepRunner.cache_write writes them
        bl = seq.params.block_length
        chunk_blocks = [bl if n > bl else 0] if self.cfg.block_align == "zero" else None
        ctx = pool.context([seq.pages], [seq.cached_len], valid, append=True, query_lens=[n],
                           chunk_blocks=chunk_blocks)
        bank = find_bank(self.net)
        if bank is not None:  # the row's LoRA adapter (model/lora.py), as in engine/batch.py
            bank.set_rows([seq.lora_slot])
        out = self.net(ids, positions=pos, t=torch.zeros(1, device=dev), attn=ctx,
                       logits_slice=slice(0, 0), hidden=seq.prefill_hidden, layers=(lo, hi))

        def apply() -> None:
            if hi < L:
                seq.prefill_hidden, seq.prefill_layer = out, hi  # out: [1, n, d]
                return
            seq.prefill_hidden, seq.prefill_layer = None, 0
            seq.cached_len += n
            seq.pending_append = None

        return n * (hi - lo) // L, apply

    def _token_chunk(self, seq: Sequence, pool: PagedKVPool, size: int
                     ) -> tuple[int, Callable[[], None]]:
        """Block-aligned families: positions start .. start + m - 1 (m = size, or what is left)
        through every layer, block-causal among themselves over everything cached before."""
        dev = self.device
        start, end = seq.pending_append
        m = min(size, end - start)
        bl = seq.params.block_length
        ids = torch.tensor([seq.append_ids()[:m]], dtype=torch.long, device=dev)  # [1, m]
        pos = (start + torch.arange(m, device=dev)).clamp(max=self.cfg.max_seq_len - 1)[None]
        valid = torch.ones(1, m, dtype=torch.bool, device=dev)
        ctx = pool.context([seq.pages], [seq.cached_len], valid, append=True, query_lens=[m],
                           chunk_blocks=[bl if m > bl else 0])
        bank = find_bank(self.net)
        if bank is not None:  # the row's LoRA adapter (model/lora.py), as in engine/batch.py
            bank.set_rows([seq.lora_slot])
        self.net(ids, positions=pos, t=torch.zeros(1, device=dev), attn=ctx,
                 logits_slice=slice(0, 0))

        def apply() -> None:
            seq.cached_len += m
            seq.pending_append = None if start + m >= end else (start + m, end)

        return m, apply
