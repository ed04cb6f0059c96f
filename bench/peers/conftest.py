"""The MLServer and LitServe peers import their frameworks, which live only in the peers' own
virtual environment (`python -m bench.serve --setup-peers`): pytest's doctest collection in
adaptd's environment leaves them out."""

collect_ignore = ["litserve_app.py", "mlserver_model.py"]
