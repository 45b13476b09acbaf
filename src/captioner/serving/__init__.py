"""Serving (`captioner serve`): ``config`` (the server's limits), ``options`` (a request's options), ``batcher``
(micro-batching in the model thread), ``app`` (the REST API and the web page), ``server`` (running it under
uvicorn); ``web/`` holds the page."""
