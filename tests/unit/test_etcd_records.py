"""Member records as stored in etcd (vipd.arbiter.etcd): a round trip keeps every field,
and a newer member's record with keys this version does not know still reads, so a group
can be upgraded one node at a time."""

from __future__ import annotations

import json

import pytest

from vipd.arbiter.etcd import decode_member, encode_member
from vipd.core.group import Member
from vipd.core.protocol import State


def test_a_record_round_trips_with_every_field() -> None:
    record = Member("node1", 150, State.ACTIVE, True, maintenance=False, wants=True,
                    promote=True, preferred=True, version="0.2", digest="d1", starting=True)
    assert decode_member(encode_member(record)) == record


def test_keys_of_a_newer_version_are_ignored_not_fatal() -> None:
    data = json.loads(encode_member(Member("node2", 120, State.STANDBY, True)))
    data["quorum_hint"] = 3
    assert decode_member(json.dumps(data).encode()) == Member("node2", 120, State.STANDBY, True)


def test_an_older_record_without_starting_reads_as_not_starting() -> None:
    data = json.loads(encode_member(Member("node3", 100, State.STANDBY, True, starting=True)))
    del data["starting"]
    assert decode_member(json.dumps(data).encode()).starting is False


def test_a_record_missing_a_required_key_is_refused() -> None:
    data = json.loads(encode_member(Member("node3", 100, State.STANDBY, True)))
    del data["priority"]
    with pytest.raises(TypeError):
        decode_member(json.dumps(data).encode())
