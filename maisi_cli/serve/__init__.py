"""`maisi serve`: the MAISI NIM's HTTP API (docs.nvidia.com/nim/medical/maisi/latest/api-reference.html) over the
Python API, plus asynchronous jobs kept in SQLite under --data.

- nim.py: the NIM payload, checked field by field and mapped onto a GenerateRequest;
- jobs.py: the job store (stdlib sqlite3, WAL): queued → running → done | failed | cancelled;
- worker.py: one thread that runs the jobs in order with one Generator (its networks stay loaded);
- app.py: the FastAPI app (endpoints, bearer token, body-size limit).

FastAPI and uvicorn come with the `serve` extra; nothing here imports Typer or rich.
"""
