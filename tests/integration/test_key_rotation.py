"""docs/protocol.md's key rotation on a real pair, checked the way an operator checks it:
`vipctl status` (the status document's `keys`) says when both nodes sign with the new key,
only then is the old one removed; nothing moves and no heartbeat is refused as
`unknown_key` or `bad_mac` at any step."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.faultinject import key_files, rejected_heartbeats, reload, write_private
from simulations.splitbrain import metric_values
from support.pairlab_checks import expect, logs, start_pair, status_section, stays
from vipd.demo.pairlab import PairLab
from vipd.keys import generate_key_line
from vipd.vipctl import render_status

pytestmark = [pytest.mark.netns, pytest.mark.pair(api=True)]

NEW = 2  # the lab's key has id 1


def keys(pair: PairLab, node: str) -> dict[str, Any]:
    return status_section(pair, node, "keys")


def test_rotation_by_the_book_with_status_saying_when_the_old_key_may_go(
        pair: PairLab) -> None:
    start_pair(pair)
    for node in pair.nodes:
        assert keys(pair, node) == {"loaded": [1], "signing": 1, "peer_signing": 1,
                                    "peer_newest": 1}
        assert "heartbeat keys: 1 loaded, signs with 1; peer signs with 1, holds up to 1" \
            in render_status(pair.status(node))
    files = key_files(pair)
    line = generate_key_line(NEW)
    old = files["node1"].read_text()
    for path in set(files.values()):
        write_private(path, old + line + "\n")

    assert reload(pair, "node1").startswith("config reloaded"), logs(pair)
    # only node1 has key 2: both still sign with 1, and status says the rotation is open
    assert keys(pair, "node1") == {"loaded": [1, NEW], "signing": 1, "peer_signing": 1,
                                   "peer_newest": 1}
    assert "rotation to key 2 not done" in render_status(pair.status("node1"))

    assert reload(pair, "node2").startswith("config reloaded"), logs(pair)
    expect(pair, lambda: all(keys(pair, n)["signing"] == keys(pair, n)["peer_signing"] == NEW
                             for n in pair.nodes), 2.0, "both nodes to sign with key 2")
    for node in pair.nodes:
        assert "both sign with 2: key 1 may be removed" in render_status(pair.status(node))
        values = metric_values(pair.metrics(node))
        assert values[("vipd_heartbeat_signing_key", "")] == NEW
        assert values[("vipd_peer_signing_key", "")] == NEW

    for path in set(files.values()):
        write_private(path, line + "\n")
    for node in ("node2", "node1"):
        assert reload(pair, node).startswith("config reloaded"), logs(pair)
    stays(pair, ["node1"], 0.5)
    for node in pair.nodes:
        assert keys(pair, node) == {"loaded": [NEW], "signing": NEW, "peer_signing": NEW,
                                    "peer_newest": NEW}
    rejected = rejected_heartbeats(pair)
    assert not any(reason in counts for counts in rejected.values()
                   for reason in ("unknown_key", "bad_mac")), rejected
    assert "-> ACTIVE" not in "\n".join(pair.log_lines("node2")), logs(pair)
