import json

import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import ExampleSampler, split_files
from model.diffusion import block_diffusion_mask, diffusion_loss, q_xt, segment_ids
from model.train import main as train_main
from model.transformer import DiffusionTransformer

from .conftest import tiny_config, tiny_net


def test_forward_process_masks_only_the_response_at_rate_t():
    x0 = torch.randint(10, 100, (64, 200))
    resp = torch.arange(200)[None].expand(64, 200) >= 50
    g = torch.Generator().manual_seed(0)
    xt, masked = q_xt(x0, torch.tensor(0.3), resp, mask_id=0, generator=g)
    assert not masked[:, :50].any()
    assert abs(masked[:, 50:].float().mean().item() - 0.3) < 0.01
    assert (xt[masked] == 0).all() and torch.equal(xt[~masked], x0[~masked])


def test_block_diffusion_mask_layout():
    seg = segment_ids(6, torch.tensor([2]), 2)  # prompt 2, blocks [2,3] [4,5]
    assert seg.tolist() == [[0, 0, 1, 1, 2, 2]]
    m = block_diffusion_mask(seg)[0, 0]
    L = 6
    noisy, clean = slice(0, L), slice(L, 2 * L)
    # noisy block 2 (pos 4,5) sees noisy block 2 and clean segments 0,1 only
    assert m[noisy][4, noisy].tolist() == [False, False, False, False, True, True]
    assert m[noisy][4, clean].tolist() == [True, True, True, True, False, False]
    # clean tokens never see noisy ones; clean block 1 sees clean 0 and 1
    assert not m[clean][:, noisy].any()
    assert m[clean][2, clean].tolist() == [True, True, True, True, False, False]


def test_loss_ignores_prompt_and_padding():
    cfg = tiny_config()
    net = tiny_net(cfg)
    x0 = torch.randint(10, 300, (2, 40))
    pl = torch.tensor([10, 20])
    g = torch.Generator().manual_seed(0)
    loss, st = diffusion_loss(net, x0, pl, 8, generator=g)
    assert st["response_tokens"] == 30 + 20
    lm = torch.ones(2, 40, dtype=torch.bool)
    lm[:, 35:] = False
    _, st2 = diffusion_loss(net, x0, pl, 8, generator=torch.Generator().manual_seed(0), loss_mask=lm)
    assert st2["response_tokens"] == 50 - 10


def test_a_few_training_steps_lower_the_loss(small_tokenizer, toy_files):
    torch.manual_seed(0)
    tok = small_tokenizer
    cfg = tiny_config(tok)
    net = DiffusionTransformer(cfg)
    sampler = ExampleSampler(tok, toy_files, seq_len=64, seed=0)
    batches = [sampler.batch("plain", 8, 16) for _ in range(4)]

    def eval_loss():
        with torch.no_grad():
            return sum(float(diffusion_loss(net, b.ids, b.prompt_len, 16,
                                            generator=torch.Generator().manual_seed(1))[0])
                       for b in batches) / len(batches)

    before = eval_loss()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for i in range(40):
        b = batches[i % len(batches)]
        loss, _ = diffusion_loss(net, b.ids, b.prompt_len, 16)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss() < 0.8 * before


def test_examples_have_the_served_formats(small_tokenizer, toy_files):
    tok = small_tokenizer
    s = ExampleSampler(tok, toy_files, seq_len=128, seed=0)
    b = s.batch("fim", 4, 32)
    for row, p in zip(b.ids.tolist(), b.prompt_len.tolist(), strict=True):
        assert row[0] == tok.fim_prefix_id and row[p - 1] == tok.fim_middle_id
        body = [t for t in row[p:] if t != tok.pad_id]
        assert len(body) % 32 == 0 and tok.eos_id in body  # EOS-filled to the block end
    c = s.batch("chat", 2, 32)
    assert all(tok.role_ids["user"] == r[0] for r in c.ids.tolist())


def test_files_split_is_stable():
    files = {f"pkg/mod{i}.py": "x = 1\n" for i in range(300)}
    a = split_files(files)
    b = split_files(dict(reversed(list(files.items()))))
    assert set(a[1]) == set(b[1]) and 0 < len(a[1]) < 30


def test_checkpoint_round_trip(tmp_path, small_tokenizer):
    cfg = tiny_config(small_tokenizer)
    net = tiny_net(cfg)
    save_checkpoint(tmp_path, net, small_tokenizer)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "tokenizer.json",
                                                    "model.safetensors"}
    net2, tok2, cfg2 = load_checkpoint(tmp_path)
    assert cfg2 == cfg
    ids = torch.randint(10, cfg.vocab_size, (1, 12))
    t = torch.full((1,), 0.5)
    torch.testing.assert_close(net(ids, t=t), net2(ids, t=t), rtol=0, atol=0)
    # tied embeddings are stored once
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_train_cli_resumes_and_exports(tmp_path, toy_files):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in toy_files.items():
        (corpus / name.replace("/", "_")).write_text(text)
    run, export = tmp_path / "run", tmp_path / "export"
    common = ["--out", str(run), "--corpus", str(corpus), "--batch-size", "2", "--seq-len", "64",
              "--ckpt-every", "2", "--eval-every", "2", "--eval-batches", "2",
              "--export", str(export), "--preset", "tiny-coder"]
    train_main(common + ["--max-steps", "2"])
    first = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2] and "held_out_loss" in first[-1]
    train_main(common + ["--max-steps", "3"])
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, not restarted
    net, tok, cfg = load_checkpoint(export)
    assert cfg.attention == "block_causal" and cfg.time_conditioning
    assert json.loads((export / "train_state.json").read_text())["step"] == 3
    # a later session continues from the shipped weights with a fresh optimizer
    run2 = tmp_path / "run2"
    train_main(["--out", str(run2), "--corpus", str(corpus), "--batch-size", "2", "--seq-len", "64",
                "--eval-every", "1", "--eval-batches", "2", "--init-from", str(export),
                "--max-steps", "1"])
    cont = json.loads((run2 / "log.jsonl").read_text().splitlines()[0])
    assert cont["held_out_loss"] < rows[0]["loss"] * 1.5
    assert (run2 / "tokenizer.json").read_text() == (export / "tokenizer.json").read_text()
