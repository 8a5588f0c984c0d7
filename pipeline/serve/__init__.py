"""The web app (`v2m serve`): app.py (routes, limits, the server), jobs.py (the generation queue of the creator page),
db.py (the SQLite schema and connections), templates/ and static/ (served locally: no CDN). Not a DVC stage: it
imports the layers (inference, media, config), never a stage module."""
