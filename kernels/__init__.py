"""Fused ops for the diffusion hot path: each a torch reference, a Triton kernel, one dispatch.

    from kernels.commit_select import commit_candidates   # tokens, confidence, margin, entropy
    from kernels.rmsnorm import rms_norm                   # RMSNorm fused with adaLN shift/scale
    from kernels.rotary import apply_rotary, rotary_cos_sin  # rotary on q and k, one launch
    from kernels.attention import attention                # flash-attn / SDPA: one place decides
    from kernels.noise import uniform_noise, gumbel        # counter-based noise shared by both
    from kernels.lora import add_lora                      # each row through its own LoRA slot

| op | reference (torch) | kernel (Triton) |
|---|---|---|
| commit selection over the vocabulary | commit_select.commit_candidates_reference | commit_select_triton (one pass, online softmax; top-p by an in-kernel threshold search) |
| RMSNorm + adaLN modulation | rmsnorm.rms_norm_reference | rmsnorm_triton |
| rotary on q and k | rotary.apply_rotary_reference | rotary_triton |
| per-row LoRA (gathered low-rank matmul) | lora.lora_delta_reference (gather + bmm) | lora_triton (shrink + expand through the slot index) |
| attention | attention.attention_reference (SDPA with a dense mask); flash_attn_varlen_reference | flash-attn varlen for the engine's length-described rows (installed, CUDA, fp16/bf16), FlexAttention for block-diffusion training (CUDA), else SDPA |

Dispatch (kernels/dispatch.py): Triton for CUDA tensors, torch elsewhere; `DLLM_KERNELS=triton`
or `torch` forces one (Triton on CPU tensors needs TRITON_INTERPRET=1: correctness only). The
Triton modules are imported only when chosen, so the package imports without Triton; a result
type both sides return lives in its own module (commit_types.py), so neither imports the other. Tests pin
every kernel to its reference (tests/kernels/); speed is in benchmarks/bench_kernels.py.
"""
