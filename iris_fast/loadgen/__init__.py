"""``iris-fast load``: a multi-process load generator speaking the raw wire protocol.

Modules, one job each:

* ``cli``: argument parsing (``add_parser``) and the ``run`` entry point.
* ``plan``: validated run settings (``LoadPlan``) and the per-process work split.
* ``pacing``: the token bucket that paces connects and sends.
* ``shared``: the shared-memory counter layout children publish and the parent reads.
* ``worker``: the per-process uvloop client swarm.
* ``runner``: spawns the workers, drives the phases, shows progress, collects results.
* ``report``: merges per-process results into totals, a rich table and JSON.
"""
