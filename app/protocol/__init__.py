"""The Open Inference Protocol v2 (KServe, Triton): its wire format (codec.py) and the models
this service offers through it, one per capability of each artifact (catalog.py). The HTTP
routes are in app/api/routes/v2.py."""
