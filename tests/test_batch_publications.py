"""What the ForwardBatch.init_new hook hands the attention backend on the host (the
ForwardBatch it sees holds request slots only on the device, and no last-chunk flags)."""

from __future__ import annotations

from sglang_kvc.backend import DecodeRequests, ExtendRequests


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
