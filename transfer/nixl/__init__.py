"""The NIXL data path of a KV pull.

    endpoint.py  KVEndpoint: one NIXL agent, its registered KV planes, READs from peers
    progress.py  ProgressDriver: collects notifications only while blocks are held
    layout.py    where each KV block lives, and block lists as few large descriptors
"""
