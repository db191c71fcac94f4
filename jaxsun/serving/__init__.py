"""jaxsun.serving: a disaggregated multi-model serving engine for split models.

SUN lets decode requests of different task models batch on shared decode workers (one
frozen decode tree); PrefillShare lets task models reuse one prefill tree's KV and prefix
cache. The pieces, bottom up:

    engine.py        Engine: prefill / insert / generate / free (JetStream-style), Prefix
                     with producer tree id and KV digest, the slotted decode store
    prefix_cache.py  (prefill tree id, token prefix) -> KV, LRU under a byte budget
    transfer.py      KV transport: in-process, fake (delay / corruption); Ray's in
                     ray_backend.py
    router.py        prefill and decode policies: round_robin, least_loaded, power_of_two,
                     model_pinned, cache_aware
    workers.py       PrefillWorker, DecodeWorker (continuous batching), ColocatedWorker
    system.py        DeploymentConfig (conventional / sun / prefillshare / colocated) and
                     the in-process runtime (a thread per worker): the `Backend`
    ray_backend.py   the same workers as Ray actors, each running its own loop
    api.py           the OpenAI-compatible HTTP API (FastAPI + uvicorn)
    workload.py      seeded arrivals, Zipf model popularity, lengths, multi-agent sessions
    metrics.py       vLLM `bench serve` metrics, JSON and latency-CDF plots
    bench.py         the benchmark client (a workload against any Backend or URL)

Start a server: `python -m jaxsun.serving --config=configs/serving.py:tiny`.
Nothing here is imported by `import jaxsun`; FastAPI and Ray load only with their modules.
"""
