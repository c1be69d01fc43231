"""The oracle's near-tie merges (tests/oracle): a repeated token ties exactly by RoPE
symmetry, so the merge target of an evicted copy is decided by float rounding, which the
server and the oracle do differently. The check must accept either choice, and only those."""

from __future__ import annotations

import pytest

from tests.oracle import check

# MEDA at 0.2 on the GPU path's small two-image prompt: one exact tie in layer 0
CONTENT = check.cases(side=168, video_size=168)["images"]
CFG = {"kv_policy": "meda", "kv_budget": 0.2, "kv_window": check.WINDOW}


@pytest.fixture(scope="module")
def decodes(oracle):
    cfg = check.request_config({}, CFG)
    plain = oracle.run(CONTENT, cfg, 8)
    flipped = oracle.run(CONTENT, cfg, 8, frozenset({0}))
    return cfg, plain, flipped


def test_a_flipped_tie_changes_the_logprobs_beyond_the_tolerance(decodes):
    """The prompt has a tie, and its other target matters (why the check must know)."""
    _, plain, flipped = decodes
    assert plain.ties and plain.ties == flipped.ties
    assert check.mismatches(_answer(flipped.tokens, flipped.logprobs), plain)


def test_the_check_accepts_either_tie_target_and_nothing_else(decodes, oracle):
    cfg, plain, flipped = decodes
    for ref in (plain, flipped):
        answer = _answer(ref.tokens, ref.logprobs)
        assert check.tie_aware_mismatches(answer, oracle, CONTENT, cfg, plain) == []
    off = _answer(flipped.tokens, [lp + 5e-4 for lp in flipped.logprobs])
    assert check.tie_aware_mismatches(off, oracle, CONTENT, cfg, plain)


def _answer(tokens, logprobs) -> check.ServerAnswer:
    return check.ServerAnswer("r", list(tokens), list(logprobs))
