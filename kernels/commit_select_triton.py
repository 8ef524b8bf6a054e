"""Commit selection in Triton: one pass over the vocabulary per row, probabilities never stored.

    cand = commit_candidates(logits, temperature, top_p, seeds, positions, steps)
    # same contract and outputs as kernels.commit_select.commit_candidates_reference

One program per row of logits [N, V] (bf16, fp16 or fp32) streams the row in BLOCK_V chunks and
keeps, per lane of the chunk, an online softmax (running max m, sum s = sum e^(x-m), and
w = sum e^(x-m) (x-m) for the entropy), the top-1 value/index and the top-2 value, and at T > 0
the running Gumbel-max of x/T + g with the hash noise of kernels/noise.py (the same lowbias32 bits,
so the sample equals the reference's). The lanes are merged once at the end:
    entropy = log S - W / S,  confidence = e^(x_tok - M) / S,  margin = (1 - e^(t2-M)) / S.
Each element costs one exp (e^-|x-m| serves both the rescale and the new term) and, when the row
samples, one hash and two logs.

top_p < 1 cannot be done in one pass: the nucleus boundary depends on the whole sorted
distribution. Those rows run a threshold search in the kernel instead of the reference's sort:
each extra pass evaluates the tempered mass above 16 candidate thresholds at once and narrows the
interval [lo, hi] that holds the boundary (lo: mass above >= top_p, dropped; hi: mass above <
top_p, kept) 15-fold, until no token lies strictly between them (a few passes for 126k tokens,
at most MAX_SEARCH). Kept = tokens with z > lo, exactly the reference's nucleus for distinct
values; with tied values at the boundary the whole tie is kept (the reference keeps an arbitrary
part of it, decided by its unstable sort). If the Gumbel winner of the first pass is inside the
nucleus it is the answer (it is the max over a superset); otherwise one more pass samples inside.

Rows flagged in `sampled_scores` (Dream, Fast-dLLM v2) are scored on q = softmax(z) over the
nucleus z > lo, z = x / T (x itself at T = 0, where the search runs too when top_p < 1): two
more passes give its normaliser and Dream's entropy -sum q log(q + 1e-10); confidence and
margin follow from the normaliser and the top-2 values already found.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.commit_types import CommitCandidates
from kernels.noise import SALT_VOCAB

try:  # accurate log (__nv_logf, what torch.log runs on CUDA), for the same Gumbel bits
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - older Triton layouts: tl.log
    libdevice = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACCURATE_LOG = libdevice is not None and not _INTERPRET
# Chunk width. On CUDA 2048 bf16 elements = 8 per thread at 8 warps, 16-byte loads. Under the
# interpreter every tl op is a numpy call, so wide chunks mean fewer Python iterations.
BLOCK_V = 8192 if _INTERPRET else 2048
BLOCK_SEARCH = 4096 if _INTERPRET else 512  # [16, BLOCK_SEARCH] tiles in the top-p search
N_THRESH = 16  # thresholds per search pass: the boundary interval shrinks 15x per pass
MAX_SEARCH = 12  # 15^12 > 2^46: enough to separate any two distinct fp32 values in range
NEG_BIG = -1.0e30  # finite "minus infinity" for the running max, so (x - m) never is inf - inf


@triton.jit
def _hash32(x):
    # lowbias32 on uint32 (wrap-around multiply), the same bits as kernels.noise.hash32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _log(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _gumbel(idx, key, ACCURATE: tl.constexpr):
    # u = to_uniform(hash32(key ^ (idx * 0x27D4EB2F))); g = -log(-log(u))
    h = _hash32(key ^ (idx.to(tl.uint32) * 0x27D4EB2F))
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -_log(-_log(u, ACCURATE), ACCURATE)


@triton.jit
def _commit_select_kernel(
    logits_ptr, stride_row, V,
    temp_ptr, topp_ptr, temp_value, topp_value,
    seeds_ptr, pos_ptr, steps_ptr, scored_ptr,
    tok_ptr, conf_ptr, margin_ptr, ent_ptr,
    TEMP_PER_ROW: tl.constexpr, TOPP_PER_ROW: tl.constexpr, MAY_SAMPLE: tl.constexpr,
    MAY_TOPP: tl.constexpr, MAY_NUCLEUS_SCORES: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
    N_THRESH: tl.constexpr, MAX_SEARCH: tl.constexpr, NEG_BIG: tl.constexpr,
    SALT: tl.constexpr, ACCURATE_LOG: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)

    if TEMP_PER_ROW:
        temp = tl.load(temp_ptr + row)
    else:
        temp = temp_value + 0.0 * row  # a scalar tensor either way (loop-carried types agree)
    if TOPP_PER_ROW:
        topp = tl.load(topp_ptr + row)
    else:
        topp = topp_value + 0.0 * row
    sampling = temp > 0.0
    # scored: this row's scores come from the tempered, top-p-truncated distribution
    scored = (row * 0) != 0
    if MAY_NUCLEUS_SCORES:
        scored = tl.load(scored_ptr + row) != 0
    zscale = tl.where(sampling, temp, 1.0)  # z = x / zscale: tempered values (x itself at T = 0)
    lo = float("-inf") + 0.0 * temp  # nucleus: kept = z > lo (everything without top-p)
    key = (row * 0).to(tl.uint32)
    if MAY_SAMPLE:
        # row_key of kernels.noise: three chained hashes of the low 32 bits of the coordinates
        seed = tl.load(seeds_ptr + row).to(tl.uint32)
        pos = tl.load(pos_ptr + row).to(tl.uint32)
        step = tl.load(steps_ptr + row).to(tl.uint32)
        key = _hash32(seed ^ SALT)
        key = _hash32(key ^ pos)
        key = _hash32(key ^ step)

    # per-lane state; lane j sees indices j, j + BLOCK_V, j + 2 BLOCK_V, ... The top-1 value is
    # also the online-softmax max: starting it at a finite NEG_BIG keeps (x - t1) free of
    # inf - inf. State is 7 values per element of the chunk: registers decide occupancy here.
    t1 = tl.full([BLOCK_V], NEG_BIG, tl.float32)  # top-1 value (= running max), its index
    i1 = tl.zeros([BLOCK_V], tl.int32)
    t2 = tl.full([BLOCK_V], NEG_BIG, tl.float32)  # top-2 value
    s = tl.zeros([BLOCK_V], tl.float32)  # sum e^(x - t1)
    w = tl.zeros([BLOCK_V], tl.float32)  # sum e^(x - t1) (x - t1)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)  # Gumbel-max score and its index
    bi = tl.zeros([BLOCK_V], tl.int32)

    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        d = x - t1
        e = tl.exp(-tl.abs(d))  # e^(t1-x) when x is the new max, else e^(x-t1); 0 for x = -inf
        up = d > 0.0  # strict: a lane keeps the first index of a tie, as torch.argmax does
        w = tl.where(up, e * (w - s * d), w + tl.where(e > 0.0, e * d, 0.0))
        s = tl.where(up, s * e + 1.0, s + e)
        t2 = tl.where(up, t1, tl.maximum(t2, x))
        i1 = tl.where(up, idx, i1)
        t1 = tl.where(up, x, t1)
        if MAY_SAMPLE:
            if sampling:
                score = tl.math.div_rn(x, temp) + _gumbel(idx, key, ACCURATE_LOG)
                better = score > best
                best = tl.where(better, score, best)
                bi = tl.where(better, idx, bi)

    # merge the lanes
    M = tl.max(t1, axis=0)
    r = tl.exp(t1 - M)  # 0 for lanes that saw only -inf (t1 = NEG_BIG)
    S = tl.sum(s * r, axis=0)
    W = tl.sum(r * (w + s * (t1 - M)), axis=0)
    entropy = tl.log(S) - W / S
    I1 = tl.min(tl.where(t1 == M, i1, 2147483647), axis=0)
    T2 = tl.maximum(tl.max(t2, axis=0), tl.max(tl.where(i1 == I1, NEG_BIG, t1), axis=0))
    margin = (1.0 - tl.exp(T2 - M)) / S
    token = I1

    if MAY_SAMPLE:
        if sampling:
            B = tl.max(best, axis=0)
            token = tl.min(tl.where(best == B, bi, 2147483647), axis=0)
    if MAY_TOPP:
        if (topp < 1.0) & (sampling | scored):
            # ---- nucleus: search the boundary in the tempered values z = x / T ----
            zmax = tl.math.div_rn(M, zscale)
            # below zmax - log(V / (1 - p)) - 1 the whole tail weighs < 1 - p: dropped
            lo = zmax - (tl.log(V / (1.0 - topp)) + 1.0)
            hi = zmax
            kk = tl.arange(0, N_THRESH)
            frac = kk.to(tl.float32) / (N_THRESH - 1)
            sofs = tl.arange(0, BLOCK_S)
            n_between = row * 0 + 1
            it = row * 0
            while (it < MAX_SEARCH) & (n_between > 0):
                thr = lo + (hi - lo) * frac
                thr = tl.where(kk == 0, lo, tl.where(kk == N_THRESH - 1, hi, thr))
                mass = tl.zeros([N_THRESH], tl.float32)
                n_gt = tl.zeros([N_THRESH], tl.int32)
                n_ge = tl.zeros([N_THRESH], tl.int32)
                tot = tl.zeros([BLOCK_S], tl.float32)
                for start in range(0, V, BLOCK_S):
                    idx = start + sofs
                    x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
                    z = tl.math.div_rn(x.to(tl.float32), zscale)
                    ez = tl.exp(z - zmax)
                    tot += ez
                    above = z[None, :] > thr[:, None]  # [N_THRESH, BLOCK_S]
                    mass += tl.sum(tl.where(above, ez[None, :], 0.0), axis=1)
                    n_gt += tl.sum(above.to(tl.int32), axis=1)
                    n_ge += tl.sum((z[None, :] >= thr[:, None]).to(tl.int32), axis=1)
                total = tl.sum(tot, axis=0)
                dropped = mass >= topp * total  # mass above t >= p: t is below the cut
                kept = mass < topp * total
                new_lo = tl.max(tl.where(dropped, thr, float("-inf")), axis=0)
                new_hi = tl.min(tl.where(kept, thr, float("inf")), axis=0)
                # tokens strictly between: #(z > new_lo) - #(z >= new_hi)
                gt_lo = tl.max(tl.where(dropped & (thr == new_lo), n_gt, 0), axis=0)
                ge_hi = tl.max(tl.where(kept & (thr == new_hi), n_ge, 0), axis=0)
                n_between = gt_lo - ge_hi
                lo = new_lo
                hi = new_hi
                it += 1
            if MAY_SAMPLE:
                if sampling:
                    # kept: z > lo. The first pass's winner is the answer when it is kept.
                    x_tok = tl.load(base + token).to(tl.float32)
                    if tl.math.div_rn(x_tok, zscale) <= lo:
                        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
                        bi = tl.zeros([BLOCK_V], tl.int32)
                        for start in range(0, V, BLOCK_V):
                            idx = start + offs
                            x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
                            x = x.to(tl.float32)
                            z = tl.math.div_rn(x, zscale)
                            score = tl.where(z > lo, z + _gumbel(idx, key, ACCURATE_LOG),
                                             float("-inf"))
                            better = score > best
                            best = tl.where(better, score, best)
                            bi = tl.where(better, idx, bi)
                        B = tl.max(best, axis=0)
                        token = tl.min(tl.where(best == B, bi, 2147483647), axis=0)

    x_tok = tl.load(base + token).to(tl.float32)  # one reload beats a logit per lane in registers
    confidence = tl.exp(x_tok - M) / S
    if MAY_NUCLEUS_SCORES:
        if scored:
            # scores on q = softmax(z) over the kept tokens z > lo (Dream's sample_tokens): two
            # more passes, the normaliser and then sum q log(q + 1e-10) with Dream's epsilon,
            # which needs q itself, so it cannot be folded into the online pass
            zmax = tl.math.div_rn(M, zscale)  # division by zscale > 0 keeps the order
            sz = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                z = tl.math.div_rn(tl.load(base + idx, mask=idx < V,
                                           other=float("-inf")).to(tl.float32), zscale)
                sz += tl.where(z > lo, tl.exp(z - zmax), 0.0)
            SZ = tl.sum(sz, axis=0)
            ez = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                z = tl.math.div_rn(tl.load(base + idx, mask=idx < V,
                                           other=float("-inf")).to(tl.float32), zscale)
                q = tl.where(z > lo, tl.exp(z - zmax) / SZ, 0.0)
                ez += q * tl.log(q + 1e-10)
            entropy = -tl.sum(ez, axis=0)
            confidence = tl.exp(tl.math.div_rn(x_tok, zscale) - zmax) / SZ
            z2 = tl.math.div_rn(T2, zscale)
            margin = (1.0 - tl.where(z2 > lo, tl.exp(z2 - zmax), 0.0)) / SZ
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(conf_ptr + row, confidence)
    tl.store(margin_ptr + row, margin)
    tl.store(ent_ptr + row, entropy)


def _as_param(x, n: int, device) -> tuple[torch.Tensor | None, float, bool]:
    """A per-row float tensor or a Python number -> (tensor or None, value, is_tensor)."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            x = x.reshape(1).expand(n)
        return x.to(device=device, dtype=torch.float32).contiguous(), 0.0, True
    return None, float(x), False


def commit_candidates(logits: torch.Tensor, temperature, top_p, seeds: torch.Tensor,
                      positions: torch.Tensor, steps: torch.Tensor,
                      block_v: int | None = None,
                      sampled_scores: torch.Tensor | None = None) -> CommitCandidates:
    """logits [N, V]; temperature, top_p: floats or [N]; seeds/positions/steps: [N] int;
    sampled_scores: None or bool [N], rows scored on the tempered top-p nucleus."""
    N, V = logits.shape
    dev = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(N, dtype=torch.long, device=dev)
    conf = torch.empty(N, dtype=torch.float32, device=dev)
    margin = torch.empty(N, dtype=torch.float32, device=dev)
    entropy = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return CommitCandidates(tokens, conf, margin, entropy)
    temp_t, temp_v, temp_rows = _as_param(temperature, N, dev)
    topp_t, topp_v, topp_rows = _as_param(top_p, N, dev)
    # Without per-row tensors the flags are known here, and the unused paths are not compiled.
    may_sample = temp_rows or temp_v > 0
    # rows scored on the nucleus need the search and two more passes; callers pass None when
    # no row is (known on the host from the requests' settings), so no sync and, without any,
    # those paths are not compiled
    may_nucleus = sampled_scores is not None
    may_topp = (may_sample or may_nucleus) and (topp_rows or topp_v < 1)
    scored = sampled_scores.to(device=dev, dtype=torch.int8).contiguous() if may_nucleus \
        else tokens

    def ints(x):
        if x is None:
            return tokens  # never read when may_sample is False
        return x.to(device=dev, dtype=torch.long).reshape(-1).expand(N).contiguous() \
            if x.numel() == 1 else x.to(device=dev, dtype=torch.long).contiguous()

    _commit_select_kernel[(N,)](
        logits, logits.stride(0), V,
        temp_t if temp_t is not None else conf, topp_t if topp_t is not None else conf,
        temp_v, topp_v,
        ints(seeds), ints(positions), ints(steps), scored,
        tokens, conf, margin, entropy,
        TEMP_PER_ROW=temp_rows, TOPP_PER_ROW=topp_rows, MAY_SAMPLE=may_sample,
        MAY_TOPP=may_topp, MAY_NUCLEUS_SCORES=may_nucleus, BLOCK_V=block_v or BLOCK_V, BLOCK_S=BLOCK_SEARCH,
        N_THRESH=N_THRESH, MAX_SEARCH=MAX_SEARCH, NEG_BIG=NEG_BIG, SALT=SALT_VOCAB, ACCURATE_LOG=ACCURATE_LOG,
        num_warps=8,
    )
    return CommitCandidates(tokens, conf, margin, entropy)


