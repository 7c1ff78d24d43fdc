"""The router and the conductor: pool config, prompt embeddings, per-item outcome table, the sep-CMA-ES head,
held-out evaluation, and the OpenAI-compatible server that routes with fallback.

Public entry points (heavy dependencies load inside them):
    merger.router.pool.load_pool(path) -> Pool
    merger.router.training.train_router(pool) -> RouterHead ; evaluate_router(pool) -> dict
    merger.conductor.routing.build_conductor(pool) -> Conductor
    merger.conductor.app.create_app(conductor) -> FastAPI
    merger.conductor.serving.uvicorn_config(app, pool.server, host, port) -> uvicorn.Config (client bounds)
"""
