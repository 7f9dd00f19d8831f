"""Code the tests share; never shipped (only what `vipd demo` runs is in
the package).

pyproject.toml puts tests/ on sys.path (pytest's ``pythonpath``), so a test imports
``from support.fakes import FakeMover``. A test imports shared helpers from here, never
from another test module.

* `fakes`: FakeMover, the in-memory `vipd.movers.base.VipMover`.
* `daemons`: two in-process daemons over loopback with FakeMovers (the unit tests' pair).
* `netns`: the namespace lab (`vipd.demo.lab`) with the tests' extras: commands and
  coroutines in a namespace, neighbour tables, skip-or-fail and sweeping of namespaces.
* `pairlab_checks`: waits and assertions on a `vipd.demo.pairlab.PairLab`'s VIP holders
  and logs, shared by the failover tests.
"""
