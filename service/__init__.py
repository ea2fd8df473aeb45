"""HTTP service around the upt core: FastAPI app, database models, storage, auth and metrics."""
