"""benchmarks/bench_diffusion_gemma.py (gpu_check's DiffusionGemma section) runs end to end at
toy size on the CPU: the engine serves batch 1 and 2 of the workload, every answer full length."""

from __future__ import annotations

import torch

from benchmarks import bench_diffusion_gemma


def test_section_runs_at_toy_size():
    torch.set_num_threads(1)
    s = bench_diffusion_gemma.gpu_section(tiny=True)
    assert [r["batch"] for r in s["rows"]] == [1, 2]
    for r in s["rows"]:
        assert "error" not in r, r
        assert r["output_tokens"] == r["batch"] * s["new_tokens"]  # EOS ignored, no early stop
        assert r["tokens_per_s"] > 0
    assert "batch" in bench_diffusion_gemma.format_table(s)


def test_the_gpu_shape_is_26b_with_4b_active():
    """The shape the GPU section builds (on the meta device here: no memory)."""
    from model.diffusion_gemma import DiffusionGemma

    cfg = bench_diffusion_gemma.model_config(tiny=False)
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    total = net.num_params()
    expert = sum(p.numel() for n, p in net.named_parameters() if ".mlp.w_" in n)
    active = total - expert + expert * 8 // 128
    assert 24e9 < total < 27e9 and 3e9 < active < 4.5e9
