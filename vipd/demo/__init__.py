"""What `vipd demo` runs: a namespace LAN (`lab`), a vipd pair in it with a responder per
node and a client probe (`pairlab`), and the command that fails one node over and prints
the timeline (`command`). simulations/ benchmarks the same pair.

Nothing is imported here: `python -m vipd.demo.pairlab responder|probe` runs inside the
lab, and a package that imported pairlab first would make runpy warn.
"""
