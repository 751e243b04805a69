"""The team stack's services, one module each; `infra/team_stack.py` composes them (`TeamStack`, the command line).

    processes    pid files, spawning a service (umask 077), health waits, stopping; `run`, `healthy`, `tail`
    credentials  every password, from its XRAY_TEAM_* variable or generated once; the state folder's modes
    s3           s3rver from npm (installed once, patched), the endpoint and its client
    postgres     MLflow's PostgreSQL cluster: initdb, start/stop, SCRAM, its databases, where it lives as root
    mlflow       the MLflow server with the xray-basic-auth app, and its accounts and grants
    zenml        the ZenML server, logging in to it, the client's store and the ZenML stack `team`

Each module imports only the ones listed above it, and neither zenml and mlflow nor postgres and s3 import each
other (pyproject.toml's import contracts); none re-exports anything.
"""
