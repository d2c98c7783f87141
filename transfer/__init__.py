"""KV transfer between instances, in four parts:

    connector/  the vLLM KV connector (``DisaggConnector``): its scheduler half (vLLM's
                scheduler process) and worker half (each vLLM worker), the per-step orders
                between them, the loaders that fill a decoder's blocks, and its counters
    nixl/       the NIXL data path: a worker's endpoint, its progress driver, KV block layout
    control/    the ZMQ control plane: the side channel and the typed messages it carries
    store/      the KV store: chunk keys, CPU / disk / Redis tiers, the tiered stack, and the
                worker's chunk I/O and the scheduler's lookups against it
"""
