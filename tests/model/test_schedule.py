"""model/schedule.py: how a canvas splits into blocks and steps, and what a request costs."""

import pytest

from model.schedule import (
    BlockSchedule,
    RowLayout,
    cached_query_span,
    request_token_steps,
    token_steps_left,
    transfer_schedule,
)


def test_blocks_cover_the_canvas_and_the_last_one_is_short():
    s = BlockSchedule(max_new_tokens=80, block_length=32, steps=8)
    assert s.n_blocks == 3
    assert [s.span(b) for b in range(3)] == [(0, 32), (32, 64), (64, 80)]
    assert [s.steps_in(b) for b in range(3)] == [8, 8, 8]
    assert BlockSchedule(20, 32, 64).steps_in(0) == 20  # never more steps than tokens
    assert BlockSchedule(64, 32, 4).total_steps == 8


@pytest.mark.parametrize("n, bl, steps", [(80, 32, 8), (50, 16, 5), (7, 3, 2), (33, 32, 64),
                                          (5, 1, 1), (31, 8, 3)])
def test_commits_add_up_to_each_block(n, bl, steps):
    s = BlockSchedule(n, bl, steps)
    for b in range(s.n_blocks):
        lo, hi = s.span(b)
        commits = s.commits(b)
        assert len(commits) == s.steps_in(b) and sum(commits) == hi - lo
        assert commits == sorted(commits, reverse=True)  # earlier steps take the remainder
        assert max(commits) - min(commits) <= 1  # an even split
        plans = [s.plan(b, i) for i in range(len(commits))]
        assert [p[0] for p in plans] == commits
        assert [p[1] for p in plans] == [False] * (len(commits) - 1) + [True]
    assert sum(s.steps_in(b) for b in range(s.n_blocks)) == s.total_steps


def test_transfer_schedule_splits_evenly():
    assert transfer_schedule(32, 8) == [4] * 8
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(3, 8) == [1, 1, 1]  # never more steps than tokens
    assert sum(transfer_schedule(31, 5)) == 31


def test_block_causal_cost():
    # 128 tokens in 32-token blocks at 8 steps: 4 blocks x 8 steps x 32 tokens + cache writes
    # of the prompt and of every finished block but the last
    assert request_token_steps(10, 128, 8, 32) == 4 * 8 * 32 + 10 + 96
    assert request_token_steps(10, 20, 64, 32) == 20 * 20 + 10  # steps capped by the block


def test_full_attention_cost_with_and_without_the_cache():
    assert request_token_steps(10, 64, 8, 64, block_causal=False) == 8 * 74
    # prompt 100 (+ suffix 10), 64 new tokens, block 32, 8 steps: L = 174
    assert request_token_steps(110, 64, 8, 32, block_causal=False) == 2 * 8 * 174
    # prefix: a refresh (174) then 7 steps over block + rest + suffix (74, then 42)
    assert request_token_steps(110, 64, 8, 32, False, "prefix", 10) == \
        (174 + 7 * 74) + (174 + 7 * 42)
    # dual: a refresh then 7 steps over the block only
    assert request_token_steps(110, 64, 8, 32, False, "dual", 10) == 2 * (174 + 7 * 32)
    # shifted logits (Dream) recompute the token before the block too
    assert request_token_steps(110, 64, 8, 32, False, "dual", 10, logit_shift=True) == \
        2 * (174 + 7 * 33)
    # block-causal models ignore the full-attention cache: theirs is exact
    assert request_token_steps(10, 128, 8, 32, True, "dual") == request_token_steps(10, 128, 8, 32)


def test_cached_spans():
    # prompt 100, block [32, 64), row of 174: prefix runs to the end, dual the block alone
    assert cached_query_span("prefix", 100, 32, 64, 174, False) == (132, 174)
    assert cached_query_span("dual", 100, 32, 64, 174, False) == (132, 164)
    assert cached_query_span("dual", 100, 32, 64, 174, True) == (131, 164)
    assert cached_query_span("dual", 0, 0, 8, 8, True) == (0, 8)  # nothing before position 0
    row = RowLayout(100, 64, 10, block_causal=False, full_cache="prefix")
    assert row.full_len == 174 and row.cached_span(32, 64) == (132, 174)
    assert [row.step_tokens(32, 64, s) for s in range(3)] == [174, 42, 42]


@pytest.mark.parametrize("row", [RowLayout(10, 80), RowLayout(10, 80, 5, False),
                                 RowLayout(10, 80, 5, False, "prefix"),
                                 RowLayout(10, 80, 5, False, "dual", logit_shift=True)],
                         ids=["block_causal", "full", "prefix", "dual"])
def test_cost_left_falls_by_what_each_step_runs(row):
    """Walking the schedule step by step, the cost left drops by exactly the tokens each step
    runs plus the cache writes done before it, and reaches 0 at the end."""
    s = BlockSchedule(80, 32, 6)
    left = token_steps_left(s, row)
    cached = 0
    for b in range(s.n_blocks):
        lo, hi = s.span(b)
        for step in range(s.steps_in(b)):
            assert token_steps_left(s, row, b, step, cached) == left
            writes = row.prompt_len + lo - cached if row.block_causal else 0
            cached += writes
            left -= writes + row.step_tokens(lo, hi, step)
    assert left == 0


def test_kv_slots_a_request_holds():
    s = BlockSchedule(80, 32, 8)
    assert RowLayout(10, 80).cache_tokens(s) == 10 + 64  # the last block is never written
    assert RowLayout(10, 80, 5, False).cache_tokens(s) == 0
    assert RowLayout(10, 80, 5, False, "dual").cache_tokens(s) == 95


def test_aligned_schedule_starts_mid_block_and_pads_to_a_boundary():
    """Blocks aligned to position 0 (LLaDA2.x, SDAR): a 10-token prompt puts the canvas 10
    tokens into its first block of 32; the canvas runs to 96 = 3 blocks; block 0 keeps the whole
    block's commit schedule and is done once that covers its 22 masks."""
    from model.schedule import aligned_schedule, request_token_steps

    s = aligned_schedule(prompt_len=10, max_new_tokens=80, block_length=32, steps=8)
    assert (s.max_new_tokens, s.offset, s.n_blocks) == (86, 10, 3)
    assert [s.span(b) for b in range(3)] == [(0, 22), (22, 54), (54, 86)]
    assert s.commits(0) == [4] * 8 and s.steps_in(0) == 6 and s.steps_in(1) == 8
    on_boundary = aligned_schedule(64, 80, 32, 8)
    assert (on_boundary.offset, on_boundary.max_new_tokens) == (0, 96)
    # the cost counts the prompt's tail with block 0 and pads the canvas
    assert request_token_steps(10, 80, 8, 32, block_align="zero") != request_token_steps(10, 80, 8, 32)
