"""What the ForwardBatch.init_new hook hands the attention backend on the host (the
ForwardBatch it sees holds request slots only on the device, and no last-chunk flags)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.allocation import alloc_token_slots
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view
from sim import Simulator

from sglang_kvc.backend import DECODE_REQUESTS, EXTEND_REQUESTS, CompressedAttnBackend, DecodeRequests, ExtendRequests
from sglang_kvc.runtime import CONFIG_ENV_VAR

REPO = Path(__file__).resolve().parents[1]


def test_extend_requests_are_looked_up_by_request_id_in_the_passs_order():
    published = ExtendRequests()
    published.publish(["a", "b", "c"], [True, False, True], [4, 9, 2])
    assert published.lookup(["c", "a"]) == ([True, True], [2, 4])
    assert published.lookup(["a", "z"]) is None  # a request the hook did not see
    assert published.lookup(None) is None
    published.publish(["z"], [True], [1])  # the next pass replaces the last
    assert published.lookup(["a"]) is None


def test_decode_requests_are_taken_once_and_only_for_their_batch():
    published = DecodeRequests()
    published.publish(["a", "b"], [3, 5], [100, 7])
    assert published.take(3) is None  # a padded or other batch: no host lists
    published.publish(["a", "b"], [3, 5], [100, 7])
    assert published.take(2, ["a", "c"]) is None  # other requests than the ones published
    published.publish(["a", "b"], [3, 5], [100, 7])
    assert published.take(2, ["a", "b"]) == ([3, 5], [100, 7])
    assert published.take(2) is None  # taken once
    published.publish(["a", "b"], [3, 5], [100, 7])
    assert published.take(2, None) == ([3, 5], [100, 7])  # no ids to compare: the size decides


def test_graph_replay_preparation_takes_sglangs_replay_view():
    """The decode graph runner hands the backend the view SGLang's `build_replay_fb_view`
    makes (padded static buffers, no request ids): the replay's preparation stages the real
    requests' new tokens and takes the host lists the init_new hook published."""
    sim = Simulator()
    request = sim.new_request(list(range(100, 140)), 8)
    sim.prefill(request)
    backend = CompressedAttnBackend.__new__(CompressedAttnBackend)  # only its replay side, no model runner
    backend.engine = sim.engine
    req = request.req
    seq_len = req.kv_committed_len + 1
    new_token = alloc_token_slots(sim.tree, 1)
    sim.req_to_token_pool.write((req.req_pool_idx, seq_len - 1), new_token.to(torch.int32))
    padded = 3  # the captured batch size: two padded slots (request slot 0, length 1)
    buffers = SimpleNamespace(
        input_ids=torch.zeros(padded, dtype=torch.int64), positions=torch.zeros(padded, dtype=torch.int64),
        req_pool_indices=torch.tensor([req.req_pool_idx, 0, 0]), seq_lens=torch.tensor([seq_len, 1, 1]),
        seq_lens_cpu=torch.tensor([seq_len, 1, 1]), encoder_lens=None, mamba_track_indices=None,
    )
    forward_batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, seq_lens_sum=seq_len,
                                    seq_lens_cpu=torch.tensor([seq_len]), out_cache_loc=new_token, spec_info=None)
    view = build_replay_fb_view(forward_batch, buffers, bs=padded, raw_bs=1, num_tokens=padded, seq_len_fill_value=1,
                                capture_forward_mode=ForwardMode.DECODE, is_encoder_decoder=False)
    DECODE_REQUESTS.publish([request.rid], [req.req_pool_idx], [seq_len])
    backend.init_forward_metadata_out_graph(view)
    assert DECODE_REQUESTS.take(1) is None  # the replay took them
    assert sim.pool.staged_mask(new_token).all()


def test_the_init_new_hook_publishes_what_the_pass_needs(monkeypatch):
    """patches.scheduler.publish_batch_requests after ForwardBatch.init_new, on SGLang's own
    ScheduleBatch and ForwardBatch: an EXTEND pass's last-chunk flags (the batch's
    chunked_req is the one whose prompt goes on) and slots, a DECODE pass's slots and
    lengths; nothing without --kv-compress."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    from sglang_kvc.patches.scheduler import publish_batch_requests

    sim = Simulator()
    finishing, chunked = (sim.new_request(list(range(start, start + 40)), 4) for start in (100, 700))
    finishing.req.req_pool_idx, chunked.req.req_pool_idx = 3, 5
    batch = ScheduleBatch(reqs=[finishing.req, chunked.req], chunked_req=chunked.req)

    def forward_batch(mode: ForwardMode, seq_lens: list[int]) -> ForwardBatch:
        lengths = torch.tensor(seq_lens)
        return ForwardBatch(forward_mode=mode, batch_size=2, input_ids=torch.zeros(2, dtype=torch.int64),
                            req_pool_indices=torch.tensor([3, 5]), seq_lens=lengths,
                            out_cache_loc=torch.zeros(2, dtype=torch.int64), seq_lens_sum=sum(seq_lens),
                            seq_lens_cpu=lengths)

    rids = [finishing.rid, chunked.rid]
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    EXTEND_REQUESTS.publish([], [], [])
    publish_batch_requests(forward_batch(ForwardMode.EXTEND, [40, 32]), ForwardBatch, batch, None)
    assert EXTEND_REQUESTS.lookup(rids) is None  # compression off: nothing published

    monkeypatch.setenv(CONFIG_ENV_VAR, str(REPO / "configs" / "qwen_8x_tuned.yaml"))
    publish_batch_requests(forward_batch(ForwardMode.EXTEND, [40, 32]), ForwardBatch, batch, None)
    assert EXTEND_REQUESTS.lookup(rids) == ([True, False], [3, 5])
    publish_batch_requests(forward_batch(ForwardMode.DECODE, [41, 77]), ForwardBatch, batch, None)
    assert DECODE_REQUESTS.take(2, rids) == ([3, 5], [41, 77])
