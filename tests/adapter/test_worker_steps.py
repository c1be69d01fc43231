"""Worker request lifecycle: the V2 runner's block table around a compression, driven
through vLLM's own code, and the query-row capture buffers on both runners.

A real ``GPUModelRunner`` (V2, our patches installed) with vLLM's real ``RequestState`` and
``BlockTables`` on CPU runs its real ``execute_model`` prologue (``finish_requests``,
``free_states``, ``add_requests``, ``update_requests``, ``apply_staged_writes``) on empty
steps; everything else of the runner is a stub.

On a GPU, ``StagedWriteTensor.apply_write`` is one Triton program per staged write, with no
order between them, so two staged writes to the same row give an undefined row. The
Triton interpreter runs them in order and hides that, so here ``apply_write`` is replaced
by an emulation that records each batch of staged writes, checks whether the result
depends on the order they land in (every permutation), and applies them last-staged-first
(one order a GPU may produce). The invariant tested is the one a GPU needs: no row is the
target of two staged writes in one application.

Scenario: request A is compressed at row r (the real ``_v2_compress``, with the planner
stubbed to keep ``KEEP`` blocks); in the next step A finishes, is aborted or is preempted,
and new request B takes row r (``free_indices`` is LIFO). B's row must hold exactly B's
blocks. Also: the captures of requests that will not be compressed (resumed after
preemption) are never allocated, and every capture is freed on finish, abort, preemption.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("vllm.v1.worker.gpu.model_runner")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import (  # noqa: E402
    CachedRequestData,
    NewRequestData,
    SchedulerOutput,
)
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT  # noqa: E402
from vllm.v1.worker.cpu import buffer_utils as cpu_buffer_utils  # noqa: E402
from vllm.v1.worker.gpu import buffer_utils  # noqa: E402
from vllm.v1.worker.gpu.block_table import BlockTables  # noqa: E402
from vllm.v1.worker.gpu.model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from meda_vllm.config import KVPolicyConfig  # noqa: E402
from meda_vllm.vllm_adapter.patches import v1_runner, v2_runner  # noqa: E402
from meda_vllm.vllm_adapter.protocol import ARM_ATTR  # noqa: E402
from meda_vllm.vllm_adapter.worker import WorkerCompression  # noqa: E402

BS = 16
N_PROMPT = 100  # 7 blocks
KEEP = 2  # blocks kept after compression
A_BLOCKS = [10, 11, 12, 13, 14, 15, 16]
B_BLOCKS = [20, 21, 22]
C_BLOCKS = [30, 31, 32, 33, 34, 35, 36]
SERVER = {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_window": 8}


@dataclass
class Applied:
    tensor: buffer_utils.StagedWriteTensor
    writes: list[tuple[int, int, list[int]]]  # (row, start, contents), in staging order
    order_dependent: bool


def _emulated_apply_write(log: list[Applied]):
    """``StagedWriteTensor.apply_write`` as a GPU may run it: unordered programs."""

    def apply_write(self: buffer_utils.StagedWriteTensor) -> None:
        n = len(self._staged_write_indices)
        if n == 0:
            return
        writes, lo = [], 0
        for row, start, hi in zip(
            self._staged_write_indices,
            self._staged_write_starts,
            self._staged_write_cu_lens,
            strict=True,
        ):
            writes.append((row, start, list(self._staged_write_contents[lo:hi])))
            lo = hi

        def land(order) -> torch.Tensor:
            out = self.gpu.clone()
            view = out.view(self.num_rows, -1)
            for i in order:
                row, start, contents = writes[i]
                view[row, start : start + len(contents)] = torch.tensor(contents, dtype=out.dtype)
            return out

        orders = list(itertools.permutations(range(n))) if n <= 5 else [range(n)]
        results = [land(o) for o in orders]
        dependent = any(not torch.equal(results[0], r) for r in results[1:])
        log.append(Applied(self, writes, dependent))
        self.gpu.copy_(land(reversed(range(n))))  # the last staged write lands first
        self.clear_staged_writes()

    return apply_write


class _Stub:
    """model_state / lora_state / kv_connector / ec_connector of the runner."""

    def __getattr__(self, name):
        if name == "no_forward":
            return lambda so: (
                EMPTY_MODEL_RUNNER_OUTPUT
                if self.kind == "kv"
                else type("O", (), {"ec_connector_output": None})()
            )
        return lambda *args, **kwargs: None

    def __init__(self, kind: str = ""):
        self.kind = kind


@pytest.fixture
def v2(monkeypatch):
    """A V2 runner with real request states and block tables; ``log`` of applied writes."""
    # vLLM's CPU V2 runner does the same (vllm/v1/worker/cpu/shm.py): no pinned memory.
    monkeypatch.setattr(buffer_utils, "UvaBuffer", cpu_buffer_utils.UvaBuffer)
    log: list[Applied] = []
    monkeypatch.setattr(buffer_utils.StagedWriteTensor, "apply_write", _emulated_apply_write(log))
    # Our patches on the class, undone after the test.
    for name in ("finish_requests", "add_requests", "prepare_attn", "execute_model"):
        monkeypatch.setattr(GPUModelRunner, name, GPUModelRunner.__dict__[name])
    monkeypatch.setattr(GPUModelRunner, "sample_tokens", GPUModelRunner.__dict__["sample_tokens"])
    monkeypatch.setattr(GPUModelRunner, "_meda_patched", False, raising=False)
    v2_runner.apply()

    cpu = torch.device("cpu")
    runner = GPUModelRunner.__new__(GPUModelRunner)
    runner.req_states = RequestState(
        max_num_reqs=4,
        max_model_len=256,
        max_num_batched_tokens=256,
        num_speculative_steps=0,
        vocab_size=1000,
        device=cpu,
    )
    runner.block_tables = BlockTables([BS], 4, 256, [16], cpu)
    for name in (
        "pp_handler",
        "pooling_runner",
        "encoder_cache",
        "prompt_logprobs_worker",
        "adaptive_verification",
        "sampler",
        "aux_output_connector",
        "kv_block_zeroer",
    ):
        setattr(runner, name, None)
    runner.is_last_pp_rank = False
    runner.model_state = _Stub()
    runner.lora_state = _Stub()
    runner.kv_connector = _Stub("kv")
    runner.ec_connector = _Stub("ec")
    state = WorkerCompression(runner=runner, server=KVPolicyConfig.from_mapping(SERVER))
    runner._meda = state

    def fake_compress(rid, row_ids, truncate):  # the planner, stubbed: keep KEEP blocks
        state.captures.pop(rid, None)
        truncate([KEEP])
        state.removed[rid] = (N_PROMPT - KEEP * BS,)
        state.results[rid] = (N_PROMPT, (KEEP * BS,))

    state.compress_request = fake_compress
    return runner, state, log


def _new(rid: str, blocks: list[int], outputs: int = 0) -> NewRequestData:
    prompt = list(range(1, N_PROMPT + 1))
    return NewRequestData(
        req_id=rid,
        prompt_token_ids=prompt,
        mm_features=[],
        sampling_params=SamplingParams(max_tokens=16),
        pooling_params=None,
        block_ids=(list(blocks),),
        num_computed_tokens=0,
        lora_request=None,
        prefill_token_ids=prompt + [7] * outputs,  # V2: a resumed request replays outputs
    )


def _step(
    runner,
    *,
    new=(),
    cached: dict[str, list[int] | None] | None = None,
    finished=(),
    preempted=(),
    arm=(),
):
    """One engine step through the runner's real execute_model (no tokens to run)."""
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = list(new)
    cached = cached or {}
    so.scheduled_cached_reqs = CachedRequestData(
        req_ids=list(cached),
        resumed_req_ids=set(),
        new_token_ids=[],
        all_token_ids={},
        new_block_ids=[(b,) if b else None for b in cached.values()],
        num_computed_tokens=[N_PROMPT] * len(cached),
        num_output_tokens=[1] * len(cached),
    )
    so.finished_req_ids = set(finished)
    so.preempted_req_ids = set(preempted)
    setattr(so, ARM_ATTR, list(arm))
    return runner.execute_model(so)


def _block_writes(runner, log: list[Applied]) -> list[Applied]:
    return [a for a in log if a.tensor is runner.block_tables.block_tables[0]]


def _row(runner, idx: int) -> list[int]:
    tables = runner.block_tables
    assert int(tables.num_blocks.gpu[0, idx]) == int(tables.num_blocks.np[0, idx])
    return tables.block_tables[0].gpu[idx, : int(tables.num_blocks.np[0, idx])].tolist()


def _compress_a(runner, log):
    """Step 1: A and C are added; step 2: A's last prefill chunk, compressed after it."""
    _step(runner, new=[_new("C", C_BLOCKS), _new("A", A_BLOCKS)])
    r = runner.req_states.req_id_to_index["A"]
    assert _row(runner, r) == A_BLOCKS
    log.clear()
    _step(runner, cached={"A": None, "C": None}, arm=["A"])
    return r


def test_truncation_leaves_no_staged_write_behind(v2):
    runner, state, log = v2
    r = _compress_a(runner, log)
    tables = runner.block_tables.block_tables[0]
    # Nothing of A's truncation waits for the next step's apply_staged_writes: the row's
    # length is cut at once, the kept block ids are already in place.
    assert tables._staged_write_indices == []
    assert int(runner.block_tables.num_blocks.np[0, r]) == KEEP
    assert state.removed["A"] == (N_PROMPT - KEEP * BS,)
    # A keeps running: its next block is appended after the kept ones.
    _step(runner, cached={"A": [40], "C": None})
    assert _row(runner, r) == [*A_BLOCKS[:KEEP], 40]
    assert _row(runner, runner.req_states.req_id_to_index["C"]) == C_BLOCKS


@pytest.mark.parametrize("how", ["finished", "aborted", "preempted"])
def test_row_reused_in_the_next_step_holds_only_the_new_requests_blocks(v2, how):
    runner, state, log = v2
    r = _compress_a(runner, log)
    log.clear()
    # Next step: A leaves (an abort reaches the worker as a finished id, like a finish),
    # B is new and gets A's row (LIFO free list), C decodes into a new block.
    gone = {"finished": {"finished": ["A"]}, "aborted": {"finished": ["A"]}}
    gone["preempted"] = {"preempted": ["A"]}
    _step(runner, new=[_new("B", B_BLOCKS)], cached={"C": [37]}, **gone[how])
    assert runner.req_states.req_id_to_index["B"] == r  # the case under test
    writes = [w for a in _block_writes(runner, log) for w in a.writes]
    rows = [row for row, _, _ in writes]
    b_row = _row(runner, r)
    assert rows.count(r) == 1, f"{rows.count(r)} writes to row {r}: {writes}; B's row {b_row}"
    assert len(rows) == len(set(rows))  # at most one staged write per row
    assert not any(a.order_dependent for a in _block_writes(runner, log))
    assert b_row == B_BLOCKS
    assert _row(runner, runner.req_states.req_id_to_index["C"]) == [*C_BLOCKS, 37]
    assert "A" not in state.removed and "A" not in state.captures


# ---- capture buffers (item 2 of issue 13) ----------------------------------------------------


def test_new_request_gets_a_capture_and_finish_or_abort_frees_it(v2):
    runner, state, _ = v2
    _step(runner, new=[_new("A", A_BLOCKS), _new("B", B_BLOCKS)])
    assert set(state.captures) == {"A", "B"}
    _step(runner, finished=["A"])  # finish and abort look the same to the worker
    assert set(state.captures) == {"B"} and "A" not in state.infos
    _step(runner, finished=["B"])
    assert state.captures == {} and state.infos == {}


@pytest.mark.parametrize("outputs", [0, 3], ids=["mid-prefill", "after-outputs"])
def test_resumed_request_gets_no_capture(v2, outputs):
    runner, state, _ = v2
    _step(runner, new=[_new("A", A_BLOCKS)])
    assert "A" in state.captures
    _step(runner, preempted=["A"])
    assert "A" not in state.captures
    # V2 sends a resumed request as a new one (prefill = prompt + outputs so far).
    _step(runner, new=[_new("A", B_BLOCKS, outputs=outputs)])
    assert runner.req_states.req_id_to_index.get("A") is not None
    assert "A" not in state.captures  # never compressed: no buffer
    _step(runner, finished=["A"])
    assert state.captures == {} and "A" not in state.preempted  # no record left behind


@pytest.fixture
def v1(monkeypatch):
    """The V1 runner's ``_update_states`` wrapper around a no-op original."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    for name in ("_prepare_inputs", "execute_model", "sample_tokens"):
        monkeypatch.setattr(V1Runner, name, V1Runner.__dict__[name])
    monkeypatch.setattr(V1Runner, "_update_states", lambda self, so: None)
    monkeypatch.setattr(V1Runner, "_meda_patched", False, raising=False)
    v1_runner.apply()
    runner = V1Runner.__new__(V1Runner)
    state = WorkerCompression(runner=runner, server=KVPolicyConfig.from_mapping(SERVER))
    runner._meda = state
    return runner, state


def _v1_step(runner, *, new=(), finished=(), preempted=(), resumed=()):
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = list(new)
    so.scheduled_cached_reqs.req_ids = list(resumed)
    so.scheduled_cached_reqs.resumed_req_ids = set(resumed)
    so.finished_req_ids = set(finished)
    so.preempted_req_ids = set(preempted)
    runner._update_states(so)


def test_v1_captures_are_freed_on_finish_abort_and_preemption(v1):
    runner, state = v1
    _v1_step(runner, new=[_new(rid, A_BLOCKS) for rid in "ABC"])
    assert set(state.captures) == {"A", "B", "C"}
    _v1_step(runner, finished=["A"], preempted=["B"])  # A finished or aborted, B preempted
    assert set(state.captures) == {"C"} and set(state.infos) == {"C"}
    _v1_step(runner, resumed=["B"])  # V1 resumes in scheduled_cached_reqs: no new capture
    assert set(state.captures) == {"C"}
    _v1_step(runner, finished=["B", "C"])
    assert state.captures == {} and state.infos == {} and state.preempted == set()
