"""The batched forwards of one scheduler iteration, over sequences with their own settings.

    runner = StepRunner(net, pool, engine_config)
    n, apply = runner.cache_write(seqs)     # prefill prompts / re-encode finished blocks (t = 0)
    apply()                                 # commits the result (cached lengths)
    n, outcome, apply = runner.denoise(seqs)  # one denoising step of every sequence's active block
    apply()                                 # writes the new blocks into the canvases

Each call computes first and touches sequence state only in `apply`, so a failed batch can be
retried row by row without half-applied state (engine/engine.py isolates a failing request that
way). `n` is the real (unpadded) tokens the forward processed: the token-steps of the stats.

Block-causal models: a step runs only the active blocks, [B, Lb] right-padded to the longest, each
row attending to its own cached prompt + finished blocks through the paged pool. Full-attention
models (LLaDA, Dream): a step runs prompt + whole canvas + suffix of every row, right-padded, pad
keys masked; the active block's logits are gathered per row. Rows with `params.full_cache`
(Fast-dLLM's approximate cache, model/sampling.py) use the paged pool instead: at a block's first
step the same whole-row forward also stores every position's K/V in the row's pages (eager, an
append), and later steps run only the row's cached span over the pool (prefix: keys [0, q0);
dual: every slot but the recomputed span, as PagedAttention `hidden`). One step therefore runs up
to three forwards (uncached rows, refreshing rows, cached rows), each committed before the next.
The commit is model/sampling's `commit_step` over the batch, after model/rules.py's banned and
first-token rules, which is why the tokens equal the reference's. Uncached full-attention rows
with classifier-free guidance (params.cfg_scale > 0, LLaDA) add their unconditional copy (prompt
and suffix masked) to the same forward; their logits are guided before the commit.

With EngineConfig.cuda_graphs the denoising forward runs at static shapes through
engine/cuda_graphs.py (CUDA graphs on CUDA, the same padded path uncaptured elsewhere): rows
padded to graph_batch_buckets(), the query length to length_buckets, the cache window to a
multiple of graph_window (masked), the logits rows M to length_buckets (the extra rows are
unmasked positions, which the commit never picks). Batches past the largest row or length
bucket take the eager path. Cached full-attention steps (read-only) take it too; refreshes
(they write the pool) stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import EngineConfig, bucket
from engine.cuda_graphs import StaticForward
from engine.kv_pool import PagedKVPool
from engine.sequence import Sequence
from kernels.attention import Ragged
from model.lora import find_bank
from model.rules import ban_tokens, constrain_first_position
from model.sampling import (
    aligned_block_start,
    commit_step,
    entropy_bound_of,
    guided_logits,
    stop_is_final,
)
from model.transformer import DenseAttention


class StepRunner:
    def __init__(self, net: torch.nn.Module, pool: PagedKVPool | None, econf: EngineConfig):
        self.net, self.pool, self.econf = net, pool, econf
        self.cfg = net.cfg
        self.device = next(net.parameters()).device
        # Padding tokens must never read as masks (commit_step treats mask_id as "to predict").
        self.fill_id = next(t for t in (self.cfg.pad_id, self.cfg.eos_id, 1, 2)
                            if t is not None and t != self.cfg.mask_id)
        self.static = StaticForward(net, econf.max_graphs) if econf.cuda_graphs else None
        self._graph_rows = econf.graph_batch_buckets()
        self.lora = find_bank(net)  # LoRA slots (model/lora.py), or None
        self._lora_version = self.lora.version if self.lora is not None else 0

    def _lora_rows(self, seqs: list[Sequence], n_rows: int, static: bool = False,
                   extra: tuple[int, ...] = ()) -> None:
        """Tell the LoRA hooks each row's adapter slot for the next forward: the sequences',
        -1 for padding rows up to n_rows, then `extra` (rows appended after the padding). A
        static forward runs the hooks whatever the rows (its graph must do the same work every
        replay); graphs are dropped when the hooks' tensors change (model/lora.py `version`)."""
        if self.lora is None:
            return
        self.lora.set_rows([s.lora_slot for s in seqs] + [-1] * (n_rows - len(seqs))
                           + list(extra), always=static)
        if self.static is not None and self.lora.version != self._lora_version:
            self._lora_version = self.lora.version
            self.static = StaticForward(self.net, self.econf.max_graphs)

    def _lengths(self, n: int, static: bool = False) -> int:
        """Columns of a forward of rows up to n tokens: padded to a length bucket only for the
        static (graph) path; eager forwards run n. Padding every eager row to a bucket cost the
        engine 1.2-1.6x the reference loop's time at batch 1 on a full-attention model (a
        64 + 128-token row ran as 256)."""
        if not static:
            return n
        return min(bucket(n, self.econf.length_buckets), max(n, self.cfg.max_seq_len))

    def _rows(self, n: int) -> int:
        return bucket(n, self.econf.batch_buckets)

    def _static_shapes(self, rows: int, longest: int) -> bool:
        """Whether a denoising batch runs the static (graph) path: graph mode is on and the
        batch fits the largest row and length buckets."""
        return self.static is not None and rows <= self._graph_rows[-1] \
            and longest <= self.econf.length_buckets[-1]

    def _window(self, longest_cache: int) -> int:
        g = self.econf.graph_window
        return -(-longest_cache // g) * g

    # --- cache writes ---------------------------------------------------------------------
    def cache_write(self, seqs: list[Sequence]) -> tuple[int, Callable[[], None]]:
        """Encode every row's pending_append as clean tokens (t = 0) and store its K/V.
        No batch padding here: a dummy row would need pages to write into."""
        dev, B = self.device, len(seqs)
        chunks = [s.append_ids() for s in seqs]
        lens = [len(c) for c in chunks]
        # one row: no padding, so the write attends unmasked (kv_pool's `unmasked`; a masked
        # long prompt costs ~6x the time and O(n^2) memory on the CPU)
        L = lens[0] if B == 1 else self._lengths(max(lens))
        ids = torch.full((B, L), self.fill_id, dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            ids[i, :lens[i]] = torch.tensor(c, dtype=torch.long, device=dev)
        start = torch.tensor([s.pending_append[0] for s in seqs], device=dev)
        ar = torch.arange(L, device=dev)
        pos = (start[:, None] + ar).clamp(max=self.cfg.max_seq_len - 1)  # [B, L]
        valid = ar[None, :] < torch.tensor(lens, device=dev)[:, None]  # [B, L]
        # blocks aligned to position 0 (cfg.block_align "zero"): a prompt's whole blocks attend
        # block-causally (a write of one block, a finished one, needs no mask)
        chunk_blocks = None
        if self.cfg.block_align == "zero":
            bls = [s.params.block_length for s in seqs]
            chunk_blocks = [bl if n > bl else 0 for bl, n in zip(bls, lens, strict=True)]
        ctx = self.pool.context([s.pages for s in seqs], [s.cached_len for s in seqs], valid,
                                append=True, query_lens=lens if B == 1 else None,
                                chunk_blocks=chunk_blocks)
        # logits_slice(0, 0): the LM head is not needed for a cache write, except for rows whose
        # next block opens with an autoregressive token (Fast-dLLM v2): the logits after each
        # row's last written token (index lens[i]: shifted models' next-token state), [B, 1, V]
        ar_at = [s.ar_position() for s in seqs]
        want_ar = any(a is not None for a in ar_at)
        sl = torch.tensor(lens, device=dev)[:, None] if want_ar else slice(0, 0)
        self._lora_rows(seqs, B)
        logits = self.net(ids, positions=pos, t=torch.zeros(B, device=dev), attn=ctx,
                          logits_slice=sl)
        ar_tokens = None
        if want_ar:
            ban_tokens(logits, [s.banned for s in seqs])
            for i, s in enumerate(seqs):
                if ar_at[i] == 0 and s.params.first_token_ids:  # token healing, canvas pos 0
                    constrain_first_position(logits[i, 0], s.params.first_token_ids)
            ar_tokens = logits[:, 0].argmax(-1)  # [B]: argmax at every temperature (its code)

        def apply() -> None:
            for i, (s, n) in enumerate(zip(seqs, lens, strict=True)):
                s.cached_len += n
                s.pending_append = None
                if ar_tokens is not None and ar_at[i] is not None:
                    s.canvas[ar_at[i]] = ar_tokens[i]

        return sum(lens), apply

    # --- one denoising step ---------------------------------------------------------------
    def denoise(self, seqs: list[Sequence]) -> tuple[int, list[tuple[int, int]], Callable[[], None]]:
        """-> (tokens processed, [(masks left in the block, tokens committed)] per row, apply).

        Only the masked positions of each row get logits, compacted to [B, M, V] (M = most
        masks in a row) in position order: commit_step reads nothing else, and after a block's
        first step most of it is committed (at 8 steps per block, 44% of the LM head and of
        the vocabulary work saved). Same commits as on the whole block: the masked positions
        keep their relative order, so its stable ranking breaks ties the same way.

        Full-attention rows run up to three forwards, each followed by its commit (rows are
        independent): rows without a cache (the whole row), full-cache rows at a refresh (the
        whole row, storing its K/V), full-cache rows mid-block (their cached span only)."""
        if self.cfg.attention == "block_causal":
            groups = [(seqs, self._block_causal_logits)]
        else:
            plain = [s for s in seqs if s.full_cache == "none"]
            refresh = [s for s in seqs if s.full_cache != "none" and s.refreshing]
            cached = [s for s in seqs if s.full_cache != "none" and not s.refreshing]
            groups = [(g, fn) for g, fn in ((plain, self._full_logits),
                                            (refresh, self._refresh_logits),
                                            (cached, self._cached_logits)) if g]
        n_total, outcomes, applies = 0, {}, []
        for rows, logits_fn in groups:
            logits, order, start, pos, counts, n = logits_fn(rows)
            # commit before the next forward: a static forward's logits live in a shared buffer
            outcome, apply = self._commit(rows, logits, order, start, pos, counts)
            n_total += n
            outcomes.update({id(s): o for s, o in zip(rows, outcome, strict=True)})
            applies.append(apply)

        def apply_all() -> None:
            for apply in applies:
                apply()

        return n_total, [outcomes[id(s)] for s in seqs], apply_all

    def _commit(self, seqs: list[Sequence], logits: torch.Tensor, order: torch.Tensor,
                start: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor):
        """commit_step over rows whose masked positions' logits are [B, M, V]; order [B, M] the
        logits' columns in the forward's row, start [B] the block's first column there, pos
        [B, M] absolute positions. -> (outcome per row, apply)."""
        dev, mask_id = self.device, self.cfg.mask_id
        M = logits.shape[1]
        in_row = torch.arange(M, device=dev)[None, :] < counts[:, None]  # [B, M]
        ban_tokens(logits, [s.banned for s in seqs])
        rel = order - start[:, None]  # [B, M] position in the block
        for i, s in enumerate(seqs):
            if s.first_token_constrained:  # canvas position 0 is masked, so rel[i, 0] == 0
                constrain_first_position(logits[i, 0], s.params.first_token_ids)
        plans = [s.step_plan() for s in seqs]
        p = [s.params for s in seqs]

        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        thr = [x.confidence_threshold if x.confidence_threshold is not None else float("nan")
               for x in p]
        # the authors' exact samplers (model/sampling.py): scores on the nucleus, LLaDA's
        # EOS/EoT-free confidence, Fast-dLLM v2's sub-blocks; None when no row needs them
        scored = [x.scores_sampled() for x in p]
        sub_block = None
        if any(x.sub_block_length for x in p):
            starts = col([aligned_block_start(len(s.prompt) + s.block_span()[0],
                                              s.params.block_length, self.cfg.block_align)
                          for s in seqs], torch.long)
            widths = col([x.sub_block_length or x.block_length for x in p], torch.long)
            sub_block = (pos - starts[:, None]) // widths[:, None]  # [B, M]
        new_c, committed_c = commit_step(
            logits, torch.where(in_row, mask_id, self.fill_id), pos,
            col([pl[0] for pl in plans], torch.long), col([pl[1] for pl in plans], torch.long),
            mask_id=mask_id, rules=[x.remasking for x in p],
            temperature=col([x.temperature for x in p], torch.float32),
            top_p=col([x.top_p for x in p], torch.float32), seeds=col([x.seed for x in p], torch.long),
            threshold=col(thr, torch.float32), last_step=col([pl[2] for pl in plans], torch.bool),
            defer_ids=[list(x.defer_token_ids) for x in p],
            sampled=col(scored, torch.bool) if any(scored) else None,
            conf_inf_ids=[list(x.confidence_inf_token_ids) for x in p], sub_block=sub_block,
            floor_schedule=col([x.threshold_floor == "schedule" for x in p], torch.bool)
            if any(x.threshold_floor == "schedule" for x in p) else None,
            entropy_bound=col([entropy_bound_of(x) if x.remasking == "entropy_bound"
                               else float("nan") for x in p], torch.float32)
            if any(x.remasking == "entropy_bound" for x in p) else None)
        n_committed = committed_c.sum(1)
        lows = [s.block_span()[0] for s in seqs]
        masks_left = counts - n_committed
        if any(x.stop_in_block and s.stop_ids for x, s in zip(p, seqs, strict=True)):
            # a committed stop token with nothing masked before it ends the block: reported as
            # no masks left, decided on the device so the one host copy below stays the only one
            final = self._stop_final(seqs, lows, rel, in_row, new_c, committed_c)
            masks_left = torch.where(final, 0, masks_left)
        outcome = [tuple(r) for r in torch.stack([masks_left, n_committed], 1).tolist()]

        def apply() -> None:
            for i, (s, lo) in enumerate(zip(seqs, lows, strict=True)):
                hit = committed_c[i]
                s.canvas[lo + rel[i][hit]] = new_c[i][hit]

        return outcome, apply

    def _stop_final(self, seqs: list[Sequence], lows: list[int], rel: torch.Tensor,
                    in_row: torch.Tensor, new_c: torch.Tensor,
                    committed_c: torch.Tensor) -> torch.Tensor:
        """bool [B]: rows with params.stop_in_block whose answer, with this step's commits,
        holds a stop token with nothing masked before it (model/sampling.stop_is_final, as
        the reference decides it). Columns [B, M] of the compacted step: rel their position in
        the block, in_row the real ones; new_c / committed_c this step's result."""
        final = torch.zeros(len(seqs), dtype=torch.bool, device=self.device)
        for i, (s, lo) in enumerate(zip(seqs, lows, strict=True)):
            if not (s.params.stop_in_block and s.stop_ids):
                continue
            n = min(s.block_span()[1], s.params.max_new_tokens)  # the answer up to this block
            answer = torch.cat([s.canvas[:n], s.canvas.new_zeros(1)])  # slot n: a dummy
            at = lo + rel[i]
            idx = torch.where(in_row[i] & (at < n), at, n)  # [M] canvas index of each column
            answer.scatter_(0, idx, torch.where(committed_c[i], new_c[i], answer.gather(0, idx)))
            final[i] = stop_is_final(answer[None, :n], sorted(s.stop_ids), self.cfg.mask_id)[0]
        return final

    def _select_masked(self, ids: torch.Tensor, region: torch.Tensor, B: int,
                       static: bool = False):
        """Masked positions of each row inside `region` (bool [Bp, L]), in order, as the
        logits_slice index [Bp, M]; and the counts [B]. static: M rounded up to a length
        bucket (<= L); the extra columns are unmasked positions, never committed."""
        masked = (ids == self.cfg.mask_id) & region
        counts = masked.sum(1)
        M = int(counts[:B].max())
        if static:
            M = min(bucket(max(M, 1), self.econf.length_buckets), ids.shape[1])
        order = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)[:, :M]  # [Bp, M]
        return order, counts[:B]

    def _block_causal_logits(self, seqs: list[Sequence]):
        dev, B = self.device, len(seqs)
        spans = [s.block_span() for s in seqs]
        # an aligned row's block 0 runs after the prompt's tail, in the same block (its head)
        heads = [s.block_head for s in seqs]
        widths = [hi - lo + h for (lo, hi), h in zip(spans, heads, strict=True)]
        static = self._static_shapes(B, max(widths))
        Bp = bucket(B, self._graph_rows) if static else self._rows(B)
        heads += [0] * (Bp - B)
        lens = widths + [1] * (Bp - B)  # dummy rows: one valid token
        L = self._lengths(max(lens), static)
        ids = torch.full((Bp, L), self.fill_id, dtype=torch.long, device=dev)
        for i, (s, (lo, hi)) in enumerate(zip(seqs, spans, strict=True)):
            h = heads[i]
            if h:
                ids[i, :h] = torch.tensor(s.prompt[len(s.prompt) - h:], dtype=torch.long,
                                          device=dev)
            ids[i, h:h + hi - lo] = s.canvas[lo:hi]
        start = torch.tensor([len(s.prompt) + lo - heads[i]
                              for i, (s, (lo, _)) in enumerate(zip(seqs, spans, strict=True))]
                             + [0] * (Bp - B), device=dev)
        ar = torch.arange(L, device=dev)
        pos = (start[:, None] + ar).clamp(max=self.cfg.max_seq_len - 1)  # [Bp, L]
        n_valid = torch.tensor(lens, device=dev)
        valid = ar[None, :] < n_valid[:, None]  # [Bp, L]
        head_t = torch.tensor(heads, device=dev)  # [Bp]
        in_block = valid & (ar[None, :] >= head_t[:, None])  # [Bp, L]: the canvas part
        # t: the active block's masked fraction, as the reference conditions each step
        t = ((ids == self.cfg.mask_id) & in_block).sum(1).float() / \
            in_block.sum(1).clamp_min(1).float()
        tables = [s.pages for s in seqs] + [[] for _ in range(Bp - B)]
        cached = [s.cached_len for s in seqs] + [0] * (Bp - B)
        # static: read the cache over a window of graph_window multiples (the tail masked)
        window = self._window(max(cached)) if static else None
        # one unpadded row sees every key: SDPA runs unmasked (kv_pool's `unmasked`)
        ctx = self.pool.context(tables, cached, valid, append=False, window=window,
                                query_lens=lens if Bp == 1 and not static else None)
        order, counts = self._select_masked(ids, in_block, B, static)
        self._lora_rows(seqs, Bp, static)
        net = self.static if static else self.net
        logits = net(ids, positions=pos, t=t, attn=ctx, logits_slice=order)[:B]  # [B, M, V]
        order = order[:B]
        return logits, order, head_t[:B], pos[:B].gather(1, order), counts, sum(lens[:B])

    def _full_rows(self, seqs: list[Sequence], Bp: int, static: bool = False):
        """Prompt + canvas + suffix of every row, right-padded to [Bp, L] (dummy rows: one
        token). -> ids, lens, t (None without time conditioning), start and end [Bp] of the
        active block in the row, in_block bool [Bp, L]."""
        dev, B = self.device, len(seqs)
        rows = [self._full_row(s) for s in seqs]
        lens = [len(r) for r in rows] + [1] * (Bp - B)
        L = self._lengths(max(lens), static)
        ids = torch.full((Bp, L), self.fill_id, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        t = self._canvas_t(seqs, Bp)
        spans = [s.block_span() for s in seqs]
        start = torch.tensor([len(s.prompt) + lo for s, (lo, _) in zip(seqs, spans, strict=True)]
                             + [0] * (Bp - B), device=dev)
        end = torch.tensor([len(s.prompt) + hi for s, (_, hi) in zip(seqs, spans, strict=True)]
                           + [0] * (Bp - B), device=dev)
        ar = torch.arange(L, device=dev)
        in_block = (ar[None, :] >= start[:, None]) & (ar[None, :] < end[:, None])  # [Bp, L]
        return ids, lens, t, start, in_block

    def _full_row(self, s: Sequence) -> torch.Tensor:
        dev = self.device
        return torch.cat([torch.tensor(s.prompt, dtype=torch.long, device=dev), s.canvas,
                          torch.tensor(s.suffix, dtype=torch.long, device=dev)])

    def _canvas_t(self, seqs: list[Sequence], Bp: int) -> torch.Tensor | None:
        """Time-conditioned full models: the whole canvas's masked fraction [Bp], as the
        reference conditions every forward (dummy rows 0)."""
        if not self.cfg.time_conditioning:
            return None
        return torch.stack([(s.canvas == self.cfg.mask_id).float().mean() for s in seqs]
                           + [torch.zeros((), device=self.device)] * (Bp - len(seqs)))

    def _full_logits(self, seqs: list[Sequence]):
        B = len(seqs)
        longest = max(s.full_len for s in seqs)
        # rows with classifier-free guidance add their unconditional copies: eager shapes
        guided = [i for i, s in enumerate(seqs) if s.params.cfg_scale > 0]
        static = self._static_shapes(B, longest) and not guided
        Bp = bucket(B, self._graph_rows) if static else self._rows(B)
        ids, lens, t, start, in_block = self._full_rows(seqs, Bp, static)
        ar = torch.arange(ids.shape[1], device=self.device)
        valid_keys = ar[None, :] < torch.tensor(lens, device=self.device)[:, None]  # [Bp, L]
        order, counts = self._select_masked(ids, in_block, B, static)
        n_real = sum(lens[:B])
        if guided:  # the unconditional rows are real work too: counted in the token-steps
            ids, valid_keys, order, t, lens = self._with_unconditional(
                seqs, guided, ids, valid_keys, order, t, lens)
            n_real += sum(lens[Bp:])
        # positions default to 0..L-1 per row, as the reference's unpadded rows
        self._lora_rows(seqs, Bp, static, extra=tuple(seqs[i].lora_slot for i in guided))
        net = self.static if static else self.net
        mask = valid_keys[:, None, None, :]  # [Bp (+G), 1, 1, L]: pad keys hidden
        # eager: the rows as lengths too, so kernels/attention.py may run flash-attn varlen;
        # static shapes keep the mask alone (a graph binds only the mask buffer)
        rows = None if static else Ragged(valid_keys, max(lens), sum(lens), query_valid=valid_keys)
        # one unpadded row: nothing to hide, unmasked SDPA (the reference's own call)
        attn = DenseAttention(None) if ids.shape[0] == 1 and not static else \
            DenseAttention(mask, rows=rows)
        logits = net(ids, t=t, attn=attn, logits_slice=order)  # [Bp (+G), M, V]
        if guided:
            g = torch.tensor(guided, device=self.device)
            scale = torch.tensor([seqs[i].params.cfg_scale for i in guided], device=self.device)
            cond = logits[:B].clone()
            cond[g] = guided_logits(logits[g], logits[Bp:], scale)
            logits = cond
        logits = logits[:B]  # [B, M, V]
        order = order[:B]
        return logits, order, start[:B], order, counts, n_real

    def _with_unconditional(self, seqs, guided, ids, valid_keys, order, t, lens):
        """Append, for each row i in `guided`, its unconditional copy: the same row with every
        prompt and suffix token masked (LLaDA's cfg: x[prompt_index] = mask_id), reading the same
        positions' logits. -> ids, valid_keys, order, t, lens with G more rows at the end."""
        dev = self.device
        g = torch.tensor(guided, device=dev)
        ar = torch.arange(ids.shape[1], device=dev)
        p0 = torch.tensor([len(seqs[i].prompt) for i in guided], device=dev)[:, None]
        p1 = p0 + torch.tensor([seqs[i].canvas.shape[0] for i in guided], device=dev)[:, None]
        condition = ((ar[None, :] < p0) | (ar[None, :] >= p1)) & valid_keys[g]  # [G, L]
        uncond = torch.where(condition, self.cfg.mask_id, ids[g])
        t = None if t is None else torch.cat([t, t[g]])
        return (torch.cat([ids, uncond]), torch.cat([valid_keys, valid_keys[g]]),
                torch.cat([order, order[g]]), t, lens + [lens[i] for i in guided])

    def _refresh_logits(self, seqs: list[Sequence]):
        """Full-cache rows at a block's first step: the uncached forward over the whole row,
        storing every position's K/V into the row's pages from slot 0 (model/cache.py's
        refresh). Eager (a cache write), no dummy rows (they would need pages); rewriting the
        same slots makes a retried batch harmless."""
        B = len(seqs)
        ids, lens, t, start, in_block = self._full_rows(seqs, B)
        ar = torch.arange(ids.shape[1], device=self.device)
        valid = ar[None, :] < torch.tensor(lens, device=self.device)[:, None]  # [B, L]
        ctx = self.pool.context([s.pages for s in seqs], [0] * B, valid, append=True)
        order, counts = self._select_masked(ids, in_block, B)
        self._lora_rows(seqs, B)
        logits = self.net(ids, t=t, attn=ctx, logits_slice=order)  # [B, M, V]
        return logits, order, start, order, counts, sum(lens)

    def _cached_logits(self, seqs: list[Sequence]):
        """Full-cache rows mid-block: each row runs its cached span [q0, q1) (model/schedule
        .cached_query_span) at positions q0.., reading the refresh's K/V from its pages:
        prefix rows the slots [0, q0), dual rows every slot but [q0, q1) (`hidden`). Read-only,
        so it may take the static (graph) path."""
        dev, B = self.device, len(seqs)
        spans = [s.cached_span() for s in seqs]
        lens = [q1 - q0 for q0, q1 in spans]
        static = self._static_shapes(B, max(lens))
        Bp = bucket(B, self._graph_rows) if static else self._rows(B)
        lens += [1] * (Bp - B)  # dummy rows: one valid token, no cache
        L = self._lengths(max(lens), static)
        ids = torch.full((Bp, L), self.fill_id, dtype=torch.long, device=dev)
        for i, (s, (q0, q1)) in enumerate(zip(seqs, spans, strict=True)):
            ids[i, :q1 - q0] = self._full_row(s)[q0:q1]
        q0s = torch.tensor([q0 for q0, _ in spans] + [0] * (Bp - B), device=dev)
        ar = torch.arange(L, device=dev)
        pos = (q0s[:, None] + ar).clamp(max=self.cfg.max_seq_len - 1)  # [Bp, L]
        valid = ar[None, :] < torch.tensor(lens, device=dev)[:, None]  # [Bp, L]
        dual = [s.full_cache == "dual" for s in seqs]
        # prefix: the cache read is [0, q0); dual: all of the row, its recomputed span hidden
        cached = [s.full_len if d else q0 for s, d, (q0, _) in zip(seqs, dual, spans, strict=True)]
        cached += [0] * (Bp - B)
        hidden = None
        if any(dual):
            hidden = [span if d else (0, 0) for d, span in zip(dual, spans, strict=True)]
            hidden += [(0, 0)] * (Bp - B)
        tables = [s.pages for s in seqs] + [[] for _ in range(Bp - B)]
        window = self._window(max(cached)) if static else None
        ctx = self.pool.context(tables, cached, valid, append=False, window=window,
                                hidden=hidden)
        # the active block in the call's columns
        start = torch.tensor([len(s.prompt) + s.block_span()[0] - q0
                              for s, (q0, _) in zip(seqs, spans, strict=True)]
                             + [0] * (Bp - B), device=dev)
        end = start + torch.tensor([hi - lo for lo, hi in (s.block_span() for s in seqs)]
                                   + [0] * (Bp - B), device=dev)
        in_block = (ar[None, :] >= start[:, None]) & (ar[None, :] < end[:, None])  # [Bp, L]
        order, counts = self._select_masked(ids, in_block, B, static)
        self._lora_rows(seqs, Bp, static)
        net = self.static if static else self.net
        logits = net(ids, positions=pos, t=self._canvas_t(seqs, Bp), attn=ctx,
                     logits_slice=order)[:B]  # [B, M, V]
        order = order[:B]
        return logits, order, start[:B], pos[:B].gather(1, order), counts, sum(lens[:B])
