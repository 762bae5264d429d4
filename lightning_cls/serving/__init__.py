"""`python -m lightning_cls serve --model_dir DIR`: an HTTP service for an exported classifier, on LitServe.

Processes (LitServe's), and the module that holds what runs in each:

- the main process: `server` builds the `LitServer` from `ServeSettings` and runs it;
- the HTTP server(s) (uvicorn, forked): `http`, the ASGI middlewares that check requests and count responses;
- the inference worker(s) (spawned, they load the model): `api`, the LitAPI;
- a logger process (spawned): `metrics.MonitoringLogger`, which holds the prediction metrics, the drift and
  feedback windows, and stores every prediction in the feedback database.

`metrics` also holds the Prometheus metric classes and the multiprocess wiring that lets GET /metrics merge what
every process recorded. `feedback` is the SQLite database of predictions and true labels (POST /feedback), shared
by the HTTP server and the logger process; `prediction_log` stores the served predictions there without losing any
(retries, a spill file) and makes the prediction ids. The drift and accuracy maths are in `monitoring.drift`,
shared with the offline `monitor` command.

Nothing is imported here: spawned workers import only the modules their pickled objects need.
"""
