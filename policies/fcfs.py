"""First come, first served.

Optimizes: simplicity and predictability — requests are admitted in arrival order and the most
recently admitted one is preempted first, so nobody overtakes anybody.
Costs: head-of-line blocking: a burst of short requests waits behind long ones, so tail latency
is high under mixed lengths. Parameters: none.
"""
from __future__ import annotations

from batchdeck.policies.base import Policy


class FCFSPolicy(Policy):
    name = "fcfs"
