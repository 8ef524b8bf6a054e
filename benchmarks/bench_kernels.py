"""Each fused kernel against its torch reference: median time, ratio, and the error between them.
Attention rows time kernels/attention.py's fast path against the masked SDPA the engine and
training otherwise run: the engine's paged-attention step (a context built, then `layers` layers
attended: gather from the pool + attention) and its full-attention padded rows with flash-attn
varlen, when flash-attn is installed (else the row times masked SDPA only and says "flash-attn
not installed"); block-diffusion training attention (forward + backward over `layers` layers,
the mask built once) with FlexAttention vs SDPA on the dense [2L, 2L] mask, on CUDA.

    dllm bench kernels                   # CUDA if present, else CPU
    dllm bench kernels --quick           # fewer cases

On CUDA both sides are timed with triton.testing.do_bench (CUDA events, median; inputs larger than
L2 where it matters: 512 x 126464 bf16 logits are 130 MB against H100's 50 MB). On the CPU only
the torch reference is timed: Triton runs there only under TRITON_INTERPRET=1, a numpy emulation
whose speed means nothing, so the CPU table is the baseline a GPU run is compared with.
Writes benchmarks/results/bench_kernels_<device>.json (+ .png on CUDA); gpu_check.py calls
`run()` and puts the rows into its own report.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import harness
from kernels.commit_select import commit_candidates_reference
from kernels.rmsnorm import rms_norm_reference
from kernels.rotary import apply_rotary_reference, rotary_cos_sin

log = logging.getLogger(__name__)
LLADA_VOCAB, DREAM_VOCAB = 126464, 152064


@dataclass
class Case:
    kernel: str
    shape: str
    make: Callable[[], tuple[Callable, Callable, Callable]]  # -> (reference, triton, compare)
    cuda_only: bool = False
    notes: dict = field(default_factory=dict)
    fast_unavailable: str | None = None  # why only the reference is timed (recorded in the row)


def _commit_case(n: int, v: int, dtype, temperature: float, top_p: float, device: str,
                 block_v: int | None = None):
    def make():
        g = torch.Generator(device="cpu").manual_seed(n + v)
        logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(device)
        seeds = torch.arange(n, device=device) + 1
        pos = torch.arange(n, device=device) + 1000
        steps = torch.zeros(n, dtype=torch.long, device=device)
        # per-row tensors, as model/sampling.commit_step passes them
        temp = torch.full((n,), temperature, device=device)
        topp = torch.full((n,), top_p, device=device)

        def ref():
            return commit_candidates_reference(logits, temp, topp, seeds, pos, steps)

        def fast():
            from kernels import commit_select_triton

            return commit_select_triton.commit_candidates(logits, temp, topp, seeds, pos, steps,
                                                          block_v=block_v)

        def compare(a, b):
            return {"tokens_equal": float((a.tokens == b.tokens).float().mean()),
                    "confidence_max_err": float((a.confidence - b.confidence).abs().max()),
                    "entropy_max_err": float((a.entropy - b.entropy).abs().max())}

        return ref, fast, compare

    name = f"{n}x{v} {str(dtype).replace('torch.', '')} T={temperature:g}" + \
        (f" top_p={top_p:g}" if top_p < 1 else "") + (f" BLOCK_V={block_v}" if block_v else "")
    return Case("commit_select", name, make)


def _rmsnorm_case(rows_b: int, rows_l: int, d: int, dtype, adaln: bool, device: str):
    def make():
        x = torch.randn(rows_b, rows_l, d, device=device).to(dtype)
        w = torch.randn(d, device=device).to(dtype)
        sh = torch.randn(rows_b, 1, d, device=device).to(dtype) if adaln else None
        sc = (torch.randn(rows_b, 1, d, device=device) * 0.1).to(dtype) if adaln else None

        def fast():
            from kernels import rmsnorm_triton

            return rmsnorm_triton.rms_norm(x, w, 1e-5, sh, sc)

        return (lambda: rms_norm_reference(x, w, 1e-5, sh, sc), fast,
                lambda a, b: {"max_err": float((a.float() - b.float()).abs().max())})

    return Case("rmsnorm_adaln" if adaln else "rmsnorm",
                f"[{rows_b},{rows_l},{d}] {str(dtype).replace('torch.', '')}", make)


def _rotary_case(b: int, h: int, hkv: int, L: int, hd: int, dtype, device: str):
    def make():
        q = torch.randn(b, L, h, hd, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(b, L, hkv, hd, device=device).to(dtype).transpose(1, 2)
        pos = torch.arange(1000, 1000 + L, device=device)[None].expand(b, L)
        cos, sin = rotary_cos_sin(pos, hd, 500000.0, dtype=dtype)

        def fast():
            from kernels import rotary_triton

            return rotary_triton.apply_rotary(q, k, cos, sin)

        return (lambda: apply_rotary_reference(q, k, cos, sin), fast,
                lambda a, b_: {"max_err": max(float((a[i].float() - b_[i].float()).abs().max())
                                              for i in range(2))})

    return Case("rotary_qk", f"q[{b},{h},{L},{hd}] k[{b},{hkv},{L},{hd}] "
                f"{str(dtype).replace('torch.', '')}", make)


class _AttentionPath:
    """Force one of kernels/attention.py's paths while a timed function runs."""

    def __init__(self, **paths):
        self.paths = paths

    def __enter__(self):
        import kernels.attention as ka

        self.saved = {k: getattr(ka, k) for k in self.paths}
        for k, v in self.paths.items():
            setattr(ka, k, v)

    def __exit__(self, *exc):
        import kernels.attention as ka

        for k, v in self.saved.items():
            setattr(ka, k, v)


def _flash_unavailable(device: str) -> str | None:
    import kernels.attention as ka

    if ka.flash_attn_varlen_func is None:
        return "flash-attn not installed"
    return None if device == "cuda" else "flash-attn needs CUDA"


def _max_err(a, b):
    return {"max_err": float((a.float() - b.float()).abs().max())}


def _paged_attention_case(rows: int, lq: int, cached: tuple[int, int], h: int, hkv: int,
                          hd: int, dtype, device: str, layers: int = 4, append: bool = False):
    """One engine forward's attention over the paged pool: rows with cached lengths spread over
    `cached` (lo, hi), every row's last query slot padding (length buckets), pages shuffled."""
    def make():
        from engine.kv_pool import PagedKVPool
        from model.config import ModelConfig

        cfg = ModelConfig(name="bench", vocab_size=8, d_model=h * hd, n_layers=layers,
                          n_heads=h, n_kv_heads=hkv, mlp_hidden=8, max_seq_len=1 << 16)
        g = torch.Generator().manual_seed(rows + lq)
        lens = torch.linspace(cached[0], cached[1], rows).long().tolist()
        ps = 16
        pool = PagedKVPool(cfg, num_pages=sum(-(-(c + lq) // ps) for c in lens) + 1,
                           page_size=ps, device=device, dtype=dtype)
        pool.k.normal_()
        pool.v.normal_()
        order = torch.randperm(pool.num_pages, generator=g).tolist()
        tables = []
        for c in lens:
            n = -(-(c + lq) // ps)
            tables.append(order[:n])
            order = order[n:]
        valid = torch.ones(rows, lq, dtype=torch.bool, device=device)
        valid[:, -1] = False
        q = torch.randn(rows, lq, h, hd, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(rows, lq, hkv, hd, device=device).to(dtype).transpose(1, 2)
        v = torch.randn(rows, lq, hkv, hd, device=device).to(dtype).transpose(1, 2)

        def step():
            ctx = pool.context(tables, lens, valid, append=append)
            return [ctx.attend(i, q, k, v) for i in range(layers)][-1]

        def ref():
            with _AttentionPath(VARLEN_PATH="sdpa"):
                return step()

        def fast():
            with _AttentionPath(VARLEN_PATH="flash"):
                return step()

        def compare(a, b):  # padding query rows: zeros on the varlen path, so valid ones only
            return _max_err(a.transpose(1, 2)[valid], b.transpose(1, 2)[valid])

        return ref, fast, compare

    name = (f"B{rows} Lq{lq} cache {cached[0]}-{cached[1]} H{h}/{hkv} hd{hd} x{layers}"
            f"{' append' if append else ''} {str(dtype).replace('torch.', '')}")
    return Case("paged_attn", name, make, fast_unavailable=_flash_unavailable(device),
                notes={"fast": "flash_attn_varlen_func", "reference": "masked SDPA"})


def _full_rows_case(rows: int, lens: tuple[int, int], h: int, hd: int, dtype, device: str):
    """Full-attention engine rows (LLaDA): right-padded to the longest, lengths as Ragged."""
    def make():
        from kernels.attention import Ragged, ragged_attention

        L = lens[1]
        row_lens = torch.linspace(lens[0], lens[1], rows).long().tolist()
        r = Ragged.prefix(row_lens, L, device)
        mask = r.key_valid[:, None, None, :]
        q, k, v = (torch.randn(rows, L, h, hd, device=device).to(dtype).transpose(1, 2)
                   for _ in range(3))

        def ref():
            with _AttentionPath(VARLEN_PATH="sdpa"):
                return ragged_attention(q, k, v, r, mask)

        def fast():
            with _AttentionPath(VARLEN_PATH="flash"):
                return ragged_attention(q, k, v, r, mask)

        return ref, fast, lambda a, b: _max_err(a.transpose(1, 2)[r.query_valid],
                                                b.transpose(1, 2)[r.query_valid])

    return Case("full_rows_attn", f"B{rows} L {lens[0]}-{lens[1]} H{h} hd{hd} "
                f"{str(dtype).replace('torch.', '')}", make,
                fast_unavailable=_flash_unavailable(device),
                notes={"fast": "flash_attn_varlen_func", "reference": "masked SDPA"})


def _block_diffusion_case(b: int, seq: int, block: int, h: int, hkv: int, hd: int, dtype,
                          device: str, layers: int = 4):
    """BD3-LM training attention: [noisy ; clean] of 2 * seq tokens, prompts of ~seq/8,
    forward + backward through `layers` layers sharing one mask (built inside the timing)."""
    def make():
        from kernels.attention import BlockDiffusionAttention
        from model.diffusion import segment_ids

        seg = segment_ids(seq, torch.linspace(seq // 16, seq // 8, b).long().to(device), block)
        q, k, v = (torch.randn(b, 2 * seq, n, hd, device=device).to(dtype).transpose(1, 2)
                   .requires_grad_() for n in (h, hkv, hkv))

        def step():
            ctx = BlockDiffusionAttention(seg)
            out = [ctx.attend(i, q, k, v) for i in range(layers)]
            sum(o.float().sum() for o in out).backward()
            q.grad = k.grad = v.grad = None
            return out[-1].detach()

        def ref():
            with _AttentionPath(TRAINING_PATH="sdpa"), torch.enable_grad():
                return step()

        def fast():
            with _AttentionPath(TRAINING_PATH="flex"), torch.enable_grad():
                return step()

        return ref, fast, _max_err

    return Case("bd_train_attn", f"B{b} 2x{seq} block{block} H{h}/{hkv} hd{hd} x{layers} fwd+bwd "
                f"{str(dtype).replace('torch.', '')}", make, cuda_only=True,
                notes={"fast": "flex_attention (compiled)", "reference": "SDPA, dense mask"})


def attention_cases(device: str, quick: bool = False, tiny: bool = False) -> list[Case]:
    bf16 = torch.bfloat16
    if tiny:  # the code paths at toy sizes (on the CPU: the SDPA side only)
        out = [_paged_attention_case(3, 8, (0, 40), 4, 2, 32, torch.float32, device, layers=2),
               _full_rows_case(3, (5, 24), 4, 32, torch.float32, device)]
        if device == "cuda":
            out.append(_block_diffusion_case(2, 64, 8, 4, 2, 32, bf16, device, layers=2))
        return out
    out = [  # LLaDA-8B heads; a 1B GQA model (32/8 heads); a batched prefill (cache write)
        _paged_attention_case(16, 32, (256, 2048), 32, 32, 128, bf16, device),
        _paged_attention_case(64, 32, (128, 1024), 32, 8, 64, bf16, device),
        _paged_attention_case(4, 512, (0, 0), 32, 8, 64, bf16, device, append=True),
        _full_rows_case(16, (300, 1024), 32, 128, bf16, device),
    ]
    if device == "cuda":
        out += [_block_diffusion_case(8, 1024, 32, 16, 16, 64, bf16, device)]
        if not quick:
            out += [_block_diffusion_case(4, 2048, 32, 32, 8, 128, bf16, device),
                    _block_diffusion_case(8, 1024, 4, 16, 16, 64, bf16, device)]
    return out


def cases(device: str, quick: bool = False, tiny: bool = False) -> list[Case]:
    bf16 = torch.bfloat16
    if tiny:  # gpu_check --tiny: every code path, small enough for the Triton interpreter
        return [
            _commit_case(8, 5003, bf16, 0.0, 1.0, device),
            _commit_case(8, 5003, bf16, 1.0, 1.0, device),
            _commit_case(4, 5003, torch.float32, 0.7, 0.9, device),
            _commit_case(8, 5003, bf16, 0.0, 1.0, device, block_v=1024),
            _rmsnorm_case(2, 8, 256, bf16, True, device),
            _rotary_case(2, 4, 2, 8, 64, bf16, device),
        ] + attention_cases(device, tiny=True)
    out = [
        # the goal (>= 3x the reference): the batch-16 engine step on LLaDA's vocabulary
        _commit_case(512, LLADA_VOCAB, bf16, 0.0, 1.0, device),
        _commit_case(32, LLADA_VOCAB, bf16, 0.0, 1.0, device),  # batch 1: one block of 32
    ]
    if device == "cuda":  # (on the CPU the sampled 512-row references take seconds each)
        out += [_commit_case(512, LLADA_VOCAB, bf16, 1.0, 1.0, device),
                _commit_case(512, LLADA_VOCAB, torch.float32, 0.7, 0.9, device)]
    if not quick:
        out += [
            _commit_case(512, DREAM_VOCAB, bf16, 0.0, 1.0, device),
            _commit_case(2048, 4096, torch.float32, 0.0, 1.0, device),  # tiny-coder batch
        ]
        if device == "cuda":  # chunk width sweep for the headline case (the default is 2048)
            out += [_commit_case(512, LLADA_VOCAB, bf16, 0.0, 1.0, device, block_v=bv)
                    for bv in (1024, 4096)]
    out += [
        _rmsnorm_case(16, 32, 4096, bf16, True, device),  # LLaDA width, one step at batch 16
        _rmsnorm_case(1, 1000, 4096, bf16, False, device),  # a 1000-token prefill
        _rotary_case(16, 32, 32, 32, 128, bf16, device),
        _rotary_case(1, 32, 32, 1000, 128, bf16, device),
    ]
    return out + attention_cases(device, quick)


def _time_cpu(fn: Callable, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_cuda(fn: Callable) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def run(device: str | None = None, quick: bool = False, tiny: bool = False,
        progress: bool = True) -> list[dict]:
    """Time every case -> rows {kernel, shape, torch_ms, triton_ms, speedup, errors...}.
    On the CPU the Triton side runs only under TRITON_INTERPRET=1 (a code-path check)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with_triton = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    rows = []
    for case in harness.progress(cases(device, quick, tiny), desc="kernels",
                                 disable=not progress):
        row = {"kernel": case.kernel, "shape": case.shape, "device": device, **case.notes}
        if case.cuda_only and device != "cuda":
            continue
        try:
            ref, fast, compare = case.make()
            with torch.no_grad():
                if case.fast_unavailable:  # the reference's time alone, and why
                    row["fast_unavailable"] = case.fast_unavailable
                    row["torch_ms"] = (_time_cuda if device == "cuda" else _time_cpu)(ref)
                elif device == "cuda":
                    row["torch_ms"] = _time_cuda(ref)
                    row["triton_ms"] = _time_cuda(fast)
                    row["speedup"] = row["torch_ms"] / row["triton_ms"]
                    row.update(compare(ref(), fast()))
                else:
                    row["torch_ms"] = _time_cpu(ref)
                    if with_triton:
                        row["triton_ms"] = _time_cpu(fast, reps=1)
                        row["speedup"] = row["torch_ms"] / row["triton_ms"]
                        row["interpreted"] = True
                        row.update(compare(ref(), fast()))
        except Exception as e:  # one failing case must not hide the others' numbers
            log.exception("case %s %s failed", case.kernel, case.shape)
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<15}{'shape':<44}{'torch ms':>10}{'triton ms':>11}{'x':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:<15}{r['shape']:<44}  ERROR {r['error'][:60]}")
            continue
        t = f"{r['triton_ms']:>11.3f}{r['speedup']:>7.2f}" if "triton_ms" in r else f"{'-':>11}{'-':>7}"
        if "fast_unavailable" in r:
            t += f"  ({r['fast_unavailable']})"
        lines.append(f"{r['kernel']:<15}{r['shape']:<44}{r['torch_ms']:>10.3f}{t}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if "speedup" in r]
    if not rows:
        return
    fig, ax = harness.figure(figsize=(8, 0.45 * len(rows) + 1.5))
    labels = [f"{r['kernel']} {r['shape']}" for r in rows]
    ax.barh(labels, [r["speedup"] for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up of the Triton kernel over the torch reference (median times)")
    ax.invert_yaxis()
    harness.save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="dllm bench kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = harness.parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.device, args.quick)
    device = rows[0]["device"] if rows else "cpu"
    info = {"device": device, "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "rows": rows}
    out = harness.write_results(f"bench_kernels_{device}", info, args.out)
    if device == "cuda":
        plot(rows, out)
    print(format_table(rows))


if __name__ == "__main__":
    main()
