"""Per-layer physical lengths (``kv_layer_groups``, issue #15) on vLLM's GPU code path
(Model Runner V2 + TRITON_ATTN, meda's Triton kernels, all interpreted): one KV cache group
per layer of the sharp 4-layer model. V2 cuts each group's block-table row by its own
length and computes each group's slot mappings and ``seq_lens`` from its own removed
tokens; a wrong group shows in the oracle's logprobs or in the pages held."""

from __future__ import annotations

import os

import pytest

from tests.e2e.client import wait_idle
from tests.e2e.test_layer_groups import FLAGS, SERVER, _held_blocks
from tests.gpu_path.server import GpuPathServer
from tests.gpu_path.test_gpu_path import V2_RUNNERS
from tests.oracle import check

pytestmark = [pytest.mark.gpu_path, pytest.mark.slow]

#: small prompts (36 tokens per image): interpreted Triton costs about a second a step
CASES = check.cases(side=168, video_size=168)


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-path-groups-dump")


@pytest.fixture(scope="module")
def v2_groups_server(sharp_model_dir, dump_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu-path-groups")
    flags = [*FLAGS, "--limit-mm-per-prompt", '{"image": 2, "video": 1}']
    srv = GpuPathServer(sharp_model_dir, flags, logs / "server.log", logs / "kernels")
    srv.env["PYTHONPATH"] = os.pathsep.join((str(check.SHIM), srv.env["PYTHONPATH"]))
    srv.env["MEDA_VLLM_PLAN_DUMP"] = str(dump_dir)
    with srv:
        yield srv


def test_each_group_holds_its_own_length_and_decodes_like_the_oracle_on_v2(
    v2_groups_server, oracle, dump_dir
):
    """MEDA and PyramidKV (budgets that differ by layer) on a two-image request: the pages
    the scheduler holds are each group's own kept tokens in blocks, and the kept positions,
    greedy tokens and logprobs equal the oracle's (which pads each group to its own
    largest budget)."""
    srv = v2_groups_server
    assert srv.worker_record()["runner"] in V2_RUNNERS
    held, expected, kept = _held_blocks(srv, dump_dir, CASES["images"], "meda")
    assert held == expected, (held, expected, kept)
    assert len(set(kept)) > 1, kept  # the groups really keep different lengths
    problems = []
    for policy in ("meda", "pyramidkv"):
        xargs = {"kv_policy": policy, "kv_window": check.WINDOW}
        found = check.check_compressed(srv, oracle, dump_dir, CASES["images"], SERVER, xargs)
        problems += [f"{policy}: {p}" for p in found]
    assert not problems, "\n".join(problems)
    assert wait_idle(srv)["vllm:kv_cache_usage_perc"] == 0.0
