"""The command line: ``python3 run.py <job> [options]``, one command per job (app.py lists them), each building one
request (xray.requests) and handing it to its pipeline's launch. The ``--pipeline X`` forms of earlier releases map
to the same commands."""
