"""The contract suite (issue 12, item 3): a fault at every backend call, then nothing may be left.

For each storage x memory backend found through the entry-point groups
``instaclone.storage`` and ``instaclone.memory`` (built-in or installed: the
test plugin ``tests/thirdparty/instaclone_stash`` too) on real libvirt, and
FakeStorage with each memory backend on a fake hypervisor, and each operation (a
clone job of a running source, freeze, a job of a frozen source, unfreeze):

1. a clean run records every call the operation makes to the hypervisor and
   to the backends (``faults.Injector``), with the state it was in;
2. each call then fails once, before and after it takes effect: raised
   (``live``: the engine rolls back) or by SIGKILL of the process running the
   engine (``kill``: a new engine on the same journal recovers);
3. the world must be as before (``world.compare``) and the journal must say
   so (``cases.settle``): no new file below the state dir, deltas, the memory
   backing dir with its ``instaclone/`` images, NVRAM dirs; no new domain or
   QEMU; every resource record released; the source running (or still
   frozen) with the same chain, NVRAM and memory backing; the operation
   Failed with a clear error, or - where a fault is tolerated - succeeded
   with working clones.

Layout: the test modules and the conftest here; the machinery in
``tests/support/contract``: ``harness`` (the only module that knows the engine's and journal's
Python surface: re-point it when they move), ``faults`` (proxy and
injector), ``world``/``fakeworld``/``realworld`` (what is checked, per
world), ``cases`` (one case), ``child`` (the engine in a process to kill),
``plans``/``realplans`` (cases from clean runs, ids), ``results`` (for the summary).

Run: ``pytest tests/contract/test_contract_fakes.py`` (no libvirtd) and
``flock /tmp/instaclone-integration.lock pytest -m integration tests/contract``.
"""
