"""Gateway routing: pairing and routing policies, the prefill-hop decider, the prefix index
and its KV-event feed. (The vLLM connector's scheduler-side half is
``disagg.transfer.connector``, unrelated to this package.)"""

from disagg.scheduler.base import Candidate, Policy, RequestInfo
from disagg.scheduler.registry import POLICIES, make_policy, policy_names, validate_options

__all__ = ["POLICIES", "Candidate", "Policy", "RequestInfo", "make_policy", "policy_names",
           "validate_options"]
