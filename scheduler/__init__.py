"""Pairing and routing policies (prefill and decode are each chosen by their own policy)."""

from disagg.scheduler.base import Candidate, Policy, RequestInfo, make_policy

__all__ = ["Candidate", "Policy", "RequestInfo", "make_policy"]
