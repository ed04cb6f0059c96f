"""The servers `bench.serve` measures adaptd against, each serving the same models: MLServer and
LitServe (run from the peers' own virtual environment, `.bench-peers/`) and a hand-written FastAPI
endpoint (run from adaptd's)."""
