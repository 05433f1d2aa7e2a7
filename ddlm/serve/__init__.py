"""Serving a checkpoint: an OpenAI-compatible HTTP API that batches concurrent requests and streams the
denoising, and a page that shows it.

    python -m ddlm.serve --workdir=runs/quickstart            # http://127.0.0.1:8000/

The floors, top down (nothing below imports this package):
    __main__.py   the command line: flags, load (ddlm.loading.load_for_inference), warm-up, uvicorn
    app.py        the routes (FastAPI), errors, server-sent events
    schemas.py    request checking: every malformed field is a 400 naming it
    scheduler.py  the bounded queue and the worker thread that forms batches
    engine.py     the samplers (ddlm.sampling.cli's steps) vmapped over rows, compiled per batch size
    text.py       a choice's final and streamed text (eos, stop strings)
    static/       index.html, the page
"""
