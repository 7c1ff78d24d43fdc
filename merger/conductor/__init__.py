"""The conductor: an OpenAI-compatible HTTP server that routes over a pool with fallback.

    api         the request and error schema (the subset of OpenAI chat completions it honours)
    wire        the OpenAI wire format: request -> messages and generation; answer -> body and events
    app         the HTTP app (create_app): routes, API key, errors, streaming
    workflow    one call, or plan–execute–verify (Thinker, Worker, Verifier) and its prompts
    routing     the ranking, fallback down it and the Conductor (build_conductor)
    upstream    one member call under its deadline and token cap
    breaker     a circuit breaker per member
    backends    the member protocol and its failures; local_backend and remote_backend implement it
    serving     what one client may send and hold (body, headers, connections)
"""
