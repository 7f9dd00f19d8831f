"""Arbiters: who else votes on which node may hold the VIPs (docs/election.md).

`witness_client` is a node's end of the witness votes; the witness itself is
vipd/witness.py. The vote rule is pure and lives in vipd/core/votes.py.
"""
