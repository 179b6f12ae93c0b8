"""The tools a user would pick instead of gptoss-batch, run on the same rows against the same server.

Each peer is a script run as its own process (``python -m benchmarks.peers.NAME``), so its CPU and peak
RSS are measured exactly like ours. It prints one JSON object on stdout (see ``PeerReport``):

    bare      the floor: N aiohttp worker coroutines doing the same job with nothing else
    tutorial  the approach most tutorials teach: a coroutine per prompt created up front, a Semaphore,
              asyncio.gather, results kept in a list until the end
    guidellm  not a script here: benchmarks/pipeline.py runs guidellm's own CLI from its own venv
"""
